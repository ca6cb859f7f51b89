"""Constrained decoding: a JSON schema (or "any JSON object") as a per-step allowed-token bitmask.

The masks come from `llguidance` (the `serve` extra), chosen over xgrammar and outlines-core for this
tokenizer: it takes SentencePiece's pieces as raw bytes (byte-fallback pieces included, no vocabulary
guessing), compiles a schema in ~2 ms and computes a 32000-token mask in ~10 us on one CPU core, against
~15 us for xgrammar (which also pulls in torch and triton) and an up-front index of ~70 ms per schema for
outlines-core. The engine applies the mask inside its jitted step (`Constraint`), so a constrained token is
never drawn and then rejected.

JSON is written compactly but with `json.dumps`' separators (", " and ": "), as Mistral's templates write
tool calls, and without free whitespace, so a model cannot spend its tokens on blank space. A `prefix` of
token ids is forced first: `[TOOL_CALLS]` for a forced tool call.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np

from mixtral_jax.text.tokenizer import Tokenizer

_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema the grammar compiler cannot turn into a grammar (the server reports it as a 400)."""


@functools.lru_cache(maxsize=4)
def _llg_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of the vocabulary: each piece's bytes ("▁" is a space, `<0x41>` the byte 0x41);
    control tokens are special and match no text. Built once per tokenizer (~0.1 s)."""
    import llguidance

    sp, n = tokenizer._sp, tokenizer.vocab_size
    special = [i for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i)]

    def piece(i: int) -> bytes:
        if sp.IsByte(i):
            return bytes([int(sp.IdToPiece(i)[3:5], 16)])
        return b"" if i in special_set else sp.IdToPiece(i).replace("\u2581", " ").encode()

    special_set = set(special)

    class _Vocabulary:
        eos_token_id, bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        tokens = [piece(i) for i in range(n)]
        special_token_ids = special

        def __call__(self, text):  # plain text -> ids without SentencePiece's dummy-prefix space
            text = text.decode() if isinstance(text, bytes) else text
            return sp.encode("\n" + text)[2:]  # "\n" encodes as ["▁", "<0x0A>"]

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary()))


def json_grammar(schema: Mapping | None) -> str:
    """llguidance's grammar for `schema` (None: any JSON object); GrammarError if it cannot compile."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"} if schema is None
                                                                else dict(schema), defaults=_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"unsupported JSON schema: {error.splitlines()[0][:300]}")
    return grammar


class Grammar:
    """One request's constraint (`mixtral_jax.inference.engine.Constraint`): the forced `prefix` ids, then
    text matching `grammar`, then EOS. `words`: the mask's length, ceil(model vocabulary / 32)."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, words: int, prefix: Sequence[int] = ()):
        import llguidance

        self._matcher = llguidance.LLMatcher(_llg_tokenizer(tokenizer), grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())
        self._prefix = list(prefix)
        self._words = words

    def bitmask(self) -> np.ndarray:
        out = np.zeros(self._words, np.int32)
        if self._prefix:
            token = self._prefix[0]
            out[token // 32] = np.uint32(1 << (token % 32)).view(np.int32)
            return out
        mask = np.frombuffer(self._matcher.compute_bitmask(), np.int32)
        out[:len(mask)] = mask[:self._words]
        return out

    def advance(self, token: int) -> None:
        if self._prefix:
            self._prefix.pop(0)
        elif not self._matcher.consume_token(token):  # cannot happen while the mask is applied
            raise GrammarError(f"token {token} is outside the grammar: {self._matcher.get_error()}")

    @property
    def accepting(self) -> bool:
        return not self._prefix and self._matcher.is_accepting()


def tool_call_schema(tools: Sequence[Mapping], name: str | None) -> dict:
    """The JSON schema of a v3 `[TOOL_CALLS]` list: one call of the function `name`, or (None) one or more
    calls of any of `tools` (OpenAI definitions), each `{"name": ..., "arguments": {...}}`."""
    def call(function: Mapping) -> dict:
        parameters = function.get("parameters") or {"type": "object"}
        return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"], "additionalProperties": False}

    functions = [t["function"] for t in tools]
    if name is not None:
        return {"type": "array", "items": call(next(f for f in functions if f["name"] == name)),
                "minItems": 1, "maxItems": 1}
    return {"type": "array", "items": {"anyOf": [call(f) for f in functions]}, "minItems": 1}


class Banned:
    """A constraint that never allows `tokens` (tool_choice "none": no `[TOOL_CALLS]`) and allows all else."""

    def __init__(self, tokens: Sequence[int], words: int):
        self._mask = np.full(words, -1, np.int32)
        for t in tokens:
            self._mask[t // 32] &= ~np.uint32(1 << (t % 32)).view(np.int32)

    def bitmask(self) -> np.ndarray:
        return self._mask

    def advance(self, token: int) -> None:
        pass
