"""The commands: daemon, panic, recheck, disarm, arm, status, check, slabinfo-diff,
memlock-config, wipe-target.

Exit codes: 0 ok, 1 a check or request failed, 2 bad configuration or arguments,
3 refused to arm, 4 no daemon running, 13 permission denied.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from killcord import __version__

EXIT_FAILED, EXIT_CONFIG, EXIT_ARM, EXIT_NO_DAEMON, EXIT_DENIED = 1, 2, 3, 4, 13


def _err(msg: str, code: int) -> int:
    print(f"killcord: {msg}", file=sys.stderr)
    return code


def _config(args: argparse.Namespace):  # -> Config
    from killcord.config import load

    return load(args.config)


def _socket(args: argparse.Namespace) -> Path:
    """The daemon's socket without pydantic (locate.py: a panic is sent at once, and a bad
    value elsewhere in the file does not hold it back); the whole configuration is loaded
    only for the error when the socket's own value is refused."""
    from killcord import locate

    return locate.socket(args.config) or _config(args).socket


def cmd_daemon(args: argparse.Namespace) -> int:
    # Everything the firing path needs is imported here, at start, never at fire time.
    from killcord import daemon, log

    config = _config(args)
    log.setup(kmsg=config.live)
    try:
        return daemon.run(config)
    except daemon.ArmError as exc:
        log.notify(STATUS=f"refused to arm: {exc}")
        return _err(f"refusing to arm: {exc}", EXIT_ARM)


# How long `panic` waits for the daemon's answer before root fires by itself: the daemon
# answers in milliseconds; a daemon that does not (stalled, flooded, gone) must not keep
# root's panic from firing.
PANIC_DEADLINE_S = 2.0


def cmd_panic(args: argparse.Namespace) -> int:
    from killcord import control

    try:
        reply = control.request(_socket(args), "panic", timeout=PANIC_DEADLINE_S)
    except control.NoAnswer as exc:
        return _panic_alone(_config(args), str(exc))
    if not isinstance(reply, control.PanicReply):
        assert isinstance(reply, control.ErrorReply)
        if os.geteuid() == 0:  # never happens with a sound daemon; root fires regardless
            return _panic_alone(_config(args), f"the daemon refused: {reply.error}")
        return _err(reply.error, EXIT_DENIED)
    print(f"killcord: {reply.state} ({reply.mode})" + (f": {reply.note}" if reply.note else ""))
    return 0


def _panic_alone(config, why: str) -> int:  # noqa: ANN001
    """No valid answer from a daemon: run the sequence here, never silently do nothing."""
    if os.geteuid() != 0:
        return _err(f"permission denied: {why}, and only root can fire without the daemon "
                    "(ask root to run `killcord panic`)", EXIT_DENIED)
    from killcord import kexec, log, statedir
    from killcord.events import Panic
    from killcord.fire import Firer
    from killcord.machine import Machine

    if statedir.firing_elsewhere(config.state_dir):
        # busy firing, hence silent: a second sequence would kill it mid-kexec or mid-wipe
        print(f"killcord: {why}; the daemon is firing already: not starting a second sequence")
        return 0
    log.setup(kmsg=config.live)
    print(f"killcord: {why}; firing here ({config.mode})", file=sys.stderr)
    machine = Machine(config.deadlines)
    loaded = kexec.is_loaded() or not config.live
    staged = kexec.Staged(None, None, "", "earlier" if loaded else "none", kexec.is_loaded(),
                          error=None if kexec.is_loaded() else "no daemon staged an image")
    finished = Firer(machine, staged, config.state_dir, config.live).drive(machine.feed(Panic(0, os.getpid())))
    return 0 if finished and finished.ok else EXIT_FAILED


def cmd_recheck(args: argparse.Namespace) -> int:
    from killcord import control

    try:
        reply = control.request(_socket(args), "recheck")
    except control.NoAnswer as exc:
        return _err(str(exc), EXIT_NO_DAEMON)
    if not isinstance(reply, control.RecheckReply):
        assert isinstance(reply, control.ErrorReply)
        return _err(reply.error, EXIT_DENIED)
    print(f"killcord: {reply.state}" + (f" ({reply.trigger})" if reply.trigger else ""))
    return 0


def duration(text: str) -> int:
    """'90', '90s', '5m' or '5min' -> seconds (argparse type: a bad value names itself and the forms)."""
    m = re.fullmatch(r"(\d{1,6})\s*(s|m|min)?", text.strip())
    if not m or int(m[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; give whole seconds or minutes, "
                                         "e.g. 60, 60s, 5m")
    return int(m[1]) * (60 if m[2] in ("m", "min") else 1)


def _ask(args: argparse.Namespace, cmd: str, want: type, **request: object) -> object:
    """The daemon's typed reply to `cmd`, or the exit code after saying why there is none."""
    from killcord import control

    try:
        reply = control.request(_socket(args), cmd, **request)
    except control.NoAnswer as exc:
        return _err(str(exc), EXIT_NO_DAEMON)
    if not isinstance(reply, want):
        assert isinstance(reply, control.ErrorReply)
        return _err(reply.error, EXIT_DENIED if reply.error.startswith("permission denied") else EXIT_FAILED)
    return reply


def cmd_disarm(args: argparse.Namespace) -> int:
    from killcord import control

    reply = _ask(args, "disarm", control.DisarmReply, seconds=args.seconds, reason=args.reason)
    if not isinstance(reply, control.DisarmReply):
        return reply  # type: ignore[return-value]  (the exit code)
    print(f"killcord: disarmed for {reply.seconds} s, until {time.strftime('%H:%M:%S', time.localtime(reply.until))}: "
          "removing the medium does not fire meanwhile (`killcord panic` still does). Then it re-arms by itself "
          "and fires if the medium is not back; `killcord arm` ends this early.")
    return 0


def cmd_arm(args: argparse.Namespace) -> int:
    from killcord import control

    reply = _ask(args, "arm", control.ArmReply)
    if not isinstance(reply, control.ArmReply):
        return reply  # type: ignore[return-value]  (the exit code)
    print(f"killcord: {reply.state}" + (f": {reply.note}" if reply.note else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from killcord import control

    try:
        status = control.request(_socket(args), "status")
    except control.NoAnswer as exc:
        if args.json:
            print(json.dumps({"state": "stopped" if exc.missing else "unreachable", "error": str(exc)}))
        return _err(str(exc), EXIT_NO_DAEMON)
    if not isinstance(status, control.StatusReply):
        assert isinstance(status, control.ErrorReply)
        return _err(status.error, EXIT_FAILED)
    if args.json:
        print(json.dumps(control.as_dict(status), indent=2, default=str))
        return 0
    print(_render_status(status))
    return 0


def _render_status(s) -> str:  # noqa: ANN001  (control.StatusReply)
    med = s.medium or {}
    kx = s.kexec or {}
    res = s.resident or {}
    lines = [f"state:    {s.state} ({s.mode}), pid {s.pid}, version {s.version}"]
    if s.disarmed:
        d = s.disarmed
        lines.append(f"disarmed: {d['seconds_left']} s left, by uid {d['uid']}"
                     + (f" ({d['reason']})" if d.get("reason") else "")
                     + f"; {d['held_triggers']} removal(s) held; panic still fires")
    if med:
        lines.append(f"medium:   {med.get('device')} via {med.get('source')}")
    else:
        lines.append("medium:   none" + (f" ({s.medium_note})" if s.medium_note else ""))
    lines += [f"          {d}" for d in med.get("devpaths", [])]
    lines.append(f"kexec:    {'staged' if kx.get('loaded') else 'NOT staged'} ({kx.get('method')})"
                 + (f": {kx.get('error')}" if kx.get("error") else ""))
    if kx.get("cmdline"):
        lines.append(f"          cmdline: {kx['cmdline']}")
    if kx.get("initrd"):
        size = f", {kx['initrd_bytes']} bytes" if kx.get("initrd_bytes") is not None else ""
        lines.append(f"          initrd: {kx['initrd']} ({kx.get('initrd_kind')}{size})")
    if kx.get("note"):
        lines.append(f"          {kx['note']}")
    lines.append(f"resident: mlockall={res.get('mlockall')}, {res.get('locked_kib')} KiB locked, "
                 f"{res.get('resident_pages')}/{res.get('pages')} pages of {res.get('files')} files")
    if s.mor is not None:
        lines.append(f"mor:      {s.mor.get('note')}")
    if s.detector:
        lines.append(f"detector: {s.detector}" + ("" if s.detector.startswith("SCHED_FIFO")
                                                  else " (not real-time: detection may wait behind a busy system)"))
    if s.standby is not None:
        lines.append(f"standby:  pid {s.standby['pid']}, {s.standby.get('note')}")
    if s.grace is not None:
        g = s.grace
        back = f"back means {g['back_if']}" if g.get("back_if") else "nothing identifies the medium: it cannot come back"
        if g.get("seconds_left") is not None:
            lines.append(f"grace:    firing in {g['seconds_left']} s unless the medium is back ({g.get('trigger')}); {back}")
        else:
            lines.append(f"grace:    {g['ms']} ms: a pulled medium fires then, unless it is back; {back}")
        if g.get("notices"):
            n = g["notices"]
            lines.append(f"          last notice: terminals {n.get('terminals')}, desktops {n.get('desktops')}"
                         + (f", not reached {n['not_reached']}" if n.get("not_reached") else ""))
    if s.panic_keys is not None:
        pk = s.panic_keys
        boards = pk.get("keyboards") or []
        lines.append(f"keys:     {pk.get('chord')} on {len(boards)} keyboard(s), {pk.get('sched')}"
                     + ("" if boards else " (none open yet: one plugged in is opened then)"))
        lines += [f"          {b['node']} ({b['name']})" + (", plugged in after arming" if b.get("hotplugged") else "")
                  for b in boards]
        lines += [f"          not opened: {why}" for why in pk.get("not_opened") or []]
    if s.trigger:
        lines.append(f"trigger:  {s.trigger}")
    for st in s.stages:
        lines.append(f"stage:    {st['name']:<9} {st['outcome']:<10} {st['duration_ms']:9.3f} ms  "
                     + _stage_note(st["outcome"], st.get("detail") or {}))
    for ev in s.events[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(ev.get("at", 0)))
        rest = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("at", "event"))
        lines.append(f"event:    {when} {ev.get('event')} {rest}")
    return "\n".join(lines)


def _stage_note(outcome: str, detail: dict) -> str:
    if "targets" in detail and outcome == "dry":
        return f"would kill {detail['targets']} processes"
    if "targets" in detail and detail["targets"] is None:
        return "every process stopped and killed, exits not waited for (the kexec target clears their memory)"
    if "targets" in detail:
        return f"targets={detail['targets']} killed={detail['killed']} left={len(detail.get('remaining', []))}"
    for key in ("error", "reason", "would", "record"):
        if detail.get(key):
            return f"{key}: {detail[key]}"
    return ""


def cmd_check(args: argparse.Namespace) -> int:
    from killcord import check

    items = check.run(_config(args), drop_caches=args.drop_caches)
    if args.json:
        print(json.dumps({"ok": check.exit_code(items) == 0, "items": [i.as_dict() for i in items]}, indent=2))
    else:
        print(check.render(items))
    return check.exit_code(items)


def cmd_slabinfo_diff(args: argparse.Namespace) -> int:
    from killcord import audit

    snapshots = []
    for path in (args.before, args.after):
        try:
            snapshots.append(audit.parse(Path(path).read_text()))
        except OSError as exc:
            return _err(f"{path}: {exc.strerror}", EXIT_FAILED)
        except ValueError as exc:
            return _err(f"{path}: not a slabinfo snapshot: {exc}", EXIT_FAILED)
    deltas = audit.diff(*snapshots)
    if args.json:
        print(json.dumps([vars(d) for d in deltas[: args.limit]], indent=2))
    else:
        print(audit.format_diff(deltas, args.limit))
    return 0


def cmd_memlock_config(args: argparse.Namespace) -> int:
    # import what the daemon imports, so the mapped libraries are the daemon's
    from killcord import daemon, resident  # noqa: F401

    print(resident.memlockd_config(), end="")
    return 0


def cmd_wipe_target(args: argparse.Namespace) -> int:
    from killcord import wipetarget

    args.image = args.image or wipetarget.IMAGE
    try:
        if args.action == "build":
            m = wipetarget.build(args.image, args.busybox)
        else:
            m = wipetarget.verify(args.image)
    except wipetarget.WipeTargetError as exc:
        return _err(str(exc), EXIT_FAILED)
    except OSError as exc:
        return _err(f"{exc.filename or args.image}: {exc.strerror or exc}; run as root (the package's "
                    "postinst builds it)", EXIT_FAILED)
    if args.json:
        print(json.dumps(m.as_dict(), indent=2))
    else:
        verb = "built" if args.action == "build" else "ok"
        print(f"killcord: wipe target {verb}: {m.image} ({m.bytes} bytes, at most {wipetarget.MAX_BYTES}; "
              f"sha256 {m.sha256[:16]}; busybox {m.busybox})")
        if args.action == "build":
            print("killcord: the daemon stages it when it next arms (systemctl restart killcord)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="killcord", description=(
        "Emergency shutdown for live systems: when the boot medium is pulled (or on `panic`), "
        "kill every process, record /proc/slabinfo, and kexec into a kernel that wipes RAM."))
    p.add_argument("--version", action="version", version=f"killcord {__version__}")
    p.add_argument("--config", type=Path, default=None,
                   help="config file (default: $KILLCORD_CONFIG or /etc/killcord/killcord.toml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("daemon", help="arm and wait for the medium to go (run by systemd)",
                   description="Find the medium, stage kexec, lock into RAM, then block on kernel uevents.")
    sub.add_parser("panic", help="fire now (root or panic_group)",
                   description="Ask the daemon to fire; without a daemon, root fires here.")
    sub.add_parser("recheck", help="make the daemon re-check the medium now (root; run after resume)",
                   description="The daemon looks for the medium in sysfs and fires if it is gone.")
    sp = sub.add_parser("disarm", help="stand down for a while (root or panic_group): pulling the medium does not fire",
                        description="Until the time runs out, removing the medium does not fire (to move the "
                        "stick to another port, say); `killcord panic` still does. Then killcord re-arms by "
                        "itself: if the medium is back it stays armed, if not it fires. Capped by disarm_max_s.")
    sp.add_argument("--for", dest="seconds", type=duration, required=True, metavar="DURATION",
                    help="how long: 60, 60s or 5m")
    sp.add_argument("--reason", default="", help="said in the journal and in `status` (at most 100 characters)")
    sub.add_parser("arm", help="end a disarm now (root or panic_group)",
                   description="Re-arm at once; if the medium is gone, this fires.")
    for name, text in (("status", "the daemon's state, medium, kexec, residency, events and stages"),
                       ("check", "preflight: is everything in place to protect this system?")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache first (root), so residency shows what is really locked")
    sp = sub.add_parser("slabinfo-diff", help="what changed between two /proc/slabinfo snapshots",
                        description="Largest changes in allocated kernel memory first.")
    sp.add_argument("before")
    sp.add_argument("after")
    sp.add_argument("--limit", type=int, default=20, help="rows to show (default 20)")
    sp.add_argument("--json", action="store_true")
    sub.add_parser("memlock-config", help="print a memlockd config for this system",
                   description="The interpreter, its libraries, killcord's files and the binaries the fallback needs.")
    sp = sub.add_parser("wipe-target", help="build or verify the initramfs staged for the kexec jump",
                        description="killcord's wipe target: a static busybox and killcord's wipe scripts, "
                        "under 1 MiB, staged in place of the system's initramfs (the package builds it at "
                        "install and on busybox, kernel and initramfs updates).")
    sp.add_argument("action", choices=("build", "verify"), help="build it (root), or check it against its manifest")
    sp.add_argument("--image", type=Path, default=None,
                    help="where it is (default /var/lib/killcord/wipe-target.img; its manifest is IMAGE.json)")
    sp.add_argument("--busybox", type=Path, default=None,
                    help="a static busybox (default: busybox-static's, /usr/bin/busybox or /bin/busybox)")
    sp.add_argument("--json", action="store_true")
    return p


COMMANDS = {"daemon": cmd_daemon, "panic": cmd_panic, "recheck": cmd_recheck, "disarm": cmd_disarm, "arm": cmd_arm,
            "status": cmd_status, "check": cmd_check,
            "slabinfo-diff": cmd_slabinfo_diff, "memlock-config": cmd_memlock_config, "wipe-target": cmd_wipe_target}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from killcord.locate import ConfigError

    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        return _err(str(exc), EXIT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
