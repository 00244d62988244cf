"""`killcord check`: a preflight for distribution builders, one verdict and fix per item."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from killcord import audit, control, kexec, medium, resident
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


def _last_value(cmdline: str, key: str) -> str | None:
    # the kernel takes the last occurrence
    value = None
    for token in kexec.split_cmdline(cmdline.split(" -- ")[0]):
        k, _, v = token.partition("=")
        if k == key:
            value = v
    return value


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def run(config: Config, cmdline: str | None = None, drop_caches: bool = False) -> list[Item]:
    cmdline = Path("/proc/cmdline").read_text() if cmdline is None else cmdline
    items = [Item("mode", config.live, False, f"mode = {config.mode!r}",
                  "" if config.live else 'killcord acts for real only with mode = "live" in /etc/killcord/killcord.toml')]
    try:
        m = medium.resolve(config.medium, config.live_medium_mount)
        items.append(Item("medium", True, True, f"{m.device} via {m.source}, {len(m.devpaths)} devpaths watched"))
    except (medium.MediumError, medium.MediumAbsent) as exc:
        items.append(Item("medium", False, True, str(exc), 'set medium = "/dev/..." (or serial:, uuid:, id-path:)'))
    iof = _last_value(cmdline, "init_on_free")
    items.append(Item("init_on_free", iof == "1", False,
                      f"init_on_free={iof}" if iof is not None else "init_on_free not on the kernel command line",
                      "" if iof == "1" else "add init_on_free=1 to the boot loader's kernel command line: "
                      "memory freed by killed processes is then zeroed at once"))
    items.append(_kexec_item(config))
    try:
        audit.parse(audit.read_snapshot().decode())
        items.append(Item("slabinfo", True, False, f"{audit.SLABINFO} readable"))
    except (OSError, ValueError) as exc:
        items.append(Item("slabinfo", False, False, f"{audit.SLABINFO}: {exc}",
                          "run as root on a kernel with CONFIG_SLUB_DEBUG (the audit stage is skipped otherwise)"))
    items += _daemon_items(config, drop_caches)
    running = any(p.info["name"] == "memlockd" for p in psutil.process_iter(["name"]))
    items.append(Item("memlockd", running, False, "running" if running else "not running",
                      "" if running else "install and start memlockd with killcord's memlockd config, "
                      "so kexec and systemctl stay in RAM"))
    return items


def _kexec_item(config: Config) -> Item:
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


def _daemon_items(config: Config, drop_caches: bool) -> list[Item]:
    try:
        status = control.request(config.socket, "status", timeout=2.0)
    except (control.DaemonUnavailable, OSError, ValueError) as exc:
        return [Item("daemon", False, True, str(exc), "start it: systemctl enable --now killcord"),
                Item("resident", False, True, "unknown: the daemon is not running", "start the daemon")]
    armed = status.get("state") == "armed"
    items = [Item("daemon", armed, True, f"pid {status.get('pid')}, state {status.get('state')}",
                  "" if armed else "see `killcord status` and the journal")]
    return items + [_resident_item(status, drop_caches)]


def _resident_item(status: dict, drop_caches: bool) -> Item:
    """The daemon itself is held by mlockall (the kernel keeps VM_LOCKED pages present);
    the files it would need again are held by memlockd: mincore over them, after dropping
    the page cache (root), shows only what is really locked."""
    res = status.get("resident") or {}
    assert isinstance(res, dict)
    try:
        pid = int(status["pid"])
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

