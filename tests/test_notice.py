"""The grace period's notices (notice.py, desktop.py), on real parts: a pseudo-terminal
for a logged-in terminal, and a real dbus-daemon session bus run as an unprivileged user,
watched by dbus-monitor, for a graphical session's desktop. logind's session files are
faked (a directory laid out as /run/systemd/sessions, named as such): this machine has no
logged-in session."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root

from killcord import desktop, notice

pytestmark = needs_root

NOBODY = 65534


def fake_logind(root: Path, sessions: dict[str, dict[str, str]]) -> Path:
    d = root / "fake-logind-sessions"
    d.mkdir()
    for sid, fields in sessions.items():
        (d / sid).write_text("".join(f"{k}={v}\n" for k, v in fields.items()))
    return d


def test_sessions_are_read_from_loginds_files(tmp_path: Path) -> None:
    d = fake_logind(tmp_path, {
        "2": {"UID": "1000", "USER": "amnesia", "TYPE": "wayland", "TTY": "tty2", "STATE": "active"},
        "c1": {"UID": "118", "USER": "Debian-gdm", "TYPE": "wayland", "STATE": "closing"},
        "5": {"UID": "0", "USER": "root", "TYPE": "tty", "TTY": "pts/3", "STATE": "online"},
        "junk": {"USER": "no uid"},
    })
    found = notice.sessions(d)
    assert [(s.id, s.uid, s.graphical, s.tty) for s in found] == [("2", 1000, True, "tty2"), ("5", 0, False, "pts/3")]
    assert notice.sessions(tmp_path / "absent") == []


def test_a_logged_in_terminal_gets_the_notice_and_a_stopped_one_does_not_block(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty = os.ttyname(slave).removeprefix("/dev/")
    stuck_master, stuck = os.openpty()  # nobody reads it: its buffer fills
    stuck_tty = os.ttyname(stuck).removeprefix("/dev/")
    os.set_blocking(stuck, False)
    try:
        while True:
            os.write(stuck, b"x" * 4096)
    except BlockingIOError:
        pass
    found = [notice.Session("1", 0, "root", "tty", tty, "active"),
             notice.Session("2", 0, "root", "tty", stuck_tty, "active"),
             notice.Session("3", 0, "root", "tty", "../../etc/passwd", "active")]  # never a path outside /dev
    t0 = time.monotonic()
    reached = notice.to_terminals("killcord: the boot medium is gone", found)
    assert time.monotonic() - t0 < 5
    assert tty in reached and "../../etc/passwd" not in reached
    os.set_blocking(master, False)
    assert b"*** killcord: the boot medium is gone ***" in os.read(master, 4096)
    for fd in (master, slave, stuck_master, stuck):
        os.close(fd)


@pytest.fixture
def session_bus() -> Iterator[tuple[Path, Path]]:
    """A real session bus for uid nobody at <run_user>/65534/bus, and dbus-monitor's log of
    every call to org.freedesktop.Notifications on it (in a directory nobody can reach:
    pytest's own are root's alone)."""
    daemon = shutil.which("dbus-daemon")
    assert daemon, "dbus-daemon is missing: make setup installs it"
    top = Path(tempfile.mkdtemp(prefix="killcord-bus-"))
    top.chmod(0o755)
    run_user = top / "run-user"
    home = run_user / str(NOBODY)
    home.mkdir(parents=True)
    os.chown(home, NOBODY, NOBODY)
    home.chmod(0o700)
    run_user.chmod(0o755)
    as_nobody = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    bus = subprocess.Popen(as_nobody + [daemon, "--session", f"--address=unix:path={home}/bus", "--nofork"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if (home / "bus").is_socket():
            break
        time.sleep(0.05)
    log = top / "monitor.log"
    with open(log, "w") as out:
        monitor = subprocess.Popen(as_nobody + ["dbus-monitor", "--address", f"unix:path={home}/bus",
                                                "interface='org.freedesktop.Notifications'"], stdout=out,
                                   stderr=subprocess.STDOUT)
    time.sleep(0.5)  # the monitor has registered
    yield run_user, log
    for p in (monitor, bus):
        p.terminate()
        p.wait(10)
    shutil.rmtree(top, ignore_errors=True)


def test_a_graphical_sessions_desktop_is_asked_to_show_it(session_bus) -> None:
    run_user, log = session_bus
    found = [notice.Session("2", NOBODY, "nobody", "wayland", "", "active"),
             notice.Session("7", 4242, "gone", "x11", "", "active")]  # no bus: said so, not fatal
    reached = notice.tell("killcord: the boot medium is gone. In 5 s every program stops.", 5000, found,
                          run_user=run_user)
    time.sleep(0.5)
    seen = log.read_text()
    assert 'member=Notify' in seen, seen
    assert 'string "killcord: the boot medium is gone"' in seen and 'string "In 5 s every program stops."' in seen
    assert 'string "urgency"' in seen and "byte 2" in seen and "int32 5000" in seen
    # no notification service on this bare bus: the bus itself answered, and that is reported
    assert reached["desktops"] == []
    assert f"uid {NOBODY}: refused: org.freedesktop.DBus.Error.ServiceUnknown" in reached["not_reached"]
    assert any(r.startswith("uid 4242: ") for r in reached["not_reached"]), reached


def test_root_is_not_who_talks_to_the_users_bus(session_bus) -> None:
    """A session bus refuses root: the notice reaches it only as its user (the forked child)."""
    run_user, _ = session_bus
    bus = run_user / str(NOBODY) / "bus"
    assert desktop.send(bus, 0, "x", "y", 1000, wait_s=2.0) != "refused: org.freedesktop.DBus.Error.ServiceUnknown"
    assert desktop.notify_user(NOBODY, NOBODY, "x", "y", 1000, run_user) == \
        "refused: org.freedesktop.DBus.Error.ServiceUnknown"
