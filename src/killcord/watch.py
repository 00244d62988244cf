"""Raw kernel uevents from netlink (pyudev, source "kernel": no wait for udev rules).

The daemon blocks on the watcher's file descriptor; nothing here polls. A receive buffer
overflow (ENOBUFS) means events were lost: the caller re-checks the medium in sysfs.
"""

from __future__ import annotations

import errno
import os
import socket

import pyudev

from killcord.events import Uevent
from killcord.medium import media_present

# Large enough to ride out an event storm (needs CAP_NET_ADMIN: SO_RCVBUFFORCE).
RECEIVE_BUFFER = 8 * 1024 * 1024


class Watcher:
    def __init__(self, buffer_bytes: int | None = RECEIVE_BUFFER) -> None:
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        if buffer_bytes:
            try:
                self.monitor.set_receive_buffer_size(buffer_bytes)
            except OSError:
                pass  # unprivileged: the default buffer; ENOBUFS is handled anyway
        self.monitor.start()
        # pyudev reports a pending socket error (ENOBUFS) as a bare OSError from poll();
        # SO_ERROR on the same socket says which error it was, and clears it.
        self._sock = socket.socket(fileno=os.dup(self.monitor.fileno()))

    def fileno(self) -> int:
        return self.monitor.fileno()

    def _pending_error(self) -> int:
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def drain(self, media_watched: frozenset[str], limit: int | None = None) -> tuple[list[Uevent], bool]:
        """Read the events queued now, without blocking: all of them, or at most `limit` (the rest
        stay queued in the socket for the next call, so the caller can serve others between batches).

        For a `change` on a media-watched disk, media_present says whether it still holds media
        (its sysfs size): read here, at the edge, so the machine stays pure.

        Returns the events and whether the kernel dropped some (ENOBUFS): then the caller
        must re-check the medium, since its `remove` may be among the lost ones."""
        events: list[Uevent] = []
        overflow = False
        while limit is None or len(events) < limit:
            try:
                device = self.monitor.poll(timeout=0)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS or self._pending_error() == errno.ENOBUFS:
                    overflow = True  # reported once per overflow; what is queued is still readable
                    continue
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    return events, overflow
                raise
            if device is None:
                return events, overflow
            devpath = device.device_path
            action = device.action or ""
            events.append(Uevent(
                action=action,
                devpath=devpath,
                subsystem=device.subsystem or "",
                devtype=device.device_type or "",
                media_present=media_present(devpath) if devpath in media_watched and action == "change" else None,
            ))
        return events, overflow
