"""Claiming free memory, which is how the fallback wipes it: the kernel clears every page
it hands to a process.

Written by hand on libc's mmap and madvise (mman.py), because Python's own `mmap`
holds the GIL while the kernel populates a mapping (measured: a 64 MiB chunk under TCG
kept every other thread of the daemon, the one that enforces the stage deadline among
them, off the CPU for most of a second). A ctypes call releases the GIL, so several
threads populate at once (one per CPU: clearing pages is CPU work) and the rest of the
daemon runs meanwhile. No library we use claims memory.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from killcord import mman

MAX_THREADS = 4  # past a few, clearing pages is bound by memory bandwidth, not CPUs


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
    error: str
    threads: int

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
        self.error = ""


def claim_until(budget: int, chunk: int, deadline: float, room: Callable[[int], bool],
                threads: int | None = None) -> Claimed:
    """Claim up to `budget` bytes in chunks from `threads` threads at once, until the
    deadline or until `room(inflight + next)` says the machine cannot spare it (the caller's
    reserve). Returns by the deadline; a thread still inside the kernel then lets its chunk
    go when it returns, uncounted."""
    threads = threads or max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))
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
                    pool.stop, pool.error = True, exc.strerror or str(exc)
                    pool.inflight -= n
                return
            with pool.lock:
                pool.inflight -= n
                if not pool.stop:
                    pool.chunks.append(c)
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
        return Claimed(list(pool.chunks), pool.error, threads)
