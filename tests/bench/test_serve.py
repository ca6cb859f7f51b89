"""bench.serve's arguments, prompts and report, and its run without the vLLM peer (CI has no vLLM)."""

import json
import stat

import pytest

from bench import serve, vllm_peer


def _venv(tmp_path):
    """A directory shaped like a venv: bin/python (executable) and bin/vllm."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "vllm"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    return tmp_path / "venv"


def test_the_peer_is_found_from_its_python_its_vllm_script_its_venv_or_the_environment(tmp_path, monkeypatch):
    venv = _venv(tmp_path)
    python = str(venv / "bin" / "python")
    monkeypatch.delenv(vllm_peer.PEER_ENV, raising=False)
    assert vllm_peer.resolve(None) is None
    for spec in (python, str(venv / "bin" / "vllm"), str(venv)):
        assert vllm_peer.resolve(spec) == python
    monkeypatch.setenv(vllm_peer.PEER_ENV, str(venv))
    assert vllm_peer.resolve(None) == python
    with pytest.raises(FileNotFoundError, match="no python at"):
        vllm_peer.resolve(str(tmp_path / "nowhere"))


def test_the_peer_serves_the_same_directory_in_float32_with_our_limits():
    cmd = vllm_peer.command("/v/bin/python", "/models/bench", 8123, 16, 512)
    assert cmd[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--model"] == "/models/bench" and flags["--dtype"] == "float32"
    assert (flags["--port"], flags["--max-num-seqs"], flags["--max-model-len"]) == ("8123", "16", "512")
    assert vllm_peer.environment({})[vllm_peer.KV_SPACE_ENV] == vllm_peer.KV_SPACE_GIB
    assert vllm_peer.environment({vllm_peer.KV_SPACE_ENV: "4"})[vllm_peer.KV_SPACE_ENV] == "4"


def test_arguments_defaults_and_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(vllm_peer.PEER_ENV, raising=False)
    args = serve.parse_args([])
    assert (args.clients, args.max_tokens, args.rounds, args.prefix_tokens) == (12, 64, 3, 200)
    assert args.peer_python is None and args.checkpoint is None and args.hf_dir is None
    venv = _venv(tmp_path)
    args = serve.parse_args(["--hf-dir", str(tmp_path / "hf"), "--vllm", str(venv)])
    assert args.peer_python == str(venv / "bin" / "python") and args.peer_model == str(tmp_path / "hf")
    hf = tmp_path / "hf-checkpoint"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert serve.parse_args(["--checkpoint", str(hf), "--vllm", str(venv)]).peer_model == str(hf)
    bad = {("--clients", "0"): "--clients must be at least 1",
           ("--rounds", "0"): "--rounds must be at least 1",
           ("--prefix-tokens", "-1"): "--prefix-tokens must be 0 or more",
           ("--warmup-rounds", "-1"): "--warmup-rounds must be 0 or more",
           ("--prefix-tokens", "500"): "need a --max-context of at least",
           ("--vllm", str(tmp_path / "missing")): "no python at",
           ("--vllm", str(venv)): "the vLLM peer needs a Hugging Face directory",
           ("--checkpoint", str(tmp_path), "--vllm", str(venv)): "the vLLM peer needs a Hugging Face directory",
           ("--checkpoint", "a", "--hf-dir", "b"): "not allowed with argument"}
    for argv, message in bad.items():
        with pytest.raises(SystemExit):
            serve.parse_args(list(argv))
        assert message in capsys.readouterr().err


def test_workloads_share_one_system_prompt_or_give_each_request_a_fresh_one():
    work = serve.Workloads(clients=12, prefix_tokens=200, vocab_size=32000)
    assert len(work.plain) == 12 and all(p[0] == work.bos and len(p) < 20 for p in work.plain)
    shared = work.prefixed(True, 0, 0)
    assert all(p[1:201] == work.shared for p in shared) and shared == work.prefixed(True, 3, 1)
    own = [work.prefixed(False, r, m) for r in range(3) for m in range(2)]
    systems = [tuple(p[1:201]) for prompts in own for p in prompts]
    assert len(set(systems)) == len(systems) == 72 and tuple(work.shared) not in systems
    assert all(p[201:] == s for p, s in zip(shared, work.suffixes))  # the same question behind either prefix
    assert work.prefixed(False, 1, 0) == serve.Workloads(12, 200, 32000).prefixed(False, 1, 0)  # both servers
    assert max(map(len, shared)) == work.longest() and tuple(work.warmup()[0][1:]) not in systems


def _round(tokens_per_s, ttft):
    return {"tokens": 100, "seconds": 1.0, "tokens_per_s": tokens_per_s, "ttft_p50_ms": ttft, "ttft_p90_ms": 2 * ttft}


def _runs(scale):
    modes = lambda ttft: {m: [_round(scale * (1 + i), ttft * (1 + i)) for i in range(3)] for m in serve.MODES}  # noqa: E731
    return {"plain": modes(10.0), "shared prefix": modes(5.0), "own prefix": modes(20.0)}


def test_the_report_without_the_peer_says_so(monkeypatch, capsys):
    monkeypatch.delenv(vllm_peer.PEER_ENV, raising=False)
    args = serve.parse_args(["--rounds", "3"])
    report = serve._report(args, [serve.Server("ours", None, "")], {"ours": _runs(100.0)}, {"ours": {}})
    out = capsys.readouterr().out
    assert "vLLM peer: not measured" in out and report["peer"] is None and "ours_vs_vllm" not in report
    assert report["servers"]["ours"]["plain"]["concurrent"]["tokens_per_s"] == {"min": 100, "median": 200, "max": 300}
    assert report["prefix_ttft_gain"]["ours"] == {m: 4.0 for m in serve.MODES}


def test_the_report_with_the_peer_gives_per_round_ratios(tmp_path, monkeypatch, capsys):
    venv = _venv(tmp_path)
    monkeypatch.setattr(vllm_peer, "version", lambda python: "0.32.0")
    args = serve.parse_args(["--hf-dir", str(tmp_path / "hf"), "--vllm", str(venv), "--clients", "2"])
    answers = {"ours": {m: ["a", "b"] for m in serve.MODES}, "vLLM": {m: ["a", "c"] for m in serve.MODES}}
    servers = [serve.Server("ours", None, ""), serve.Server("vLLM", None, "")]
    report = serve._report(args, servers, {"ours": _runs(100.0), "vLLM": _runs(50.0)}, answers)
    assert report["ours_vs_vllm"]["concurrent"] == {"tokens_per_s": 2.0, "ttft_p50": 1.0}
    assert report["same_greedy_answers"] == {m: 1 for m in serve.MODES} and report["peer"]["version"] == "0.32.0"
    assert report["ours_concurrent_equals_alone"] == 2
    assert "not measured" not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_real_run_without_the_peer(monkeypatch, capsys):
    """The demo model's server, 2 clients, 1 round: every scenario measured, the peer said to be absent."""
    monkeypatch.delenv(vllm_peer.PEER_ENV, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert serve.main(["--clients", "2", "--max-tokens", "4", "--rounds", "1", "--max-batch", "2",
                       "--max-context", "128", "--prefill-chunk", "64", "--prefix-tokens", "48",
                       "--prefix-max-tokens", "2", "--startup-timeout", "600"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["peer"] is None and "vLLM peer: not measured" in out
    assert report["ours_concurrent_equals_alone"] == 2  # greedy: batching must not change the answers
    for scenario in ("plain", "shared prefix", "own prefix"):
        for mode in serve.MODES:
            row = report["servers"]["ours"][scenario][mode]
            assert row["tokens_per_s"]["median"] > 0 and row["ttft_p50_ms"]["median"] > 0
    assert set(report["prefix_ttft_gain"]["ours"]) == set(serve.MODES)
