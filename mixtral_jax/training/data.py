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

Chat data (`ChatDataset`, for fine-tuning): a `.jsonl` file whose lines are OpenAI-style conversations,
`{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`. Each conversation is one
row, encoded with the tokenizer's chat template (v1: `<s>[INST] user [/INST] answer</s>...`), cut at
`seq_len` and padded after its end; its loss mask marks the assistants' tokens (each answer and its
`</s>`) as the only targets, so the prompts, system messages and padding carry no loss. `load_dataset`
picks the kind from the first record.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from mixtral_jax.errors import DataError
from mixtral_jax.text.tokenizer import load_tokenizer


def _jsonl_field(path: str, key: str, kind: type, what: str) -> list[tuple[int, object]]:
    """(line number, record[key]) of every non-empty line of a JSONL file; `kind` is the field's type."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON: {e}") from None
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, kind) or (kind is list and not value):
                raise DataError(f"{path}:{n}: each {what}JSONL line must be an object with a \"{key}\" "
                                f"{'list' if kind is list else 'string'}")
            out.append((n, value))
    return out


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of one file: each line's `"text"` for `.jsonl`, else the whole file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        if not path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                return [f.read()]
        return [text for _, text in _jsonl_field(path, "text", str, "")]
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


# ------------------------------------------------------------------------------------------------ chat
def read_conversations(path: str | os.PathLike) -> list[tuple[int, list]]:
    """(line number, messages) of each conversation of a chat `.jsonl` file (its `"messages"` lists)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        return _jsonl_field(path, "messages", list, "chat ")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None


def encode_conversation(messages: Sequence[dict], tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation: the chat template's tokens, 1 on each assistant answer
    and its `</s>`, 0 elsewhere. Each prompt is what `encode_chat` gives for the messages before that
    answer (so training sees what generation will); messages after the last answer are dropped."""
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        content = message.get("content")
        if not isinstance(content, str) or not content:
            raise ValueError(f"message {i}: an assistant message must have non-empty string content")
        prompt = tokenizer.encode_chat(messages[:i])
        if prompt[: len(ids)] != ids:
            raise ValueError("the chat template does not extend the earlier turns' tokens (it is not "
                             "prefix-stable); cannot mask its prompts")
        mask += [0] * (len(prompt) - len(ids))
        ids = list(prompt)
        answer = tokenizer.encode(content, bos=False) + [tokenizer.eos_id]  # mistral-common's v1 assistant turn
        ids += answer
        mask += [1] * len(answer)
    if not ids:
        raise ValueError("the conversation has no assistant message to learn from")
    return ids, mask


@dataclasses.dataclass(frozen=True)
class ChatDataset:
    """One conversation per row: tokens (n, seq_len) and loss masks (n, seq_len), padded with `pad_id`
    after each conversation (masked out); visited in the same per-epoch shuffled order as `PackedDataset`."""

    tokens: np.ndarray  # (n, seq_len) int32
    mask: np.ndarray    # (n, seq_len) int32: 1 where a token is a target
    seed: int = 0
    shuffle: bool = True

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def from_conversations(cls, conversations: Sequence[Sequence[dict]], seq_len: int, tokenizer=None,
                           seed: int = 0, shuffle: bool = True, labels: Sequence[str] | None = None) -> ChatDataset:
        """`labels`: where each conversation came from, for errors (default "conversation N")."""
        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {seq_len}")
        tokenizer = tokenizer or load_tokenizer()
        labels = labels or [f"conversation {n}" for n in range(1, len(conversations) + 1)]
        rows, masks = [], []
        for label, messages in zip(labels, conversations, strict=True):
            try:
                ids, mask = encode_conversation(messages, tokenizer)
            except (ValueError, TypeError) as e:
                raise DataError(f"{label}: {e}") from None
            ids, mask = ids[:seq_len], mask[:seq_len]
            if not any(mask[1:]):
                continue  # its answers start past seq_len: nothing to learn from this row
            pad = seq_len - len(ids)
            rows.append(ids + [tokenizer.eos_id] * pad)
            masks.append(mask + [0] * pad)
        if not rows:
            raise DataError(f"no conversation has an assistant answer within seq_len={seq_len} tokens")
        return cls(np.asarray(rows, np.int32), np.asarray(masks, np.int32), seed, shuffle)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], seq_len: int, tokenizer=None, seed: int = 0,
                   shuffle: bool = True) -> ChatDataset:
        if not paths:
            raise DataError("no data files given")
        pairs = [(f"{os.fspath(p)}:{n}", m) for p in paths for n, m in read_conversations(p)]
        return cls.from_conversations([m for _, m in pairs], seq_len, tokenizer, seed, shuffle,
                                      labels=[label for label, _ in pairs])

    def __len__(self) -> int:
        return self.tokens.shape[0]

    order = PackedDataset.order
    sequence_ids = PackedDataset.sequence_ids

    def batch(self, position: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream items `position ..`: (tokens, loss mask), each (batch_size, seq_len) int32."""
        ids = self.sequence_ids(position, batch_size)
        return self.tokens[ids], self.mask[ids]


def is_chat_file(path: str | os.PathLike) -> bool:
    """Whether a `.jsonl` file's first record is a conversation (`"messages"`) rather than a `"text"`."""
    path = os.fspath(path)
    if not path.endswith(".jsonl") or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and "messages" in record
    return False


def load_dataset(paths: Sequence[str | os.PathLike], seq_len: int, tokenizer=None, seed: int = 0):
    """`ChatDataset` when the files hold conversations, `PackedDataset` when they hold text; not both."""
    chat = [is_chat_file(p) for p in paths]
    if any(chat) and not all(chat):
        raise DataError("mix of chat (\"messages\") and text files; train on one kind at a time")
    if chat and all(chat):
        return ChatDataset.from_files(paths, seq_len, tokenizer, seed)
    return PackedDataset.from_files(paths, seq_len, tokenizer, seed)
