"""A firmware backstop: the TCG Platform Reset Attack Mitigation's MOR bit.

Where the UEFI firmware offers the `MemoryOverwriteRequestControl` variable, setting its
ClearMemory bit asks the firmware to clear RAM before it boots anything else after a reset.
So a reset or a power cut in the middle of our wipe (a held power button, a watchdog, an
attacker's reset) does not hand the next boot a RAM full of secrets. DisableAutoDetect too:
the firmware then clears even after what looks to it like an orderly shutdown.

Set at arm time (daemon.arm), read by `check`. The variable is an efivarfs file: 4 bytes of
attributes, then the 1-byte value, written in one write(2). efivarfs marks it immutable;
the flag is lifted for the write and put back. Nothing is followed: the directory and the
file are opened with O_NOFOLLOW, and the directory must be efivarfs (statfs magic). No peer
does this; no library does it either (python's stdlib has no efivar call, and the efivar C
library's tools would mean an exec), hence these few lines by hand.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

EFIVARS = Path("/sys/firmware/efi/efivars")
EFIVARFS_MAGIC = 0xDE5E81E4
MOR = "MemoryOverwriteRequestControl-e20939be-32d4-41be-a150-897f85d49829"
MOR_LOCK = "MemoryOverwriteRequestControlLock-bb983ccf-151d-40e1-a07b-4a17be168292"
CLEAR_MEMORY = 0x01
DISABLE_AUTO_DETECT = 0x10
WANTED = CLEAR_MEMORY | DISABLE_AUTO_DETECT
# EFI_VARIABLE_NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS
ATTRIBUTES = 0x7
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10


@dataclass(frozen=True)
class MorState:
    offered: bool  # the firmware has the variable
    value: int | None  # its byte, when it could be read
    is_set: bool  # ClearMemory and DisableAutoDetect both set
    note: str  # what was done, or why not

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _open_dir(efivars: Path, magic: int | None) -> int:
    fd = os.open(efivars, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if magic is not None:
        # os has no fstatfs, and statvfs(2) lacks f_type: libc's fstatfs through ctypes
        kind = _fs_magic(fd)
        if kind != magic:
            os.close(fd)
            raise OSError(f"{efivars} is not efivarfs (file system magic {kind:#x})")
    return fd


def _fs_magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(120)  # struct statfs: f_type is its first long
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        raise OSError(ctypes.get_errno(), "fstatfs failed")
    return struct.unpack_from("l", buf.raw)[0] & 0xFFFFFFFF


def _read_byte(dir_fd: int, name: str) -> int | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(data) < 5:
        raise OSError(f"{name}: {len(data)} bytes, expected 4 of attributes and 1 of value")
    return data[4]


def read(efivars: Path = EFIVARS, magic: int | None = EFIVARFS_MAGIC, name: str = MOR) -> MorState:
    """What the firmware's MOR variable (`name`: another only in tests) says now."""
    try:
        dir_fd = _open_dir(efivars, magic)
    except FileNotFoundError:
        return MorState(False, None, False, f"no {efivars}: not booted through UEFI, or efivarfs not mounted")
    except OSError as exc:
        return MorState(False, None, False, f"{efivars}: {exc.strerror or exc}")
    try:
        value = _read_byte(dir_fd, name)
    except OSError as exc:
        return MorState(True, None, False, f"{name}: {exc.strerror or exc}")
    finally:
        os.close(dir_fd)
    if value is None:
        return MorState(False, None, False, "this firmware offers no MemoryOverwriteRequestControl")
    ok = value & WANTED == WANTED
    return MorState(True, value, ok, f"{value:#04x}: " + ("ClearMemory and DisableAutoDetect set" if ok else
                                                          "the firmware will not clear RAM after a reset"))


def arm(live: bool, efivars: Path = EFIVARS, magic: int | None = EFIVARFS_MAGIC, name: str = MOR) -> MorState:
    """Set ClearMemory and DisableAutoDetect (keeping any other bit), if the firmware offers
    the variable and has not locked it. Never raises: the state says what happened."""
    now = read(efivars, magic, name)
    if not now.offered or now.is_set or now.value is None:
        return now
    wanted = now.value | WANTED
    if not live:
        return MorState(True, now.value, False, f"{now.value:#04x}; dry-run: would write {wanted:#04x}")
    try:
        dir_fd = _open_dir(efivars, magic)
    except OSError as exc:
        return MorState(True, now.value, False, f"{efivars}: {exc.strerror or exc}")
    try:
        try:
            locked = _read_byte(dir_fd, MOR_LOCK)
        except OSError:
            locked = None
        if locked:
            return MorState(True, now.value, False, f"{now.value:#04x}; locked by the firmware "
                            f"(MemoryOverwriteRequestControlLock = {locked:#04x}): cannot be changed until a reset")
        _write(dir_fd, name, struct.pack("<I", ATTRIBUTES) + bytes([wanted]))
    except OSError as exc:
        return MorState(True, now.value, False, f"{now.value:#04x}; writing {wanted:#04x} failed: "
                        f"{exc.strerror or exc}")
    finally:
        os.close(dir_fd)
    after = read(efivars, magic, name)
    return MorState(after.offered, after.value, after.is_set, ("set: " if after.is_set else "write not kept: ")
                    + after.note)


def _write(dir_fd: int, name: str, data: bytes) -> None:
    """One write(2) of attributes and value, the immutable flag lifted for it and put back."""
    holder = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        flags = struct.unpack("i", fcntl.ioctl(holder, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        if flags & FS_IMMUTABLE_FL:
            fcntl.ioctl(holder, FS_IOC_SETFLAGS, struct.pack("i", flags & ~FS_IMMUTABLE_FL))
        try:
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {name}")
            finally:
                os.close(fd)
        finally:
            if flags & FS_IMMUTABLE_FL:
                fcntl.ioctl(holder, FS_IOC_SETFLAGS, struct.pack("i", flags))
    finally:
        os.close(holder)
