"""The daemon: arm, then block on the uevent socket and the control socket; feed what
happens to the machine and run what it says. Read top to bottom: arm(), then loop().

Two threads once armed. The detector (detect) blocks on the uevent socket alone and runs
SCHED_FIFO: when the medium goes, it is the first task the kernel wakes, ahead of udev,
systemd and whatever fails on the missing medium, and it fires from there. The main thread
serves the control socket, signals and the watchdog as a normal task: a local user's flood
of connections then competes for CPU as any process does, never at real-time priority.
With panic_keys set, a third thread (read_keys) reads the keyboards, real-time as well:
only root and the hardware write to them, and a frozen desktop must not delay the chord.
Only the detector's uevents are real-time work, and the kernel's filter (watch.set_filter)
lets through nothing but what can fire. One lock serializes everything the machine sees.
"""

from __future__ import annotations

import collections
import grp
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from killcord import (
    __version__, arm_fds, chord, control, kexec, keyboards, log, medium, mor, notice, resident, sched, standby,
    statedir, watch,
)
from killcord.config import Config
from killcord.events import (
    Armed, CheckMedium, Disarm, Event, GraceEnded, MediumBack, MediumCheck, Panic, PanicKeys, Rearm, StartGrace, State,
    Tick, Uevent,
)
from killcord.fire import Firer
from killcord.machine import Machine

RAM_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}  # statfs f_type magic numbers
LAST_EVENTS = 20
UEVENT_BATCH = 64  # uevents per turn of the detector: the backlog check runs between
BACKLOG_RECHECK_S = 0.1  # sysfs re-check period while uevents stay queued (see on_uevents)
# How long a thread holding the GIL keeps it once another asks (CPython's default is 5 ms):
# the detector, woken by a uevent, waits at most this for the control thread to let go.
SWITCH_INTERVAL_S = 0.0005
# How long the control socket waits for the detector threads to take their policies: a
# status served before that said "not started" beside "armed" (seen on a loaded host).
THREADS_UP_S = 5.0

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
        self.machine = Machine(config.deadlines, config.grace_ms)
        self.medium: medium.Medium | None = None
        self.identity: str | None = None  # what makes the medium the same one if it comes back (grace_ms)
        self.grace_until: float | None = None  # GRACE: when it ends (monotonic); the main loop times it
        self.notices: dict[str, list[str]] | None = None  # the last grace notice: who was reached
        self._wake: socket.socket | None = None  # wakes the main loop (a grace period to time)
        self.medium_note: str | None = None  # why no medium is watched, when none is
        self.cord: medium.Medium | None = None
        self.staged: kexec.Staged | None = None
        self.mor: mor.MorState | None = None  # None: mor = "off"
        self.firer: Firer | None = None
        self.server: control.Server | None = None
        self.firing_lock: int | None = None  # statedir's firing lock, opened at arm time
        self.resident: dict[str, object] = {}
        self.events: collections.deque[dict[str, object]] = collections.deque(maxlen=LAST_EVENTS)
        self.absent: str | None = None
        self.panic_gid = grp.getgrnam(config.panic_group).gr_gid if config.panic_group else None
        self.started = time.time()
        self.stopping = False
        # Held by whoever feeds the machine or reads it for a reply (the detector, the control
        # thread); re-entrant: a handler feeds, a fed CheckMedium feeds again.
        self.lock = threading.RLock()
        self.closed = False  # set under the lock when the loop ends: nothing is fed after
        self.detector_sched = "not started"  # the detector thread's policy, or why not real-time
        self.detector_error: str | None = None
        self.keyboards: keyboards.Keyboards | None = None  # with panic_keys set
        self.keys_sched = "not started"
        # set by each thread once its policy is known: status waits for them (see loop)
        self.detector_up = threading.Event()
        self.keys_up = threading.Event()
        self.standby: standby.Standby | None = None
        self.overflows = 0
        self.refusals: dict[str, tuple[float, int]] = {}  # command: (last logged, not logged since)
        self.backlog_since: float | None = None  # uevents left queued since (a storm)
        self.backlog_checked = float("-inf")
        self._overflow_logged = float("-inf")
        self.sel: selectors.BaseSelector = selectors.DefaultSelector()
        # One handler per entry of control.COMMANDS (who may send each is decided there).
        self.handlers: dict[str, Callable[[control.Peer, control.Request], tuple[control.Reply, Event | None]]] = {
            "status": self.cmd_status, "panic": self.cmd_panic, "recheck": self.cmd_recheck,
            "disarm": self.cmd_disarm, "arm": self.cmd_arm}
        assert self.handlers.keys() == control.COMMANDS.keys()

    # ---- arming ----

    def arm(self) -> None:
        """Every check that can refuse runs first; the irreversible steps (staging kexec,
        and locking kexec_load_disabled with kexec_lock) come after the last of them."""
        cfg = self.config
        logger.info("arming", mode=cfg.mode, version=__version__, pid=os.getpid())
        log.notify(STATUS="arming")
        raise_fd_limit()
        # Listen first: a removal during arming is then queued, not missed.
        self.watcher = watch.Watcher()
        self._find_medium()
        if cfg.cord:
            try:
                self.cord = medium.resolve_cord(cfg.cord)
            except medium.MediumError as exc:
                raise ArmError(str(exc)) from None
        self._check_state_dir()
        if cfg.panic_keys:
            try:  # the keyboards present now; later ones on the kernel's `add` (keyboards.py)
                self.keyboards = keyboards.Keyboards(chord.parse(cfg.panic_keys))
            except (OSError, ValueError) as exc:
                raise ArmError(f"panic_keys: cannot watch the keyboards: {exc}; unset panic_keys to arm "
                               "without them") from None
            logger.info("panic_keys", chord=cfg.panic_keys, keyboards=len(self.keyboards.open))
        try:
            for setting, kind in ((cfg.kexec_kernel, "kernel"), (cfg.kexec_initrd, "initrd")):
                kexec.find_image(setting, kind, cfg.live_medium_mount)  # a bad explicit path
        except kexec.KexecError as exc:
            raise ArmError(str(exc)) from None
        try:
            # Held from now on, so the firing path opens nothing from the root (arm_fds).
            statedir.hold_records(cfg.state_dir)
            self.firing_lock = statedir.open_firing_lock(cfg.state_dir)
            arm_fds.hold_proc()
            self.server = control.listen(cfg.socket, self.panic_gid)
            if self.medium is not None:
                medium.remember(self.medium, cfg.state_dir)
        except OSError as exc:  # statedir.UnsafeStateDir among them
            raise ArmError(f"state_dir or socket: {exc}") from None
        # ---- irreversible from here: nothing below refuses to arm ----
        try:
            self.staged = kexec.stage(cfg.kexec_kernel, cfg.kexec_initrd, cfg.kexec_append,
                                      cfg.live, cfg.kexec_lock, cfg.live_medium_mount)
        except kexec.KexecError as exc:  # raised before loading anything (checked above)
            raise ArmError(str(exc)) from None
        logger.info("staged", **self.staged.as_dict())
        if cfg.mor == "auto":
            self.mor = mor.arm(cfg.live)
            logger.info("mor", **self.mor.as_dict())
        self.firer = Firer(self.machine, self.staged, cfg.state_dir, cfg.live)
        self._lock()
        watched = frozenset(self.medium.devpaths if self.medium else ()) | frozenset(
            self.cord.devpaths if self.cord else ())
        media = self.medium.media_watched if self.medium else frozenset()
        # The kernel now queues only what can fire (every `remove`, a media-watched disk's
        # `change`): a storm of other uevents never fills the buffer. A `remove` lost anyway
        # is still caught by the sysfs re-check on ENOBUFS.
        try:
            self.watcher.set_filter(media)
        except (ValueError, OSError) as exc:  # past refusing to arm: unfiltered, as before
            logger.warning("uevent_filter_not_set", error=str(exc))
        self.machine.feed(Armed(watched, media))
        logger.info("armed", medium=self.medium.device if self.medium else None,
                    watched=len(watched), kexec_loaded=self.staged.loaded, note=self.medium_note)
        # Forked while this is the only thread (a fork keeps the calling thread alone);
        # the stage thread and the detectors start after it, in each process.
        self.standby = standby.start(self)
        self.firer.keep_stage_thread()
        on = self.medium.device if self.medium else f"nothing ({self.medium_note or 'no medium'})"
        log.notify(READY=1, STATUS=f"armed on {on}")
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
        except medium.MediumInRam as exc:
            # Copied to RAM and released (toram): pulling the stick no longer matters, and
            # refusing would lose panic too (a restart loop). Arm for panic only, and say so.
            self.medium_note = f"armed for panic only: {exc}"
            logger.warning("medium_in_ram", note=str(exc))
        except medium.MediumError as exc:
            recorded = medium.recorded_absent(cfg.state_dir)
            if recorded is None:
                raise ArmError(str(exc)) from None
            self.absent = f"armed earlier this boot on {recorded}, gone now"
        if self.medium:
            self.identity = medium.identity(self.medium)
            logger.info("medium", identity=self.identity, **self.medium.as_dict())

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
        """Start the detector thread, then serve the control socket: one turn serves every
        ready source a bounded amount (control.ACCEPT_BATCH connections, one read per
        client), then expires clients past their deadline and pings the watchdog."""
        assert self.server is not None
        sel = self.sel
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        self._wake = wake_w
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        sel.register(self.server.fileno(), selectors.EVENT_READ, "accept")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        detector = threading.Thread(target=self.detect, args=(wake_w,), name="detector", daemon=True)
        detector.start()
        if self.keyboards is not None:
            threading.Thread(target=self.read_keys, args=(wake_w,), name="keys", daemon=True).start()
        # Nothing is lost meanwhile (the uevent socket queues what it gets); a client that
        # connects now is served once status can say how the detectors run.
        self.detector_up.wait(THREADS_UP_S)
        if self.keyboards is not None:
            self.keys_up.wait(THREADS_UP_S)
        interval = log.watchdog_interval()
        last_ping = time.monotonic()
        while not self.stopping:
            if self.detector_error is not None:
                # never armed without a detector (or the keys asked for): exit non-zero,
                # systemd restarts and re-arms us
                raise RuntimeError(f"a detector stopped: {self.detector_error}")
            for key, mask in sel.select(self._timeout(interval, last_ping)):
                if key.data == "accept":
                    self.on_accept()
                elif key.data == "signal":
                    try:
                        wake_r.recv(64)
                    except BlockingIOError:
                        pass
                else:
                    self.on_client(key.data, mask)
            for client in self.server.overdue(time.monotonic()):
                self._drop(client)
            until = self.machine.disarmed_until
            if until is not None and time.monotonic() >= until:
                self.feed(Tick(time.monotonic()))  # the disarm ran out: the machine asks for a look
            self._grace_tick()
            if interval is not None and time.monotonic() - last_ping >= interval:
                log.notify(WATCHDOG=1)
                last_ping = time.monotonic()
        with self.lock:  # a firing in the detector ends first (the stop was ignored for it)
            self.closed = True
        log.notify(STOPPING=1)
        logger.info("stopping", state=self.machine.state.value)
        if self.standby is not None:
            self.standby.stop()  # a clean stop: nothing for it to take over
        self.server.close()

    def detect(self, wake: socket.socket) -> None:
        """The detector thread: real-time while armed (see the module's docstring); it
        blocks on the uevent socket alone and fires from here."""
        took = sched.realtime()
        if took != "ok":
            logger.warning("not_realtime", error=took, fix="give the daemon CAP_SYS_NICE")
        self.detector_sched = sched.describe() + ("" if took == "ok" else f" ({took})")
        self.detector_up.set()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.watcher.fileno(), selectors.EVENT_READ)
                while not self.closed:
                    # a backlog (more queued than one turn takes) is re-checked in sysfs as time passes
                    sel.select(BACKLOG_RECHECK_S if self.backlog_since is not None else None)
                    self.on_uevents()
        except Exception as exc:  # the daemon must not go on armed without it
            self._detector_failed("detector", exc, wake)

    def _detector_failed(self, which: str, exc: Exception, wake: socket.socket) -> None:
        """A detector thread died: the main loop raises, and systemd restarts and re-arms us."""
        self.detector_error = f"{which}: {type(exc).__name__}: {exc}"
        logger.critical("detector_failed", which=which, error=self.detector_error)
        try:
            wake.send(b"!")
        except OSError:
            pass

    def read_keys(self, wake: socket.socket) -> None:
        """The keys thread: real-time like the detector; fires when the chord is complete
        on a keyboard. A failure here stops the daemon as the detector's does."""
        assert self.keyboards is not None
        took = sched.realtime()
        self.keys_sched = sched.describe() + ("" if took == "ok" else f" ({took})")
        self.keys_up.set()
        try:
            while not self.closed:
                keyboard = self.keyboards.wait()
                self.feed(PanicKeys(self.config.panic_keys, keyboard))
        except Exception as exc:
            self._detector_failed("keys", exc, wake)

    def _timeout(self, interval: float | None, last_ping: float) -> float | None:
        now = time.monotonic()
        waits = [] if interval is None else [last_ping + interval - now]
        deadline = self.server.next_deadline() if self.server else None
        if deadline is not None:
            waits.append(deadline - now)
        if self.machine.disarmed_until is not None:
            waits.append(self.machine.disarmed_until - now)
        if self.grace_until is not None:
            waits.append(self.grace_until - now)
        return max(0.0, min(waits)) if waits else None

    def _grace_tick(self) -> None:
        with self.lock:
            if self.grace_until is not None and time.monotonic() >= self.grace_until:
                self.grace_until = None
                self.feed(GraceEnded())  # the machine asks for a look: back, or fire

    def _start_grace(self, start: StartGrace, detected: float) -> None:
        """A grace period began: time it (the main loop), tell the people at the machine."""
        self.grace_until = detected + start.ms / 1000
        seconds = f"{start.ms / 1000:g}"
        logger.critical("grace", seconds=seconds, trigger=start.reason, back_if=self.identity,
                        note="fires when it ends unless the medium is back; `killcord disarm` stands down")
        text = (f"killcord: the boot medium is gone. In {seconds} s every program stops and memory is wiped, "
                "unless it is back" + ("" if self.config.live else " (dry-run: nothing will happen)") + ".")

        self._tell(text, start.ms)
        if self._wake is not None:
            try:
                self._wake.send(b"g")  # the main loop takes the new deadline into its wait
            except OSError:
                pass

    def _tell(self, text: str, timeout_ms: int) -> None:
        """A notice to the people at the machine, from a thread of its own (notice.py): a
        terminal or a session bus that is slow to answer never holds up the daemon."""
        def tell() -> None:
            self.notices = notice.tell(text, timeout_ms)
            logger.info("notice", text=text, **self.notices)

        threading.Thread(target=tell, name="notice", daemon=True).start()

    def _look_back(self, reason: str) -> None:
        """A grace period or a disarm ended: the medium found by its identity, wherever it is now (a
        stick plugged in again has new devpaths; another device may have taken the old
        ones), counts as back, as does the cord at its port; otherwise fire. A medium with
        no identity counts as back only where it was."""
        found: dict[str, medium.Medium] = {}
        for name, m in (("medium", self.medium), ("cord", self.cord)):
            if m is None:
                continue
            try:
                if name == "cord":
                    again = medium.resolve_cord(self.config.cord or "") if not medium.present(m) else m
                elif self.identity is not None:
                    again = medium.find_again(self.identity)
                else:
                    again = m if medium.present(m) else None
            except medium.MediumError:
                again = None
            if again is None:
                self.feed(MediumCheck(False, f"{reason}: {m.device} not back"))
                return
            found[name] = again
        self.medium = found.get("medium", self.medium)
        self.cord = found.get("cord", self.cord)
        watched = frozenset(self.medium.devpaths if self.medium else ()) | frozenset(
            self.cord.devpaths if self.cord else ())
        media = self.medium.media_watched if self.medium else frozenset()
        try:
            self.watcher.set_filter(media)
            if self.medium is not None:
                medium.remember(self.medium, self.config.state_dir)
        except (ValueError, OSError) as exc:
            logger.warning("rewatch_incomplete", error=str(exc))
        logger.warning("back", device=self.medium.device if self.medium else None, watched=len(watched))
        told = self.machine.state is State.GRACE  # the people at the machine were told it was gone
        self.feed(MediumBack(watched, media))
        if told:
            self._tell("killcord: the boot medium is back. Armed again; nothing was stopped.", 10_000)

    def _stop(self, signum: int, _frame: Any) -> None:
        if self.machine.state is State.FIRING:
            # The sequence ends the machine itself (the poweroff fallback frees, wipes and
            # powers off from this process): a stop now would leave RAM unwiped.
            logger.critical("stop_ignored", signal=signum, stage=str(self.machine.current))
            return
        self.stopping = True

    def on_uevents(self) -> None:
        """At most UEVENT_BATCH events, each fed to the machine as soon as it is read (a
        watched devpath fires at once); the rest wait for the next turn of the loop."""
        media = self.medium.media_watched if self.medium else frozenset()
        for _ in range(UEVENT_BATCH):
            events, overflow = self.watcher.drain(media, limit=1)
            for event in events:
                self.feed(event)
            if overflow:
                self._note_overflow()
                self.recheck("enobufs")
            if not events and not overflow:  # the queue is empty
                if self.backlog_since is not None:
                    self.backlog_since = None
                    self._recheck_if_gone("after a uevent storm")
                return
        # Still more queued. The kernel reports ENOBUFS once, then drops events silently
        # until the queue has been read empty (netlink's congested bit): in a storm we do
        # not outrun, our medium's `remove` may be lost unreported. Look at sysfs instead,
        # a few stat() calls, every BACKLOG_RECHECK_S while the backlog lasts.
        now = time.monotonic()
        if self.backlog_since is None:
            self.backlog_since = now
        if now - self.backlog_checked >= BACKLOG_RECHECK_S:
            self.backlog_checked = now
            self._recheck_if_gone("uevent backlog")

    def _note_overflow(self) -> None:
        # A storm overflows again and again: one line a second, with the count, is enough
        # (and a flood of lines would wait on a slow log reader).
        self.overflows += 1
        now = time.monotonic()
        if now - self._overflow_logged >= 1.0:
            logger.warning("overflow", count=self.overflows, note="uevents lost; re-checking the medium in sysfs")
            self._overflow_logged = now

    def _gone(self) -> list[medium.Medium]:
        return [m for m in (self.medium, self.cord) if m is not None and not medium.present(m)]

    def recheck(self, reason: str) -> None:
        gone = self._gone()
        self.feed(MediumCheck(not gone, reason if not gone else f"{reason}: {gone[0].device} gone"))

    def _recheck_if_gone(self, reason: str) -> None:
        # frequent checks: only a medium found gone is worth an event (and a status line)
        if self.machine.state is not State.ARMED:
            return
        gone = self._gone()
        if gone:
            self.feed(MediumCheck(False, f"{reason}: {gone[0].device} gone"))

    # ---- the control socket ----

    def on_accept(self) -> None:
        assert self.server is not None
        new, dropped = self.server.accept(time.monotonic())
        for client in dropped:
            self._drop(client)
        for client in new:
            self.sel.register(client.conn, selectors.EVENT_READ, client)

    def _drop(self, client: control.Client) -> None:
        if self.server is not None:
            self.server.forget(client)
        try:
            self.sel.unregister(client.conn)
        except (KeyError, ValueError):
            pass
        client.conn.close()

    def _reply(self, client: control.Client, reply: control.Reply) -> None:
        client.queue(reply)
        if client.flush():
            self._drop(client)
        else:  # the rest when the client reads, within its deadline
            self.sel.modify(client.conn, selectors.EVENT_WRITE, client)

    def on_client(self, client: control.Client, mask: int) -> None:
        if client.conn.fileno() < 0:
            return  # dropped earlier in this turn (evicted or expired)
        then: Event | None = None
        try:
            if mask & selectors.EVENT_WRITE:
                if client.flush():
                    self._drop(client)
                return
            try:
                request = client.read()
            except ValueError as exc:
                self._reply(client, control.ErrorReply(str(exc)))
                return
            if request is None:
                return  # more to come, before the deadline
            command = request.command
            refused = control.refusal(command, client.peer, self.panic_gid, self.config.panic_group)
            if refused is not None:
                self._log_refusal(command.name, client.peer)
                self._reply(client, refused)
                return
            with self.lock:
                reply, then = self.handlers[command.name](client.peer, request)
            self._reply(client, reply)
        except OSError:
            self._drop(client)  # reset, broken pipe: that client is gone
        except Exception as exc:  # a bug must cost one client, never the daemon
            logger.error("client_error", error=f"{type(exc).__name__}: {exc}", uid=client.peer.uid)
            self._drop(client)
        if then is not None:
            self.feed(then)  # after the reply is on its way

    def _log_refusal(self, cmd: str, peer: control.Peer) -> None:
        # Anyone can make us refuse as fast as they can connect: one line a second per
        # command (with how many were not logged), so they cannot flood the journal, which
        # would then drop our own critical lines, or block us on a full journal socket.
        now = time.monotonic()
        last, suppressed = self.refusals.get(cmd, (float("-inf"), 0))
        if now - last < 1.0:
            self.refusals[cmd] = (last, suppressed + 1)
            return
        logger.warning(f"{cmd}_refused", uid=peer.uid, pid=peer.pid, not_logged=suppressed)
        self.refusals[cmd] = (now, 0)

    def cmd_status(self, peer: control.Peer, request: control.Request) -> tuple[control.Reply, Event | None]:
        return self.status(), None

    def cmd_disarm(self, peer: control.Peer, request: control.Request) -> tuple[control.Reply, Event | None]:
        assert request.seconds is not None
        cap = self.config.disarm_max_s
        if request.seconds > cap:
            return control.ErrorReply(f"disarm for {request.seconds} s refused: at most disarm_max_s = {cap} s "
                                      "(/etc/killcord/killcord.toml); ask for less"), None
        if self.machine.state not in (State.ARMED, State.DISARMED, State.GRACE):  # a disarm ends a grace period
            return control.ErrorReply(f"cannot disarm: killcord is {self.machine.state.value}"), None
        logger.warning("disarm", uid=peer.uid, pid=peer.pid, seconds=request.seconds, reason=request.reason)
        self.feed(Disarm(time.monotonic() + request.seconds, peer.uid, request.reason))
        return control.DisarmReply(self.machine.state.value, request.seconds, time.time() + request.seconds,
                                   request.reason), None

    def cmd_arm(self, peer: control.Peer, request: control.Request) -> tuple[control.Reply, Event | None]:
        if self.machine.state is not State.DISARMED:
            return control.ArmReply(self.machine.state.value, "not disarmed: nothing to end"), None
        logger.warning("arm", uid=peer.uid, pid=peer.pid)
        # after the reply: the machine looks at the medium, and fires if it is gone
        return control.ArmReply(State.ARMED.value, "re-armed; the medium is checked now"), Rearm(peer.uid)

    def cmd_recheck(self, peer: control.Peer, request: control.Request) -> tuple[control.Reply, Event | None]:
        logger.info("recheck", uid=peer.uid, reason="requested")
        self.recheck("resume")
        return control.RecheckReply(self.machine.state.value, self.machine.trigger), None

    def cmd_panic(self, peer: control.Peer, request: control.Request) -> tuple[control.Reply, Event | None]:
        logger.critical("panic", uid=peer.uid, pid=peer.pid)
        if self.machine.state in (State.FIRING, State.FIRED):
            reply = control.PanicReply(self.machine.state.value, self.config.mode,
                                       "already fired: a second trigger never restarts the sequence")
        else:
            reply = control.PanicReply("firing", self.config.mode)
        return reply, Panic(peer.uid, peer.pid)

    # ---- feeding the machine ----

    def feed(self, event: Event) -> None:
        detected = time.monotonic()
        with self.lock:
            if not self.closed:
                self._feed(event, detected)

    def _feed(self, event: Event, detected: float) -> None:
        received = time.time()
        held = self.machine.held_triggers
        actions = self.machine.feed(event)
        if isinstance(event, Uevent) and not actions and event.devpath not in self.machine.watched:
            return  # unrelated device: not worth a status line

        def record(fired: bool) -> None:
            self.events.append({"at": received, "event": type(event).__name__, **_fields(event), "fired": fired})

        checks = [a for a in actions if isinstance(a, CheckMedium)]
        if checks:  # a grace period or a disarm ended: look for the medium wherever it is now; gone, it fires
            record(False)
            if self.machine.state is not State.GRACE:
                logger.warning("rearmed", reason=checks[0].reason)
            self._look_back(checks[0].reason)
            return
        graces = [a for a in actions if isinstance(a, StartGrace)]
        if graces:
            record(False)
            self._start_grace(graces[0], detected)
            return
        if self.machine.held_triggers > held:
            note = "disarmed: not firing" if self.machine.state is State.DISARMED else "in the grace period already"
            logger.warning("held", kind=type(event).__name__, note=note, **_fields(event))
        if actions:
            assert self.firer is not None
            if self.firing_lock is not None:
                statedir.take_firing_lock(self.firing_lock)  # `killcord panic` must not start a second sequence
            # No log line and no word to systemd before the kill and the keys (Firer.drive);
            # then the loop stops pinging while the stages run: stretch the watchdog over
            # all of their deadlines, so systemd does not abort us before the last resort.
            budget_us = (sum(self.config.deadlines.values()) + 5000) * 1000

            def tell_systemd() -> None:
                record(True)
                log.notify(STATUS=f"firing: {self.machine.trigger}", WATCHDOG_USEC=budget_us)

            finished = self.firer.drive(actions, detected, tell_systemd)
            log.notify(STATUS=f"fired: {self.machine.trigger} (ok={finished.ok if finished else None})")
            return
        record(False)

    def status(self) -> control.StatusReply:
        m = self.machine
        server = self.server
        left = None if m.disarm is None else max(0.0, m.disarm.until - time.monotonic())
        return control.StatusReply(
            state=m.state.value,
            mode=self.config.mode,
            pid=os.getpid(),
            version=__version__,
            started_at=self.started,
            trigger=m.trigger,
            medium=self.medium.as_dict() if self.medium else None,
            medium_note=self.medium_note,
            cord=self.cord.as_dict() if self.cord else None,
            kexec=self.staged.as_dict() if self.staged else None,
            resident=self.resident,
            events=list(self.events),
            stages=[{"name": r.stage.value, "outcome": r.outcome.value,
                     "duration_ms": r.duration_ms, "detail": r.detail} for r in m.results],
            ignored_triggers=m.ignored_triggers,
            disarmed=None if m.disarm is None or left is None else {
                "seconds_left": round(left, 1), "until": time.time() + left,
                "reason": m.disarm.reason, "uid": m.disarm.uid, "held_triggers": m.held_triggers},
            clients=None if server is None else {
                "open": len(server.clients), "evicted": server.evicted, "expired": server.expired},
            detector=self.detector_sched,
            mor=None if self.mor is None else self.mor.as_dict(),
            standby=None if self.standby is None else self.standby.as_dict(),
            grace=None if not self.config.grace_ms else {
                "ms": self.config.grace_ms, "back_if": self.identity, "notices": self.notices,
                "trigger": m.grace, "seconds_left": None if self.grace_until is None or m.state is not State.GRACE
                else round(max(0.0, self.grace_until - time.monotonic()), 1)},
            panic_keys=None if self.keyboards is None else {
                "chord": self.config.panic_keys, "sched": self.keys_sched,
                "keyboards": [k.as_dict() for k in self.keyboards.keyboards()],
                "not_opened": list(self.keyboards.refused)},
        )


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one (systemd gives 1024:524288): with the client
    cap this leaves the firing path far from EMFILE. Raising the soft limit needs no
    capability."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        logger.warning("nofile_not_raised", soft=soft, hard=hard, error=str(exc))
        return
    logger.info("nofile_raised", soft=soft, to=hard)


def _fields(event: Event) -> dict[str, object]:
    return {k: v for k, v in vars(event).items() if not isinstance(v, frozenset)}


def run(config: Config) -> int:
    daemon = Daemon(config)
    daemon.arm()
    daemon.loop()
    return 0
