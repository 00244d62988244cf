"""The fallback when kexec cannot run: free, wipe and power off from the daemon itself.

Why here and not through PID 1 (systemd-shutdown returning into /run/initramfs): PID 1
must exec systemd-shutdown from the root file system, and its dynamic loader looks up
libraries in RUNPATH and glibc-hwcaps directories that do not exist. Those are negative
dentries: no open descriptor can pin them, `drop_caches` (or memory pressure) drops them,
and once the stick is gone the lookup reads squashfs directory blocks from it and fails
("Failed to execute shutdown binary, freezing: Input/output error", measured). The daemon,
by contrast, is mlockall'ed and has imported everything at start: this path execs nothing
and reads only /proc, /sys and the RAM file systems it frees.

In order, each step bounded by the stage deadline:
1. device-mapper: every table replaced by `error` (dm.py): dm-crypt keys zeroed, and a
   process stuck in uninterruptible sleep on a suspended mapping wakes and dies;
2. RAM file systems (tmpfs, ramfs; this includes the live system's overlay upper layer):
   every regular file truncated, then unlinked; the pages go back to the kernel;
3. the page cache and slab caches dropped (their pages become free): begun in a thread of
   its own beside steps 1 and 2, as under init_on_free=1 it is the longest step (the kernel
   zeroes each page it drops) and needs nothing from them; waited for up to the deadline;
4. unless the kernel zeroes every page as it is freed (init_on_free=1), free memory
   claimed in chunks of anonymous memory, down to a reserve, by a child process from one
   thread per CPU but one (claim.py): the kernel zeroes every page it hands to a process,
   so claiming is wiping (and it checks that the kernel's own count of the child's
   resident anonymous memory rose by what was claimed: a wipe that took nothing does not
   say it did);
5. reboot(RB_POWER_OFF), with no sync: nothing may wait for a medium that is gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import threading
import time
from dataclasses import asdict, dataclass, field

from killcord import claim, cmdline, dm

RAM_FS_TYPES = ("tmpfs", "ramfs")
DROP_CACHES = "/proc/sys/vm/drop_caches"
MEMINFO = "/proc/meminfo"
MOUNTINFO = "/proc/self/mountinfo"
# Small enough that a chunk the kernel is slow to fill (reclaim near the reserve, a busy
# host under TCG) cannot carry the wipe far past its deadline.
CHUNK = 16 * 1024 * 1024
MIN_RESERVE = 16 * 1024 * 1024
RB_POWER_OFF = 0x4321FEDC

_libc = ctypes.CDLL(None, use_errno=True)  # resolved at import, never at fire time
_reboot = _libc.reboot
_reboot.argtypes = [ctypes.c_int]


@dataclass
class Scrubbed:
    mounts: list[str] = field(default_factory=list)
    files: int = 0
    bytes_freed: int = 0
    errors: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)  # mounts the deadline cut short


@dataclass
class Wiped:
    target_bytes: int
    claimed_bytes: int
    resident_bytes: int  # how much more anonymous memory the kernel says the claimer held (RssAnon)
    reserve_bytes: int
    seconds: float
    error: str = ""
    threads: int = 1
    slowest_chunk_s: float = 0.0  # the longest the kernel took over one chunk

    @property
    def ok(self) -> bool:
        """At least 90 % of the target claimed, and the kernel's own count agrees."""
        return (self.target_bytes > 0 and self.claimed_bytes >= 0.9 * self.target_bytes
                and self.resident_bytes >= 0.9 * self.claimed_bytes)


def ram_mounts(mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points of RAM file systems, deepest first (so a nested one is done first)."""
    found = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] in RAM_FS_TYPES:
                found.append(_unescape(left.split()[4]))
    return sorted(set(found), key=lambda m: (-m.count("/"), m))


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), path)


def scrub(mounts: list[str], deadline: float, live: bool, keep: tuple[str, ...] = ()) -> Scrubbed:
    """Truncate and unlink every regular file on these mounts, without crossing into other
    mounts and without following links. `keep`: paths left alone (none on the firing path;
    tests pass their own)."""
    out = Scrubbed()
    for mount in mounts:
        try:
            dev = os.lstat(mount).st_dev
        except OSError as exc:
            out.errors.append(f"{mount}: {exc.strerror}")
            continue
        out.mounts.append(mount)
        if not _scrub_tree(mount, dev, deadline, live, keep, out):
            out.unfinished.append(mount)
    return out


def _scrub_tree(top: str, dev: int, deadline: float, live: bool, keep: tuple[str, ...], out: Scrubbed) -> bool:
    stack = [top]
    while stack:
        if time.monotonic() > deadline:
            return False
        path = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError as exc:
            out.errors.append(f"{path}: {exc.strerror}")
            continue
        for entry in entries:
            if entry.path in keep:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != dev:
                continue  # another mount below this one: done on its own, or not ours
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                out.files += 1
                out.bytes_freed += st.st_blocks * 512
                if live:
                    _free_file(entry.path, out)
    return True


def _free_file(path: str, out: Scrubbed) -> None:
    try:
        # O_NOFOLLOW|O_NONBLOCK: a file swapped for a link or a FIFO meanwhile is not opened
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        if len(out.errors) < 20:
            out.errors.append(f"{path}: {exc.strerror}")
    try:
        os.unlink(path)  # the inode and its name go too (held open: freed at last close)
    except OSError:
        pass


def meminfo(path: str = MEMINFO) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


class CacheDrop:
    """`echo 3 > /proc/sys/vm/drop_caches` through the descriptor opened at arm time, from a
    thread of its own: under init_on_free=1 the kernel zeroes every page it drops, 1.5 to
    6 s under TCG (steps_ms in CI's fallback scenarios), which ran a Debian 12 guest's
    poweroff stage past its deadline until sysrq powered it off. The write cannot be
    interrupted; at the deadline the fallback goes on without it, and says so."""

    UNFINISHED = "still dropping at the deadline"

    def __init__(self, fd: int | None) -> None:
        self.error = "" if fd is not None else f"{DROP_CACHES} was not opened at arm time"
        self._done = threading.Event()
        if fd is None:
            self._done.set()
            return
        self._fd = fd
        threading.Thread(target=self._drop, name="drop-caches", daemon=True).start()

    def _drop(self) -> None:
        try:
            os.pwrite(self._fd, b"3\n", 0)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
        self._done.set()

    def wait(self, deadline: float) -> str:
        """"" once the caches are dropped; otherwise why not (UNFINISHED at the deadline)."""
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            return self.UNFINISHED
        return self.error


# The live wipe's claimers, holding their memory through reboot(2): letting 1.8 GiB of
# locked pages go took 2.3 s under TCG (a fifth of claiming them), which ran the poweroff
# stage past its deadline, and nothing is gained by it on a machine that is going down.
HELD: list[claim.Held] = []


def wipe_free(deadline: float, max_bytes: int | None = None, chunk: int = CHUNK,
              keep: list[claim.Held] | None = None, threads: int | None = None) -> Wiped:
    """Claim free memory as anonymous chunks down to a reserve (1/64 of RAM, at least
    16 MiB, as the initramfs wiper keeps), in a child process (claim.in_child), then let it
    go; or, given `keep`, leave the child holding it there for the caller (the live
    fallback, which powers off holding it)."""
    start = time.monotonic()
    info = meminfo()
    reserve = max(MIN_RESERVE, info.get("MemTotal", 0) // 64)
    target = max(0, info.get("MemAvailable", 0) - reserve)
    if max_bytes is not None:
        target = min(target, max_bytes)

    def room(n: int) -> bool:
        # something else may have allocated meanwhile: never dip into the reserve
        return meminfo().get("MemAvailable", 0) - n >= reserve

    held = claim.in_child(target, chunk, deadline, room, threads)
    if keep is not None:
        keep.append(held)
    else:
        held.release()
    return Wiped(target, held.bytes, held.resident, reserve, round(time.monotonic() - start, 3),
                 held.error, held.threads, round(held.slowest_s, 3))


def power_off() -> str:
    """reboot(RB_POWER_OFF). Returns only on failure, with the reason."""
    _reboot(RB_POWER_OFF)
    return os.strerror(ctypes.get_errno() or errno.EPERM)


@dataclass(frozen=True)
class Handles:
    """What the fallback opens or learns at arm time, so that the firing path looks
    nothing up."""

    dm_control: int | None
    drop_caches: int | None
    freed_zeroed: bool = False  # cmdline.frees_zeroed() of this boot

    @classmethod
    def open(cls, live: bool) -> Handles:
        if not live:
            return cls(None, None)
        try:
            drop = os.open(DROP_CACHES, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            drop = None
        try:
            zeroed = cmdline.frees_zeroed(cmdline.read_proc())
        except OSError:
            zeroed = False
        return cls(dm.open_control(), drop, zeroed)


def run(handles: Handles, deadline: float, live: bool) -> tuple[bool, dict[str, object]]:
    """Steps 1-4 (live) or what they would touch (dry-run: mounts and files counted, nothing
    freed or claimed). Returns (wiped, detail); the caller powers off."""
    detail: dict[str, object] = {}
    # how long each step took: the deadline is shared, and a step that ate it shows here
    steps_ms: dict[str, float] = {}
    detail["steps_ms"] = steps_ms
    mark = time.monotonic()

    def took(step: str) -> None:
        nonlocal mark
        now = time.monotonic()
        steps_ms[step] = round((now - mark) * 1000, 1)
        mark = now

    dropping = CacheDrop(handles.drop_caches) if live else None
    if live:
        released = dm.release_all(handles.dm_control, min(1.0, max(0.1, (deadline - time.monotonic()) / 4)))
        detail["dm"] = [asdict(r) for r in released]
        took("dm")
        _wait_for_stragglers(min(deadline, time.monotonic() + 0.5))
        took("stragglers")
    scrubbed = scrub(ram_mounts(), deadline, live)
    detail["scrubbed"] = {**asdict(scrubbed), "errors": scrubbed.errors[:5]}
    took("scrub")
    if dropping is None:
        detail["would"] = ("release every device-mapper table, free the files above, drop caches, "
                           "claim free memory, reboot(RB_POWER_OFF)")
        return True, detail
    dropped = dropping.wait(deadline)
    detail["drop_caches_error"] = dropped
    took("drop_caches")  # what the drop took beyond the steps above
    freed = not scrubbed.unfinished and not dropped
    if handles.freed_zeroed:
        # The kernel zeroed each page as it was freed: the files, the caches and the dead
        # processes' memory just now, the rest since boot. Claiming would zero zeros, for
        # seconds under emulation that the deadline may no longer have (scenario k).
        detail["wiped"] = {"skipped": "init_on_free=1: every page was zeroed as it was freed", "ok": True}
        return freed, detail
    wiped = wipe_free(deadline, keep=HELD)
    detail["wiped"] = {**asdict(wiped), "ok": wiped.ok}
    took("wipe")
    return wiped.ok and freed, detail


def _wait_for_stragglers(until: float) -> None:
    # Processes that were stuck on a mapping now get EIO and die of their pending SIGKILL;
    # give them a moment so that their memory is free before the wipe.
    while time.monotonic() < until:
        if not any(_in_d_state(p) for p in os.listdir("/proc") if p.isdigit()):
            return
        time.sleep(0.02)


def _in_d_state(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    rest = data[data.rfind(b")") + 2:]
    fields = rest.split()
    # kernel threads (PF_KTHREAD, flags bit 0x200000) may sleep in D legitimately
    return bool(fields) and fields[0] == b"D" and not int(fields[6]) & 0x200000
