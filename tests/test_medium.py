"""Finding the medium, what it stands on and its ancestry, on real (loop) block devices and,
where this machine has no such hardware (USB, SCSI, device-mapper), on a fake sysfs."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import needs_root, remove_loop

from killcord import medium, statedir, watch
from killcord.config import DEFAULT_DEADLINES_MS
from killcord.events import Armed, Stage, Uevent
from killcord.machine import Machine

pytestmark = needs_root


def loop_devpath(dev: str) -> str:
    return f"/devices/virtual/block/{Path(dev).name}"


def holder_devpath(path: Path) -> str:
    """The devpath of the block device whose file system holds path (its st_dev, from sysfs)."""
    st = os.stat(path)
    return medium.devpath_of(Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))


def test_whole_loop_device(loopdev) -> None:
    dev = loopdev()
    m = medium.resolve(dev, Path("/nonexistent"))
    image = Path(Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip())
    assert m.devpaths[0] == loop_devpath(dev) and m.blocks[0] == loop_devpath(dev)
    # the loop reads a file: the disk holding that file is watched too
    assert holder_devpath(image) in m.devpaths and holder_devpath(image) in m.blocks
    assert m.device == dev and m.source == "config" and m.media_watched == frozenset()  # loops: no pull
    assert medium.present(m)


@contextmanager
def mounted(source: str, target: Path, *options: str) -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", *options, source, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "--lazy", str(target)], check=False)


@contextmanager
def attached(image: Path) -> Iterator[str]:
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)


def make_image(path: Path, size_mib: int = 8) -> Path:
    with open(path, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    return path


def test_findiso_loop_on_a_file_on_another_loop_watches_the_device_below(loopdev, tmp_path: Path) -> None:
    """live-boot findiso=: the medium is a loop whose file (the ISO) sits on the stick. Here the
    stick is loop A (ext4), the ISO an image file on it, the medium loop B."""
    stick = loopdev(size_mib=32)
    subprocess.run(["mkfs.ext4", "-q", stick], check=True)
    with mounted(stick, tmp_path / "findiso") as mnt:
        with attached(make_image(mnt / "live.iso")) as iso:
            m = medium.resolve(iso, Path("/nonexistent"))
            assert m.devpaths[0] == loop_devpath(iso)
            assert loop_devpath(stick) in m.devpaths and loop_devpath(stick) in m.blocks
            assert m.chain[:2] == (Path(iso).name, f"file {mnt / 'live.iso'} on {Path(stick).name}")
            w = watch.Watcher()
            machine = Machine(DEFAULT_DEADLINES_MS)
            machine.feed(Armed(frozenset(m.devpaths), m.media_watched))
    # the ISO's loop is detached and the stick's file system unmounted: the stick can go for real
    remove_loop(stick)
    fired: list[str] = []
    while not fired and select.select([w.fileno()], [], [], 5)[0]:
        events, _ = w.drain(m.media_watched)
        fired += [machine.trigger or "" for e in events if machine.feed(e)]
    assert fired == [f"uevent remove {loop_devpath(stick)}"]
    assert not medium.present(m)


def test_loop_on_a_file_in_ram_is_refused_naming_the_chain_and_the_fix(tmp_path: Path) -> None:
    with mounted("tmpfs", tmp_path / "ram", "-t", "tmpfs"):
        with attached(make_image(tmp_path / "ram" / "medium.img")) as dev:
            with pytest.raises(medium.MediumError) as err:
                medium.resolve(dev, Path("/nonexistent"))
    assert type(err.value) is not medium.MediumInRam  # only medium = "auto" may arm for panic only
    msg = str(err.value)
    assert dev in msg and f"file {tmp_path / 'ram' / 'medium.img'} on tmpfs" in msg
    assert "nowhere physical" in msg and 'set medium = "/dev/..."' in msg


def test_auto_with_the_live_medium_copied_to_ram_arms_for_panic_only(tmp_path: Path) -> None:
    """live-boot toram: /run/live/medium becomes a tmpfs holding the copy; the squashfs is then
    loop-mounted from a file on it."""
    with mounted("tmpfs", tmp_path / "medium", "-t", "tmpfs") as live:
        with pytest.raises(medium.MediumInRam, match=r"copied to RAM \(toram\).*panic only"):
            medium.resolve("auto", live)
        with attached(make_image(live / "filesystem.img", 16)) as dev:
            subprocess.run(["mkfs.ext4", "-q", dev], check=True)
            with mounted(dev, tmp_path / "rootfs", "-o", "ro") as rootfs:
                with pytest.raises(medium.MediumInRam, match=f"{Path(dev).name} -> file .* on tmpfs"):
                    medium.resolve("auto", rootfs)  # a live mount whose chain ends in RAM


IN_NAMESPACE = """
import sys
from pathlib import Path
from killcord import medium
medium.CMDLINE = Path(sys.argv[1])
try:
    m = medium.resolve("auto", Path("/run/no-live-medium"))
    print("armed", m.device, m.source)
except medium.MediumError as exc:
    print(type(exc).__name__, exc)
"""


def auto_in_a_namespace(tmp_path: Path, cmdline: str, root_mount: list[str]) -> str:
    """Resolve "auto" in a private mount namespace whose / is covered by another mount."""
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    script = f'mount {" ".join(root_mount)} / && exec "$0" -c "$1" "$2"'
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable,
                          IN_NAMESPACE, str(tmp_path / "cmdline")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(medium.__file__).parents[1])}, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_auto_with_toram_on_the_command_line_and_no_live_mount(tmp_path: Path) -> None:
    tmpfs_root = ["-t", "tmpfs", "none"]
    got = auto_in_a_namespace(tmp_path, "BOOT_IMAGE=/live/vmlinuz boot=live toram quiet", tmpfs_root)
    assert got.startswith("MediumInRam") and "toram" in got and "panic only" in got
    assert auto_in_a_namespace(tmp_path, "boot=live toram=filesystem.squashfs", tmpfs_root).startswith("MediumInRam")
    # without toram a root with nothing block-backed under it is still a misconfiguration
    got = auto_in_a_namespace(tmp_path, "boot=live quiet", tmpfs_root)
    assert got.startswith("MediumError") and "set medium" in got
    # toram, but the root sits on a disk: that disk is the medium (toram is not live-boot's here)
    got = auto_in_a_namespace(tmp_path, "toram", ["--bind", "/"])
    assert got.startswith("armed") and got.endswith(" root")


def test_auto_with_the_root_on_a_loop_in_ram(tmp_path: Path) -> None:
    with mounted("tmpfs", tmp_path / "ram", "-t", "tmpfs") as ram:
        with attached(make_image(ram / "root.img", 16)) as dev:
            subprocess.run(["mkfs.ext4", "-q", dev], check=True)
            got = auto_in_a_namespace(tmp_path, "quiet", ["-o", "ro", dev])
    assert got.startswith("MediumInRam") and "root file system" in got and "tmpfs" in got


def test_size_zero_is_not_present(loopdev) -> None:
    """A loop whose file shrinks to nothing (`losetup -c`): the device stays, its size is 0."""
    dev = loopdev()
    m = medium.resolve(dev, Path("/x"))
    image = Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip()
    os.truncate(image, 0)
    subprocess.run(["losetup", "--set-capacity", dev], check=True)
    assert Path(f"/sys/block/{Path(dev).name}").exists()
    assert not medium.present(m)
    assert medium.gone(m.devpaths, m.blocks) == f"{loop_devpath(dev)} holds no media (size 0)"
    with pytest.raises(medium.MediumError, match=f"{dev}.*holds no media.*insert the medium"):
        medium.resolve(dev, Path("/x"))  # refused at start, not armed on nothing


USB_PART = "/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0/host0/target0:0:0/0:0:0:0/block/sda/sda1"


def test_usb_partition_watches_every_ancestor(fake_usb_sysfs: Path) -> None:
    m = medium._from_sys_path(fake_usb_sysfs / "dev" / "block" / "8:1", "/dev/sda1", "config")
    parts = USB_PART.split("/")
    expected = tuple("/".join(parts[:i]) for i in range(len(parts), 2, -1) if parts[i - 1] != "block")
    assert m.devpaths == expected
    assert m.devpaths[0] == USB_PART and m.devpaths[1].endswith("/block/sda")
    assert "/devices/pci0000:00/0000:00:14.0/usb1/1-1" in m.devpaths  # the USB device itself
    assert m.devpaths[-1] == "/devices/pci0000:00"


SDA = USB_PART.rsplit("/", 1)[0]
SR0 = "/devices/pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sr0"


def armed_on(m: medium.Medium) -> Machine:
    machine = Machine(DEFAULT_DEADLINES_MS)
    machine.feed(Armed(frozenset(m.devpaths), m.media_watched))
    return machine


def test_sd_card_pulled_from_its_reader_fires_and_is_not_present(fake_storage_sysfs: Path) -> None:
    m = medium.resolve("serial:STICK123", Path("/x"))
    assert medium.present(m)
    (fake_storage_sysfs / SDA.lstrip("/") / "size").write_text("0\n")  # the card is out, the reader stays
    assert not medium.present(m)
    (fake_storage_sysfs / SDA.lstrip("/") / "size").write_text("15634432\n")
    assert m.media_watched == frozenset({SDA}) and m.blocks == (USB_PART, SDA)
    machine = armed_on(m)
    assert machine.feed(Uevent("change", USB_PART, "block", "partition")) == []  # a re-read
    assert machine.feed(Uevent("change", SDA, "block", "disk", medium.media_present(SDA))) == []
    (fake_storage_sysfs / SDA.lstrip("/") / "size").write_text("0\n")
    assert medium.gone(m.devpaths, m.blocks) == f"{SDA} holds no media (size 0)"
    # what watch.py reads for the disk's `change`, fed to the machine
    actions = machine.feed(Uevent("change", SDA, "block", "disk", medium.media_present(SDA)))
    assert actions and actions[0].stage is Stage.KILL and machine.trigger == f"uevent change {SDA}"


def test_card_reader_without_the_removable_flag_is_watched_for_media(fake_storage_sysfs: Path) -> None:
    (fake_storage_sysfs / SDA.lstrip("/") / "removable").write_text("0\n")  # some USB readers say so
    assert medium.resolve("serial:STICK123", Path("/x")).media_watched == frozenset({SDA})
    sdb = medium._from_sys_path(fake_storage_sysfs / "dev" / "block" / "8:16", "/dev/sdb", "config")
    assert sdb.media_watched == frozenset()  # an internal disk's `change` is only ever a re-read


def test_lvm_on_luks_on_the_stick_follows_every_level(fake_storage_sysfs: Path) -> None:
    m = medium._from_sys_path(fake_storage_sysfs / "dev" / "block" / "254:1", "/dev/mapper/live-root", "config")
    assert m.devpaths[:3] == ("/devices/virtual/block/dm-1", "/devices/virtual/block/dm-0", USB_PART)
    assert {SDA, "/devices/pci0000:00/0000:00:14.0/usb1/1-1"} <= set(m.devpaths)  # the stick itself
    assert m.chain == ("dm-1", "dm-0", "sda1")
    assert m.media_watched == frozenset({SDA})
    assert armed_on(m).feed(Uevent("remove", "/devices/pci0000:00/0000:00:14.0/usb1/1-1", "usb"))


def fake_mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *lines: str) -> None:
    """A fake /proc/self/mountinfo (to mount a disc from a drive this machine does not have)."""
    path = tmp_path / "mountinfo"
    path.write_text("".join(f"{i + 20} 1 {line}\n" for i, line in enumerate(lines)))
    monkeypatch.setattr(medium, "MOUNTINFO", path)


def test_disc_gone_during_a_restart_is_absent_at_start(fake_storage_sysfs: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mountinfo(tmp_path, monkeypatch, "0:30 / / rw shared:1 - overlay overlay rw,lowerdir=/run/live/rootfs",
                   r"11:0 / /run/live/medium ro shared:2 - iso9660 /dev/sr0 ro",
                   r"0:31 / /run/my\040dir rw - tmpfs tmpfs rw")
    assert medium.mount_at(Path("/run/my dir")) == medium.Mount(0, 31, "/run/my dir", "tmpfs", "tmpfs")
    m = medium.resolve("auto", Path("/run/live/medium"))
    assert m.source == "live-boot" and m.devpaths[0] == SR0 and m.media_watched == frozenset({SR0})
    assert armed_on(m).feed(Uevent("change", SR0, "block", "disk", media_present=False))  # ejected
    (fake_storage_sysfs / SR0.lstrip("/") / "size").write_text("0\n")  # ejected while we were down
    with pytest.raises(medium.MediumAbsent, match="sr0.*holds no media"):
        medium.resolve("auto", Path("/run/live/medium"))


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
    root = medium.mount_at(Path("/"))
    if root and root.major != 0 and Path(f"/sys/dev/block/{root.major}:{root.minor}").exists():
        m = medium.resolve("auto", Path("/nonexistent"))
        assert m.source == "root" and medium.present(m)
    else:
        with pytest.raises(medium.MediumError, match="set medium"):
            medium.resolve("auto", Path("/nonexistent"))


def test_record_notices_a_medium_gone_since_arming(loopdev, ramdir: Path) -> None:
    dev = loopdev()
    m = medium.resolve(dev, Path("/x"))
    medium.remember(m, ramdir)
    record = statedir.records_path(ramdir) / medium.RECORD  # root's alone: records/ is 0700
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    assert oct(record.parent.stat().st_mode & 0o777) == "0o700"
    assert medium.recorded_absent(ramdir) is None  # still there
    remove_loop(dev)
    assert not medium.present(m)
    gone = medium.recorded_absent(ramdir)
    assert gone is not None and dev in gone


def test_record_from_another_boot_is_ignored(ramdir: Path) -> None:
    fake = medium.Medium("/dev/sdz", ("/devices/none/block/sdz",), frozenset(), "config")
    medium.remember(fake, ramdir)
    assert medium.recorded_absent(ramdir) is not None
    path = statedir.records_path(ramdir) / medium.RECORD
    path.write_text(path.read_text().replace(medium._boot_id(), "another-boot"))
    assert medium.recorded_absent(ramdir) is None


def test_cord_needs_matching_serial_and_port() -> None:
    with pytest.raises(medium.MediumError, match="no USB device with a serial number at port 9-9"):
        medium.resolve_cord("serial:ABC@9-9")


def test_media_present_reads_size(loopdev) -> None:
    dev = loopdev()
    assert medium.media_present(f"/devices/virtual/block/{Path(dev).name}")
    assert not medium.media_present("/devices/virtual/block/no-such-device")
