"""The pure state machine, exhaustively: unit cases and hypothesis properties."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from killcord import machine as machine_module
from killcord.config import DEFAULT_DEADLINES_MS
from killcord.events import (
    STAGES,
    SUCCESS,
    TERMINAL_STAGES,
    Armed,
    CheckMedium,
    Disarm,
    Finished,
    GraceEnded,
    MediumBack,
    MediumCheck,
    Outcome,
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
from killcord.machine import Machine, uevent_fires

DISK = "/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0/host0/target0:0:0/0:0:0:0/block/sda"
PART = DISK + "/sda1"
USB = "/devices/pci0000:00/0000:00:14.0/usb1/1-1"
CD = "/devices/pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sr0"
OTHER = "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host2/target2:0:0/2:0:0:0/block/sdb"
WATCHED = frozenset({PART, DISK, USB})


def armed(watched: frozenset[str] = WATCHED, media_watched: frozenset[str] = frozenset()) -> Machine:
    m = Machine(DEFAULT_DEADLINES_MS)
    assert m.feed(Armed(watched, media_watched)) == []
    assert m.state is State.ARMED
    return m


def run_all(m: Machine, actions: list, outcome_for) -> list[Stage]:
    """Answer every RunStage like the edges would; return the stages run, in order."""
    ran: list[Stage] = []
    while actions:
        action = actions.pop(0)
        if isinstance(action, Finished):
            assert not actions
            break
        ran.append(action.stage)
        actions.extend(m.feed(StageEnded(action.stage, outcome_for(action.stage), 1.0)))
    return ran


# ---- unit cases ----


def test_remove_of_disk_partition_or_usb_ancestor_fires() -> None:
    for devpath in (DISK, PART, USB):
        m = armed()
        assert m.feed(Uevent("remove", devpath, "block")) == [RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])]
        assert m.state is State.FIRING
        assert m.trigger == f"uevent remove {devpath}"


def test_unrelated_devices_and_partition_rereads_never_fire() -> None:
    m = armed()
    assert m.feed(Uevent("remove", OTHER, "block")) == []
    assert m.feed(Uevent("add", OTHER, "block")) == []
    assert m.feed(Uevent("change", DISK, "block")) == []  # partition table re-read
    assert m.feed(Uevent("change", PART, "block")) == []
    assert m.feed(Uevent("add", DISK, "block")) == []
    assert m.feed(Uevent("bind", USB, "usb")) == []
    assert m.state is State.ARMED


def test_optical_change_fires_only_when_the_disc_is_gone() -> None:
    m = armed(frozenset({CD}), frozenset({CD}))
    assert m.feed(Uevent("change", CD, "block", "disk", media_present=True)) == []
    assert m.feed(Uevent("change", CD, "block", "disk", media_present=None)) == []
    assert m.feed(Uevent("change", CD, "block", "disk", media_present=False))[0].stage is Stage.KILL


def test_removable_disk_change_to_no_media_fires() -> None:
    """An SD card out of a USB reader: the disk stays, its size becomes 0 (a `change`, no `remove`)."""
    m = armed(WATCHED, media_watched=frozenset({DISK}))
    assert m.media_watched == frozenset({DISK})
    assert m.feed(Uevent("change", DISK, "block", "disk", media_present=True)) == []
    assert m.feed(Uevent("change", PART, "block", "partition", media_present=None)) == []  # re-read
    assert m.feed(Uevent("change", DISK, "block", "disk", media_present=False))[0].stage is Stage.KILL
    assert m.trigger == f"uevent change {DISK}"
    # no media on a disk that is not media-watched (a partition, a fixed disk, not ours): no fire
    m = armed(WATCHED, media_watched=frozenset({DISK}))
    assert m.feed(Uevent("change", PART, "block", "partition", media_present=False)) == []
    assert m.feed(Uevent("change", OTHER, "block", "disk", media_present=False)) == []
    assert armed(WATCHED).feed(Uevent("change", DISK, "block", "disk", media_present=False)) == []
    assert m.state is State.ARMED


def test_uevents_while_arming_are_ignored_but_panic_and_absence_fire() -> None:
    m = Machine(DEFAULT_DEADLINES_MS)
    assert m.feed(Uevent("remove", DISK)) == []
    assert m.state is State.ARMING
    assert m.feed(Panic(0, 1))[0].stage is Stage.KILL
    m = Machine(DEFAULT_DEADLINES_MS)
    assert m.feed(MediumCheck(False, "start"))[0].stage is Stage.KILL


def test_medium_present_check_does_not_fire() -> None:
    m = armed()
    assert m.feed(MediumCheck(True, "enobufs")) == []
    assert m.feed(MediumCheck(False, "enobufs")) != []
    assert m.trigger == "medium absent (enobufs)"


def test_dry_run_sequence_ends_at_kexec() -> None:
    m = armed()
    ran = run_all(m, m.feed(Panic(0, 42)), lambda s: Outcome.DRY)
    assert ran == [Stage.KILL, Stage.KEYS, Stage.AUDIT, Stage.KEXEC]
    assert m.state is State.FIRED


def test_failed_or_late_stages_hand_over_to_the_next() -> None:
    m = armed()
    outcomes = {Stage.KILL: Outcome.TIMED_OUT, Stage.KEYS: Outcome.FAILED, Stage.AUDIT: Outcome.FAILED,
                Stage.KEXEC: Outcome.FAILED,
                Stage.POWEROFF: Outcome.TIMED_OUT, Stage.SYSRQ: Outcome.DONE}
    actions = m.feed(Uevent("remove", DISK))
    ran = run_all(m, actions, outcomes.__getitem__)
    assert ran == list(STAGES)
    assert m.results[-1].stage is Stage.SYSRQ


def test_everything_failing_still_finishes_not_ok() -> None:
    m = armed()
    actions = m.feed(Panic(0, 1))
    seen: list = []
    while actions:
        a = actions.pop(0)
        seen.append(a)
        if isinstance(a, RunStage):
            actions += m.feed(StageEnded(a.stage, Outcome.FAILED, 0.1))
    assert seen[-1] == Finished(ok=False, last_stage=Stage.SYSRQ)


def test_second_trigger_never_restarts() -> None:
    m = armed()
    first = m.feed(Uevent("remove", DISK))
    assert first[0].stage is Stage.KILL
    assert m.feed(Panic(0, 1)) == []
    assert m.feed(Uevent("remove", USB)) == []
    assert m.feed(MediumCheck(False, "again")) == []
    assert m.ignored_triggers == 3
    assert m.trigger == f"uevent remove {DISK}"


def test_stale_and_foreign_stage_results_are_ignored() -> None:
    m = armed()
    m.feed(Panic(0, 1))
    assert m.feed(StageEnded(Stage.KEXEC, Outcome.DONE, 1.0)) == []  # not running: ignored
    assert m.state is State.FIRING
    nxt = m.feed(StageEnded(Stage.KILL, Outcome.DONE, 1.0))
    assert nxt == [RunStage(Stage.KEYS, DEFAULT_DEADLINES_MS[Stage.KEYS])]  # keys first, then the audit
    assert m.feed(StageEnded(Stage.KILL, Outcome.DONE, 1.0)) == []  # a stage never runs twice


def test_results_before_firing_do_nothing() -> None:
    m = armed()
    assert m.feed(StageEnded(Stage.KILL, Outcome.DONE, 1.0)) == []
    assert m.state is State.ARMED and m.results == []


def test_deadlines_are_required_for_every_stage() -> None:
    with pytest.raises(ValueError, match="sysrq"):
        Machine({s: 1 for s in STAGES if s is not Stage.SYSRQ})


def test_machine_module_does_no_io() -> None:
    tree = ast.parse(Path(machine_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "collections.abc", "killcord.events"}


def test_uevent_fires_is_exact_on_devpaths() -> None:
    # a prefix of a watched devpath (e.g. sda vs sda1, sdb vs sdb1) is not the device
    assert not uevent_fires(Uevent("remove", DISK + "1"), WATCHED, frozenset())
    assert not uevent_fires(Uevent("remove", USB + ".2"), WATCHED, frozenset())


# ---- properties ----

devpaths = st.sampled_from([DISK, PART, USB, CD, OTHER, "/devices/virtual/block/loop7"])
uevents = st.builds(Uevent, st.sampled_from(["add", "remove", "change", "bind", "unbind", "move"]), devpaths,
                    st.just("block"), st.just("disk"), st.sampled_from([None, True, False]))
external = st.one_of(
    uevents,
    st.builds(Panic, st.integers(0, 2000), st.integers(1, 2**22)),
    st.builds(PanicKeys, st.just("ctrl+alt+shift+k"), st.sampled_from(["/dev/input/event2 (AT kbd)", "/dev/input/event9"])),
    st.builds(MediumCheck, st.booleans(), st.sampled_from(["start", "enobufs", "resume"])),
    st.builds(Armed, st.frozensets(devpaths, max_size=4), st.frozensets(devpaths, max_size=2)),
    st.builds(StageEnded, st.sampled_from(STAGES), st.sampled_from(list(Outcome)), st.floats(0, 1e4)),
    st.builds(Disarm, st.floats(0, 100), st.integers(0, 2000), st.sampled_from(["", "moving the stick"])),
    st.builds(Rearm, st.integers(0, 2000)),
    st.builds(Tick, st.floats(0, 100)),
    st.just(GraceEnded()),
    st.builds(MediumBack, st.frozensets(devpaths, min_size=1, max_size=3)),
)
outcome_lists = st.lists(st.sampled_from(list(Outcome)), min_size=len(STAGES), max_size=len(STAGES))


@settings(max_examples=500)
@given(st.lists(external, max_size=30), outcome_lists, st.lists(external, max_size=10))
def test_every_triggered_sequence_finishes_in_order_with_the_kill_first(
        before: list, outcomes: list[Outcome], during: list) -> None:
    m = Machine(DEFAULT_DEADLINES_MS)
    actions: list = []
    for ev in before:
        got = m.feed(ev)
        if got and isinstance(got[0], CheckMedium):  # a disarm ended: a look, not a trigger
            assert got == [CheckMedium(got[0].reason)] and m.state is State.ARMED
        elif m.state in (State.ARMING, State.ARMED, State.DISARMED):
            assert got == []  # nothing happens before a trigger
        elif got:
            actions = got
            break
    if not actions:
        actions = m.feed(Panic(0, 1))
    assert actions == [RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])]  # no path skips the kill
    ran: list[Stage] = []
    finished: list[Finished] = []
    noise = iter(during)
    while actions:
        a = actions.pop(0)
        if isinstance(a, Finished):
            finished.append(a)
            continue
        assert a.stage not in ran  # no stage runs twice
        ran.append(a.stage)
        # random other events arrive while a stage runs: none may change the course
        for ev in [next(noise, None)]:
            if ev is not None and not isinstance(ev, StageEnded):
                assert m.feed(ev) == []
        actions += m.feed(StageEnded(a.stage, outcomes[STAGES.index(a.stage)], 1.0))
    assert len(finished) == 1 and m.state is State.FIRED
    assert ran == list(STAGES[: len(ran)])  # in order, a prefix of the path
    last = ran[-1]
    expect_ok = last in TERMINAL_STAGES and outcomes[STAGES.index(last)] in SUCCESS
    assert finished[0] == Finished(ok=expect_ok, last_stage=last)
    # the sequence stopped at the first successful terminal stage, or ran them all
    for s in ran[:-1]:
        assert not (s in TERMINAL_STAGES and outcomes[STAGES.index(s)] in SUCCESS)
    if not expect_ok:
        assert ran == list(STAGES)
    # after the end nothing ever happens again
    for ev in during:
        assert m.feed(ev) == []


class MachineModel(RuleBasedStateMachine):
    """Arbitrary interleavings of external events and stage results."""

    grace_ms = 0

    def __init__(self) -> None:
        super().__init__()
        self.m = Machine(DEFAULT_DEADLINES_MS, self.grace_ms)
        self.pending: RunStage | None = None
        self.graces = 0
        self.ran: list[Stage] = []
        self.finished = 0

    def _take(self, actions: list) -> None:
        assert len(actions) <= 1
        for a in actions:
            if isinstance(a, CheckMedium):  # when a disarm ends (back to armed) or a grace period does
                assert self.pending is None and self.m.state in (State.ARMED, State.GRACE)
            elif isinstance(a, StartGrace):
                assert self.grace_ms and a.ms == self.grace_ms and self.m.state is State.GRACE
                self.graces += 1
            elif isinstance(a, Finished):
                self.finished += 1
                self.pending = None
            else:
                assert self.pending is None
                self.pending = a
                self.ran.append(a.stage)

    @rule(ev=external)
    def event(self, ev) -> None:
        actions = self.m.feed(ev)
        if isinstance(ev, StageEnded) and self.pending is not None and ev.stage is self.pending.stage:
            self.pending = None  # the running stage's own result, delivered as a random event
        else:
            assert actions == [] or self.pending is None
        self._take(actions)

    @precondition(lambda self: self.pending is not None)
    @rule(outcome=st.sampled_from(list(Outcome)))
    def stage_ends(self, outcome: Outcome) -> None:
        assert self.pending is not None
        stage = self.pending.stage
        self.pending = None
        self._take(self.m.feed(StageEnded(stage, outcome, 1.0)))

    @invariant()
    def consistent(self) -> None:
        assert len(self.ran) == len(set(self.ran))
        assert self.ran == list(STAGES[: len(self.ran)])
        assert self.finished <= 1
        assert (self.m.state is State.FIRED) == (self.finished == 1)
        if self.m.state is State.FIRING:
            assert self.pending is not None
        assert (self.m.state is State.DISARMED) == (self.m.disarmed_until is not None)
        if self.ran:
            assert self.ran[0] is Stage.KILL and self.m.trigger is not None
        assert (self.m.state is State.GRACE) == (self.m.grace is not None)
        if not self.grace_ms:
            assert self.graces == 0 and self.m.state is not State.GRACE


TestMachineModel = MachineModel.TestCase
TestMachineModel.settings = settings(max_examples=300, stateful_step_count=40)


class GraceModel(MachineModel):
    """The same, with a grace period: the same invariants hold, and a medium trigger
    fires only through one (checked by test_grace_* below for the exact course)."""

    grace_ms = 1500


TestGraceModel = GraceModel.TestCase
TestGraceModel.settings = settings(max_examples=300, stateful_step_count=40)


# ---- grace: a notice first, then fire unless the medium is back ----

NEW_DISK = "/devices/pci0000:00/0000:00:14.0/usb2/2-2/2-2:1.0/host7/target7:0:0/7:0:0:0/block/sdc"


def graced() -> Machine:
    m = Machine(DEFAULT_DEADLINES_MS, grace_ms=1500)
    m.feed(Armed(WATCHED))
    return m


def test_grace_a_removal_starts_it_and_fires_when_it_ends_with_the_medium_gone() -> None:
    m = graced()
    assert m.feed(Uevent("remove", DISK)) == [StartGrace(f"uevent remove {DISK}", 1500)]
    assert m.state is State.GRACE
    assert m.feed(Uevent("remove", USB)) == [] and m.held_triggers == 1  # one period, not two
    assert m.feed(MediumCheck(True, "enobufs")) == [] and m.state is State.GRACE  # decided at the end only
    assert m.feed(GraceEnded()) == [CheckMedium("grace ended")]
    assert m.feed(MediumCheck(False, "grace ended: sda gone")) == [RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])]
    assert m.trigger == f"uevent remove {DISK}, gone still when the grace period ended"


def test_grace_the_medium_back_in_time_stays_armed_and_is_watched_where_it_is_now() -> None:
    m = graced()
    m.feed(Uevent("remove", DISK))
    assert m.feed(MediumBack(frozenset({NEW_DISK}))) == []  # before the end: not yet
    m.feed(GraceEnded())
    assert m.feed(MediumBack(frozenset({NEW_DISK}))) == [] and m.state is State.ARMED
    assert m.feed(Uevent("remove", DISK)) == []  # the old devpaths are gone for good
    assert m.feed(Uevent("remove", NEW_DISK)) == [StartGrace(f"uevent remove {NEW_DISK}", 1500)]
    m.feed(GraceEnded())
    assert m.feed(MediumCheck(True, "grace ended")) == [] and m.state is State.ARMED  # same devpaths, back


def test_after_a_disarm_the_medium_back_elsewhere_moves_the_watch() -> None:
    m = armed()
    m.feed(Disarm(10.0, 0, "moving the stick to another port"))
    assert m.feed(Tick(10.0)) == [CheckMedium("disarm ended")]
    assert m.feed(MediumBack(frozenset({NEW_DISK}))) == [] and m.state is State.ARMED
    assert m.feed(Uevent("remove", DISK)) == []  # where it was: not watched any more
    assert m.feed(Uevent("remove", NEW_DISK)) == [RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])]


def test_grace_a_panic_never_waits_and_a_disarm_ends_the_period() -> None:
    m = graced()
    m.feed(Uevent("remove", DISK))
    assert m.feed(PanicKeys("ctrl+alt+shift+k", "kbd")) == [RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])]
    m = graced()
    assert m.feed(Panic(0, 1))[0] == RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])  # no grace for it
    m = graced()
    m.feed(Uevent("remove", DISK))
    assert m.feed(Disarm(60.0, 0, "pulled it on purpose")) == [] and m.state is State.DISARMED
    assert m.feed(GraceEnded()) == [] and m.state is State.DISARMED  # the edge's timer, late: nothing
    assert m.feed(Tick(61.0)) == [CheckMedium("disarm ended")]
    assert m.feed(MediumCheck(False, "disarm ended")) == [StartGrace("medium absent (disarm ended)", 1500)]


# ---- disarm: a while without the cord, never without panic ----

held = st.one_of(
    st.builds(Uevent, st.sampled_from(["remove", "change"]), st.sampled_from([DISK, PART, USB]),
              st.just("block"), st.just("disk"), st.just(False)),
    st.builds(MediumCheck, st.just(False), st.sampled_from(["enobufs", "uevent backlog", "resume"])),
    st.builds(Tick, st.floats(0, 9.999)),
    st.builds(Disarm, st.floats(0, 9.999), st.integers(0, 2000)),  # a new disarm replaces the time
)


@settings(max_examples=300)
@given(st.lists(held, max_size=30), st.booleans())
def test_disarmed_nothing_but_panic_fires_then_a_missing_medium_does(events: list, medium_back: bool) -> None:
    m = armed()
    assert m.feed(Disarm(10.0, 0, "moving the stick")) == [] and m.state is State.DISARMED
    for ev in events:
        assert m.feed(ev) == []
        assert m.state is State.DISARMED
        if isinstance(ev, Disarm):
            assert m.feed(Disarm(10.0, 0)) == []  # back to the test's end time
    # what would have fired when armed (a disk's `change` never does unless media-watched)
    assert m.held_triggers == sum(isinstance(e, MediumCheck) or (isinstance(e, Uevent) and e.action == "remove")
                                  for e in events)
    assert m.feed(Tick(10.0)) == [CheckMedium("disarm ended")] and m.state is State.ARMED
    got = m.feed(MediumCheck(medium_back, "disarm ended"))
    assert got == ([] if medium_back else [RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])])


def test_a_panic_fires_while_disarmed() -> None:
    m = armed()
    m.feed(Disarm(10.0, 1000, "x"))
    assert m.feed(Panic(0, 1)) == [RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])]
    assert m.state is State.FIRING and m.disarmed_until is None
    assert m.feed(Tick(11.0)) == [] and m.feed(Rearm(0)) == []  # the sequence goes on


def test_the_panic_keys_fire_as_a_panic_does_while_arming_armed_or_disarmed() -> None:
    keys = PanicKeys("ctrl+alt+shift+k", "/dev/input/event3 (QEMU USB Keyboard)")
    m = Machine(DEFAULT_DEADLINES_MS)
    assert m.feed(keys) == [RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])]
    assert m.trigger == "panic keys ctrl+alt+shift+k on /dev/input/event3 (QEMU USB Keyboard)"
    m = armed()
    m.feed(Disarm(10.0, 1000, "moving the stick"))
    assert m.feed(keys) == [RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])]
    assert m.held_triggers == 0 and m.feed(keys) == [] and m.ignored_triggers == 1


def test_arm_ends_a_disarm_early_and_looks_at_the_medium() -> None:
    m = armed()
    assert m.feed(Rearm(0)) == []  # not disarmed: nothing to end
    m.feed(Disarm(10.0, 0))
    assert m.feed(Rearm(1000)) == [CheckMedium("re-armed by uid 1000")] and m.state is State.ARMED
    assert m.feed(Uevent("remove", DISK))[0] == RunStage(Stage.KILL, DEFAULT_DEADLINES_MS[Stage.KILL])


def test_only_an_armed_machine_disarms() -> None:
    m = Machine(DEFAULT_DEADLINES_MS)
    assert m.feed(Disarm(10.0, 0)) == [] and m.state is State.ARMING
    m = armed()
    m.feed(Panic(0, 1))
    assert m.feed(Disarm(10.0, 0)) == [] and m.state is State.FIRING
