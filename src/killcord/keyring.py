"""cryptsetup's copies of volume keys in the kernel keyring: found and invalidated at fire time.

cryptsetup loads a LUKS2 volume key into the kernel keyring as a `logon` (or `user`) key named
`cryptsetup:<uuid>-d<n>` and hands dm-crypt its name; it normally unlinks the key when it
exits, unless it was told to keep it (`--link-vk-to-keyring`, or a crash in between). Such a
key outlives the mapping's own `key wipe` (dm.py): invalidating it makes the kernel destroy
it at once, and the `user`/`logon` types zero their payload when they free it.

/proc/keys lists the keys this process may view (root's, and the possessed ones); it is
opened at arm time and read through that descriptor. The keyctl(2) syscall is called
through ctypes: no maintained Python binding of the keyring API exists in Debian.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass

from killcord import arm_fds

PROC_KEYS = "/proc/keys"
PREFIX = "cryptsetup:"
KEY_TYPES = frozenset({"logon", "user"})
# keyctl's syscall number, per architecture (the package is Architecture: all on Debian 13)
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "i686": 288, "armv7l": 311, "ppc64le": 271,
               "s390x": 280, "riscv64": 219}.get(platform.machine())
_KEYCTL_INVALIDATE = 21

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class Key:
    serial: int
    type: str
    description: str


def parse(text: str, prefix: str = PREFIX) -> list[Key]:
    """cryptsetup's keys (their names start with `prefix`) among /proc/keys lines ("<hex
    serial> <flags> <usage> <timeout> <perm> <uid> <gid> <type> <description>: <summary>");
    malformed lines are skipped."""
    found: list[Key] = []
    for line in text.splitlines():
        fields = line.split(None, 8)
        if len(fields) < 9:
            continue
        try:
            serial = int(fields[0], 16)
        except ValueError:
            continue
        flags, kind, rest = fields[1], fields[7], fields[8]
        description = rest.rsplit(": ", 1)[0] if ": " in rest else rest
        # i: invalidated, R: revoked, D: dead: listed until the keyring's garbage collector runs
        if kind in KEY_TYPES and description.startswith(prefix) and not set(flags) & set("iRD"):
            found.append(Key(serial, kind, description))
    return found


def open_list(path: str = PROC_KEYS) -> int | None:
    """At arm time: the descriptor the firing path reads /proc/keys through (None: no
    keyring support in this kernel)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def invalidate(serial: int) -> None:
    if _SYS_KEYCTL is None:
        raise OSError(errno.ENOSYS, f"keyctl: no syscall number known for {platform.machine()}")
    if _libc.syscall(_SYS_KEYCTL, _KEYCTL_INVALIDATE, ctypes.c_long(serial)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class Dropped:
    found: tuple[str, ...]  # descriptions of cryptsetup's keys seen in /proc/keys
    dropped: tuple[str, ...]  # of those, invalidated (live)
    errors: tuple[str, ...] = ()


def drop_cryptsetup_keys(fd: int | None, live: bool, prefix: str = PREFIX) -> Dropped:
    """Invalidate every cryptsetup key this process can see (dry-run: only name them).
    fd None: this kernel has no keyring, so there is nothing to drop."""
    if fd is None:
        return Dropped((), ())
    keys = parse(arm_fds.read_all(fd).decode("utf-8", "replace"), prefix)
    found = tuple(k.description for k in keys)
    if not live:
        return Dropped(found, ())
    dropped: list[str] = []
    errors: list[str] = []
    for key in keys:
        try:
            invalidate(key.serial)
            dropped.append(key.description)
        except OSError as exc:
            errors.append(f"{key.description}: {exc.strerror}")
    return Dropped(found, tuple(dropped), tuple(errors))
