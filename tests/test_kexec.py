"""Staging the wipe kernel: its command line, the images it reads, and what happens when
either cannot be used (dry-run and fake loaders here; the real jump runs in QEMU).

The command line's parsing itself is tests/test_cmdline.py's (property tests against a
model of the kernel's parser); here: literal inputs and the outputs staging must produce.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from killcord import kexec
from killcord.events import Outcome

TAIL = "init_on_alloc=1 init_on_free=1 killcord.wipe=1"


@pytest.fixture
def images(tmp_path: Path) -> tuple[str, str]:
    k, i = tmp_path / "vmlinuz", tmp_path / "initrd"
    k.write_bytes(b"kernel")
    i.write_bytes(b"initrd")
    return str(k), str(i)


def dry(images: tuple[str, str], current: str, append: str = "") -> kexec.Staged:
    return kexec.stage(*images, append, live=False, lock=False, live_mount=Path("/nonexistent"),
                       current_cmdline=current)


@pytest.mark.parametrize(("current", "expected"), [
    ("boot=live quiet", f"boot=live quiet {TAIL}"),
    # measured to leave RAM unwiped (vm-findings.md): all dropped
    ("mem=256M boot=live", f"boot=live {TAIL}"),
    ("memmap=exactmap memmap=640K@0 memmap=255M@1M quiet", f"quiet {TAIL}"),
    ("memmap=64M$0x10000000 memmap=64M!0x10000000 memmap=64M#0x10000000 x", f"x {TAIL}"),
    ("crashkernel=64M x", f"x {TAIL}"),
    ("hugepagesz=1G hugepages=1 default_hugepagesz=1G x", f"x {TAIL}"),
    ("reserve_mem=64M:4096:trace cma=64M hugetlb_cma=1G efi_fake_mem=1G@4G:0x40000 x", f"x {TAIL}"),
    # ours go last: the last init_on_free wins
    ("init_on_free=0 quiet", f"quiet {TAIL}"),
    ("killcord.wipe=0 init_on_free=1 init_on_alloc=0 x", f"x {TAIL}"),
    # before " -- ": what follows goes to init
    ("quiet -- single init_on_free=0", f"quiet {TAIL} -- single init_on_free=0"),
    ("BOOT_IMAGE=/live/vmlinuz initrd=/live/initrd.img boot=live", f"boot=live {TAIL}"),
    # safe ones are kept as they were, quotes included (measured: no residue)
    ("page_poison=1 movablecore=128M log_buf_len=16M memtest=1", f"page_poison=1 movablecore=128M log_buf_len=16M memtest=1 {TAIL}"),
    ('dyndbg="file x.c +p" mem=1G acpi_osi="Windows 2020"', f'dyndbg="file x.c +p" acpi_osi="Windows 2020" {TAIL}'),
    ("", TAIL),
])
def test_staged_cmdline(images, current: str, expected: str) -> None:
    assert dry(images, current).cmdline == expected


# Each of these took effect on the wipe kernel before (issue 9, part 3).
@pytest.mark.parametrize(("current", "expected"), [
    # the kernel drops the quotes and sees mem=1G
    ('"mem=1G" quiet', f"quiet {TAIL}"),
    ('"memmap=64M$0x10000000" crashkernel="256M" x', f"x {TAIL}"),
    # - and _ are the same in names to the kernel
    ("reserve-mem=64M:4096:trace efi-fake-mem=1G@4G:0x40000 default-hugepagesz=1G x", f"x {TAIL}"),
    ("init-on-free=0 x", f"x {TAIL}"),
    # the kernel finds crashkernel= anywhere (strstr), init's arguments included
    ('x foo.bar="crashkernel=256M" y', f"x y {TAIL}"),
    ("x -- crashkernel=256M single", f"x {TAIL} -- single"),
    # a quoted "--" is "--" to the kernel: ours must come before it
    ('a "--" init_on_free=0', f"a {TAIL} -- init_on_free=0"),
    # an open quote runs to the end of the line: it would swallow ours
    ('a dyndbg="file x.c', f"a {TAIL}"),
    # 0xA0 (in "à", C3 A0) is whitespace to the kernel: "mem=1G" is a token of its own
    ("x=àmem=1G", f"x=\udcc3 {TAIL}"),
    # these keep the initramfs from running the wipe
    ("rdinit=/bin/sh x", f"x {TAIL}"),
    ('break=top x="a rd.break" y', f"y {TAIL}"),
])
def test_what_the_kernel_would_have_taken_is_dropped(images, current: str, expected: str) -> None:
    staged = dry(images, current)
    assert staged.cmdline == expected and staged.loaded and staged.error is None


def test_append_goes_before_ours_and_before_dashdash(images) -> None:
    staged = dry(images, "a -- b", "memtest=1 killcord.wipe_then=reboot")
    assert staged.cmdline == f"a memtest=1 killcord.wipe_then=reboot {TAIL} -- b"


def fake_loaders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace both loaders (kexec_file_load, kexec-tools) with fakes that only record."""
    calls: list[str] = []
    monkeypatch.setattr(kexec, "_file_load", lambda k, i, line: calls.append(f"file_load {line}"))
    monkeypatch.setattr(kexec, "_tools_load", lambda k, i, line: calls.append(f"tools_load {line}"))
    return calls


def test_a_line_that_cannot_be_made_safe_is_never_staged(images, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_loaders(monkeypatch)
    monkeypatch.setattr(kexec, "is_loaded", lambda: True)  # even with an older image in the kernel
    # the kernel keeps 2047 bytes: ours, at the end, would be cut off
    long_line = "quiet " + "x" * 2100
    for live in (True, False):
        staged = kexec.stage(*images, "", live=live, lock=False, live_mount=Path("/nonexistent"),
                             current_cmdline=long_line)
        assert not staged.loaded and staged.method == "none" and staged.cmdline == ""
        assert "cannot be made safe" in str(staged.error) and "2047" in str(staged.error)
        assert "fix: shorten" in str(staged.error)
        outcome, detail = kexec.execute(staged, live=live)
        assert outcome is Outcome.SKIPPED and "cannot be made safe" in str(detail["reason"])
    assert calls == []


def test_live_stage_loads_the_sanitized_line(images, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_loaders(monkeypatch)
    monkeypatch.setattr(kexec, "is_loaded", lambda: bool(calls))
    staged = kexec.stage(*images, "", live=True, lock=False, live_mount=Path("/nonexistent"),
                         current_cmdline='quiet "mem=1G"')
    assert calls == [f"file_load quiet {TAIL}"]
    assert staged.loaded and staged.method == "kexec_file_load" and staged.cmdline == f"quiet {TAIL}"


def test_current_line_read_from_proc_when_not_given(images, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    proc = tmp_path / "cmdline"
    proc.write_bytes(b'quiet mem=1G "--" x\n')
    monkeypatch.setattr(kexec.cmdline, "read_proc", functools.partial(kexec.cmdline.read_proc, proc))
    staged = kexec.stage(*images, "", live=False, lock=False, live_mount=tmp_path)
    assert staged.cmdline == f"quiet {TAIL} -- x"


def test_explicit_missing_image_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(kexec.KexecError, match="kexec_kernel = .*is not an existing file"):
        kexec.find_image(str(tmp_path / "vmlinuz"), "kernel", tmp_path)
    (tmp_path / "dir").mkdir()
    with pytest.raises(kexec.KexecError, match="is not an existing file"):  # a directory is no kernel
        kexec.stage(str(tmp_path / "dir"), "none", "", live=False, lock=False, live_mount=tmp_path)


def test_auto_prefers_the_live_medium(tmp_path: Path) -> None:
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "vmlinuz").write_bytes(b"k")
    (tmp_path / "live" / "initrd.img").write_bytes(b"i")
    assert kexec.find_image("auto", "kernel", tmp_path) == str(tmp_path / "live" / "vmlinuz")
    assert kexec.find_image("auto", "initrd", tmp_path) == str(tmp_path / "live" / "initrd.img")
    assert kexec.find_image("none", "initrd", tmp_path) is None


def test_dry_stage_checks_files_and_never_loads(images, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_loaders(monkeypatch)
    staged = kexec.stage(*images, "memtest=1", live=False, lock=False, live_mount=Path("/nonexistent"),
                         current_cmdline="quiet mem=1G -- x")
    assert staged.method == "dry" and staged.loaded and staged.error is None
    assert staged.cmdline == f"quiet memtest=1 {TAIL} -- x"
    outcome, detail = kexec.execute(staged, live=False)
    assert outcome is Outcome.DRY and detail["kernel"] == images[0] and detail["cmdline"] == staged.cmdline
    assert calls == []


def test_unreadable_image_means_skip_not_crash(images) -> None:
    # A regular file whose read fails, as a kernel on a failing medium's would: reading
    # /proc/self/mem at offset 0 (never mapped) gives EIO, even to root (who can read a
    # mode-000 file). An explicit path, so a kernel in /boot cannot be picked instead.
    for kernel, initrd in (("/proc/self/mem", images[1]), (images[0], "/proc/self/mem")):
        staged = kexec.stage(kernel, initrd, "", live=False, lock=False, live_mount=Path("/nonexistent"),
                             current_cmdline="quiet")
        assert not staged.loaded and staged.method == "none"
        assert staged.error == "cannot read /proc/self/mem: Input/output error"
        outcome, detail = kexec.execute(staged, live=False)
        assert outcome is Outcome.SKIPPED and detail["reason"] == staged.error


def test_no_kernel_image_means_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staged = kexec.stage("none", "none", "", live=False, lock=False, live_mount=tmp_path, current_cmdline="quiet")
    assert not staged.loaded and staged.kernel is None and staged.error == "kexec_kernel = none"
    assert kexec.execute(staged, live=False) == (Outcome.SKIPPED, {"reason": "kexec_kernel = none"})


@pytest.mark.parametrize(("content", "loaded"), [(b"1\n", True), (b"0\n", False), (None, False), (b"", False)])
def test_is_loaded_reads_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes | None,
                               loaded: bool) -> None:
    path = tmp_path / "kexec_loaded"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setattr(kexec, "KEXEC_LOADED", path)
    assert kexec.is_loaded() is loaded
