"""Device-mapper through its ioctls: let go of every mapping without exec'ing anything.

The fallback must not run `dmsetup` (a binary on the medium, see fallback.py), so this
speaks the kernel's DM ioctl protocol itself (include/uapi/linux/dm-ioctl.h). No Python
library wraps it (pyudev and psutil do not; libdevmapper has no maintained binding), so the
few structures it needs are packed by hand here.

`release_all` replaces every mapping's table by the `error` target and resumes it, as
`dmsetup wipe_table` does:
- the old targets are destroyed: a dm-crypt target's destructor zeroes its volume key;
- I/O queued on a suspended mapping fails with EIO instead of waiting forever, so a
  process stuck in uninterruptible sleep on it wakes up and dies of the SIGKILL it already
  has; its memory is then freed and wiped like the rest.
Suspending skips the file system freeze and the flush (DM_SKIP_LOCKFS, DM_NOFLUSH): both
would write to a medium that may be gone and hang.

`wipe_crypt_keys` comes first, right after the kill, on every path: each dm-crypt mapping is
suspended (no freeze, no flush) and sent the target message `key wipe`, which overwrites its
volume key and re-keys the cipher with random bytes (what `cryptsetup luksSuspend` does). The
mapping stays suspended: its I/O waits until release_all (fallback) or the kexec ends it.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CONTROL = "/dev/mapper/control"
SYS_BLOCK = Path("/sys/block")

_DM_IOCTL = 0xFD
_VERSION = (4, 0, 0)  # the kernel accepts any minor it knows: 4.0.0 asks for the least
_HEADER = struct.Struct("=3I I I I i I I I Q 128s 129s 7s")  # struct dm_ioctl: 312 bytes
_SPEC = struct.Struct("=Q Q i I 16s")  # struct dm_target_spec: 40 bytes
_DM_TABLE_LOAD, _DM_DEV_SUSPEND, _DM_TABLE_STATUS, _DM_TARGET_MSG = 9, 6, 12, 14
_SUSPEND, _SKIP_LOCKFS, _NOFLUSH = 1 << 1, 1 << 10, 1 << 11
_BUFFER = 16 * 1024  # room for the table status of a mapping with many targets


def _iowr(nr: int) -> int:
    return (3 << 30) | (_HEADER.size << 16) | (_DM_IOCTL << 8) | nr


@dataclass(frozen=True)
class Released:
    name: str
    targets: tuple[str, ...]  # the target types it had, e.g. ("crypt",)
    ok: bool
    error: str = ""


def open_control() -> int | None:
    """Opened at arm time: the firing path then looks nothing up."""
    try:
        return os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None  # no device-mapper in this kernel: nothing to release


def _header(name: str, flags: int = 0, data_size: int = _HEADER.size, target_count: int = 0) -> bytes:
    return _HEADER.pack(*_VERSION, data_size, _HEADER.size, target_count, 0, flags, 0, 0, 0,
                        name.encode()[:127], b"", b"")


def _ioctl(fd: int, nr: int, buf: bytes, size: int | None = None) -> bytes:
    data = bytearray(buf.ljust(size or len(buf), b"\0"))
    if size:
        struct.pack_into("=I", data, 12, size)  # data_size: what the kernel may fill in
    fcntl.ioctl(fd, _iowr(nr), data, True)
    return bytes(data)


def table(fd: int, name: str) -> tuple[tuple[int, str], ...]:
    """(start sector, target type) of each target of a mapping's live table (DM_TABLE_STATUS)."""
    out = _ioctl(fd, _DM_TABLE_STATUS, _header(name), _BUFFER)
    fields = _HEADER.unpack_from(out)
    count, start = fields[5], fields[4]
    found: list[tuple[int, str]] = []
    offset = start
    for _ in range(count):
        sector, _, _, nxt, kind = _SPEC.unpack_from(out, offset)
        found.append((sector, kind.split(b"\0", 1)[0].decode(errors="replace")))
        offset = start + nxt  # for status replies `next` counts from data_start
    return tuple(found)


def targets(fd: int, name: str) -> tuple[str, ...]:
    """The target types of a mapping's live table."""
    return tuple(kind for _, kind in table(fd, name))


def wipe_key(fd: int, name: str, sectors: tuple[int, ...]) -> None:
    """Suspend the mapping (no freeze, no flush), then send `key wipe` to its crypt target
    at each of `sectors`: dm-crypt accepts the message only while suspended."""
    _ioctl(fd, _DM_DEV_SUSPEND, _header(name, flags=_SUSPEND | _SKIP_LOCKFS | _NOFLUSH))
    for sector in sectors:
        msg = struct.pack("=Q", sector) + b"key wipe\0"  # struct dm_target_msg, then the text
        msg += b"\0" * (-len(msg) % 8)
        _ioctl(fd, _DM_TARGET_MSG, _header(name, data_size=_HEADER.size + len(msg)) + msg)


def wipe_table(fd: int, name: str, sectors: int) -> None:
    """Load a single `error` target over the whole mapping, then resume into it."""
    spec = _SPEC.pack(0, sectors, 0, 0, b"error") + b"\0" * 8  # empty params, 8-aligned
    load = _header(name, data_size=_HEADER.size + len(spec), target_count=1) + spec
    _ioctl(fd, _DM_TABLE_LOAD, load)
    # DM_DEV_SUSPEND without DM_SUSPEND_FLAG = resume: it suspends (without freezing or
    # flushing) and swaps the new table in.
    _ioctl(fd, _DM_DEV_SUSPEND, _header(name, flags=_SKIP_LOCKFS | _NOFLUSH))


def mappings(sys_block: Path = SYS_BLOCK) -> list[tuple[str, int]]:
    """(name, size in sectors) of every mapping, from sysfs (in RAM)."""
    found = []
    for dev in sorted(sys_block.glob("dm-*")):
        try:
            found.append(((dev / "dm" / "name").read_text().strip(), int((dev / "size").read_text())))
        except (OSError, ValueError):
            continue
    return found


@dataclass(frozen=True)
class KeyWiped:
    name: str
    targets: int  # crypt targets whose key was wiped
    ok: bool
    ms: float  # from the start of the stage to this mapping's last message
    error: str = ""


def wipe_crypt_keys(fd: int | None, deadline_s: float) -> list[KeyWiped]:
    """Wipe the volume key of every dm-crypt mapping, one after the other, each in a thread
    within what is left of the deadline (a suspend waits for in-flight I/O). Mappings
    without a crypt target are left alone (release_all, later, takes them all)."""
    if fd is None:
        return []
    start = time.monotonic()
    results: list[KeyWiped] = []
    for name, _ in mappings():
        try:
            sectors = tuple(sector for sector, kind in table(fd, name) if kind == "crypt")
        except OSError:
            continue  # gone since the listing, or not ours to read
        if not sectors:
            continue
        box: list[KeyWiped] = []

        def work(name: str = name, sectors: tuple[int, ...] = sectors) -> None:
            try:
                wipe_key(fd, name, sectors)
                box.append(KeyWiped(name, len(sectors), True, round((time.monotonic() - start) * 1000, 3)))
            except OSError as exc:
                box.append(KeyWiped(name, len(sectors), False, round((time.monotonic() - start) * 1000, 3),
                                    exc.strerror or str(exc)))

        worker = threading.Thread(target=work, name=f"dm-key-{name}", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline_s - (time.monotonic() - start)))
        results.append(box[0] if box else KeyWiped(name, len(sectors), False,
                                                   round((time.monotonic() - start) * 1000, 3),
                                                   f"still busy after {deadline_s} s"))
    return results


def release_all(fd: int | None, deadline_s: float) -> list[Released]:
    """Wipe the table of every mapping; each under its own share of the deadline, in a
    thread, since a resume can wait for in-flight I/O. A mapping still busy is reported."""
    if fd is None:
        return []
    results: list[Released] = []
    for name, sectors in mappings():
        box: list[Released] = []

        def work(name: str = name, sectors: int = sectors) -> None:
            try:
                kinds = targets(fd, name)
            except OSError:
                kinds = ()
            try:
                wipe_table(fd, name, sectors)
                box.append(Released(name, kinds, True))
            except OSError as exc:
                box.append(Released(name, kinds, False, exc.strerror or str(exc)))

        worker = threading.Thread(target=work, name=f"dm-{name}", daemon=True)
        worker.start()
        worker.join(deadline_s)
        results.append(box[0] if box else Released(name, (), False, f"still busy after {deadline_s} s"))
    return results
