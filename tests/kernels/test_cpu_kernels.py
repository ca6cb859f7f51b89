"""The XLA FFI CPU kernels (mixtral_jax/kernels/cpu_matvec.cc): exact against XLA's own ops and numpy for
every weight dtype, shape tails and row count they take; differentiable; the model decodes through them;
and a machine without a compiler falls back to XLA with one line of warning."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.inference.sampler import Sampler
from mixtral_jax.kernels import cpu as cpu_kernels
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.moe import moe_dense, moe_kernel, route, run_experts, without_padding
from mixtral_jax.model.quant import QArray, dequantize, quantize

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs a C++ compiler for the CPU kernels")


def _weight(kind, d, f, rng):
    w = rng.standard_normal((d, f)).astype(np.float32)
    if kind == "int8":
        q, s = quantize(w, (0,))
        return QArray(jnp.asarray(q), jnp.asarray(s)), dequantize(q, s, (0,))
    if kind == "bfloat16":
        wb = jnp.asarray(w, jnp.bfloat16)
        return wb, np.asarray(wb.astype(jnp.float32))
    return jnp.asarray(w), w


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("m,d,f", [(1, 512, 1792), (1, 1792, 512), (3, 100, 37), (16, 64, 200), (5, 7, 16),
                                   (2, 520, 33), (1, 37, 50), (1, 16, 16)])
def test_matvec_equals_numpy(kind, m, d, f):
    rng = np.random.default_rng(m * 1000 + d + f)
    w, dense = _weight(kind, d, f, rng)
    x = rng.standard_normal((m, d)).astype(np.float32)
    y = np.asarray(jax.jit(cpu_kernels.matvec)(jnp.asarray(x), w))
    ref = x.astype(np.float64) @ dense.astype(np.float64)
    assert np.max(np.abs(y - ref)) <= 2e-6 * np.max(np.abs(ref)) + 1e-6


def test_matvecs_of_mixed_weights_equal_numpy_with_xlas_gradient():
    """Several weights (each dtype, different widths) against one x in one call, and its derivative."""
    rng = np.random.default_rng(11)
    ws, dense = zip(*(_weight(kind, 40, f, rng) for kind, f in (("float32", 24), ("int8", 8), ("bfloat16", 33))))
    x = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
    ys = jax.jit(cpu_kernels.matvecs)(x, list(ws))
    for y, w in zip(ys, dense):
        ref = np.asarray(x, np.float64) @ w.astype(np.float64)
        assert y.shape == ref.shape and np.max(np.abs(np.asarray(y) - ref)) <= 2e-6 * np.max(np.abs(ref)) + 1e-6
    w0 = ws[0]

    def loss(x, w0, kernel):
        ys = cpu_kernels.matvecs(x, [w0, ws[1]]) if kernel else [x @ w0, x @ jnp.asarray(dense[1])]
        return jnp.sum(jnp.sin(ys[0])) + jnp.sum(ys[1] ** 2)

    got, want = (jax.grad(loss, argnums=(0, 1))(x, w0, k) for k in (True, False))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs w"):
        cpu_kernels.matvecs(x, [w0, jnp.ones((39, 4))])


def test_the_attention_projects_q_k_v_in_one_call():
    """A decode step's q, k and v come from one kernel call; o and the LM head from one each."""
    cfg = MixtralConfig(vocab_size=96, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=40,
                        n_experts=4, top_k=2, max_seq_len=64)
    model = Mixtral(cfg, RuntimeConfig(), rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    text = step.lower(state, jnp.ones((1, 1), jnp.int32)).as_text()
    assert text.count("custom_call @mixtral_matvec(") == 2 * cfg.n_layers + 1
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 48)), jnp.float32)
    layer = model.layers[0].attn
    ones = jnp.ones((1, 1, 12))
    q, k, v = layer.project_qkv(x, ones, jnp.zeros((1, 1, 12)))
    np.testing.assert_allclose(np.asarray(v[:, :, 0]), np.asarray(jnp.einsum("btd,dkx->btkx", x, layer.wv[...]))[:, 0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec,x_shape,w_shape", [("btd,dhx->bthx", (2, 1, 48), (48, 4, 8)),
                                                 ("bthx,hxd->btd", (1, 3, 4, 8), (4, 8, 48)),
                                                 ("btd,dv->btv", (4, 1, 48), (48, 301))])
def test_einsum_takes_the_models_shapes_and_leaves_others(spec, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    y = cpu_kernels.einsum(spec, x, w)
    assert y is not None and y.shape == jnp.einsum(spec, x, w).shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.einsum(spec, x, w)), rtol=1e-5, atol=1e-5)
    assert cpu_kernels.einsum("dt,dv->tv", x.reshape(x.shape[-1], -1), w.reshape(w_shape[0], -1)) is None
    many = jnp.zeros((cpu_kernels.MAX_ROWS + 1, *x_shape[1:]), jnp.float32)  # a prefill: XLA's dot
    assert cpu_kernels.einsum(spec, many, w) is None


@pytest.mark.parametrize("spec", ["bd,dd->bd", "bdd,ddv->bv", "btd,dvb->btvb", "...d,dv->...v", "td,dv", "td,vd->tv"])
def test_einsum_refuses_specs_it_would_get_wrong(spec):
    x, w = jnp.ones((2, 4, 4)), jnp.ones((4, 4, 4))
    assert cpu_kernels.einsum(spec, x, w) is None


def test_matvec_refuses_scales_of_the_wrong_shape():
    q = QArray(jnp.ones((8, 5), jnp.int8), jnp.ones((4,), jnp.float32))
    with pytest.raises(ValueError, match="scales"):
        cpu_kernels.matvec(jnp.ones((1, 8)), q)


def test_int8_gradients_reach_the_scales():
    """A quantized weight's scales are parameters: the kernel's tangent includes theirs, as XLA's does."""
    rng = np.random.default_rng(9)
    q, s = quantize(rng.standard_normal((16, 12)).astype(np.float32), (0,))
    x = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)

    def loss(scale, kernel):
        w = QArray(jnp.asarray(q), scale)
        y = cpu_kernels.matvec(x, w) if kernel else (x @ w.q.astype(jnp.float32)) * w.scale
        return jnp.sum(jnp.sin(y))

    got, want = (jax.grad(loss)(jnp.asarray(s), k) for k in (True, False))
    assert np.abs(np.asarray(want)).max() > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_float16_weights_decode_through_xla():
    """The kernels read float32, bfloat16 and int8; a float16 model decodes through XLA's ops instead."""
    cfg = MixtralConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=24,
                        n_experts=4, top_k=2, max_seq_len=32)
    model = Mixtral(cfg, RuntimeConfig(param_dtype=jnp.float16), rngs=nnx.Rngs(0))
    out = Sampler(model)([[3, 4, 5]], 4, stop_tokens=[])[0]
    assert len(out) == 4


def _experts(e, d, f, kind, rng):
    def one(shape, contract):
        w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if kind == "int8":
            q, s = quantize(w, contract)
            return QArray(jnp.asarray(q), jnp.asarray(s))
        return jnp.asarray(w, jnp.bfloat16 if kind == "bfloat16" else jnp.float32)
    return one((e, d, f), (1,)), one((e, d, f), (1,)), one((e, f, d), (1,))


def _as_float(w):
    if isinstance(w, QArray):
        return jnp.asarray(dequantize(np.asarray(w.q), np.asarray(w.scale), (1,)))
    return w.astype(jnp.float32)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("tokens,top_k,e", [(1, 2, 8), (4, 2, 8), (16, 3, 6), (7, 1, 4)])
def test_moe_kernel_equals_dense(kind, tokens, top_k, e):
    rng = np.random.default_rng(tokens * 10 + top_k)
    d, f = 40, 72
    w1, w3, w2 = _experts(e, d, f, kind, rng)
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
    routing = route(x, jnp.asarray(rng.standard_normal((d, e)), jnp.float32), top_k)
    got = np.asarray(jax.jit(moe_kernel)(x, routing, w1, w3, w2))
    want = np.asarray(moe_dense(x, routing, *(_as_float(w) for w in (w1, w3, w2))))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_run_experts_takes_the_kernel_for_decode_only():
    rng = np.random.default_rng(1)
    w1, w3, w2 = _experts(8, 32, 48, "float32", rng)
    router = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    for tokens in (1, cpu_kernels.MAX_ROWS, cpu_kernels.MAX_ROWS + 1):
        x = jnp.asarray(rng.standard_normal((tokens, 32)), jnp.float32)
        routing = route(x, router, 2)
        lowered = jax.jit(lambda x, r: run_experts(x, r, w1, w3, w2, "grouped", cpu_kernel=True)).lower(x, routing)
        assert ("mixtral_moe" in lowered.as_text()) == (tokens <= cpu_kernels.MAX_ROWS)
        got = run_experts(x, routing, w1, w3, w2, "grouped", cpu_kernel=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(moe_dense(x, routing, w1, w3, w2)), rtol=2e-5,
                                   atol=2e-6)


@pytest.mark.parametrize("tokens", [4, 16, 40])
def test_padding_tokens_read_no_experts_and_leave_the_real_ones_exact(tokens):
    """`without_padding` (a serving step's empty slots): the real tokens' outputs equal the dense loop's
    over the real tokens alone, padding rows are 0, and (kernel path) only the real tokens' experts are used."""
    rng = np.random.default_rng(tokens)
    w1, w3, w2 = _experts(8, 32, 48, "float32", rng)
    router = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((tokens, 32)), jnp.float32)
    valid = jnp.asarray(np.arange(tokens) % 4 == 1)  # the first real token is not row 0
    routing = without_padding(route(x, router, 2), valid)
    real = np.flatnonzero(np.asarray(valid))
    assert set(np.asarray(routing.expert_ids).ravel()) == set(np.asarray(routing.expert_ids)[real].ravel())
    want = np.asarray(moe_dense(x[real], route(x[real], router, 2), w1, w3, w2))
    for strategy in ("grouped", "dense", "gather"):
        got = np.asarray(jax.jit(lambda x, r, s=strategy: run_experts(x, r, w1, w3, w2, s, cpu_kernel=True,
                                                                      valid=valid))(x, routing))
        np.testing.assert_allclose(got[real], want, rtol=2e-5, atol=2e-6, err_msg=strategy)
        assert not got[np.asarray(~valid)].any(), strategy


def test_gradients_through_the_kernels_equal_xlas():
    rng = np.random.default_rng(2)
    w1, w3, w2 = _experts(4, 16, 24, "float32", rng)
    router = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    wq = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)

    def loss(x, wq, w1, kernel):
        h = cpu_kernels.matvec(x, wq) if kernel else x @ wq
        routing = route(h, router, 2)
        out = moe_kernel(h, routing, w1, w3, w2) if kernel else moe_dense(h, routing, w1, w3, w2)
        return jnp.sum(out ** 2)

    got = jax.grad(loss, argnums=(0, 1, 2))(x, wq, w1, True)
    want = jax.grad(loss, argnums=(0, 1, 2))(x, wq, w1, False)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_decode_through_the_kernels_equals_xla():
    """The sampler's cached decode (kernels: a few rows) against the full forward pass (XLA's dot: the
    whole sequence), greedy, float32 and int8."""
    cfg = MixtralConfig(vocab_size=96, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=40,
                        n_experts=4, top_k=2, max_seq_len=64)
    for quantize_mode in (None, "int8"):
        model = Mixtral(cfg, RuntimeConfig(quantize=quantize_mode),
                        rngs=nnx.Rngs(3))
        prompt = [5, 17, 33, 2, 71]
        out = Sampler(model)([prompt], 8, stop_tokens=[])[0]
        full = model(jnp.asarray([prompt + out[:-1]]))
        assert out == np.asarray(jnp.argmax(full[0, len(prompt) - 1:], -1)).tolist()
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s)(t))
        assert "mixtral_matvec" in forward.lower(state, jnp.asarray([prompt])).as_text()


def test_concurrent_calls_from_threads_each_get_their_own_answer():
    """Several products at once (a server's threads; XLA running independent products together) share
    the kernels' workers: each call still gets exactly its own result."""
    import threading

    rng = np.random.default_rng(7)
    jobs = [(rng.standard_normal((2, 300)).astype(np.float32), rng.standard_normal((300, 700)).astype(np.float32))
            for _ in range(4)]
    product = jax.jit(cpu_kernels.matvec)
    wrong = []

    def run(x, w):
        want = x.astype(np.float64) @ w.astype(np.float64)
        for _ in range(30):
            got = np.asarray(product(jnp.asarray(x), jnp.asarray(w)))
            if np.max(np.abs(got - want)) > 1e-4:
                wrong.append(np.max(np.abs(got - want)))

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def test_no_compiler_falls_back_to_xla_with_one_warning(tmp_path):
    code = ("import jax.numpy as jnp; from mixtral_jax.kernels import cpu as k; "
            "print('usable', k.usable(1)); print(k.einsum('td,dv->tv', jnp.ones((1, 4)), jnp.ones((4, 3))))")
    done = _python(code, CXX=str(tmp_path / "no-such-compiler"), MIXTRAL_JAX_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "usable False" in done.stdout and "None" in done.stdout
    assert "CPU kernels unavailable, using XLA's dot" in done.stderr
    off = _python(code, MIXTRAL_JAX_CPU_KERNELS="0")
    assert "usable False" in off.stdout and "unavailable" not in off.stderr


def test_the_build_is_cached_by_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTRAL_JAX_CACHE", str(tmp_path))
    first = cpu_kernels.build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == stamp  # not compiled again
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no half-written files left


def _huge_pages_at(address: int) -> int:
    """AnonHugePages (kB) of the mapping that holds `address`, from /proc/self/smaps."""
    inside, kb = False, 0
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                kb = int(line.split()[1])
    return kb


def test_huge_page_copy_keeps_the_values_in_huge_pages():
    rng = np.random.default_rng(0)
    tree = {"w": jnp.asarray(rng.standard_normal((1024, 1024)).astype(np.float32)),
            "q": QArray(jnp.asarray(rng.integers(-127, 128, (4096, 1024)).astype(np.int8)), jnp.ones((1024,))),
            "small": jnp.ones((8, 8))}
    want = jax.tree.map(np.asarray, tree)
    moved, nbytes = cpu_kernels.huge_page_tree(tree)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), moved, want)
    assert moved["small"] is tree["small"]  # under one huge page: left where it is
    if not cpu_kernels.huge_pages_possible():
        assert nbytes == 0 and moved["w"] is tree["w"]
        return
    assert nbytes == (4 << 20) + (4 << 20)
    for a in (moved["w"], moved["q"].q):
        assert a.unsafe_buffer_pointer() % cpu_kernels.HUGE_PAGE == 0
        assert _huge_pages_at(a.unsafe_buffer_pointer()) >= 2048
    again, more = cpu_kernels.huge_page_tree(moved)
    assert more == 0 and again["w"] is moved["w"]
    # an ordinary array otherwise: computed with, donated, and its memory released when it goes
    address = moved["w"].unsafe_buffer_pointer()
    doubled = jax.jit(lambda a: a * 2, donate_argnums=0)(moved.pop("w"))
    np.testing.assert_array_equal(np.asarray(doubled), want["w"] * 2)
    import gc

    gc.collect()
    assert address not in cpu_kernels._in_huge_pages


def test_the_sampler_moves_the_weights_and_answers_the_same():
    cfg = MixtralConfig(vocab_size=4096, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96,
                        n_experts=4, top_k=2, max_seq_len=64)
    model = Mixtral(cfg, RuntimeConfig(), rngs=nnx.Rngs(5))
    prompt = [5, 17, 33, 2, 71]
    full_before = np.asarray(model(jnp.asarray([prompt])))
    out = Sampler(model)([prompt], 6, stop_tokens=[])[0]
    embed = model.embed[...]
    if cpu_kernels.huge_pages_possible():
        assert embed.unsafe_buffer_pointer() % cpu_kernels.HUGE_PAGE == 0  # 2 MiB: moved
        assert model.use_huge_pages() == 0  # already there
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray([prompt]))), full_before)
    full = model(jnp.asarray([prompt + out[:-1]]))
    assert out == np.asarray(jnp.argmax(full[0, len(prompt) - 1:], -1)).tolist()


@pytest.mark.parametrize("cache", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("b,t,h,kh,s,x", [(1, 1, 8, 2, 144, 64), (2, 3, 4, 4, 37, 16), (3, 16, 6, 2, 70, 20),
                                         (1, 1, 32, 8, 600, 128), (2, 2, 6, 2, 50, 32), (2, 1, 2, 2, 40, 64),
                                         (1, 2, 4, 2, 33, 128)])
def test_attend_equals_plain_attention(cache, b, t, h, kh, s, x):
    """The decode attention kernel against `attend_plain` (XLA): causal, padded, windowed, part-written
    caches, a row whose every slot is hidden, and int8 caches with their scales. Head sizes 16, 32, 64
    and 128 take the vectorized path (Mixtral's 32 heads over 8 KV heads of 128 among them; 3 query
    heads a KV head leave a partial block of rows; 1 and 2 take smaller blocks), 20 the portable one."""
    from mixtral_jax.model.attention import Span, attend_plain, make_mask
    from mixtral_jax.model.kv_cache import quantize_kv

    rng = np.random.default_rng(b * 100 + t * 10 + s)
    q = jnp.asarray(rng.standard_normal((b, t, h, x)).astype(np.float32))
    k, v = (jnp.asarray(rng.standard_normal((b, kh, s, x)).astype(np.float32)) for _ in range(2))
    k_scale = v_scale = None
    if cache == "int8":
        (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
    elif cache == "bfloat16":
        k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    written = rng.integers(t, s + 1, b)  # slots written so far, per row
    kv_pos = np.broadcast_to(np.arange(s), (b, s)).astype(np.int32)
    kv_valid = kv_pos < written[:, None]
    kv_valid[0, :2] = False  # left padding
    q_pos = (written[:, None] - t + np.arange(t)).astype(np.int32)
    if t > 1:
        q_pos[-1, 0] = -1  # a query that sees nothing
    span = Span(jnp.asarray(q_pos), jnp.asarray(kv_pos), jnp.asarray(kv_valid))
    for window in (None, 5):
        want = attend_plain(q, k, v, span, window, k_scale, v_scale)
        got = jax.jit(cpu_kernels.attend)(q, k, v, make_mask(*span, window), k_scale, v_scale)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("x", [16, 32, 64, 128, 20])
def test_attend_propagates_a_nan_as_xla_does(x):
    """A NaN in one shown key makes its KV head's outputs NaN, as in XLA, not a slot silently dropped."""
    from mixtral_jax.model.attention import Span, attend_plain, make_mask

    rng = np.random.default_rng(x)
    q = jnp.asarray(rng.standard_normal((1, 1, 4, x)).astype(np.float32))
    k, v = (rng.standard_normal((1, 2, 24, x)).astype(np.float32) for _ in range(2))
    k[0, 1, 5, 3] = np.nan
    kv_pos = np.arange(24, dtype=np.int32)[None]
    span = Span(jnp.asarray([[20]], jnp.int32), jnp.asarray(kv_pos), jnp.asarray(kv_pos <= 20))
    want = np.asarray(attend_plain(q, jnp.asarray(k), jnp.asarray(v), span))
    got = np.asarray(jax.jit(cpu_kernels.attend)(q, jnp.asarray(k), jnp.asarray(v), make_mask(*span, None)))
    assert np.isnan(want[0, 0, 2:]).all() and not np.isnan(want[0, 0, :2]).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[0, 0, :2], want[0, 0, :2], rtol=2e-5, atol=2e-6)


def test_attention_takes_the_kernel_for_float32_decode_with_xlas_gradient():
    from mixtral_jax.model.attention import Span, attend_plain, attention

    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 2, 4, 8)).astype(np.float32))
    k, v = (jnp.asarray(rng.standard_normal((1, 2, 2, 8)).astype(np.float32)) for _ in range(2))
    pos = jnp.asarray([[0, 1]], jnp.int32)
    span = Span(pos, pos, jnp.ones((1, 2), bool))
    lowered = jax.jit(lambda q, k, v: attention(q, k, v, span)).lower(q, k, v).as_text()
    assert "mixtral_attend" in lowered
    assert "mixtral_attend" not in jax.jit(lambda q, k, v: attention(q, k, v, span, impl="plain")).lower(
        q, k, v).as_text()
    loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()  # noqa: E731
    got = jax.grad(loss(lambda q, k, v: attention(q, k, v, span)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: attend_plain(q, k, v, span)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
