"""Find the boot medium (and the optional kill-cord device) and their ancestry in sysfs.

A kernel `remove` uevent names a devpath (/devices/...). Pulling a USB stick removes the
partition, the disk, the SCSI device and host, the USB interface and the USB device: each
of those devpaths is watched, so the first one to go fires.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import pyudev

SYS = Path("/sys")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
RECORD = "medium.json"


class MediumError(Exception):
    """The medium could not be found: refuse to arm (the message says how to fix it)."""


class MediumAbsent(Exception):
    """The medium was there this boot and is gone now: fire at once."""


@dataclass(frozen=True)
class Medium:
    device: str  # /dev name, for people
    devpaths: tuple[str, ...]  # the block device first, then its ancestors (kernel devpaths)
    optical: frozenset[str]  # devpaths of optical drives among them
    source: str  # how it was found

    @property
    def disk(self) -> str:
        return self.devpaths[0]

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["optical"] = sorted(self.optical)
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
    # dm-crypt / md on top of the medium: watch what they sit on as well
    slaves = sys_path / "slaves"
    return [p.resolve() for p in slaves.iterdir()] if slaves.is_dir() else []


def _is_optical(sys_path: Path) -> bool:
    try:
        return (sys_path / "device" / "type").read_text().strip() == "5"  # SCSI TYPE_ROM
    except OSError:
        return sys_path.name.startswith("sr")


def _from_sys_path(sys_path: Path, device: str, source: str) -> Medium:
    devpaths: list[str] = []
    optical: set[str] = set()
    for p in [sys_path, *_slaves(sys_path)]:
        for d in ancestry(p):
            if d not in devpaths:
                devpaths.append(d)
        if _is_optical(p):
            optical.add(devpath_of(p))
    return Medium(device, tuple(devpaths), frozenset(optical), source)


def _mount_source(mount_point: Path) -> tuple[int, int] | None:
    """major:minor of what is mounted at mount_point, from /proc/self/mountinfo."""
    target = str(mount_point)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                major, minor = fields[2].split(":")
                return int(major), int(minor)
    return None


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
    """The medium named by config `medium` ("auto", /dev/..., serial:, uuid:, id-path:)."""
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


def _auto(live_mount: Path) -> Medium:
    for mount_point, source in ((live_mount, "live-boot"), (Path("/"), "root")):
        numbers = _mount_source(mount_point)
        if numbers is None or numbers[0] == 0:  # 0: tmpfs, overlay, other virtual file systems
            continue
        sys_path = _block_sys_path(*numbers)
        if not sys_path.exists():
            if source == "live-boot":
                raise MediumAbsent(f"{live_mount} is mounted from {numbers[0]}:{numbers[1]}, which is gone")
            continue
        return _from_sys_path(sys_path.resolve(), f"/dev/{sys_path.resolve().name}", source)
    raise MediumError(
        f"cannot find the boot medium: nothing block-backed is mounted at {live_mount} or /; "
        "set medium = \"/dev/...\" (or serial:, uuid:, id-path:) in /etc/killcord/killcord.toml"
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


def present(medium: Medium) -> bool:
    return (SYS / medium.disk.lstrip("/")).exists()


def media_present(devpath: str) -> bool:
    """For an optical drive: is a disc in it (non-zero size)?"""
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
    """Note the armed medium, so that a restarted daemon notices a removal it missed."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = state_dir / f".{RECORD}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"boot_id": _boot_id(), **medium.as_dict()}, f)
    os.replace(tmp, state_dir / RECORD)


def recorded_absent(state_dir: Path) -> str | None:
    """If this boot armed on a medium that is gone now, say which."""
    try:
        record = json.loads((state_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if record.get("boot_id") != _boot_id() or not record.get("devpaths"):
        return None
    disk = record["devpaths"][0]
    return None if (SYS / disk.lstrip("/")).exists() else f"{record.get('device')} ({disk})"
