"""Keeping the firing path in RAM, and checking that it is.

lock_all() pins this process (mlockall); mincore_file()/report() say which files
are in the page cache; memlockd_config() lists what an external memlockd should pin
for the things we exec (kexec, systemctl, ...), which our mlockall cannot cover.

mlockall, mmap and mincore come from mman.py (ctypes).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from killcord import mman

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Binaries the firing path may exec; each locked with its shared libraries.
DEFAULT_BINARIES: tuple[str, ...] = (
    "kexec",
    "systemctl",
    "/lib/systemd/systemd-shutdown",
    "/usr/lib/systemd/systemd-shutdown",
    "sh",
)

# memlockd reads lines with a 1024-byte buffer (newline included); longer lines would be split.
_MEMLOCKD_MAX_LINE = 1022

_NOT_RESIDENT_LISTED = 20


def _errno_error(what: str, path: str | None = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", path)


# ---- this process ----


def lock_all() -> None:
    """mlockall(MCL_CURRENT | MCL_FUTURE): everything mapped now and later stays in RAM."""
    if mman.mlockall(mman.MCL_CURRENT | mman.MCL_FUTURE) != 0:
        raise _errno_error("mlockall(MCL_CURRENT | MCL_FUTURE) failed")


def locked_kib(pid: str = "self") -> int:
    """VmLck of a process in KiB; 0 where the kernel reports none (kernel threads)."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    return 0


# ---- page-cache residency ----


@dataclass(frozen=True)
class FileResidency:
    path: str
    pages: int
    resident: int

    @property
    def ok(self) -> bool:
        return self.resident == self.pages


def _count_resident(addr: int, length: int, pages: int, path: str) -> int:
    vec = (ctypes.c_ubyte * pages)()
    if mman.mincore(addr, length, vec) != 0:
        raise _errno_error("mincore failed", path)
    # only the low bit is defined; the others are reserved
    return sum(b & 1 for b in bytes(vec))


def mincore_file(path: str) -> FileResidency:
    """How many of the file's pages are in the page cache. Mapping does not fault them in."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # its OSError already names the path
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(22, "not a regular file", path)  # EINVAL, as mmap would say
        if st.st_size == 0:
            return FileResidency(path, 0, 0)  # mmap of length 0 is EINVAL; nothing to hold
        pages = -(-st.st_size // PAGE_SIZE)
        addr = mman.mmap(None, st.st_size, mman.PROT_READ, mman.MAP_SHARED, fd, 0)
        if addr is None or addr == mman.MAP_FAILED:
            raise _errno_error("mmap failed", path)
        try:
            return FileResidency(path, pages, _count_resident(addr, st.st_size, pages, path))
        finally:
            mman.munmap(addr, st.st_size)
    finally:
        os.close(fd)


def report(paths: Iterable[str]) -> dict[str, object]:
    """Residency summary; a file that cannot be examined goes to "errors", never raises.

    "files" counts the files examined (errors excluded); "not_resident" lists at most 20,
    "not_resident_count" says how many there were.
    """
    files = pages = resident = 0
    not_resident: list[str] = []
    errors: dict[str, str] = {}
    for path in paths:
        try:
            r = mincore_file(path)
        except (OSError, ValueError) as e:  # ValueError: a NUL in the path
            errors[path] = str(e)
            continue
        files, pages, resident = files + 1, pages + r.pages, resident + r.resident
        if not r.ok:
            not_resident.append(path)
    return {
        "files": files,
        "pages": pages,
        "resident_pages": resident,
        "not_resident": not_resident[:_NOT_RESIDENT_LISTED],
        "not_resident_count": len(not_resident),
        "errors": errors,
    }


# ---- what to keep resident ----


def _maps_path(line: str) -> str | None:
    # "start-end perms offset dev inode   pathname"; the path may hold spaces, hence maxsplit
    fields = line.rstrip("\n").split(maxsplit=5)
    if len(fields) < 6 or not fields[5].startswith("/") or fields[4] == "0":
        return None  # anonymous, [heap]/[stack]/[vdso]..., or not file-backed
    path = fields[5]
    if path.endswith(" (deleted)"):
        return None  # replaced on disk (an upgrade): the file there now is not what we run
    return path


def mapped_files(pid: str = "self") -> list[str]:
    """Regular files mapped by a process (libraries, the interpreter, locale data), sorted.

    Read from /proc/PID/maps rather than psutil.memory_maps(): that reads smaps (far
    slower) and strips " (deleted)" when a new file sits at the old path, which is the
    case we must exclude.
    """
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
        candidates = {p for line in f if (p := _maps_path(line)) is not None}
    return sorted(p for p in candidates if os.path.isfile(p))


def killcord_files() -> list[str]:
    """The killcord package's own sources and compiled extensions, sorted."""
    package = Path(__file__).resolve().parent
    found = {str(p) for pattern in ("*.py", "*.so") for p in package.rglob(pattern) if p.is_file()}
    return sorted(found)


def _resolve_binary(name: str) -> str | None:
    path = name if os.path.isabs(name) else shutil.which(name)
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return None
    return path


def _expressible(path: str) -> bool:
    # memlockd takes the whole line as the path: no newlines, and within its buffer
    return "\n" not in path and len(path.encode("utf-8", "surrogateescape")) <= _MEMLOCKD_MAX_LINE


def _add(entries: dict[str, bool], path: str, with_libs: bool) -> None:
    """Key by realpath so /bin/sh and /usr/bin/dash, /lib and /usr/lib count once."""
    real = os.path.realpath(path)
    # empty files: memlockd's mmap of length 0 fails and only logs an error
    if not _expressible(real) or not os.path.isfile(real) or os.path.getsize(real) == 0:
        return
    entries[real] = entries.get(real, False) or with_libs


def firing_path(binaries: Iterable[str] = DEFAULT_BINARIES, pid: str = "self") -> dict[str, bool]:
    """What must stay in RAM for when the medium is gone, realpath -> also its libraries:
    the interpreter, the files `pid` maps (the daemon's libraries, whole: memlockd locks
    whole files), killcord's own files (for `killcord panic` without a daemon) and the
    fallback's binaries. Every path exists now and appears once, in that order."""
    entries: dict[str, bool] = {}  # insertion-ordered
    _add(entries, os.path.realpath(sys.executable), True)
    for path in mapped_files(pid):
        _add(entries, path, False)
    for path in killcord_files():
        _add(entries, path, False)
    for name in binaries:
        resolved = _resolve_binary(name)
        if resolved is not None:
            _add(entries, resolved, True)
    return entries


def memlockd_config(binaries: Iterable[str] = DEFAULT_BINARIES, pid: str = "self") -> str:
    """A memlockd.cfg of firing_path(): "/path" locks a file, "+/path" also the libraries
    ldd lists for it."""
    python = os.path.realpath(sys.executable)
    entries = firing_path(binaries, pid)
    header = [
        "# generated by `killcord memlock-config`; regenerate after upgrading python or killcord",
        f"# for python {python} ({sys.version.split()[0]})",
        "# '+' also locks the shared libraries ldd lists (needs memlockd -u USER, Debian's default)",
    ]
    body = [("+" if with_libs else "") + path for path, with_libs in entries.items()]
    return "\n".join(header + body) + "\n"
