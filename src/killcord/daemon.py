"""The daemon: arm, then block on the uevent socket and the control socket; feed what
happens to the machine and run what it says. Read top to bottom: arm(), then loop().
"""

from __future__ import annotations

import collections
import grp
import os
import selectors
import signal
import socket
import time
from pathlib import Path
from typing import Any

import structlog

from killcord import __version__, control, kexec, log, medium, resident, watch
from killcord.config import Config
from killcord.events import Armed, Event, MediumCheck, Panic, Stage, State, Uevent
from killcord.fire import Firer
from killcord.machine import Machine

RAM_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}  # statfs f_type magic numbers
LAST_EVENTS = 20

logger = structlog.get_logger("killcord.daemon")


class ArmError(Exception):
    """Refused to arm: the message says what is wrong and how to fix it."""


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (closest existing parent)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1].replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.machine = Machine(config.deadlines)
        self.medium: medium.Medium | None = None
        self.cord: medium.Medium | None = None
        self.staged: kexec.Staged | None = None
        self.firer: Firer | None = None
        self.resident: dict[str, object] = {}
        self.events: collections.deque[dict[str, object]] = collections.deque(maxlen=LAST_EVENTS)
        self.absent: str | None = None
        self.panic_gid = grp.getgrnam(config.panic_group).gr_gid if config.panic_group else None
        self.started = time.time()
        self.stopping = False

    # ---- arming ----

    def arm(self) -> None:
        cfg = self.config
        logger.info("arming", mode=cfg.mode, version=__version__, pid=os.getpid())
        log.notify(STATUS="arming")
        # Listen first: a removal during arming is then queued, not missed.
        self.watcher = watch.Watcher()
        self._find_medium()
        if cfg.cord:
            try:
                self.cord = medium.resolve_cord(cfg.cord)
            except medium.MediumError as exc:
                raise ArmError(str(exc)) from None
        try:
            self.staged = kexec.stage(cfg.kexec_kernel, cfg.kexec_initrd, cfg.kexec_append,
                                      cfg.live, cfg.kexec_lock, cfg.live_medium_mount)
        except kexec.KexecError as exc:
            raise ArmError(str(exc)) from None
        logger.info("staged", **self.staged.as_dict())
        self._check_state_dir()
        self.server = control.listen(cfg.socket)
        self.firer = Firer(self.machine, self.staged, cfg.state_dir, cfg.live)
        self._lock()
        if self.medium is not None:
            medium.remember(self.medium, cfg.state_dir)
        watched = frozenset(self.medium.devpaths if self.medium else ()) | frozenset(
            self.cord.devpaths if self.cord else ())
        optical = self.medium.optical if self.medium else frozenset()
        self.machine.feed(Armed(watched, optical))
        logger.info("armed", medium=self.medium.device if self.medium else None,
                    watched=len(watched), kexec_loaded=self.staged.loaded)
        log.notify(READY=1, STATUS=f"armed on {self.medium.device if self.medium else 'nothing'}")
        # Removed before or while we armed (e.g. during a restart): fire now.
        if self.absent is not None:
            self.feed(MediumCheck(False, self.absent))
        else:
            self.recheck("start")

    def _find_medium(self) -> None:
        cfg = self.config
        try:
            self.medium = medium.resolve(cfg.medium, cfg.live_medium_mount)
        except medium.MediumAbsent as exc:
            self.absent = str(exc)
        except medium.MediumError as exc:
            recorded = medium.recorded_absent(cfg.state_dir)
            if recorded is None:
                raise ArmError(str(exc)) from None
            self.absent = f"armed earlier this boot on {recorded}, gone now"
        if self.medium:
            logger.info("medium", **self.medium.as_dict())

    def _check_state_dir(self) -> None:
        kind = fs_type(self.config.state_dir)
        if kind in RAM_FS.values():
            return
        msg = (f"state_dir {self.config.state_dir} is on {kind}, not in RAM; "
               "the audit record must never reach a disk: use a tmpfs such as /run/killcord")
        if self.config.live:
            raise ArmError(msg)
        logger.warning("state_dir_not_ram", fs=kind, note="allowed in dry-run only")

    def _lock(self) -> None:
        try:
            resident.lock_all()
            locked = True
        except OSError as exc:
            locked = False
            logger.error("mlockall_failed", error=str(exc), fix="run as root or with CAP_IPC_LOCK")
        files = resident.mapped_files() + resident.killcord_files()
        self.resident = {"mlockall": locked, "locked_kib": resident.locked_kib(),
                         **resident.report(files)}
        logger.info("locked", **{k: v for k, v in self.resident.items() if k != "errors"})

    # ---- the loop ----

    def loop(self) -> None:
        sel = selectors.DefaultSelector()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        sel.register(self.watcher.fileno(), selectors.EVENT_READ, "uevent")
        sel.register(self.server, selectors.EVENT_READ, "accept")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        interval = log.watchdog_interval()
        last_ping = time.monotonic()
        while not self.stopping:
            for key, _ in sel.select(interval):
                if key.data == "uevent":
                    self.on_uevents()
                elif key.data == "accept":
                    self.on_accept(sel)
                elif key.data == "signal":
                    wake_r.recv(64)
                else:
                    self.on_client(sel, key.data)
            if interval is not None and time.monotonic() - last_ping >= interval:
                log.notify(WATCHDOG=1)
                last_ping = time.monotonic()
        log.notify(STOPPING=1)
        logger.info("stopping", state=self.machine.state.value)
        self.server.close()
        self.config.socket.unlink(missing_ok=True)

    def _stop(self, signum: int, _frame: Any) -> None:
        if self.machine.state is State.FIRING and self.machine.current is Stage.POWEROFF:
            # systemd-shutdown is ending every process: the poweroff we asked for is under
            # way. Waiting out our deadline would only hold it up.
            logger.critical("poweroff_progressing", signal=signum)
            os._exit(0)
        self.stopping = True

    def on_uevents(self) -> None:
        optical = self.medium.optical if self.medium else frozenset()
        events, overflow = self.watcher.drain(optical)
        for event in events:
            self.feed(event)
        if overflow:
            logger.warning("overflow", note="uevents lost; re-checking the medium in sysfs")
            self.recheck("enobufs")

    def recheck(self, reason: str) -> None:
        gone = [m for m in (self.medium, self.cord) if m is not None and not medium.present(m)]
        self.feed(MediumCheck(not gone, reason if not gone else f"{reason}: {gone[0].device} gone"))

    def on_accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.server.accept()
            client = control.Client(conn)
        except OSError:
            return
        sel.register(conn, selectors.EVENT_READ, client)

    def on_client(self, sel: selectors.BaseSelector, client: control.Client) -> None:
        try:
            request = client.read()
        except (OSError, ValueError) as exc:
            sel.unregister(client.conn)
            client.reply({"ok": False, "error": str(exc)})
            return
        if request is None:
            return  # more to come
        sel.unregister(client.conn)
        peer = client.peer
        if request["cmd"] == "status":
            client.reply(self.status())
            return
        if request["cmd"] == "recheck":
            if peer.uid != 0:
                client.reply({"ok": False, "error": f"permission denied: uid {peer.uid} may not recheck (only root)"})
                return
            logger.info("recheck", uid=peer.uid, reason="requested")
            self.recheck("resume")
            client.reply({"ok": True, "state": self.machine.state.value, "trigger": self.machine.trigger})
            return
        if not peer.may_panic(self.panic_gid):
            logger.warning("panic_refused", uid=peer.uid, pid=peer.pid)
            who = f"root or group {self.config.panic_group}" if self.config.panic_group else "root"
            client.reply({"ok": False, "error": f"permission denied: uid {peer.uid} may not panic (only {who})"})
            return
        logger.critical("panic", uid=peer.uid, pid=peer.pid)
        if self.machine.state in (State.FIRING, State.FIRED):
            client.reply({"ok": True, "state": self.machine.state.value, "mode": self.config.mode,
                          "note": "already fired: a second trigger never restarts the sequence"})
        else:
            client.reply({"ok": True, "state": "firing", "mode": self.config.mode})
        self.feed(Panic(peer.uid, peer.pid))

    # ---- feeding the machine ----

    def feed(self, event: Event) -> None:
        received = time.time()
        actions = self.machine.feed(event)
        if isinstance(event, Uevent) and not actions and event.devpath not in self.machine.watched:
            return  # unrelated device: not worth a status line
        self.events.append({"at": received, "event": type(event).__name__, **_fields(event),
                            "fired": bool(actions)})
        if actions:
            logger.critical("fire", trigger=self.machine.trigger)
            # The loop stops pinging while the stages run: stretch the watchdog over all of
            # their deadlines, so systemd does not abort us before the last resort (sysrq).
            budget_us = (sum(self.config.deadlines.values()) + 5000) * 1000
            log.notify(STATUS=f"firing: {self.machine.trigger}", WATCHDOG_USEC=budget_us)
            assert self.firer is not None
            finished = self.firer.drive(actions)
            log.notify(STATUS=f"fired: {self.machine.trigger} (ok={finished.ok if finished else None})")

    def status(self) -> dict[str, object]:
        m = self.machine
        return {
            "state": m.state.value,
            "mode": self.config.mode,
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started,
            "trigger": m.trigger,
            "medium": self.medium.as_dict() if self.medium else None,
            "cord": self.cord.as_dict() if self.cord else None,
            "kexec": self.staged.as_dict() if self.staged else None,
            "resident": self.resident,
            "events": list(self.events),
            "stages": [{"name": r.stage.value, "outcome": r.outcome.value,
                        "duration_ms": r.duration_ms, "detail": r.detail} for r in m.results],
            "ignored_triggers": m.ignored_triggers,
        }


def _fields(event: Event) -> dict[str, object]:
    return {k: v for k, v in vars(event).items() if not isinstance(v, frozenset)}


def run(config: Config) -> int:
    daemon = Daemon(config)
    daemon.arm()
    daemon.loop()
    return 0
