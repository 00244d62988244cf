"""The vocabulary shared by the pure state machine and the edges: events in, actions out.

Plain frozen dataclasses, no behaviour, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class State(StrEnum):
    ARMING = "arming"
    ARMED = "armed"
    DISARMED = "disarmed"  # for a while, asked by root or panic_group: the medium may go, panic still fires
    GRACE = "grace"  # the medium went, grace_ms is set: fires when it ends unless the medium is back
    FIRING = "firing"
    FIRED = "fired"


class Stage(StrEnum):
    """The firing path, in order. Nothing else decides the order (see machine.py)."""

    KILL = "kill"
    KEYS = "keys"  # dm-crypt volume keys wiped, right after the kill, before anything slower
    AUDIT = "audit"
    KEXEC = "kexec"
    POWEROFF = "poweroff"
    SYSRQ = "sysrq"


STAGES: tuple[Stage, ...] = tuple(Stage)

# Stages whose success means the machine is gone: nothing runs after them.
TERMINAL_STAGES: frozenset[Stage] = frozenset({Stage.KEXEC, Stage.POWEROFF, Stage.SYSRQ})


class Outcome(StrEnum):
    DONE = "done"  # acted for real
    DRY = "dry"  # dry-run: would have acted, said what it would do
    FAILED = "failed"
    TIMED_OUT = "timed_out"  # ran past its deadline (still running or returned late)
    SKIPPED = "skipped"  # nothing to do (e.g. no kexec image staged)


SUCCESS: frozenset[Outcome] = frozenset({Outcome.DONE, Outcome.DRY})


# ---- events (edges -> machine) ----


@dataclass(frozen=True)
class Armed:
    """Arming finished: these sysfs devpaths (the medium, its ancestors, the cord) are watched."""

    watched: frozenset[str]
    # disks among them whose media can go while the disk stays (optical drives, removable disks,
    # card readers): for these a `change` to no media (size 0) fires
    media_watched: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Uevent:
    """A raw kernel uevent, as the watcher saw it."""

    action: str
    devpath: str
    subsystem: str = ""
    devtype: str = ""
    # for `change` on a media-watched disk: whether it still holds media (size > 0, read from
    # sysfs by the edge); None when not read
    media_present: bool | None = None


@dataclass(frozen=True)
class MediumCheck:
    """A presence check from sysfs: at start, after ENOBUFS, after resume."""

    present: bool
    reason: str


@dataclass(frozen=True)
class Panic:
    """An authorised panic request (credentials already checked by the edge)."""

    uid: int
    pid: int


@dataclass(frozen=True)
class PanicKeys:
    """The panic key chord, held on one keyboard (keyboards.py). Fires as Panic does."""

    chord: str
    keyboard: str  # its device node and name


@dataclass(frozen=True)
class StageEnded:
    stage: Stage
    outcome: Outcome
    duration_ms: float
    detail: dict[str, object] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Disarm:
    """Stand down until `until` (the daemon's monotonic clock): removing the medium does not
    fire meanwhile. An authorised request (the edge checked credentials and the cap)."""

    until: float
    uid: int
    reason: str = ""


@dataclass(frozen=True)
class Rearm:
    """End a disarm now (`killcord arm`)."""

    uid: int


@dataclass(frozen=True)
class GraceEnded:
    """The grace period (grace_ms, timed by the edge from StartGrace) ran out."""


@dataclass(frozen=True)
class MediumBack:
    """At the end of a grace period the medium was found again by its identity (serial,
    UUID): a stick plugged back in gets new devpaths, which are watched from now on."""

    watched: frozenset[str]
    media_watched: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Tick:
    """The daemon's clock, for a disarm that runs out."""

    now: float


Event = (Armed | Uevent | MediumCheck | Panic | PanicKeys | StageEnded | Disarm | Rearm | Tick | GraceEnded
         | MediumBack)


# ---- actions (machine -> edges) ----


@dataclass(frozen=True)
class RunStage:
    stage: Stage
    deadline_ms: int


@dataclass(frozen=True)
class Finished:
    """The sequence is over. ok: a terminal stage succeeded (or would have, in dry-run)."""

    ok: bool
    last_stage: Stage


@dataclass(frozen=True)
class CheckMedium:
    """Look for the medium in sysfs now and feed back a MediumCheck (a disarm ended: fire
    if it is gone, stay armed if it is back)."""

    reason: str


@dataclass(frozen=True)
class StartGrace:
    """The medium went and grace_ms is set: tell the people at the machine, and feed
    GraceEnded after `ms`. A panic meanwhile fires at once."""

    reason: str
    ms: int


Action = RunStage | Finished | CheckMedium | StartGrace
