"""Training data: text or JSONL files -> Mixtral tokens -> fixed-length packed sequences.

    data = PackedDataset.from_files(["corpus.txt", "more.jsonl"], seq_len=512)
    batch = data.batch(position, batch_size)      # (batch_size, seq_len) int32

- A `.jsonl` file holds one JSON object per line with a `"text"` string (other fields are ignored);
  any other file is one plain-text document.
- Every document is encoded as `<s> text </s>` (BOS and EOS from the tokenizer) and the documents are
  concatenated in the order given, then cut into `seq_len`-token sequences (the tail shorter than
  `seq_len` is dropped). Nothing is padded, so every position carries a next-token target.
- Sequences are visited in a fixed order, reshuffled every epoch by a permutation drawn from
  `(seed, epoch)`: sequence number `i` of the stream is a pure function of `i`, which is why the data
  position of a training checkpoint is one integer and resuming reproduces the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from mixtral_jax.errors import DataError
from mixtral_jax.text.tokenizer import load_tokenizer


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of one file: each line's `"text"` for `.jsonl`, else the whole file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                return [f.read()]
            docs = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON: {e}") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f'{path}:{n}: each JSONL line must be an object with a "text" string')
                docs.append(record["text"])
            return docs
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None


def tokenize_documents(docs: Iterable[str], tokenizer) -> np.ndarray:
    """`<s> doc </s>` for every non-empty document, concatenated: (n_tokens,) int32."""
    pieces = [np.asarray(tokenizer.encode(d, bos=True, eos=True), np.int32) for d in docs if d.strip()]
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


@dataclasses.dataclass(frozen=True)
class PackedDataset:
    """`tokens` cut into `len(self)` sequences of `seq_len`, visited in a per-epoch shuffled order."""

    tokens: np.ndarray  # (n_sequences * seq_len,) int32: the packed stream, tail dropped
    seq_len: int
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {self.seq_len}")

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True) -> PackedDataset:
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        n = len(tokens) // seq_len
        if n == 0:
            raise DataError(f"the data holds {len(tokens)} tokens, fewer than one sequence of seq_len={seq_len}; "
                            f"give more text or a shorter --seq-len")
        return cls(tokens[: n * seq_len], seq_len, seed, shuffle)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], seq_len: int, tokenizer=None, seed: int = 0,
                   shuffle: bool = True) -> PackedDataset:
        if not paths:
            raise DataError("no data files given")
        for p in paths:  # every path checked before the (slow) tokenizing starts
            if not os.path.isfile(os.fspath(p)):
                raise DataError(f"data file not found: {os.fspath(p)}")
        if tokenizer is None:
            tokenizer = load_tokenizer()
        docs = [d for p in paths for d in read_documents(p)]
        tokens = tokenize_documents(docs, tokenizer)
        if len(tokens) == 0:
            raise DataError(f"the data files ({', '.join(map(os.fspath, paths))}) hold no text")
        return cls.from_tokens(tokens, seq_len, seed, shuffle)

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def order(self, epoch: int) -> np.ndarray:
        n = len(self)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def sequence_ids(self, position: int, count: int) -> np.ndarray:
        """Which packed sequences are stream items `position .. position + count - 1`."""
        n, out, cache = len(self), np.empty(count, np.int64), {}
        for j, i in enumerate(range(position, position + count)):
            epoch, k = divmod(i, n)
            if epoch not in cache:
                cache[epoch] = self.order(epoch)
            out[j] = cache[epoch][k]
        return out

    def batch(self, position: int, batch_size: int) -> np.ndarray:
        """Stream items `position ..` as a (batch_size, seq_len) int32 array."""
        ids = self.sequence_ids(position, batch_size)
        return self.tokens.reshape(len(self), self.seq_len)[ids]
