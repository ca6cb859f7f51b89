"""Long context: every attention implementation against the plain one, chunked prefill against transformers,
the int8 KV cache, and memory that grows linearly with the prompt (XLA's own memory analysis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
import mixtral_jax.inference.sampler as sampler_module
import mixtral_jax.model.attention as attention_module
from mixtral_jax import MixtralConfig
from mixtral_jax.config import ConfigError, RuntimeConfig
from mixtral_jax.inference.sampler import Sampler
from mixtral_jax.model.attention import (
    Span,
    attend_blockwise,
    attend_cudnn,
    attend_plain,
    attend_splash,
    attention,
    resolve,
    tile_sizes,
)
from mixtral_jax.model.kv_cache import KVCache, quantize_kv
from mixtral_jax.model.mixtral import Mixtral
from tests.helpers.hf_reference import hf_logits, hf_model, save_hf


def _inputs(b, t, s, h, nk, x, seed=0, pad=(0, 37)):
    """Random q (b, t, h, x) and a cache-layout k, v (b, nk, s, x); the queries are the last t of s slots,
    rows left-padded by `pad`."""
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, x))
    k, v = (jax.random.normal(kk, (b, nk, s, x)) for kk in ks[1:])
    valid = np.ones((b, s), bool)
    for row, p in enumerate(pad[:b]):
        valid[row, :p] = False
    pos = np.maximum(np.cumsum(valid, -1) - 1, 0).astype(np.int32)
    span = Span(jnp.asarray(pos[:, s - t:]), jnp.asarray(pos), jnp.asarray(valid))
    return q, k, v, span, valid[:, s - t:]


def _close(a, b, rows, atol=1e-5):
    """Compare only real query rows (padding rows are never read)."""
    np.testing.assert_allclose(np.asarray(a)[rows], np.asarray(b)[rows], atol=atol, rtol=0)


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("t,s", [(700, 700), (1, 640), (130, 640), (300, 300)])
def test_blockwise_equals_plain(window, t, s):
    """Tiles of 128 queries x 64 keys: lengths that cross tile edges, padding, a window, grouped heads,
    queries that are the end of a longer cache (a chunk of a prefill, a decode step)."""
    q, k, v, span, rows = _inputs(2, t, s, 6, 2, 16)
    ref = attend_plain(q, k, v, span, window)
    _close(attend_blockwise(q, k, v, span, window, q_block=128, kv_block=64), ref, rows)


def test_blockwise_skips_unwritten_slots_and_matches_gradients():
    """Keys past the written part of a cache are invalid: same output as a cache cut to its written part;
    and the gradient through the lax loops equals plain attention's (training uses it)."""
    q, k, v, span, rows = _inputs(2, 64, 256, 4, 2, 16)
    written = np.asarray(span.kv_valid).copy()
    written[:, 200:] = False
    cut = Span(span.q_pos, span.kv_pos, jnp.asarray(written))
    _close(attend_blockwise(q, k, v, cut, kv_block=32), attend_plain(q[:, :], k, v, cut), rows)

    q2, k2, v2, span2, rows2 = _inputs(2, 96, 96, 4, 2, 16)
    weight = jnp.asarray(rows2, jnp.float32)[:, :, None, None]
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, span2, 40) * weight)  # noqa: E731
    blockwise = lambda q, k, v, span, w: attend_blockwise(q, k, v, span, w, q_block=32, kv_block=32)  # noqa: E731
    for got, want in zip(jax.grad(loss(blockwise), argnums=(0, 1, 2))(q2, k2, v2),
                         jax.grad(loss(attend_plain), argnums=(0, 1, 2))(q2, k2, v2)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("window", [None, 100])
def test_splash_kernel_equals_plain(window):
    """The Pallas TPU kernel, run by the Pallas interpreter on CPU: same numbers, with padding as its own
    segment and the window as a local mask."""
    q, k, v, span, rows = _inputs(2, 256, 256, 4, 2, 128)
    _close(attend_splash(q, k, v, span, window, interpret=True), attend_plain(q, k, v, span, window), rows)


@pytest.mark.parametrize("window", [None, 50])
def test_cudnn_layout_equals_plain(window):
    """What the GPU path hands cuDNN (rows rotated so padding is on the right, lengths, causal, window),
    run by jax's XLA implementation of the same call on CPU."""
    q, k, v, span, rows = _inputs(3, 200, 200, 6, 2, 16, pad=(0, 37, 120))
    _close(attend_cudnn(q, k, v, span, window, implementation="xla"), attend_plain(q, k, v, span, window), rows)


def test_int8_cache_scales_fold_into_the_scores():
    """An int8 cache (per token and head scales) attends like plain attention on its dequantised values,
    plain and blockwise alike, without a dequantised copy."""
    q, k, v, span, rows = _inputs(2, 48, 320, 4, 2, 16)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    assert kq.dtype == jnp.int8 and ks.shape == k.shape[:3]
    deq = lambda a, s: a.astype(jnp.float32) * s[..., None]  # noqa: E731
    assert float(jnp.max(jnp.abs(deq(kq, ks) - k) / ks[..., None])) <= 0.5 + 1e-4  # half a step at most
    ref = attend_plain(q, deq(kq, ks), deq(vq, vs), span, 30)
    _close(attend_plain(q, kq, vq, span, 30, ks, vs), ref, rows)
    _close(attend_blockwise(q, kq, vq, span, 30, ks, vs, kv_block=64), ref, rows)


def test_auto_picks_by_platform_and_size():
    assert resolve("auto", (1, 1, 4, 16), (1, 2, 1024, 16), jnp.float32, False) == "plain"  # decode
    assert resolve("auto", (1, 64, 4, 16), (1, 2, 64, 16), jnp.float32, True) == "blockwise"
    assert resolve("auto", (1, 8192, 4, 16), (1, 2, 8192, 16), jnp.float32, True) == "blockwise"
    assert resolve("auto", (1, 1, 4, 16), (1, 2, 65536, 16), jnp.float32, False) == "blockwise"
    assert resolve("splash", (1, 256, 4, 128), (1, 2, 256, 128), jnp.bfloat16, True) == "splash"
    assert resolve("splash", (1, 1, 4, 128), (1, 2, 256, 128), jnp.bfloat16, False) == "plain"  # a cache
    assert resolve("splash", (1, 100, 4, 128), (1, 2, 100, 128), jnp.bfloat16, True) == "blockwise"  # odd length
    assert resolve("cudnn", (1, 256, 4, 128), (1, 2, 256, 128), jnp.float32, True) == "blockwise"  # no fp32
    assert tile_sizes(6, "cpu") == (128, 1024) and tile_sizes(32, "cpu") == (16, 1024)
    assert tile_sizes(32, "tpu") == (512, 512)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention(*_inputs(1, 4, 4, 2, 1, 8)[:4], impl="flash")
    with pytest.raises(ConfigError, match="unknown attention 'flash'; choose from auto, plain"):
        RuntimeConfig(attention="flash")


# --------------------------------------------------------------------------------- model level
LONG = MixtralConfig.tiny(max_seq_len=4096, sliding_window=None)


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    hf = hf_model(LONG, seed=11)
    return hf, mixtral_jax.load_hf(save_hf(hf, tmp_path_factory.mktemp("hf")), show_progress=False)


def test_greedy_equals_transformers_after_a_long_chunked_prompt(long_pair, monkeypatch):
    """A 2600-token prompt, prefilled in 256-token chunks (blockwise attention inside the loop), then greedy
    decoding: each new token is transformers' argmax (eager attention, full forward over the prompt and
    the tokens before it). (transformers' own `generate` drifts from its forward pass here: at step 5 it
    emits a token its forward pass ranks below another by 0.24.)"""
    monkeypatch.setattr(sampler_module, "PREFILL_CHUNK", 256)
    monkeypatch.setattr(attention_module, "PLAIN_MAX_KEYS", 512)  # force blockwise over the long cache
    hf, model = long_pair
    prompt = np.random.default_rng(2).integers(0, LONG.vocab_size, 2600).tolist()
    out = Sampler(model, cache_dtype="float32")([prompt], max_new_tokens=12)[0]
    ref = hf_logits(hf, np.asarray([prompt + out]))[0, len(prompt) - 1:-1]
    assert out == ref.argmax(-1).tolist()


@pytest.mark.slow
def test_chunked_prefill_then_decode_equals_the_full_forward(long_pair, monkeypatch):
    """Left-padded rows, 64-token chunks with the first all-padding chunks skipped, then cached decode
    steps: every step's logits equal the full forward pass's (blockwise in the forward too)."""
    monkeypatch.setattr(attention_module, "Q_BLOCK", 64)
    monkeypatch.setattr(attention_module, "KV_BLOCK", 64)
    _, model = long_pair
    rng = np.random.default_rng(3)
    width, steps = 512, 5
    lengths = [300, 41]
    tokens = np.zeros((2, width + steps), np.int32)
    valid = np.zeros((2, width + steps), bool)
    for row, n in enumerate(lengths):
        tokens[row, width - n:] = rng.integers(0, LONG.vocab_size, n + steps)
        valid[row, width - n:] = True
    graphdef, state = nnx.split(model)
    blockwise = nnx.merge(graphdef, state)
    for layer in blockwise.layers:
        layer.attn.impl = "blockwise"
    full = np.asarray(blockwise(tokens, attention_mask=valid))
    np.testing.assert_allclose(full[valid], np.asarray(model(tokens, attention_mask=valid))[valid], atol=1e-5)

    first, cache, _, _ = sampler_module.prefill(
        graphdef, state, None, jnp.asarray(tokens[:, :width]), jnp.asarray(valid[:, :width]),
        jax.random.key_data(jax.random.key(0)), None, strategy=sampler_module.Greedy(), max_new=16,
        cache_dtype=jnp.dtype(jnp.float32), chunk=64)
    assert int(cache.length) == width and cache.size == width + 16
    np.testing.assert_array_equal(np.asarray(first), full[:, width - 1].argmax(-1))
    for step in range(steps):
        col = width + step
        logits, cache = model.extend(cache, jnp.asarray(tokens[:, col:col + 1]))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, col], atol=1e-4, err_msg=f"step {step}")


@pytest.mark.slow
def test_int8_kv_cache_keeps_the_answers(long_pair):
    """Greedy text with an int8 cache: logits within a small KL of the fp32 cache's, nearly every token the
    same (the cache holds int8 values and float32 scales)."""
    _, model = long_pair
    prompts = [np.random.default_rng(r).integers(0, LONG.vocab_size, n).tolist() for r, n in ((4, 300), (5, 77))]
    cache = KVCache.empty(LONG, 2, 64, "int8")
    assert cache.k[0].dtype == jnp.int8 and cache.k_scale[0].shape == (2, LONG.n_kv_heads, 64)
    tokens = np.zeros((2, 384), np.int32)
    valid = np.zeros((2, 384), bool)
    for row, p in enumerate(prompts):
        tokens[row, 384 - len(p):], valid[row, 384 - len(p):] = p, True
    logits = {}
    for dtype in ("float32", "int8"):
        cache = KVCache.empty(LONG, 2, 384, dtype)
        logits[dtype], _ = model.extend(cache, jnp.asarray(tokens), jnp.asarray(valid))
    p = jax.nn.log_softmax(logits["float32"][valid], -1)
    q = jax.nn.log_softmax(logits["int8"][valid], -1)
    kl = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))
    agree = float(jnp.mean(p.argmax(-1) == q.argmax(-1)))
    assert kl < 1e-3 and agree >= 0.95, (kl, agree)
    out8 = Sampler(model, cache_dtype="int8")(prompts, max_new_tokens=8)
    out32 = Sampler(model, cache_dtype="float32")(prompts, max_new_tokens=8)
    assert sum(a == b for x, y in zip(out8, out32) for a, b in zip(x, y)) >= 14


@pytest.mark.slow
def test_long_prefill_memory_grows_linearly():
    """XLA's memory analysis of the compiled programs: the sampler's chunked prefill needs the same
    temporaries at 4096 and 16384 tokens (one chunk's worth), and the full forward pass's temporaries at
    most double when the sequence doubles (a score matrix would quadruple them)."""
    config = MixtralConfig.tiny(max_seq_len=32768, sliding_window=None)
    model = Mixtral(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    key = jax.random.key_data(jax.random.key(0))
    prefill = {}
    for n in (4096, 16384):
        tokens = jax.ShapeDtypeStruct((1, n), jnp.int32)
        valid = jax.ShapeDtypeStruct((1, n), jnp.bool_)
        lowered = sampler_module.prefill.lower(graphdef, state, None, tokens, valid, key, None,
                                               strategy=sampler_module.Greedy(), max_new=16,
                                               cache_dtype=jnp.dtype(jnp.float32))
        prefill[n] = lowered.compile().memory_analysis().temp_size_in_bytes
    assert prefill[16384] <= 1.1 * prefill[4096], prefill

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[:, -1]

    forward_temps = {n: jax.jit(forward).lower(state, jax.ShapeDtypeStruct((1, n), jnp.int32)).compile()
                     .memory_analysis().temp_size_in_bytes for n in (4096, 8192)}
    assert forward_temps[8192] <= 2.2 * forward_temps[4096], forward_temps
