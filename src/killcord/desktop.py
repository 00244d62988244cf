"""A desktop notification (org.freedesktop.Notifications.Notify) on a user's session bus,
for the grace period's notice (notice.py): GNOME, KDE and the others show it over the
running session, Wayland or X11 alike. The wire format is buswire.py's.

A session bus accepts only its own user (root is refused), so a forked child takes the
user's uid and talks to it; the child never executes anything, and the daemon never
waits for it beyond its time.
"""

from __future__ import annotations

import os
import select
from pathlib import Path

from killcord import buswire

RUN_USER = Path("/run/user")
URGENCY_CRITICAL = 2


def notify_body(summary: str, body: str, timeout_ms: int) -> tuple[str, bytes]:
    """Notify(app_name s, replaces_id u, app_icon s, summary s, body s, actions as,
    hints a{sv}, expire_timeout i), critical urgency: shown over everything, kept up."""
    w = buswire.Writer()
    w.string("killcord")
    w.u32(0)
    w.string("dialog-warning")
    w.string(summary)
    w.string(body)
    w.array([], 4, w.string)

    def hint(kv: tuple[str, str, object]) -> None:
        w.pad(8)
        w.string(kv[0])
        w.variant(kv[1], kv[2])

    w.array([("urgency", "y", URGENCY_CRITICAL)], 8, hint)
    w.u32(timeout_ms, "<i")
    return "susssasa{sv}i", bytes(w.buf)


def send(bus: Path, uid: int, summary: str, body: str, timeout_ms: int, wait_s: float = 2.0) -> str:
    """Connect to `bus` as `uid` (already that user), say Hello, Notify; "ok" or why not."""
    try:
        sock = buswire.connect(str(bus), uid, wait_s)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    with sock:
        sig, payload = notify_body(summary, body, timeout_ms)
        sock.sendall(buswire.message(1, "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello",
                                     "org.freedesktop.DBus"))
        return buswire.call(sock, 2, buswire.message(2, "/org/freedesktop/Notifications",
                                                     "org.freedesktop.Notifications", "Notify",
                                                     "org.freedesktop.Notifications", sig, payload), wait_s)


def notify_user(uid: int, gid: int, summary: str, body: str, timeout_ms: int,
                run_user: Path = RUN_USER, wait_s: float = 2.0) -> str:
    """Notify on `uid`'s session bus from a child that has become that user; "ok" or why
    not. The caller's thread waits at most wait_s + 1 s."""
    bus = run_user / str(uid) / "bus"
    if not bus.is_socket():
        return "no session bus"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no logging, no imports, no exec; only its user's rights
        os.close(r)
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            result = send(bus, uid, summary, body, timeout_ms, wait_s)
            code = 0 if result == "ok" else 1
        except BaseException as exc:  # noqa: BLE001 - the child reports whatever stopped it
            result = f"{type(exc).__name__}: {exc}"
        try:
            os.write(w, result.encode()[:500])
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], wait_s + 1.0)
        result = os.read(r, 500).decode(errors="replace") if ready else "timed out"
    finally:
        os.close(r)
        try:
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return result or "no answer"
