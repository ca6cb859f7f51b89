"""What Mixtral (bf16) needs on TPU slices, from XLA's TPU compiler (`mixtral_jax.planning.planner`), not arithmetic.

    python -m bench.sharding_plan                       # the docs/planning.md table (compiles the full model: slow)
    python -m bench.sharding_plan --json bench/results/sharding_plan.json --only v5e-8
    python -m bench.sharding_plan --model 8x22b --no-prefill   # Mixtral-8x22B on v5p-32 and v5p-64

Every TPU row compiles the sampler's prefill / decode or the trainer's step ahead of time for the slice on
this machine (jax[tpu] installed, no TPU) and reads per-chip memory from XLA's memory analysis. The 8x
H100 rows are arithmetic (weights and KV cache per GPU from the rules; activations not counted), because
no GPU compiler is installed here; they are labelled so.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.model.params import param_specs
from mixtral_jax.planning.topologies import GIB, H100
from mixtral_jax.sharding.mesh import parse_mesh_spec
from mixtral_jax.sharding.rules import DEFAULT_RULES

DECODE = [(8, 8192), (64, 8192), (8, 32768), (64, 32768)]
# (slice, mesh, extra workloads)
TPU_ROWS = [
    ("v5e-8", "expert=4,tensor=2", ()),
    ("v4-32", "expert=8,tensor=2", ()),
    ("v5p-128", "data=8,expert=8", (("train", 64, 4096, True),)),
]
# Mixtral-8x22B (281 GB in bf16): the v5p slices that hold it (int8 on v5e-16 waits for int8 weights)
TPU_ROWS_8X22B = [
    ("v5p-32", "expert=8,tensor=2", ()),
    ("v5p-64", "data=2,expert=8,tensor=2", ()),
]
H100_MESH = {"8x7b": "expert=4,tensor=2", "8x22b": "expert=8"}
PREFILL = 32768


def h100_arithmetic(config: MixtralConfig, mesh: str, batch: int, context: int) -> dict:
    """Weights + KV cache per GPU for decode on 8x H100 by the rules (no compiler here: arithmetic)."""
    sizes = parse_mesh_spec(mesh, 8)
    weights = 0
    for spec in param_specs(config, RuntimeConfig(param_dtype="bfloat16")).values():
        split = 1
        for axis in spec.logical_axes:
            rule = DEFAULT_RULES.get(axis) if axis else None
            split *= math.prod(sizes[a] for a in ((rule,) if isinstance(rule, str) else rule or ()))
        weights += math.prod(spec.shape) * spec.dtype.itemsize // split
    groups = sizes["data"] * sizes["expert"]
    seqs = batch // groups if batch % groups == 0 else batch // sizes["data"] if batch % sizes["data"] == 0 else batch
    kv = 2 * config.n_layers * 2 * seqs * (config.n_kv_heads // sizes["tensor"]) * context * config.head_dim
    return dict(workload=f"decode {batch}x{context}", weights=weights, kv=kv, total=weights + kv,
                fits=weights + kv <= H100.hbm_bytes)


def main(argv=None) -> int:
    from mixtral_jax.cli.plan import format_reports, suggestion
    from mixtral_jax.planning import planner as plan_lib
    from mixtral_jax.planning.topologies import get_topology

    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--model", default="8x7b", choices=sorted(H100_MESH), help="preset (default: 8x7b)")
    p.add_argument("--decode", nargs="*", help="decode workloads BATCHxCONTEXT (default: 8x8192 64x8192 "
                                               "8x32768 64x32768)")
    p.add_argument("--only", nargs="*", help="slices to compile (default: all)")
    p.add_argument("--no-prefill", action="store_true", help=f"leave out the {PREFILL}-token prefill (slow compile)")
    p.add_argument("--json", help="write the reports here")
    args = p.parse_args(argv)
    config = MixtralConfig.from_preset(args.model)
    decode = [tuple(int(n) for n in d.split("x")) for d in args.decode] if args.decode else DECODE
    rows, start = [], time.perf_counter()
    for name, mesh, extra in TPU_ROWS_8X22B if args.model == "8x22b" else TPU_ROWS:
        if args.only and name not in args.only:
            continue
        jobs = [plan_lib.decode(b, c) for b, c in decode] + [plan_lib.train(b, s, fsdp=f) for _, b, s, f in extra]
        if not args.no_prefill:
            jobs.append(plan_lib.prefill(1, PREFILL))
        topology = get_topology(name)
        reports = []
        for job in jobs:  # one at a time, printed as they finish
            reports += plan_lib.plan(config, topology, mesh, [job])
            r = reports[-1]
            print(f"{name:<8} {mesh:<20} {job.label:<26} total {r.total_bytes / GIB:6.2f} GiB of "
                  f"{r.hbm_bytes / GIB:.2f}  {'fits' if r.fits else 'does NOT fit: ' + suggestion(r)}  "
                  f"({r.compile_s:.0f}s)", flush=True)
            rows.append(r.to_dict())
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
        print(format_reports(config, topology, reports), flush=True)
    h100_mesh = H100_MESH[args.model]
    print(f"\n8x NVIDIA H100 80GB, {h100_mesh} -- ARITHMETIC (weights + KV cache only, no compiler):")
    for b, c in decode:
        h = h100_arithmetic(config, h100_mesh, b, c)
        print(f"  {h['workload']:<20} weights {h['weights'] / GIB:5.2f} GiB + KV {h['kv'] / GIB:5.2f} GiB = "
              f"{h['total'] / GIB:5.2f} GiB of {H100.hbm_bytes / GIB:.1f}  {'fits' if h['fits'] else 'does NOT fit'}")
    print(f"[{time.perf_counter() - start:.0f}s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
