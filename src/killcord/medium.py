"""Find the boot medium (and the optional kill-cord device), everything it stands on, in sysfs.

A kernel `remove` uevent names a devpath (/devices/...). Pulling a USB stick removes the
partition, the disk, the SCSI device and host, the USB interface and the USB device: each
of those devpaths is watched, so the first one to go fires.

The block device that is mounted is often not the one that can be pulled. device-mapper and md
sit on other block devices (`slaves/`, to any depth: LVM on LUKS on a partition); a loop device
reads a file on another file system (live-boot `findiso=`: an ISO file on a multiboot stick).
The chain is followed down to the physical device(s) and every devpath on it is watched. A
chain that ends nowhere physical (a file on tmpfs, a RAM disk, a network block device) cannot
be seen pulled: it is refused, except that a live system copied to RAM (`toram`) arms for panic
only (MediumInRam).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyudev

from killcord import cmdline, statedir

SYS = Path("/sys")
DEV = Path("/dev")
MOUNTINFO = Path("/proc/self/mountinfo")
CMDLINE = Path("/proc/cmdline")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
RECORD = "medium.json"

LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64 (linux/loop.h). Its lo_device is the backing file's st_dev as the kernel
# sees it now: the path in sysfs is printed relative to our root and may not resolve here.
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")

RAM_FS = frozenset({"tmpfs", "ramfs"})
RAM_DISKS = ("zram", "ram")  # block devices that are memory themselves (zram, brd)
HOW_TO_NAME = 'set medium = "/dev/..." (or serial:, uuid:, id-path:) in /etc/killcord/killcord.toml'


class MediumError(Exception):
    """The medium could not be found: refuse to arm (the message says how to fix it)."""


class MediumInRam(MediumError):
    """The medium was copied to RAM (live-boot toram) and released: nothing to watch; arm for panic only."""


class MediumNotPhysical(MediumError):
    """The medium's chain ends nowhere physical: nothing there could be pulled, so nothing to watch."""

    def __init__(self, message: str, chain: str, in_ram: bool) -> None:
        super().__init__(message)
        self.chain, self.in_ram = chain, in_ram


class MediumAbsent(Exception):
    """The medium was there this boot and is gone now: fire at once."""


@dataclass(frozen=True)
class Medium:
    device: str  # /dev name, for people
    devpaths: tuple[str, ...]  # the block device first, then its ancestors, then what it stands on
    # whole disks whose media can go while the disk stays (optical drives, removable disks, USB
    # card readers): a `change` to size 0 on one of them fires
    media_watched: frozenset[str]
    source: str  # how it was found
    blocks: tuple[str, ...] = ()  # every block device on the chain (and a partition's disk): size > 0
    chain: tuple[str, ...] = ()  # how the medium reaches its physical device(s), for people

    @property
    def disk(self) -> str:
        return self.devpaths[0]

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["media_watched"] = sorted(self.media_watched)
        d["blocks"], d["chain"] = list(self.blocks), list(self.chain)
        return d


def devpath_of(sys_path: Path) -> str:
    """/sys/devices/x/y -> /devices/x/y (the form uevents carry)."""
    return "/" + str(sys_path.resolve().relative_to(SYS))


def ancestry(sys_path: Path) -> list[str]:
    """The device and every parent that is a device (has a uevent file), nearest first."""
    out: list[str] = []
    path = sys_path.resolve()
    while path != SYS and path != path.parent:
        if (path / "uevent").exists():
            out.append(devpath_of(path))
        path = path.parent
    return out


def _block_sys_path(major: int, minor: int) -> Path:
    return SYS / "dev" / "block" / f"{major}:{minor}"


def _slaves(sys_path: Path) -> list[Path]:
    # dm-crypt / LVM / md on top of the medium: what they sit on
    slaves = sys_path / "slaves"
    return sorted(p.resolve() for p in slaves.iterdir()) if slaves.is_dir() else []


def _is_optical(sys_path: Path) -> bool:
    try:
        return (sys_path / "device" / "type").read_text().strip() == "5"  # SCSI TYPE_ROM
    except OSError:
        return sys_path.name.startswith("sr")


def _on_usb(sys_path: Path) -> bool:
    for d in ancestry(sys_path):
        try:
            if os.path.basename(os.readlink(SYS / d.lstrip("/") / "subsystem")) == "usb":
                return True
        except OSError:
            continue
    return False


def _media_can_go(disk: Path) -> bool:
    """Can this disk lose its media and stay (a `change` to size 0, no `remove`)? Optical drives,
    disks flagged removable, and USB disks: card readers, some of which never set the flag.
    Loop devices are left out: a loop loses its file only by root's detach, not by a pull."""
    if _is_optical(disk):
        return True
    try:
        if (disk / "removable").read_text().strip() == "1":
            return True
    except OSError:
        pass
    return _on_usb(disk)


# ---- mounts ----


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, the fields we use."""

    major: int
    minor: int
    point: str
    fstype: str
    source: str


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


def mounts() -> list[Mount]:
    out: list[Mount] = []
    with open(MOUNTINFO, errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)  # optional fields end at "-"
            major, minor = fields[2].split(":")
            out.append(Mount(int(major), int(minor), _unescape(fields[4]), fields[sep + 1],
                             _unescape(fields[sep + 2])))
    return out


def mount_at(point: Path) -> Mount | None:
    """What is visible at point: of the mounts stacked there, the last one listed (the top)."""
    found = [m for m in mounts() if m.point == str(point)]
    return found[-1] if found else None


@dataclass(frozen=True)
class Holder:
    """Where a file system lives: its block device (sysfs path), or why it has none."""

    sys_path: Path | None
    what: str  # for people: "vda", "tmpfs at /run/live/medium"
    in_ram: bool = False


def _holder_of_mount(mount: Mount) -> Holder:
    sys_path = _block_sys_path(mount.major, mount.minor)
    if sys_path.exists():
        return Holder(sys_path.resolve(), sys_path.resolve().name)
    where = f"{mount.fstype} at {mount.point}"
    if mount.fstype in RAM_FS:
        return Holder(None, where, in_ram=True)
    # btrfs and the like give their files an anonymous st_dev; the mount source names the device
    if mount.source.startswith("/dev/"):
        try:
            st = os.stat(mount.source)
        except OSError:
            return Holder(None, where)
        if stat.S_ISBLK(st.st_mode):
            sys_path = _block_sys_path(os.major(st.st_rdev), os.minor(st.st_rdev))
            if sys_path.exists():
                return Holder(sys_path.resolve(), sys_path.resolve().name)
    return Holder(None, where)


def _holder_of_dev(dev: int) -> Holder:
    """The block device holding the file system whose files have st_dev == dev."""
    major, minor = os.major(dev), os.minor(dev)
    sys_path = _block_sys_path(major, minor)
    if sys_path.exists():
        return Holder(sys_path.resolve(), sys_path.resolve().name)
    mount = next((m for m in reversed(mounts()) if (m.major, m.minor) == (major, minor)), None)
    if mount is None:
        return Holder(None, f"device {major}:{minor}, no block device and not mounted here")
    return _holder_of_mount(mount)


def _loop_backing(disk: Path) -> tuple[str, int]:
    """A loop device's backing file (for people) and the st_dev of its file system."""
    name = (disk / "loop" / "backing_file").read_text().rstrip("\n")
    node = DEV / disk.name
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            if os.fstat(fd).st_rdev == _dev_number(disk):  # the node really is this loop
                info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
                return name, LOOP_INFO64.unpack(info)[0]
        except OSError:
            pass
        finally:
            os.close(fd)
    try:  # no usable node: the backing path, as this mount namespace sees it
        return name, os.stat(name.removesuffix(" (deleted)")).st_dev
    except OSError as exc:
        raise MediumError(f"{disk.name}'s backing file {name!r}: {exc.strerror}; cannot tell which "
                          f"device holds it: {HOW_TO_NAME} to the device that holds the file") from None


def _dev_number(sys_path: Path) -> int:
    major, minor = (sys_path / "dev").read_text().strip().split(":")
    return os.makedev(int(major), int(minor))


# ---- the chain ----


@dataclass
class _Walk:
    """Down from the medium to the physical device(s), collecting what to watch."""

    device: str
    devpaths: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    media: set[str] = field(default_factory=set)
    chain: list[str] = field(default_factory=list)
    seen: set[Path] = field(default_factory=set)

    def block(self, sys_path: Path, step: str) -> None:
        sys_path = sys_path.resolve()
        if sys_path in self.seen:
            return
        self.seen.add(sys_path)
        self.chain.append(step)
        self.blocks.append(devpath_of(sys_path))
        for d in ancestry(sys_path):
            if d not in self.devpaths:
                self.devpaths.append(d)
        # a partition's slaves, loop and media live on its disk, whose size says if media is in
        disk = sys_path.parent if (sys_path / "partition").exists() else sys_path
        if disk != sys_path and devpath_of(disk) not in self.blocks:  # two partitions of one disk
            self.blocks.append(devpath_of(disk))
        if _media_can_go(disk):
            self.media.add(devpath_of(disk))
        slaves = _slaves(disk)
        if slaves:
            for s in slaves:
                self.block(s, s.name)
        elif (disk / "loop").is_dir():
            name, dev = _loop_backing(disk)
            holder = _holder_of_dev(dev)
            if holder.sys_path is None:
                self._nowhere(f"file {name} on {holder.what}", holder.in_ram)
            else:
                self.block(holder.sys_path, f"file {name} on {holder.what}")
        elif devpath_of(disk).startswith("/devices/virtual/block/"):
            # a leaf that is no hardware: a RAM disk, nbd, a loop with no file, an md with no
            # members. (Not all of /devices/virtual: NVMe multipath puts real disks there.)
            self._nowhere(f"({disk.name} is virtual)", disk.name.startswith(RAM_DISKS))

    def _nowhere(self, end: str, in_ram: bool) -> None:
        self.chain.append(end)
        chain = " -> ".join(self.chain)
        ram = (" A medium copied to RAM (live-boot toram) needs no watch: with medium = \"auto\" "
               "killcord then arms for panic only." if in_ram else "")
        raise MediumNotPhysical(
            f"medium {self.device}: its chain {chain} ends nowhere physical, so pulling it could "
            f"not be seen; {HOW_TO_NAME} to the physical device that holds it.{ram}",
            chain, in_ram)


def _from_sys_path(sys_path: Path, device: str, source: str) -> Medium:
    walk = _Walk(device)
    walk.block(sys_path, sys_path.resolve().name)
    return Medium(device, tuple(walk.devpaths), frozenset(walk.media), source,
                  tuple(walk.blocks), tuple(walk.chain))


def _by_property(keys: tuple[str, ...], value: str, label: str) -> Medium:
    context = pyudev.Context()
    for dev in context.list_devices(subsystem="block"):
        if any(dev.properties.get(k) == value for k in keys):
            return _from_sys_path(Path(dev.sys_path), dev.device_node or dev.sys_name, label)
    raise MediumError(
        f"medium = {label!r}: no block device has that {keys[0]} in the udev database; "
        "list them with `udevadm info --export-db` or give a /dev path"
    )


def _by_serial(serial: str, label: str) -> Medium:
    # sysfs first: a USB device's `serial` attribute needs no udev database
    for block in sorted((SYS / "class" / "block").iterdir()):
        for d in ancestry(block):
            try:
                if (SYS / d.lstrip("/") / "serial").read_text().strip() == serial:
                    return _from_sys_path(block.resolve(), f"/dev/{block.name}", label)
            except OSError:
                continue
    return _by_property(("ID_SERIAL_SHORT", "ID_SERIAL"), serial, label)


def resolve(spec: str, live_mount: Path) -> Medium:
    """The medium named by config `medium` ("auto", /dev/..., serial:, uuid:, id-path:).

    Raises MediumError (refuse to arm; MediumInRam: arm for panic only) or MediumAbsent."""
    m = _resolve(spec, live_mount)
    reason = gone(m.devpaths, m.blocks)
    if reason is not None:
        if m.source in ("live-boot", "root"):  # mounted from it, so it was there this boot
            raise MediumAbsent(f"{m.device}, the {m.source} medium: {reason}")
        raise MediumError(f"medium = {spec!r}: {reason}; insert the medium, or name the device that holds it")
    return m


def _resolve(spec: str, live_mount: Path) -> Medium:
    if spec.startswith("/dev/"):
        try:
            st = os.stat(spec)
        except OSError as exc:
            raise MediumError(f"medium = {spec!r}: {exc.strerror}; give an existing block device") from None
        if not stat.S_ISBLK(st.st_mode):
            raise MediumError(f"medium = {spec!r} is not a block device")
        sys_path = _block_sys_path(os.major(st.st_rdev), os.minor(st.st_rdev))
        return _from_sys_path(sys_path.resolve(), spec, "config")
    kind, _, value = spec.partition(":")
    if kind == "serial":
        return _by_serial(value, spec)
    if kind == "uuid":
        return _by_property(("ID_FS_UUID", "ID_PART_ENTRY_UUID"), value, spec)
    if kind == "id-path":
        return _by_property(("ID_PATH",), value, spec)
    return _auto(live_mount)


def live_boot_toram(line: str) -> bool:
    """Did live-boot copy the medium to RAM (`toram` or `toram=<module>`)? Read as live-boot
    reads it, not as the kernel does: live-boot's reading decides whether it copied."""
    return any(word == "toram" or word.startswith("toram=") for word in cmdline.initramfs_words(line))


def _auto(live_mount: Path) -> Medium:
    live = mount_at(live_mount)
    for mount, source in ((live, "live-boot"), (mount_at(Path("/")), "root")):
        if mount is None:
            continue
        if mount.major != 0 and not _block_sys_path(mount.major, mount.minor).exists():
            if source == "live-boot":
                raise MediumAbsent(f"{live_mount} is mounted from {mount.major}:{mount.minor}, which is gone")
            continue
        holder = _holder_of_mount(mount)
        if holder.in_ram and source == "live-boot":
            raise MediumInRam(f"{live_mount} is {holder.what}: the live medium was copied to RAM (toram) "
                              "and released; nothing to watch, armed for panic only")
        if holder.sys_path is None:
            continue  # overlay, NFS, a tmpfs root...: nothing to pull here
        try:
            return _from_sys_path(holder.sys_path, f"/dev/{holder.sys_path.name}", source)
        except MediumNotPhysical as exc:
            if exc.in_ram:
                raise MediumInRam(f"the {source} file system ({mount.point}) lives in RAM ({exc.chain}): "
                                  "the medium was copied to RAM (toram) and released; nothing to watch, "
                                  "armed for panic only") from None
            raise
    if live is None:
        try:
            toram = live_boot_toram(CMDLINE.read_text())
        except OSError:
            toram = False
        if toram:
            raise MediumInRam(f"{live_mount} is not mounted and the kernel command line has toram: live-boot "
                              "copied the medium to RAM and released it; nothing to watch, armed for panic only")
    raise MediumError(
        f"cannot find the boot medium: nothing block-backed is mounted at {live_mount} or /; {HOW_TO_NAME}"
    )


def resolve_cord(spec: str) -> Medium:
    """The optional kill cord: `serial:<serial>@<port>`. Both must match: VID:PID is spoofable."""
    serial, _, port = spec.removeprefix("serial:").partition("@")
    dev = SYS / "bus" / "usb" / "devices" / port
    try:
        found = (dev / "serial").read_text().strip()
    except OSError:
        raise MediumError(f"cord = {spec!r}: no USB device with a serial number at port {port}; "
                          "plug the cord in, or check the port with `ls /sys/bus/usb/devices`") from None
    if found != serial:
        raise MediumError(f"cord = {spec!r}: the device at port {port} has serial {found!r}")
    sys_path = dev.resolve()
    # its interfaces go first on removal: watch them too (children, not ancestors)
    interfaces = [devpath_of(p) for p in sorted(sys_path.iterdir()) if p.name.startswith(f"{port}:")]
    return Medium(f"usb {port}", tuple(ancestry(sys_path)[:1] + interfaces), frozenset(), "cord")


def gone(devpaths: tuple[str, ...] | list[str], blocks: tuple[str, ...] | list[str]) -> str | None:
    """Why a medium is not there now, or None if it is: a devpath has left sysfs, or a block
    device on its chain holds no media (size 0: a card out of its reader, a disc ejected)."""
    for d in devpaths:
        if not (SYS / d.lstrip("/")).exists():
            return f"{d} is gone"
    for d in blocks:
        if not media_present(d):
            return f"{d} holds no media (size 0)"
    return None


def identity(m: Medium) -> str | None:
    """What makes this medium the same one when it comes back under new devpaths (a stick
    plugged in again gets a new SCSI host, a new sdX): the serial number of the nearest
    device on its chain that has one (a USB stick's), with vendor and product where the bus
    has them, or a loop device's backing file; and which partition. Read from sysfs alone,
    at arm time, while it is there. None: nothing tells it apart, so it never counts as back."""
    first = SYS / m.disk.lstrip("/")
    part = _read(first / "partition")
    where = f"#part{part}" if part else "#disk"
    for d in m.devpaths:
        base = SYS / d.lstrip("/")
        backing = _read(base / "loop" / "backing_file")
        if backing:
            return f"loop:{backing}{where}"
        serial = _read(base / "serial")
        if serial:
            return f"serial:{_read(base / 'idVendor')}:{_read(base / 'idProduct')}:{serial}{where}"
    return None


def find_again(ident: str) -> Medium | None:
    """The block device that now has `ident` (identity()), if one does."""
    for block in sorted((SYS / "class" / "block").iterdir()):
        try:
            m = _from_sys_path(block.resolve(), f"/dev/{block.name}", "back")
        except MediumError:
            continue  # virtual, nowhere physical: never ours
        if identity(m) == ident and gone(m.devpaths, m.blocks) is None:
            return m
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def present(medium: Medium) -> bool:
    return gone(medium.devpaths, medium.blocks) is None


def media_present(devpath: str) -> bool:
    """Does this block device hold media (non-zero size)? False if it is gone."""
    try:
        return int((SYS / devpath.lstrip("/") / "size").read_text()) > 0
    except (OSError, ValueError):
        return False


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def remember(medium: Medium, state_dir: Path) -> None:
    """Note the armed medium in state_dir/records (root's alone, no link followed), so that
    a restarted daemon notices a removal it missed."""
    statedir.write_record(state_dir, RECORD, json.dumps({"boot_id": _boot_id(), **medium.as_dict()}).encode())


def recorded_absent(state_dir: Path) -> str | None:
    """If this boot armed on a medium that is gone now (pulled, or its card or disc out),
    say which."""
    try:
        record = json.loads(statedir.read_record(state_dir, RECORD))
    except (OSError, ValueError):  # statedir.UnsafeStateDir is an OSError
        return None
    if not isinstance(record, dict) or record.get("boot_id") != _boot_id() or not record.get("devpaths"):
        return None
    why = gone(list(record["devpaths"]), list(record.get("blocks", [])))
    return None if why is None else f"{record.get('device')} ({why})"
