"""What a mesh means for Mixtral: per-device weight memory, MoE all_to_all traffic, and whether it fits.

    python -m bench.sharding_plan                          # the table for the standard hardware
    python -m bench.sharding_plan --model 8x22b            # Mixtral-8x22B on the slices that hold it
    python -m bench.sharding_plan --mesh expert=4,tensor=2 --devices 8 --hbm-gib 80

Everything is computed from the model's own parameter specs and the sharding rules (nothing allocated):
weight bytes per device follow `param_shardings`; traffic follows `sharding/expert_parallel.py` (one
bucket of `capacity_factor * tokens * k / n` rows to each of the n expert shards and back, plus the
`psum` over `tensor` of the results), for a prefill of `--tokens` tokens per data group.
"""

from __future__ import annotations

import argparse
import functools
import json
import math

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.moe import bucket_capacity
from mixtral_jax.params import param_specs
from mixtral_jax.sharding.mesh import parse_mesh_spec
from mixtral_jax.sharding.rules import DEFAULT_RULES

GIB = 1024**3

# (name, devices, HBM GiB per device, mesh), per model preset
HARDWARE_8X22B = [
    ("8x H100 80GB", 8, 80, "expert=8"),
    ("TPU v5e-16", 16, 16, "expert=8,tensor=2"),  # bf16 does not fit: int8 weights would (141 GB)
    ("TPU v5p-32 (16 chips)", 16, 95, "expert=8,tensor=2"),
    ("TPU v5p-64 (32 chips)", 32, 95, "data=2,expert=8,tensor=2"),
]
HARDWARE = [
    ("8x H100 80GB", 8, 80, "expert=8"),
    ("8x H100 80GB", 8, 80, "expert=4,tensor=2"),
    ("TPU v5e-8", 8, 16, "expert=8"),
    ("TPU v5e-8", 8, 16, "expert=4,tensor=2"),
    ("TPU v4-32 (16 chips)", 16, 32, "data=2,expert=8"),
    ("TPU v5p-128 (64 chips)", 64, 95, "data=8,expert=8"),
]


@functools.cache
def _specs(config: MixtralConfig, dtype: str):  # tracing 8x22B's 56 layers takes seconds: once per model
    return param_specs(config, RuntimeConfig(param_dtype=dtype))


def weight_bytes_per_device(config: MixtralConfig, sizes: dict[str, int], dtype="bfloat16") -> int:
    total = 0
    for spec in _specs(config, dtype).values():
        split = 1
        for dim, axis in zip(spec.shape, spec.logical_axes):
            mesh_axis = DEFAULT_RULES.get(axis) if axis else None
            if mesh_axis and dim % sizes[mesh_axis] == 0:
                split *= sizes[mesh_axis]
        total += math.prod(spec.shape) * spec.dtype.itemsize // split
    return total


def moe_traffic_per_device(config: MixtralConfig, sizes: dict[str, int], tokens: int, dtype_bytes=2,
                           capacity_factor=2.0) -> int:
    """Bytes one device sends per MoE layer for `tokens` tokens in its data group (there and back)."""
    n, t = sizes["expert"], sizes["tensor"]
    local_tokens = max(1, tokens // n)
    capacity = bucket_capacity(local_tokens * config.top_k, 1, n, capacity_factor)
    bucket = capacity * config.dim * dtype_bytes
    all_to_all = 2 * (n - 1) * bucket                      # to the other expert shards, and back
    psum = 2 * (t - 1) / t * n * bucket if t > 1 else 0    # ring all-reduce of the results over tensor
    return int(all_to_all + psum)


def plan(config: MixtralConfig, name: str, devices: int, hbm_gib: float, mesh: str, tokens: int,
         context: int, batch: int) -> dict:
    sizes = parse_mesh_spec(mesh, devices)
    weights = weight_bytes_per_device(config, sizes)
    kv_per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2  # bf16 k and v
    kv_split = sizes["tensor"] if config.n_kv_heads % sizes["tensor"] == 0 else 1
    kv = kv_per_token * batch * context // (sizes["data"] * sizes["expert"] * kv_split)
    free = hbm_gib * GIB - weights - kv
    return dict(hardware=name, mesh=mesh, weights_gib=weights / GIB, kv_gib=kv / GIB,
                moe_send_mib_per_layer=moe_traffic_per_device(config, sizes, tokens) / 2**20,
                free_gib=free / GIB, fits=free > 0.1 * hbm_gib * GIB)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="8x7b", help="preset: 8x7b or 8x22b")
    p.add_argument("--mesh")
    p.add_argument("--devices", type=int)
    p.add_argument("--hbm-gib", type=float)
    p.add_argument("--tokens", type=int, default=4096, help="prefill tokens per data group and step")
    p.add_argument("--context", type=int, default=8192, help="KV cache length per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences in the KV cache (whole mesh)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    config = MixtralConfig.from_preset(args.model)
    hardware = HARDWARE_8X22B if config.preset_name() == "8x22b" else HARDWARE
    rows_in = [("custom", args.devices, args.hbm_gib, args.mesh)] if args.mesh else hardware
    rows = [plan(config, *r, args.tokens, args.context, args.batch) for r in rows_in]
    title = f"Mixtral-{config.preset_name()[:-1]}B"
    print(f"{title} bf16, {args.tokens} prefill tokens per data group, KV for {args.batch} x {args.context}")
    w = max(20, max(len(r["mesh"]) for r in rows) + 2)
    print(f"{'hardware':<24}{'mesh':<{w}}{'weights/dev':>12}{'KV/dev':>9}{'MoE send/layer':>16}"
          f"{'free/dev':>10}  fits")
    for r in rows:
        print(f"{r['hardware']:<24}{r['mesh']:<{w}}{r['weights_gib']:>9.1f}GiB{r['kv_gib']:>6.1f}GiB"
              f"{r['moe_send_mib_per_layer']:>13.1f}MiB{r['free_gib']:>7.1f}GiB  {'yes' if r['fits'] else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
