"""Claiming memory the way the fallback wipes it, on this machine's real kernel."""

from __future__ import annotations

import array
import errno
import os
import threading
import time
from pathlib import Path

import pytest

from killcord import claim

MiB = 1 << 20


def test_a_claim_lets_the_rest_of_the_daemon_run() -> None:
    """While the kernel fills a chunk, other threads run Python: the stage deadline's
    thread among them. (Python's own mmap holds the GIL for the whole call: then no sample
    could fall in the call's middle half, which begins well after any switch interval.)"""
    # The samples go into memory allocated beforehand: an allocation that maps memory
    # waits for the mmap lock, which the filling holds.
    samples = array.array("d", bytes(8 * 4_000_000))
    box: list[claim.Chunk] = []
    t = threading.Thread(target=lambda: box.append(claim.claim(512 * MiB)))
    i = 0
    t.start()
    while t.is_alive() and i < len(samples):
        samples[i] = time.monotonic()
        i += 1
    t.join()
    c = box[0]
    try:
        span = c.ended - c.started
        assert span > 0.02, f"{span=}: too quick to tell on this machine"
        middle = [s for s in samples[:i] if c.started + span / 4 < s < c.ended - span / 4]
        assert middle, (span, i)
    finally:
        claim.release(box)


def test_chunks_come_from_several_threads_and_the_kernel_agrees() -> None:
    before = claim.rss_anon()
    got = claim.claim_until(96 * MiB, 16 * MiB, time.monotonic() + 30, lambda n: True, threads=2)
    try:
        assert got.threads == 2 and got.bytes == 96 * MiB and len(got.chunks) == 6 and not got.error
        assert claim.rss_anon() - before >= 0.9 * 96 * MiB
        assert 0 < got.slowest_s < 30
    finally:
        claim.release(got.chunks)
    assert claim.rss_anon() - before < 8 * MiB


def test_the_last_chunk_is_what_the_budget_has_left() -> None:
    got = claim.claim_until(40 * MiB, 16 * MiB, time.monotonic() + 30, lambda n: True, threads=1)
    try:
        assert sorted(c.size for c in got.chunks) == [8 * MiB, 16 * MiB, 16 * MiB]
    finally:
        claim.release(got.chunks)


def test_no_room_and_a_passed_deadline_claim_nothing() -> None:
    asked: list[int] = []

    def room(n: int) -> bool:
        asked.append(n)
        return False

    got = claim.claim_until(64 * MiB, 16 * MiB, time.monotonic() + 30, room, threads=2)
    assert got.bytes == 0 and asked and all(n == 16 * MiB for n in asked)
    late = claim.claim_until(64 * MiB, 16 * MiB, time.monotonic() - 1, lambda n: True, threads=2)
    assert late.bytes == 0


def test_room_is_asked_with_what_is_still_being_filled() -> None:
    """The reserve check counts chunks other threads are still filling: MemAvailable does
    not show them yet."""
    asked: list[int] = []
    lock = threading.Lock()

    def room(n: int) -> bool:
        with lock:
            asked.append(n)
        return True

    got = claim.claim_until(256 * MiB, 64 * MiB, time.monotonic() + 30, room, threads=2)
    claim.release(got.chunks)
    assert got.bytes == 256 * MiB
    assert max(asked) == 128 * MiB  # one chunk in flight on the other thread, plus the next


def test_a_refused_claim_is_an_error_with_its_reason() -> None:
    try:
        claim.claim(1 << 60)
    except claim.ClaimError as exc:
        assert exc.strerror == "Cannot allocate memory"
    else:
        raise AssertionError("an exabyte was claimed")
    got = claim.claim_until(1 << 60, 1 << 60, time.monotonic() + 30, lambda n: True, threads=1)
    assert got.bytes == 0 and got.error == "Cannot allocate memory"


def test_a_child_claims_and_holds_it_the_daemon_does_not() -> None:
    """The claim runs in a child process: its address space's lock is not the daemon's.
    The kernel counts the memory in the child, and releasing it ends the child."""
    before = claim.rss_anon()
    held = claim.in_child(96 * MiB, 16 * MiB, time.monotonic() + 30, lambda n: True, threads=2)
    try:
        assert (held.bytes, held.chunks, held.threads, held.error) == (96 * MiB, 6, 2, "")
        assert held.finished and 0 < held.slowest_s < 30
        assert held.resident >= 0.9 * held.bytes
        assert claim.rss_anon() - before < 8 * MiB  # not in this process
        assert claim.rss_anon(f"/proc/{held.pid}/status") >= 96 * MiB
        # the out-of-memory killer's first choice, not the daemon
        assert Path(f"/proc/{held.pid}/oom_score_adj").read_text().strip() == "1000"
    finally:
        held.release()
    assert not Path(f"/proc/{held.pid}").exists()


def test_the_parent_returns_at_its_deadline_whatever_the_child_does() -> None:
    """A child stuck (here: in `room`, as it could be inside the kernel) keeps nothing
    from returning by the deadline, with what was reported by then."""
    def stuck(n: int) -> bool:
        time.sleep(3600)
        return True

    began = time.monotonic()
    held = claim.in_child(64 * MiB, 16 * MiB, began + 1.0, stuck, threads=1)
    try:
        assert time.monotonic() - began < 20  # not the child's hour
        assert (held.bytes, held.finished) == (0, False)
        assert Path(f"/proc/{held.pid}").exists()
    finally:
        held.release()
    assert not Path(f"/proc/{held.pid}").exists()


def test_a_child_still_claiming_at_the_deadline_keeps_what_it_claims() -> None:
    """The parent stops listening at its deadline; the child, still busy then, finds the
    pipe closed when it reports, and holds its memory all the same (it exited on the
    broken pipe in scenario k, and the kernel's count of what it held was gone)."""
    def slow(n: int) -> bool:
        time.sleep(1.5)  # past the parent's deadline, before the child's own
        return True

    began = time.monotonic()
    held = claim.in_child(16 * MiB, 16 * MiB, began + 1.0, slow, threads=1)
    try:
        assert held.bytes == 0 and not held.finished
        time.sleep(3)  # the child claims its chunk and reports into the closed pipe
        status = Path(f"/proc/{held.pid}/status").read_text()
        assert "State:\tS" in status, status
        assert claim.rss_anon(f"/proc/{held.pid}/status") >= 16 * MiB
    finally:
        held.release()


def test_a_child_that_cannot_claim_says_why() -> None:
    held = claim.in_child(1 << 60, 1 << 60, time.monotonic() + 30, lambda n: True, threads=1)
    held.release()
    assert (held.bytes, held.finished, held.error) == (0, True, "Cannot allocate memory")


def test_one_cpu_is_left_to_the_rest() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert claim.default_threads() == max(1, min(claim.MAX_THREADS, cpus - 1))


def test_no_child_no_claim_and_the_caller_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """fork refused (out of tasks or memory): an error the caller reports, nothing raised,
    and releasing kills nothing (kill(0) would be this whole process group)."""
    def refuse() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    killed: list[int] = []
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(pid))
    held = claim.in_child(16 * MiB, 16 * MiB, time.monotonic() + 30, lambda n: True)
    held.release()
    assert (held.pid, held.bytes, held.finished) == (0, 0, False)
    assert held.error == "fork: Resource temporarily unavailable" and killed == []
