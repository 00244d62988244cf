"""The QEMU harness's own rule for a TCG artefact (tests/vm/qemu.py): a guest whose running
kernel (the one killcord jumped to, or the first) died of QEMU's text-patching race is rerun
once, anything else fails.
The console lines are CI's own (b72e122, scenario a on trixie), shortened."""
from __future__ import annotations

from vm.qemu import tcg_crash

BEFORE = [
    "[   41.2] killcord: kexec into the wipe target",
    "[   41.3] kexec_core: Starting new kernel",
    "[    0.000000] Linux version 6.12.57+deb13-amd64",
]
INT3 = [
    "[    5.969720] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI",
    "[    5.969578] RIP: 0010:sched_clock_cpu+0x9/0x1d0",
    "[    5.969894] Kernel panic - not syncing: Fatal exception in interrupt",
]


def test_an_int3_oops_then_a_panic_after_the_jump_is_the_tcg_race() -> None:
    crash = tcg_crash(BEFORE + INT3)
    assert crash is not None and "Oops: int3" in crash and "Fatal exception" in crash
    assert crash.startswith("the kernel killcord jumped to: ")


def test_any_other_crash_of_the_target_is_a_failure() -> None:
    no_root = ["[    6.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"]
    bug = ["[    6.1] Oops: general protection fault, probably for non-canonical address",
           "[    6.2] Kernel panic - not syncing: Fatal exception"]
    assert tcg_crash(BEFORE + no_root) is None
    assert tcg_crash(BEFORE + bug) is None


def test_an_oops_that_did_not_panic_or_came_before_the_jump_does_not_count() -> None:
    assert tcg_crash(BEFORE + INT3[:2]) is None  # the kernel lived on
    assert tcg_crash(INT3 + BEFORE) is None  # the first kernel's, and the target booted on


def test_the_first_kernel_dying_of_the_race_counts_where_there_was_no_jump() -> None:
    """CI's agent-less fallback guest (test_sanitizing_path.py, trixie): its first kernel
    died so at 5.3 s, and the test waited 400 s for a line that could not come."""
    first = ["[    0.000000] Linux version 6.12.118+deb13-amd64", *INT3]
    crash = tcg_crash(first)
    assert crash is not None and "Oops: int3" in crash and crash.startswith("the guest's first kernel: ")
    no_root = ["[    6.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"]
    assert tcg_crash(first[:1] + no_root) is None
