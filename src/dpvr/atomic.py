"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the complete new one,
never a half-written one. Every file dpvr writes goes through here; `locked` serialises processes that
would otherwise compute the same file side by side."""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Callable

from dpvr.errors import DPVRError


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """write(tmp) fills a temp file in the same directory (same filesystem), which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode open() would have
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _umask() -> int:
    """The process's umask (os has no getter: set it and set it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@contextlib.contextmanager
def locked(target: str | os.PathLike):
    """An exclusive advisory lock for computing `target` (a file or folder), held for the block: a flock on
    `.NAME.lock` beside it (its folder made if need be), released by the OS if the process dies."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def held_or_refused(target: str | os.PathLike, user: str, hint: str):
    """Like `locked`, but a target already held by another process is refused at once in one line (it
    names the target and `hint`) instead of waited for. The OS drops the flock when its holder exits,
    however it exits, so a lock file a killed process left behind never blocks."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DPVRError(f"{target} is in use by another {user} (its lock {f.name} is held); {hint}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
