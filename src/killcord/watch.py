"""Raw kernel uevents from netlink (NETLINK_KOBJECT_UEVENT, the kernel's group: no wait for udev).

The daemon blocks on the watcher's file descriptor; nothing here polls. A receive buffer
overflow (ENOBUFS) means events were lost: the caller re-checks the medium in sysfs.

Hand-written rather than pyudev's Monitor: that builds a Device (a libudev object and its
Python wrapper) for every message, and libudev's socket filters apply only to udev's own
"libudev" messages, never to the kernel's. Here a classic BPF filter (set_filter) makes the
kernel drop every uevent that cannot fire before it is queued, and what passes is parsed by
hand (parse_uevent): only the four fields the machine needs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

from killcord.events import Uevent
from killcord.medium import media_present

# Large enough to ride out an event storm (needs CAP_NET_ADMIN: SO_RCVBUFFORCE).
RECEIVE_BUFFER = 8 * 1024 * 1024

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1  # udev re-broadcasts to group 2 ("libudev" messages): never joined
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
# A uevent's environment is at most UEVENT_BUFFER_SIZE (2048) bytes, DEVPATH= among them.
MESSAGE_MAX = 8192

# Classic BPF (linux/filter.h). A filter returns how many bytes to keep: 0 drops.
BPF_LD, BPF_JMP, BPF_RET = 0x00, 0x05, 0x06
BPF_W, BPF_H, BPF_B, BPF_ABS = 0x00, 0x08, 0x10, 0x20
BPF_JA, BPF_JEQ, BPF_K = 0x00, 0x10, 0x00
BPF_MAXINSNS = 4096  # the kernel refuses longer programs
BPF_JUMP_MAX = 255  # jt and jf are one byte; BPF_JA takes 32 bits
ACCEPT, DROP = 0xFFFFFFFF, 0

Insn = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k


def _starts_with(text: bytes) -> list[Insn]:
    """Accept a message starting with `text`; on any mismatch, go on after these instructions.

    Compared 4 bytes at a time (BPF_ABS loads are big-endian), then 2, then 1. A load past
    the end of a shorter message ends the program with 0: dropped. Built backwards, so each
    mismatch knows how far the end is; beyond a one-byte jump, via a BPF_JA next to it."""
    chunks: list[tuple[int, int, int]] = []  # (offset, size, load mode)
    offset = 0
    for size, mode in ((4, BPF_W), (2, BPF_H), (1, BPF_B)):
        while len(text) - offset >= size:
            chunks.append((offset, size, mode))
            offset += size
    body: list[Insn] = [(BPF_RET | BPF_K, 0, 0, ACCEPT)]
    to_end = len(body)  # from the instruction after a comparison to where a mismatch goes
    for offset, size, mode in reversed(chunks):
        value = int.from_bytes(text[offset:offset + size], "big")
        if to_end > BPF_JUMP_MAX:
            body.insert(0, (BPF_JMP | BPF_JA, 0, 0, to_end))
            compare = (BPF_JMP | BPF_JEQ | BPF_K, 1, 0, value)  # a match skips the BPF_JA
            to_end = 0
        else:
            compare = (BPF_JMP | BPF_JEQ | BPF_K, 0, to_end, value)
        body[:0] = [(BPF_LD | mode | BPF_ABS, 0, 0, offset), compare]
        to_end += 2
    return body


def uevent_filter(change_devpaths: frozenset[str]) -> list[Insn]:
    """The program: every `remove`, and a `change` of exactly one of `change_devpaths`.

    The data of a NETLINK_KOBJECT_UEVENT message starts at its "ACTION@DEVPATH\\0" header."""
    program = _starts_with(b"remove@")
    for devpath in sorted(change_devpaths):
        program += _starts_with(b"change@" + os.fsencode(devpath) + b"\0")
    program.append((BPF_RET | BPF_K, 0, 0, DROP))
    if len(program) > BPF_MAXINSNS:
        raise ValueError(f"uevent filter for {len(change_devpaths)} devpath(s) needs {len(program)} "
                         f"BPF instructions, over the kernel's limit of {BPF_MAXINSNS}")
    return program


def prefix_filter(prefixes: tuple[bytes, ...]) -> list[Insn]:
    """The program: messages whose header starts with one of `prefixes` (e.g. b"add@")."""
    program = [insn for prefix in prefixes for insn in _starts_with(prefix)]
    return program + [(BPF_RET | BPF_K, 0, 0, DROP)]


def _field(data: bytes, key: bytes, start: int) -> str:
    begin = data.find(key, start)
    if begin < 0:
        return ""
    begin += len(key)
    end = data.find(b"\0", begin)
    return data[begin:end if end >= 0 else len(data)].decode()


def parse_uevent(data: bytes, media_watched: frozenset[str]) -> Uevent | None:
    """A kernel uevent ("ACTION@DEVPATH\\0KEY=VALUE\\0..."), or None if `data` is not one.

    Action and devpath from the header, then SUBSYSTEM= and DEVTYPE=; nothing else is read
    or decoded (a GPT partition's PARTNAME= may be Latin-1, and that must not drop its
    `remove`). These four must be UTF-8. media_present only for a `change` on a media-watched
    disk (its sysfs size): read here, at the edge, so the machine stays pure."""
    header_end = data.find(b"\0")
    if header_end < 0:
        return None
    at = data.find(b"@", 0, header_end)
    if at <= 0 or data[at + 1:at + 2] != b"/":
        return None
    try:
        action = data[:at].decode()
        devpath = data[at + 1:header_end].decode()
        # every field follows a NUL: matching the NUL too never takes a key's tail for a key
        subsystem = _field(data, b"\0SUBSYSTEM=", header_end)
        devtype = _field(data, b"\0DEVTYPE=", header_end)
    except UnicodeDecodeError:
        return None
    present = media_present(devpath) if action == "change" and devpath in media_watched else None
    return Uevent(action, devpath, subsystem, devtype, present)


class Watcher:
    def __init__(self, buffer_bytes: int | None = RECEIVE_BUFFER) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   NETLINK_KOBJECT_UEVENT)
        if buffer_bytes:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_bytes)
            except OSError:
                pass  # unprivileged: the default buffer; ENOBUFS is handled anyway
        self._sock.bind((0, 1 << (KERNEL_GROUP - 1)))

    def fileno(self) -> int:
        return self._sock.fileno()

    def set_filter(self, change_devpaths: frozenset[str]) -> None:
        """From now on the kernel queues only every `remove` and a `change` of one of
        `change_devpaths` (pass the media-watched set: see machine.uevent_fires); all else is
        dropped before it takes any room in the buffer. Replaces the previous filter atomically.
        ValueError if the program is over the kernel's limit (nothing is changed then)."""
        self.attach(uevent_filter(change_devpaths))

    def attach(self, program: list[Insn]) -> None:
        """Replace the socket's filter by `program`, atomically."""
        code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *insn) for insn in program))
        # struct sock_fprog {unsigned short len; struct sock_filter *filter;}, native layout
        fprog = struct.pack("HP", len(program), ctypes.addressof(code))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies it

    def drain(self, media_watched: frozenset[str], limit: int | None = None) -> tuple[list[Uevent], bool]:
        """Read the events queued now, without blocking: all of them, or at most `limit` (the rest
        stay queued in the socket for the next call, so the caller can serve others between batches).

        Returns the events and whether the kernel dropped some (ENOBUFS): then the caller
        must re-check the medium, since its `remove` may be among the lost ones."""
        events: list[Uevent] = []
        overflow = False
        while limit is None or len(events) < limit:
            try:
                data, (port_id, _) = self._sock.recvfrom(MESSAGE_MAX)
            except BlockingIOError:
                return events, overflow
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                overflow = True  # reported once per overflow; what is queued is still readable
                continue
            if port_id != 0:
                continue  # only the kernel sends from port 0; a CAP_NET_ADMIN process can send here too
            event = parse_uevent(data, media_watched)
            if event is not None:
                events.append(event)
        return events, overflow
