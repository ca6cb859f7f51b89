"""`mixtral-jax plan`: will this model and workload fit this TPU slice (or these GPU hosts) on this mesh? XLA's
own answer.

    mixtral-jax plan --topology v5e-8 --mesh expert=4,tensor=2 --decode-batch 8 --context 8192
    mixtral-jax plan --topology v5p-128 --mesh data=8,expert=8 --train-seq 4096 --train-batch 64 --fsdp --json
    mixtral-jax plan --topology h100-8 --mesh expert=8 --decode-batch 64 --context 32768
    mixtral-jax plan --topology v5e-8 --mesh expert=4,tensor=2 --serve --max-batch 32 --max-context 4096

Compiles the sampler's prefill and decode and the trainer's step ahead of time for the slice (see
`mixtral_jax.planning.planner`); needs `jax[tpu]` installed for TPU slices and the `gpu-plan` extra for GPU hosts
(no TPU or GPU). Prints per-chip memory against HBM, whether it fits, compile time, the collectives, and an
estimated step time; `--json` prints the reports as JSON. `--serve` compiles the serving engine's paged step
instead and says how many KV pages, tokens and sequences of `--max-context` the slice holds
(`mixtral_jax.planning.serve_plan`).
"""

from __future__ import annotations

import json
import os

import jax

from mixtral_jax.cli.model_flags import NAMED_CONFIGS, model_config
from mixtral_jax.config import KV_CACHE_DTYPES, QUANTIZE_MODES, MixtralConfig
from mixtral_jax.planning import planner as plan
from mixtral_jax.planning import serve_plan
from mixtral_jax.planning.topologies import GIB, GPU_TOPOLOGIES, TOPOLOGIES, cudnn_available, get_topology
from mixtral_jax.sharding.distributed import on_cloud_tpu_vm
from mixtral_jax.sharding.mesh import parse_mesh_spec


def workloads(args) -> list:
    out = []
    if args.prefill:
        out.append(plan.prefill(args.prefill_batch, args.prefill))
    if args.decode_batch or args.context:
        out.append(plan.decode(args.decode_batch or 1, args.context or 8192))
    if args.train_seq or args.train_batch:
        out.append(plan.train(args.train_batch or 8, args.train_seq or 4096, args.train_accum, args.fsdp,
                              args.remat, args.lora))
    return out or [plan.prefill(1, 4096), plan.decode(8, 8192)]


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_reports(config: MixtralConfig, topology, reports, quantize: str | None = None) -> str:
    chip = topology.chip
    unit = "GPU" if topology.backend == "gpu" else "chip"
    lines = [f"{_params(config.param_count())}-parameter Mixtral{f' ({quantize} weights)' if quantize else ''} on "
             f"{topology.name}: {topology.chips} x "
             f"{chip.name} ({chip.hbm_bytes / GIB:.2f} GiB HBM each), {topology.hosts} host(s), mesh "
             f"{reports[0].mesh if reports else '-'}",
             "",
             f"{f'per {unit} (GiB)':<28}{'weights':>8}{'args':>8}{'temps':>8}{'outputs':>8}{'total':>8}"
             f"{'HBM':>8}  fits  compile"]
    for r in reports:
        temps, outs = ("-", "-") if r.xla_error else (_gib(r.temp_bytes), _gib(r.output_bytes - r.alias_bytes))
        lines.append(f"{r.workload.label:<28}{_gib(r.weight_bytes):>8}{_gib(r.argument_bytes):>8}{temps:>8}"
                     f"{outs:>8}{_gib(r.total_bytes):>8}{_gib(r.hbm_bytes):>8}  {'yes ' if r.fits else 'NO  '}"
                     f"{r.compile_s:>6.0f}s")
    compiled = [r for r in reports if not r.xla_error]
    if compiled:
        lines += ["", f"collectives per {unit} in the compiled program (count, result bytes; a loop body counts once):"]
        for r in compiled:
            parts = [f"{op} {c['count']} ({_size(c['bytes'])})" for op, c in r.collectives.items() if c["count"]]
            lines.append(f"  {r.workload.label:<26}{', '.join(parts) or 'none'}")
        lines += ["", "estimated step time (an ESTIMATE from XLA's cost analysis: max(FLOPs / peak, bytes / HBM "
                      "bandwidth); not a measurement):"]
        for r in compiled:
            lines.append(f"  {r.workload.label:<26}{r.est_step_s * 1e3:9.1f} ms  ({r.est_bound}-bound: "
                         f"{r.flops / 1e12:.2f} TFLOP, {r.bytes_accessed / GIB:.1f} GiB per {unit})")
        kernels = [r for r in compiled if r.moe_active_flops]
        if kernels:
            # top-k experts' three matmuls per token and layer: what a sparse MoE must compute
            active = config.n_layers * config.top_k * 3 * 2 * config.dim * config.hidden_dim
            lines += ["", f"MoE grouped-matmul kernels ({kernels[0].moe_strategy}; FLOPs as launched, an upper "
                          f"bound, against the routed rows'; top-{config.top_k} is {active / 1e9:.3g} GFLOP per "
                          f"token, all {config.n_experts} experts {config.n_experts / config.top_k:.0f}x that):"]
            for r in kernels:
                lines.append(f"  {r.workload.label:<26}{r.moe_kernel_flops / r.moe_active_flops:9.2f}x  "
                             f"({r.moe_kernel_flops / 1e12:.2f} TFLOP per {unit})")
        lines += attention_lines(topology, compiled)
    misfits = [r for r in reports if not r.fits]
    if misfits:
        lines.append("")
        for r in misfits:
            why = f"XLA: {r.xla_error}" if r.xla_error else f"{_gib(r.total_bytes - r.hbm_bytes)} GiB over"
            lines.append(f"{r.workload.label}: does NOT fit ({why}); {suggestion(r)}")
    if topology.backend == "gpu":
        lines += ["", f"GPU HBM is the whole {chip.hbm_bytes / GIB:.2f} GiB the driver reports: run with "
                      "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (JAX's allocator takes 75% by default). MoE strategy: "
                      f"{reports[0].moe_strategy if reports else '-'}."]
    return "\n".join(lines)


def attention_lines(topology, compiled) -> list[str]:
    """Which attention each workload compiled to: a fused kernel (with its FLOPs, counted from its shapes), or
    XLA's own ops, and why no fused kernel was taken."""
    unit = "GPU" if topology.backend == "gpu" else "chip"
    lines = ["", "attention:"]
    for r in compiled:
        if r.attention_kernel == "cudnn":
            what = f"cuDNN fused flash attention ({r.attention_kernel_flops / 1e12:.2f} TFLOP per {unit})"
        elif r.attention_kernel:
            what = f"{r.attention_kernel} kernel"
        elif r.workload.kind != "train":  # the sampler's chunks attend over the cache they write into
            what = "XLA over the KV cache (cuDNN's and splash's causal masks align queries with keys from the " \
                   "first: they serve the full forward pass and training)"
        elif topology.backend == "gpu" and not cudnn_available():
            what = "XLA: cuDNN is not installed here (pip install nvidia-cudnn-cu12, in the gpu-plan extra)"
        else:
            what = "XLA"
        lines.append(f"  {r.workload.label:<26}{what}")
    return lines


def suggestion(report) -> str:
    """What would fit, by linear scaling of the non-weight memory with the (micro-)batch: a hint, not a compile."""
    w = report.workload
    variable = report.total_bytes - report.weight_bytes
    room = report.hbm_bytes - report.weight_bytes
    if room <= 0:
        quantized = w.kind == "train" or getattr(report, "quantize", None)
        int8 = "" if quantized else "--quantize int8 (int8 expert and attention weights), or "
        return f"the weights alone exceed HBM: {int8}use more chips on the expert/tensor axes" + \
            (" (or FSDP for training)" if w.kind == "train" else "")
    if w.kind == "train":
        # a micro-batch must still split over the batch's mesh axes (data x expert), or chips sit idle
        sizes = parse_mesh_spec(report.mesh, report.chips)
        groups = sizes.get("data", 1) * sizes.get("expert", 1)
        fitting = [a for a in range(w.accum + 1, w.batch + 1)
                   if w.batch % a == 0 and (w.batch // a) % groups == 0 and variable * w.accum / a < room]
        remat = "" if w.remat else "--remat (recompute each layer in the backward pass), "
        if fitting:
            return f"{remat}or --train-accum {fitting[0]} (micro-batch {w.batch // fitting[0]}, still one or " \
                   f"more sequences per data x expert group; linear scaling, a hint)"
        return f"{remat}more chips on data, or shorter sequences"
    if w.batch > 1 and variable > 0 and int(w.batch * room / variable) >= 1:
        return f"batch {int(w.batch * room / variable)} or less would (scaling the non-weight memory linearly), " \
               "or more chips on data"
    return "more chips (a larger slice on data/expert/tensor), or shorter sequences"


def _use_cpu_here() -> None:
    """Compile on this machine for the slice: keep jax's default backend on CPU unless this is a TPU VM
    (libtpu would otherwise look for a local TPU and log its failure)."""
    if not os.environ.get("JAX_PLATFORMS") and not on_cloud_tpu_vm():
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")


def run_plan(args) -> int:
    _use_cpu_here()
    topology = get_topology(args.topology)  # a bad name fails before anything loads
    config = model_config(args.model)
    if args.serve:
        return run_serve_plan(args, config, topology)
    if stray := [f"--{a.replace('_', '-')}" for a in _SERVE_ONLY if getattr(args, a)]:
        raise plan.PlanError(f"{', '.join(stray)} plan the serving step: add --serve")
    jobs = workloads(args)
    reports = plan.plan(config, topology, args.mesh, jobs, dtype=args.dtype, quantize=args.quantize,
                        kv_cache_dtype=args.kv_cache_dtype)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    else:
        print(format_reports(config, topology, reports, args.quantize))
    return 0


_SERVE_ONLY = ("max_batch", "max_context", "pages")
_NOT_WITH_SERVE = ("prefill", "decode_batch", "context", "train_seq", "train_batch", "lora")


def run_serve_plan(args, config: MixtralConfig, topology) -> int:
    if clash := [f"--{a.replace('_', '-')}" for a in _NOT_WITH_SERVE if getattr(args, a, None)]:
        raise plan.PlanError(f"--serve plans the serving step: drop {', '.join(clash)}")
    report = serve_plan.plan_serve(
        config, topology, args.mesh, max_batch=args.max_batch or 16,
        max_context=args.max_context or min(config.max_seq_len, 4096), prefill_chunk=args.prefill_chunk,
        page_size=args.page_size, kv_cache_dtype=args.kv_cache_dtype, quantize=args.quantize, dtype=args.dtype,
        pages=args.pages)
    print(json.dumps(report.to_dict(), indent=1) if args.json else serve_plan.format_serve(config, report))
    return 0


def register(subparsers):
    p = subparsers.add_parser(
        "plan", allow_abbrev=False,
        help="compile for a TPU slice or GPU hosts ahead of time: per-chip memory, fit, collectives, step estimate",
        description="Compile the sampler's prefill/decode and the training step for a TPU slice (jax[tpu] installed, "
                    "no TPU needed) or NVIDIA GPU hosts (the gpu-plan extra, no GPU needed) on this machine and "
                    "report XLA's per-chip memory, collectives and an estimated step time. Without workload flags: "
                    "prefill 1x4096 and decode 8x8192.")
    p.add_argument("--topology", required=True, help=f"Cloud TPU slice: {', '.join(TOPOLOGIES)}; or GPU hosts "
                                                     f"(8 GPUs a host): {', '.join(GPU_TOPOLOGIES)}")
    p.add_argument("--mesh", required=True, help="mesh over the slice's chips, e.g. expert=4,tensor=2")
    p.add_argument("--model", default="8x7b", help=f"{', '.join(NAMED_CONFIGS)}, a checkpoint, or a config JSON "
                                                  "(default: 8x7b)")
    p.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype (default: bfloat16)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help="int8 expert and attention weights (serving plans)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="the sampler's KV cache (default: --dtype; int8 halves bf16's bytes)")
    p.add_argument("--prefill", type=int, help="prefill prompts of this many tokens")
    p.add_argument("--prefill-batch", type=int, default=1, help="prompts per prefill (default: 1)")
    p.add_argument("--decode-batch", type=int, help="sequences decoded together")
    p.add_argument("--context", type=int, help="KV cache slots per sequence for decode (default: 8192)")
    p.add_argument("--train-seq", type=int, help="training sequence length")
    p.add_argument("--train-batch", type=int, help="global training batch (sequences per step)")
    p.add_argument("--train-accum", type=int, default=1, help="gradient-accumulation micro-batches per step")
    p.add_argument("--fsdp", action="store_true", help="train with FSDP (weights also split over data)")
    p.add_argument("--remat", action="store_true", help="train recomputing each layer in the backward pass")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="plan a LoRA step: adapters of this rank on attention + experts, the base frozen "
                        "(with --quantize int8: an int8 base)")
    s = p.add_argument_group("serving (--serve)")
    s.add_argument("--serve", action="store_true",
                   help="plan the serving engine's paged step: memory, fit, and the pages, tokens and sequences of "
                        "--max-context the slice holds")
    s.add_argument("--max-batch", type=int, help="sequences running at once (default: 16, as serve)")
    s.add_argument("--max-context", type=int, help="prompt + completion tokens a request (default: the model's, "
                                                   "at most 4096)")
    s.add_argument("--prefill-chunk", type=int, default=256, help="a step's token budget a sequence shard "
                                                                  "(default: 256, as serve)")
    s.add_argument("--page-size", type=int, default=16, help="tokens a KV page (default: 16)")
    s.add_argument("--pages", type=int, help="KV pages in all (default: as many as HBM holds)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.set_defaults(run=run_plan)
