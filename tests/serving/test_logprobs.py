"""logprobs through the real HTTP server and the official client, against the model's own log-softmax: the
full sequence run through the model directly (no cache, no engine), float32, after logit_bias, greedy."""

import numpy as np
import pytest

from mixtral_jax.loading.demo import default_model
from mixtral_jax.text.tokenizer import load_tokenizer
from tests.helpers.live_server import live_server

MODEL = "demo"
PROMPT = "def read_config(path):"


@pytest.fixture(scope="module")
def server():
    model, tok = default_model(), load_tokenizer()
    with live_server(model, tok, MODEL, max_batch=4, max_context=128, prefill_chunk=16) as (_, client, _):
        yield model, tok, client


def reference(model, tok, n, bias=None, top=5):
    """Greedy tokens from full-sequence forwards, each step's log-softmax (after `bias`) at the drawn token
    and its top values."""
    ids, out = tok.encode(PROMPT), []
    width = len(ids) + n  # one padded shape (one compile): causal, so the padding never reaches position -1
    for _ in range(n):
        logits = np.asarray(model(np.array([ids + [0] * (width - len(ids))])))[0, len(ids) - 1].astype(np.float64)
        if bias is not None:
            logits = logits + bias
        lp = logits - np.logaddexp.reduce(logits)
        t = int(np.argmax(lp))
        out.append((t, lp[t], np.sort(lp)[::-1][:top]))
        ids.append(t)
    return out


def test_completion_logprobs_equal_the_models_log_softmax(server):
    model, tok, client = server
    ref = reference(model, tok, 8)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5)
    lp = got.choices[0].logprobs
    assert lp.tokens == [tok.token_bytes(t).decode() for t, _, _ in ref]
    assert np.allclose(lp.token_logprobs, [v for _, v, _ in ref], atol=1e-4, rtol=0)
    for top, (_, _, values) in zip(lp.top_logprobs, ref, strict=True):
        assert len(top) == 5 and np.allclose(sorted(top.values(), reverse=True), values, atol=1e-4, rtol=0)
    text = got.choices[0].text
    assert lp.text_offset[0] == 0 and all(text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens,
                                                                                  strict=True))


def test_logprobs_are_taken_after_logit_bias_and_before_temperature(server):
    """A +8 bias on a token changes the answer and its log probabilities exactly as adding it to the logits
    does; a sampled answer reports the same untempered values for the tokens it shares with it."""
    model, tok, client = server
    token = tok.encode("return", bos=False)[0]  # "▁return"
    bias = np.zeros(model.config.vocab_size)
    bias[token] = 8.0
    ref = reference(model, tok, 6, bias)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                    logit_bias={str(token): 8})
    assert got.choices[0].logprobs.tokens[0] == " return" != reference(model, tok, 1)[0][0]
    assert np.allclose(got.choices[0].logprobs.token_logprobs, [v for _, v, _ in ref], atol=1e-4, rtol=0)
    hot = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=2, top_p=1, seed=7,
                                    logprobs=5)
    first = hot.choices[0].logprobs
    plain = reference(model, tok, 1, top=5)[0][2]
    assert np.allclose(sorted(first.top_logprobs[0].values(), reverse=True), plain, atol=1e-4, rtol=0)


def test_chat_logprobs_streamed_and_not(server):
    """Chat: `logprobs: true` with 20 top_logprobs, each with its bytes; the stream carries the same entries."""
    _, tok, client = server
    messages = [{"role": "user", "content": "Sort a list"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=20)
    content = whole.choices[0].logprobs.content
    assert len(content) == 6 and all(len(e.top_logprobs) == 20 for e in content)
    assert all(e.logprob == e.top_logprobs[0].logprob and bytes(e.bytes).decode() == e.token for e in content)
    assert "".join(e.token for e in content).strip() == whole.choices[0].message.content.strip()
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=20, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
