"""`killcord check`: a preflight for distribution builders, one verdict and fix per item."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from killcord import audit, control, kexec, medium, mor, resident, wipetarget
from killcord.cmdline import CmdlineError, frees_zeroed, last_value, poisons_pages, read_proc, sanitize
from killcord.config import Config


@dataclass(frozen=True)
class Item:
    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# Kernels >= 6.16 with CONFIG_CRASH_DM_CRYPT copy the dm-crypt keys named here into the crash
# kernel's reserved memory when a kdump kernel is loaded: a copy no wipe of ours reaches.
CRASH_KEYS = Path("/sys/kernel/config/crash_dm_crypt_keys")
KEXEC_CRASH_LOADED = Path("/sys/kernel/kexec_crash_loaded")


def run(config: Config, cmdline: str | None = None, drop_caches: bool = False) -> list[Item]:
    cmdline = read_proc() if cmdline is None else cmdline
    items = [Item("mode", config.live, False, f"mode = {config.mode!r}",
                  "" if config.live else 'killcord acts for real only with mode = "live" in /etc/killcord/killcord.toml')]
    try:
        m = medium.resolve(config.medium, config.live_medium_mount)
        items.append(Item("medium", True, True, f"{m.device} via {m.source}, {len(m.devpaths)} devpaths watched"))
    except medium.MediumInRam as exc:
        items.append(Item("medium", False, False, f"none, panic only: {exc}",
                          "nothing to pull once the medium is in RAM; `killcord panic` still fires"))
    except (medium.MediumError, medium.MediumAbsent) as exc:
        items.append(Item("medium", False, True, str(exc), 'set medium = "/dev/..." (or serial:, uuid:, id-path:)'))
    items.append(init_on_free_item(cmdline))
    items.append(_kexec_item(config, cmdline))
    try:
        audit.parse(audit.read_snapshot().decode())
        items.append(Item("slabinfo", True, False, f"{audit.SLABINFO} readable"))
    except (OSError, ValueError) as exc:
        items.append(Item("slabinfo", False, False, f"{audit.SLABINFO}: {exc}",
                          "run as root on a kernel with CONFIG_SLUB_DEBUG (the audit stage is skipped otherwise)"))
    items.append(crash_keys_item())
    items.append(mor_item(config))
    items += _daemon_items(config, drop_caches)
    running = any(p.info["name"] == "memlockd" for p in psutil.process_iter(["name"]))
    items.append(Item("memlockd", running, False, "running" if running else "not running",
                      "" if running else "install and start memlockd with killcord's memlockd config, "
                      "so kexec and systemctl stay in RAM"))
    return items


def init_on_free_item(cmdline: str) -> Item:
    """Whether this boot zeroes what killed processes free, as the fallback decides it."""
    iof = last_value(cmdline, "init_on_free")
    said = f"init_on_free={iof}" if iof is not None else "init_on_free not on the kernel command line"
    if frees_zeroed(cmdline):
        return Item("init_on_free", True, False, said)
    if poisons_pages(cmdline):
        return Item("init_on_free", False, False,
                    f"{said}, but page_poison={last_value(cmdline, 'page_poison')} takes its place: "
                    "freed memory is poisoned, not zeroed, and the fallback must claim it",
                    "remove page_poison from the boot loader's kernel command line and keep init_on_free=1")
    return Item("init_on_free", False, False, said,
                "add init_on_free=1 to the boot loader's kernel command line: "
                "memory freed by killed processes is then zeroed at once")


def _kexec_item(config: Config, cmdline: str) -> Item:
    try:
        sanitize(cmdline, config.kexec_append)
    except CmdlineError as exc:
        return Item("kexec", False, True, f"not staged: the wipe kernel's command line cannot be made safe: {exc}",
                    exc.fix)
    if kexec.is_loaded():
        return Item("kexec", True, True, "an image is staged (/sys/kernel/kexec_loaded = 1)")
    if not kexec.KEXEC_LOADED.exists():
        return Item("kexec", False, True, "this kernel has no kexec support",
                    "use a kernel built with CONFIG_KEXEC_FILE (Debian's has it); until then only the poweroff fallback runs")
    try:
        image = kexec.find_image(config.kexec_kernel, "kernel", config.live_medium_mount)
    except kexec.KexecError as exc:
        return Item("kexec", False, True, str(exc), "fix kexec_kernel")
    if image is None:
        return Item("kexec", False, True, "no kernel image found to stage", "set kexec_kernel")
    try:
        disabled = kexec.KEXEC_LOAD_DISABLED.read_text().strip() == "1"
    except OSError:
        disabled = False
    if disabled:
        return Item("kexec", False, True, "kernel.kexec_load_disabled = 1 and nothing staged",
                    "let killcord stage before anything sets kexec_load_disabled (it can lock after staging: kexec_lock = true)")
    return Item("kexec", True, True, f"stageable: {image} (not staged yet: the daemon stages it when it arms)")


def mor_item(config: Config, efivars: Path = mor.EFIVARS, magic: int | None = mor.EFIVARFS_MAGIC) -> Item:
    """The firmware's MOR bit (mor.py): set, or why not."""
    state = mor.read(efivars, magic)
    if not state.offered:
        return Item("mor", True, False, f"not offered: {state.note} (nothing to set)")
    if state.is_set:
        return Item("mor", True, False, f"MemoryOverwriteRequestControl {state.note}")
    fix = ('set mor = "auto" in /etc/killcord/killcord.toml and restart killcord' if config.mor == "off"
           else "restart killcord (it sets it at arm time); `killcord status` says why it could not")
    return Item("mor", False, False, f"MemoryOverwriteRequestControl {state.note}", fix)


def crash_keys_item(root: Path = CRASH_KEYS, crash_loaded: Path = KEXEC_CRASH_LOADED) -> Item:
    """dm-crypt keys set to be copied into kdump's reserved memory (crash_dm_crypt_keys)."""
    try:
        count = int((root / "count").read_text().strip() or 0)
    except FileNotFoundError:
        return Item("crash-keys", True, False, f"no {root}: no dm-crypt key is set to be copied for a crash kernel")
    except (OSError, ValueError) as exc:
        return Item("crash-keys", False, False, f"cannot read {root / 'count'}: {exc}", "run `killcord check` as root")
    if count == 0:
        return Item("crash-keys", True, False, f"{root}: no dm-crypt key is set to be copied for a crash kernel")
    try:
        loaded = crash_loaded.read_text().strip() == "1"
    except OSError:
        loaded = False
    where = ("a crash kernel is loaded: they are in its reserved memory now" if loaded
             else "they are copied there when a crash kernel is loaded")
    return Item("crash-keys", False, False,
                f"{count} dm-crypt key(s) set to be copied into the crash kernel's reserved memory ({root}); "
                f"{where}, out of reach of the keys stage and of the wipe",
                f"remove the key items (rmdir {root}/<item>) and keep kdump tools from adding them "
                "(a live system has nowhere to save a crash dump anyway)")


def _daemon_items(config: Config, drop_caches: bool) -> list[Item]:
    try:
        status = control.request(config.socket, "status", timeout=2.0)
    except control.NoAnswer as exc:
        return [Item("daemon", False, True, str(exc), "start it: systemctl enable --now killcord"
                     if exc.missing else "see `systemctl status killcord` and the journal"),
                Item("resident", False, True, "unknown: the daemon does not answer", "start the daemon"),
                wipe_target_item(config, None)]
    if not isinstance(status, control.StatusReply):
        return [Item("daemon", False, True, f"status refused: {status.error}", "run `killcord check` as root"),
                Item("resident", False, True, "unknown: no status from the daemon", "run `killcord check` as root"),
                wipe_target_item(config, None)]
    armed = status.state == "armed"
    detail = f"pid {status.pid}, state {status.state}"
    if status.medium is None and status.medium_note:
        detail += f"; medium: none ({status.medium_note})"
    items = [Item("daemon", armed, True, detail, "" if armed else "see `killcord status` and the journal")]
    return items + [_resident_item(status, drop_caches), _fallback_item(status.pid), detector_item(status.detector),
                    standby_item(status.standby), grace_item(config, status.grace),
                    panic_keys_item(config, status.panic_keys),
                    wipe_target_item(config, status.kexec)]


def detector_item(detector: str | None) -> Item:
    """Whether the uevent detector runs real-time (daemon.detect): if not, a busy system
    (udev, services failing on the missing medium) delays the detection by tens of ms."""
    if detector is None:
        return Item("realtime", False, False, "the daemon does not say (an older version)", "restart killcord")
    ok = detector.startswith("SCHED_FIFO")
    return Item("realtime", ok, False, f"uevent detector: {detector}",
                "" if ok else "give the daemon CAP_SYS_NICE (the packaged unit does) and do not set "
                "RestrictRealtime=; then systemctl restart killcord")


def standby_item(spare: dict | None) -> Item:
    """The standby (standby.py): forked, alive, and in a scope of its own."""
    if spare is None:
        return Item("standby", False, False, "none: a daemon killed with the medium gone meanwhile would leave "
                    "nothing armed", "restart killcord (an older daemon)")
    pid = int(spare["pid"])
    if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
        return Item("standby", False, False, f"pid {pid} is gone", "restart killcord; see the journal for why it ended")
    detail = f"pid {pid}, {spare.get('note')}"
    if not spare.get("scope"):
        return Item("standby", False, False, detail, "run killcord under systemd (the packaged unit), which gives "
                    "the standby a scope unit of its own")
    return Item("standby", True, False, detail)


def grace_item(config: Config, grace: dict | None) -> Item:
    """The grace period (grace_ms): off, or how long and what counts as the medium back."""
    if grace is None and not config.grace_ms:
        return Item("grace", True, False, "off: a pulled medium fires at once")
    if grace is None:
        return Item("grace", False, False, f"grace_ms = {config.grace_ms} is set, but the daemon does not use it",
                    "restart killcord (an older daemon, or the config changed since it started)")
    detail = f"{grace['ms']} ms, with a notice on the console, every terminal and every graphical session"
    if not grace.get("back_if"):
        return Item("grace", False, False, detail + "; nothing identifies the medium (no serial number, no loop "
                    "file), so it can never count as back: the period only delays the firing",
                    "set grace_ms = 0, or use a medium with a serial number")
    return Item("grace", True, False, f"{detail}; back means {grace['back_if']} (anyone holding the medium can "
                "put it back in time: the period is a convenience, not a protection)")


def panic_keys_item(config: Config, keys: dict | None) -> Item:
    """The panic key chord (keyboards.py) as the running daemon reads it: from how many
    keyboards, real-time or not; or off."""
    if keys is None and not config.panic_keys:
        return Item("panic_keys", True, False, "off (panic_keys is not set)")
    if keys is None:
        return Item("panic_keys", False, False, f"{config.panic_keys} is set, but the daemon does not read the keys",
                    "restart killcord (an older daemon, or the config changed since it started)")
    boards = keys.get("keyboards") or []
    sched = str(keys.get("sched"))
    detail = f"{keys.get('chord')} on {len(boards)} keyboard(s), {sched}"
    if not boards:
        return Item("panic_keys", False, False, detail + "; none open",
                    "plug in a keyboard (it is opened then); `killcord status` lists the keyboards and any not opened")
    if not sched.startswith("SCHED_FIFO"):
        return Item("panic_keys", False, False, detail, "give the daemon CAP_SYS_NICE (the packaged unit does)")
    return Item("panic_keys", True, False, detail)


WIPE_TARGET_FIX = ("apt install busybox-static (the package builds it), or `killcord wipe-target build`; "
                   "then systemctl restart killcord")


def wipe_target_item(config: Config, staged: dict | None, image: Path = wipetarget.IMAGE) -> Item:
    """What the daemon staged as the kexec target's initramfs: killcord's wipe target, still
    as its manifest says, is the fast path; the system's initramfs also wipes, only seconds
    slower (not required). Without a daemon: whether the built image is sound."""
    try:
        built: wipetarget.Manifest | None = wipetarget.verify(image)
        problem = ""
    except wipetarget.WipeTargetError as exc:
        built, problem = None, str(exc)
    if config.kexec_initrd != "auto":
        return Item("wipe-target", False, False, f"kexec_initrd = {config.kexec_initrd!r}: the jump boots that "
                    "initramfs, not killcord's wipe target", 'set kexec_initrd = "auto" to stage the wipe target')
    if staged is None or not staged.get("loaded"):
        what = "nothing staged by a running daemon; " if staged is not None else "no daemon to ask; "
        if built is None:
            return Item("wipe-target", False, False, what + problem, WIPE_TARGET_FIX)
        return Item("wipe-target", True, False, what + f"built: {image} ({built.bytes} bytes, matches its manifest)")
    if staged.get("initrd_kind") != "wipe-target":
        return Item("wipe-target", False, False,
                    f"the jump boots the system's initramfs {staged.get('initrd')} ({staged.get('initrd_bytes')} bytes): "
                    f"it wipes too, seconds later; {staged.get('note') or problem}", WIPE_TARGET_FIX)
    if built is None or staged.get("initrd_sha256") != built.sha256:
        why = problem or f"the staged one (sha256 {str(staged.get('initrd_sha256'))[:12]}) is not the one built now"
        return Item("wipe-target", False, False, f"staged {staged.get('initrd')}, but {why}",
                    "systemctl restart killcord (it stages the image again)")
    return Item("wipe-target", True, False, f"staged {staged.get('initrd')} ({built.bytes} bytes, at most "
                f"{wipetarget.MAX_BYTES}; sha256 {built.sha256[:12]} as its manifest records)")


def _fallback_item(pid: int) -> Item:
    """The poweroff fallback frees the RAM file systems the daemon sees: they must be the
    system's, not copies in a mount namespace of its own (PrivateTmp=, ProtectSystem=...).
    Compared by mount ids (a namespace's copies get new ones): /proc/1/ns/mnt itself may be
    unreadable even to root inside a container, mountinfo is not."""
    try:
        ours, system = _mount_ids(str(pid)), _mount_ids("1")
    except OSError as exc:
        return Item("fallback", False, True, f"cannot check the daemon's mount namespace: {exc.strerror}",
                    "run `killcord check` as root")
    if ours != system:
        return Item("fallback", False, True,
                    "the daemon runs in a mount namespace of its own: its poweroff fallback would free "
                    "private copies and leave the system's /tmp, /dev/shm and overlay in RAM",
                    "remove PrivateTmp=, ProtectSystem=, ProtectHome= and PrivateMounts= from killcord.service drop-ins")
    return Item("fallback", True, True, "the daemon sees the system's RAM file systems (same mounts as PID 1)")


def _mount_ids(pid: str) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line.split(" ", 1)[0] for line in f]


def _resident_item(status: control.StatusReply, drop_caches: bool) -> Item:
    """The daemon itself is held by mlockall (the kernel keeps VM_LOCKED pages present);
    the files it would need again are held by memlockd: mincore over them, after dropping
    the page cache (root), shows only what is really locked."""
    res = status.resident
    try:
        pid = status.pid
        if drop_caches:
            DROP_CACHES.write_text("3\n")
        report = resident.report(list(resident.firing_path(pid=str(pid))))
        locked_kib = resident.locked_kib(str(pid))
    except (OSError, KeyError, ValueError) as exc:
        return Item("resident", False, True, f"cannot check: {exc}", "run `killcord check` as root")
    missing = list(report["not_resident"])
    ok = bool(res.get("mlockall")) and locked_kib > 0 and not missing
    after = "after dropping the page cache" if drop_caches else "(page cache not dropped: try --drop-caches)"
    detail = (f"daemon: mlockall={res.get('mlockall')}, {locked_kib} KiB locked; files: "
              f"{report['resident_pages']}/{report['pages']} pages of {report['files']} resident {after}")
    if missing:
        detail += f"; not resident: {', '.join(map(str, missing[:5]))}" + (" ..." if len(missing) > 5 else "")
    return Item("resident", ok, True, detail,
                "" if ok else "run the daemon as root or with CAP_IPC_LOCK, and memlockd with "
                "`killcord memlock-config` in /etc/memlockd.d/killcord.cfg")


def exit_code(items: list[Item]) -> int:
    return 1 if any(i.required and not i.ok for i in items) else 0


def render(items: list[Item]) -> str:
    lines = []
    for i in items:
        mark = "ok  " if i.ok else ("FAIL" if i.required else "warn")
        lines.append(f"[{mark}] {i.name}: {i.detail}")
        if i.fix and not i.ok:
            lines.append(f"       fix: {i.fix}")
    return "\n".join(lines)

