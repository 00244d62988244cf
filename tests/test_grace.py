"""grace_ms with the daemon in dry-run, on real loop devices really removed from the kernel
(a genuine `remove` uevent): the notice period, the medium back in time under a new
devpath (found again by its identity, the loop's backing file), a panic and a disarm
meanwhile. The notices themselves: test_notice.py (terminals, a real session bus)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import needs_root, remove_loop
from test_daemon import env, run_cli, start_daemon, status, wait_for  # noqa: F401  (fixtures)

pytestmark = [needs_root]


def backing(dev: str) -> str:
    return Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip()


def test_a_pulled_medium_gets_a_notice_period_then_fires(loopdev, env, start_daemon) -> None:
    dev = loopdev()
    start_daemon(medium=dev, grace_ms="2000")
    armed = wait_for(env, "armed")
    assert armed["grace"]["ms"] == 2000 and armed["grace"]["back_if"] == f"loop:{backing(dev)}#disk"
    assert armed["grace"]["seconds_left"] is None
    remove_loop(dev)
    s = wait_for(env, "grace", timeout=5)
    assert s["stages"] == [] and 0 < s["grace"]["seconds_left"] <= 2.0
    assert s["grace"]["trigger"].startswith("uevent remove /devices/virtual/block/")
    assert "firing in" in run_cli(env, "status").stdout
    fired = wait_for(env, "fired", timeout=15)
    assert fired["trigger"].endswith(", gone still when the grace period ended"), fired["trigger"]
    assert fired["grace"]["notices"] is not None  # told whoever was logged in (here: nobody, perhaps)
    assert [st["name"] for st in fired["stages"]][:2] == ["kill", "keys"]


def test_the_medium_back_in_time_under_a_new_devpath_stays_armed(loopdev, env, start_daemon, tmp_path: Path) -> None:
    dev = loopdev()
    image = backing(dev)
    log = tmp_path / "daemon.log"
    start_daemon(medium=dev, grace_ms="3000", log=log)
    wait_for(env, "armed")
    remove_loop(dev)
    assert wait_for(env, "grace", timeout=5)["stages"] == []
    # placeholders take the freed number: the medium comes back as another device
    while subprocess.run(["losetup", "--find"], check=True, capture_output=True, text=True).stdout.strip() == dev:
        loopdev()
    again = subprocess.run(["losetup", "--find", "--show", image], check=True, capture_output=True,
                           text=True).stdout.strip()
    try:
        assert again != dev
        s = wait_for(env, "armed", timeout=10)
        assert s["medium"]["device"] == again and s["stages"] == [], s["medium"]
        assert any(e["event"] == "MediumBack" for e in s["events"]), s["events"]
        time.sleep(0.5)  # the notices go from a thread of their own
        told = [json.loads(line).get("text", "") for line in log.read_text().splitlines() if '"notice"' in line]
        assert told[0].startswith("killcord: the boot medium is gone.") and "(dry-run: nothing will happen)" in told[0]
        assert told[1] == "killcord: the boot medium is back. Armed again; nothing was stopped.", told
        remove_loop(again)  # watched where it is now: its removal starts a new period
        assert wait_for(env, "grace", timeout=5)["grace"]["trigger"].endswith(Path(again).name)
        assert wait_for(env, "fired", timeout=15)["trigger"].endswith("gone still when the grace period ended")
    finally:
        subprocess.run(["losetup", "--detach", again], check=False, capture_output=True)


def test_a_panic_never_waits_and_a_disarm_ends_the_period(loopdev, env, start_daemon) -> None:
    dev = loopdev()
    start_daemon(medium=dev, grace_ms="60000")
    wait_for(env, "armed")
    remove_loop(dev)
    wait_for(env, "grace", timeout=5)
    assert run_cli(env, "disarm", "--for", "60s", "--reason", "pulled it on purpose").returncode == 0
    s = status(env)
    assert s["state"] == "disarmed" and s["grace"]["seconds_left"] is None
    assert run_cli(env, "panic").returncode == 0
    assert wait_for(env, "fired")["trigger"].startswith("panic uid=0")


def test_a_grace_period_out_of_range_is_refused_at_start(loopdev, env, start_daemon) -> None:
    proc = start_daemon(medium=loopdev(), grace_ms="400000")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "grace_ms" in err and "400000 is not 0 (fire at once) to 300000 ms" in err
