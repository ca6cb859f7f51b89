"""The parts of the llama.cpp peer and the bandwidth probe that run without llama-cpp-python (CI has none)."""

import os
import sys

import numpy as np
import pytest
import sentencepiece

from bench import bandwidth, llamacpp, llamacpp_setup, speed, vs_llamacpp


def test_bandwidth_probe_picks_the_best_method():
    figures = {"slow": 1e9, "fast": 3e9, "middle": 2e9}
    methods = {name: (lambda n, reps, v=v: v) for name, v in figures.items()}
    best, value, results = bandwidth.probe(2**20, 1, methods)
    assert (best, value) == ("fast", 3e9)
    assert results == figures
    assert "memory bandwidth 3.0 GB/s" in bandwidth.describe(best, results)


def test_bandwidth_probe_leaves_out_a_failing_method_and_rejects_a_cache_sized_buffer():
    def broken(n, reps):
        raise MemoryError("no room")

    best, _, results = bandwidth.probe(2**20, 1, {"broken": broken, "ok": lambda n, reps: 5e9})
    assert best == "ok" and set(results) == {"ok"}
    with pytest.raises(RuntimeError, match="every bandwidth method failed"):
        bandwidth.probe(2**20, 1, {"broken": broken})
    with pytest.raises(ValueError, match="at least 1 MiB"):
        bandwidth.probe(1000, 1)


@pytest.mark.parametrize("name", sorted(bandwidth.METHODS))
def test_every_bandwidth_method_measures_a_positive_rate(name):
    rate = bandwidth.METHODS[name](4 * 2**20, 1)  # small: fast; a rate, not a limit
    assert 1e8 < rate < 1e13


def test_convert_command_is_llamacpps_converter_with_its_outtype():
    cmd = llamacpp.convert_command("/src/convert_hf_to_gguf.py", "/hf", "/out/m.gguf", "q8_0")
    assert cmd == [sys.executable, "/src/convert_hf_to_gguf.py", "/hf", "--outtype", "q8_0", "--outfile", "/out/m.gguf"]
    with pytest.raises(ValueError, match="outtype must be one of f32, q8_0"):
        llamacpp.convert_command("c.py", "/hf", "/out/m.gguf", "q4_0")


def test_find_converter_looks_where_the_setup_script_unpacks(tmp_path, monkeypatch):
    monkeypatch.delenv(llamacpp.CONVERTER_ENV, raising=False)
    assert llamacpp.find_converter(str(tmp_path)) is None
    tree = llamacpp_setup.source_dir(str(tmp_path))
    converter = os.path.join(tree, "vendor", "llama.cpp", "convert_hf_to_gguf.py")
    os.makedirs(os.path.dirname(converter))
    open(converter, "w").close()
    assert llamacpp.find_converter(str(tmp_path)) == converter
    monkeypatch.setenv(llamacpp.CONVERTER_ENV, str(tmp_path / "missing.py"))
    with pytest.raises(FileNotFoundError, match="LLAMACPP_CONVERTER"):
        llamacpp.find_converter(str(tmp_path))


def test_convert_without_a_converter_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv(llamacpp.CONVERTER_ENV, raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="bench.llamacpp_setup"):
        llamacpp.convert(str(tmp_path), str(tmp_path))


def test_add_tokenizer_gives_the_converter_a_vocab_of_the_bench_size(tmp_path):
    path = llamacpp.add_tokenizer(str(tmp_path))
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    assert sp.vocab_size() == speed.BENCH_CONFIG.vocab_size


def test_setup_builds_natively_from_the_pinned_sdist():
    download = llamacpp_setup.download_command("/d")
    assert f"llama-cpp-python=={llamacpp_setup.VERSION}" in download and ":all:" in download
    cmd, env = llamacpp_setup.install_command("/d/tree")
    assert cmd[-1] == "/d/tree" and env["CMAKE_ARGS"] == "-DGGML_NATIVE=ON"


def test_the_bench_runs_without_llamacpp(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert speed.llamacpp_peer(str(tmp_path), 4, 1, 16) is None


def test_the_alternating_comparison_says_how_to_install_llamacpp(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    with pytest.raises(SystemExit):
        vs_llamacpp.main(["--hf-dir", str(tmp_path)])
    assert "bench.llamacpp_setup" in capsys.readouterr().err


def test_the_llamacpp_table_holds_int8_against_q8_0(monkeypatch, capsys):
    import types

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.3.36"))
    peer = {"decode_b1": {"f32": 100.0, "q8_0": 300.0}, "prefill": {"f32": 700.0, "q8_0": 900.0},
            "threads": {"f32 x2": {"decode_b1": 100.0, "prefill": 700.0}}}
    speed._print_llamacpp(peer, 110.0, 1050.0, 1024, 150.0)
    out = capsys.readouterr().out
    assert "decode b1          110.0       100.0       300.0    1.10x" in out
    assert "prefill 1024      1050.0       700.0       900.0    1.50x" in out
    assert "ours int8 (LM head too) against q8_0: 150.0 / 300.0 = 0.50x" in out


def test_the_step_clock_counts_only_steps_computed_after_the_first_delivery():
    clock = speed._StepClock()
    clock.times = [0.0, 0.01, 0.02]  # one step per delivery
    assert abs(clock.rate(1) - 100.0) < 1e-9
    clock.times = [0.0, 0.00001, 0.00002, 0.01, 0.01001, 0.01002, 0.02, 0.02001, 0.02002]  # three steps a delivery
    assert abs(clock.rate(2) - 2 * 6 / 0.02002) < 1e-9


@pytest.mark.slow
def test_kernel_ab_times_two_builds_that_compute_the_step(tmp_path):
    """bench.kernel_ab: both builds registered side by side compute what XLA computes for its step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench import kernel_ab
    from mixtral_jax.config import MixtralConfig, RuntimeConfig
    from mixtral_jax.kernels import cpu as cpu_kernels
    from mixtral_jax.model.mixtral import Mixtral

    if not cpu_kernels.available():
        pytest.skip("needs a C++ compiler for the CPU kernels")
    with pytest.raises(SystemExit, match="neither a file nor a git revision"):
        kernel_ab.source_text("no-such-revision-xyz")
    with pytest.raises(SystemExit, match="no MixtralMoe handler"):
        kernel_ab.renamed("XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralMatvec, ...", 0)
    text = kernel_ab.source_text(str(cpu_kernels.SOURCE))
    assert "MixtralMoeV3," in kernel_ab.renamed(text, 3) and "MixtralMoe," not in kernel_ab.renamed(text, 3)
    cfg = MixtralConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                        n_experts=4, top_k=2, max_seq_len=32)
    model = Mixtral(cfg, RuntimeConfig(), rngs=nnx.Rngs(0))
    layers, head = kernel_ab.step_weights(model)
    for i in (7, 8):
        kernel_ab.register(text, i, str(tmp_path))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32)), jnp.float32)

    def reference(x):
        for i, (wq, wk, wv, wo, (w1, w3, w2)) in enumerate(layers):
            q, k, v = x @ wq[0], x @ wk[0], x @ wv[0]
            x = x + ((q + jnp.resize(k + v, q.shape)) @ wo[0]) * 1e-3
            experts = [i % 4, (i + 3) % 4]
            x = x + sum(0.5 * ((jax.nn.silu(x @ w1[0][e]) * (x @ w3[0][e])) @ w2[0][e]) for e in experts) * 1e-3
        return x @ head[0]

    want = np.asarray(reference(x))
    for i in (7, 8):
        got = np.asarray(kernel_ab.step_fn(i, cfg.n_experts)(x, layers, head))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
