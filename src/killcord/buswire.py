"""The D-Bus wire format, the little of it killcord speaks: method calls with strings,
integers, arrays of them and string-keyed variants, and the replies' headers. For a
desktop notification (desktop.py) and systemd's StartTransientUnit (standby.py).

Written by hand: none of our dependencies speaks D-Bus (python-systemd does not expose
sd-bus), and no program may be executed on the firing side (gdbus, busctl, notify-send:
the medium they live on may be gone). The D-Bus specification's "Message Protocol".
"""

from __future__ import annotations

import select
import socket
import struct
import time

METHOD_CALL, METHOD_RETURN, ERROR = 1, 2, 3
# header field codes (the D-Bus specification's "Header Fields")
PATH, INTERFACE, MEMBER, ERROR_NAME, REPLY_SERIAL, DESTINATION, SENDER, SIGNATURE = 1, 2, 3, 4, 5, 6, 7, 8


class Writer:
    """Little-endian D-Bus marshalling of the types used here (y u i s o g as a{sv} v)."""

    def __init__(self, start: int = 0) -> None:
        self.buf = bytearray()
        self.start = start  # alignment is from the start of the message

    def pad(self, n: int) -> None:
        self.buf += b"\0" * (-(self.start + len(self.buf)) % n)

    def byte(self, v: int) -> None:
        self.buf += bytes([v])

    def u32(self, v: int, code: str = "<I") -> None:
        self.pad(4)
        self.buf += struct.pack(code, v)

    def string(self, v: str) -> None:
        data = v.encode()
        self.u32(len(data))
        self.buf += data + b"\0"

    def signature(self, v: str) -> None:
        self.buf += bytes([len(v)]) + v.encode() + b"\0"

    def variant(self, sig: str, value: object) -> None:
        self.signature(sig)
        self.value(sig, value)

    def value(self, sig: str, value: object) -> None:
        if sig == "y":
            self.byte(int(value))  # type: ignore[arg-type]
        elif sig == "u":
            self.u32(int(value))  # type: ignore[arg-type]
        elif sig == "i":
            self.u32(int(value), "<i")  # type: ignore[arg-type]
        elif sig in ("s", "o"):
            self.string(str(value))
        elif sig == "au":
            self.array(list(value), 4, self.u32)  # type: ignore[call-overload]
        elif sig == "g":
            self.signature(str(value))
        else:
            raise ValueError(f"no marshalling for {sig!r} here")

    def array(self, items: list, element_align: int, write) -> None:  # noqa: ANN001
        self.u32(0)
        at = len(self.buf) - 4
        self.pad(element_align)
        begin = len(self.buf)
        for item in items:
            write(item)
        struct.pack_into("<I", self.buf, at, len(self.buf) - begin)


def message(serial: int, path: str, interface: str, member: str, destination: str = "",
            signature: str = "", body: bytes = b"") -> bytes:
    """A METHOD_CALL message: fixed header, header fields, padding, body."""
    fields: list[tuple[int, str, str]] = [(PATH, "o", path), (INTERFACE, "s", interface), (MEMBER, "s", member)]
    if destination:
        fields.append((DESTINATION, "s", destination))
    if signature:
        fields.append((SIGNATURE, "g", signature))
    w = Writer()
    w.buf += struct.pack("<cBBBII", b"l", METHOD_CALL, 0, 1, len(body), serial)

    def field(f: tuple[int, str, str]) -> None:
        w.pad(8)
        w.byte(f[0])
        w.variant(f[1], f[2])

    w.array(fields, 8, field)
    w.pad(8)
    return bytes(w.buf) + body


def replies(sock: socket.socket, deadline: float, serial: int) -> list[tuple[int, int | None, str]]:
    """Messages read until the answer to `serial` came, the deadline or the socket's end:
    (type, reply_serial, error name) of each."""
    data = b""
    out: list[tuple[int, int | None, str]] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        while len(data) >= 16:
            _, kind, _, _, body_len, _, fields_len = struct.unpack_from("<cBBBIII", data)
            header_end = 16 + fields_len + (-(16 + fields_len) % 8)
            if len(data) < header_end + body_len:
                break
            out.append((kind, *_reply_fields(data[16:16 + fields_len])))
            data = data[header_end + body_len:]
        if any(kind in (METHOD_RETURN, ERROR) and got == serial for kind, got, _ in out):
            break
    return out


def _reply_fields(fields: bytes) -> tuple[int | None, str]:
    """REPLY_SERIAL and ERROR_NAME from a header's fields (offsets as from the message start:
    the fields begin at 16, a multiple of 8)."""
    serial, error, i = None, "", 0
    while i < len(fields):
        i += -(i + 16) % 8
        if i >= len(fields):
            break
        code, siglen = fields[i], fields[i + 1]
        sig = fields[i + 2:i + 2 + siglen].decode()
        i += 3 + siglen
        if sig in ("u", "s", "o"):
            i += -(i + 16) % 4
            (n,) = struct.unpack_from("<I", fields, i)
            i += 4
            if sig == "u":
                serial = n if code == REPLY_SERIAL else serial
            else:
                text = fields[i:i + n].decode(errors="replace")
                error = text if code == ERROR_NAME else error
                i += n + 1
        elif sig == "g":
            i += fields[i] + 2
        else:
            break  # not a type a bus puts in a reply's header
    return serial, error


def connect(path: str, uid: int, timeout: float) -> socket.socket:
    """A connected, authenticated socket (EXTERNAL: the kernel vouches for our uid);
    OSError if the bus refuses."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"\0AUTH EXTERNAL " + str(uid).encode().hex().encode() + b"\r\n")
        line = sock.recv(512)
        if not line.startswith(b"OK "):
            raise ConnectionRefusedError(f"authentication refused: {line[:60]!r}")
        sock.sendall(b"BEGIN\r\n")
    except BaseException:
        sock.close()
        raise
    return sock


def call(sock: socket.socket, serial: int, msg: bytes, wait_s: float) -> str:
    """Send a method call and wait for its answer: "ok", "refused: <error>" or "no answer"."""
    sock.sendall(msg)
    for kind, got, error in replies(sock, time.monotonic() + wait_s, serial):
        if got == serial:
            return "ok" if kind == METHOD_RETURN else f"refused: {error}"
    return "no answer"
