"""Real edges for tests: loop devices as the boot medium, synthetic kernel uevents."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LOOP_CTL_REMOVE = 0x4C81

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and uevents (CI runs as root)")


def _on_ram_fs(path: Path) -> bool:
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()
    return kind in ("tmpfs", "ramfs")


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: attach a fresh loop device; all detached afterwards. Its image sits on a disk:
    killcord refuses a loop whose file is in RAM (Debian 13 mounts /tmp as tmpfs)."""
    attached: list[str] = []
    images = Path(tempfile.mkdtemp(prefix="killcord-loop-", dir="/var/tmp")) if _on_ram_fs(tmp_path) else tmp_path

    def make(size_mib: int = 8) -> str:
        img = images / f"disk{len(attached)}.img"
        with open(img, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        args = ["losetup", "--find", "--show", str(img)]
        dev = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
        attached.append(dev)
        return dev

    yield make
    for dev in attached:
        subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)
    if images != tmp_path:
        shutil.rmtree(images, ignore_errors=True)


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
    usb = sys_root / "devices" / "pci0000:00" / "0000:00:14.0" / "usb1" / "1-1"
    (usb / "serial").write_text("STICK123\n")
    (sys_root / "bus" / "usb").mkdir(parents=True)
    for d in (usb, usb / "1-1:1.0"):  # as the kernel links them: subsystem -> /sys/bus/usb
        (d / "subsystem").symlink_to(os.path.relpath(sys_root / "bus" / "usb", d))
    disk = path.parent
    (disk / "size").write_text("15634432\n")  # 512-byte sectors: an 8 GB stick
    (disk / "removable").write_text("1\n")
    (path / "size").write_text("15632384\n")
    (path / "partition").write_text("1\n")
    (sys_root / "dev" / "block").mkdir(parents=True)
    (sys_root / "dev" / "block" / "8:1").symlink_to(path)
    (sys_root / "dev" / "block" / "8:0").symlink_to(disk)
    (sys_root / "class" / "block").mkdir(parents=True)
    (sys_root / "class" / "block" / "sda1").symlink_to(path)
    monkeypatch.setattr(medium, "SYS", sys_root)
    return sys_root


def _fake_block(sys_root: Path, devpath: str, dev: str, size: int, **attrs: str) -> Path:
    """One block device in a fake sysfs: its devices/ directory, /sys/dev/block and /sys/class/block links."""
    path = sys_root / devpath.lstrip("/")
    for parent in reversed(path.relative_to(sys_root / "devices").parents[:-1]):
        d = sys_root / "devices" / parent
        d.mkdir(exist_ok=True)
        if d.name != "block" and d.name != "virtual":
            (d / "uevent").write_text("")
    path.mkdir()
    (path / "uevent").write_text("")
    (path / "size").write_text(f"{size}\n")
    for name, value in attrs.items():
        (path / name).write_text(f"{value}\n")
    (sys_root / "dev" / "block" / dev).symlink_to(path)
    (sys_root / "class" / "block" / path.name).symlink_to(path)
    return path


@pytest.fixture
def fake_storage_sysfs(fake_usb_sysfs: Path) -> Path:
    """The fake USB stick plus what this machine cannot make (no device-mapper, no SCSI):
    LVM on LUKS on the stick's partition (dm-1 on dm-0 on sda1), an optical drive sr0 with a
    disc in it, and an internal SATA disk sdb. Named fake: only the layout, as the kernel builds it."""
    sys_root = fake_usb_sysfs
    sda1 = sys_root / "dev" / "block" / "8:1"
    crypt = _fake_block(sys_root, "/devices/virtual/block/dm-0", "254:0", 15628288, removable="0")
    (crypt / "slaves").mkdir()
    (crypt / "slaves" / "sda1").symlink_to(os.path.relpath(sda1.resolve(), crypt / "slaves"))
    lv = _fake_block(sys_root, "/devices/virtual/block/dm-1", "254:1", 8388608, removable="0")
    (lv / "slaves").mkdir()
    (lv / "slaves" / "dm-0").symlink_to(os.path.relpath(crypt, lv / "slaves"))
    ata = "/devices/pci0000:00/0000:00:1f.2"
    sr0 = _fake_block(sys_root, f"{ata}/ata2/host1/target1:0:0/1:0:0:0/block/sr0", "11:0", 1433600, removable="1")
    (sr0.parent.parent / "type").write_text("5\n")  # SCSI TYPE_ROM
    (sr0 / "device").symlink_to("../../../1:0:0:0")
    sdb = _fake_block(sys_root, f"{ata}/ata1/host2/target2:0:0/2:0:0:0/block/sdb", "8:16", 500118192, removable="0")
    (sdb.parent.parent / "type").write_text("0\n")  # SCSI TYPE_DISK
    (sdb / "device").symlink_to("../../../2:0:0:0")
    return sys_root


def load_suite_chroot():
    """packaging/suite_chroot.py (a build script, not a package) as a module."""
    spec = importlib.util.spec_from_file_location("suite_chroot", ROOT / "packaging" / "suite_chroot.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
