"""`mixtral-jax plan --serve`: the paged engine's step compiled ahead of time for a 4-chip TPU v5e slice
(libtpu, no TPU) with a tiny TPU-shaped Mixtral. XLA's own argument bytes must be the weights plus the pages
split as the layout says (worked out by hand here), the pages sized to fill what HBM leaves, and the
sequence count follow from them."""

from __future__ import annotations

import json
import os

import pytest

from mixtral_jax import MixtralConfig
from mixtral_jax.cli.main import main
from mixtral_jax.planning import serve_plan
from mixtral_jax.planning.topologies import GIB, get_topology

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytestmark = pytest.mark.tpu

CONFIG = MixtralConfig.tiny(dim=256, head_dim=128, hidden_dim=512, vocab_size=512)
SLACK = 256 * 1024  # the step's small inputs (tokens, page tables, sampling rows) padded to TPU tiles
MESH = "expert=2,tensor=2"


def page_bytes_by_hand(cfg, page_size, tensor=2, itemsize=2, scales=False) -> int:
    """One page of every layer on one chip: its KV heads over tensor, K and V, head_dim values (+ a float32
    scale per token and head for int8)."""
    per_token = 2 * (cfg.n_kv_heads // tensor) * (cfg.head_dim * itemsize + (4 if scales else 0))
    return cfg.n_layers * page_size * per_token


@pytest.fixture(scope="module")
def sized():
    return serve_plan.plan_serve(CONFIG, "v5e-4", MESH, max_batch=8, max_context=128, prefill_chunk=32, page_size=16)


def test_pages_split_over_sequence_shards_and_kv_heads():
    """With a given page count, each chip holds its shard's pages (half of them) with half the KV heads."""
    r = serve_plan.plan_serve(CONFIG, "v5e-4", MESH, max_batch=8, max_context=128, prefill_chunk=32, page_size=16,
                              pages=64)
    per_page = page_bytes_by_hand(CONFIG, 16)
    assert r.shards == 2 and r.page_bytes == per_page and r.pages == 64 and r.tokens == 64 * 16
    pages_per_chip = 32 * per_page
    assert r.weight_bytes + pages_per_chip <= r.argument_bytes <= r.weight_bytes + pages_per_chip + SLACK
    assert r.alias_bytes >= pages_per_chip  # the donated pages are the returned pages
    assert r.sequences == 2 * (32 // (128 // 16)) == 8 and r.holds_batch
    assert r.attention == "ragged paged attention kernel"


def test_pages_fill_what_hbm_leaves(sized):
    """Sized automatically: the plan compiles (XLA:TPU refuses more than HBM), and a few more pages would
    not have fit the room counted (HBM less everything that does not grow with the pages)."""
    r = sized
    hbm = get_topology("v5e-4").chip.hbm_bytes
    assert r.fits and r.total_bytes <= hbm
    room = hbm - r.fixed_bytes
    used = (r.pages // r.shards) * r.page_bytes
    assert used <= room < used + r.page_bytes + serve_plan.RETRY_MARGIN * hbm + 2 * r.page_bytes
    assert r.total_bytes - r.fixed_bytes - used < 2 * SLACK  # the pages are what grew
    assert r.sequences == r.shards * ((r.pages // r.shards) // (128 // 16))
    assert r.tokens == r.pages * 16


def test_int8_pages_hold_about_twice_the_tokens(sized):
    r8 = serve_plan.plan_serve(CONFIG, "v5e-4", MESH, max_batch=8, max_context=128, prefill_chunk=32, page_size=16,
                               kv_cache_dtype="int8")
    assert r8.page_bytes == page_bytes_by_hand(CONFIG, 16, itemsize=1, scales=True)
    assert r8.fits and 1.8 < r8.tokens / sized.tokens < 2.0  # 128 + 4 bytes a value vector against 256


def test_cli_serve_json_and_errors(capsys):
    code = main(["plan", "--topology", "v5e-4", "--mesh", MESH, "--model", "tiny", "--serve", "--max-batch", "4",
                 "--max-context", "64", "--pages", "32", "--prefill-chunk", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["pages"] == 32 and out["sequences"] == 2 * (16 // 4) and out["fits"]
    assert out["total_bytes"] < 1 * GIB
    assert main(["plan", "--topology", "v5e-4", "--mesh", MESH, "--model", "tiny", "--serve",
                 "--decode-batch", "4"]) == 2
    assert "drop --decode-batch" in capsys.readouterr().err
    assert main(["plan", "--topology", "v5e-4", "--mesh", MESH, "--model", "tiny", "--max-batch", "4"]) == 2
    assert "add --serve" in capsys.readouterr().err

