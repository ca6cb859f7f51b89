"""Plans for a TPU slice or GPU hosts: the real jitted functions compiled ahead of time for them, on abstract
inputs.

    reports = plan(MixtralConfig(), "v5e-8", "expert=4,tensor=2", [decode(8, 8192)])

Nothing is allocated: parameters, KV cache and batches are `jax.ShapeDtypeStruct`s carrying the shardings
the rules give them on a mesh over the slice's devices (from libtpu's topology description; no TPU
needed). What gets compiled is what runs: the sampler's `prefill` and `decode` exactly as `Sampler`
jits them, and the trainer's step with its optimizer state. XLA's TPU compiler then says what one chip
holds (`memory_analysis`), what it computes and reads (`cost_analysis`), and which collectives the
partitioned program runs (read from the compiled HLO). Multi-host slices compile as the one SPMD
program every host runs.

GPU hosts (`h100-8`, `h200-1`, `h100-16`, ...) compile the same way through the CUDA PJRT plugin's topology
description (`mixtral_jax.planning.topologies.GpuTopology`): XLA:GPU's buffer assignment per GPU, its
optimized HLO's collectives, and the cost analysis of that HLO (XLA:GPU's `cost_analysis()` is empty, so
the HLO is counted by XLA's cost-analysis pass through the CPU client; custom calls such as cuBLAS GEMMs
are counted, kernels XLA cannot see into are not).

The step time is an estimate from XLA's cost analysis (max of FLOPs / peak and bytes / HBM bandwidth),
not a measurement; inside the decode loop and the MoE's branches, XLA counts each body once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src import xla_bridge
from jax._src.lib import _jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.config import MixtralConfig, RuntimeConfig, check_quantize
from mixtral_jax.errors import PlanError
from mixtral_jax.inference import sampler as sampler_lib
from mixtral_jax.model import lora as lora_lib
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.moe import resolve_strategy
from mixtral_jax.model.params import param_specs
from mixtral_jax.model.placement import check_mesh
from mixtral_jax.planning.topologies import GIB, GpuTopology, Topology, TopologyError, get_topology
from mixtral_jax.sharding.mesh import make_mesh, parse_mesh_spec
from mixtral_jax.sharding.rules import (
    CACHE_ROW_AXES,
    DEFAULT_RULES,
    FSDP_RULES,
    KV_CACHE_AXES,
    KV_SCALE_AXES,
    ShardingError,
    activation_spec,
    param_shardings,
)
from mixtral_jax.training.trainer import TrainConfig, TrainStep, batch_sharding, run_step

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Workload:
    """`prefill`: `batch` prompts of `tokens` tokens into a fresh cache; `decode`: the decode loop over a
    cache of `tokens` slots per sequence; `train`: one optimizer step on `batch` x `tokens` tokens (split
    into `accum` micro-batches), optionally with FSDP."""

    kind: str
    batch: int
    tokens: int
    accum: int = 1
    fsdp: bool = False
    remat: bool = False
    lora_rank: int = 0  # train: LoRA adapters of this rank on attention + experts, the base frozen (0: full)

    def __post_init__(self):
        if self.kind not in ("prefill", "decode", "train"):
            raise ValueError(f"unknown workload {self.kind!r}; use prefill, decode or train")
        for name in ("batch", "tokens", "accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.kind}: {name} must be a positive integer, got {value!r}")
        if self.kind == "decode" and self.tokens < 2:
            raise ValueError("decode: the context must hold at least 2 tokens (a prompt and a new one)")
        if self.batch % self.accum:
            raise ValueError(f"train: batch {self.batch} is not divisible by accum {self.accum}")

    @property
    def label(self) -> str:
        extra = (f" accum {self.accum}" if self.accum > 1 else "") + (" fsdp" if self.fsdp else "") \
            + (" remat" if self.remat else "") + (f" lora {self.lora_rank}" if self.lora_rank else "")
        return f"{self.kind} {self.batch}x{self.tokens}{extra}"


def prefill(batch: int, tokens: int) -> Workload:
    return Workload("prefill", batch, tokens)


def decode(batch: int, context: int) -> Workload:
    return Workload("decode", batch, context)


def train(batch: int, seq_len: int, accum: int = 1, fsdp: bool = False, remat: bool = False,
          lora_rank: int = 0) -> Workload:
    return Workload("train", batch, seq_len, accum, fsdp, remat, lora_rank)


@dataclasses.dataclass(frozen=True)
class Report:
    """One workload compiled for one slice and mesh; byte counts are per chip."""

    workload: Workload
    topology: str
    mesh: str
    chips: int
    hbm_bytes: int
    weight_bytes: int             # the parameters' shards, as the rules lay them out
    argument_bytes: int           # XLA's memory analysis from here down
    temp_bytes: int
    output_bytes: int
    alias_bytes: int              # outputs that reuse donated arguments (counted once)
    compile_s: float              # trace + lower + compile on this machine
    collectives: dict             # op -> {"count": n, "bytes": result bytes per chip}
    flops: float                  # per chip, XLA's cost analysis
    bytes_accessed: float
    est_step_s: float             # max(flops / peak, bytes / HBM bandwidth): an estimate
    est_bound: str                # "compute" or "memory"
    xla_error: str | None = None  # XLA refused to compile: more memory than HBM (then only `required_bytes`
    required_bytes: int = 0       # and the arguments, from their shardings, are known)
    moe_strategy: str = ""        # the MoE strategy compiled (`auto` resolved for the target backend)
    moe_kernel_flops: float = 0.0   # `gmm`: the grouped-matmul kernels' FLOPs as launched (in `flops`),
    moe_active_flops: float = 0.0   # and those of the routed rows (see `planner.gmm_cost`)
    quantize: str | None = None   # "int8": int8 expert and attention weights
    attention_kernel: str = ""    # the fused attention kernel the program calls ("cudnn", "splash"), or "" (XLA's)
    attention_kernel_flops: float = 0.0  # cuDNN's fused attention: FLOPs from its shapes (in `flops`)

    @property
    def total_bytes(self) -> int:
        if self.xla_error:
            return max(self.required_bytes, self.argument_bytes)
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.xla_error is None and self.total_bytes <= self.hbm_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["workload"] = dict(d["workload"], label=self.workload.label)
        return dict(d, total_bytes=self.total_bytes, fits=self.fits)


# ------------------------------------------------------------------------------------------- mesh
def valid_meshes(config: MixtralConfig, chips: int) -> list[str]:
    """Every data x expert x tensor split of `chips` that can lay out `config`."""
    out = []
    for expert in (d for d in range(1, chips + 1) if chips % d == 0 and config.n_experts % d == 0):
        for tensor in (d for d in range(1, chips // expert + 1) if (chips // expert) % d == 0):
            if all(n % tensor == 0 for n in (config.n_heads, config.n_kv_heads, config.hidden_dim, config.vocab_size)):
                sizes = {"data": chips // expert // tensor, "expert": expert, "tensor": tensor}
                out.append(",".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "data=1")
    return out


def slice_mesh(config: MixtralConfig, topology: Topology, spec: str) -> Mesh:
    """A mesh over the slice's devices; a spec that does not match the slice or the model is one line
    naming the meshes that would."""
    try:
        parse_mesh_spec(spec, topology.chips)
        mesh = make_mesh(spec, devices=topology.devices())
        check_mesh(config, mesh)
    except ShardingError as e:
        choices = valid_meshes(config, topology.chips)
        raise PlanError(f"mesh {spec!r} does not fit {topology.name} ({topology.chips} chips) for this model: "
                        f"{str(e).rstrip('.')}; valid meshes: {' | '.join(choices)}") from None
    return mesh


# ------------------------------------------------------------------------------ abstract inputs
def abstract_model(config: MixtralConfig, runtime: RuntimeConfig, rules=DEFAULT_RULES,
                   lora: lora_lib.LoRAConfig | None = None):
    """(graphdef, state) of a `Mixtral` whose parameters are `ShapeDtypeStruct`s with the rules' shardings
    (with `lora`: and its adapters')."""
    def build():
        model = Mixtral(config, runtime, rngs=nnx.Rngs(0))
        if lora is not None:
            zeros = {n: jnp.zeros(s.shape, s.dtype) for n, s in lora_lib.adapter_specs(config, lora).items()}
            lora_lib.add_adapters(model, lora, zeros, rules=rules)
        return model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    specs = {**param_specs(config, runtime), **(lora_lib.adapter_specs(config, lora) if lora is not None else {})}
    shardings = param_shardings(specs, runtime.mesh, rules)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        value = var.get_value()
        var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[".".join(map(str, path))]))
    return graphdef, nnx.from_flat_state(flat)


def _replicated(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _by_rules(mesh, shape, dtype, axes):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, activation_spec(shape, axes, mesh)))


def abstract_cache(config: MixtralConfig, batch: int, size: int, dtype, mesh: Mesh) -> KVCache:
    """The cache `prefill` hands `decode`, as `KVCache.empty` lays it out on `mesh`."""
    shape = (batch, config.n_kv_heads, size, config.head_dim)
    per_layer = lambda shape, dtype, axes: tuple(_by_rules(mesh, shape, dtype, axes)  # noqa: E731
                                                 for _ in range(config.n_layers))
    kv = lambda: per_layer(shape, dtype, KV_CACHE_AXES)  # noqa: E731
    scales = lambda: per_layer(shape[:3], jnp.float32, KV_SCALE_AXES) if jnp.dtype(dtype) == jnp.int8 else None  # noqa: E731
    rows = lambda dtype: _by_rules(mesh, (batch, size), dtype, CACHE_ROW_AXES)  # noqa: E731
    return KVCache(k=kv(), v=kv(), positions=rows(jnp.int32), valid=rows(jnp.bool_),
                   length=_replicated(mesh, (), jnp.int32),
                   next_position=_by_rules(mesh, (batch,), jnp.int32, CACHE_ROW_AXES[:1]),
                   k_scale=scales(), v_scale=scales())


def bytes_per_chip(tree) -> int:
    """Bytes of one chip's shards of the `ShapeDtypeStruct`s in `tree` (the largest shard where uneven)."""
    total = 0
    for leaf in (x for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct)):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


# ------------------------------------------------------------------------------ lowering
def _lower(config: MixtralConfig, runtime: RuntimeConfig, workload: Workload, kv_cache_dtype=None):
    """(lowered, weight bytes per chip, argument bytes per chip) for the function a workload runs."""
    mesh = runtime.mesh
    cache_dtype = jnp.dtype(kv_cache_dtype or runtime.dtype)
    lora = lora_lib.LoRAConfig(workload.lora_rank, 2.0 * workload.lora_rank, targets=lora_lib.ALL_TARGETS) \
        if workload.lora_rank else None
    graphdef, state = abstract_model(config, runtime, FSDP_RULES if workload.fsdp else DEFAULT_RULES, lora)
    b, n = workload.batch, workload.tokens
    key = _replicated(mesh, (2,), jnp.uint32)  # jax.random.key_data of a threefry key
    if workload.kind == "prefill":
        fn, static = sampler_lib.prefill, dict(strategy=sampler_lib.Greedy(), max_new=sampler_lib.bucket(1),
                                               cache_dtype=cache_dtype)
        args = (graphdef, state, None, _replicated(mesh, (b, n), jnp.int32), _replicated(mesh, (b, n), jnp.bool_), key,
                None)
    elif workload.kind == "decode":
        # half prompt, half new tokens: the decode loop's memory depends on their sum only
        fn, static = sampler_lib.decode, dict(strategy=sampler_lib.Greedy(), max_new=n - n // 2)
        args = (graphdef, state, None, _replicated(mesh, (b,), jnp.int32),
                abstract_cache(config, b, n, cache_dtype, mesh), key, _replicated(mesh, (1,), jnp.int32),
                _replicated(mesh, (1, 1), jnp.int32), None, None, _replicated(mesh, (), jnp.int32))
    else:
        fn, args, static = _train_step(config, graphdef, state, workload)
    return fn.lower(*args, **static), bytes_per_chip(state), bytes_per_chip(args)


def _train_step(config, graphdef, state, workload: Workload):
    mesh = jax.tree.leaves(state)[0].sharding.mesh
    lora = lora_lib.LoRAConfig(workload.lora_rank, 2.0 * workload.lora_rank, targets=lora_lib.ALL_TARGETS) \
        if workload.lora_rank else None
    tc = TrainConfig(batch_size=workload.batch, seq_len=workload.tokens, grad_accum=workload.accum,
                     warmup_steps=0, fsdp=workload.fsdp, remat=workload.remat, lora=lora)
    tc.check_model(config)
    flat = nnx.to_flat_state(state)
    values = {".".join(map(str, path)): var.get_value() for path, var in flat}
    trained = {".".join(map(str, path)) for path, var in flat if lora is None or isinstance(var, lora_lib.LoRAParam)}
    params = {k: v for k, v in values.items() if k in trained}
    frozen = {k: v for k, v in values.items() if k not in trained} or None  # LoRA's base: read, not trained
    templates = tuple((path, ".".join(map(str, path)), var) for path, var in flat)
    step = TrainStep(graphdef, templates, tc, config.router_aux_loss_coef)
    param_sh = {k: v.sharding for k, v in params.items()}

    # the optimizer state as `optimizer.init` makes it: moments take their parameter's sharding, counters
    # are replicated (what jit propagates, and what `Trainer` does)
    def opt_leaf(path, leaf):
        name = next((p.key for p in reversed(path) if isinstance(p, jax.tree_util.DictKey)), None)
        if name in params and params[name].shape == leaf.shape:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param_sh[name])
        return _replicated(mesh, leaf.shape, leaf.dtype)

    opt_state = jax.tree_util.tree_map_with_path(opt_leaf, jax.eval_shape(step.optimizer.init, params))
    micro = workload.batch // workload.accum
    batch = jax.ShapeDtypeStruct((workload.accum, micro, workload.tokens), jnp.int32, sharding=batch_sharding(mesh, tc))
    step = dataclasses.replace(step, param_shardings=tuple(param_sh.items()),
                               opt_shardings=jax.tree.map(lambda x: x.sharding, opt_state))
    return run_step, (step, params, opt_state, batch, frozen), {}


# ------------------------------------------------------------------------------ reading XLA
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP_RE = re.compile(r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY_RE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in a compiled HLO module (per chip, static: a loop
    body counts once). Bytes are each op's result; an async `-start` counts its output only."""
    found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP_RE.search(line)
        if not m:
            continue
        arrays = [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dt, 4)
                  for dt, dims in _ARRAY_RE.findall(m["shape"]) if dt in _DTYPE_BYTES]
        found[m["op"]]["count"] += 1
        found[m["op"]]["bytes"] += (max(arrays, default=0) if m["start"] else sum(arrays))
    return found


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0] if cost else {}
    if not cost:  # XLA:GPU's compiled-for-a-topology executable has none: count its optimized HLO here
        cost = hlo_cost(compiled)
    return cost or {}


def hlo_cost(compiled) -> dict:
    """XLA's HLO cost analysis (flops, bytes accessed) of a compiled program's optimized HLO module, run
    through this machine's CPU client; {} where the executable does not expose its modules."""
    try:
        modules = compiled.runtime_executable().hlo_modules()
    except Exception:  # noqa: BLE001 - not every executable exposes its HLO
        return {}
    cpu = xla_bridge.get_backend("cpu")
    out: dict = {}
    for module in modules:
        for key, value in _jax.hlo_module_cost_analysis(cpu, module).items():
            if key in ("flops", "bytes accessed", "transcendentals"):
                out[key] = out.get(key, 0.0) + float(value)
    return out


_GMM_RE = re.compile(r"=\s*(?P<dt>[a-z]+\d*)\[(?P<rows>\d+),(?P<n>\d+)\]\S*\s+custom-call\(.*"
                     r"operand_layout_constraints=\{s32\[(?P<blocks>\d+)\]\S*, [a-z]+\d*\[\d+,(?P<k>\d+)\]\S*, "
                     r"(?P<wdt>[a-z]+\d*)\[(?P<g>\d+),\d+,\d+\].*mixtral_gmm")


def gmm_cost(hlo_text: str) -> dict[str, float]:
    """The MoE's Pallas grouped matmuls (`mixtral_jax.kernels.grouped_matmul`, custom calls XLA's cost
    analysis cannot see into), from their shapes in the compiled HLO: "flops" as launched (every row block
    of the grid, including blocks left empty at run time: an upper bound), "active_flops" for the rows
    routed (the blocks beyond the `groups` padding blocks), "bytes" reading the rows, each expert's
    weights once and writing the result. A loop body counts once."""
    out = {"flops": 0.0, "active_flops": 0.0, "bytes": 0.0, "calls": 0}
    for line in hlo_text.splitlines():
        m = _GMM_RE.search(line)
        if not m:
            continue
        rows, n, k, blocks, groups = (int(m[x]) for x in ("rows", "n", "k", "blocks", "g"))
        bm = rows // blocks
        out["flops"] += 2.0 * rows * k * n
        out["active_flops"] += 2.0 * (blocks - groups) * bm * k * n
        out["bytes"] += rows * k * 2 + groups * k * n * _DTYPE_BYTES.get(m["wdt"], 2) + rows * n * \
            _DTYPE_BYTES.get(m["dt"], 2)
        out["calls"] += 1
    return out


_CUDNN_FMHA_RE = re.compile(r"custom_call_target=\"__cudnn\$fmha(?P<kind>\w+)\".*operand_layout_constraints="
                            r"\{[a-z]+\d*\[(?P<b>\d+),(?P<tq>\d+),(?P<h>\d+),(?P<d>\d+)\]")
_FMHA_SCORES_RE = re.compile(r'"intermediate_tensor_shape":\s*\{[^}]*?"dimensions":\s*\["(\d+)",\s*"(\d+)",\s*"(\d+)",'
                             r'\s*"(\d+)"\]')


def cudnn_attention_cost(hlo_text: str) -> dict[str, float]:
    """cuDNN's fused (flash) attention calls in a compiled XLA:GPU program, which XLA's cost analysis cannot
    see into: "flops" of the score and value matmuls for the (query, key) pairs the mask keeps (causal,
    sliding window), the backward pass as five such matmuls to the forward's two; "calls". A loop body
    counts once."""
    out = {"flops": 0.0, "calls": 0}
    for line in hlo_text.splitlines():
        m = _CUDNN_FMHA_RE.search(line)
        scores = _FMHA_SCORES_RE.search(line)
        if not m or not scores:
            continue
        b, h, tq, tk = (int(x) for x in scores.groups())
        window = re.search(r'"sliding_window_length":\s*(\d+)', line)
        pairs = _attended_pairs(tq, tk, "CAUSAL" in line, int(window[1]) if window and int(window[1]) else None)
        matmuls = 5 if "Backward" in m["kind"] else 2
        out["flops"] += matmuls * 2.0 * b * h * pairs * int(m["d"])
        out["calls"] += 1
    return out


def _attended_pairs(queries: int, keys: int, causal: bool, window: int | None) -> int:
    """(query, key) pairs a causal, optionally sliding-window mask keeps, the queries being the last ones."""
    if not causal:
        return queries * keys
    seen = np.arange(keys - queries + 1, keys + 1, dtype=np.int64)  # keys up to and including each query
    return int((np.minimum(seen, window) if window else seen).sum())


def attention_kernel(hlo_text: str) -> str:
    """The fused attention kernel a compiled program calls: "cudnn", "splash", or "" (XLA's own ops)."""
    if "__cudnn$fmha" in hlo_text:
        return "cudnn"
    if "splash" in hlo_text and "tpu_custom_call" in hlo_text:
        return "splash"
    return ""


# XLA:GPU compiling without a GPU cannot ask CUB for a sort's scratch size: sort with XLA's own kernels
GPU_COMPILER_OPTIONS = {"xla_gpu_deviceless_cub_mode": "DEVICELESS_CUB_DISABLED"}


_OOM_RE = re.compile(r"required for HLO temporaries \(([\d.]+)G\)")


def compile_workload(config: MixtralConfig, runtime: RuntimeConfig, workload: Workload,
                     topology: Topology | GpuTopology,
                     mesh_spec: str, kv_cache_dtype=None) -> Report:
    t0 = time.perf_counter()
    lowered, weights, arguments = _lower(config, runtime, workload, kv_cache_dtype)
    common = dict(workload=workload, topology=topology.name, mesh=mesh_spec, chips=topology.chips,
                  hbm_bytes=topology.chip.hbm_bytes, weight_bytes=weights, moe_strategy=runtime.moe_strategy,
                  quantize=runtime.quantize)
    options = GPU_COMPILER_OPTIONS if topology.backend == "gpu" else None
    try:
        compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses programs that need more than HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        m = _OOM_RE.search(str(e))
        return Report(**common, argument_bytes=arguments, temp_bytes=0, output_bytes=0, alias_bytes=0,
                      compile_s=time.perf_counter() - t0, collectives={}, flops=0.0, bytes_accessed=0.0,
                      est_step_s=0.0, est_bound="-", xla_error=str(e).strip().splitlines()[0],
                      required_bytes=int(float(m[1]) * GIB) if m else 0)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = _cost(compiled)
    hlo = compiled.as_text()
    gmm, fmha = gmm_cost(hlo), cudnn_attention_cost(hlo)  # custom calls: not in XLA's cost analysis
    flops = float(cost.get("flops", 0.0)) + gmm["flops"] + fmha["flops"]
    accessed = float(cost.get("bytes accessed", 0.0)) + gmm["bytes"]
    compute_s, memory_s = flops / topology.chip.peak_flops, accessed / topology.chip.hbm_bandwidth
    return Report(**common, argument_bytes=int(mem.argument_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                  output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
                  compile_s=seconds, collectives=collectives(hlo), flops=flops,
                  bytes_accessed=accessed, est_step_s=max(compute_s, memory_s),
                  est_bound="compute" if compute_s >= memory_s else "memory", moe_kernel_flops=gmm["flops"],
                  moe_active_flops=gmm["active_flops"], attention_kernel=attention_kernel(hlo),
                  attention_kernel_flops=fmha["flops"])


def plan_runtime(mesh: Mesh, dtype="bfloat16", backend: str = "tpu", quantize: str | None = None) -> RuntimeConfig:
    """bf16 weights and compute (int8 expert and attention weights with `quantize`), the MoE strategy
    `auto` picks on the target backend (not on this CPU)."""
    return RuntimeConfig(param_dtype=dtype, moe_strategy=resolve_strategy("auto", backend=backend),
                         mesh=mesh, quantize=quantize)


def plan(config: MixtralConfig, topology: str | Topology | GpuTopology, mesh: str, workloads: Sequence[Workload], *,
         dtype="bfloat16", quantize: str | None = None, kv_cache_dtype=None) -> list[Report]:
    """Compile each workload for `topology` (a Cloud name such as "v5e-8", or GPU hosts such as "h100-8") on
    `mesh`; one report each.
    `quantize='int8'`: int8 expert and attention weights (serving, and LoRA training: the base is frozen).
    `kv_cache_dtype` (e.g. "int8"): the sampler's KV cache, default `dtype`."""
    check_quantize(quantize)
    if quantize is not None and any(w.kind == "train" and not w.lora_rank for w in workloads):
        raise PlanError("--quantize plans prefill, decode and LoRA training (--lora) only: full training updates "
                        "float weights")
    topo = get_topology(topology) if isinstance(topology, str) else topology
    runtime = plan_runtime(slice_mesh(config, topo, mesh), dtype, backend=topo.backend, quantize=quantize)
    return [compile_workload(config, runtime, w, topo, mesh, kv_cache_dtype) for w in workloads]


__all__ = ["COLLECTIVES", "GIB", "GPU_COMPILER_OPTIONS", "PlanError",
           "Report", "TopologyError", "Workload", "collectives", "decode", "plan",
           "prefill", "train", "valid_meshes"]
