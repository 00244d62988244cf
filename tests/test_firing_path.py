"""The firing path, in process and dry: it imports nothing, keeps its order, and a stage
that fails, raises or hangs hands over to the next one within its deadline."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from killcord import daemon, log  # noqa: F401  (what the daemon imports at start)
from killcord.config import DEFAULT_DEADLINES_MS
from killcord.events import Outcome, Panic, RunStage, Stage, State
from killcord.fire import Firer
from killcord.kexec import Staged
from killcord.machine import Machine

DRY_STAGED = Staged("/boot/vmlinuz", None, "quiet init_on_free=1 killcord.wipe=1", "dry", True)


def firer(ramdir: Path, deadlines: dict[Stage, int] | None = None) -> tuple[Machine, Firer]:
    m = Machine(deadlines or DEFAULT_DEADLINES_MS)
    return m, Firer(m, DRY_STAGED, ramdir, live=False)


def test_firing_imports_nothing(ramdir: Path) -> None:
    log.setup()
    m, f = firer(ramdir)
    before = set(sys.modules)
    finished = f.drive(m.feed(Panic(0, 1)))
    assert finished is not None and finished.ok
    assert set(sys.modules) - before == set()


def test_dry_run_stages_and_state(ramdir: Path) -> None:
    m, f = firer(ramdir)
    f.drive(m.feed(Panic(0, 1)))
    assert m.state is State.FIRED
    assert [(r.stage, r.outcome) for r in m.results] == [
        (Stage.KILL, Outcome.DRY), (Stage.KEYS, Outcome.DRY), (Stage.AUDIT, Outcome.DONE), (Stage.KEXEC, Outcome.DRY)]


def test_a_raising_stage_fails_and_the_next_runs(ramdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, f = firer(ramdir)

    def broken(deadline: float):
        raise RuntimeError("slabinfo exploded")

    monkeypatch.setitem(f._stages, Stage.AUDIT, broken)
    f.drive(m.feed(Panic(0, 1)))
    audit = m.results[2]
    assert audit.outcome is Outcome.FAILED and "slabinfo exploded" in str(audit.detail["error"])
    assert m.results[3].stage is Stage.KEXEC


def test_a_hanging_stage_times_out_at_its_deadline(ramdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deadlines = dict(DEFAULT_DEADLINES_MS, **{Stage.KEXEC: 100})
    m, f = firer(ramdir, deadlines)
    monkeypatch.setitem(f._stages, Stage.KEXEC, lambda deadline: time.sleep(30))
    ended = f.run(RunStage(Stage.KEXEC, 100))
    assert ended.outcome is Outcome.TIMED_OUT
    assert 100 <= ended.duration_ms < 30_000  # abandoned, not waited for


def test_the_kept_stage_thread_runs_each_stage_until_one_hangs(ramdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Armed, the stages run in one thread started at arm time; a stage still running at its
    deadline keeps it, and the stages after it start threads of their own."""
    deadlines = dict(DEFAULT_DEADLINES_MS, **{Stage.KEXEC: 100})
    m, f = firer(ramdir, deadlines)
    f.keep_stage_thread()
    kept = f._stage_thread
    assert kept is not None
    ran_in: dict[Stage, int] = {}

    def stage(which: Stage, outcome: Outcome, hang: float = 0.0):
        def fn(deadline: float) -> tuple[Outcome, dict[str, object]]:
            ran_in[which] = threading.get_native_id()
            time.sleep(hang)
            return outcome, {}
        return fn
    for which in (Stage.KILL, Stage.KEYS, Stage.AUDIT):
        monkeypatch.setitem(f._stages, which, stage(which, Outcome.DONE))
    monkeypatch.setitem(f._stages, Stage.KEXEC, stage(Stage.KEXEC, Outcome.DONE, hang=3.0))
    for which in (Stage.POWEROFF, Stage.SYSRQ):
        monkeypatch.setitem(f._stages, which, stage(which, Outcome.FAILED))
    f.drive(m.feed(Panic(0, 1)))
    assert [r.outcome for r in m.results][3] is Outcome.TIMED_OUT
    assert {ran_in[s] for s in (Stage.KILL, Stage.KEYS, Stage.AUDIT, Stage.KEXEC)} == {kept._thread.native_id}
    assert ran_in[Stage.POWEROFF] != kept._thread.native_id and ran_in[Stage.SYSRQ] != kept._thread.native_id
    assert f._stage_thread is None


def test_missing_slabinfo_is_logged_not_fatal(ramdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from killcord import audit

    monkeypatch.setattr(audit, "SLABINFO", Path("/proc/no-slabinfo"))
    monkeypatch.setattr(audit.read_snapshot, "__defaults__", (Path("/proc/no-slabinfo"), None))
    monkeypatch.setattr(audit.open_snapshot, "__defaults__", (Path("/proc/no-slabinfo"),))  # at arm: None
    m, f = firer(ramdir)
    f.drive(m.feed(Panic(0, 1)))
    assert m.results[2].outcome is Outcome.FAILED
    assert Path(str(m.results[2].detail["record"])).exists()  # the event record is still kept
    assert m.results[3].stage is Stage.KEXEC


def test_the_fallback_imports_nothing_and_says_what_it_would_free(ramdir: Path) -> None:
    """No kexec image: the poweroff stage is the daemon's own fallback (fallback.py). In
    dry-run it counts what it would free on the RAM file systems and frees nothing."""
    log.setup()
    secret = ramdir / "secret"
    secret.write_bytes(b"s" * 8192)
    m = Machine(DEFAULT_DEADLINES_MS)
    f = Firer(m, Staged(None, None, "", "none", False, error="no image"), ramdir, live=False)
    before = set(sys.modules)
    finished = f.drive(m.feed(Panic(0, 1)))
    assert set(sys.modules) - before == set()
    assert finished is not None and finished.ok
    poweroff = m.results[-1]
    assert (poweroff.stage, poweroff.outcome) == (Stage.POWEROFF, Outcome.DRY)
    scrubbed = poweroff.detail["scrubbed"]
    assert isinstance(scrubbed, dict) and scrubbed["files"] >= 1 and scrubbed["mounts"]
    assert secret.read_bytes() == b"s" * 8192  # dry: nothing freed
    # where the shared deadline went, step by step (dry: only the scrub's walk runs)
    steps = poweroff.detail["steps_ms"]
    assert isinstance(steps, dict) and list(steps) == ["scrub"] and steps["scrub"] >= 0


def test_nothing_is_logged_before_the_kill_and_the_keys(ramdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A console line costs milliseconds: the kill and the keys run first, then the fire
    line (saying how long after the detection it was written) and their stage lines, then
    the rest as it happens. The daemon's word to systemd comes with the fire line."""
    from killcord import fire

    logs: list[dict[str, object]] = []

    class Recorder:  # fire.py's logger, recording what it is given
        def critical(self, event: str, **kw: object) -> None:
            logs.append({"event": event, **kw})

    monkeypatch.setattr(fire, "log", Recorder())
    m, f = firer(ramdir)
    logged_at: dict[str, int] = {}  # what happened: how many log lines had gone out then
    for stage in (Stage.KILL, Stage.KEYS, Stage.AUDIT):
        real = f._stages[stage]

        def counted(deadline: float, real=real, stage=stage):  # noqa: ANN202
            logged_at[f"run {stage.value}"] = len(logs)
            return real(deadline)
        monkeypatch.setitem(f._stages, stage, counted)
    detected = time.monotonic() - 0.25
    f.drive(m.feed(Panic(0, 1)), detected, after_urgent=lambda: logged_at.setdefault("systemd", len(logs)))
    assert logged_at == {"run kill": 0, "run keys": 0, "systemd": 3, "run audit": 3}, logged_at
    assert [(e["event"], e.get("stage")) for e in logs[:3]] == [("fire", None), ("stage", "kill"), ("stage", "keys")]
    assert logs[0]["logged_after_ms"] >= 250 and logs[0]["trigger"] == m.trigger


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root (CAP_SYS_NICE)")
@pytest.mark.parametrize("kept", [True, False], ids=["kept-stage-thread", "thread-per-stage"])
def test_live_stages_up_to_the_jump_run_realtime_and_the_fallback_does_not(ramdir: Path, kept: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """In live mode the stages up to the jump run SCHED_FIFO; the fallback's (the poweroff,
    which waits for the dying and wipes what they freed, and sysrq) run as normal threads.
    Every stage is replaced by a recorder here: nothing is killed, nothing jumps; drive
    runs in a thread of its own, whose policy it changes.
    The firer is built dry (it opens no sysrq, printk or drop_caches handle) and only then
    told it is live."""
    m = Machine(DEFAULT_DEADLINES_MS)
    f = Firer(m, DRY_STAGED, ramdir, live=False)
    f.live = True
    if kept:
        f.keep_stage_thread()
    policy: dict[str, int] = {}
    for stage in Stage:
        def record(deadline: float, stage: Stage = stage) -> tuple[Outcome, dict[str, object]]:
            policy[stage.value] = os.sched_getscheduler(0)
            return (Outcome.DONE if stage in (Stage.KILL, Stage.KEYS, Stage.AUDIT) else Outcome.FAILED), {}
        monkeypatch.setitem(f._stages, stage, record)
    after: list[int] = []

    def firing() -> None:
        f.drive(m.feed(Panic(0, 1)))
        after.append(os.sched_getscheduler(0))
    t = threading.Thread(target=firing)
    t.start()
    t.join(30)
    assert policy["kill"] == policy["keys"] == policy["audit"] == policy["kexec"] == os.SCHED_FIFO, policy
    assert policy["poweroff"] == policy["sysrq"] == os.SCHED_OTHER, policy
    assert after == [os.SCHED_OTHER]


def test_before_reboot_turns_panic_on_warn_and_oops_off(ramdir: Path, tmp_path: Path) -> None:
    """Before the jump and the power-off: panic_on_warn and panic_on_oops to 0, then the
    console level. Played on files standing in for the sysctls (never the host's)."""
    m, f = firer(ramdir)
    files = [tmp_path / "panic_on_warn", tmp_path / "panic_on_oops", tmp_path / "printk"]
    fds = []
    for p in files:
        p.write_bytes(b"1")
        fds.append(os.open(p, os.O_WRONLY))
    f._panic_fds, f._printk_fd = fds[:2], fds[2]
    f.before_reboot(console_level=b"7")
    for fd in fds:
        os.close(fd)
    assert [p.read_bytes() for p in files] == [b"0", b"0", b"7"]
    assert firer(ramdir)[1]._panic_fds == []  # dry-run opens none


def test_right_before_a_jump_the_audit_records_the_snapshot_but_leaves_the_summary_out(ramdir: Path) -> None:
    """Live with an image staged, kexec comes next: the raw slabinfo snapshot is recorded and
    the parse into a summary (the audit's slowest part) is left out, and the record says so.
    Without a jump to make (dry-run here, or nothing staged) the summary is there. The firer
    is built dry and then told it is live; only its audit stage runs (it reads this host's
    /proc/slabinfo and writes in ramdir)."""
    m = Machine(DEFAULT_DEADLINES_MS)
    m.feed(Panic(0, 1))
    docs = {}
    for live, staged in ((True, DRY_STAGED), (False, DRY_STAGED),
                         (True, Staged(None, None, "", "none", False))):
        f = Firer(m, staged, ramdir, live=False)
        f.live = live
        outcome, detail = f.audit(time.monotonic() + 5)
        assert outcome is Outcome.DONE, detail
        docs[(live, staged.loaded)] = json.loads(Path(str(detail["record"])).read_text())
    jump = docs[(True, True)]
    assert jump["top"] is None and "raw snapshot" in jump["summary"]
    assert (Path(ramdir) / "records" / jump["snapshot"]).read_bytes().startswith(b"slabinfo - version:")
    assert docs[(False, True)]["top"] and docs[(True, False)]["top"]
