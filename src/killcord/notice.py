"""Notices to the people at the machine while a grace period runs (grace_ms): the medium
is gone, killcord fires in N seconds unless it is back.

Nothing is executed: the medium, and every program on it, may be gone. The kernel console
gets the daemon's critical log line (log.py, /dev/kmsg). Every logged-in terminal is
written directly, found in logind's session files (/run/systemd/sessions, in RAM), as
wall(1) would. Graphical sessions get the same text over D-Bus from their desktop's
notification service (desktop.py).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from killcord import desktop

SESSIONS = Path("/run/systemd/sessions")
DEV = Path("/dev")
# what logind writes as TTY=: a virtual console, a pseudo-terminal, a serial line
_TTY = re.compile(r"^(tty\d+|pts/\d+|ttyS\d+|ttyUSB\d+|hvc\d+)$")
GRAPHICAL = frozenset({"x11", "wayland", "mir"})


@dataclass(frozen=True)
class Session:
    id: str
    uid: int
    user: str
    type: str  # tty, x11, wayland, ...
    tty: str  # "" when none
    state: str  # active, online, closing

    @property
    def graphical(self) -> bool:
        return self.type in GRAPHICAL


def sessions(root: Path = SESSIONS) -> list[Session]:
    """The logged-in sessions logind knows (its state files: KEY=VALUE lines)."""
    found: list[Session] = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return found
    for entry in entries:
        try:
            fields = dict(line.split("=", 1) for line in entry.read_text().splitlines() if "=" in line)
            uid = int(fields.get("UID", ""))
        except (OSError, ValueError):
            continue
        if fields.get("STATE") == "closing":
            continue
        found.append(Session(entry.name, uid, fields.get("USER", "?"), fields.get("TYPE", ""),
                             fields.get("TTY", ""), fields.get("STATE", "")))
    return found


def to_terminals(text: str, found: list[Session], dev: Path = DEV) -> list[str]:
    """Write `text` to each session's terminal; the terminals reached. Never blocks (a
    terminal nobody reads, or one stopped with ^S, is skipped) and never becomes our
    controlling terminal."""
    reached: list[str] = []
    message = ("\r\n\a*** " + text.replace("\n", "\r\n") + " ***\r\n").encode()
    for tty in sorted({s.tty for s in found if _TTY.match(s.tty)}):
        try:
            fd = os.open(dev / tty, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                os.write(fd, message)
                reached.append(tty)
        except OSError:
            pass
        finally:
            os.close(fd)
    return reached


def tell(text: str, timeout_ms: int, found: list[Session] | None = None, dev: Path = DEV,
         run_user: Path | None = None) -> dict[str, list[str]]:
    """The notice on every logged-in terminal and, for each user with a graphical session,
    on their desktop; what was reached and what was not (for the log and status)."""
    found = sessions() if found is None else found
    reached = {"terminals": to_terminals(text, found, dev), "desktops": [], "not_reached": []}
    base = desktop.RUN_USER if run_user is None else run_user
    for uid in sorted({s.uid for s in found if s.graphical}):
        try:
            gid = os.stat(base / str(uid)).st_gid  # logind made it with the user's group: no passwd read
        except OSError as exc:
            reached["not_reached"].append(f"uid {uid}: {exc.strerror}")
            continue
        summary, _, body = text.partition(". ")
        result = desktop.notify_user(uid, gid, summary, body, timeout_ms, base)
        (reached["desktops"] if result == "ok" else reached["not_reached"]).append(
            f"uid {uid}" if result == "ok" else f"uid {uid}: {result}")
    return reached
