"""Finding the medium and its ancestry on real (loop) block devices."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import needs_root, remove_loop

from killcord import medium

pytestmark = needs_root


def test_whole_loop_device(loopdev) -> None:
    dev = loopdev()
    m = medium.resolve(dev, Path("/nonexistent"))
    name = Path(dev).name
    assert m.devpaths == (f"/devices/virtual/block/{name}",)
    assert m.device == dev and m.source == "config" and m.optical == frozenset()
    assert medium.present(m)


USB_PART = "/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0/host0/target0:0:0/0:0:0:0/block/sda/sda1"


def test_usb_partition_watches_every_ancestor(fake_usb_sysfs: Path) -> None:
    m = medium._from_sys_path(fake_usb_sysfs / "dev" / "block" / "8:1", "/dev/sda1", "config")
    parts = USB_PART.split("/")
    expected = tuple("/".join(parts[:i]) for i in range(len(parts), 2, -1) if parts[i - 1] != "block")
    assert m.devpaths == expected
    assert m.devpaths[0] == USB_PART and m.devpaths[1].endswith("/block/sda")
    assert "/devices/pci0000:00/0000:00:14.0/usb1/1-1" in m.devpaths  # the USB device itself
    assert m.devpaths[-1] == "/devices/pci0000:00"


def test_serial_found_on_the_usb_ancestor(fake_usb_sysfs: Path) -> None:
    m = medium.resolve("serial:STICK123", Path("/x"))
    assert m.devpaths[0] == USB_PART and m.device == "/dev/sda1"


def test_usb_style_ancestry_from_sysfs() -> None:
    # every parent directory with a uevent file is a device: for /sys/devices/virtual/mem/null
    # that is the device alone (virtual/ and mem/ are not devices)
    assert medium.ancestry(Path("/sys/devices/virtual/mem/null")) == ["/devices/virtual/mem/null"]
    pci = sorted(Path("/sys/bus/pci/devices").glob("*"))
    if pci:  # a PCI device's ancestry ends at its root bus
        chain = medium.ancestry(pci[0])
        assert chain[0] == medium.devpath_of(pci[0]) and chain[-1].count("/") == 2


def test_bad_device_paths_are_refused_with_the_fix() -> None:
    with pytest.raises(medium.MediumError, match="/dev/nonexistent-disk.*give an existing block device"):
        medium.resolve("/dev/nonexistent-disk", Path("/x"))
    with pytest.raises(medium.MediumError, match="/dev/null.*not a block device"):
        medium.resolve("/dev/null", Path("/x"))


def test_serial_uuid_id_path_not_found_name_the_value() -> None:
    for spec in ("serial:NO-SUCH-SERIAL-42", "uuid:0000-0000", "id-path:pci-nothing"):
        with pytest.raises(medium.MediumError, match=spec):
            medium.resolve(spec, Path("/x"))


def test_auto_finds_a_live_boot_mount(loopdev, tmp_path: Path) -> None:
    dev = loopdev(size_mib=16)
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    mnt = tmp_path / "medium"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro", dev, str(mnt)], check=True)
    try:
        m = medium.resolve("auto", mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert m.source == "live-boot" and m.devpaths[0] == f"/devices/virtual/block/{Path(dev).name}"


def test_auto_without_live_boot_uses_root_or_says_how_to_fix() -> None:
    numbers = medium._mount_source(Path("/"))
    if numbers and numbers[0] != 0 and Path(f"/sys/dev/block/{numbers[0]}:{numbers[1]}").exists():
        m = medium.resolve("auto", Path("/nonexistent"))
        assert m.source == "root" and medium.present(m)
    else:
        with pytest.raises(medium.MediumError, match="set medium"):
            medium.resolve("auto", Path("/nonexistent"))


def test_record_notices_a_medium_gone_since_arming(loopdev, ramdir: Path) -> None:
    dev = loopdev()
    m = medium.resolve(dev, Path("/x"))
    medium.remember(m, ramdir)
    assert oct((ramdir / medium.RECORD).stat().st_mode & 0o777) == "0o600"
    assert medium.recorded_absent(ramdir) is None  # still there
    remove_loop(dev)
    assert not medium.present(m)
    gone = medium.recorded_absent(ramdir)
    assert gone is not None and dev in gone


def test_record_from_another_boot_is_ignored(ramdir: Path) -> None:
    fake = medium.Medium("/dev/sdz", ("/devices/none/block/sdz",), frozenset(), "config")
    medium.remember(fake, ramdir)
    assert medium.recorded_absent(ramdir) is not None
    rec = (ramdir / medium.RECORD).read_text().replace(medium._boot_id(), "another-boot")
    (ramdir / medium.RECORD).write_text(rec)
    assert medium.recorded_absent(ramdir) is None


def test_cord_needs_matching_serial_and_port() -> None:
    with pytest.raises(medium.MediumError, match="no USB device with a serial number at port 9-9"):
        medium.resolve_cord("serial:ABC@9-9")


def test_media_present_reads_size(loopdev) -> None:
    dev = loopdev()
    assert medium.media_present(f"/devices/virtual/block/{Path(dev).name}")
    assert not medium.media_present("/devices/virtual/block/no-such-device")
