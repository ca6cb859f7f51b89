"""The notebook API for generation: text or token ids in, text or token ids out, optionally streamed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mixtral_jax.inference.penalties import PenaltyValue
from mixtral_jax.inference.sampler import Sampler, SamplingError
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.text.tokenizer import Tokenizer, tokenizer_for
from mixtral_jax.text.tool_calls import assistant_message


def generate(model: Mixtral, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             tokenizer: Tokenizer | None = None, stop: Sequence[str] = (), stop_tokens: Sequence[int] | None = None,
             on_text: Callable[[int, str], None] | None = None, repetition_penalty: PenaltyValue = 1.0,
             presence_penalty: PenaltyValue = 0.0, frequency_penalty: PenaltyValue = 0.0,
             kv_cache_dtype: str | None = None) -> list[str] | list[list[int]]:
    """Generate a continuation for each prompt.

    Strings are encoded with `tokenizer` (by default the model's own: the one its checkpoint recorded, else
    v3 for a 32768-token vocabulary and v1 otherwise; with BOS) and strings come back; lists of
    token ids come back as lists of new token ids. `stop` strings end a row (they are left out of the
    answer); EOS always does unless `stop_tokens` says otherwise. `on_text(row, fragment)` streams text.
    Greedy by default. The penalties (`mixtral_jax.inference.penalties`: transformers' repetition penalty, OpenAI's
    presence and frequency penalties) count the prompt's tokens and the generated ones, per row.
    `kv_cache_dtype`: the KV cache's dtype (default: the compute dtype; "int8" halves bf16's bytes).
    """
    if isinstance(prompts, str):
        raise SamplingError("prompts must be a list of strings or of token-id lists, not one string")
    as_text = bool(prompts) and all(isinstance(p, str) for p in prompts)
    if as_text or stop or on_text is not None:
        tokenizer = check_tokenizer(model, tokenizer or tokenizer_for(model))
    ids = [tokenizer.encode(p) for p in prompts] if as_text else [list(p) for p in prompts]
    stop_sequences = [tokenizer.encode(s, bos=False) for s in stop] if stop else []
    decoders = [tokenizer.incremental_decoder() for _ in ids] if on_text is not None else []

    def stream(step_tokens):
        for row, tok in enumerate(step_tokens.tolist()):
            if tok >= 0 and (fragment := decoders[row].push(tok)):
                on_text(row, fragment)

    sampler = Sampler(model, kv_cache_dtype)
    out = sampler(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  stop_tokens=stop_tokens, stop_sequences=stop_sequences,
                  stream=stream if on_text is not None else None, repetition_penalty=repetition_penalty,
                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    for row, decoder in enumerate(decoders):  # text held back for an unfinished character at the end
        if fragment := decoder.flush():
            on_text(row, fragment)
    return [tokenizer.decode(o) for o in out] if as_text else out


def chat(model: Mixtral, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256, *,
         tools: Sequence[Mapping[str, Any]] | None = None, tokenizer: Tokenizer | None = None,
         **kwargs) -> str | dict:
    """The assistant's reply to a conversation, in the chat template of the model's tokenizer.

    Without `tools`: the reply's text. With `tools` (OpenAI function definitions; a v3 tokenizer, i.e.
    Mixtral-8x22B): an OpenAI-style assistant message, `{"role": "assistant", "content": ..., "tool_calls":
    [...]}` when the model calls tools (see `mixtral_jax.text.tool_calls.assistant_message`), which can be
    appended to `messages` followed by `{"role": "tool", "tool_call_id": ..., "content": ...}` results.
    `messages` may hold earlier tool calls and results either way. Other keyword arguments: `generate`'s.
    """
    tokenizer = check_tokenizer(model, tokenizer or tokenizer_for(model))
    prompt = tokenizer.encode_chat(messages, tools)
    on_text = kwargs.pop("on_text", None)
    out = generate(model, [prompt], max_new_tokens, tokenizer=tokenizer,
                   on_text=(lambda _row, text: on_text(text)) if on_text else None, **kwargs)
    if tools is None:
        return tokenizer.decode(out[0])
    return assistant_message(tokenizer, out[0])


def check_tokenizer(model: Mixtral, tokenizer: Tokenizer) -> Tokenizer:
    """A tokenizer with more tokens than the model was trained for would feed it ids it has no embedding for."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SamplingError(f"the {tokenizer.version} tokenizer has {tokenizer.vocab_size} tokens, the model only "
                            f"{model.config.vocab_size}: use the model's own tokenizer (v1 for 32000, v3 for 32768)")
    return tokenizer
