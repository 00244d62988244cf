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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from killcord import cmdline, wipetarget
from killcord.events import Outcome

# What the wipe kernel's command line keeps, drops and adds is cmdline.py's (one owner).

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
    # which initramfs: "wipe-target" (killcord's own, wipetarget.py), "system" (the
    # medium's or /boot's, whose killcord hook wipes), "explicit" (kexec_initrd = a path)
    initrd_kind: str = "none"
    initrd_bytes: int | None = None
    initrd_sha256: str | None = None  # the wipe target's, as verified right before staging
    note: str | None = None  # why not the wipe target, when "auto" fell back to the system's

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


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


@dataclass(frozen=True)
class Initrd:
    """The initramfs to stage: its path, which kind, the wipe target's manifest (as verified
    just now, by reading and hashing the image), and why not the wipe target."""

    path: str | None
    kind: str
    manifest: wipetarget.Manifest | None = None
    note: str | None = None


def choose_initrd(setting: str, live_mount: Path, wipe_image: Path) -> Initrd:
    """"auto": killcord's wipe target while it matches its manifest, else the system's (note
    says why); "none"; or the explicit path."""
    if setting == "none":
        return Initrd(None, "none")
    if setting != "auto":
        return Initrd(find_image(setting, "initrd", live_mount), "explicit")
    try:
        return Initrd(str(wipe_image), "wipe-target", wipetarget.verify(wipe_image))
    except wipetarget.WipeTargetError as exc:
        system = find_image("auto", "initrd", live_mount)
        return Initrd(system, "system" if system else "none", note=f"wipe target not used: {exc}")


def _file_load(kernel: str, initrd: str | None, line: str) -> None:
    if SYS_KEXEC_FILE_LOAD is None:
        raise OSError(errno.ENOSYS, f"kexec_file_load unknown on {platform.machine()}")
    raw = line.encode("utf-8", "surrogateescape") + b"\0"  # cmdline.py parses bytes
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


def _tools_load(kernel: str, initrd: str | None, line: str) -> None:
    # kexec-tools' kexec_load path: for kernels that refuse kexec_file_load (unsigned
    # image, no CONFIG_KEXEC_FILE). Runs at arm time only.
    # --kexec-syscall: kexec-tools >= 2.0.27 (Debian 13) tries kexec_file_load first by
    # default; this fallback is for the classic kexec_load (2.0.25 accepts the flag too).
    cmd = ["kexec", "--kexec-syscall", "--load", kernel, f"--command-line={line}"]
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
          live_mount: Path, current_cmdline: str | None = None,
          wipe_image: Path = wipetarget.IMAGE) -> Staged:
    """Load the image (live) or check that it could be (dry-run). Never raises for a
    missing or refused image, nor for a command line that cannot be made safe: nothing is
    staged and the firing path falls back to poweroff, with `error` saying why. Raises
    KexecError only for a misconfigured explicit path (refuse to arm)."""
    kernel = find_image(kernel_setting, "kernel", live_mount)
    initrd = choose_initrd(initrd_setting, live_mount, wipe_image)
    staged = _stage(kernel, initrd.path, kernel_setting, append, live, lock, current_cmdline)
    size, digest = None, None
    if staged.loaded and initrd.manifest is not None:  # read and hashed by verify, right before staging
        size, digest = initrd.manifest.bytes, initrd.manifest.sha256
    elif staged.loaded and initrd.path is not None:  # the system's: its size (check compares only ours)
        try:
            size = os.path.getsize(initrd.path)
        except OSError:
            pass
    return replace(staged, initrd_kind=initrd.kind, initrd_bytes=size, initrd_sha256=digest, note=initrd.note)


def _stage(kernel: str | None, initrd: str | None, kernel_setting: str, append: str, live: bool, lock: bool,
           current_cmdline: str | None) -> Staged:
    if current_cmdline is None:
        current_cmdline = cmdline.read_proc()
    try:
        line = cmdline.sanitize(current_cmdline, append)
    except cmdline.CmdlineError as exc:
        # Never stage a kernel that would keep RAM from the wipe or skip it.
        return Staged(kernel, initrd, "", "none", False,
                      error=f"not staged: the wipe kernel's command line cannot be made safe: {exc}; fix: {exc.fix}")
    if kernel is None:
        why = "kexec_kernel = none" if kernel_setting == "none" else "no kernel image found; set kexec_kernel"
        return Staged(None, initrd, line, "none", is_loaded() and live, error=why)
    if not live:
        for path in filter(None, (kernel, initrd)):
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as exc:
                return Staged(kernel, initrd, line, "none", False, error=f"cannot read {path}: {exc.strerror or exc}")
        return Staged(kernel, initrd, line, "dry", True)
    errors: list[str] = []
    for method, load in (("kexec_file_load", _file_load), ("kexec_load", _tools_load)):
        try:
            load(kernel, initrd, line)
        except OSError as exc:
            errors.append(f"{method}: {exc.strerror or exc}")
            continue
        if is_loaded():
            return Staged(kernel, initrd, line, method, True, _lock() if lock else False)
        errors.append(f"{method}: returned but {KEXEC_LOADED} is not 1")
    # An image staged by an earlier instance (before it set kexec_load_disabled) still runs.
    return Staged(kernel, initrd, line, "none", is_loaded(), error="; ".join(errors))


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
