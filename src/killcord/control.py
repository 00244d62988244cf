"""The control socket: one JSON request line in, one JSON response line out.

Anyone may connect and ask for `status`; `panic` is for root and members of
`panic_group`; `recheck` (re-check the medium in sysfs, after resume) is for root; decided from the kernel's peer credentials (SO_PEERCRED and
SO_PEERGROUPS), never from anything the client says.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_REQUEST = 4096
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in every Python
COMMANDS = ("status", "panic", "recheck")


class DaemonUnavailable(Exception):
    """No daemon answers on the socket."""


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


def listen(path: Path) -> socket.socket:
    """Bind the socket world-connectable (0666): refusals are decided and logged by us."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    sock.bind(str(path))
    os.chmod(path, 0o666)
    sock.listen(16)
    return sock


class Client:
    """One connection on the daemon side, read without blocking the loop."""

    def __init__(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self.conn = conn
        self.buffer = b""
        self.peer = peer_of(conn)

    def read(self) -> dict[str, object] | None:
        """The request once a whole line arrived; raises ValueError on a bad one."""
        chunk = self.conn.recv(MAX_REQUEST)
        if not chunk:
            raise ValueError("connection closed before a request line")
        self.buffer += chunk
        if b"\n" not in self.buffer:
            if len(self.buffer) >= MAX_REQUEST:
                raise ValueError("request too long")
            return None
        line = self.buffer.split(b"\n", 1)[0]
        request = json.loads(line)
        if not isinstance(request, dict) or request.get("cmd") not in COMMANDS:
            raise ValueError(f"unknown request {line[:100]!r}; commands are {', '.join(COMMANDS)}")
        return request

    def reply(self, response: dict[str, object]) -> None:
        try:
            self.conn.setblocking(True)
            self.conn.settimeout(0.5)  # a client that does not read cannot hold the daemon
            self.conn.sendall(json.dumps(response, default=str).encode() + b"\n")
        except OSError:
            pass
        finally:
            self.conn.close()


def request(path: Path, cmd: str, timeout: float = 5.0) -> dict[str, object]:
    """The CLI side. Raises DaemonUnavailable when nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
            raise DaemonUnavailable(f"no daemon on {path}: {exc.strerror}") from None
        raise
    with sock:
        sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise DaemonUnavailable(f"the daemon on {path} closed the connection without answering")
    return json.loads(data)
