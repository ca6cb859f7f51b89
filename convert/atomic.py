"""Directories that appear whole or not at all: every checkpoint we write (converted, exported, training).

The new directory is built in a hidden sibling workspace (`.NAME.tmp-PID-RAND/`) and renamed to `NAME`
only once `check` accepts it; with `overwrite` the old `NAME` is moved aside (`.NAME.old-PID-RAND`) only
after the new one is complete, and removed last. A lock file (`.NAME.lock`, an `flock` the kernel drops
on any exit) keeps two writers from building the same `NAME` at once. A writer that died leaves only
hidden siblings, which the next writer removes, except that one killed between its two renames left
`NAME` missing and the old one complete aside: that one is put back. Renames and the parent directory
are fsynced, so a crash after `install` returns cannot lose the new directory.

On object storage (a `gs://` URL) there is no rename, no directory and no lock: the checkpoint is built in
place at `NAME`, an in-progress object (`NAME/.mixtral_jax_writing`) written first and removed last, and it
counts as complete only through its own completion marker (`marker`, written last by the caller, as
Orbax's `commit_success.txt` is), which loading requires. A writer that died leaves `NAME` without the
marker but with the in-progress object: the next writer removes it. `overwrite` removes the old marker
first (from then on the old checkpoint no longer loads) and then the old objects, before writing: on a
bucket the old checkpoint does not survive a failed replacement. Two writers into one URL at once are not
detected.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator

from mixtral_jax.errors import CheckpointError

from . import paths

IN_PROGRESS_FILE = ".mixtral_jax_writing"


def fsync_dir(path: str) -> None:
    """Make the entries of directory `path` (a rename, a new file) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durably(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _lock(parent: str, name: str, what: str) -> Iterator[None]:
    path = os.path.join(parent, f".{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CheckpointError(f"another {what} into {os.path.join(parent, name)} is running (lock {path})") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _remove_stale(parent: str, name: str, is_complete: Callable[[str], bool]) -> None:
    """Workspaces of writers that died (we hold the lock, so none is running); a complete old copy is put
    back where its writer died between moving it aside and moving the new one in."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-\d+-[0-9a-f]+$")
    stale = [os.path.join(parent, e) for e in os.listdir(parent) if pattern.match(e)]
    dst = os.path.join(parent, name)
    if not os.path.lexists(dst):
        for path in stale:
            if ".old-" in os.path.basename(path) and is_complete(path):
                os.rename(path, dst)
                stale.remove(path)
                break
    for path in stale:
        remove(path)


@contextlib.contextmanager
def atomic_directory(dst: str, *, overwrite: bool = False, is_complete: Callable[[str], bool],
                     check: Callable[[str], None] | None = None, what: str = "write",
                     marker: str | None = None) -> Iterator[str]:
    """`with atomic_directory(dst, ...) as tmp:` build the directory at `tmp`; on a clean exit it becomes
    `dst` (after `check(tmp)`, which raises if it is not right). `is_complete(path)` tells a finished
    directory of this kind (for putting back an old copy). An existing `dst` is replaced only with
    `overwrite`; callers check whether it *may* be replaced before any expensive work. `marker`: the
    completion marker the caller writes last (on a bucket the old one is removed first)."""
    if paths.is_url(dst):
        with _in_place(paths.normalize(dst), overwrite=overwrite, check=check, marker=marker) as tmp:
            yield tmp
        return
    dst = os.path.abspath(os.fspath(dst))
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    with _lock(parent, name, what):
        _remove_stale(parent, name, is_complete)
        if os.path.lexists(dst) and not overwrite:  # put back above, or made meanwhile
            raise CheckpointError(f"destination {dst} already exists; pass --overwrite (overwrite=True) to replace it")
        workspace = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        os.mkdir(workspace)
        try:
            # the directory inside has a plain name: Orbax's partial saving lists its pieces with a glob
            # that skips hidden names
            tmp = os.path.join(workspace, "build")
            yield tmp
            if check is not None:
                check(tmp)
            _install(tmp, dst, overwrite)
        finally:
            remove(workspace)


def _install(tmp: str, dst: str, overwrite: bool) -> None:
    """Move the complete directory into place; the old `dst` goes only after the new one is there."""
    if os.path.lexists(dst):
        if not overwrite:
            raise CheckpointError(f"destination {dst} appeared meanwhile; not replacing it")
        parent, name = os.path.split(dst)
        old = os.path.join(parent, f".{name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        fsync_dir(parent)
        remove(old)
    else:
        os.rename(tmp, dst)
    fsync_dir(os.path.dirname(dst))


def unfinished(dst: str, marker: str | None) -> bool:
    """True for what a writer into a bucket left when it died (the next writer replaces it unasked)."""
    return (paths.is_url(dst) and paths.exists(paths.join(dst, IN_PROGRESS_FILE))
            and not (marker and paths.exists(paths.join(dst, marker))))


@contextlib.contextmanager
def _in_place(dst: str, *, overwrite: bool, check: Callable[[str], None] | None, marker: str | None) -> Iterator[str]:
    """The object-storage stand-in for the rename (see the module docstring)."""
    in_progress = paths.join(dst, IN_PROGRESS_FILE)
    if paths.exists(dst):
        if not unfinished(dst, marker) and not overwrite:
            raise CheckpointError(f"destination {dst} already exists; pass --overwrite (overwrite=True) to replace it")
        if marker:
            paths.remove_file(paths.join(dst, marker))  # first: from here on the old checkpoint does not load
        paths.rmtree(dst)
    paths.write_text(in_progress, f"being written by process {os.getpid()} on {os.uname().nodename}\n")
    done = False
    try:
        yield dst
        if check is not None:
            check(dst)
        paths.remove_file(in_progress)
        done = True
    finally:
        if not done:
            try:
                paths.rmtree(dst)  # best effort: what remains has no marker and is removed by the next writer
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
