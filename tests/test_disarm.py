"""`killcord disarm --for` and `killcord arm` with the daemon in dry-run, on real loop
devices really removed from the kernel (a genuine `remove` uevent), as root, as a
panic_group member and as an unprivileged user."""

from __future__ import annotations

import time

from conftest import needs_root, remove_loop, send_uevent
from test_daemon import env, run_cli, start_daemon, status, wait_for  # noqa: F401  (fixtures)

pytestmark = [needs_root]


def test_a_removal_while_disarmed_is_held_then_fires_when_the_time_runs_out(loopdev, env, start_daemon) -> None:
    dev = loopdev()
    start_daemon(medium=dev)
    wait_for(env, "armed")
    ok = run_cli(env, "disarm", "--for", "3s", "--reason", "moving the stick")
    assert ok.returncode == 0 and "disarmed for 3 s" in ok.stdout, ok.stderr
    s = status(env)
    assert s["state"] == "disarmed" and s["disarmed"]["reason"] == "moving the stick"
    assert 0 < s["disarmed"]["seconds_left"] <= 3
    remove_loop(dev)  # a genuine remove uevent: held
    time.sleep(1.0)
    s = status(env)
    assert s["state"] == "disarmed" and s["disarmed"]["held_triggers"] >= 1 and s["stages"] == []
    fired = wait_for(env, "fired", timeout=15)  # not back when the time ran out: it fires
    assert fired["trigger"].startswith("medium absent (disarm ended"), fired["trigger"]


def test_a_medium_back_in_time_stays_armed(loopdev, env, start_daemon) -> None:
    dev = loopdev()
    start_daemon(medium=dev)
    wait_for(env, "armed")
    assert run_cli(env, "disarm", "--for", "2").returncode == 0
    send_uevent(dev, "remove")  # the kernel says remove, the device is still there ("back")
    time.sleep(3.0)
    s = status(env)
    assert s["state"] == "armed" and s["stages"] == [] and s["disarmed"] is None
    remove_loop(dev)  # armed again: a removal fires at once
    assert wait_for(env, "fired")["trigger"].startswith("uevent remove")


def test_arm_ends_a_disarm_early_and_fires_if_the_medium_is_gone(loopdev, env, start_daemon) -> None:
    dev = loopdev()
    start_daemon(medium=dev)
    wait_for(env, "armed")
    assert run_cli(env, "disarm", "--for", "5m").returncode == 0
    remove_loop(dev)
    time.sleep(0.5)
    assert status(env)["state"] == "disarmed"
    ok = run_cli(env, "arm")
    assert ok.returncode == 0 and "re-armed" in ok.stdout
    assert wait_for(env, "fired")["trigger"].startswith("medium absent (re-armed by uid 0")


def test_panic_fires_while_disarmed(loopdev, env, start_daemon) -> None:
    start_daemon(medium=loopdev())
    wait_for(env, "armed")
    assert run_cli(env, "disarm", "--for", "60s").returncode == 0
    assert run_cli(env, "panic").returncode == 0
    assert wait_for(env, "fired")["trigger"].startswith("panic uid=0")


def test_who_may_disarm_and_for_how_long(loopdev, env, start_daemon) -> None:
    start_daemon(medium=loopdev(), panic_group="users", disarm_max_s="120")  # users: gid 100 on Debian
    wait_for(env, "armed")
    refused = run_cli(env, "disarm", "--for", "60", user=65534)
    assert refused.returncode == 13 and "permission denied: uid 65534 may not disarm" in refused.stderr
    assert run_cli(env, "arm", user=65534).returncode == 13
    assert status(env)["state"] == "armed"
    too_long = run_cli(env, "disarm", "--for", "3m")
    assert too_long.returncode == 1 and "at most disarm_max_s = 120 s" in too_long.stderr
    bad = run_cli(env, "disarm", "--for", "soon")
    assert bad.returncode == 2 and "'soon' is not a duration" in bad.stderr
    assert status(env)["state"] == "armed"
    member = run_cli(env, "disarm", "--for", "2m", "--reason", "toram", user=65534, groups="100")
    assert member.returncode == 0, member.stderr
    assert status(env)["disarmed"]["uid"] == 65534


def test_disarm_requests_are_checked_before_the_daemon_acts() -> None:
    import json

    import pytest

    from killcord import control

    ok = control.parse_request(b'{"cmd": "disarm", "seconds": 60, "reason": "moving the stick"}')
    assert (ok.command.name, ok.seconds, ok.reason) == ("disarm", 60, "moving the stick")
    for bad, says in [({"seconds": True}, "seconds = True"), ({"seconds": 1.5}, "seconds = 1.5"),
                      ({"seconds": 0}, "seconds = 0"), ({"seconds": 86_401}, "1 to 86400"),
                      ({"seconds": "60"}, "seconds = '60'"), ({}, "seconds = None"),
                      ({"seconds": 5, "reason": "x" * 101}, "at most 100"),
                      ({"seconds": 5, "reason": "a\nb"}, "printable"), ({"seconds": 5, "uid": 0}, "not uid")]:
        with pytest.raises(ValueError, match=says):
            control.parse_request(json.dumps({"cmd": "disarm", **bad}).encode())
    with pytest.raises(ValueError, match="arm takes no arguments, not seconds"):
        control.parse_request(b'{"cmd": "arm", "seconds": 5}')


def test_a_medium_moved_while_disarmed_is_watched_where_it_is_now(loopdev, env, start_daemon) -> None:
    """The stick moved to another port meanwhile (here: the same image attached again as
    another loop device): found again by its identity, watched there, nothing fired."""
    import subprocess
    from pathlib import Path

    dev = loopdev()
    image = Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip()
    start_daemon(medium=dev)
    wait_for(env, "armed")
    assert run_cli(env, "disarm", "--for", "3s", "--reason", "moving the stick").returncode == 0
    remove_loop(dev)
    while subprocess.run(["losetup", "--find"], check=True, capture_output=True, text=True).stdout.strip() == dev:
        loopdev()  # placeholders: it comes back as another device
    again = subprocess.run(["losetup", "--find", "--show", image], check=True, capture_output=True,
                           text=True).stdout.strip()
    try:
        time.sleep(4.0)
        s = status(env)
        assert s["state"] == "armed" and s["stages"] == [] and s["medium"]["device"] == again, s["medium"]
        remove_loop(again)  # watched where it is now
        assert wait_for(env, "fired")["trigger"].startswith(f"uevent remove /devices/virtual/block/{Path(again).name}")
    finally:
        subprocess.run(["losetup", "--detach", again], check=False, capture_output=True)
