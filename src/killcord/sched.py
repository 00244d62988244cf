"""Real-time scheduling of one thread: who runs first when the medium goes.

Per thread, not per process (systemd's CPUSchedulingPolicy= would make every thread
real-time, the control socket's among them): only the uevent detector while armed, and the
firing thread for the kill and the keys. Needs CAP_SYS_NICE; without it the thread runs
as before, and the reason is reported.
"""

from __future__ import annotations

import os

# As the kernel's threaded interrupt handlers: below none of them, above every normal task.
PRIORITY = 50
NAMES = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR",
         os.SCHED_BATCH: "SCHED_BATCH", os.SCHED_IDLE: "SCHED_IDLE"}


def set_policy(policy: int, priority: int = 0) -> str:
    """Set the calling thread's policy (pid 0 is the calling thread on Linux): "ok", or
    why not (the caller goes on either way)."""
    try:
        os.sched_setscheduler(0, policy, os.sched_param(priority))
        return "ok"
    except OSError as exc:
        return f"refused: {exc.strerror}"


def realtime() -> str:
    return set_policy(os.SCHED_FIFO, PRIORITY)


def normal() -> str:
    return set_policy(os.SCHED_OTHER, 0)


def give(tid: int) -> None:
    """Give thread `tid` (of this process) the calling thread's policy and priority; as it
    is without CAP_SYS_NICE."""
    try:
        os.sched_setscheduler(tid, os.sched_getscheduler(0), os.sched_getparam(0))
    except OSError:
        pass


def describe(tid: int = 0) -> str:
    """The thread's policy and priority, e.g. "SCHED_FIFO 50"."""
    policy = os.sched_getscheduler(tid)
    name = NAMES.get(policy, str(policy))
    return f"{name} {os.sched_getparam(tid).sched_priority}" if policy in (os.SCHED_FIFO, os.SCHED_RR) else name
