"""The kexec target's command line and staging (dry-run here; the real jump runs in QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from killcord import kexec
from killcord.events import Outcome

TAIL = "init_on_alloc=1 init_on_free=1 killcord.wipe=1"


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
    # safe ones are kept (measured: no residue)
    ("page_poison=1 movablecore=128M log_buf_len=16M memtest=1", f"page_poison=1 movablecore=128M log_buf_len=16M memtest=1 {TAIL}"),
    ("", TAIL),
])
def test_sanitize(current: str, expected: str) -> None:
    assert kexec.sanitize_cmdline(current) == expected


def test_extra_goes_before_ours_and_before_dashdash() -> None:
    assert kexec.sanitize_cmdline("a -- b", "memtest=1 killcord.wipe_then=reboot") == \
        f"a memtest=1 killcord.wipe_then=reboot {TAIL} -- b"


def test_quoted_values_stay_one_token() -> None:
    line = 'dyndbg="file x.c +p" mem=1G acpi_osi="Windows 2020"'
    assert kexec.split_cmdline(line) == ['dyndbg="file x.c +p"', "mem=1G", 'acpi_osi="Windows 2020"']
    assert kexec.sanitize_cmdline(line) == f'dyndbg="file x.c +p" acpi_osi="Windows 2020" {TAIL}'


def test_sanitizes_this_hosts_command_line() -> None:
    line = Path("/proc/cmdline").read_text()
    out = kexec.sanitize_cmdline(line)
    kernel_part = out.split(" -- ")[0].split()
    assert kernel_part[-3:] == ["init_on_alloc=1", "init_on_free=1", "killcord.wipe=1"]
    assert not any(t.split("=")[0] in kexec.STRIPPED - {"init_on_alloc", "init_on_free", "killcord.wipe"}
                   for t in kernel_part)


def test_explicit_missing_image_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(kexec.KexecError, match="kexec_kernel = .*is not an existing file"):
        kexec.find_image(str(tmp_path / "vmlinuz"), "kernel", tmp_path)


def test_auto_prefers_the_live_medium(tmp_path: Path) -> None:
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "vmlinuz").write_bytes(b"k")
    (tmp_path / "live" / "initrd.img").write_bytes(b"i")
    assert kexec.find_image("auto", "kernel", tmp_path) == str(tmp_path / "live" / "vmlinuz")
    assert kexec.find_image("auto", "initrd", tmp_path) == str(tmp_path / "live" / "initrd.img")
    assert kexec.find_image("none", "initrd", tmp_path) is None


def test_dry_stage_checks_files_and_never_loads(tmp_path: Path) -> None:
    k, i = tmp_path / "vmlinuz", tmp_path / "initrd"
    k.write_bytes(b"kernel")
    i.write_bytes(b"initrd")
    staged = kexec.stage(str(k), str(i), "memtest=1", live=False, lock=False, live_mount=tmp_path,
                         current_cmdline="quiet mem=1G -- x")
    assert staged.method == "dry" and staged.loaded and staged.error is None
    assert staged.cmdline == f"quiet memtest=1 {TAIL} -- x"
    outcome, detail = kexec.execute(staged, live=False)
    assert outcome is Outcome.DRY and detail["kernel"] == str(k)


def test_unreadable_or_absent_image_means_skip_not_crash(tmp_path: Path) -> None:
    staged = kexec.stage("auto", "auto", "", live=False, lock=False, live_mount=tmp_path / "none",
                         current_cmdline="quiet")
    if staged.kernel is None:  # no kernel for this release on the machine (as here)
        assert not staged.loaded and "kexec_kernel" in str(staged.error)
        outcome, detail = kexec.execute(staged, live=False)
        assert outcome is Outcome.SKIPPED and "kexec_kernel" in str(detail["reason"])
    (tmp_path / "dir").mkdir()
    with pytest.raises(kexec.KexecError, match="is not an existing file"):  # a directory is no kernel
        kexec.stage(str(tmp_path / "dir"), "none", "", live=False, lock=False, live_mount=tmp_path)


def test_no_kexec_support_reads_as_not_loaded() -> None:
    # this host kernel has no /sys/kernel/kexec_loaded; a guest with one is tested in QEMU
    assert kexec.is_loaded() == (kexec.KEXEC_LOADED.exists() and kexec.KEXEC_LOADED.read_text().strip() == "1")
