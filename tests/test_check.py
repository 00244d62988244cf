"""`killcord check` items that say when a path cannot be made safe."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import needs_root

from killcord import check, medium
from killcord.config import Config


def test_fallback_item_passes_in_the_system_mount_namespace() -> None:
    item = check._fallback_item(os.getpid())
    assert item.ok and item.required


@needs_root
def test_fallback_item_fails_for_a_daemon_in_a_private_mount_namespace() -> None:
    """A drop-in that brings back PrivateTmp= (or any own mount namespace) would make the
    fallback free private copies: check must say so."""
    proc = subprocess.Popen(["unshare", "--mount", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while check._mount_ids(str(proc.pid)) == check._mount_ids("1"):
            assert time.monotonic() < deadline, "unshare never entered its namespace"
            time.sleep(0.05)
        item = check._fallback_item(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not item.ok and item.required
    assert "mount namespace of its own" in item.detail and "PrivateTmp=" in item.fix
    assert check.exit_code([item]) == 1


def test_kexec_item_fails_with_the_fix_when_the_line_cannot_be_made_safe() -> None:
    config = Config(kexec_kernel="none")
    item = check._kexec_item(config, "quiet a=" + "x" * 2100)  # longer than the kernel keeps
    assert not item.ok and item.required
    assert "cannot be made safe" in item.detail and item.fix


def test_medium_copied_to_ram_is_a_warning_not_a_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def in_ram(*_: object) -> medium.Medium:
        raise medium.MediumInRam("/run/live/medium is tmpfs at /run/live/medium: copied to RAM (toram)")

    monkeypatch.setattr(medium, "resolve", in_ram)
    items = {i.name: i for i in check.run(Config(socket=tmp_path / "none.sock"), cmdline="quiet init_on_free=1")}
    assert not items["medium"].ok and not items["medium"].required
    assert items["medium"].detail.startswith("none, panic only: ") and "panic" in items["medium"].fix


def test_crash_keys_item_warns_when_dm_crypt_keys_go_to_the_crash_kernel(tmp_path: Path) -> None:
    """crash_dm_crypt_keys (kernels >= 6.16) copies the keys it names into kdump's reserved
    memory. A configfs-like tree stands in for it (this kernel has none)."""
    root, loaded = tmp_path / "crash_dm_crypt_keys", tmp_path / "kexec_crash_loaded"
    assert check.crash_keys_item(root, loaded).ok  # no such tree: nothing copied
    root.mkdir()
    (root / "count").write_text("0\n")
    assert check.crash_keys_item(root, loaded).ok
    (root / "count").write_text("2\n")
    loaded.write_text("1\n")
    item = check.crash_keys_item(root, loaded)
    assert not item.ok and not item.required
    assert "2 dm-crypt key(s)" in item.detail and "in its reserved memory now" in item.detail
    assert "rmdir" in item.fix
    loaded.write_text("0\n")
    assert "copied there when a crash kernel is loaded" in check.crash_keys_item(root, loaded).detail


@pytest.mark.parametrize(("line", "ok", "said"), [
    ("quiet init_on_free=1", True, "init_on_free=1"),
    ("init_on_free=on", True, "init_on_free=on"),
    ("quiet", False, "init_on_free not on the kernel command line"),
    ("init_on_free=1 init_on_free=0", False, "init_on_free=0"),
    ("init_on_free=1 page_poison=1", False, "but page_poison=1 takes its place"),
])
def test_init_on_free_item_follows_what_the_fallback_decides(line: str, ok: bool, said: str) -> None:
    item = check.init_on_free_item(line)
    assert item.ok is ok and said in item.detail and not item.required
    assert bool(item.fix) is not ok
    if "page_poison" in said:
        assert "remove page_poison" in item.fix
