"""The daemon end to end, in dry-run: a loop device is the medium, uevents are real.

Dry-run is the interlock: these tests run on the host, so nothing may be killed; each
test keeps a `sleep` sentinel and checks that it survived the (dry) firing.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import needs_root, remove_loop, send_uevent

pytestmark = needs_root

CLI = [sys.executable, "-m", "killcord.cli"]


def run_cli(env: dict[str, str], *args: str, user: int | None = None,
            groups: str | None = None) -> subprocess.CompletedProcess[str]:
    if user is None:
        return subprocess.run(CLI + list(args), env=env, capture_output=True, text=True, timeout=30)
    # Drop to `user` after importing (the interpreter may live under a root-only home, as
    # pyenv's does), then run the command exactly as a user would.
    gids = [int(g) for g in groups.split(",")] if groups else []
    code = ("import os, sys, tomllib, killcord.cli, killcord.config, killcord.control\n"
            f"os.setgroups({gids!r}); os.setgid({user}); os.setuid({user})\n"
            f"sys.exit(killcord.cli.main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)


def status(env: dict[str, str]) -> dict:
    proc = run_cli(env, "status", "--json")
    return json.loads(proc.stdout)


def wait_for(env: dict[str, str], state: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < end:
        last = status(env)
        if last.get("state") == state:
            return last
        time.sleep(0.1)
    raise AssertionError(f"state {state!r} not reached; last status: {last}")


@pytest.fixture
def sentinel() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def env(ramdir: Path) -> dict[str, str]:
    config = ramdir / "killcord.toml"
    config.write_text("")  # never read the machine's /etc/killcord
    config.chmod(0o644)  # as /etc/killcord/killcord.toml: readable by the unprivileged client
    e = {k: v for k, v in os.environ.items() if not k.startswith("KILLCORD_")}
    e.update(KILLCORD_CONFIG=str(config), KILLCORD_STATE_DIR=str(ramdir),
             KILLCORD_SOCKET=str(ramdir / "control.sock"), PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    return e


@pytest.fixture
def start_daemon(env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen]]:
    procs: list[subprocess.Popen] = []

    def start(nofile: tuple[int, int] | None = None, extra_env: dict[str, str] | None = None,
              log: Path | None = None, **settings: str) -> subprocess.Popen:
        """nofile: the daemon's RLIMIT_NOFILE (soft, hard), e.g. systemd's default 1024.
        log: its stderr goes to this file (a pipe nobody reads would stall a chatty daemon)."""
        e = dict(env, **{f"KILLCORD_{k.upper()}": v for k, v in settings.items()}, **(extra_env or {}))
        assert e.get("KILLCORD_MODE", "dry-run") == "dry-run"  # the interlock, on the host

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        err = subprocess.PIPE if log is None else open(log, "w")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(CLI + ["daemon"], env=e, stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=limit, start_new_session=True)
        if log is not None:
            err.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:  # its standby, if the test left one behind (a daemon killed, then not restarted)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_unplug_fires_kill_audit_kexec_in_order(loopdev, env, start_daemon, sentinel, ramdir: Path,
                                                tmp_path: Path) -> None:
    dev = loopdev()
    kernel = tmp_path / "fake-vmlinuz"  # dry-run only checks it can be read; no kexec here
    kernel.write_bytes(b"not a kernel: dry-run reads one byte")
    start_daemon(medium=dev, kexec_kernel=str(kernel), kexec_initrd="none")
    armed = wait_for(env, "armed")
    # the loop device first (then, since loop backing files are followed, the disk under it)
    assert armed["medium"]["devpaths"][0] == f"/devices/virtual/block/{Path(dev).name}"
    assert armed["kexec"]["loaded"] and armed["kexec"]["method"] == "dry"
    assert armed["kexec"]["cmdline"].split(" -- ")[0].endswith("init_on_free=1 killcord.wipe=1")
    assert armed["resident"]["mlockall"] and armed["resident"]["locked_kib"] > 0

    send_uevent(dev, "remove")
    fired = wait_for(env, "fired")
    assert fired["trigger"] == f"uevent remove /devices/virtual/block/{Path(dev).name}"
    stages = fired["stages"]
    assert [s["name"] for s in stages] == ["kill", "keys", "audit", "kexec"]
    assert [s["outcome"] for s in stages] == ["dry", "dry", "done", "dry"]
    assert all(s["duration_ms"] >= 0 for s in stages)
    assert stages[0]["detail"]["targets"] >= 1  # it found processes it would kill...
    assert sentinel.poll() is None  # ...and, dry, killed none of them
    record = json.loads(Path(stages[2]["detail"]["record"]).read_text())
    assert record["trigger"] == fired["trigger"] and record["stages"][0]["name"] == "kill"
    assert (ramdir / "records" / record["snapshot"]).read_text().startswith("slabinfo - version:")


def test_without_a_kexec_image_the_poweroff_fallback_is_next(loopdev, env, start_daemon) -> None:
    dev = loopdev()
    start_daemon(medium=dev, kexec_kernel="auto", live_medium_mount="/nonexistent")
    armed = wait_for(env, "armed")
    send_uevent(dev, "remove")
    fired = wait_for(env, "fired")
    names = [(s["name"], s["outcome"]) for s in fired["stages"]]
    if armed["kexec"]["loaded"]:  # a machine with this kernel's image in /boot
        assert names[-1] == ("kexec", "dry")
    else:
        assert names == [("kill", "dry"), ("keys", "dry"), ("audit", "done"), ("kexec", "skipped"), ("poweroff", "dry")]


def test_unrelated_events_and_rereads_never_fire(loopdev, env, start_daemon) -> None:
    dev, other = loopdev(), loopdev()
    start_daemon(medium=dev)
    wait_for(env, "armed")
    send_uevent(dev, "change")  # the medium's own re-read
    send_uevent(dev, "add")
    for _ in range(200):
        send_uevent(other, "change")
    send_uevent(other, "remove")  # another stick pulled
    time.sleep(0.5)
    s = status(env)
    assert s["state"] == "armed" and s["stages"] == []
    seen = [(e["action"], e["fired"]) for e in s["events"] if e["event"] == "Uevent"]
    # the medium's own re-read and add never pass the kernel's filter (watch.set_filter: a loop
    # device is not media-watched), the other stick's remove does but is not the medium's
    assert seen == []


def test_real_device_removal_fires(loopdev, env, start_daemon) -> None:
    dev = loopdev()
    start_daemon(medium=dev)
    wait_for(env, "armed")
    remove_loop(dev)  # the kernel deletes the device: a genuine remove uevent
    assert wait_for(env, "fired")["trigger"].startswith("uevent remove")


def test_panic_as_root_fires_once(loopdev, env, start_daemon, sentinel) -> None:
    start_daemon(medium=loopdev())
    wait_for(env, "armed")
    first = run_cli(env, "panic")
    assert first.returncode == 0 and "firing (dry-run)" in first.stdout
    fired = wait_for(env, "fired")
    assert fired["trigger"].startswith("panic uid=0")
    again = run_cli(env, "panic")
    assert again.returncode == 0 and "already fired" in again.stdout
    assert status(env)["ignored_triggers"] == 1
    assert sentinel.poll() is None


def test_panic_unprivileged_is_refused_and_logged(loopdev, env, start_daemon) -> None:
    proc = start_daemon(medium=loopdev())
    wait_for(env, "armed")
    refused = run_cli(env, "panic", user=65534)
    assert refused.returncode == 13
    assert "permission denied: uid 65534" in refused.stderr
    assert status(env)["state"] == "armed"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e["event"] == "panic_refused" and e["uid"] == 65534 for e in logged)


def test_panic_group_member_may_fire(loopdev, env, start_daemon) -> None:
    start_daemon(medium=loopdev(), panic_group="users")  # gid 100 on Debian
    wait_for(env, "armed")
    assert run_cli(env, "panic", user=65534).returncode == 13  # not a member
    ok = run_cli(env, "panic", user=65534, groups="100")
    assert ok.returncode == 0, ok.stderr
    assert wait_for(env, "fired")["trigger"].startswith("panic uid=65534 ")


def test_removed_while_restarting_fires_at_start(loopdev, env, start_daemon) -> None:
    dev = loopdev()
    first = start_daemon(medium=dev)
    wait_for(env, "armed")
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0
    remove_loop(dev)  # pulled while the daemon was down
    start_daemon(medium=dev)
    fired = wait_for(env, "fired")
    assert "armed earlier this boot" in fired["trigger"] and dev in fired["trigger"]


def test_misconfiguration_refuses_to_arm(loopdev, env, start_daemon, ramdir: Path) -> None:
    bad_mode = start_daemon(mode="dry-run", medium=loopdev(), stage_deadlines_ms='{"kill": -5}')
    _, err = bad_mode.communicate(timeout=30)
    assert bad_mode.returncode == 2
    assert "stage_deadlines_ms" in err and "-5" in err and "1 to 120000" in err
    missing = start_daemon(medium="/dev/no-such-stick")
    _, err = missing.communicate(timeout=30)
    assert missing.returncode == 3
    assert "refusing to arm" in err and "/dev/no-such-stick" in err
    assert not (ramdir / "control.sock").exists() and not list(ramdir.rglob("audit-*"))


def test_sigterm_stops_cleanly(loopdev, env, start_daemon, ramdir: Path) -> None:
    proc = start_daemon(medium=loopdev())
    wait_for(env, "armed")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not (ramdir / "control.sock").exists()
    assert run_cli(env, "status").returncode == 4


def test_lost_remove_in_an_event_storm_still_fires(loopdev, ramdir: Path) -> None:
    """In process, without arm() (no mlockall in the test runner): a tiny receive buffer,
    a storm of unrelated events, then the medium really goes; its `remove` is dropped by
    the kernel (ENOBUFS) and the sysfs re-check fires instead."""
    from killcord import daemon, medium, watch
    from killcord.config import Config
    from killcord.events import Armed
    from killcord.fire import Firer
    from killcord.kexec import Staged

    dev, other = loopdev(), loopdev()
    d = daemon.Daemon(Config(state_dir=ramdir, socket=ramdir / "c.sock", medium=dev))
    d.medium = medium.resolve(dev, Path("/x"))
    d.watcher = watch.Watcher(buffer_bytes=4096)
    d.firer = Firer(d.machine, Staged(None, None, "", "none", False), ramdir, live=False)
    d.machine.feed(Armed(frozenset(d.medium.devpaths)))
    for _ in range(300):
        send_uevent(other, "change")
    remove_loop(dev)
    d.on_uevents()
    assert d.machine.trigger is not None
    assert d.machine.trigger.startswith("medium absent (enobufs")
    assert [r.stage.value for r in d.machine.results][:3] == ["kill", "keys", "audit"]


def test_recheck_after_resume_fires_only_when_the_medium_is_gone(loopdev, env, start_daemon) -> None:
    dev = loopdev()
    start_daemon(medium=dev)
    wait_for(env, "armed")
    assert run_cli(env, "recheck", user=65534).returncode == 13  # root only
    ok = run_cli(env, "recheck")
    assert ok.returncode == 0 and "armed" in ok.stdout
    assert status(env)["state"] == "armed"
    remove_loop(dev)
    # (the real removal also sends a uevent; whichever comes first fires, once)
    run_cli(env, "recheck")
    fired = wait_for(env, "fired")
    assert fired["trigger"].startswith(("uevent remove", "medium absent (resume"))


def test_check_after_dropping_caches_shows_what_is_really_locked(loopdev, env, start_daemon) -> None:
    start_daemon(medium=loopdev())
    armed = wait_for(env, "armed")
    proc = run_cli(env, "check", "--json", "--drop-caches")
    items = {i["name"]: i for i in json.loads(proc.stdout)["items"]}
    assert items["daemon"]["ok"] and items["medium"]["ok"]
    assert items["fallback"]["ok"]  # the daemon sees the system's RAM file systems
    res = items["resident"]
    assert "after dropping the page cache" in res["detail"]
    # the daemon is mlockall'ed; the files memlockd would hold are not locked by anything on
    # this machine (no memlockd), so after the drop they are reported missing
    assert "daemon: mlockall=True" in res["detail"] and armed["resident"]["mlockall"]
    assert not res["ok"] and "not resident: /" in res["detail"] and "memlockd" in res["fix"]


# ---- arming: every refusal before any irreversible step ----


class FakeKexec:
    """Stands in for kexec.stage: a real one in live mode would load (and, with kexec_lock,
    lock) an image on this host. Records whether arming got as far as staging."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stage(self, *args: object, **kwargs: object):  # noqa: ANN201
        from killcord.kexec import Staged

        self.calls.append("stage")
        return Staged(None, None, "", "none", False, error="fake")


def fake_lock_all() -> None:
    """mlockall in the test runner would lock all of pytest's memory."""


def no_standby(_daemon: object) -> None:
    """A standby forked from the test runner would be a copy of pytest (test_standby.py
    runs the real one, from a real daemon)."""


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKexec]:
    from killcord import kexec, resident, standby

    fake = FakeKexec()
    monkeypatch.setattr(kexec, "stage", fake.stage)
    monkeypatch.setattr(resident, "lock_all", fake_lock_all)
    monkeypatch.setattr(standby, "start", no_standby)
    yield fake
    arm_fds = sys.modules.get("killcord.arm_fds")  # the directories arm() held open
    if arm_fds is not None:
        arm_fds.release_all()


def test_a_state_dir_not_in_ram_is_refused_before_kexec_is_staged(loopdev, ramdir: Path, tmp_path: Path,
                                                                   in_process: FakeKexec) -> None:
    from killcord import daemon
    from killcord.config import Config

    assert daemon.fs_type(tmp_path) not in daemon.RAM_FS.values()  # a disk
    cfg = Config(mode="live", medium=loopdev(), state_dir=tmp_path / "state", socket=ramdir / "c.sock",
                 kexec_kernel="none", kexec_initrd="none", kexec_lock=True)
    with pytest.raises(daemon.ArmError, match="not in RAM"):
        daemon.Daemon(cfg).arm()
    assert in_process.calls == []  # refused before staging (and locking) kexec


def test_an_unsafe_state_dir_is_refused_before_kexec_is_staged(loopdev, ramdir: Path,
                                                               in_process: FakeKexec) -> None:
    from killcord import daemon
    from killcord.config import Config

    state = ramdir / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)  # a local user's directory: they could plant links in it
    cfg = Config(medium=loopdev(), state_dir=state, socket=ramdir / "c.sock", kexec_kernel="none")
    with pytest.raises(daemon.ArmError, match="owned by uid 65534"):
        daemon.Daemon(cfg).arm()
    assert in_process.calls == [] and list(state.iterdir()) == []


def test_a_medium_copied_to_ram_arms_for_panic_only(ramdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     in_process: FakeKexec) -> None:
    """toram: the medium was copied to RAM and released; refusing would loop until systemd
    gives up, and lose panic too."""
    from killcord import cli, control, daemon, medium
    from killcord.config import Config

    def released(spec: str, live_mount: Path) -> medium.Medium:
        raise medium.MediumInRam("the live medium was copied to RAM (toram) and released")

    monkeypatch.setattr(medium, "resolve", released)
    d = daemon.Daemon(Config(state_dir=ramdir, socket=ramdir / "c.sock", kexec_kernel="none"))
    d.arm()
    try:
        st = d.status()
        assert st.state == "armed" and st.medium is None
        assert st.medium_note is not None and "panic only" in st.medium_note and "toram" in st.medium_note
        assert d.machine.watched == frozenset()
        assert "medium:   none (armed for panic only" in cli._render_status(st)
        reply, then = d.cmd_panic(control.Peer(1, 0, 0, ()), control.Request(control.COMMANDS["panic"]))
        assert isinstance(reply, control.PanicReply) and reply.state == "firing" and then is not None
        d.feed(then)
        assert d.machine.state.value == "fired"
    finally:
        assert d.server is not None
        d.server.close()


def test_socket_in_a_directory_anyone_can_write_is_refused(loopdev, env, start_daemon, ramdir: Path) -> None:
    public = ramdir / "public"
    public.mkdir()
    public.chmod(0o1777)  # as /tmp: anyone could plant a link where the socket goes
    proc = start_daemon(medium=loopdev(), socket=str(public / "control.sock"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert "refusing to arm" in err and str(public) in err and "writable by group or others" in err
    assert list(public.iterdir()) == []


def test_records_are_roots_alone_and_the_socket_stays_reachable(loopdev, env, start_daemon, ramdir: Path) -> None:
    start_daemon(medium=loopdev(), panic_group="users")
    wait_for(env, "armed")
    sock = ramdir / "control.sock"
    assert stat.S_IMODE(sock.lstat().st_mode) == 0o666 and stat.S_ISSOCK(sock.lstat().st_mode)
    ok = run_cli(env, "panic", user=65534, groups="100")  # panic_group reaches the socket
    assert ok.returncode == 0, ok.stderr
    fired = wait_for(env, "fired")
    record = Path(next(s for s in fired["stages"] if s["name"] == "audit")["detail"]["record"])
    records = ramdir / "records"
    assert record.parent == records and record.is_file()
    assert stat.S_IMODE(records.stat().st_mode) == 0o700 and records.stat().st_uid == 0
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in records.iterdir())
    code = ("import os, sys\nos.setgroups([100]); os.setgid(65534); os.setuid(65534)\n"
            f"try:\n    os.listdir({str(records)!r})\nexcept PermissionError:\n    sys.exit(13)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 13


def _policies(pid: int) -> dict[int, int]:
    """Each thread's scheduling policy (os.sched_getscheduler takes a thread id on Linux)."""
    return {int(tid): os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def test_armed_only_the_uevent_detector_runs_realtime(loopdev, env, start_daemon) -> None:
    """While armed, one thread (the detector, blocked on the uevent socket) is SCHED_FIFO, so
    that it wakes before anything a busy system runs; the main thread, which serves the
    control socket to every local user, stays a normal task. status and check say which."""
    proc = start_daemon(medium=loopdev())
    armed = wait_for(env, "armed")
    assert armed["detector"] == "SCHED_FIFO 50"
    policies = _policies(proc.pid)
    assert policies[proc.pid] == os.SCHED_OTHER, policies  # the main thread: the control socket
    assert sorted(policies.values()).count(os.SCHED_FIFO) == 1, policies
    assert "detector: SCHED_FIFO 50" in run_cli(env, "status").stdout
    items = {i["name"]: i for i in json.loads(run_cli(env, "check", "--json").stdout)["items"]}
    assert items["realtime"]["ok"] and "SCHED_FIFO 50" in items["realtime"]["detail"]


def test_without_cap_sys_nice_it_arms_and_says_it_is_not_realtime(loopdev, env, start_daemon) -> None:
    """A unit without CAP_SYS_NICE (or with RestrictRealtime=): still armed and still firing,
    and status and check say what is missing."""
    dev = loopdev()
    e = dict(env, KILLCORD_MEDIUM=dev)
    # root's capabilities after exec are its bounding set: without CAP_SYS_NICE, as such a unit
    proc = subprocess.Popen(["setpriv", "--bounding-set", "-sys_nice", "--"] + CLI + ["daemon"], env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        armed = wait_for(env, "armed")
        assert armed["detector"].startswith("SCHED_OTHER (refused: Operation not permitted)")
        assert os.SCHED_FIFO not in _policies(proc.pid).values()
        items = {i["name"]: i for i in json.loads(run_cli(env, "check", "--json").stdout)["items"]}
        assert not items["realtime"]["ok"] and "CAP_SYS_NICE" in items["realtime"]["fix"]
        send_uevent(dev, "remove")
        assert wait_for(env, "fired")["trigger"].startswith("uevent remove")
    finally:
        proc.terminate()
        proc.wait(10)


def test_status_says_what_arming_did_with_the_mor_bit(loopdev, env, start_daemon) -> None:
    """On this machine (no UEFI) the firmware offers nothing, and status says so;
    mor = "off" says nothing at all (tests/test_mor.py has the variable itself)."""
    dev = loopdev()
    proc = start_daemon(medium=dev)
    mor = wait_for(env, "armed")["mor"]
    assert not mor["offered"] and "not booted through UEFI" in mor["note"]
    proc.terminate()
    proc.wait(10)
    start_daemon(medium=dev, mor="off")
    assert wait_for(env, "armed")["mor"] is None


def test_panic_keys_arm_without_a_keyboard_and_say_so(loopdev, env, start_daemon) -> None:
    """This machine has no input device at all: with panic_keys set the daemon still arms
    (a keyboard plugged in later is opened then), reads the keys in a second real-time
    thread, and status and check say that no keyboard is open yet. The keyboards
    themselves are read in a QEMU guest (tests/vm, scenario q)."""
    proc = start_daemon(medium=loopdev(), panic_keys="Ctrl+Alt+Shift+K")
    keys = wait_for(env, "armed")["panic_keys"]
    assert keys["chord"] == "ctrl+alt+shift+k" and keys["keyboards"] == [] and keys["not_opened"] == []
    assert keys["sched"] == "SCHED_FIFO 50"
    assert sorted(_policies(proc.pid).values()).count(os.SCHED_FIFO) == 2  # the detector and the keys
    assert "keys:     ctrl+alt+shift+k on 0 keyboard(s), SCHED_FIFO 50 (none open yet" in run_cli(env, "status").stdout
    items = {i["name"]: i for i in json.loads(run_cli(env, "check", "--json").stdout)["items"]}
    assert not items["panic_keys"]["ok"] and "plug in a keyboard" in items["panic_keys"]["fix"]


def test_a_chord_one_key_can_complete_is_refused_at_start(loopdev, env, start_daemon) -> None:
    proc = start_daemon(medium=loopdev(), panic_keys="ctrl+leftctrl+k")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "panic_keys" in err and "'ctrl+leftctrl+k'" in err and "name each key once" in err
    assert not Path(env["KILLCORD_SOCKET"]).exists()  # never armed


def test_status_says_how_the_detector_runs_from_the_first_answer(loopdev, ramdir, monkeypatch, in_process) -> None:
    """The daemon in this process (in_process: no mlockall of pytest, no standby, a fake
    kexec), armed (dry-run), its loop in the main thread. A host too
    busy to run the new detector thread at once is faked by holding its policy call back
    for half a second: a status asked for at once must still say how the detector runs,
    never "not started" beside "armed" (what a loaded host once showed)."""
    import threading

    from killcord import control, daemon, sched
    from killcord.config import Config

    held = threading.Event()
    real = sched.realtime

    def late() -> str:
        held.wait(10)
        return real()

    monkeypatch.setattr(daemon.sched, "realtime", late)
    d = daemon.Daemon(Config(state_dir=ramdir, socket=ramdir / "c.sock", medium=loopdev()))
    d.arm()
    replies: list[control.Reply] = []

    def ask() -> None:
        try:
            replies.append(control.request(ramdir / "c.sock", "status", timeout=10))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's own handler: a clean stop

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threading.Timer(0.5, held.set).start()
    asking = threading.Thread(target=ask)
    asking.start()
    try:
        d.loop()
    finally:
        held.set()
        asking.join(10)
        signal.set_wakeup_fd(-1)
        for s, h in handlers.items():
            signal.signal(s, h)
    assert len(replies) == 1 and isinstance(replies[0], control.StatusReply), replies
    assert replies[0].state == "armed"
    assert replies[0].detector.startswith("SCHED_FIFO"), replies[0].detector
