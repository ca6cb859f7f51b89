"""Sampling penalties: discourage tokens the row has already seen, inside the compiled decode loop.

- `repetition_penalty` (Hugging Face `transformers`' `RepetitionPenaltyLogitsProcessor`): a seen token's
  logit is divided by the penalty when positive and multiplied by it when negative; 1 is off.
- `presence_penalty` / `frequency_penalty` (OpenAI's formula): `logit - count * frequency - (count > 0) *
  presence`, where `count` is how often the token occurred; 0 is off.

Tokens are counted per row over its prompt (padding excluded) and its generated tokens. The values are
per row (one request each), passed to the jitted steps as a (3, batch) array, so changing them never
recompiles. The Sampler counts the prompt once and its own output buffer each step; the Engine keeps a
(slots, vocab) count per slot, set from the prompt on admission and updated by each decode step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.errors import SamplingError

PenaltyValue = float | Sequence[float]

NEUTRAL = (1.0, 0.0, 0.0)  # repetition, presence, frequency: no effect
_OPENAI_RANGE = 2.0        # OpenAI accepts presence/frequency penalties in [-2, 2]


def _per_row(name: str, value: PenaltyValue, n_rows: int, ok, requirement: str) -> np.ndarray:
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if len(values) not in (1, n_rows):
        raise _error(f"{name} must be one number or one per prompt ({n_rows}), got {len(values)} values")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(v):
            raise _error(f"{name} must be {requirement}, got {v!r}")
    return np.broadcast_to(np.asarray(values, np.float32), (n_rows,))


def _error(message: str) -> ValueError:
    return SamplingError(message)


def make_penalties(n_rows: int, repetition_penalty: PenaltyValue = 1.0, presence_penalty: PenaltyValue = 0.0,
                   frequency_penalty: PenaltyValue = 0.0) -> np.ndarray | None:
    """Validate the penalties (a number, or one per row) -> a (3, n_rows) float32 array, or None when all are off."""
    table = np.stack([
        _per_row("repetition_penalty", repetition_penalty, n_rows, lambda v: v > 0, "a number > 0"),
        _per_row("presence_penalty", presence_penalty, n_rows, lambda v: abs(v) <= _OPENAI_RANGE,
                 "a number in [-2, 2]"),
        _per_row("frequency_penalty", frequency_penalty, n_rows, lambda v: abs(v) <= _OPENAI_RANGE,
                 "a number in [-2, 2]"),
    ])
    if np.all(table == np.asarray(NEUTRAL, np.float32)[:, None]):
        return None
    return table


def token_counts(tokens: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
    """(batch, n) token ids and a mask of which count -> (batch, vocab) int32 occurrence counts."""
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    ids = jnp.where(valid, tokens, vocab_size)  # masked-out positions land out of range and are dropped
    return jnp.zeros((tokens.shape[0], vocab_size), jnp.int32).at[rows, ids].add(1, mode="drop")


def apply_penalties(logits: jax.Array, counts: jax.Array, penalties: jax.Array | None) -> jax.Array:
    """Penalise (batch, vocab) logits given (batch, vocab) counts and the (3, batch) penalty table."""
    if penalties is None:
        return logits
    logits = logits.astype(jnp.float32)
    repetition, presence, frequency = (p[:, None] for p in penalties)
    seen = counts > 0
    logits = jnp.where(seen, jnp.where(logits < 0, logits * repetition, logits / repetition), logits)
    return logits - counts * frequency - seen * presence


def penalize_rows(logits: jax.Array, counts: jax.Array, penalties: jax.Array) -> jax.Array:
    """`apply_penalties` for a table every row has (the engine's slots, neutral where off): skipped at run
    time when every row is neutral, which leaves the logits as they are (float32)."""
    neutral = jnp.all(penalties == jnp.asarray(NEUTRAL, jnp.float32)[:, None])
    return jax.lax.cond(neutral, lambda x: x.astype(jnp.float32), lambda x: apply_penalties(x, counts, penalties),
                        logits)


def penalty_row(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0) -> np.ndarray:
    """One request's (3,) penalty values, checked (`make_penalties`), neutral where off."""
    table = make_penalties(1, repetition_penalty, presence_penalty, frequency_penalty)
    return np.asarray(NEUTRAL, np.float32) if table is None else table[:, 0]


def penalized(logits: jax.Array, prompt_counts: jax.Array | None, generated: jax.Array,
              penalties: jax.Array | None) -> jax.Array:
    """`apply_penalties` for the sampler: counts are the prompt's plus the generated buffer's (-1 = empty)."""
    if penalties is None:
        return logits
    counts = prompt_counts + token_counts(generated, generated >= 0, logits.shape[-1])
    return apply_penalties(logits, counts, penalties)
