"""Resident memory of memory-mapped checkpoint files, and how the readers give it back.

Pages of a memory-mapped file count in a process's resident memory once touched, until unmapped. A
converter reading 93 GB through maps would look (and, under a cgroup limit, be charged) as if it held
them all. MADV_DONTNEED on a clean read-only mapping only drops them from this process (the page cache
keeps them; touching them again reads them back), so it is safe even while views exist.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_PAGE = mmap.PAGESIZE


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def drop_range(address: int, length: int) -> None:
    """Drop the whole pages inside [address, address + length) of a read-only mapping."""
    if _MADV_DONTNEED is None or length <= 0:
        return
    start = -(-address // _PAGE) * _PAGE
    end = (address + length) // _PAGE * _PAGE
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED))


def drop_mapping(mapping: mmap.mmap | None) -> None:
    """Drop every resident page of a read-only `mmap.mmap` (None: nothing mapped yet)."""
    if mapping is None or _MADV_DONTNEED is None:
        return
    try:
        mapping.madvise(_MADV_DONTNEED)
    except (OSError, ValueError):
        pass
