"""The GPU paged attention kernel (`paged_attention_gpu`, Pallas' Triton backend) through the Pallas
interpreter on CPU, against `implementation="xla"` and `attend_plain` on test_paged_attention's ragged
batches: decode-only steps, prefill chunks mixed with decodes (empty sequences, padding, garbage past
num_seqs), a sliding window, page sizes 4, 6, 8, 16, float32, bf16 and int8 pages, query groups of 2 and 3
(padded to 4), query blocks that split a chunk and key blocks that split pages; a simulated mesh; `auto`'s
choice. The `gpu` group compiles the kernel for an H100 ahead of time (skipped without the gpu-plan extra).

Tolerances. float32: 2e-5 absolute against both (the outputs are O(1); the kernel sums the same products in
another order, ~1e-6 apart; a wrong mask or page moves outputs by ~0.1). bf16: the output is bf16, so the
check is one bf16 step (2^-8 of the larger magnitude) against `xla` with the same key blocks (so the running
max, and with it each bf16 rounding of the probabilities, is the same), and 3e-2 against float32 attend_plain.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import mixtral_jax.model.paged_attention as paged
from mixtral_jax.model import paged_attention_gpu as gpu
from mixtral_jax.planning.topologies import get_topology, gpu_plugin_available
from mixtral_jax.sharding.mesh import make_mesh
from tests.model.test_paged_attention import BATCHES, Step, _attend

needs_plugin = pytest.mark.skipif(not gpu_plugin_available(), reason=(
    "needs the gpu-plan extra (the CUDA PJRT plugin compiles for GPU hosts without a GPU)"))
DECODES = [[(1, 9), (1, 1), (1, 30), (1, 16)], [(1, 17), (1, 5)], []]
BF16_STEP = 2.0 ** -8
BLOCK_KEYS = gpu.BLOCK_KEYS  # the module's own, for the compile


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    """The kernel through the Pallas interpreter; one key block of 16 (so sequences span several) and the
    xla path's key blocks the same size (the bf16 comparison needs the same blocks)."""
    monkeypatch.setattr(gpu, "INTERPRET", True)
    monkeypatch.setattr(gpu, "BLOCK_KEYS", 16)
    monkeypatch.setattr(paged, "KV_BLOCK_KEYS", 16)


def _bf16_step_apart(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    step = np.maximum(np.abs(got), np.abs(want)) * BF16_STEP + 1e-6
    return np.abs(got - want) <= step


CASES = {  # name: (batches, page_size, pages_per_seq, window, dtype, int8, n_heads, n_kv)
    "decode": (DECODES, 4, 8, None, jnp.float32, False, 4, 2),
    "mixed": (BATCHES, 8, 4, None, jnp.float32, False, 4, 2),
    "mixed-window-page16": (BATCHES, 16, 2, 6, jnp.float32, False, 4, 2),
    "mixed-window-page6-group3": (BATCHES, 6, 6, 5, jnp.float32, False, 6, 2),
    "mixed-window-bf16": (BATCHES, 4, 8, 6, jnp.bfloat16, False, 4, 2),
    "decode-bf16-group3": (DECODES, 8, 4, None, jnp.bfloat16, False, 6, 2),
    "mixed-window-int8": (BATCHES, 8, 4, 6, jnp.float32, True, 4, 2),
    "decode-int8-bf16": (DECODES, 4, 8, 6, jnp.bfloat16, True, 4, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_xla_and_plain(case):
    batches, page_size, pages_per_seq, window, dtype, int8, n_heads, n_kv = CASES[case]
    step = Step(batches, page_size=page_size, pages_per_seq=pages_per_seq, n_heads=n_heads, n_kv=n_kv,
                int8=int8, seed=3)
    pages, scales = step.written()
    if not int8:
        pages = pages.astype(dtype)
    step.q = step.q.astype(dtype)
    got = _attend(step, pages, scales, window, implementation="pallas_gpu")
    want = _attend(step, pages, scales, window, implementation="xla")
    assert got.dtype == dtype and got.shape == step.q.shape
    plain = step.expected(window, int8)
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(got), plain, atol=2e-5, rtol=0)
    else:
        close = _bf16_step_apart(got, want)
        assert close.all(), f"{(~close).sum()} of {close.size} more than a bf16 step from xla"
        np.testing.assert_allclose(np.asarray(got, np.float32), plain, atol=3e-2, rtol=0)
    got = np.asarray(got, np.float32)
    for sh in range(len(batches)):
        assert not got[sh, step.cu[sh, step.num_seqs[sh]]:].any(), "padding rows must be zeros"
        assert np.abs(got[sh, :step.cu[sh, step.num_seqs[sh]]]).sum(-1).all(), "every real row is attended"


def test_query_blocks_cover_a_ragged_batch():
    """`_blocks`: each real token in exactly one block of its own sequence, within t // bq + b blocks; empty
    blocks read no keys; key blocks start at the window's first key and end at the block's last query."""
    kv_lens = jnp.array([9, 7, 21, 50, 3], jnp.int32)
    cu = jnp.array([0, 1, 8, 13, 13, 99], jnp.int32)       # sequence 3 has no tokens; entry 5 past num_seqs
    t, bq, window = 16, 4, 6
    meta = np.asarray(gpu._blocks(kv_lens, cu, jnp.int32(4), t, bq, window))
    seq, q0, q1, ctx, kv_len, lo, hi = meta.T
    owner = np.full(t, -1)
    for i in np.flatnonzero(q1 > q0):
        assert (owner[q0[i]:q1[i]] == -1).all() and q1[i] - q0[i] <= bq
        owner[q0[i]:q1[i]] = seq[i]
        assert cu[seq[i]] <= q0[i] and q1[i] <= cu[seq[i] + 1] and ctx[i] + q1[i] <= kv_len[i]
        assert lo[i] == max(ctx[i] + q0[i] - window + 1, 0) // gpu.BLOCK_KEYS
        assert hi[i] == -(-(ctx[i] + q1[i]) // gpu.BLOCK_KEYS)
    np.testing.assert_array_equal(owner, [0] + [1] * 7 + [2] * 5 + [-1] * 3)
    assert len(meta) == t // bq + 5 and (hi[q1 <= q0] == 0).all() and (lo[q1 <= q0] == 0).all()


def test_mesh_equals_xla():
    """data=2,expert=2,tensor=2 on simulated CPU devices: four sequence shards, KV heads over tensor, under
    jit with the rules' shardings: the kernel equals the xla path."""
    mesh = make_mesh("data=2,expert=2,tensor=2", jax.devices()[:8])
    step = Step(BATCHES, page_size=4, pages_per_seq=8, seed=1)
    pages, _ = step.written()
    seq, heads = ("data", "expert"), "tensor"
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))  # noqa: E731
    q, kv_lens, page_indices, cu, num_seqs = step.args()
    args = (put(q, seq, None, heads, None), put(pages, seq, None, heads, None), put(kv_lens, seq),
            put(page_indices, seq), put(cu, seq), put(num_seqs, seq))

    def run(impl):
        fn = jax.jit(lambda *a: paged.ragged_paged_attention(*a, sm_scale=16 ** -0.5, sliding_window=6, mesh=mesh,
                                                             implementation=impl))
        return fn(*args)

    got = run("pallas_gpu")
    np.testing.assert_allclose(np.asarray(got), np.asarray(run("xla")), atol=2e-5, rtol=0)
    assert got.sharding.spec[0] == seq and got.sharding.spec[2] == heads


def test_auto_picks_the_kernel_on_gpu_where_it_fits(monkeypatch):
    q = jax.ShapeDtypeStruct((1, 64, 32, 128), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((64, 16, 16, 128), jnp.bfloat16)
    assert paged.resolve("auto", q, pages) == "xla"                                     # CPU
    monkeypatch.setattr(paged, "_platform", lambda mesh: "gpu")
    assert paged.resolve("auto", q, pages) == "pallas_gpu"
    assert paged.resolve("auto", q, jax.ShapeDtypeStruct(pages.shape, jnp.int8)) == "pallas_gpu"
    odd = jax.ShapeDtypeStruct((1, 64, 32, 80), jnp.bfloat16)
    assert paged.resolve("auto", odd, jax.ShapeDtypeStruct((64, 16, 16, 80), jnp.bfloat16)) == "xla"
    assert paged.resolve("xla", q, pages) == "xla"
    assert gpu.fits(32, 8, 128, jnp.bfloat16, jnp.bfloat16) and gpu.fits(6, 2, 16, jnp.float32, jnp.int8)
    assert not gpu.fits(32, 8, 8, jnp.bfloat16, jnp.bfloat16)                            # matmul side < 16
    assert not gpu.fits(32, 8, 96, jnp.bfloat16, jnp.bfloat16)                           # not a power of two
    with pytest.raises(ValueError, match="does not take"):
        gpu.attend(jnp.zeros((4, 2, 8)), jnp.zeros((4, 4, 2, 8)), None, jnp.zeros(1, jnp.int32),
                   jnp.zeros((1, 1), jnp.int32), jnp.zeros(2, jnp.int32), jnp.int32(1), sm_scale=1.0, window=None)


@pytest.mark.gpu
@needs_plugin
@pytest.mark.parametrize("int8", [False, True])
def test_kernel_compiles_for_h100(monkeypatch, int8):
    """Mixtral's heads (32 of 128, 8 KV heads) over 2048 pages of 16 tokens, a step of 256 tokens of up to 64
    sequences, lowered and compiled for one H100 by the CUDA plugin (no GPU): `auto` picks the kernel, the
    program holds the Triton call, and XLA's temporaries stay far below the cache (no dense copy of it)."""
    monkeypatch.setattr(gpu, "INTERPRET", False)
    monkeypatch.setattr(gpu, "BLOCK_KEYS", BLOCK_KEYS)
    mesh = make_mesh("data=1", get_topology("h100-1").devices())
    put = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))  # noqa: E731
    q = put((1, 256, 32, 128), jnp.bfloat16)
    pages = put((2048, 16, 16, 128), jnp.int8 if int8 else jnp.bfloat16)
    scales = put((2048, 16, 16), jnp.float32) if int8 else None
    rows = (put((1, 64), jnp.int32), put((1, 64, 128), jnp.int32), put((1, 65), jnp.int32), put((1,), jnp.int32))
    assert paged.resolve("auto", q, pages, mesh) == "pallas_gpu"

    def step(q, pages, scales, kv_lens, page_indices, cu, num_seqs):
        return paged.ragged_paged_attention(q, pages, kv_lens, page_indices, cu, num_seqs, sm_scale=128 ** -0.5,
                                            sliding_window=4096, kv_scales=scales, mesh=mesh)

    lowered = jax.jit(step).lower(q, pages, scales, *rows)
    assert "__gpu$xla.gpu.triton" in lowered.as_text()
    compiled = lowered.compile()
    cache_bytes = 2048 * 16 * 16 * 128 * (1 if int8 else 2)
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes // 16
