"""Stage the sanitizing kernel at arm time; execute it at fire time with reboot(2).

Staging reads the kernel and initramfs while the medium is still there; execution reads
nothing: the image already sits in RAM, reserved by the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from killcord.events import Outcome

# Always last, before any " -- ": the last init_on_free wins, and what follows "--"
# goes to init, not to the kernel (vm-findings.md, "What the kexec target must not inherit").
# init_on_alloc=1 lets the initramfs wiper claim free memory with fallocate: the kernel
# then zeroes every page it hands over, far faster than writing zeros from user space.
WIPE_PARAMS = ("init_on_alloc=1", "init_on_free=1", "killcord.wipe=1")

# Dropped from the inherited command line. mem=, memmap=, crashkernel= and gigantic
# hugepages were measured to leave 15-50 % of RAM unwiped; reserve_mem=, cma=,
# hugetlb_cma= and efi_fake_mem= reserve memory the same way (not measurable here).
# The wipe kernel needs no hugepages at all, so every hugepage parameter goes.
# initrd=/BOOT_IMAGE= belong to the boot loader; ours are replaced by our own.
STRIPPED = frozenset({
    "mem", "memmap", "crashkernel", "hugepages", "hugepagesz", "default_hugepagesz",
    "reserve_mem", "cma", "hugetlb_cma", "efi_fake_mem", "initrd", "BOOT_IMAGE",
    "init_on_alloc", "init_on_free", "killcord.wipe",
})

SYS_KEXEC_FILE_LOAD = {"x86_64": 320, "aarch64": 294}.get(platform.machine())
KEXEC_FILE_NO_INITRAMFS = 0x4
LINUX_REBOOT_CMD_KEXEC = 0x45584543
KEXEC_LOADED = Path("/sys/kernel/kexec_loaded")
KEXEC_LOAD_DISABLED = Path("/proc/sys/kernel/kexec_load_disabled")

# Resolved at import (never at fire time). glibc's reboot(int) adds the magic numbers.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_reboot = _libc.reboot
_reboot.argtypes = [ctypes.c_int]
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class KexecError(Exception):
    pass


@dataclass(frozen=True)
class Staged:
    kernel: str | None
    initrd: str | None
    cmdline: str
    method: str  # kexec_file_load | kexec_load | dry | none
    loaded: bool  # an image is in the kernel (or, in dry-run, would be)
    locked: bool = False  # kernel.kexec_load_disabled=1 set after staging
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def split_cmdline(cmdline: str) -> list[str]:
    """Split like the kernel does: on spaces, except inside double quotes."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in cmdline.strip():
        if ch == '"':
            quoted = not quoted
        if ch.isspace() and not quoted:
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(ch)
    if current:
        tokens.append("".join(current))
    return tokens


def sanitize_cmdline(current: str, extra: str = "") -> str:
    """The target's command line: the current one without what keeps RAM from being
    wiped, then `extra`, then WIPE_PARAMS, all before any `--` (init's arguments)."""
    tokens = split_cmdline(current)
    init_args: list[str] = []
    if "--" in tokens:
        cut = tokens.index("--")
        tokens, init_args = tokens[:cut], tokens[cut:]
    kept = [t for t in tokens if t.split("=", 1)[0] not in STRIPPED]
    return " ".join(kept + split_cmdline(extra) + list(WIPE_PARAMS) + init_args)


def find_image(setting: str, kind: str, live_mount: Path, release: str | None = None) -> str | None:
    """Resolve kexec_kernel / kexec_initrd. "auto": the live medium's copy first (read now,
    while it is there), then /boot. An explicit path that does not exist is an error."""
    if setting == "none":
        return None
    if setting != "auto":
        if not os.path.isfile(setting):
            raise KexecError(f"kexec_{kind} = {setting!r} is not an existing file; fix the path or use 'auto'")
        return setting
    release = release or platform.release()
    name = "vmlinuz" if kind == "kernel" else "initrd.img"
    candidates = sorted(glob.glob(str(live_mount / "live" / f"{name}*")))
    candidates += [f"/boot/{name}-{release}", f"/{name}"]
    return next((c for c in candidates if os.path.isfile(c)), None)


def _file_load(kernel: str, initrd: str | None, cmdline: str) -> None:
    if SYS_KEXEC_FILE_LOAD is None:
        raise OSError(errno.ENOSYS, f"kexec_file_load unknown on {platform.machine()}")
    raw = cmdline.encode() + b"\0"
    kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    ifd = os.open(initrd, os.O_RDONLY | os.O_CLOEXEC) if initrd else -1
    try:
        flags = 0 if initrd else KEXEC_FILE_NO_INITRAMFS
        if _syscall(SYS_KEXEC_FILE_LOAD, kfd, ifd, len(raw), raw, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"kexec_file_load: {os.strerror(err)}")
    finally:
        os.close(kfd)
        if ifd >= 0:
            os.close(ifd)


def _tools_load(kernel: str, initrd: str | None, cmdline: str) -> None:
    # kexec-tools' kexec_load path: for kernels that refuse kexec_file_load (unsigned
    # image, no CONFIG_KEXEC_FILE). Runs at arm time only.
    cmd = ["kexec", "--load", kernel, f"--command-line={cmdline}"]
    if initrd:
        cmd.append(f"--initrd={initrd}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OSError(errno.ENOEXEC, f"kexec-tools: {exc}") from None
    if proc.returncode != 0:
        raise OSError(errno.ENOEXEC, f"kexec-tools: {proc.stderr.strip() or proc.returncode}")


def is_loaded() -> bool:
    try:
        return KEXEC_LOADED.read_text().strip() == "1"
    except OSError:
        return False


def stage(kernel_setting: str, initrd_setting: str, append: str, live: bool, lock: bool,
          live_mount: Path, current_cmdline: str | None = None) -> Staged:
    """Load the image (live) or check that it could be (dry-run). Never raises for a
    missing or refused image: the firing path then falls back to poweroff. Raises
    KexecError only for a misconfigured explicit path (refuse to arm)."""
    kernel = find_image(kernel_setting, "kernel", live_mount)
    initrd = find_image(initrd_setting, "initrd", live_mount)
    if current_cmdline is None:
        current_cmdline = Path("/proc/cmdline").read_text()
    cmdline = sanitize_cmdline(current_cmdline, append)
    if kernel is None:
        why = "kexec_kernel = none" if kernel_setting == "none" else "no kernel image found; set kexec_kernel"
        return Staged(None, initrd, cmdline, "none", is_loaded() and live, error=why)
    if not live:
        try:
            for path in filter(None, (kernel, initrd)):
                with open(path, "rb") as f:
                    f.read(1)
        except OSError as exc:
            return Staged(kernel, initrd, cmdline, "none", False, error=str(exc))
        return Staged(kernel, initrd, cmdline, "dry", True)
    errors: list[str] = []
    for method, load in (("kexec_file_load", _file_load), ("kexec_load", _tools_load)):
        try:
            load(kernel, initrd, cmdline)
        except OSError as exc:
            errors.append(f"{method}: {exc.strerror or exc}")
            continue
        if is_loaded():
            return Staged(kernel, initrd, cmdline, method, True, _lock() if lock else False)
        errors.append(f"{method}: returned but {KEXEC_LOADED} is not 1")
    # An image staged by an earlier instance (before it set kexec_load_disabled) still runs.
    return Staged(kernel, initrd, cmdline, "none", is_loaded(), error="; ".join(errors))


def _lock() -> bool:
    # One-way: later loads are refused, the image staged above still executes.
    try:
        KEXEC_LOAD_DISABLED.write_text("1\n")
        return True
    except OSError:
        return False


def execute(staged: Staged, live: bool) -> tuple[Outcome, dict[str, object]]:
    """Fire-time: jump into the staged kernel. Returns only if that failed."""
    if not staged.loaded:
        return Outcome.SKIPPED, {"reason": staged.error or "no image staged"}
    if not live:
        return Outcome.DRY, {"would": "reboot(LINUX_REBOOT_CMD_KEXEC)", "kernel": staged.kernel,
                             "cmdline": staged.cmdline}
    _reboot(LINUX_REBOOT_CMD_KEXEC)
    err = ctypes.get_errno()
    return Outcome.FAILED, {"error": os.strerror(err), "errno": err}
