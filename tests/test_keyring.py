"""cryptsetup's keys in the kernel keyring: parsed from /proc/keys, invalidated for real.

The real keys live in this test process's own process keyring (gone when it exits) and carry
a name no other key has: the code under test is pointed at that name alone, so no key of the
host's is ever touched."""

from __future__ import annotations

import ctypes
import os
import platform
import uuid

import pytest

from killcord import keyring

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_ADD_KEY, SYS_KEYCTL = 248, 250  # x86_64
KEY_SPEC_PROCESS_KEYRING = -2
KEYCTL_DESCRIBE = 6

needs_keyring = pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists(keyring.PROC_KEYS),
                                   reason="the test adds keys with x86_64's add_key syscall; needs /proc/keys")

LINES = """\
039d5068 I------     1 perm 1f0b0000     0     0 keyring   .builtin_trusted_keys: empty
1a2b3c4d I------     1 perm 3f010000     0     0 logon     cryptsetup:0a1b-d0: 64
1a2b3c4e I------     1 perm 3f010000     0     0 user      cryptsetup:0a1c-d1: 32
1a2b3c4f I------     1 perm 3f010000     0     0 logon     other:cryptsetup:0a1d: 64
1a2b3c50 I------     1 perm 3f010000     0     0 keyring   cryptsetup:not-a-key: empty
zzzz I------ 1 perm 3f010000 0 0 logon cryptsetup:bad-serial: 64
1a2b3c51 short line
1a2b3c52 I-----i     1 perm 3f010000     0     0 logon     cryptsetup:invalidated-d0: 64
1a2b3c53 IR-----     1 perm 3f010000     0     0 logon     cryptsetup:revoked-d0: 64
"""


def test_parse_finds_cryptsetups_logon_and_user_keys_only() -> None:
    assert keyring.parse(LINES) == [keyring.Key(0x1a2b3c4d, "logon", "cryptsetup:0a1b-d0"),
                                    keyring.Key(0x1a2b3c4e, "user", "cryptsetup:0a1c-d1")]


def _add_logon_key(description: str) -> int:
    payload = os.urandom(64)
    serial = _libc.syscall(SYS_ADD_KEY, b"logon", description.encode(), payload, ctypes.c_size_t(len(payload)),
                           ctypes.c_long(KEY_SPEC_PROCESS_KEYRING))
    if serial < 0:
        err = ctypes.get_errno()
        pytest.skip(f"add_key: {os.strerror(err)}")
    return serial


def _exists(serial: int) -> bool:
    buf = ctypes.create_string_buffer(256)
    return _libc.syscall(SYS_KEYCTL, KEYCTL_DESCRIBE, ctypes.c_long(serial), buf, ctypes.c_long(256)) >= 0


@needs_keyring
def test_a_cryptsetup_key_is_invalidated_for_real() -> None:
    name = f"cryptsetup:killcord-test-{uuid.uuid4().hex}-d0"
    serial = _add_logon_key(name)
    fd = keyring.open_list()
    assert fd is not None
    try:
        dry = keyring.drop_cryptsetup_keys(fd, live=False, prefix=name)
        assert dry == keyring.Dropped((name,), ())
        assert _exists(serial)  # dry-run touches nothing
        done = keyring.drop_cryptsetup_keys(fd, live=True, prefix=name)
        assert done == keyring.Dropped((name,), (name,))
        assert not _exists(serial)  # the kernel says it is gone
        assert keyring.drop_cryptsetup_keys(fd, live=True, prefix=name) == keyring.Dropped((), ())
    finally:
        os.close(fd)


def test_no_keyring_in_the_kernel_means_nothing_to_drop() -> None:
    assert keyring.open_list("/proc/no-such-keys") is None
    assert keyring.drop_cryptsetup_keys(None, live=True) == keyring.Dropped((), ())
