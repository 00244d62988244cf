"""Settings: /etc/killcord/killcord.toml, overridden by KILLCORD_* variables.

Every value is validated here, at start: a bad one is refused with its name, the value
and what is allowed, before anything is armed (never at trigger time).
"""

from __future__ import annotations

import grp
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from killcord import chord, cmdline, locate
from killcord.control import MAX_DISARM_S
from killcord.events import STAGES, Stage
from killcord.locate import ConfigError  # noqa: F401  (re-exported: it lives where the clients import it)

DEFAULT_DEADLINES_MS: dict[Stage, int] = {
    Stage.KILL: 1000,  # a fork storm takes a few sweeps
    Stage.KEYS: 500,  # a suspend waits for in-flight I/O
    Stage.AUDIT: 500,
    Stage.KEXEC: 2000,  # reboot(2) does not return on success
    Stage.POWEROFF: 10000,  # systemd-shutdown returning into the initramfs hook
    Stage.SYSRQ: 5000,
}
MAX_DEADLINE_MS = 120_000
MAX_GRACE_MS = 300_000

_MEDIUM_FORMS = ("auto", "/dev/...", "serial:<serial>", "uuid:<uuid>", "id-path:<id-path>")
_CORD = re.compile(r"^serial:(?P<serial>[^@\s]+)@(?P<port>\d+-\d+(\.\d+)*)$")


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=locate.ENV_PREFIX, extra="forbid", frozen=True)
    _toml_path: ClassVar[Path | None] = None

    mode: Literal["dry-run", "live"] = "dry-run"
    medium: str = "auto"
    socket: Path = locate.DEFAULT_SOCKET
    state_dir: Path = Path("/run/killcord")
    panic_group: str | None = None
    kexec_kernel: str = "auto"
    kexec_initrd: str = "auto"
    kexec_append: str = ""
    kexec_lock: bool = False
    stage_deadlines_ms: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_DEADLINES_MS))
    cord: str | None = None
    disarm_max_s: int = 300  # the longest `killcord disarm --for` allowed
    grace_ms: int = 0  # a pulled medium fires after this, unless it is back (0: at once)
    panic_keys: str = ""  # a key chord that fires, e.g. "ctrl+alt+shift+k" (chord.py); "" is off
    mor: Literal["auto", "off"] = "auto"  # set the firmware's MOR bit at arm time where offered (mor.py)
    live_medium_mount: Path = Path("/run/live/medium")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_path))
        return tuple(sources)

    @field_validator("medium")
    @classmethod
    def _medium(cls, v: str) -> str:
        if v == "auto" or v.startswith("/dev/"):
            return v
        kind, sep, value = v.partition(":")
        if sep and kind in ("serial", "uuid", "id-path") and value:
            return v
        raise ValueError(f"{v!r} is not a medium; use one of {', '.join(_MEDIUM_FORMS)}")

    @field_validator("socket", "state_dir", "live_medium_mount")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"{str(v)!r} must be an absolute path")
        return v

    @field_validator("kexec_kernel", "kexec_initrd")
    @classmethod
    def _image(cls, v: str) -> str:
        if v in ("auto", "none") or v.startswith("/"):
            return v
        raise ValueError(f"{v!r} must be 'auto', 'none' or an absolute path")

    @field_validator("kexec_append")
    @classmethod
    def _append(cls, v: str) -> str:
        # cmdline.py parses it as the kernel will: quotes, "--", -/_ alike, crashkernel=.
        try:
            cmdline.check_append(v)
        except cmdline.CmdlineError as exc:
            raise ValueError(f"{exc}; {exc.fix}") from None
        return v

    @field_validator("grace_ms")
    @classmethod
    def _grace(cls, v: int) -> int:
        if not 0 <= v <= MAX_GRACE_MS:
            raise ValueError(f"{v} is not 0 (fire at once) to {MAX_GRACE_MS} ms")
        return v

    @field_validator("panic_keys")
    @classmethod
    def _panic_keys(cls, v: str) -> str:
        if not v:
            return v
        try:
            return chord.parse(v).text
        except chord.ChordError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("panic_group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            grp.getgrnam(v)
        except KeyError:
            raise ValueError(f"group {v!r} does not exist; create it or unset panic_group") from None
        return v

    @field_validator("cord")
    @classmethod
    def _cord(cls, v: str | None) -> str | None:
        if v is None or _CORD.match(v):
            return v
        raise ValueError(
            f"{v!r} is not a cord; use serial:<serial>@<usb port path>, e.g. serial:AB12CD@1-1.2 "
            "(never VID:PID alone: anyone can spoof it)"
        )

    @field_validator("disarm_max_s")
    @classmethod
    def _disarm_max(cls, v: int) -> int:
        if not 1 <= v <= MAX_DISARM_S:
            raise ValueError(f"{v} is not 1 to {MAX_DISARM_S} seconds")
        return v

    @field_validator("stage_deadlines_ms", mode="before")
    @classmethod
    def _deadlines(cls, v: Any) -> dict[str, int]:
        if not isinstance(v, dict):
            raise ValueError(f"{v!r} must be a table of stage = milliseconds")
        allowed = [s.value for s in STAGES]
        merged: dict[str, int] = {s.value: ms for s, ms in DEFAULT_DEADLINES_MS.items()}
        for name, ms in v.items():
            if name not in allowed:
                raise ValueError(f"unknown stage {name!r}; stages are {', '.join(allowed)}")
            if isinstance(ms, bool) or not isinstance(ms, int) or not 1 <= ms <= MAX_DEADLINE_MS:
                raise ValueError(f"{name} = {ms!r}: a deadline is whole milliseconds, 1 to {MAX_DEADLINE_MS}")
            merged[name] = ms
        return merged

    @model_validator(mode="after")
    def _paths_disjoint(self) -> Config:
        if self.socket.parent == self.live_medium_mount:
            raise ValueError("socket must not live on the boot medium")
        return self

    @property
    def live(self) -> bool:
        """The interlock: act for real only when mode = "live" was set explicitly."""
        return self.mode == "live"

    @property
    def deadlines(self) -> dict[Stage, int]:
        return {Stage(k): v for k, v in self.stage_deadlines_ms.items()}


def load(path: Path | None = None) -> Config:
    """Load and validate. An explicit path must exist; the default one may be absent."""
    toml_path = locate.config_file(path)
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"config file {str(toml_path)!r} does not exist or is not a file")
    Config._toml_path = toml_path
    try:
        return Config()
    except ValidationError as exc:
        raise ConfigError(_explain(exc, toml_path)) from None
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"{toml_path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(toml_path)!r}: {exc.strerror}") from None
    finally:
        Config._toml_path = None


def _explain(exc: ValidationError, toml_path: Path | None) -> str:
    where = f"{toml_path} or KILLCORD_* variables" if toml_path else "KILLCORD_* variables"
    lines = [f"invalid configuration (from {where}):"]
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "config"
        field = name.split(".")[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown setting; known settings are {', '.join(Config.model_fields)}"
        value = err.get("input")
        lines.append(f"  {name} (KILLCORD_{field.upper()}) = {value!r}: {msg}")
    return "\n".join(lines)
