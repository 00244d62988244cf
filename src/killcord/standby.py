"""The standby: a fork of the armed daemon, kept in RAM, that takes over when the daemon
dies without being stopped.

A daemon killed or crashed is restarted by systemd, but a new one must be read from the
medium: with the stick pulled meanwhile it cannot start (Debian 13's live system reads the
stick for every directory it lists), and nothing would fire. The standby needs nothing
read: it is the armed daemon itself, forked at arm time (its machine, staged kexec, firing
path and records), with its own uevent socket and its memory locked. It waits on a pipe
from the daemon: "stop" (a clean stop) ends it; the pipe's end without it means the daemon
died, and the standby takes over: it looks at the medium at once (firing if it is gone),
then watches the uevents as the daemon did, until it fires or a new daemon answers armed
on the control socket.

It lives in a scope unit of its own (StartTransientUnit over systemd's private socket, no
program run), so that the restart's clean-up of killcord.service, or `systemctl kill
killcord`, does not take it with the daemon. Without systemd it stays in the daemon's
cgroup, and status says so.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from killcord import buswire, control, resident, watch
from killcord.events import State

if TYPE_CHECKING:
    from killcord.daemon import Daemon

SYSTEMD_PRIVATE = "/run/systemd/private"
STOP = b"stop"
LOOK_S = 0.5  # after a takeover: how often to ask whether a new daemon is armed

logger = structlog.get_logger("killcord.standby")


@dataclass
class Standby:
    pid: int
    pipe: int  # the daemon's end: "stop" on a clean stop; closed by the kernel when the daemon dies
    scope: str | None  # the scope unit it was moved to, or None
    note: str

    def as_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "scope": self.scope, "note": self.note}

    def stop(self) -> None:
        try:
            os.write(self.pipe, STOP)
            os.close(self.pipe)
        except OSError:
            pass


def start(daemon: Daemon) -> Standby:
    """Fork the standby from the armed daemon; call while the daemon has no other thread
    (a fork keeps only the calling one)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        code = 1
        try:
            code = run(daemon, r)
        except BaseException as exc:  # noqa: BLE001 - the child must end here, never return into the daemon
            logger.error("standby_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            os._exit(code)
    os.close(r)
    os.set_inheritable(w, False)
    scope, note = move_to_scope(pid)
    logger.info("standby", pid=pid, scope=scope, note=note)
    return Standby(pid, w, scope, note)


def move_to_scope(pid: int, socket_path: str = SYSTEMD_PRIVATE) -> tuple[str | None, str]:
    """Ask systemd to put `pid` in a scope unit of its own: (its name, a note)."""
    name = f"killcord-standby-{pid}.scope"
    w = buswire.Writer()
    w.string(name)
    w.string("fail")

    def prop(p: tuple[str, str, object]) -> None:
        w.pad(8)
        w.string(p[0])
        w.variant(p[1], p[2])

    w.array([("PIDs", "au", [pid]), ("Description", "s", "killcord standby: takes over if the daemon dies"),
             ("CollectMode", "s", "inactive-or-failed")], 8, prop)
    w.array([], 8, lambda _: None)
    msg = buswire.message(1, "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                          "StartTransientUnit", "org.freedesktop.systemd1", "ssa(sv)a(sa(sv))", bytes(w.buf))
    try:
        with buswire.connect(socket_path, os.getuid(), 2.0) as sock:
            answer = buswire.call(sock, 1, msg, 2.0)
    except OSError as exc:
        answer = f"{type(exc).__name__}: {exc}"
    if answer == "ok":
        return name, f"in {name}: outside killcord.service, a kill of the daemon leaves it"
    return None, f"in the daemon's own cgroup (no scope of its own: {answer}): a kill of the whole unit takes it too"


def run(daemon: Daemon, pipe: int) -> int:
    """The standby's life, in the forked child."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # a system going down: nothing to take over
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        resident.lock_all()  # a fork inherits no memory lock
    except OSError as exc:
        logger.warning("standby_not_locked", error=str(exc))
    media = daemon.medium.media_watched if daemon.medium else frozenset()
    daemon.watcher = watch.Watcher()  # its own: the daemon's socket stays the daemon's
    daemon.watcher.set_filter(media)
    assert daemon.firer is not None
    daemon.firer.keep_stage_thread()
    parent = os.getppid()
    if _stopped_cleanly(daemon, pipe):
        return 0
    logger.critical("standby_takeover", daemon_pid=parent, pid=os.getpid())
    return takeover(daemon, parent)


def _stopped_cleanly(daemon: Daemon, pipe: int) -> bool:
    """Wait while the daemon lives, keeping the uevent queue short and acting on nothing;
    then whether it said "stop" (False: it died)."""
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ, "pipe")
        sel.register(daemon.watcher.fileno(), selectors.EVENT_READ, "uevents")
        while True:
            for key, _ in sel.select():
                if key.data == "uevents":
                    daemon.watcher.drain(frozenset(), limit=256)
                else:
                    return os.read(pipe, 16).startswith(STOP)


def takeover(daemon: Daemon, old_pid: int) -> int:
    """The daemon died: look at the medium now, then watch as it did until this fires or a
    new daemon is armed."""
    daemon.recheck("the daemon died; the standby took over")
    last_look = time.monotonic()
    with selectors.DefaultSelector() as sel:
        sel.register(daemon.watcher.fileno(), selectors.EVENT_READ)
        while daemon.machine.state not in (State.FIRING, State.FIRED):
            waits = [LOOK_S] + ([daemon.grace_until - time.monotonic()] if daemon.grace_until is not None else [])
            if sel.select(max(0.0, min(waits))):
                daemon.on_uevents()
            daemon._grace_tick()  # noqa: SLF001 - the standby is the daemon's own copy
            if time.monotonic() - last_look >= LOOK_S:
                last_look = time.monotonic()
                if _new_daemon_armed(daemon, old_pid):
                    logger.warning("standby_done", note="a new daemon is armed")
                    return 0
    return 0


def _new_daemon_armed(daemon: Daemon, old_pid: int) -> bool:
    try:
        reply = control.request(daemon.config.socket, "status", timeout=1.0)
    except control.NoAnswer:
        return False
    return (isinstance(reply, control.StatusReply) and reply.pid not in (old_pid, os.getpid())
            and reply.state in ("armed", "disarmed", "grace", "firing", "fired"))
