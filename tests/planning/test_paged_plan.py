"""Paged attention compiled ahead of time for TPU slices (libtpu from jax[tpu], no TPU): JAX's ragged paged
attention kernel under `shard_map` on v5e and v5p meshes, its per-chip pages as the layout splits them,
and int8 pages dequantised one step's pages at a time (XLA's temporaries measured against a count by
hand)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mixtral_jax.model import paged_attention as paged
from mixtral_jax.planning.topologies import get_topology
from mixtral_jax.sharding.mesh import make_mesh

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytestmark = pytest.mark.tpu

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128           # Mixtral's attention
TOKENS, SEQS, PAGE, PAGES_PER_SEQ = 128, 8, 32, 16


def _compile(topology: str, mesh_spec: str, kv_dtype, implementation: str, seqs=SEQS, pages_per_seq=PAGES_PER_SEQ):
    mesh = make_mesh(mesh_spec, devices=get_topology(topology).devices())
    shards = mesh.shape["data"] * mesh.shape["expert"]
    seq = ("data", "expert")

    def sds(shape, dtype, *spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))

    pages_shape = (shards * seqs * pages_per_seq, PAGE, 2 * KV_HEADS, HEAD_DIM)
    args = (sds((shards, TOKENS, HEADS, HEAD_DIM), jnp.bfloat16, seq, None, "tensor", None),
            sds(pages_shape, kv_dtype, seq, None, "tensor", None),
            sds(pages_shape[:3], jnp.float32, seq, None, "tensor") if kv_dtype == jnp.int8 else None,
            sds((shards, seqs), jnp.int32, seq, None), sds((shards, seqs, pages_per_seq), jnp.int32, seq, None, None),
            sds((shards, seqs + 1), jnp.int32, seq, None), sds((shards,), jnp.int32, seq))

    def step(q, pages, scales, kv_lens, page_indices, cu, num_seqs):
        return paged.ragged_paged_attention(q, pages, kv_lens, page_indices, cu, num_seqs, sm_scale=HEAD_DIM ** -0.5,
                                            kv_scales=scales, mesh=mesh, implementation=implementation)

    return mesh, jax.jit(step).lower(*args).compile()


@pytest.mark.parametrize("topology,mesh_spec", [("v5e-4", "expert=2,tensor=2"), ("v5p-8", "data=2,tensor=2")])
def test_tpu_kernel_compiles_for_the_slice(topology, mesh_spec):
    """`auto` on a TPU mesh is JAX's kernel (a Mosaic custom call in the compiled program); each chip holds
    its sequence shard's pages and its half of the KV heads; block sizes fit VMEM (a too-large block is a
    compile error, which this would raise)."""
    mesh, compiled = _compile(topology, mesh_spec, jnp.bfloat16, "auto")
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo and "ragged_paged_attention_kernel" in hlo
    shards = mesh.shape["data"] * mesh.shape["expert"]
    pages_per_chip = SEQS * PAGES_PER_SEQ * PAGE * 2 * (KV_HEADS // mesh.shape["tensor"]) * HEAD_DIM * 2
    q_per_chip = TOKENS * HEADS // mesh.shape["tensor"] * HEAD_DIM * 2
    args = compiled.memory_analysis().argument_size_in_bytes
    assert shards > 1 and pages_per_chip + q_per_chip <= args <= pages_per_chip + q_per_chip + 64 * 1024


def test_int8_pages_through_the_kernel_cost_one_layers_live_pages():
    """int8 pages: half the bytes per chip; the kernel path dequantises the pages this step's sequences
    hold (bf16, one layer's: 32 sequences of 2048 tokens here, past VMEM) as an HBM temporary; the xla path
    reads the pages in place."""
    seqs, per_seq = 32, 64
    run = lambda dtype, impl: _compile("v5e-4", "expert=2,tensor=2", dtype, impl, seqs, per_seq)[1]  # noqa: E731
    mem = {name: run(dtype, impl).memory_analysis() for name, dtype, impl in
           (("bf16", jnp.bfloat16, "pallas_tpu"), ("int8", jnp.int8, "pallas_tpu"), ("xla", jnp.int8, "xla"))}
    pages_bf16 = seqs * per_seq * PAGE * 2 * (KV_HEADS // 2) * HEAD_DIM * 2
    scales = seqs * per_seq * PAGE * 2 * (KV_HEADS // 2) * 4
    saved = mem["bf16"].argument_size_in_bytes - mem["int8"].argument_size_in_bytes
    assert abs(saved - (pages_bf16 / 2 - scales)) < 1 << 20, saved
    assert pages_bf16 <= mem["int8"].temp_size_in_bytes <= 2.5 * pages_bf16, mem["int8"].temp_size_in_bytes
    assert mem["xla"].temp_size_in_bytes < pages_bf16 / 4, mem["xla"].temp_size_in_bytes
