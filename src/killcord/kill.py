"""The KILL stage: kill every process but PID 1, kernel threads and ourselves, fast.

Order (why): SIGSTOP everyone first so nothing can fork or react while we work (the kernel
also delivers a kill(-1) signal to children forked concurrently), snapshot the frozen set
for the report, SIGKILL everyone, then rescan /proc and SIGKILL stragglers one by one until
nothing is left or the deadline passes.

Without waiting (wait=False, the kexec path): the two broadcasts only, not even the snapshot
(a /proc scan took 66-137 ms under TCG, all of it before the keys stage). Every
process then holds a pending SIGKILL and runs no more user code; waiting for their exits
(which zero their memory under init_on_free) would only delay the jump, and the kexec
target clears all RAM anyway. If the jump fails, the fallback first calls finish(), which
waits for them, so that their memory is free before it wipes.

Everything this module needs is imported here: the firing path must never import.
/proc is read by hand rather than through psutil: psutil does not expose the PF_KTHREAD flag
(the only reliable kernel-thread test) and its per-process objects are too slow for this
hot path.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from killcord import arm_fds
from killcord.events import Outcome

PF_KTHREAD = 0x00200000  # include/linux/sched.h: "I am a kernel thread"
KTHREADD_PID = 2
_PROC = "/proc"
# A stat line is short (comm is at most 64 bytes); we only need the fields up to num_threads.
_STAT_READ = 4096
# Pause between straggler sweeps: long enough to let SIGKILLed tasks finish exiting,
# short enough to keep the loop tight.
_SWEEP_PAUSE_S = 0.0002
# The pause doubles each sweep up to this: the dying need the CPU to finish exiting (freeing,
# and zeroing under init_on_free, their memory); a tight rescan loop would starve them.
_SWEEP_PAUSE_MAX_S = 0.02
_DEAD_STATES = frozenset(b"ZXx")  # zombie / dead (x: pre-4.14 spelling)


class StatFields(NamedTuple):
    """The few /proc/PID/stat fields we act on."""

    pid: int
    comm: bytes
    state: str
    ppid: int
    flags: int
    num_threads: int
    starttime: int = 0  # clock ticks after boot (CLOCK_BOOTTIME)


def parse_stat(line: bytes | str) -> StatFields:
    """Parse one /proc/PID/stat line.

    comm (field 2) is free text chosen by the process: it may hold spaces, '(' and ')', so
    split at the LAST ')' - every field after it is a number or a state letter.
    Raises ValueError on a malformed line.
    """
    data = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
    head, sep, tail = data.rpartition(b")")
    pid_text, open_paren, comm = head.partition(b" (")
    if not sep or not open_paren:
        raise ValueError(f"malformed stat line: {data[:80]!r}")
    # fields after comm: [0]=state(3) [1]=ppid(4) ... [6]=flags(9) ... [17]=num_threads(20)
    fields = tail.split()
    if len(fields) < 18:
        raise ValueError(f"truncated stat line: {data[:80]!r}")
    return StatFields(
        pid=int(pid_text),
        comm=comm,
        state=chr(fields[0][0]),
        ppid=int(fields[1]),
        flags=int(fields[6]),
        num_threads=int(fields[17]),
        starttime=int(fields[19]) if len(fields) > 19 else 0,
    )


_CLK_TCK = os.sysconf("SC_CLK_TCK")


class _ProcDir:
    """`with _ProcDir() as fd`: the /proc directory the daemon holds open since arm time
    (arm_fds), or one opened now when nothing holds _PROC (the CLI firing alone, tests with
    a fake /proc). Per-process files are then opened relative to it: no path lookup from
    the root at fire time, and one descriptor for the whole scan."""

    def __init__(self) -> None:
        self._own: int | None = None

    def __enter__(self) -> int:
        held = arm_fds.held(_PROC)
        if held is not None:
            return held
        self._own = arm_fds.open_dir(_PROC)
        return self._own

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            os.close(self._own)
            self._own = None


def _read_stat(pid: int, proc: int | None = None) -> StatFields | None:
    """Read and parse PID/stat under the /proc descriptor `proc` (None: open one now);
    None if the process vanished (normal mid-scan)."""
    if proc is None:
        with _ProcDir() as fd:
            return _read_stat(pid, fd)
    try:
        fd = os.open(f"{pid}/stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    except OSError:  # ENOENT: exited and reaped since the listing
        return None
    try:
        data = os.read(fd, _STAT_READ)
    except OSError:  # ESRCH: exited between open and read
        return None
    finally:
        os.close(fd)
    try:
        return parse_stat(data)
    except ValueError:
        return None


def _is_dead(st: StatFields) -> bool:
    # A zombie leader whose other threads still run also shows Z (the main thread called
    # pthread_exit): it is alive and must be killed, so only a lone zombie counts as dead.
    return ord(st.state) in _DEAD_STATES and st.num_threads <= 1


def _scan(own_pid: int, respawn_after: int | None = None) -> list[int]:
    """Live target PIDs, in /proc order. Raises OSError only if /proc itself is unreadable.

    respawn_after (clock ticks after boot): a process started later than that is a service
    PID 1 restarted while we kill (or a child of one), not a survivor: fresh, it holds
    nothing, and the next stage ends it. Everyone else was stopped before it could fork
    (kill(-1, SIGSTOP) also reaches children forked during the broadcast)."""
    # ppid == 2 marks a kernel thread only when pid 2 really is kthreadd: inside a PID
    # namespace pid 2 is an ordinary process whose children must die.
    with _ProcDir() as proc:
        kthreadd = _read_stat(KTHREADD_PID, proc)
        kthreadd_is_kernel = kthreadd is not None and bool(kthreadd.flags & PF_KTHREAD)
        found: list[int] = []
        # scandir on a descriptor lists from its start each time (CPython rewinds it)
        with os.scandir(proc) as it:
            for entry in it:
                name = entry.name
                if not name.isdigit():
                    continue
                pid = int(name)
                if pid == 1 or pid == own_pid:
                    continue
                st = _read_stat(pid, proc)
                if st is None or st.flags & PF_KTHREAD or _is_dead(st):
                    continue
                if respawn_after is not None and st.starttime > respawn_after:
                    continue
                if kthreadd_is_kernel and (pid == KTHREADD_PID or st.ppid == KTHREADD_PID):
                    continue
                found.append(pid)
    return found


def targets(own_pid: int | None = None) -> list[int]:
    """PIDs that a kill would hit: every process but PID 1, kernel threads (PF_KTHREAD flag
    0x00200000 in /proc/PID/stat field 9, or children of kthreadd pid 2), our own thread
    group, and zombies (state Z/X)."""
    return _scan(os.getpid() if own_pid is None else own_pid)


@dataclass(frozen=True)
class KillReport:
    outcome: Outcome  # DONE (live, nothing left), DRY, TIMED_OUT (some left), FAILED
    targets: int | None  # processes found to kill at the start; None: not counted (unwaited)
    killed: int  # of those, seen gone (or zombie) at the end (live); 0 in dry-run or unwaited
    remaining: tuple[int, ...]  # pids still alive at the end (dry-run: all targets)
    rounds: int  # SIGKILL sweeps made (the kill(-1) counts as the first)
    duration_ms: float
    waited: bool = True  # False: signalled, not waited for (their exits were not watched)

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "outcome": str(self.outcome),
            "targets": self.targets,
            "killed": self.killed,
            "remaining": list(self.remaining),
            "rounds": self.rounds,
            "duration_ms": round(self.duration_ms, 3),
            "waited": self.waited,
        }
        if self.outcome is not Outcome.DRY and self.remaining:
            d["stuck"] = describe(self.remaining)
        return d


def describe(pids: tuple[int, ...], limit: int = 8) -> dict[str, str]:
    """"comm (state)" of processes a kill left: D (uninterruptible sleep) is the kernel's
    doing, anything else would be ours to explain."""
    out: dict[str, str] = {}
    with _ProcDir() as proc:
        for pid in pids[:limit]:
            st = _read_stat(pid, proc)
            if st is None:
                out[str(pid)] = "gone"
            else:
                out[str(pid)] = f"{st.comm.decode(errors='replace')} ({st.state}, {st.num_threads} threads)"
    return out


def _broadcast(send: Callable[[int, int], None], sig: int) -> None:
    """kill(-1, sig); errors are left for the per-pid sweeps to detect."""
    try:
        send(-1, sig)
    except ProcessLookupError:  # ESRCH: nothing but PID 1 and us to signal - fine
        pass
    except OSError:  # EPERM: we may signal none of them; the sweeps then say FAILED
        pass


def _run(
    deadline: float,
    live: bool,
    send: Callable[[int, int], None],
    scan: Callable[[], Iterable[int]],
    clock: Callable[[], float] = time.monotonic,
    wait: bool = True,
) -> KillReport:
    """kill_all with its effects injected (tests drive it with fakes; never a real -1)."""
    start = clock()
    if not live:
        try:
            found = list(scan())
        except OSError:
            return KillReport(Outcome.FAILED, 0, 0, (), 0, (clock() - start) * 1000)
        return KillReport(Outcome.DRY, len(found), 0, tuple(found), 0, (clock() - start) * 1000)

    _broadcast(send, signal.SIGSTOP)
    if not wait:
        # Keys and the jump come next: no scan, not even for the report.
        _broadcast(send, signal.SIGKILL)
        return KillReport(Outcome.DONE, None, 0, (), 1, (clock() - start) * 1000, waited=False)
    # Everyone is stopped now, so this snapshot is stable; it only feeds the report, and a
    # failure here must not delay the SIGKILL.
    try:
        first = set(scan())
    except OSError:
        first = set()
    # If this is refused (EPERM), the per-pid sweeps below are refused too and say FAILED.
    _broadcast(send, signal.SIGKILL)
    return _sweep(deadline, send, scan, clock, start, first)


def _sweep(
    deadline: float,
    send: Callable[[int, int], None],
    scan: Callable[[], Iterable[int]],
    clock: Callable[[], float],
    start: float,
    first: set[int] | None,
    rounds: int = 1,
) -> KillReport:
    """Rescan and SIGKILL stragglers one by one until none is left or the deadline passes.
    first: the targets found at the start (None: this sweep's first scan is the start)."""

    def report(outcome: Outcome, left: list[int]) -> KillReport:
        found = first if first is not None else set(left)
        return KillReport(outcome, len(found), len(found.difference(left)), tuple(left), rounds,
                          (clock() - start) * 1000)

    left: list[int] = []
    while True:
        try:
            left = list(scan())
        except OSError:  # /proc unreadable: we cannot see what is left
            return report(Outcome.FAILED, left)
        if first is None:
            first = set(left)
        if not left:
            return report(Outcome.DONE, left)
        if clock() >= deadline:
            return report(Outcome.TIMED_OUT, left)
        denied = 0
        for pid in left:
            try:
                send(pid, signal.SIGKILL)
            except ProcessLookupError:  # died (and was reaped) since the scan
                pass
            except PermissionError:
                denied += 1
        rounds += 1
        if denied == len(left):  # retrying cannot help: every straggler refuses us
            return report(Outcome.FAILED, left)
        time.sleep(min(_SWEEP_PAUSE_MAX_S, _SWEEP_PAUSE_S * 2 ** (rounds - 2)))


def boot_ticks() -> int:
    """Now, in the unit of /proc/PID/stat's starttime."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


def _targets_at(ticks: int) -> Callable[[], list[int]]:
    """The scan of a kill that began at boot_ticks() == ticks. One tick of margin: what is
    born while the broadcasts run is still a target; services PID 1 restarts later are not."""
    own = os.getpid()
    return lambda: _scan(own, ticks + 1)


def kill_all(deadline: float, live: bool, wait: bool = True, began: int | None = None) -> KillReport:
    """deadline is a time.monotonic() value. wait=False: signal everyone, do not wait for
    their exits (see the module's docstring); finish() waits later if it must. began: the
    boot_ticks() at which the caller started the kill (default: now)."""
    scan = _targets_at(boot_ticks() if began is None else began)
    return _run(deadline, live, os.kill, scan, wait=wait)


def finish(deadline: float, live: bool, began: int) -> KillReport:
    """After kill_all(wait=False, began=began): SIGKILL again and wait for what is still alive
    of that kill's targets, until none is left or the deadline passes."""
    scan = _targets_at(began)
    if not live:
        return _run(deadline, False, os.kill, scan)
    return _sweep(deadline, os.kill, scan, time.monotonic, time.monotonic(), None, rounds=0)
