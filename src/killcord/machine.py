"""The pure state machine: events in, actions out. No I/O, no clock, no os.

ARMING -> ARMED -> FIRING -> FIRED, and ARMED <-> DISARMED: while disarmed (for a time set
by root or panic_group), a missing medium does not fire, a panic (the command or the key
chord) does; when the time runs out, or on `arm`, the machine asks for a fresh look at the
medium (CheckMedium) and fires if it is gone. With grace_ms, a missing medium first moves
ARMED -> GRACE (StartGrace: the edge tells the people at the machine and times it); when
GraceEnded comes, the machine asks for a look, and fires unless the medium is back (by its
identity: MediumBack). A panic never waits, a disarm ends the grace period. The firing path is the fixed stage order in
events.STAGES; a stage that fails or runs late hands over to the next one, a
terminal stage that succeeds ends the sequence, a second trigger never restarts it.
This is the one place that knows what follows what.
"""

from __future__ import annotations

from collections.abc import Mapping

from killcord.events import (
    STAGES,
    SUCCESS,
    TERMINAL_STAGES,
    Action,
    Armed,
    CheckMedium,
    Disarm,
    Event,
    Finished,
    GraceEnded,
    MediumBack,
    MediumCheck,
    Panic,
    PanicKeys,
    Rearm,
    RunStage,
    Stage,
    StageEnded,
    StartGrace,
    State,
    Tick,
    Uevent,
)


def uevent_fires(event: Uevent, watched: frozenset[str], media_watched: frozenset[str]) -> bool:
    """Does this kernel uevent mean the medium (or the cord) is gone?

    `remove` of any watched devpath (the disk, a partition of it, what it stands on, or any
    ancestor up to the USB device) fires. `change` fires only for a media-watched disk (optical
    drive, removable disk, card reader) that now holds no media: a disk's own partition re-read
    also sends `change` and must never fire.
    """
    if event.devpath not in watched:
        return False
    if event.action == "remove":
        return True
    return event.action == "change" and event.devpath in media_watched and event.media_present is False


class Machine:
    def __init__(self, deadlines_ms: Mapping[Stage, int], grace_ms: int = 0) -> None:
        missing = [s for s in STAGES if s not in deadlines_ms]
        if missing:
            raise ValueError(f"no deadline for stage(s): {', '.join(missing)}")
        self.deadlines_ms = dict(deadlines_ms)
        self.state = State.ARMING
        self.watched: frozenset[str] = frozenset()
        self.media_watched: frozenset[str] = frozenset()
        self.trigger: str | None = None  # what fired us, for status and the audit record
        self.results: list[StageEnded] = []
        self.ignored_triggers = 0  # triggers that came while firing or fired
        self.held_triggers = 0  # medium triggers that came while disarmed (none fired)
        self.disarm: Disarm | None = None  # DISARMED: the request in force (until when, who, why)
        self.grace_ms = grace_ms
        self.grace: str | None = None  # GRACE: what would have fired
        self._grace_over = False  # GRACE: GraceEnded came, the look at the medium decides
        self._current: Stage | None = None

    @property
    def disarmed_until(self) -> float | None:
        """DISARMED: until when (the daemon's monotonic clock)."""
        return None if self.disarm is None else self.disarm.until

    @property
    def current(self) -> Stage | None:
        """The stage running now (FIRING), if any."""
        return self._current

    def feed(self, event: Event) -> list[Action]:
        if isinstance(event, StageEnded):
            return self._stage_ended(event)
        if isinstance(event, Armed):
            if self.state is State.ARMING:
                self.watched, self.media_watched = event.watched, event.media_watched
                self.state = State.ARMED
            return []
        if isinstance(event, (Disarm, Rearm, Tick)):
            return self._disarm(event)
        if isinstance(event, (GraceEnded, MediumBack)) or (isinstance(event, MediumCheck) and self._grace_over):
            return self._grace_end(event)
        reason = self._trigger_reason(event)
        if reason is None:
            return []
        if self.state in (State.FIRING, State.FIRED):
            self.ignored_triggers += 1
            return []
        panic = isinstance(event, (Panic, PanicKeys))
        if self.state in (State.DISARMED, State.GRACE) and not panic:
            self.held_triggers += 1
            return []
        if self.grace_ms > 0 and not panic:
            self.state = State.GRACE
            self.grace = reason
            return [StartGrace(reason, self.grace_ms)]
        return self._fire(reason)

    def _grace_end(self, event: GraceEnded | MediumBack | MediumCheck) -> list[Action]:
        """GraceEnded: look at the medium. Then the look's answer decides: back (MediumBack,
        or a MediumCheck that finds it where it was) -> ARMED; gone -> fire. (Armed, a
        MediumBack only moves the watch: the medium came back where it was not before, as
        after a disarm that saw it moved to another port.)"""
        if self.state is State.ARMED and isinstance(event, MediumBack):
            self.watched, self.media_watched = event.watched, event.media_watched
            return []
        if self.state is not State.GRACE:
            return []
        if isinstance(event, GraceEnded):
            self._grace_over = True
            return [CheckMedium("grace ended")]
        if not self._grace_over:
            return []  # the medium coming back counts when the period ends, not before
        if isinstance(event, MediumBack):
            self.watched, self.media_watched = event.watched, event.media_watched
        if isinstance(event, MediumBack) or (isinstance(event, MediumCheck) and event.present):
            self.state = State.ARMED
            self.grace, self._grace_over = None, False
            return []
        assert self.grace is not None
        return self._fire(f"{self.grace}, gone still when the grace period ended")

    def _disarm(self, event: Disarm | Rearm | Tick) -> list[Action]:
        """Only an armed (or already disarmed) machine stands down; arming, firing or fired
        ones ignore it (the edge says so to the asker)."""
        if isinstance(event, Disarm):
            if self.state in (State.ARMED, State.DISARMED, State.GRACE):  # a disarm ends a grace period
                self.state = State.DISARMED
                self.disarm = event
                self.grace, self._grace_over = None, False
            return []
        if self.state is not State.DISARMED:
            return []
        assert self.disarm is not None
        if isinstance(event, Tick) and event.now < self.disarm.until:
            return []
        why = "disarm ended" if isinstance(event, Tick) else f"re-armed by uid {event.uid}"
        self.state = State.ARMED
        self.disarm = None
        return [CheckMedium(why)]

    def _trigger_reason(self, event: Event) -> str | None:
        if isinstance(event, Panic):
            # panic works even while arming: the user asked for it
            return f"panic uid={event.uid} pid={event.pid}"
        if isinstance(event, PanicKeys):  # likewise: someone at the keyboard asked for it
            return f"panic keys {event.chord} on {event.keyboard}"
        if isinstance(event, MediumCheck):
            return None if event.present else f"medium absent ({event.reason})"
        if isinstance(event, Uevent) and self.state is not State.ARMING:
            if uevent_fires(event, self.watched, self.media_watched):
                return f"uevent {event.action} {event.devpath}"
        return None

    def _fire(self, reason: str) -> list[Action]:
        self.state = State.FIRING
        self.disarm = None
        self.grace, self._grace_over = None, False
        self.trigger = reason
        return [self._run(STAGES[0])]

    def _run(self, stage: Stage) -> RunStage:
        self._current = stage
        return RunStage(stage, self.deadlines_ms[stage])

    def _stage_ended(self, event: StageEnded) -> list[Action]:
        if self.state is not State.FIRING or event.stage is not self._current:
            return []  # stale or foreign: a stage never runs twice, never out of order
        self.results.append(event)
        self._current = None
        if event.stage in TERMINAL_STAGES and event.outcome in SUCCESS:
            self.state = State.FIRED
            return [Finished(ok=True, last_stage=event.stage)]
        index = STAGES.index(event.stage)
        if index + 1 < len(STAGES):
            return [self._run(STAGES[index + 1])]
        self.state = State.FIRED
        return [Finished(ok=False, last_stage=event.stage)]
