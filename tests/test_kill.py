"""Tests for killcord.kill.

Live kills run ONLY inside a fresh PID namespace (tests/pidns_driver.py under unshare); on the
host these tests only read /proc, and drive the kill loop with fake signal senders. A fake
/proc is bind-mounted over /proc in a private mount namespace, so the code reads it however it
reaches /proc. Expectations come from what the tests know: the processes they started, the
entries they wrote, and the kernel's own words (/proc/PID/status), never from kill.py's parser.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from killcord import kill
from killcord.events import Outcome

REPO = Path(__file__).resolve().parents[1]
SRC = Path(kill.__file__).resolve().parents[1]  # the tree under test (PYTHONPATH may say which)
DRIVER = REPO / "tests" / "pidns_driver.py"
SCENARIOS = ("forktree", "sigterm", "spawner", "threads", "mixed")
RAW_SYS_EXIT = os.uname().machine in ("x86_64", "aarch64")
# What pidns_driver starts, counted by hand: in "sigterm", a session leader with a child and
# five lone victims; in "threads", a busy multi-threaded one, a blocked reader, a zombie's
# parent and (given a raw SYS_exit) a zombie leader with live threads.
STATIC_VICTIMS = {"sigterm": 7, "threads": 4 if RAW_SYS_EXIT else 3}
STATIC_ZOMBIES = {"sigterm": 0, "threads": 1}
ZOMBIE_EXIT_CODE = 7  # pidns_driver.ZOMBIE_EXIT_CODE
# Upper bounds from the driver's own limits: 4 trees of at most 1 + 80 processes; 4 spawners
# of at most 8 live children each.
MAX_LIVE = {"forktree": 4 * 81, "spawner": 4 * (1 + 8)}
MAX_LIVE["mixed"] = sum(STATIC_VICTIMS.values()) + MAX_LIVE["forktree"] + MAX_LIVE["spawner"]
IS_ROOT = os.geteuid() == 0
UNSHARE = shutil.which("unshare")
THROWAWAY_UID = 59999  # an unused uid: a process running as it can only signal its own kind
PF_KTHREAD = 0x00200000  # include/linux/sched.h: "I am a kernel thread"

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (PID namespaces, setuid)")
needs_pidns = pytest.mark.skipif(
    not IS_ROOT or UNSHARE is None,
    reason="needs root and util-linux `unshare` to run live kills in a PID namespace",
)


def _host_pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _driver_env(with_host_ns: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KILLCORD_TEST_HOST_PIDNS", None)
    if with_host_ns:
        env["KILLCORD_TEST_HOST_PIDNS"] = str(_host_pidns())
    src = str(SRC)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _unshare(*args: str) -> list[str]:
    # --kill-child: if unshare dies (e.g. timeout), the namespace's PID 1 and so the whole
    # namespace die with it.
    assert UNSHARE is not None
    return [UNSHARE, "--pid", "--fork", "--mount-proc", "--kill-child", *args]


def _status(pid: int) -> dict[str, str] | None:
    """/proc/PID/status as the kernel words it (not kill.py's stat parser)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    except (FileNotFoundError, ProcessLookupError):
        return None


def _state(pid: int) -> str | None:
    status = _status(pid)
    return None if status is None else status["State"][:1]


def _wait_state(pid: int, states: str, timeout: float = 10.0) -> str | None:
    end = time.monotonic() + timeout
    while (s := _state(pid)) not in states and time.monotonic() < end:
        time.sleep(0.01)
    return s


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()  # our own child
    proc.wait()


# ---- /proc parsing ----


def _stat_line(pid: int, comm: bytes, state: bytes, ppid: int, flags: int, threads: int,
               starttime: int = 0) -> bytes:
    # fields 3..52; 4=ppid, 9=flags, 20=num_threads, 22=starttime, the rest filler
    rest = [state, str(ppid).encode()] + [b"0"] * 48
    rest[6] = str(flags).encode()
    rest[17] = str(threads).encode()
    rest[19] = str(starttime).encode()
    return b"%d (%s) " % (pid, comm) + b" ".join(rest) + b"\n"


def test_parse_stat_comm_with_parens_and_spaces() -> None:
    line = _stat_line(4242, b"a) b (c) ) d", b"S", 17, 0x400100, 1)
    got = kill.parse_stat(line)
    assert got == kill.StatFields(4242, b"a) b (c) ) d", "S", 17, 0x400100, 1)


def test_parse_stat_real_kernel_thread_flag() -> None:
    line = b"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0 18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"  # noqa: E501
    got = kill.parse_stat(line)
    assert (got.pid, got.comm, got.state, got.ppid, got.flags) == (2, b"kthreadd", "S", 0, 2129984)
    assert got.flags & PF_KTHREAD


@given(
    comm=st.binary(max_size=64).filter(lambda b: b"\0" not in b),
    state=st.sampled_from([b"R", b"S", b"D", b"T", b"t", b"Z", b"X", b"I"]),
    ppid=st.integers(0, 2**22),
    flags=st.integers(0, 2**32 - 1),
    threads=st.integers(1, 10_000),
)
def test_parse_stat_any_comm(comm: bytes, state: bytes, ppid: int, flags: int, threads: int) -> None:
    got = kill.parse_stat(_stat_line(77, comm, state, ppid, flags, threads))
    assert got == kill.StatFields(77, comm, state.decode(), ppid, flags, threads)


@pytest.mark.parametrize("line", [b"", b"12 foo S 1", b"12 (foo) S 1 2 3", b"x (foo) S" + b" 1" * 30])
def test_parse_stat_rejects_malformed(line: bytes) -> None:
    with pytest.raises(ValueError):
        kill.parse_stat(line)


def test_parse_stat_self() -> None:
    with open("/proc/self/stat", "rb") as f:
        got = kill.parse_stat(f.read())
    assert got.pid == os.getpid()
    assert got.ppid == os.getppid()
    assert got.state == "R"
    assert not got.flags & PF_KTHREAD


def test_weird_comm_process_is_read_and_targeted() -> None:
    comm = "x) (y) z"  # what a process can call itself to confuse naive parsers
    code = (
        f"open('/proc/self/comm', 'w').write({comm!r}); import sys; "
        "print('ready', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            got = kill.parse_stat(f.read())
        assert (got.pid, got.comm, got.ppid) == (proc.pid, comm.encode(), os.getpid())
        assert proc.pid in kill.targets()
    finally:
        proc.communicate(b"")  # EOF ends it: no signal needed


# ---- targets() on the host: read-only ----


def _kthreadd_visible() -> bool:
    status = _status(2)
    return status is not None and status.get("Name") == "kthreadd" and status.get("PPid") == "0"


def _kernel_threads() -> set[int]:
    """Independently of kill.py: the kernel's Kthread: line in /proc/PID/status (Linux >= 6.3);
    before it, kthreadd and its children (every kernel thread but the idle ones, which /proc
    does not list)."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and (status := _status(int(name))) is not None:
            if "Kthread" in status:
                kernel = status["Kthread"] == "1"
            else:
                kernel = _kthreadd_visible() and (name == "2" or status.get("PPid") == "2")
            if kernel:
                found.add(int(name))
    return found


def test_targets_spare_init_self_and_kernel_threads(sleeper: subprocess.Popen[bytes]) -> None:
    found = kill.targets()
    assert len(found) == len(set(found))
    assert 1 not in found
    assert os.getpid() not in found
    assert sleeper.pid in found
    assert os.getppid() in found  # pytest's parent: an ordinary process of the host
    kthreads = _kernel_threads()
    if _kthreadd_visible():  # a host, not a container: its kernel threads are listed
        assert {2} < kthreads
    assert not kthreads & set(found), "kernel threads must never be targets"


def test_targets_own_pid_argument(sleeper: subprocess.Popen[bytes]) -> None:
    # Spare the sleeper instead of ourselves: then we are a target and it is not.
    found = kill.targets(own_pid=sleeper.pid)
    assert os.getpid() in found
    assert sleeper.pid not in found


def test_targets_skip_zombies() -> None:
    proc = subprocess.Popen(["true"])
    try:
        assert _wait_state(proc.pid, "Z") == "Z"  # exited, not yet reaped: a zombie
        assert proc.pid not in kill.targets()
    finally:
        proc.wait()


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="raw SYS_exit number")
def test_targets_include_zombie_leader_with_live_threads() -> None:
    # The main thread exits alone (raw SYS_exit); /proc/PID/stat then says Z although the
    # process still runs. It must stay a target.
    sys_exit = {"x86_64": 60, "aarch64": 93}[os.uname().machine]
    code = (
        "import ctypes, os, sys, threading\n"
        "def wait_eof():\n"
        "    sys.stdin.buffer.read()\n"
        "    os._exit(0)\n"
        "threading.Thread(target=wait_eof).start()\n"
        f"ctypes.CDLL(None).syscall({sys_exit}, 0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        assert _wait_state(proc.pid, "Z") == "Z"
        assert proc.poll() is None
        assert proc.pid in kill.targets()
    finally:
        proc.communicate(b"")


def _fake_proc(root: Path, procs: dict[int, bytes]) -> None:
    root.mkdir(exist_ok=True)
    for pid, line in procs.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "stat").write_bytes(line)
    for other in ("self", "sys", "1x"):  # non-PID entries are ignored
        (root / other).mkdir()


# Runs in a fresh PID and mount namespace: bind the fake over /proc first, import kill after,
# then evaluate the expression. Only dry runs and reads: nothing here may signal. No
# monkeypatching of kill.py's internals: however it reaches /proc, it finds the fake.
_IN_FAKE_PROC = """
import json, subprocess, sys, time
subprocess.run(["mount", "--bind", sys.argv[1], "/proc"], check=True)
from killcord import kill
from killcord.events import Outcome
print(json.dumps(eval(sys.argv[2])))
"""


def _with_fake_proc(root: Path, expr: str) -> object:
    """The value of `expr` (with `kill` imported) where /proc is the fake at `root`."""
    assert UNSHARE is not None
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [UNSHARE, "--mount", "--pid", "--fork", "--kill-child", sys.executable, "-c", _IN_FAKE_PROC,
         str(root), expr],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_pidns
def test_targets_rules_on_a_fake_proc(tmp_path: Path) -> None:
    kt = PF_KTHREAD
    _fake_proc(tmp_path, {
        1: _stat_line(1, b"init", b"S", 0, 0x400100, 1),
        2: _stat_line(2, b"kthreadd", b"S", 0, kt, 1),
        3: _stat_line(3, b"kworker/0:0", b"I", 2, kt | 0x40, 1),
        4: _stat_line(4, b"flagless child of kthreadd", b"S", 2, 0, 1),
        5: _stat_line(5, b"odd kthread", b"S", 0, kt, 1),
        10: _stat_line(10, b"us", b"R", 1, 0x400000, 4),
        11: _stat_line(11, b"a) b", b"S", 1, 0x400000, 1),
        12: _stat_line(12, b"zombie", b"Z", 11, 0x400004, 1),
        13: _stat_line(13, b"dead", b"X", 11, 0x400004, 1),
        14: _stat_line(14, b"zombie leader", b"Z", 1, 0x400000, 3),
        15: _stat_line(15, b"stopped", b"T", 11, 0x400000, 1),
        16: b"garbage",
    })
    assert _with_fake_proc(tmp_path, "sorted(kill.targets(own_pid=10))") == [11, 14, 15]
    assert _with_fake_proc(tmp_path, "sorted(kill.targets(own_pid=11))") == [10, 14, 15]


@needs_pidns
def test_services_pid1_restarts_after_the_kill_began_are_not_chased(tmp_path: Path) -> None:
    # systemd restarts killed services while the kill runs (and they start children): what
    # is born after the kill began is fresh (the next stage ends it); what is older must die.
    # "After" here: a start time (clock ticks since boot) decades from now.
    future = 100 * 365 * 86400 * os.sysconf("SC_CLK_TCK")
    _fake_proc(tmp_path, {
        1: _stat_line(1, b"systemd", b"S", 0, 0x400100, 1, starttime=1),
        20: _stat_line(20, b"journald", b"S", 1, 0x400100, 1, starttime=future),  # respawned
        21: _stat_line(21, b"sshd", b"S", 1, 0x400100, 1, starttime=90),  # was there
        22: _stat_line(22, b"ldd", b"S", 20, 0x400100, 1, starttime=future + 5),  # its child
    })
    dry = _with_fake_proc(tmp_path, "kill.kill_all(time.monotonic() + 5, live=False).as_dict()")
    assert isinstance(dry, dict)
    assert (dry["outcome"], dry["targets"], dry["remaining"]) == ("dry", 1, [21])
    # merely listing targets has no cutoff: all three
    assert _with_fake_proc(tmp_path, "sorted(kill.targets())") == [20, 21, 22]
    assert kill.parse_stat(_stat_line(7, b"x", b"S", 1, 0, 1, starttime=12345)).starttime == 12345


@needs_pidns
def test_targets_in_a_pid_namespace_pid2_is_ordinary(tmp_path: Path) -> None:
    # No kthreadd in a PID namespace: PID 2 is a normal process, and so are its children.
    _fake_proc(tmp_path, {
        1: _stat_line(1, b"init", b"S", 0, 0x400100, 1),
        2: _stat_line(2, b"daemon", b"S", 1, 0x400140, 1),
        3: _stat_line(3, b"worker", b"S", 2, 0x400040, 1),
        4: _stat_line(4, b"killcord", b"R", 1, 0x400000, 1),
    })
    assert _with_fake_proc(tmp_path, "sorted(kill.targets(own_pid=4))") == [2, 3]


def test_dry_run_sends_nothing(
    sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[int, int]] = []

    def forbidden(pid: int, sig: int) -> None:  # belt and braces: never signal on the host
        sent.append((pid, sig))
        raise AssertionError(f"dry-run sent signal {sig} to {pid}")

    monkeypatch.setattr(os, "kill", forbidden)
    report = kill.kill_all(time.monotonic() + 5, live=False)
    monkeypatch.undo()
    assert sent == []
    assert report.outcome is Outcome.DRY
    assert report.targets >= 1 and report.targets == len(report.remaining)
    assert sleeper.pid in report.remaining
    assert 1 not in report.remaining and os.getpid() not in report.remaining
    assert (report.killed, report.rounds) == (0, 0)
    assert sleeper.poll() is None
    assert _state(sleeper.pid) in ("S", "R")  # neither stopped nor killed
    d = report.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["outcome"] == "dry"


# ---- the kill loop, driven by fakes (no real signal is ever sent here) ----


class FakeWorld:
    """Scripted /proc scans and a recording kill(2)."""

    def __init__(self, scans: list[list[int]], deny: frozenset[int] = frozenset(),
                 gone: frozenset[int] = frozenset()) -> None:
        self.scans = scans
        self.deny = deny  # pids (or -1) that answer EPERM
        self.gone = gone  # pids (or -1) that answer ESRCH
        self.sent: list[tuple[int, int]] = []

    def send(self, pid: int, sig: int) -> None:
        self.sent.append((pid, sig))
        if pid in self.deny:
            raise PermissionError(1, "Operation not permitted")
        if pid in self.gone:
            raise ProcessLookupError(3, "No such process")

    def scan(self) -> list[int]:
        return self.scans.pop(0) if len(self.scans) > 1 else self.scans[0]


def test_live_stops_then_kills_then_sweeps_stragglers() -> None:
    world = FakeWorld([[10, 11, 12], [11], []])
    report = kill._run(time.monotonic() + 5, True, world.send, world.scan)
    assert world.sent == [(-1, signal.SIGSTOP), (-1, signal.SIGKILL), (11, signal.SIGKILL)]
    assert report.outcome is Outcome.DONE
    assert (report.targets, report.killed, report.remaining, report.rounds) == (3, 3, (), 2)


def test_live_straggler_vanishing_before_its_kill_is_fine() -> None:
    world = FakeWorld([[10], [10], []], gone=frozenset({10, -1}))
    report = kill._run(time.monotonic() + 5, True, world.send, world.scan)
    assert report.outcome is Outcome.DONE
    assert report.remaining == ()


def test_live_nothing_to_kill_esrch_is_done() -> None:
    world = FakeWorld([[]], gone=frozenset({-1}))
    report = kill._run(time.monotonic() + 5, True, world.send, world.scan)
    assert report.outcome is Outcome.DONE
    assert (report.targets, report.killed, report.rounds) == (0, 0, 1)


def test_live_deadline_passes_timed_out() -> None:
    ticks = iter(range(1000))
    world = FakeWorld([[20, 21], [21]])  # 21 never dies
    report = kill._run(10.0, True, world.send, world.scan, clock=lambda: float(next(ticks)))
    assert report.outcome is Outcome.TIMED_OUT
    assert report.remaining == (21,)
    assert (report.targets, report.killed) == (2, 1)
    assert report.rounds >= 2
    assert world.sent.count((21, signal.SIGKILL)) == report.rounds - 1


def test_live_all_stragglers_refuse_failed() -> None:
    world = FakeWorld([[30]], deny=frozenset({30, -1}))
    report = kill._run(time.monotonic() + 5, True, world.send, world.scan)
    assert report.outcome is Outcome.FAILED
    assert report.remaining == (30,)


def test_proc_unreadable_failed() -> None:
    def broken() -> list[int]:
        raise PermissionError(13, "Permission denied", "/proc")

    world = FakeWorld([[]])
    assert kill._run(time.monotonic() + 5, False, world.send, broken).outcome is Outcome.FAILED
    report = kill._run(time.monotonic() + 5, True, world.send, broken)
    assert report.outcome is Outcome.FAILED
    # blind, it still fired: stopping and killing must not depend on seeing /proc
    assert world.sent == [(-1, signal.SIGSTOP), (-1, signal.SIGKILL)]


def test_live_without_wait_stops_kills_and_returns() -> None:
    """The kexec path: the two broadcasts, then back at once: not even a scan for the report
    (it cost 66-137 ms under TCG before the keys stage)."""
    world = FakeWorld([[10, 11, 12], [11], []])
    report = kill._run(time.monotonic() + 5, True, world.send, world.scan, wait=False)
    assert world.sent == [(-1, signal.SIGSTOP), (-1, signal.SIGKILL)]
    assert world.scans == [[10, 11, 12], [11], []]  # none taken
    assert report.outcome is Outcome.DONE and report.waited is False
    assert (report.targets, report.killed, report.remaining, report.rounds) == (None, 0, (), 1)


def test_sweep_from_its_own_first_scan_kills_what_is_left() -> None:
    """What kill.finish runs after an unwaited kill: the first scan is the target set."""
    world = FakeWorld([[11, 12], [12], []])
    report = kill._sweep(time.monotonic() + 5, world.send, world.scan, time.monotonic, time.monotonic(), None, 0)
    assert world.sent == [(11, signal.SIGKILL), (12, signal.SIGKILL), (12, signal.SIGKILL)]
    assert report.outcome is Outcome.DONE
    assert (report.targets, report.killed, report.remaining, report.rounds) == (2, 2, (), 2)


def test_dry_run_loop_sends_nothing() -> None:
    world = FakeWorld([[5, 6]])
    report = kill._run(time.monotonic() + 5, False, world.send, world.scan)
    assert world.sent == []
    assert report.outcome is Outcome.DRY
    assert (report.targets, report.killed, report.remaining, report.rounds) == (2, 0, (5, 6), 0)


# ---- live kills, inside a PID namespace only ----


def _run_driver(scenario: str, wait: bool = True) -> dict[str, object]:
    env = {**_driver_env(), "KILLCORD_TEST_KILL_WAIT": "1" if wait else "0"}
    proc = subprocess.run(
        _unshare(sys.executable, str(DRIVER), scenario),
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode == 0, f"driver failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr: {proc.stderr}"
    return json.loads(lines[-1])


@needs_pidns
@pytest.mark.root
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_live_kill_in_pid_namespace(scenario: str) -> None:
    out = _run_driver(scenario)
    assert out["report"]["waited"] is True, out  # type: ignore[index]
    report = out["report"]
    assert isinstance(report, dict) and "error" not in report, out
    reaped: dict[int, int] = {pid: code for pid, code in out["reaped"]}  # type: ignore[union-attr]
    victims = set(out["victims"]) | set(out["late"])  # type: ignore[arg-type]
    zombies = set(out["zombies"])  # type: ignore[arg-type]
    killer = out["killcord"]
    sigkilled = {pid for pid, code in reaped.items() if code == -signal.SIGKILL}

    # Every process the test saw running is gone, killed by SIGKILL; nothing is left.
    assert out["survivors"] == [] and out["empty"] is True, out
    assert victims and victims <= sigkilled, {v: reaped.get(v) for v in victims - sigkilled}
    assert set(out["spawned"]) <= sigkilled  # type: ignore[arg-type]
    # The killer spared itself (and PID 1, which prints this); zombies were dead already.
    assert reaped[killer] == 0, out  # type: ignore[index]
    assert {reaped.get(z) for z in zombies} <= {ZOMBIE_EXIT_CODE}, out
    assert killer not in victims and not zombies & victims

    assert report["outcome"] == "done", out
    assert report["remaining"] == [], out
    assert report["killed"] == report["targets"], out
    assert report["rounds"] >= 1
    # targets: every victim that said it ran before the kill began; at most every process
    # that then lived (all reaped by this PID 1 once their parents were dead), live or not
    lived = set(reaped) - zombies - {killer}
    assert len(out["victims"]) <= report["targets"] <= len(lived), out  # type: ignore[arg-type]
    if scenario in STATIC_VICTIMS:  # no victim forks or exits on its own: the count is known
        assert len(victims) == STATIC_VICTIMS[scenario], out
        assert len(zombies) == STATIC_ZOMBIES[scenario], out
        assert report["targets"] == report["killed"] == STATIC_VICTIMS[scenario], out
        assert sigkilled == victims, out  # exactly the test's processes died by our hand
        assert set(reaped) == victims | zombies | {killer}, out
    else:
        assert report["targets"] <= MAX_LIVE[scenario], out
        assert len(sigkilled) <= MAX_LIVE[scenario], out


@needs_pidns
@pytest.mark.root
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_live_kill_without_waiting_still_leaves_nothing(scenario: str) -> None:
    """kill_all(wait=False), as on the kexec path: it returns after the two broadcasts, and
    still every victim dies of SIGKILL and none forks away (this PID 1 waits for the
    namespace to empty, not killcord)."""
    out = _run_driver(scenario, wait=False)
    report = out["report"]
    assert isinstance(report, dict) and "error" not in report, out
    reaped: dict[int, int] = {pid: code for pid, code in out["reaped"]}  # type: ignore[union-attr]
    victims = set(out["victims"]) | set(out["late"])  # type: ignore[arg-type]
    sigkilled = {pid for pid, code in reaped.items() if code == -signal.SIGKILL}
    assert out["survivors"] == [] and out["empty"] is True, out
    assert victims and victims <= sigkilled, {v: reaped.get(v) for v in victims - sigkilled}
    assert set(out["spawned"]) <= sigkilled  # type: ignore[arg-type]
    assert reaped[out["killcord"]] == 0, out  # type: ignore[index]
    assert report["outcome"] == "done" and report["waited"] is False and report["rounds"] == 1, out
    assert report["targets"] is None, out  # not counted: no /proc scan before the keys


# ---- the driver's own safety interlock ----


def _uid_unused(uid: int) -> bool:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                continue
            if str(uid) in uids:
                return False
    return True


# Imports the driver as root (its imports may live under a root-only prefix), then becomes the
# throwaway uid and runs the driver's main() exactly as a direct run would.
_AS_THROWAWAY = """
import importlib.util, os, sys
path, uid, scenario = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spec = importlib.util.spec_from_file_location("pidns_driver", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
if os.getuid() != uid or os.geteuid() != uid:
    sys.exit("could not drop root")
sys.exit(mod.main([path, scenario]))
"""


@needs_root
def test_driver_refuses_on_host() -> None:
    # Run it exactly as it must never be run: on the host, no unshare. Even so, run it (and
    # the sentinel it must not touch) as a throwaway uid: if the interlock ever broke, its
    # kill(-1) could reach only processes of that uid, i.e. the sentinel, and this test fails.
    if not _uid_unused(THROWAWAY_UID):
        pytest.skip(f"uid {THROWAWAY_UID} is in use on this host")
    sentinel = subprocess.Popen(
        ["sleep", "60"], user=THROWAWAY_UID, group=THROWAWAY_UID, extra_groups=[]
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _AS_THROWAWAY, str(DRIVER), str(THROWAWAY_UID), "sigterm"],
            env=_driver_env(), capture_output=True, text=True, timeout=60, cwd="/",
        )
        assert proc.returncode == 2, proc
        assert "refusing" in proc.stderr and "host's PID namespace" in proc.stderr, proc.stderr
        assert proc.stdout == ""
        assert sentinel.poll() is None
        assert _state(sentinel.pid) == "S", "the sentinel was stopped or killed"
    finally:
        sentinel.kill()  # our own child
        sentinel.wait()


@needs_pidns
def test_driver_refuses_without_host_ns_inode() -> None:
    proc = subprocess.run(
        _unshare(sys.executable, str(DRIVER), "sigterm"), env=_driver_env(with_host_ns=False),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc
    assert "refusing" in proc.stderr and "KILLCORD_TEST_HOST_PIDNS" in proc.stderr


@needs_pidns
def test_driver_refuses_host_procfs() -> None:
    # A PID namespace but the host's /proc: the scan would list host PIDs.
    assert UNSHARE is not None
    proc = subprocess.run(
        [UNSHARE, "--pid", "--fork", "--kill-child", sys.executable, str(DRIVER), "sigterm"],
        env=_driver_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc
    assert "refusing" in proc.stderr and "mount-proc" in proc.stderr


@needs_pidns
def test_describe_names_what_a_kill_left(tmp_path: Path) -> None:
    _fake_proc(tmp_path, {31: _stat_line(31, b"stuck-io", b"D", 1, 0x400100, 2)})
    assert _with_fake_proc(tmp_path, "kill.describe((31, 32))") == {
        "31": "stuck-io (D, 2 threads)", "32": "gone"}
    # at most 8
    assert _with_fake_proc(tmp_path, "list(kill.describe(tuple(range(40, 60))))") == [
        str(p) for p in range(40, 48)]
    # as a report of a kill that left them says
    left = "kill.KillReport(Outcome.TIMED_OUT, 2, 1, (31,), 3, 5.0).as_dict()['stuck']"
    assert _with_fake_proc(tmp_path, left) == {"31": "stuck-io (D, 2 threads)"}
