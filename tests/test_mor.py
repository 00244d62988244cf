"""The MOR bit (mor.py) against a FAKE efivarfs: a tmpfs directory laid out as efivarfs lays
out its variables (4 bytes of attributes, then the value; the file immutable). This machine
boots without UEFI, so it has no efivarfs; the fake is named as such and checked as tmpfs
(magic=None turns off only the file-system magic check). Debian's OVMF offers no such
variable; the QEMU scenario `mor` (tests/vm/test_live.py) boots under it and writes one
the test planted through the guest's real efivarfs.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from killcord import mor
from killcord.check import mor_item
from killcord.config import Config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the immutable flag needs CAP_LINUX_IMMUTABLE (root)")

ATTRS = struct.pack("<I", mor.ATTRIBUTES)


def _flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, mor.FS_IOC_GETFLAGS, b"\0" * 4))[0]
    finally:
        os.close(fd)


def _set_immutable(path: Path, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = _flags(path)
        new = flags | mor.FS_IMMUTABLE_FL if on else flags & ~mor.FS_IMMUTABLE_FL
        fcntl.ioctl(fd, mor.FS_IOC_SETFLAGS, struct.pack("i", new))
    finally:
        os.close(fd)


@pytest.fixture
def fake_efivarfs(ramdir: Path):
    """FAKE efivarfs on tmpfs; the variables made are unlocked again at the end."""
    root = ramdir / "fake-efivarfs"
    root.mkdir()
    made: list[Path] = []

    def variable(name: str, value: int, immutable: bool = True) -> Path:
        path = root / name
        path.write_bytes(ATTRS + bytes([value]))
        if immutable:
            _set_immutable(path, True)
        made.append(path)
        return path

    yield root, variable
    for path in made:
        if path.exists() and not path.is_symlink():
            _set_immutable(path, False)


def test_sets_clear_memory_and_disable_auto_detect_and_puts_the_immutable_flag_back(fake_efivarfs) -> None:
    root, variable = fake_efivarfs
    var = variable(mor.MOR, 0x00)
    state = mor.arm(live=True, efivars=root, magic=None)
    assert state.is_set and state.value == 0x11, state
    assert var.read_bytes() == ATTRS + b"\x11"  # one write: attributes, then the value
    assert _flags(var) & mor.FS_IMMUTABLE_FL
    assert mor.read(root, magic=None).is_set


def test_other_bits_are_kept(fake_efivarfs) -> None:
    root, variable = fake_efivarfs
    var = variable(mor.MOR, 0x02)
    assert mor.arm(live=True, efivars=root, magic=None).value == 0x13
    assert var.read_bytes() == ATTRS + b"\x13"


def test_dry_run_writes_nothing_and_says_what_it_would(fake_efivarfs) -> None:
    root, variable = fake_efivarfs
    var = variable(mor.MOR, 0x00)
    state = mor.arm(live=False, efivars=root, magic=None)
    assert not state.is_set and "would write 0x11" in state.note
    assert var.read_bytes() == ATTRS + b"\x00"


def test_locked_by_the_firmware_is_left_alone_and_said(fake_efivarfs) -> None:
    root, variable = fake_efivarfs
    var = variable(mor.MOR, 0x00)
    variable(mor.MOR_LOCK, 0x01)
    state = mor.arm(live=True, efivars=root, magic=None)
    assert not state.is_set and "locked by the firmware" in state.note
    assert var.read_bytes() == ATTRS + b"\x00"


def test_a_link_in_its_place_is_not_followed(fake_efivarfs, ramdir: Path) -> None:
    root, _ = fake_efivarfs
    victim = ramdir / "victim"
    victim.write_bytes(ATTRS + b"\x00")
    (root / mor.MOR).symlink_to(victim)
    state = mor.arm(live=True, efivars=root, magic=None)
    assert not state.is_set and state.value is None, state
    assert victim.read_bytes() == ATTRS + b"\x00"


def test_not_offered_and_not_efivarfs(fake_efivarfs, tmp_path: Path) -> None:
    root, _ = fake_efivarfs
    assert not mor.arm(live=True, efivars=root, magic=None).offered  # no such variable
    assert "not booted through UEFI" in mor.read(tmp_path / "none").note
    # the real check: a tmpfs is not efivarfs, and nothing is written there
    state = mor.read(root)
    assert not state.offered and "is not efivarfs" in state.note


def test_check_reports_it(fake_efivarfs) -> None:
    root, variable = fake_efivarfs
    variable(mor.MOR, 0x00)
    item = mor_item(Config(mor="off"), root, magic=None)
    assert not item.ok and not item.required and 'mor = "auto"' in item.fix
    mor.arm(live=True, efivars=root, magic=None)
    item = mor_item(Config(), root, magic=None)
    assert item.ok and "ClearMemory and DisableAutoDetect set" in item.detail


def test_the_setting_is_checked(tmp_path: Path) -> None:
    from killcord.config import ConfigError, load

    toml = tmp_path / "k.toml"
    toml.write_text('mor = "on"\n')
    with pytest.raises(ConfigError, match=r"mor \(KILLCORD_MOR\) = 'on'.*'auto' or 'off'"):
        load(toml)

