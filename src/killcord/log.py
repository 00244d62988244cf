"""structlog -> JSON on stderr, structured fields in the journal, critical lines on the
kernel console (/dev/kmsg, seen even under `quiet`); sd_notify helpers."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import structlog
from systemd import daemon as sd_daemon
from systemd import journal

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_kmsg_fd: int | None = None


def _to_journal(_: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    fields = {f"KILLCORD_{k.upper()}": v if isinstance(v, str) else json.dumps(v, default=str)
              for k, v in event_dict.items() if k not in ("event", "timestamp", "level")}
    try:
        journal.send(str(event_dict.get("event")), PRIORITY=str(_PRIORITY.get(method, 6)),
                     SYSLOG_IDENTIFIER="killcord", **fields)
    except OSError:
        pass  # the journal is gone (killed with everything else): console still has it
    return event_dict


def _to_kmsg(_: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # Level 2 (crit) passes `quiet`: a person or a test on the serial console sees it.
    if _kmsg_fd is not None and method == "critical":
        rest = " ".join(f"{k}={v}" for k, v in event_dict.items() if k not in ("event", "timestamp", "level"))
        try:
            os.write(_kmsg_fd, f"<2>killcord: {event_dict.get('event')} {rest}"[:1000].encode())
        except OSError:
            pass
    return event_dict


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM=dev:inode of the stream it connected (systemd.exec(5))
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def _drop(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    raise structlog.DropEvent


def setup(kmsg: bool = False) -> None:
    """Configure once at start. kmsg: also echo critical events to the kernel console (live)."""
    global _kmsg_fd
    if kmsg and _kmsg_fd is None:
        try:
            _kmsg_fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            _kmsg_fd = None
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if os.path.exists(JOURNAL_SOCKET):
        processors.append(_to_journal)
    processors.append(_to_kmsg)
    if _stderr_is_journal() and os.path.exists(JOURNAL_SOCKET):
        # under systemd stderr is the journal too: the structured entry above is enough
        processors.append(_drop)
    processors.append(structlog.processors.JSONRenderer(default=str))
    structlog.configure(
        processors=processors,
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def notify(**fields: object) -> None:
    """sd_notify: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1. A no-op outside systemd."""
    sd_daemon.notify("\n".join(f"{k}={v}" for k, v in fields.items()))


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, in seconds, when systemd asked for pings (for our PID)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
