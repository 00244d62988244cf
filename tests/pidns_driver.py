"""Run a live killcord.kill.kill_all() against hostile victims, as PID 1 of a fresh PID namespace.

Usage (from the test suite only):
    KILLCORD_TEST_HOST_PIDNS=<host pid-ns inode> \
    unshare --pid --fork --mount-proc --kill-child python3 tests/pidns_driver.py SCENARIO

It refuses (exit 2) unless it is PID 1 of a PID namespace other than the host's: kill(-1)
must never reach the host. If this process exits for any reason, the kernel SIGKILLs
everything left in the namespace, so a failed run cannot leak victims onto the host.

Prints one JSON object, what the driver knows on its own (not from killcord) beside the report:
    "report":    kill_all's report (KILLCORD_TEST_KILL_WAIT=0: kill_all(wait=False));
    "victims":   pids of the victims that said they were running before the kill began (each
                 victim writes its own pid to a pipe);
    "late":      pids of victims that said so after the kill began (a growing tree);
    "zombies":   pids of children that had exited (code ZOMBIE_EXIT_CODE) and were not reaped
                 when the kill began: dead, so no target;
    "spawned":   pids this PID 1 forked as victims;
    "killcord":  pid of the process that ran kill_all;
    "reaped":    [pid, exit code (-N: killed by signal N)] of every process this PID 1 reaped
                 after the kill began: as init, it reaps every process whose parent died first,
                 and after kill(-1) no parent lives to reap its children;
    "empty":     whether the namespace held no process but this one within EMPTY_TIMEOUT_S;
    "survivors": processes still alive at the end, read from /proc/PID/status.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

if importlib.util.find_spec("killcord") is None:  # PYTHONPATH, when set, says which tree to test
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from killcord.kill import kill_all  # noqa: E402  (imported before firing, like the daemon)

HOST_NS_ENV = "KILLCORD_TEST_HOST_PIDNS"
WAIT_ENV = "KILLCORD_TEST_KILL_WAIT"
READY_TIMEOUT_S = 20.0
REPORT_TIMEOUT_S = 15.0
EMPTY_TIMEOUT_S = 5.0
ZOMBIE_EXIT_CODE = 7

# Bounds (the namespace shares the host's process table; root ignores RLIMIT_NPROC, so every
# victim bounds itself in code).
FORKTREE_ROOTS = 4
FORKTREE_BUDGET = 80  # descendants per root: 4 * (80 + 1) = 324 processes at most
FORKTREE_FIRE_AT = 120  # fire while the trees are still growing
SPAWNERS = 4
SPAWNER_MAX_CHILDREN = 20_000  # per spawner, over its whole life
SPAWNER_MAX_LIVE = 8  # live children per spawner at any moment
BUSY_THREADS = 6

_SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(os.uname().machine)


def refuse_unless_in_child_pidns() -> None:
    host = os.environ.get(HOST_NS_ENV, "")
    try:
        own = os.stat("/proc/self/ns/pid").st_ino
    except OSError as exc:
        _refuse(f"cannot read /proc/self/ns/pid: {exc}")
    if not host.isdigit():
        _refuse(f"{HOST_NS_ENV} is not set to the host's pid-namespace inode")
    if int(host) == own:
        _refuse(f"still in the host's PID namespace (inode {own}); run under unshare --pid")
    if os.getpid() != 1:
        _refuse(f"not PID 1 of a fresh PID namespace (pid {os.getpid()}); use unshare --fork")
    # killcord scans /proc: it must be this namespace's (unshare --mount-proc), or the scan
    # would list host PIDs.
    if os.readlink("/proc/self") != "1":
        _refuse("/proc is not this namespace's procfs; use unshare --mount-proc")


def _refuse(why: str) -> None:
    print(f"pidns_driver: refusing to kill anything: {why}", file=sys.stderr)
    sys.exit(2)


# ---- victims (each runs in a forked child and never returns) ----


def _forever() -> None:
    while True:
        time.sleep(3600)


_RECORD = struct.Struct("=i")  # 4 bytes: one write(2) below PIPE_BUF is atomic


def _ready(fd: int, pid: int | None = None) -> None:
    """Say "running" with our pid (getpid() is the thread group's id, from any thread); a
    negative pid names a zombie we made."""
    os.write(fd, _RECORD.pack(os.getpid() if pid is None else pid))


_spawned: list[int] = []  # in PID 1: the victims it forked itself


def _spawn(fn: Callable[..., None], *args: object) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(0)
    if os.getpid() == 1:
        _spawned.append(pid)
    return pid


def v_forktree_node(ready: int, budget: int) -> None:
    """Fork children as fast as possible; each child gets part of the budget (tree size bound)."""
    _ready(ready)
    while budget > 0:
        share = (budget - 1) // 2
        budget -= 1 + share
        _spawn(v_forktree_node, ready, share)
    _forever()


def v_ignore_term(ready: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    _ready(ready)
    _forever()


def v_block_all(ready: int) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    _ready(ready)
    _forever()


def v_stop_handler(ready: int) -> None:
    """Catches SIGCONT/SIGTSTP (and ignores tty stops): tries to dodge stop/continue games."""
    seen: list[int] = []
    signal.signal(signal.SIGCONT, lambda s, f: seen.append(s))
    signal.signal(signal.SIGTSTP, lambda s, f: seen.append(s))
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _ready(ready)
    _forever()


def v_session_leader(ready: int) -> None:
    """Own session and process group (like a daemon), with a child in that session."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _spawn(v_ignore_term, ready)
    _ready(ready)
    _forever()


def v_own_pgrp(ready: int) -> None:
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _ready(ready)
    _forever()


def v_spawner(ready: int) -> None:
    """Spawn short-lived children as fast as possible (bounded in total and at once)."""
    live = 0
    for n in range(SPAWNER_MAX_CHILDREN):
        if live >= SPAWNER_MAX_LIVE:
            os.waitpid(-1, 0)
            live -= 1
        if os.fork() == 0:
            os._exit(0)
        live += 1
        while live:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
            if not reaped:
                break
            live -= 1
        if n == 0:
            _ready(ready)
    _forever()


def _spin() -> None:
    x = 0
    while True:
        x += 1


def v_busy_threads(ready: int) -> None:
    for _ in range(BUSY_THREADS):
        threading.Thread(target=_spin, daemon=True).start()
    _ready(ready)
    _forever()


def v_blocked_reader(ready: int, rfd: int) -> None:
    """Blocks in read(2) on a pipe whose write end PID 1 keeps open: never returns."""
    _ready(ready)
    os.read(rfd, 1)
    _forever()


def v_zombie_parent(ready: int) -> None:
    """Has a child that exited and is never reaped: a lone zombie, dead before the kill."""
    child = os.fork()
    if child == 0:
        os._exit(ZOMBIE_EXIT_CODE)
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # exited; WNOWAIT leaves it a zombie
    _ready(ready, -child)
    _ready(ready)
    _forever()


def v_zombie_leader(ready: int) -> None:
    """Main thread exits (raw SYS_exit), other threads live on: /proc/PID/stat shows Z."""
    def watcher() -> None:
        while True:  # wait until the leader is a zombie, so the victim is in its final shape
            with open("/proc/self/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[0] == b"Z":
                    break
            time.sleep(0.005)
        _ready(ready)
        _forever()

    threading.Thread(target=_spin, daemon=True).start()
    threading.Thread(target=watcher, daemon=True).start()
    ctypes.CDLL(None).syscall(_SYS_EXIT, 0)  # CDLL drops the GIL; only this thread ends


# ---- scenarios: start victims, return how many live victims' records mean "running" ----


def s_forktree(ready: int, keep: list[int]) -> int:
    for _ in range(FORKTREE_ROOTS):
        _spawn(v_forktree_node, ready, FORKTREE_BUDGET)
    return FORKTREE_FIRE_AT


def s_sigterm(ready: int, keep: list[int]) -> int:
    # Session leader first: in a fresh namespace it is PID 2 and has a child, so a kill that
    # took "child of PID 2" for a kernel thread (as on the host) would miss that child.
    _spawn(v_session_leader, ready)
    for fn in (v_ignore_term, v_ignore_term, v_block_all, v_stop_handler, v_own_pgrp):
        _spawn(fn, ready)
    return 7  # the session leader and its child both report


def s_spawner(ready: int, keep: list[int]) -> int:
    for _ in range(SPAWNERS):
        _spawn(v_spawner, ready)
    return SPAWNERS


def s_threads(ready: int, keep: list[int]) -> int:
    rfd, wfd = os.pipe()
    keep.append(wfd)  # PID 1 keeps the write end: the reader never sees EOF
    _spawn(v_busy_threads, ready)
    _spawn(v_blocked_reader, ready, rfd)
    _spawn(v_zombie_parent, ready)
    os.close(rfd)
    n = 3
    if _SYS_EXIT is not None:
        _spawn(v_zombie_leader, ready)
        n += 1
    return n


def s_mixed(ready: int, keep: list[int]) -> int:
    return sum(s(ready, keep) for s in (s_sigterm, s_spawner, s_threads, s_forktree))


SCENARIOS: dict[str, Callable[[int, list[int]], int]] = {
    "forktree": s_forktree,
    "sigterm": s_sigterm,
    "spawner": s_spawner,
    "threads": s_threads,
    "mixed": s_mixed,
}


# ---- PID 1 ----


def _read_records(fd: int, want: int | None, timeout: float) -> tuple[list[int], list[int]]:
    """(live victims' pids, zombies' pids) read from the handshake pipe until `want` live
    ones arrived (None: until EOF, i.e. every writer is gone), or the timeout."""
    live: list[int] = []
    zombies: list[int] = []
    end = time.monotonic() + timeout
    while want is None or len(live) < want:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        # whole records only: every write is one record, so the pipe holds whole ones
        chunk = os.read(fd, _RECORD.size * (1 if want is None else want - len(live)))
        if not chunk:
            break
        for (pid,) in _RECORD.iter_unpack(chunk):
            (live if pid > 0 else zombies).append(abs(pid))
    return live, zombies


def _read_all(fd: int, timeout: float) -> bytes:
    out = b""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out


def _reap_forever(reaped: list[tuple[int, int]], empty: threading.Event) -> None:
    while True:  # as init does: reap every zombie, ours and re-parented ones
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            # no child left, not even a zombie: every process of the namespace but this
            # one is gone (an orphan becomes our child before its parent can be reaped)
            empty.set()
            time.sleep(0.001)
            continue
        reaped.append((pid, os.waitstatus_to_exitcode(status)))


def _killcord(out: int) -> None:
    """The forked 'killcord' process: fire, send the report to PID 1."""
    try:
        wait = os.environ.get(WAIT_ENV, "1") != "0"  # 0: as on the kexec path, no wait for exits
        payload: dict[str, object] = kill_all(time.monotonic() + 5, live=True, wait=wait).as_dict()
    except BaseException as exc:  # report, do not hide
        payload = {"error": repr(exc)}
    os.write(out, json.dumps(payload).encode())


def survivors() -> list[dict[str, object]]:
    """Every process but us that is still alive. Independent of killcord's own /proc parser."""
    found: list[dict[str, object]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == "1":
            continue
        try:
            with open(f"/proc/{name}/status", encoding="utf-8", errors="replace") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except (FileNotFoundError, ProcessLookupError):
            continue
        state = status.get("State", "?").strip()
        threads = int(status.get("Threads", "1").strip() or 1)
        if state[:1] in ("Z", "X") and threads <= 1:
            continue  # a zombie is dead; a zombie leader with live threads is not
        found.append({"pid": int(name), "state": state, "threads": threads,
                      "name": status.get("Name", "?").strip()})
    return found


def main(argv: list[str]) -> int:
    refuse_unless_in_child_pidns()
    if len(argv) != 2 or argv[1] not in SCENARIOS:
        print(f"usage: pidns_driver.py {{{','.join(SCENARIOS)}}}", file=sys.stderr)
        return 2
    scenario = argv[1]
    ready_r, ready_w = os.pipe()
    keep: list[int] = []
    want = SCENARIOS[scenario](ready_w, keep)
    os.close(ready_w)  # the victims hold it: EOF once the last of them is gone
    victims, zombies = _read_records(ready_r, want, READY_TIMEOUT_S)
    if len(victims) < want:
        print(json.dumps({"scenario": scenario, "error": f"only {len(victims)}/{want} victims ready"}))
        return 1

    report_r, report_w = os.pipe()
    killcord = os.fork()
    if killcord == 0:
        os.close(report_r)
        os.close(ready_r)
        try:
            _killcord(report_w)
        finally:
            os._exit(0)
    os.close(report_w)
    reaped: list[tuple[int, int]] = []
    empty = threading.Event()
    threading.Thread(target=_reap_forever, args=(reaped, empty), daemon=True).start()

    raw = _read_all(report_r, REPORT_TIMEOUT_S)
    empty.wait(EMPTY_TIMEOUT_S)
    late, late_zombies = _read_records(ready_r, None, 0.5)  # at EOF at once if empty
    try:
        report: object = json.loads(raw)
    except ValueError:
        report = {"error": f"no report: {raw[:200]!r}"}
    print(json.dumps({
        "scenario": scenario, "report": report, "victims": victims, "late": late,
        "zombies": zombies + late_zombies, "spawned": _spawned, "killcord": killcord,
        "reaped": list(reaped), "empty": empty.is_set(), "survivors": survivors(),
    }), flush=True)
    return 0


if __name__ == "__main__":
    # os._exit: skip interpreter teardown (daemon threads); the kernel then clears the namespace.
    code = main(sys.argv)
    sys.stdout.flush()
    os._exit(code)
