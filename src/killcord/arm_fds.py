"""Directory descriptors the firing path needs, opened once at arm time.

The daemon holds /proc and the records directory open from arm time, so that at fire time
kill.py and audit.py resolve no path from the root: they open relative to these (openat),
and a directory that was renamed, replaced by a link, or could no longer be opened (EMFILE)
since arm time cannot blind them. Anything not held here (the CLI firing alone, tests with
a fake /proc) is opened on demand, the same way.
"""

from __future__ import annotations

import os

_held: dict[str, int] = {}


def hold(path: str, fd: int) -> None:
    """Keep `fd` (a directory opened at `path`) for the firing path; replaces an older one."""
    old = _held.get(path)
    _held[path] = fd
    if old is not None and old != fd:
        os.close(old)


def held(path: str) -> int | None:
    return _held.get(path)


def open_dir(path: str) -> int:
    """A readable directory fd (scandir needs O_RDONLY, not O_PATH)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def hold_proc(path: str = "/proc") -> int:
    fd = open_dir(path)
    hold(path, fd)
    return fd


def release_all() -> None:
    """Close every held descriptor (tests; a daemon never lets go of them)."""
    while _held:
        _, fd = _held.popitem()
        try:
            os.close(fd)
        except OSError:
            pass


def read_all(fd: int) -> bytes:
    """The whole file behind `fd`, from its start, whatever was read before (pread: a
    /proc seq_file such as /proc/slabinfo or /proc/keys restarts at offset 0)."""
    chunks: list[bytes] = []
    offset = 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
