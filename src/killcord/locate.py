"""Where the settings file and the control socket are, without pydantic.

The client commands (panic, status, arm, disarm, recheck) need only the socket. Loading the
whole configuration (pydantic-settings) for it cost 0.75 s on our build machine, and 5 s in
an idle guest under QEMU's TCG, before root's `killcord panic` could even be sent; a typo
in the file also kept it from being sent at all. This module reads the same sources in the
same order as config.Config (KILLCORD_SOCKET, then the file's `socket`, then the default),
and gives up (None) where config.load would refuse the value, so that the caller can load
the whole configuration for its error message. The daemon and `check` still validate
everything (config.py).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/killcord/killcord.toml")
DEFAULT_SOCKET = Path("/run/killcord/control.sock")
ENV_PREFIX = "KILLCORD_"


class ConfigError(Exception):
    """A refused configuration: the message names each bad value and the fix."""


def env(name: str) -> str | None:
    """KILLCORD_<NAME>, matched without regard to case, as pydantic-settings does."""
    want = (ENV_PREFIX + name).lower()
    return next((v for k, v in os.environ.items() if k.lower() == want), None)


def config_file(path: Path | None = None) -> Path | None:
    """The settings file: `path` (--config), else KILLCORD_CONFIG, else the default one if it
    exists. An explicit file is returned whether or not it exists (config.load refuses a
    missing one); None: no file, defaults and KILLCORD_* variables only."""
    if path is None:
        named = os.environ.get("KILLCORD_CONFIG")
        path = Path(named) if named else None
    if path is not None:
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def socket(path: Path | None = None) -> Path | None:
    """The control socket as config.load would give it, or None where it would refuse the
    socket's value or could not read the file."""
    value: object = env("socket")
    if value is None:
        file = config_file(path)
        if file is None:
            return DEFAULT_SOCKET
        try:
            with open(file, "rb") as f:
                value = tomllib.load(f).get("socket", str(DEFAULT_SOCKET))
        except (OSError, ValueError):  # missing, unreadable, not TOML: config.load says which
            return None
    if not isinstance(value, str) or not value.startswith("/"):
        return None
    return Path(value)
