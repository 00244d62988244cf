"""The firing path's edges: each stage acts (live) or says what it would do (dry-run),
under a deadline. A stage never raises past this module: it ends as an outcome, and the
machine decides what runs next.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import structlog

from killcord import audit, dm, fallback, kexec, keyring, kill, sched
from killcord.events import Action, Finished, Outcome, RunStage, Stage, StageEnded
from killcord.machine import Machine

StageFn = Callable[[float], tuple[Outcome, dict[str, object]]]

SYSRQ_TRIGGER = "/proc/sysrq-trigger"
PRINTK = "/proc/sys/kernel/printk"
# Set to 0 before the jump and the power-off: with either at 1, a driver's WARN or oops in
# the device shutdown of reboot(2) panics the kernel, which may hang there with RAM intact
# (Kicksecure's emerg-shutdown does the same).
PANIC_SYSCTLS = ("/proc/sys/kernel/panic_on_warn", "/proc/sys/kernel/panic_on_oops")
GRACE_S = 0.05  # a stage that returns this late after its deadline still counts as returned
# The poweroff stage stops wiping this long before its deadline, to leave time for the
# reboot(2) call itself (device shutdown) to end the machine before sysrq is tried.
POWEROFF_MARGIN_S = 1.0
# Under mlockall(MCL_FUTURE) a thread's whole stack is faulted in and locked when it starts:
# 8 MiB by default, milliseconds of zeroing per stage. The stages need little stack.
STAGE_STACK = 512 * 1024
threading.stack_size(STAGE_STACK)

log = structlog.get_logger("killcord.fire")

# Stages that run before anything is logged (see Firer.drive): what takes secrets away.
URGENT = frozenset({Stage.KILL, Stage.KEYS})
# Stages that run SCHED_FIFO (the stage threads inherit it from the firing thread): the
# processes just killed exit on every CPU, and under that load a normal thread waited tens
# of ms for its turn (scenario o). Up to the jump, which the dying need not see: the kexec
# target clears what they hold. The poweroff fallback waits for their exits and wipes what
# they freed: it and sysrq run as normal threads, so as not to starve them. The firing
# thread is the daemon's detector, real-time already while armed (daemon.detect), or the
# control thread for a panic: it takes it here.
REALTIME = frozenset({Stage.KILL, Stage.KEYS, Stage.AUDIT, Stage.KEXEC})


class StageThread:
    """A stage thread started at arm time and kept for the firing path. Starting one at
    fire time cost 10 to 14 ms a stage under emulation (the interpreter's thread state, the
    stack faulted in and locked under mlockall): most of what the kill and the keys took.
    The firing thread's scheduling goes with each stage (kill and keys SCHED_FIFO)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="stage", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            job, done = self._jobs.get()
            job()  # never raises: Firer.run's target catches everything
            done.set()

    def submit(self, job: Callable[[], None]) -> threading.Event:
        """Run `job` there; the event is set when it returned."""
        tid = self._thread.native_id
        assert tid is not None  # started in __init__
        sched.give(tid)
        done = threading.Event()
        self._jobs.put((job, done))
        return done


class Firer:
    def __init__(self, machine: Machine, staged: kexec.Staged, state_dir: Path, live: bool) -> None:
        self.machine = machine
        self.staged = staged
        self.state_dir = state_dir
        self.live = live
        # Opened now: at fire time nothing is looked up that could fail.
        self._sysrq_fd = _open_or_none(SYSRQ_TRIGGER) if live else None
        self._printk_fd = _open_or_none(PRINTK) if live else None
        self._panic_fds = [fd for fd in map(_open_or_none, PANIC_SYSCTLS) if fd is not None] if live else []
        self._fallback = fallback.Handles.open(live)
        self._slabinfo_fd = audit.open_snapshot()
        self._keys_fd = keyring.open_list()
        self._stage_thread: StageThread | None = None  # see keep_stage_thread
        self._kill_began = 0  # boot_ticks() when the kill stage began
        self._kill_waited = True  # whether it waited for its targets' exits
        self._stages: dict[Stage, StageFn] = {
            Stage.KILL: self.kill,
            Stage.KEYS: self.keys,
            Stage.AUDIT: self.audit,
            Stage.KEXEC: self.kexec,
            Stage.POWEROFF: self.poweroff,
            Stage.SYSRQ: self.sysrq,
        }

    def keep_stage_thread(self) -> None:
        """At arm time: start the thread the stages will run in (without it, each stage
        starts one of its own when it runs)."""
        self._stage_thread = StageThread()

    # ---- running under a deadline ----

    def run(self, action: RunStage) -> StageEnded:
        fn = self._stages[action.stage]
        box: list[tuple[Outcome, dict[str, object]]] = []
        start = time.monotonic()
        deadline = start + action.deadline_ms / 1000

        def target() -> None:
            try:
                box.append(fn(deadline))
            except Exception as exc:  # a stage must never stop the sequence
                box.append((Outcome.FAILED, {"error": f"{type(exc).__name__}: {exc}"}))

        kept = self._stage_thread
        if kept is not None:
            if not kept.submit(target).wait(max(0.0, deadline - time.monotonic()) + GRACE_S):
                self._stage_thread = None  # still busy with this stage: the next ones start their own
        else:
            worker = threading.Thread(target=target, name=f"stage-{action.stage}", daemon=True)
            worker.start()
            worker.join(max(0.0, deadline - time.monotonic()) + GRACE_S)
        duration_ms = (time.monotonic() - start) * 1000
        outcome, detail = box[0] if box else (Outcome.TIMED_OUT, {"error": "still running at its deadline"})
        return StageEnded(action.stage, outcome, round(duration_ms, 3), detail)

    def drive(self, actions: list[Action], detected: float | None = None,
              after_urgent: Callable[[], None] | None = None) -> Finished | None:
        """Run what the machine asks, feed back each outcome, until it says Finished.

        Nothing is logged before the URGENT stages (kill, keys) have run: a console line
        costs milliseconds (more under emulation), the journal a round trip. Then the
        `fire` line (with how long after the detection at `detected`, a time.monotonic()
        value, it was written), their stage lines, and `after_urgent` (the daemon tells
        systemd) go out, before the slower stages."""
        detected = time.monotonic() if detected is None else detected
        held: list[StageEnded] | None = []
        realtime = sched.realtime() if self.live else "dry-run"
        normal = not self.live  # whether this thread is back to SCHED_OTHER (or never left it)

        def flush() -> None:
            nonlocal held
            if held is None:
                return
            log.critical("fire", trigger=self.machine.trigger, realtime=realtime,
                         logged_after_ms=round((time.monotonic() - detected) * 1000, 3))
            for ended in held:
                _log_stage(ended)
            held = None
            if after_urgent is not None:
                after_urgent()

        while actions:
            action = actions.pop(0)
            if isinstance(action, Finished) or action.stage not in URGENT:
                flush()
            if not normal and (isinstance(action, Finished) or action.stage not in REALTIME):
                sched.normal()
                normal = True
            if isinstance(action, Finished):
                log.critical("finished", ok=action.ok, last_stage=action.last_stage.value)
                return action
            ended = self.run(action)
            if held is not None:
                held.append(ended)
            else:
                _log_stage(ended)
            actions.extend(self.machine.feed(ended))
        flush()
        if not normal:
            sched.normal()
        return None

    # ---- the stages ----

    def kill(self, deadline: float) -> tuple[Outcome, dict[str, object]]:
        # With an image staged, the kexec target clears what the dying still hold: signal
        # everyone and go on without waiting for their exits. If the jump fails, the
        # poweroff stage waits for them first (kill.finish).
        self._kill_began = kill.boot_ticks()
        self._kill_waited = not (self.live and self.staged.loaded)
        report = kill.kill_all(deadline, self.live, wait=self._kill_waited, began=self._kill_began)
        return report.outcome, report.as_dict()

    def keys(self, deadline: float) -> tuple[Outcome, dict[str, object]]:
        # Keys first: nothing on the way to the jump is slower than this, and a volume key is
        # what a cold-boot attacker wants most. From this process, through ioctls and
        # keyctl(2): no exec.
        if not self.live:
            found = keyring.drop_cryptsetup_keys(self._keys_fd, live=False)
            return Outcome.DRY, {"would": "suspend each dm-crypt mapping (no flush) and send it 'key wipe'; "
                                          "invalidate cryptsetup's keys in the kernel keyring",
                                 "keyring": list(found.found)}
        wiped = dm.wipe_crypt_keys(self._fallback.dm_control, deadline - time.monotonic())
        dropped = keyring.drop_cryptsetup_keys(self._keys_fd, live=True)
        detail: dict[str, object] = {"wiped": [asdict(w) for w in wiped], "keyring": asdict(dropped)}
        if not wiped and not dropped.found:
            detail["reason"] = "no dm-crypt mapping" if self._fallback.dm_control is not None else "no device-mapper"
            return Outcome.SKIPPED, detail
        ok = all(w.ok for w in wiped) and not dropped.errors
        return (Outcome.DONE if ok else Outcome.FAILED), detail

    def audit(self, deadline: float) -> tuple[Outcome, dict[str, object]]:
        meta: dict[str, object] = {
            "trigger": self.machine.trigger,
            "mode": "live" if self.live else "dry-run",
            "stages": [{"name": r.stage.value, "outcome": r.outcome.value, "duration_ms": r.duration_ms}
                       for r in self.machine.results],
        }
        try:
            snapshot = audit.read_snapshot(fd=self._slabinfo_fd)
        except OSError as exc:
            # absent (no CONFIG_SLUB_DEBUG) or unreadable: the event record is still kept
            meta["slabinfo_error"] = f"{exc.strerror or exc}"
            path = audit.record(self.state_dir, b"", meta)
            return Outcome.FAILED, {"error": meta["slabinfo_error"], "record": str(path)}
        # The kexec stage comes next: the slab summary would only delay the jump
        path = audit.record(self.state_dir, snapshot, meta, summarize=not (self.live and self.staged.loaded))
        return Outcome.DONE, {"record": str(path), "slabinfo_bytes": len(snapshot)}

    def kexec(self, deadline: float) -> tuple[Outcome, dict[str, object]]:
        if self.live and self.staged.loaded:
            self.before_reboot(console_level=b"7")  # under `quiet`: "kexec_core: Starting new kernel" shows
            log.critical("kexec", kernel=self.staged.kernel)  # the last word before the jump
        return kexec.execute(self.staged, self.live)

    def poweroff(self, deadline: float) -> tuple[Outcome, dict[str, object]]:
        # The wipe claims only what is free: the processes the kill stage did not wait for
        # must be gone first (bounded by the kill stage's own deadline).
        reaped = None
        if not self._kill_waited:
            wait_s = self.machine.deadlines_ms[Stage.KILL] / 1000
            reaped = kill.finish(min(deadline - POWEROFF_MARGIN_S, time.monotonic() + wait_s),
                                 self.live, self._kill_began).as_dict()
        if self.live:
            # Only crit and worse on the console from now on: services PID 1 restarts from
            # the missing medium flood it with errors (SQUASHFS: EIO), and a console that
            # falls behind drops messages, our last line among them (seen in scenario g).
            self.before_reboot(console_level=b"3")
        # Frees, wipes and powers off from this process, which is already in RAM: see
        # fallback.py for why PID 1's systemd-shutdown is not trusted with it.
        wiped, detail = fallback.run(self._fallback, deadline - POWEROFF_MARGIN_S, self.live)
        if reaped is not None:
            detail["reaped"] = reaped
        if not self.live:
            return Outcome.DRY, detail
        scrubbed = detail["scrubbed"]
        assert isinstance(scrubbed, dict)
        # the last word before the machine goes: what was freed and wiped, on the console
        log.critical("poweroff", wiped_ok=wiped, files_freed=scrubbed["files"],
                     mounts=len(scrubbed["mounts"]), caches=detail.get("drop_caches_error") or "dropped",
                     wiped=detail.get("wiped"), dm=detail.get("dm"),
                     reaped=detail.get("reaped"), steps_ms=detail.get("steps_ms"))
        detail["error"] = fallback.power_off()
        return Outcome.FAILED, detail

    def before_reboot(self, console_level: bytes) -> None:
        """Ahead of reboot(2): no panic on a WARN or an oops in the shutdown path, and the
        console level (through descriptors opened at arm time)."""
        for fd in self._panic_fds:
            _write(fd, b"0")
        if self._printk_fd is not None:
            _write(self._printk_fd, console_level)

    def sysrq(self, deadline: float) -> tuple[Outcome, dict[str, object]]:
        if not self.live:
            return Outcome.DRY, {"would": f"write 'o' to {SYSRQ_TRIGGER}"}
        if self._sysrq_fd is None:
            return Outcome.FAILED, {"error": f"{SYSRQ_TRIGGER} could not be opened at arm time"}
        os.write(self._sysrq_fd, b"o")
        return _wait_until(deadline, "sysrq o written")


def _log_stage(ended: StageEnded) -> None:
    log.critical("stage", stage=ended.stage.value, outcome=ended.outcome.value,
                 duration_ms=ended.duration_ms, detail=ended.detail)


def _wait_until(deadline: float, what: str) -> tuple[Outcome, dict[str, object]]:
    # Still here at the deadline: the machine did not go down; the next stage runs.
    time.sleep(max(0.0, deadline - time.monotonic()))
    return Outcome.TIMED_OUT, {"error": f"{what}, still running at the deadline"}


def _open_or_none(path: str) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _write(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass
