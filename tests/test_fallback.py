"""The in-RAM fallback's parts on this machine: a real tmpfs freed file by file, real
memory claimed and given back. (Device-mapper and the power-off itself run only in the
QEMU guests: this kernel has no device-mapper, and the host must not power off.)"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root

from killcord import claim, fallback


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "ram"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "kc-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def used_kib(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def test_ram_mounts_reads_types_and_escapes(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - overlay overlay rw\n"
        "23 22 0:22 / /run rw,nosuid - tmpfs tmpfs rw\n"
        "24 23 0:23 / /run/live/overlay rw - tmpfs tmpfs rw\n"
        "25 22 0:24 / /my\\040dir rw - ramfs none rw\n"
        "26 22 8:1 / /run/live/medium ro - ext4 /dev/sda1 ro\n"
        "27 22 0:5 / /dev rw - devtmpfs udev rw\n")
    assert fallback.ram_mounts(str(info)) == ["/run/live/overlay", "/my dir", "/run"]


@needs_root
def test_scrub_frees_every_file_and_follows_nothing(tmpfs: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("must stay")
    (tmpfs / "a" / "b").mkdir(parents=True)
    (tmpfs / "a" / "b" / "secret").write_bytes(os.urandom(8 << 20))
    (tmpfs / "top").write_bytes(b"x" * 4096)
    (tmpfs / "link").symlink_to(outside)
    os.mkfifo(tmpfs / "fifo")  # opening it for writing would block: it must be skipped
    held = open(tmpfs / "held-open", "wb")  # noqa: SIM115 - a process still holding a file
    held.write(os.urandom(4 << 20))
    held.flush()
    try:
        before = used_kib(tmpfs)
        assert before >= 12 * 1024
        dry = fallback.scrub([str(tmpfs)], time.monotonic() + 10, live=False)
        assert dry.files == 3 and used_kib(tmpfs) == before  # dry-run counts, frees nothing
        done = fallback.scrub([str(tmpfs)], time.monotonic() + 10, live=True)
        assert done.files == 3 and done.bytes_freed >= 12 << 20 and not done.unfinished
        assert used_kib(tmpfs) < 64  # the held-open file was truncated too: its pages are free
        assert not (tmpfs / "a" / "b" / "secret").exists() and not (tmpfs / "top").exists()
        assert outside.read_text() == "must stay"
        assert (tmpfs / "fifo").exists()
    finally:
        held.close()


@needs_root
def test_scrub_does_not_cross_into_another_mount(tmpfs: Path, tmp_path: Path) -> None:
    other = tmpfs / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "kc-test-inner", str(other)], check=True)
    try:
        (other / "keep").write_text("another mount")
        (tmpfs / "go").write_text("this mount")
        fallback.scrub([str(tmpfs)], time.monotonic() + 10, live=True)
        assert (other / "keep").read_text() == "another mount" and not (tmpfs / "go").exists()
    finally:
        subprocess.run(["umount", str(other)], check=False)


@needs_root
def test_scrub_past_its_deadline_says_unfinished(tmpfs: Path) -> None:
    (tmpfs / "f").write_text("x")
    done = fallback.scrub([str(tmpfs)], time.monotonic() - 1, live=True)
    assert done.unfinished == [str(tmpfs)] and (tmpfs / "f").exists()


def test_wipe_claims_memory_and_the_kernel_agrees() -> None:
    wiped = fallback.wipe_free(time.monotonic() + 30, max_bytes=96 << 20, chunk=32 << 20)
    assert wiped.target_bytes == 96 << 20
    assert wiped.claimed_bytes == 96 << 20
    assert wiped.resident_bytes >= 0.9 * wiped.claimed_bytes
    assert wiped.ok and not wiped.error


def test_the_live_wipe_hands_its_memory_over_still_held() -> None:
    """The live fallback powers off holding what it claimed (releasing it cost seconds
    under TCG, past the stage's deadline): given `keep`, the claiming child stays, its
    memory resident, after the wipe returns, until the caller lets go."""
    kept: list[claim.Held] = []
    wiped = fallback.wipe_free(time.monotonic() + 30, max_bytes=64 << 20, chunk=32 << 20, keep=kept)
    assert wiped.ok and [h.bytes for h in kept] == [64 << 20]
    assert claim.rss_anon(f"/proc/{kept[0].pid}/status") >= 0.9 * (64 << 20)
    kept[0].release()
    assert not Path(f"/proc/{kept[0].pid}").exists()


def test_a_wipe_that_claimed_nothing_is_not_ok() -> None:
    wiped = fallback.wipe_free(time.monotonic() - 1, max_bytes=64 << 20)
    assert wiped.claimed_bytes == 0 and not wiped.ok
    assert not fallback.Wiped(0, 0, 0, 16 << 20, 0.0).ok  # nothing to wipe is no success either
    assert not fallback.Wiped(100 << 20, 100 << 20, 10 << 20, 16 << 20, 0.1).ok  # kernel disagrees


def test_dry_run_handles_open_nothing() -> None:
    h = fallback.Handles.open(live=False)
    assert h.dm_control is None and h.drop_caches is None


@needs_root
@pytest.mark.parametrize("slow", [False, True])
def test_the_caches_drop_beside_the_scrub_and_a_drop_the_deadline_cuts_short_is_no_success(
        tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: bool) -> None:
    """The live fallback on this machine, as far as it can safely go: no device-mapper, no
    claim (init_on_free=1), a real tmpfs of its own, and a regular file standing in for
    /proc/sys/vm/drop_caches. With `slow`, a fake kernel that takes longer to zero the
    dropped pages than the deadline allows (os.pwrite blocking, as the write does for
    seconds under TCG): the fallback must not wait past its deadline, nor call that wiped."""
    (tmpfs / "secret").write_bytes(b"x" * 4096)
    began, release = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        began.set()
        if slow:
            release.wait(30)
        return real_pwrite(fd, data, offset)

    drop_began_first: list[bool] = []

    def ram_mounts() -> list[str]:
        began.wait(1)  # the drop's thread is started before the scrub looks for mounts
        drop_began_first.append(began.is_set())
        return [str(tmpfs)]

    monkeypatch.setattr(fallback.os, "pwrite", pwrite)
    monkeypatch.setattr(fallback, "ram_mounts", ram_mounts)
    drop = tmp_path / "drop_caches"
    fd = os.open(drop, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        ok, detail = fallback.run(fallback.Handles(None, fd, freed_zeroed=True), time.monotonic() + 1.0, live=True)
    finally:
        release.set()
        os.close(fd)
    assert drop_began_first == [True]
    assert not (tmpfs / "secret").exists()
    assert detail["wiped"] == {"skipped": "init_on_free=1: every page was zeroed as it was freed", "ok": True}
    if slow:
        assert detail["drop_caches_error"] == fallback.CacheDrop.UNFINISHED and ok is False
    else:
        assert detail["drop_caches_error"] == "" and ok is True
        assert drop.read_bytes() == b"3\n"


def test_caches_not_opened_at_arm_time_are_not_dropped_and_say_so() -> None:
    assert "was not opened at arm time" in fallback.CacheDrop(None).wait(time.monotonic() + 1)
