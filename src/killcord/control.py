"""The control socket: one JSON request line in, one JSON reply line out.

One table (COMMANDS) names every command and who may send it; the daemon has one handler
per entry, and anything else is refused. Who the client is comes from the kernel's peer
credentials (SO_PEERCRED and SO_PEERGROUPS), never from anything the client says.

Any local user may connect (the socket is 0666, so that refusals are ours, logged), so
nothing a client sends or withholds may crash, stall or starve the daemon: a request is
one short line, parsed in a guarded call; every connection has a deadline; their number is
capped, and when the cap is reached the oldest unprivileged one makes room (a connection
from root or panic_group is never pushed out by an unprivileged one); replies are sent
without blocking. Replies are typed (dataclasses below), shared by the daemon, the CLI and
`killcord check`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import MISSING, asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from killcord import statedir

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in every Python
MAX_REQUEST = 256  # {"cmd": "recheck"} is 18 bytes; short lines also bound json's nesting
MAX_REPLY = 4 << 20  # what the CLI reads at most
MAX_CLIENTS = 64  # connections open at once; far below any file limit (we use ~30 fds more)
CLIENT_DEADLINE_S = 2.0  # from accept to the last byte of the reply
ACCEPT_BATCH = 32  # connections accepted per loop turn, so uevents are served between


class Privilege(Enum):
    ANYONE = "anyone"
    PANIC = "root or panic_group"
    ROOT = "root"


@dataclass(frozen=True)
class Command:
    name: str
    privilege: Privilege
    help: str
    args: tuple[str, ...] = ()  # the arguments it takes; parse_request checks each


MAX_DISARM_S = 86_400  # what a request may say at all; the daemon's disarm_max_s caps it further
MAX_REASON = 100


# The one table: every command the daemon answers, and who may send it.
COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("status", Privilege.ANYONE, "the daemon's state, medium, kexec, residency, events and stages"),
    Command("panic", Privilege.PANIC, "fire now"),
    Command("recheck", Privilege.ROOT, "re-check the medium in sysfs now (after resume)"),
    Command("disarm", Privilege.PANIC, "stand down for `seconds`: removing the medium does not fire, panic still "
            "does; then re-arm (and fire if the medium is gone)", ("seconds", "reason")),
    Command("arm", Privilege.PANIC, "end a disarm now (and fire if the medium is gone)"),
)}


@dataclass(frozen=True)
class Request:
    command: Command
    seconds: int | None = None  # disarm
    reason: str = ""  # disarm


# ---- replies ----


@dataclass(frozen=True)
class ErrorReply:
    error: str
    ok: bool = False


@dataclass(frozen=True)
class StatusReply:
    state: str
    mode: str
    pid: int
    version: str
    started_at: float
    trigger: str | None
    medium: dict[str, Any] | None
    cord: dict[str, Any] | None
    kexec: dict[str, Any] | None
    resident: dict[str, Any]
    events: list[dict[str, Any]]
    stages: list[dict[str, Any]]
    ignored_triggers: int
    medium_note: str | None = None  # why no medium is watched (e.g. copied to RAM: panic only)
    disarmed: dict[str, Any] | None = None  # while disarmed: seconds_left, until, reason, uid, held_triggers
    clients: dict[str, int] | None = None  # control connections: open, evicted, expired
    detector: str | None = None  # the uevent detector thread's scheduling: "SCHED_FIFO 50" when armed
    mor: dict[str, Any] | None = None  # the firmware's MOR bit as arming left it (mor.MorState); None: mor = "off"
    # the standby (standby.py): pid, scope (its own unit, or None), note
    standby: dict[str, Any] | None = None
    # with grace_ms set: ms, back_if (the medium's identity), trigger and seconds_left while it
    # runs, notices (the last notice: terminals, desktops, not_reached)
    grace: dict[str, Any] | None = None
    # with panic_keys set: chord, sched (the keys thread's), keyboards (node, name, hotplugged), not_opened
    panic_keys: dict[str, Any] | None = None
    ok: bool = True


@dataclass(frozen=True)
class PanicReply:
    state: str
    mode: str
    note: str | None = None
    ok: bool = True


@dataclass(frozen=True)
class RecheckReply:
    state: str
    trigger: str | None = None
    ok: bool = True


@dataclass(frozen=True)
class DisarmReply:
    state: str
    seconds: int
    until: float  # wall clock (time.time())
    reason: str = ""
    ok: bool = True


@dataclass(frozen=True)
class ArmReply:
    state: str
    note: str = ""
    ok: bool = True


Reply = ErrorReply | StatusReply | PanicReply | RecheckReply | DisarmReply | ArmReply
REPLY_TYPES: dict[str, type] = {
    "status": StatusReply, "panic": PanicReply, "recheck": RecheckReply, "disarm": DisarmReply, "arm": ArmReply}
assert REPLY_TYPES.keys() == COMMANDS.keys()


def encode(reply: Reply) -> bytes:
    return json.dumps(asdict(reply), default=str).encode() + b"\n"


def as_dict(reply: Reply) -> dict[str, Any]:
    return asdict(reply)


def decode(cmd: str, data: bytes) -> Reply:
    """The reply to `cmd`; ValueError if it is not one (garbage, wrong shape or types)."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise ValueError("not a reply object")
    cls: type = REPLY_TYPES[cmd] if doc["ok"] else ErrorReply
    known = {f.name: f for f in fields(cls)}
    missing = [n for n, f in known.items() if n not in doc and f.default is MISSING]
    if missing:
        raise ValueError(f"{cls.__name__} without {', '.join(missing)}")
    values = {k: v for k, v in doc.items() if k in known}  # unknown fields: a newer daemon
    for name in ("state", "mode", "error"):
        if name in values and not isinstance(values[name], str):
            raise ValueError(f"{name} is not a string")
    return cls(**values)


# ---- who is asking ----


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]

    def may_panic(self, panic_gid: int | None) -> bool:
        if self.uid == 0:
            return True
        return panic_gid is not None and (self.gid == panic_gid or panic_gid in self.groups)


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError:
        groups = ()
    return Peer(pid, uid, gid, tuple(groups))


def refusal(command: Command, peer: Peer, panic_gid: int | None, panic_group: str | None) -> ErrorReply | None:
    """None if `peer` may send `command`, else the reply that says why not."""
    if command.privilege is Privilege.ANYONE:
        return None
    if command.privilege is Privilege.PANIC and peer.may_panic(panic_gid):
        return None
    if command.privilege is Privilege.ROOT and peer.uid == 0:
        return None
    who = f"root or group {panic_group}" if command.privilege is Privilege.PANIC and panic_group else "root"
    return ErrorReply(f"permission denied: uid {peer.uid} may not {command.name} (only {who})")


def parse_request(line: bytes) -> Request:
    """One request line; ValueError (naming what is allowed) on anything else."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: deeply nested input
        raise ValueError(f"not a JSON request: {line[:60]!r}") from None
    cmd = request.get("cmd") if isinstance(request, dict) else None
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise ValueError(f"unknown request {line[:60]!r}; send {{\"cmd\": NAME}} with NAME one of "
                         f"{', '.join(COMMANDS)}")
    command = COMMANDS[cmd]
    extra = set(request) - {"cmd", *command.args}
    if extra:
        raise ValueError(f"{cmd} takes {', '.join(command.args) or 'no arguments'}, not {', '.join(sorted(extra))}")
    if cmd != "disarm":
        return Request(command)
    seconds, reason = request.get("seconds"), request.get("reason", "")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= MAX_DISARM_S:
        raise ValueError(f"disarm: seconds = {seconds!r}; give whole seconds, 1 to {MAX_DISARM_S}")
    if not isinstance(reason, str) or len(reason) > MAX_REASON or not reason.isprintable():
        raise ValueError(f"disarm: the reason must be printable text of at most {MAX_REASON} characters")
    return Request(command, seconds, reason)


# ---- the daemon side ----


class Client:
    """One connection, read and answered without ever blocking the loop."""

    def __init__(self, conn: socket.socket, peer: Peer, privileged: bool, now: float) -> None:
        conn.setblocking(False)
        self.conn = conn
        self.peer = peer
        self.privileged = privileged  # root or panic_group: never evicted for an unprivileged one
        self.deadline = now + CLIENT_DEADLINE_S
        self.buffer = b""
        self.outbox = b""

    def fileno(self) -> int:
        return self.conn.fileno()

    def read(self) -> Request | None:
        """The request once a whole line arrived, None if more is to come; ValueError on a
        bad request, ConnectionError if the peer went away."""
        try:
            chunk = self.conn.recv(MAX_REQUEST + 1)
        except (BlockingIOError, InterruptedError):
            return None
        if not chunk:
            raise ConnectionError("closed before a request line")
        self.buffer += chunk
        line, newline, _ = self.buffer.partition(b"\n")
        if not newline:
            if len(self.buffer) > MAX_REQUEST:
                raise ValueError(f"request longer than {MAX_REQUEST} bytes")
            return None
        if len(line) > MAX_REQUEST:
            raise ValueError(f"request longer than {MAX_REQUEST} bytes")
        return parse_request(line)

    def queue(self, reply: Reply) -> None:
        self.outbox = encode(reply)

    def flush(self) -> bool:
        """Send what the socket takes now; True when all is sent (the client may be closed)."""
        while self.outbox:
            try:
                sent = self.conn.send(self.outbox)
            except (BlockingIOError, InterruptedError):
                return False
            self.outbox = self.outbox[sent:]
        return True


class Server:
    """The listening socket and its clients: a cap, a deadline each, eviction."""

    def __init__(self, sock: socket.socket, dir_fd: int, name: str, panic_gid: int | None,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.sock = sock
        self.dir_fd = dir_fd
        self.name = name
        self.panic_gid = panic_gid
        self.max_clients = max_clients
        self.clients: OrderedDict[int, Client] = OrderedDict()  # by fd, oldest first
        self.evicted = 0
        self.expired = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, now: float) -> tuple[list[Client], list[Client]]:
        """Accept what is pending (at most ACCEPT_BATCH): (new clients, clients to drop)."""
        new: list[Client] = []
        dropped: list[Client] = []
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: the cap keeps us far from our own limit, so this is
                # the system's; what stays queued is accepted on a later turn.
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    break
                continue  # ECONNABORTED and the like: that client is gone
            try:
                peer = peer_of(conn)
            except OSError:
                conn.close()
                continue
            client = Client(conn, peer, peer.may_panic(self.panic_gid), now)
            if len(self.clients) >= self.max_clients:
                victim = self._victim(client)
                if victim is client:
                    conn.close()
                    self.evicted += 1
                    continue
                self.forget(victim)
                dropped.append(victim)
                self.evicted += 1
            self.clients[client.fileno()] = client
            new.append(client)
        return new, dropped

    def _victim(self, newcomer: Client) -> Client:
        # The oldest unprivileged connection makes room; if every slot is privileged, an
        # unprivileged newcomer is turned away and a privileged one replaces the oldest.
        for client in self.clients.values():
            if not client.privileged:
                return client
        if not newcomer.privileged:
            return newcomer
        return next(iter(self.clients.values()))

    def forget(self, client: Client) -> None:
        self.clients.pop(client.fileno(), None)

    def overdue(self, now: float) -> list[Client]:
        late = [c for c in self.clients.values() if c.deadline <= now]
        self.expired += len(late)
        return late

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self.clients.values()), default=None)

    def close(self) -> None:
        for client in list(self.clients.values()):
            client.conn.close()
        self.clients.clear()
        self.sock.close()
        try:
            os.unlink(self.name, dir_fd=self.dir_fd)
        except OSError:
            pass
        os.close(self.dir_fd)


def listen(path: Path, panic_gid: int | None = None) -> Server:
    """Bind the socket world-connectable (0666: refusals are decided and logged by us).

    Its directory is opened without following links and must be ours and writable by
    nobody else (statedir.open_dir); the socket is bound through that descriptor
    (/proc/self/fd/N/name) and made 0666 by the umask at bind, so no link is followed
    between the check and the bind, and no chmod by path is needed."""
    dir_fd = statedir.open_dir(path.parent, create_mode=0o755)
    try:
        try:
            os.unlink(path.name, dir_fd=dir_fd)  # unlinkat: a planted link is removed, not followed
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        old = os.umask(0o111)
        try:
            sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
        finally:
            os.umask(old)
        sock.listen(128)
    except BaseException:
        os.close(dir_fd)
        raise
    return Server(sock, dir_fd, path.name, panic_gid)


# ---- the client side ----


class NoAnswer(Exception):
    """No valid reply from a daemon within the deadline (none listening, refused, timed
    out, reset, garbage...). `missing`: nobody listens on the socket at all."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


DaemonUnavailable = NoAnswer  # the former name


def request(path: Path, cmd: str, timeout: float = 5.0, **args: object) -> Reply:
    """Send `cmd` (with `args`, for the commands that take some) and wait at most `timeout` seconds in all for its typed reply (or an
    ErrorReply). Raises NoAnswer on anything else, never a bare OSError or ValueError."""
    end = time.monotonic() + timeout
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as exc:  # EMFILE in this process
        raise NoAnswer(f"cannot open a socket: {exc.strerror or exc}") from None
    with sock:
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REPLY:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise NoAnswer(f"no answer from the daemon on {path} within {timeout:g} s") from None
        except OSError as exc:
            missing = exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR)
            what = "no daemon on" if missing else "no answer from the daemon on"
            raise NoAnswer(f"{what} {path}: {exc.strerror or exc}", missing) from None
    if not data:
        raise NoAnswer(f"the daemon on {path} closed the connection without answering")
    try:
        return decode(cmd, data)
    except (ValueError, TypeError, RecursionError) as exc:
        raise NoAnswer(f"the daemon on {path} gave no valid answer ({exc}): {data[:80]!r}") from None
