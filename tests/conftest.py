"""Real edges for tests: loop devices as the boot medium, synthetic kernel uevents."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LOOP_CTL_REMOVE = 0x4C81

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and uevents (CI runs as root)")


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: attach a fresh loop device; all detached afterwards."""
    attached: list[str] = []

    def make(size_mib: int = 8) -> str:
        img = tmp_path / f"disk{len(attached)}.img"
        with open(img, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        args = ["losetup", "--find", "--show", str(img)]
        dev = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
        attached.append(dev)
        return dev

    yield make
    for dev in attached:
        subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)


def remove_loop(dev: str) -> None:
    """Really remove a loop device: detach, then LOOP_CTL_REMOVE. The kernel deletes it
    from sysfs and sends a genuine `remove` uevent, as for a pulled stick."""
    subprocess.run(["losetup", "--detach", dev], check=True)
    fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(50):  # the detach completes asynchronously
            try:
                fcntl.ioctl(fd, LOOP_CTL_REMOVE, int(dev.removeprefix("/dev/loop")))
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"could not remove {dev}")
    finally:
        os.close(fd)


def send_uevent(dev: str, action: str) -> None:
    """Make the kernel emit a real uevent for a block device (no hardware needed)."""
    Path(f"/sys/class/block/{Path(dev).name}/uevent").write_text(action)


@pytest.fixture
def ramdir() -> Iterator[Path]:
    """A state directory on tmpfs, as killcord requires for its records."""
    d = Path(tempfile.mkdtemp(prefix="killcord-test-", dir="/dev/shm"))
    os.chmod(d, 0o755)  # the control socket in it must be reachable by an unprivileged client
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake_usb_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake sysfs holding a USB stick's device chain (this machine has no USB bus and its
    kernel no partition tables). Named fake: only the layout, as the kernel builds it."""
    from killcord import medium

    sys_root = tmp_path / "sys"
    chain = ["devices", "pci0000:00", "0000:00:14.0", "usb1", "1-1", "1-1:1.0", "host0",
             "target0:0:0", "0:0:0:0", "block", "sda", "sda1"]
    not_devices = {"devices", "block"}
    sys_root.mkdir()
    path = sys_root
    for part in chain:
        path = path / part
        path.mkdir()
        if part not in not_devices:
            (path / "uevent").write_text("")
    (sys_root / "devices" / "pci0000:00" / "0000:00:14.0" / "usb1" / "1-1" / "serial").write_text("STICK123\n")
    (sys_root / "dev" / "block").mkdir(parents=True)
    (sys_root / "dev" / "block" / "8:1").symlink_to(path)
    (sys_root / "class" / "block").mkdir(parents=True)
    (sys_root / "class" / "block" / "sda1").symlink_to(path)
    monkeypatch.setattr(medium, "SYS", sys_root)
    return sys_root
