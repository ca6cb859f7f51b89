"""Who holds which KV page: one `PagePool` per sequence shard (a free list, reference counts, and the
prefix cache), host-side bookkeeping for `mixtral_jax.model.kv_cache.PagedKVCache`.

Prefix cache: a full page is keyed by a hash of its tokens and of everything before it (`page_keys`, a
chain: a key names the whole prefix up to the page's end), so a later sequence whose tokens start the same
way reuses those pages instead of computing them again (a repeated system prompt is prefilled once; the
`n` choices of one request share their prompt). Shared pages are reference counted; a page no sequence
holds stays cached, and is the first to go when a fresh page is needed, least recently used first.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np


def page_keys(tokens: Sequence[int], page_size: int, parent: bytes = b"") -> list[bytes]:
    """The key of each full page of `tokens` (a partial last page has none): a digest of the page's tokens
    and its predecessor's key. `parent`: the key of the page before `tokens[0]`, to extend a chain."""
    keys = []
    arr = np.asarray(tokens, np.int64)
    for i in range(len(tokens) // page_size):
        parent = hashlib.blake2b(parent + arr[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys


class PagePool:
    """One sequence shard's pages, numbered 0 .. num_pages - 1 (local ids, as the page tables hold them).

    A page is free (never used, or its cached content evicted), held (reference count > 0: in sequences'
    page tables), or cached and idle (count 0, content still valid under its key; `allocate` reclaims the
    least recently used of these when no free page is left)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: page 0 first
        self._refs = np.zeros(num_pages, np.int64)
        self._key_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld; oldest first

    @property
    def available(self) -> int:
        """Pages `allocate` can still hand out (free ones and idle cached ones)."""
        return len(self._free) + len(self._idle)

    @property
    def held(self) -> int:
        return self.num_pages - self.available

    @property
    def cached(self) -> int:
        """Pages whose content is in the prefix cache (held or idle)."""
        return len(self._key_of)

    def allocate(self) -> int | None:
        """A page for one sequence (count 1), or None when every page is held."""
        if self._free:
            page = self._free.pop()
        elif self._idle:
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
        else:
            return None
        self._refs[page] = 1
        return page

    def release(self, page: int) -> None:
        """One holder lets go; an unheld page stays cached (idle) if it has a key, else becomes free."""
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not held")
        self._refs[page] -= 1
        if self._refs[page] == 0:
            if page in self._key_of:
                self._idle[page] = None
            else:
                self._free.append(page)

    def match(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, have cached pages (nothing is taken)."""
        n = 0
        while n < len(keys) and keys[n] in self._page_of:
            n += 1
        return n

    def take(self, keys: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest matching prefix of `keys`, each now held once more."""
        pages = [self._page_of[k] for k in keys[:self.match(keys)]]
        for page in pages:
            if self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1
        return pages

    def register(self, page: int, key: bytes) -> None:
        """A held page is full and its content is the prefix `key` names: share it from now on. When another
        page already holds that prefix the page stays private (and is freed, not cached, when let go)."""
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key

    def refs(self, page: int) -> int:
        return int(self._refs[page])
