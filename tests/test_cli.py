"""The command line as a user meets it: help, version, errors, slabinfo-diff, check, panic."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_root

CLI = [sys.executable, "-m", "killcord.cli"]
COMMANDS = ["daemon", "panic", "recheck", "status", "check", "slabinfo-diff", "memlock-config"]

SLAB_A = """slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>
dentry              1000   1050    192   21    1 : tunables    0    0    0 : slabdata     50     50      0
kmalloc-64          5000   5120     64   64    1 : tunables    0    0    0 : slabdata     80     80      0
"""
SLAB_B = SLAB_A.replace("dentry              1000", "dentry              9000").replace(
    "kmalloc-64          5000", "kmalloc-64          4000")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KILLCORD_")}
    e.update(env or {})
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=e, timeout=60)


def test_version_and_help_on_every_command() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("killcord ")
    assert cli("--help").returncode == 0
    for cmd in COMMANDS:
        proc = cli(cmd, "--help")
        assert proc.returncode == 0 and f"killcord {cmd}" in proc.stdout


def test_unknown_command_is_an_error() -> None:
    proc = cli("explode")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_slabinfo_diff_largest_first(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text(SLAB_A)
    b.write_text(SLAB_B)
    proc = cli("slabinfo-diff", str(a), str(b))
    assert proc.returncode == 0
    assert proc.stdout.index("dentry") < proc.stdout.index("kmalloc-64")  # +1.5 MiB before -64 KiB
    rows = json.loads(cli("slabinfo-diff", str(a), str(b), "--json").stdout)
    assert [(r["name"], r["delta_bytes"]) for r in rows] == [("dentry", 8000 * 192), ("kmalloc-64", -1000 * 64)]


def test_slabinfo_diff_bad_input_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\n")
    proc = cli("slabinfo-diff", str(bad), str(bad))
    assert proc.returncode == 1 and str(bad) in proc.stderr and "not a slabinfo snapshot" in proc.stderr
    proc = cli("slabinfo-diff", str(tmp_path / "missing"), str(bad))
    assert proc.returncode == 1 and "missing" in proc.stderr


def test_bad_config_value_is_named_with_the_fix() -> None:
    proc = cli("check", env={"KILLCORD_MODE": "on"})
    assert proc.returncode == 2
    assert "KILLCORD_MODE" in proc.stderr and "'on'" in proc.stderr and "dry-run" in proc.stderr
    # a client command loads the whole configuration when the socket's own value is bad
    proc = cli("status", env={"KILLCORD_SOCKET": "control.sock"})
    assert proc.returncode == 2 and "KILLCORD_SOCKET" in proc.stderr and "absolute" in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", [["status"], ["arm"], ["disarm", "--for", "60"], ["recheck"]])
def test_client_commands_start_without_pydantic(command: list[str], ramdir: Path) -> None:
    """pydantic-settings took 0.75 s to import here and 5 s in an idle TCG guest before a panic could be
    sent: the clients find the socket through locate.py alone."""
    code = ("import sys\nfrom killcord import cli\nrc = cli.main(sys.argv[1:])\n"
            "print('loaded:', sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_settings')))\n"
            "sys.exit(rc)")
    e = {k: v for k, v in os.environ.items() if not k.startswith("KILLCORD_")}
    e.update(KILLCORD_SOCKET=str(ramdir / "control.sock"))
    fake = FakeDaemon(ramdir / "control.sock", "garbage")
    proc = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, env=e, timeout=60)
    fake.close()
    assert proc.returncode == 4, proc.stderr  # the garbage is no answer
    assert "loaded: []" in proc.stdout, proc.stdout + proc.stderr


def test_a_bad_value_in_the_file_does_not_hold_back_the_panic_request(ramdir: Path, tmp_path: Path) -> None:
    """An admin's typo after arming: the daemon runs with what it validated at start, so the
    panic request still goes to it (before, the CLI refused with exit 2 and sent nothing)."""
    got: list[bytes] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(ramdir / "control.sock"))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            got.append(conn.recv(4096))
            conn.sendall(b'{"ok": true, "state": "fired", "mode": "dry-run", "note": ""}\n')

    threading.Thread(target=serve, daemon=True).start()
    conf = tmp_path / "killcord.toml"
    conf.write_text(f'socket = "{ramdir / "control.sock"}"\nmode = "on"\n')
    proc = cli("--config", str(conf), "panic")
    srv.close()
    assert got and b'"cmd": "panic"' in got[0], (got, proc.stderr)
    assert proc.returncode == 0 and "fired" in proc.stdout, proc.stdout + proc.stderr


def test_status_without_daemon(ramdir: Path) -> None:
    proc = cli("status", "--json", env={"KILLCORD_SOCKET": str(ramdir / "none.sock")})
    assert proc.returncode == 4 and json.loads(proc.stdout)["state"] == "stopped"


def test_memlock_config_lists_the_interpreter() -> None:
    proc = cli("memlock-config")
    assert proc.returncode == 0
    assert f"+{os.path.realpath(sys.executable)}" in proc.stdout.splitlines()


@needs_root
def test_check_reports_each_item_with_a_fix(loopdev, ramdir: Path) -> None:
    dev = loopdev()
    proc = cli("check", "--json", env={"KILLCORD_MEDIUM": dev, "KILLCORD_SOCKET": str(ramdir / "none.sock")})
    report = json.loads(proc.stdout)
    items = {i["name"]: i for i in report["items"]}
    assert set(items) >= {"mode", "medium", "init_on_free", "kexec", "slabinfo", "daemon", "resident", "memlockd"}
    assert items["medium"]["ok"] and dev in items["medium"]["detail"]
    assert items["slabinfo"]["ok"]
    assert not items["daemon"]["ok"] and items["daemon"]["fix"]  # no daemon: required, so...
    assert proc.returncode == 1 and report["ok"] is False  # ...the check fails
    for item in items.values():
        assert item["ok"] or item["fix"], item
    text = cli("check", env={"KILLCORD_MEDIUM": dev, "KILLCORD_SOCKET": str(ramdir / "none.sock")})
    assert "[FAIL] daemon" in text.stdout and "fix:" in text.stdout


@needs_root
def test_panic_without_daemon_fires_here_dry(ramdir: Path) -> None:
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        proc = cli("panic", env={"KILLCORD_SOCKET": str(ramdir / "none.sock"), "KILLCORD_STATE_DIR": str(ramdir)})
        assert sentinel.poll() is None  # dry-run: nothing was killed
    finally:
        sentinel.kill()
        sentinel.wait()
    assert "firing here (dry-run)" in proc.stderr
    stages = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{") and '"stage"' in line]
    assert [s["stage"] for s in stages][:3] == ["kill", "keys", "audit"]
    assert proc.returncode == 0  # the dry poweroff "succeeds"
    assert list((ramdir / "records").glob("audit-*.json"))


def test_panic_without_daemon_unprivileged_is_denied(ramdir: Path) -> None:
    code = ("import os, sys, tomllib, killcord.cli, killcord.config, killcord.control\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "sys.exit(killcord.cli.main(['panic']))")
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    e = {k: v for k, v in os.environ.items() if not k.startswith("KILLCORD_")}
    e["KILLCORD_SOCKET"] = str(ramdir / "none.sock")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=60)
    assert proc.returncode == 13 and "only root can fire without the daemon" in proc.stderr


class FakeDaemon:
    """Something on the control socket that does not answer as a daemon should: silent,
    garbage, a reply of the wrong shape, or a listen queue that is full. A fake: the real
    daemon cannot be made to misbehave on purpose (test_control.py attacks the real one)."""

    def __init__(self, path: Path, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        path.chmod(0o666)
        self.sock.listen(0 if behaviour == "full" else 16)
        self.held: list[socket.socket] = []
        if behaviour == "full":  # fill the queue: nobody accepts
            for _ in range(4):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.setblocking(False)
                try:
                    c.connect(str(path))
                except BlockingIOError:
                    c.close()
                    break
                self.held.append(c)
            return
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            conn.recv(4096)
            if self.behaviour == "garbage":
                conn.sendall(b"\x00\xffgarbage\n")
            elif self.behaviour == "wrong":
                conn.sendall(b'{"ok": true, "note": "no state, no mode"}\n')

    def close(self) -> None:
        for c in self.held:
            c.close()
        self.sock.close()


@pytest.fixture
def fake_daemon(ramdir: Path, request: pytest.FixtureRequest):
    fake = FakeDaemon(ramdir / "control.sock", request.param)
    yield ramdir / "control.sock"
    fake.close()


@needs_root
@pytest.mark.parametrize("fake_daemon", ["silent", "garbage", "wrong", "full"], indirect=True)
def test_root_panic_fires_alone_when_no_valid_answer_comes(fake_daemon: Path, ramdir: Path) -> None:
    started = time.monotonic()
    proc = cli("panic", env={"KILLCORD_SOCKET": str(fake_daemon), "KILLCORD_STATE_DIR": str(ramdir)})
    assert "firing here (dry-run)" in proc.stderr, proc.stderr
    assert proc.returncode == 0
    assert time.monotonic() - started < 20  # the answer's deadline (2 s), then the dry stages
    assert list((ramdir / "records").glob("audit-*.json"))


@needs_root
@pytest.mark.parametrize("fake_daemon", ["silent", "full"], indirect=True)
def test_panic_group_member_without_an_answer_gets_a_clear_error(fake_daemon: Path) -> None:
    code = ("import os, sys, tomllib, killcord.cli, killcord.config, killcord.control\n"
            "os.setgroups([100]); os.setgid(65534); os.setuid(65534)\n"
            "sys.exit(killcord.cli.main(['panic']))")
    e = {k: v for k, v in os.environ.items() if not k.startswith("KILLCORD_")}
    e.update(KILLCORD_SOCKET=str(fake_daemon), KILLCORD_PANIC_GROUP="users")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=60)
    assert proc.returncode == 13, proc.stderr
    assert "no answer from the daemon" in proc.stderr and "only root can fire without the daemon" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_root
@pytest.mark.parametrize("fake_daemon", ["garbage", "wrong"], indirect=True)
def test_status_with_no_valid_answer_says_so(fake_daemon: Path) -> None:
    proc = cli("status", "--json", env={"KILLCORD_SOCKET": str(fake_daemon)})
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    assert out["state"] == "unreachable" and "no valid answer" in out["error"]


@needs_root
@pytest.mark.parametrize("fake_daemon", ["silent"], indirect=True)
def test_root_panic_does_not_start_a_second_sequence_while_the_daemon_fires(fake_daemon: Path, ramdir: Path) -> None:
    """A daemon busy firing (in its kexec or wipe stage) does not answer; it holds the
    firing lock, and the CLI must not kill it to start over."""
    from killcord import statedir

    fd = statedir.open_firing_lock(ramdir)  # as the daemon, at arm time
    statedir.take_firing_lock(fd)  # ...and when it starts firing
    try:
        proc = cli("panic", env={"KILLCORD_SOCKET": str(fake_daemon), "KILLCORD_STATE_DIR": str(ramdir)})
    finally:
        os.close(fd)
    assert proc.returncode == 0 and "firing already" in proc.stdout, proc.stderr
    assert "firing here" not in proc.stderr and not list((ramdir / "records").glob("audit-*"))
