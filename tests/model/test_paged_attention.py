"""Paged attention against `attention.attend_plain` on the same keys and values laid out densely: ragged
batches that mix prefill chunks and decode tokens, several sequence shards, padding, a sliding window,
int8 pages; on a simulated 8-device mesh equal to without; JAX's TPU kernel through the Pallas
interpreter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import mixtral_jax.model.paged_attention as paged
from mixtral_jax.model.attention import Span, attend_plain
from mixtral_jax.model.kv_cache import quantize_kv
from mixtral_jax.sharding.mesh import make_mesh

# per shard: (q_len, kv_len) of each sequence this step; a decode token, a first prefill chunk, a later
# chunk, a sequence with no tokens this step; shards may hold fewer sequences than B
BATCHES = [
    [(1, 9), (7, 7), (5, 21)],
    [(1, 1), (0, 12), (6, 30), (1, 17)],
    [(3, 3)],
    [],
]


class Step:
    """One step's inputs built from per-sequence dense q, k, v: pages assigned at random from each
    shard's pool, every key written through `write_pages` (in two calls: the cache, then this step)."""

    def __init__(self, batches, *, page_size, pages_per_seq, n_heads=4, n_kv=2, head_dim=16, tokens=16,
                 pages_per_shard=32, int8=False, seed=0):
        rng = np.random.default_rng(seed)
        s, b = len(batches), max(1, max(len(x) for x in batches))
        self.batches, self.page_size, self.n_kv = batches, page_size, n_kv
        self.q = np.zeros((s, tokens, n_heads, head_dim), np.float32)
        self.kv_lens = rng.integers(0, 50, (s, b)).astype(np.int32)           # garbage past num_seqs
        self.page_indices = rng.integers(0, pages_per_shard, (s, b, pages_per_seq)).astype(np.int32)
        self.cu = np.zeros((s, b + 1), np.int32)
        self.num_seqs = np.array([len(x) for x in batches], np.int32)
        self.dense = {}
        old = [np.full((s, 64), -1, np.int32), np.zeros((s, 64, n_kv, head_dim), np.float32)]
        new = [np.full((s, tokens), -1, np.int32), np.zeros((s, tokens, n_kv, head_dim), np.float32)]
        old_v, new_v = np.zeros_like(old[1]), np.zeros_like(new[1])
        for sh, seqs in enumerate(batches):
            free = rng.permutation(pages_per_shard)
            n_old = n_new = 0
            for i, (q_len, kv_len) in enumerate(seqs):
                ids = free[i * pages_per_seq:(i + 1) * pages_per_seq]
                self.page_indices[sh, i] = ids
                self.kv_lens[sh, i] = kv_len
                self.cu[sh, i + 1] = self.cu[sh, i] + q_len
                q = rng.standard_normal((q_len, n_heads, head_dim)).astype(np.float32)
                k, v = (rng.standard_normal((kv_len, n_kv, head_dim)).astype(np.float32) for _ in range(2))
                self.q[sh, self.cu[sh, i]:self.cu[sh, i + 1]] = q
                self.dense[sh, i] = (q, k, v)
                slots = ids[np.arange(kv_len) // page_size] * page_size + np.arange(kv_len) % page_size
                cached = kv_len - q_len
                old[0][sh, n_old:n_old + cached], new[0][sh, n_new:n_new + q_len] = slots[:cached], slots[cached:]
                old[1][sh, n_old:n_old + cached], new[1][sh, n_new:n_new + q_len] = k[:cached], k[cached:]
                old_v[sh, n_old:n_old + cached], new_v[sh, n_new:n_new + q_len] = v[:cached], v[cached:]
                n_old, n_new = n_old + cached, n_new + q_len
            self.cu[sh, len(seqs) + 1:] = rng.integers(0, 99, b - len(seqs))  # garbage past num_seqs
        shape = (s * pages_per_shard, page_size, 2 * n_kv, head_dim)
        self.pages = jnp.zeros(shape, jnp.int8 if int8 else jnp.float32)
        self.scales = jnp.zeros(shape[:3], jnp.float32) if int8 else None
        self.writes = [(old[1], old_v, old[0]), (new[1], new_v, new[0])]

    def written(self, mesh=None):
        pages, scales = self.pages, self.scales
        for k, v, slots in self.writes:
            pages, scales = paged.write_pages(pages, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots), scales,
                                              mesh=mesh)
        return pages, scales

    def args(self):
        return tuple(jnp.asarray(a) for a in (self.q, self.kv_lens, self.page_indices, self.cu, self.num_seqs))

    def expected(self, window, int8):
        """attend_plain per sequence over its dense keys (quantised as the int8 KV cache quantises)."""
        out = np.zeros_like(self.q)
        for (sh, i), (q, k, v) in self.dense.items():
            q_len, kv_len = q.shape[0], k.shape[0]
            if not q_len:
                continue
            kd, vd = (jnp.asarray(a).transpose(1, 0, 2)[None] for a in (k, v))      # (1, k, s, x)
            scales = (None, None)
            if int8:
                (kd, ks), (vd, vs) = quantize_kv(kd), quantize_kv(vd)
                scales = (ks, vs)
            pos = jnp.arange(kv_len, dtype=jnp.int32)[None]
            span = Span(pos[:, kv_len - q_len:], pos, jnp.ones((1, kv_len), bool))
            got = attend_plain(jnp.asarray(q)[None], kd, vd, span, window, *scales)
            out[sh, self.cu[sh, i]:self.cu[sh, i + 1]] = np.asarray(got[0])
        return out


def _attend(step, pages, scales, window, **kw):
    q, *rest = step.args()
    return paged.ragged_paged_attention(q, pages, *rest, sm_scale=q.shape[-1] ** -0.5, sliding_window=window,
                                        kv_scales=scales, **kw)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("page_size,pages_per_seq,block_keys,q_tile", [(4, 8, 1, 4), (8, 4, 1 << 20, 16),
                                                                       (16, 2, 1 << 20, 3)])
def test_ragged_batch_equals_plain(monkeypatch, int8, window, page_size, pages_per_seq, block_keys, q_tile):
    """Mixed prefill chunks and decode tokens over four sequence shards (one empty), zero rows for padding;
    one page per loop step and all pages in one; query tiles that split sequences and hold several."""
    monkeypatch.setattr(paged, "KV_BLOCK_KEYS", block_keys)
    monkeypatch.setattr(paged, "Q_TILE", q_tile)
    step = Step(BATCHES, page_size=page_size, pages_per_seq=pages_per_seq, int8=int8)
    pages, scales = step.written()
    got = np.asarray(_attend(step, pages, scales, window, implementation="xla"))
    want = step.expected(window, int8)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    for sh in range(len(BATCHES)):
        assert not got[sh, step.cu[sh, step.num_seqs[sh]]:].any(), "padding rows must be zeros"


def test_write_pages_writes_only_its_slots():
    """Each token lands at page * page_size + offset of its own shard's pages, K at 2h and V at 2h + 1;
    slot -1 writes nothing; int8 pages hold quantize_kv's values and scales."""
    k = jnp.arange(2 * 3 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 4) + 1
    v = -k
    slots = jnp.array([[5, -1, 0], [2, 7, -1]], jnp.int32)
    pages, _ = paged.write_pages(jnp.zeros((8, 4, 4, 4)), k, v, slots)                  # 2 shards x 4 pages
    flat = np.asarray(pages).reshape(2, 16, 4, 4)
    for sh, tok, slot in [(0, 0, 5), (0, 2, 0), (1, 0, 2), (1, 1, 7)]:
        np.testing.assert_array_equal(flat[sh, slot, 0::2], k[sh, tok])
        np.testing.assert_array_equal(flat[sh, slot, 1::2], v[sh, tok])
    assert np.count_nonzero(np.abs(flat).sum((-1, -2))) == 4
    q8, s8 = paged.write_pages(jnp.zeros((8, 4, 4, 4), jnp.int8), k, v, slots, jnp.zeros((8, 4, 4)))
    kq, ks = quantize_kv(k)
    np.testing.assert_array_equal(np.asarray(q8).reshape(2, 16, 4, 4)[1, 7, 0::2], kq[1, 1])
    np.testing.assert_array_equal(np.asarray(s8).reshape(2, 16, 4)[1, 7, 0::2], ks[1, 1])


@pytest.mark.parametrize("int8", [False, True])
def test_mesh_equals_no_mesh(int8):
    """On data=2,expert=2,tensor=2 (simulated CPU devices): four sequence shards, one per data x expert
    group, KV heads over tensor; written and attended under jit with the rules' shardings, equal to the
    same call without a mesh."""
    mesh = make_mesh("data=2,expert=2,tensor=2", jax.devices()[:8])
    step = Step(BATCHES, page_size=4, pages_per_seq=8, int8=int8, seed=1)
    pages, scales = step.written()
    want = np.asarray(_attend(step, pages, scales, 6, implementation="xla"))

    seq, heads = ("data", "expert"), "tensor"
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))  # noqa: E731
    q, kv_lens, page_indices, cu, num_seqs = step.args()
    m_pages = put(step.pages, seq, None, heads, None)
    m_scales = None if scales is None else put(step.scales, seq, None, heads)

    @jax.jit
    def run(pages, scales, writes, q, kv_lens, page_indices, cu, num_seqs):
        for k, v, slots in writes:
            pages, scales = paged.write_pages(pages, k, v, slots, scales, mesh=mesh)
        out = paged.ragged_paged_attention(q, pages, kv_lens, page_indices, cu, num_seqs, sm_scale=16 ** -0.5,
                                           sliding_window=6, kv_scales=scales, mesh=mesh, implementation="xla")
        return out, pages

    writes = [tuple(put(jnp.asarray(a), seq) for a in w) for w in step.writes]
    got, got_pages = run(m_pages, m_scales, writes, put(q, seq, None, heads, None), put(kv_lens, seq),
                         put(page_indices, seq), put(cu, seq), put(num_seqs, seq))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got_pages), np.asarray(pages))
    assert got_pages.sharding.spec == PartitionSpec(seq, None, heads, None)
    assert got.sharding.spec[0] == seq and got.sharding.spec[2] == heads


@pytest.mark.parametrize("int8", [False, True])
def test_tpu_path_equals_plain_through_jax_reference(monkeypatch, int8):
    """The `pallas_tpu` path (our layout, the page table, int8 pages dequantised onto a renumbered copy,
    padding rows) with JAX's own reference of its TPU kernel (`ref_ragged_paged_attention`, the kernel's
    semantics) in the kernel's place: attend_plain's numbers. Neither Pallas interpreter in jax 0.10.2
    runs the kernel itself (its strided KV loads); `tests/planning` compiles it for TPU."""
    rpa = paged.tpu_rpa

    def reference(q, pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, num_kv_pages_per_block,
                  num_queries_per_block, **kw):
        assert 0 < num_kv_pages_per_block <= page_indices.shape[1] and 0 < num_queries_per_block <= q.shape[0]
        out = rpa.ref_ragged_paged_attention(q, pages, kv_lens, page_indices, cu_q_lens, num_seqs, **kw)
        return jnp.pad(out, ((0, q.shape[0] - out.shape[0]), (0, 0), (0, 0)))

    monkeypatch.setattr(rpa, "ragged_paged_attention", reference)
    batches = [[(1, 9), (7, 7), (5, 21)], [(6, 30), (1, 17)]]
    step = Step(batches, page_size=8, pages_per_seq=4, head_dim=128, int8=int8, seed=2)
    pages, scales = step.written()
    got = np.asarray(_attend(step, pages, scales, 6, implementation="pallas_tpu"))
    np.testing.assert_allclose(got, step.expected(6, int8), atol=3e-5, rtol=0)
    for sh in range(len(batches)):
        assert not got[sh, step.cu[sh, step.num_seqs[sh]]:].any()


def test_tpu_block_sizes_follow_jax_table():
    """Block sizes come from JAX's tuned table for the device the program is for (v5e/v5p/v6e planned on a
    CPU host), capped by the pages a sequence has and the tokens of a step."""
    q = jax.ShapeDtypeStruct((256, 32, 128), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((1024, 16, 16, 128), jnp.bfloat16)
    table = paged.tpu_rpa.tuned_block_sizes.TUNED_BLOCK_SIZES
    assert paged.tpu_block_sizes("TPU v4", q, pages, 256) == (32, 32)
    assert paged.tpu_block_sizes("cpu", q, pages, 8) == (8, 32)
    key = next(k for k in table["TPU v6"] if k[:2] == ("bfloat16", "bfloat16"))
    q6 = jax.ShapeDtypeStruct((key[6], key[2], key[4]), jnp.bfloat16)
    p6 = jax.ShapeDtypeStruct((64, key[5], 2 * key[3], key[4]), jnp.bfloat16)
    want = table["TPU v6"][key]
    got = paged.tpu_block_sizes("TPU v6 lite", q6, p6, key[7] // key[5])
    assert got == (min(want[0], key[7] // key[5]), min(want[1], key[6]))


def test_bad_inputs():
    step = Step(BATCHES[:1], page_size=4, pages_per_seq=8)
    with pytest.raises(ValueError, match="implementation"):
        _attend(step, step.pages, None, None, implementation="flash")
    with pytest.raises(ValueError, match="int8 pages need kv_scales"):
        _attend(step, step.pages.astype(jnp.int8), None, None)


def test_auto_picks_the_kernel_where_it_tiles():
    """`auto` takes the TPU kernel for Mixtral's heads (also split over tensor=2), and xla off TPU."""
    q = jax.ShapeDtypeStruct((1, 64, 32, 128), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((64, 16, 16, 128), jnp.bfloat16)
    assert paged.resolve("auto", q, pages) == "xla"  # on CPU
    assert paged.tpu_fits(16, 8, 128, jnp.bfloat16, jnp.bfloat16)
    assert paged.tpu_fits(32, 16, 128, jnp.bfloat16, jnp.bfloat16)
    assert not paged.tpu_fits(16, 8, 64, jnp.bfloat16, jnp.bfloat16)
