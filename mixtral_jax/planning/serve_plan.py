"""Serving plans: the paged engine's real step compiled ahead of time for a slice, and how many KV pages,
tokens and sequences the memory left after the weights and XLA's temporaries holds.

    report = plan_serve(MixtralConfig(), "v5e-8", "expert=4,tensor=2", max_batch=32, max_context=4096)

The step (`inference.paged_step.paged_step`: every running decode and prefill chunks up to the token
budget, one token drawn per row) is lowered on `ShapeDtypeStruct`s laid out as the engine lays them out
(pages over the sequence shards and KV heads over `tensor`), twice: first with one sequence's pages per
shard, which gives everything that does not grow with the pages (weights, the step's inputs, XLA's
temporaries and outputs); then with as many pages as the rest of HBM holds, which is the plan reported
(XLA:TPU refuses a program that needs more than HBM, so a plan that compiles fits). `check_engine_fits`
does the same on the devices `serve` runs on, before the first request.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import MixtralConfig, check_quantize
from mixtral_jax.errors import PlanError
from mixtral_jax.inference.paged_step import EngineConfig, engine_layout, lower_step
from mixtral_jax.model.kv_cache import PagedKVCache
from mixtral_jax.planning.planner import (
    _OOM_RE,
    GPU_COMPILER_OPTIONS,
    _cost,
    abstract_model,
    bytes_per_chip,
    plan_runtime,
    slice_mesh,
)
from mixtral_jax.planning.topologies import GIB, GpuTopology, Topology, get_topology

RETRY_MARGIN = 0.01  # a page count XLA refuses is cut to leave this share of HBM free, once


@dataclasses.dataclass(frozen=True)
class ServeReport:
    """The serving step on one slice; bytes per chip. `pages` in all (split over `shards` sequence shards),
    `tokens` = pages x page_size, `sequences`: how many sequences of `max_context` the pages hold at once."""

    topology: str
    mesh: str
    chips: int
    hbm_bytes: int
    max_batch: int
    max_context: int
    prefill_chunk: int
    page_size: int
    cache_dtype: str
    quantize: str | None
    shards: int
    weight_bytes: int
    fixed_bytes: int          # everything but the pages: weights, the step's inputs, XLA's temporaries, outputs
    page_bytes: int           # one page in each shard, every layer, on one chip
    pages: int
    tokens: int
    sequences: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    compile_s: float
    est_step_s: float
    attention: str            # "ragged paged attention kernel" (Pallas TPU), "Pallas GPU ...", or "XLA"
    xla_error: str | None = None

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        """The step compiles within HBM with pages for at least one sequence of max_context a shard."""
        return self.xla_error is None and self.sequences >= self.shards and self.total_bytes <= self.hbm_bytes

    @property
    def holds_batch(self) -> bool:
        """The pages hold max_batch sequences of max_context at once (so nothing is ever preempted)."""
        return self.fits and self.sequences >= self.max_batch

    @property
    def label(self) -> str:
        return f"serve {self.max_batch}x{self.max_context}"

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), total_bytes=self.total_bytes, fits=self.fits,
                    holds_batch=self.holds_batch, label=self.label)


def _compile(graphdef, state, config, engine: EngineConfig, mesh, cache_dtype, backend: str):
    """(compiled or None, XLA's refusal or None, seconds)."""
    t0 = time.perf_counter()
    lowered = lower_step(graphdef, state, config, engine, mesh, cache_dtype=cache_dtype)
    try:
        compiled = lowered.compile(compiler_options=GPU_COMPILER_OPTIONS if backend == "gpu" else None)
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses programs that need more than HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).strip().splitlines()[0], time.perf_counter() - t0
    return compiled, None, time.perf_counter() - t0


def _total_of(m) -> int:
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def _total(compiled) -> int:
    return _total_of(compiled.memory_analysis())


def _refused_total(error: str, arguments: int, rest: int) -> int:
    """What a refused program needs a chip: XLA:TPU names its temporaries ("required for HLO temporaries
    (38.26G)"); the arguments are the known ones, `rest` the outputs not aliased."""
    m = _OOM_RE.search(error)
    return int(float(m[1]) * GIB) + arguments + rest if m else 0


def plan_serve(config: MixtralConfig, topology: str | Topology | GpuTopology, mesh: str, *, max_batch: int,
               max_context: int, prefill_chunk: int = 256, page_size: int = 16, kv_cache_dtype=None,
               quantize: str | None = None, dtype="bfloat16", pages: int | None = None) -> ServeReport:
    """The engine's step for `max_batch` rows of `max_context` tokens on `topology`'s `mesh`, with pages
    sized to fill HBM (or exactly `pages`, in all)."""
    check_quantize(quantize)
    topo = get_topology(topology) if isinstance(topology, str) else topology
    runtime = plan_runtime(slice_mesh(config, topo, mesh), dtype, backend=topo.backend, quantize=quantize)
    cache_dtype = jnp.dtype(kv_cache_dtype or dtype)
    graphdef, state = abstract_model(config, runtime)
    engine = EngineConfig(max_batch=max_batch, max_context=max_context, prefill_chunk=prefill_chunk,
                          cache_dtype=cache_dtype.name, page_size=page_size)
    layout = engine_layout(engine, config, runtime.mesh)
    shards, hbm = layout.shards, topo.chip.hbm_bytes
    page_bytes = bytes_per_chip(PagedKVCache.shapes(config, shards, page_size, cache_dtype, runtime.mesh))
    seconds = 0.0

    def attempt(total_pages):
        nonlocal seconds
        compiled, error, s = _compile(graphdef, state, config, dataclasses.replace(engine, num_pages=total_pages),
                                      runtime.mesh, cache_dtype, topo.backend)
        seconds += s
        return compiled, error

    probe_pages = shards * layout.pages_per_seq
    compiled, error = attempt(probe_pages)
    fixed = _total(compiled) - layout.pages_per_seq * page_bytes if compiled else 0
    if pages is None and compiled is not None:
        per_shard = (hbm - fixed) // page_bytes
        if per_shard >= layout.pages_per_seq:
            probe = compiled.memory_analysis()
            compiled, error = attempt(shards * per_shard)
            if error:  # XLA's temporaries grew with the pages: fit a line through both compiles, once
                rest = int(probe.output_size_in_bytes - probe.alias_size_in_bytes)
                grown = int(probe.argument_size_in_bytes) + (per_shard - layout.pages_per_seq) * page_bytes
                need = _refused_total(error, grown, rest)
                slope = (need - fixed - layout.pages_per_seq * page_bytes) / (per_shard - layout.pages_per_seq)
                if need and slope > 0:
                    per_shard = int(layout.pages_per_seq + ((1 - RETRY_MARGIN) * hbm - _total_of(probe)) / slope)
                else:
                    per_shard = int(per_shard * (1 - RETRY_MARGIN))
                compiled, error = attempt(shards * max(per_shard, 1))
        pages = shards * per_shard
    elif compiled is not None and pages != probe_pages:
        pages = shards * -(-pages // shards)
        compiled, error = attempt(pages)
    pages = max(pages or 0, 0) if compiled is not None else 0
    per_shard = pages // shards
    mem = compiled.memory_analysis() if compiled is not None else None
    measured = {f"{k}_bytes": int(getattr(mem, f"{k}_size_in_bytes")) if mem else 0
                for k in ("argument", "temp", "output", "alias")}
    cost = _cost(compiled) if compiled is not None else {}
    est = max(float(cost.get("flops", 0.0)) / topo.chip.peak_flops,
              float(cost.get("bytes accessed", 0.0)) / topo.chip.hbm_bandwidth)
    hlo = compiled.as_text() if compiled is not None else ""
    return ServeReport(
        topology=topo.name, mesh=mesh, chips=topo.chips, hbm_bytes=hbm, max_batch=max_batch, max_context=max_context,
        prefill_chunk=prefill_chunk, page_size=page_size, cache_dtype=cache_dtype.name, quantize=quantize,
        shards=shards, weight_bytes=bytes_per_chip(state), fixed_bytes=fixed, page_bytes=page_bytes, pages=pages,
        tokens=pages * page_size, sequences=shards * (per_shard // layout.pages_per_seq),
        **measured, compile_s=seconds, est_step_s=est,
        attention=("ragged paged attention kernel" if "ragged_paged_attention_kernel" in hlo else
                   "Pallas GPU paged attention kernel" if "ragged_paged_attention_gpu" in hlo else "XLA"),
        xla_error=error)


def format_serve(config: MixtralConfig, report: ServeReport) -> str:
    r = report
    gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    quant = f", {r.quantize} weights" if r.quantize else ""
    lines = [f"serving step on {r.topology} ({r.chips} chips, {gib(r.hbm_bytes)} GiB HBM each), mesh {r.mesh}: "
             f"{r.max_batch} rows, max context {r.max_context}, prefill chunk {r.prefill_chunk}, "
             f"{r.cache_dtype} KV{quant}, {r.shards} sequence shard(s)"]
    if r.xla_error and not r.pages:
        lines.append(f"does NOT fit: XLA: {r.xla_error}")
        return "\n".join(lines)
    lines += [f"per chip (GiB): weights {gib(r.weight_bytes)}, everything but the pages {gib(r.fixed_bytes)}, "
              f"args {gib(r.argument_bytes)}, temps {gib(r.temp_bytes)}, total {gib(r.total_bytes)} of "
              f"{gib(r.hbm_bytes)}",
              f"pages: {r.pages} of {r.page_size} tokens ({r.pages // r.shards} a shard, {r.page_bytes / 2**20:.2f} "
              f"MiB a page per chip): {r.tokens} KV tokens, {r.sequences} sequences of {r.max_context} at once",
              f"attention: {r.attention}; compile {r.compile_s:.0f} s; step ESTIMATE {r.est_step_s * 1e3:.1f} ms "
              f"(XLA's cost analysis, a {r.prefill_chunk}-token budget step)"]
    if not r.fits:
        lines.append(f"does NOT fit: {'XLA: ' + r.xla_error if r.xla_error else 'no room for one sequence a shard'}")
    elif not r.holds_batch:
        lines.append(f"fits, but the pages hold {r.sequences} sequences of {r.max_context}, fewer than "
                     f"--max-batch {r.max_batch}: longer requests wait or are preempted; for none, "
                     f"--max-batch {r.sequences} (or int8 KV / int8 weights / more chips)")
    else:
        lines.append(f"fits: room for {r.sequences} sequences of {r.max_context} (>= --max-batch {r.max_batch})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ at serve start-up
@dataclasses.dataclass(frozen=True)
class EngineFit:
    """The engine's step on the devices it will run on: bytes it needs a device and what a device has, and
    the sequences of max_context its pages hold against those a device's memory would hold."""

    need_bytes: int
    device_bytes: int
    sequences: int
    sequences_that_fit: int
    pages_that_fit: int
    context: int

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.device_bytes


def device_memory(devices) -> int | None:
    """The smallest memory XLA may allocate on `devices` (its `bytes_limit`), None where the backend does not
    say (CPU: host memory, not planned here)."""
    limits = []
    for d in devices:
        stats = d.memory_stats() if d.platform != "cpu" else None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def engine_fit(model, engine: EngineConfig, device_bytes: int | None = None) -> EngineFit | None:
    """Compile the engine's step for `model` as loaded (its weights' shapes and shardings) and compare what it
    needs with a device's memory (`device_bytes`, default: the devices' own limit; None on CPU, where
    nothing is checked). Costs one compile of the step."""
    mesh = model.runtime.mesh
    if device_bytes is None:
        device_bytes = device_memory(mesh.devices.flat if mesh is not None else jax.devices()[:1])
        if device_bytes is None:
            return None
    config = model.config
    graphdef, state = nnx.split(model)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                            state)
    cache_dtype = jnp.dtype(engine.cache_dtype or model.runtime.dtype)
    layout = engine_layout(engine, config, mesh)
    page_bytes = bytes_per_chip(PagedKVCache.shapes(config, layout.shards, layout.page_size, cache_dtype, mesh)) \
        if mesh is not None else PagedKVCache.bytes_per_page(config, layout.page_size, cache_dtype)
    pages_bytes = layout.pages * page_bytes
    try:
        compiled = lower_step(graphdef, abstract, config, engine, mesh, cache_dtype=cache_dtype).compile()
        need = _total(compiled)
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program larger than HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = _refused_total(str(e), bytes_per_chip(abstract) + pages_bytes, 0) or device_bytes + 1
    room = device_bytes - (need - pages_bytes)
    per_shard = max(room // page_bytes, 0)
    return EngineFit(need, device_bytes, layout.sequences(), layout.shards * (per_shard // layout.pages_per_seq),
                     layout.shards * per_shard, layout.context)


def check_engine_fits(model, engine: EngineConfig, device_bytes: int | None = None) -> EngineFit | None:
    """`engine_fit`, raising PlanError (before anything is allocated for the engine) when the step cannot fit,
    with what would."""
    fit = engine_fit(model, engine, device_bytes)
    if fit is not None and not fit.fits:
        raise PlanError(
            f"the serving step needs {fit.need_bytes / 2**20:.1f} MiB a device and {fit.device_bytes / 2**20:.1f} "
            f"are available: its KV pages hold {fit.sequences} sequences of {fit.context}, this memory holds "
            f"{fit.sequences_that_fit} (--num-pages {fit.pages_that_fit}, or --max-batch {fit.sequences_that_fit}); "
            "or --kv-cache-dtype int8, --quantize int8, a shorter --max-context, more devices")
    return fit
