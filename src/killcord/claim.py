"""Claiming free memory, which is how the fallback wipes it: the kernel clears every page
it hands to a process.

Written by hand on libc's mmap and madvise (mman.py), because Python's own `mmap`
holds the GIL while the kernel populates a mapping (measured: a 64 MiB chunk under TCG
kept every other thread of the daemon, the one that enforces the stage deadline among
them, off the CPU for most of a second). A ctypes call releases the GIL, so several
threads populate at once and the rest of the daemon runs meanwhile. No library we use
claims memory.

And in a child process (in_child), not in the daemon: populating holds the address
space's mmap lock, and near the end of free memory the kernel took seconds over a single
chunk (4.2 s for 16 MiB, measured under TCG). Meanwhile any thread of the same process
that maps or unmaps memory (Python growing or trimming its heap) waits for that lock while
holding the GIL, and every other thread stops: the stage deadline's thread did not wake
for 7 to 12 s. A child has an address space of its own; the daemon only reads its reports
from a pipe, and powers off at its deadline whatever the child is doing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import struct
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from killcord import mman

MAX_THREADS = 4  # past a few, clearing pages is bound by memory bandwidth, not CPUs
# What the child reports, one record per write (atomic on a pipe): a chunk's size and how
# long the kernel took over it; size 0: finished; a negative size: -errno, the claim failed.
RECORD = struct.Struct("=qd")
# The parent forks from one thread of several. The child runs only this module's code (no
# lock another thread may hold: no logging, no imports), so Python's warning about it
# (3.12 and newer) is noise, and formatting a warning could read source files.
warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning)


@dataclass(frozen=True)
class Chunk:
    """One claimed mapping: where, how large, and when the kernel was asked and answered."""

    address: int
    size: int
    started: float
    ended: float


class ClaimError(OSError):
    pass


def claim(size: int) -> Chunk:
    """Map `size` bytes of anonymous memory and have every page faulted in (cleared by the
    kernel), without holding the GIL. Under mlockall(MCL_FUTURE) the mmap itself populates;
    MADV_POPULATE_WRITE then finds the pages present, or reports those it could not get."""
    started = time.monotonic()
    address = mman.mmap(None, size, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS, -1, 0)
    if address in (None, mman.MAP_FAILED):
        err = ctypes.get_errno()
        raise ClaimError(err, os.strerror(err))
    if mman.madvise(address, size, mman.MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        mman.munmap(address, size)
        raise ClaimError(err, os.strerror(err))
    return Chunk(address, size, started, time.monotonic())


def release(chunks: list[Chunk]) -> None:
    for c in chunks:
        mman.munmap(c.address, c.size)


@dataclass
class Claimed:
    chunks: list[Chunk]
    threads: int
    errno: int = 0  # why claiming stopped early, 0 for no error

    @property
    def error(self) -> str:
        return os.strerror(self.errno) if self.errno else ""

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.chunks)

    @property
    def slowest_s(self) -> float:
        return max((c.ended - c.started for c in self.chunks), default=0.0)


class _Pool:
    def __init__(self, budget: int) -> None:
        self.lock = threading.Lock()
        self.chunks: list[Chunk] = []
        self.left = budget
        self.inflight = 0
        self.stop = False
        self.errno = 0


def default_threads() -> int:
    """One per CPU but one, which is left to the daemon and the kernel (with every CPU
    populating, the stage deadline's thread waited seconds for one), at least one, at most
    MAX_THREADS."""
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0)) - 1))


def claim_until(budget: int, chunk: int, deadline: float, room: Callable[[int], bool],
                threads: int | None = None, on_chunk: Callable[[Chunk], None] | None = None) -> Claimed:
    """Claim up to `budget` bytes in chunks from `threads` threads at once, until the
    deadline or until `room(inflight + next)` says the machine cannot spare it (the caller's
    reserve). Returns by the deadline; a thread still inside the kernel then lets its chunk
    go when it returns, uncounted. `on_chunk` is told of each chunk kept, in order."""
    threads = threads or default_threads()
    pool = _Pool(budget)

    def worker() -> None:
        while True:
            with pool.lock:
                n = min(chunk, pool.left)
                if pool.stop or n <= 0 or time.monotonic() >= deadline or not room(pool.inflight + n):
                    return
                pool.left -= n
                pool.inflight += n
            try:
                c = claim(n)
            except ClaimError as exc:
                with pool.lock:
                    pool.stop, pool.errno = True, exc.errno or errno.EIO
                    pool.inflight -= n
                return
            with pool.lock:
                pool.inflight -= n
                if not pool.stop:
                    pool.chunks.append(c)
                    if on_chunk is not None:
                        on_chunk(c)
                    continue
            release([c])  # the caller has its answer already
            return

    workers = [threading.Thread(target=worker, name=f"claim-{i}", daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(max(0.0, deadline - time.monotonic()))
    with pool.lock:
        pool.stop = True
        return Claimed(list(pool.chunks), threads, pool.errno)


def rss_anon(path: str = "/proc/self/status") -> int:
    """Resident anonymous memory of a process (this one by default), in bytes, as the
    kernel counts it."""
    with open(path) as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Held:
    """Memory claimed by a child process, which holds it until it is released (or the
    machine goes down)."""

    pid: int
    bytes: int = 0
    chunks: int = 0
    slowest_s: float = 0.0
    error: str = ""
    threads: int = 1
    resident: int = 0  # how much more anonymous memory the kernel says the child holds
    finished: bool = False  # the child stopped by itself (budget, room or error), not cut off

    def release(self) -> None:
        """Kill the child and reap it: its memory goes back to the kernel."""
        if self.pid <= 0:
            return  # no child was started (kill(0) would be this whole process group)
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def in_child(budget: int, chunk: int, deadline: float, room: Callable[[int], bool],
             threads: int | None = None) -> Held:
    """claim_until in a child process (see the module's docstring for why), which keeps
    what it claimed until released. Returns by the deadline with what the child reported
    by then; `room` runs in the child."""
    threads = threads or default_threads()
    baseline = rss_anon()  # the child starts with the parent's anonymous pages mapped
    try:
        r, w = os.pipe()
    except OSError as exc:
        return Held(0, threads=threads, error=f"pipe: {exc.strerror}")
    try:
        pid = os.fork()
    except OSError as exc:  # out of tasks or memory: nothing claimed, and the caller goes on
        os.close(r)
        os.close(w)
        return Held(0, threads=threads, error=f"fork: {exc.strerror}")
    if pid == 0:  # the child: never returns into the caller
        try:
            os.close(r)
            _child(budget, chunk, deadline, room, threads, w)
        finally:
            os._exit(0)
    os.close(w)
    held = Held(pid, threads=threads)
    try:
        _gather(r, deadline, held)
    finally:
        os.close(r)
    try:
        held.resident = max(0, rss_anon(f"/proc/{pid}/status") - baseline)
    except OSError:
        held.resident = 0
    return held


def _child(budget: int, chunk: int, deadline: float, room: Callable[[int], bool], threads: int, w: int) -> None:
    parent = os.getppid()
    # The out-of-memory killer's first choice, should it come to that: not the daemon (the
    # child inherits its -1000), nor a kernel panic for want of anything killable.
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"1000")
        finally:
            os.close(fd)
    except OSError:
        pass

    def report(size: int, seconds: float) -> None:
        # The parent stops reading at its deadline and closes its end: a write then fails
        # (EPIPE), and the child must go on holding what it claimed all the same.
        try:
            os.write(w, RECORD.pack(size, seconds))
        except OSError:
            pass

    got = claim_until(budget, chunk, deadline, room, threads, on_chunk=lambda c: report(c.size, c.ended - c.started))
    report(-got.errno, 0.0)
    os.close(w)
    while os.getppid() == parent:  # hold the memory while the parent lives
        time.sleep(1)


def _gather(r: int, deadline: float, held: Held) -> None:
    poller = select.poll()
    poller.register(r, select.POLLIN)
    buf = b""
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0 or not poller.poll(left_ms):
            return  # the deadline: what the child is still doing is not counted
        data = os.read(r, 4096)
        if not data:
            return  # the child is gone
        buf += data
        while len(buf) >= RECORD.size:
            size, seconds = RECORD.unpack_from(buf)
            buf = buf[RECORD.size:]
            if size > 0:
                held.bytes += size
                held.chunks += 1
                held.slowest_s = max(held.slowest_s, seconds)
                continue
            held.finished = True
            if size < 0:
                held.error = os.strerror(-size)
            return
