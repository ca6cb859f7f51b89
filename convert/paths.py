"""One place for paths that may be local or a URL (`gs://bucket/...`, or any scheme `etils.epath` opens).

Local paths are made absolute and handled with `os` (so the atomic install keeps its renames, fsyncs and
locks); a URL is kept as written (never `os.path.abspath`ed into a local folder) and read through
`etils.epath`, which for `gs://` is `gcsfs` (the `gcs` extra). Orbax writes array data to a URL through
tensorstore itself. Object stores have no directories and no rename: `convert.atomic` says what stands in
for them there.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from typing import IO

import fsspec
from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path) -> bool:
    """`gs://b/x`, `s3://...`, `memory://...`: anything with a scheme (a plain `C:/x` has none)."""
    return bool(_URL.match(str(os.fspath(path))))


def normalize(path) -> str:
    """An absolute local path, or the URL as written without a trailing slash."""
    text = os.fspath(path)
    text = text if isinstance(text, str) else text.decode()
    if is_url(text):
        return text.rstrip("/") if not text.endswith("://") else text
    return os.path.abspath(text)


def join(path, *parts: str) -> str:
    text = os.fspath(path)
    if is_url(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(text, *parts)


def basename(path) -> str:
    text = os.fspath(path)
    return text.rstrip("/").rsplit("/", 1)[-1] if is_url(text) else os.path.basename(text)


def dirname(path) -> str:
    text = os.fspath(path)
    return text.rstrip("/").rsplit("/", 1)[0] if is_url(text) else os.path.dirname(text)


def _epath(path) -> epath.Path:
    return epath.Path(os.fspath(path))


def exists(path) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.lexists(os.fspath(path))


def is_dir(path) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(os.fspath(path))


def is_file(path) -> bool:
    if is_url(path):
        p = _epath(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(os.fspath(path))


def listdir(path) -> list[str]:
    """The names directly under `path` (empty when there is nothing)."""
    if is_url(path):
        p = _epath(path)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    return sorted(os.listdir(os.fspath(path))) if os.path.isdir(os.fspath(path)) else []


def glob_names(path, pattern: str) -> list[str]:
    """The names of entries of `path` matching the shell `pattern` (e.g. `*.safetensors`), sorted."""
    return [n for n in listdir(path) if fnmatch.fnmatch(n, pattern)]


def open_binary(path, mode: str = "rb") -> IO[bytes]:
    """A seekable binary file: on a bucket, reads are ranged requests (nothing is copied whole first)."""
    return _epath(path).open(mode) if is_url(path) else open(os.fspath(path), mode)  # noqa: SIM115


def size(path) -> int:
    return _epath(path).stat().length if is_url(path) else os.path.getsize(os.fspath(path))


def read_text(path) -> str:
    if is_url(path):
        return _epath(path).read_text(encoding="utf-8")
    with open(os.fspath(path), encoding="utf-8") as f:
        return f.read()


def write_text(path, text: str) -> None:
    """Write `text` at `path`; a local file is fsynced (an object is durable once its upload returns)."""
    if is_url(path):
        _epath(path).write_text(text, encoding="utf-8")
        return
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def remove_file(path) -> None:
    if is_url(path):
        p = _epath(path)
        if p.exists():
            p.unlink()
    elif os.path.lexists(os.fspath(path)):
        os.unlink(os.fspath(path))


def rmtree(path) -> None:
    if is_url(path):
        p = _epath(path)
        if p.exists():
            p.rmtree()
        return
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def walk_files(path) -> list[tuple[str, int]]:
    """(path, size) of every file under `path`."""
    if is_url(path):  # one listing request (epath refuses recursive globs on buckets)
        fs, root = fsspec.core.url_to_fs(os.fspath(path))
        return [(name, int(info.get("size") or 0)) for name, info in fs.find(root, detail=True).items()]
    out = []
    for root, _, names in os.walk(os.fspath(path)):
        for name in names:
            full = os.path.join(root, name)
            if os.path.isfile(full) and not os.path.islink(full):
                out.append((full, os.path.getsize(full)))
    return out
