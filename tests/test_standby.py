"""The standby (standby.py) from a real daemon in dry-run, on real loop devices: the daemon
killed with SIGKILL, the standby takes over and fires on the medium's genuine `remove`;
a clean stop ends it; a new daemon armed ends it; a medium gone while nobody watched
fires at the takeover. (Its own scope unit needs systemd: scenario i in QEMU.)"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from conftest import needs_root, remove_loop
from test_daemon import env, start_daemon, status, wait_for  # noqa: F401  (fixtures)

pytestmark = [needs_root]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours (the daemon, reaped only by the test) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def lines(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def wait_line(log: Path, event: str, timeout: float = 15.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [e for e in lines(log) if e.get("event") == event]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {event!r} in the log:\n{log.read_text()[-3000:]}")


def test_the_daemon_killed_the_standby_fires_on_the_removal(loopdev, env, start_daemon, tmp_path: Path) -> None:
    dev = loopdev()
    log = tmp_path / "daemon.log"
    proc = start_daemon(medium=dev, log=log)
    armed = wait_for(env, "armed")
    spare = armed["standby"]["pid"]
    assert spare != proc.pid and alive(spare)
    assert armed["standby"]["scope"] is None and "own cgroup" in armed["standby"]["note"]  # no systemd here
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    took = wait_line(log, "standby_takeover")
    assert took["daemon_pid"] == proc.pid and took["pid"] == spare
    assert alive(spare)  # the medium is there: it watches
    remove_loop(dev)  # a genuine remove uevent, with no daemon left
    fired = wait_line(log, "fire")
    assert fired["trigger"].startswith("uevent remove /devices/virtual/block/"), fired
    assert gone_within(spare, 15)  # fired (dry-run), done


def test_a_clean_stop_ends_it(loopdev, env, start_daemon) -> None:
    proc = start_daemon(medium=loopdev())
    spare = wait_for(env, "armed")["standby"]["pid"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert gone_within(spare, 5)


def test_a_new_daemon_armed_ends_it(loopdev, env, start_daemon, tmp_path: Path) -> None:
    dev = loopdev()
    log = tmp_path / "daemon.log"
    proc = start_daemon(medium=dev, log=log)
    spare = wait_for(env, "armed")["standby"]["pid"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_line(log, "standby_takeover")
    again = start_daemon(medium=dev)  # as systemd's restart would
    assert wait_for(env, "armed")["pid"] == again.pid
    assert gone_within(spare, 10)
    assert wait_line(log, "standby_done")["note"] == "a new daemon is armed"
    assert status(env)["stages"] == []  # nothing fired


def test_a_medium_gone_before_the_takeover_fires_at_once(loopdev, env, start_daemon, tmp_path: Path) -> None:
    dev = loopdev()
    log = tmp_path / "daemon.log"
    proc = start_daemon(medium=dev, log=log)
    spare = wait_for(env, "armed")["standby"]["pid"]
    os.kill(proc.pid, signal.SIGSTOP)  # the daemon hangs: it sees nothing
    remove_loop(dev)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)  # then dies (as systemd's watchdog would make it)
    proc.wait()
    fired = wait_line(log, "fire")
    assert fired["trigger"].startswith("medium absent (the daemon died; the standby took over"), fired
    assert gone_within(spare, 15)
