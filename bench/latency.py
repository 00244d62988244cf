"""Trigger latency benchmark (not a test): 200 synthetic kernel uevents on a loop device.

For each event, a fresh armed machine; the kernel emits `remove` when we write it to
the device's sysfs uevent file; we time, with one monotonic clock:
  event -> received   (netlink wake-up and the watcher's parsing)
  event -> decision   (the pure machine returns RunStage(kill))
  event -> first action (the kill stage's code starts running, in its worker thread)
Dry-run: the kill stage only enumerates. Writes JSON (default out/bench/latency.json).
Needs root (loop devices, sysfs uevent writes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from killcord import medium, resident
from killcord.config import DEFAULT_DEADLINES_MS
from killcord.events import Armed, RunStage, Stage
from killcord.fire import Firer
from killcord.kexec import Staged
from killcord.machine import Machine
from killcord.watch import Watcher


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values_ns: list[int]) -> dict[str, float]:
    ms = [v / 1e6 for v in values_ns]
    return {"p50_ms": round(pct(ms, 50), 4), "p99_ms": round(pct(ms, 99), 4),
            "max_ms": round(max(ms), 4), "mean_ms": round(statistics.fmean(ms), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("out/bench/latency.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (loop device, sysfs uevents)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(dir="/dev/shm") as state, tempfile.NamedTemporaryFile() as img:
        img.truncate(8 * 1024 * 1024)
        dev = subprocess.run(["losetup", "--find", "--show", img.name], check=True,
                             capture_output=True, text=True).stdout.strip()
        try:
            med = medium.resolve(dev, Path("/nonexistent"))
            watcher = Watcher()
            resident.lock_all()  # as the daemon does: no page faults on the path
            uevent = Path(f"/sys/class/block/{Path(dev).name}/uevent")
            staged = Staged(None, None, "", "dry", True)
            received, decided, acted = [], [], []
            for _ in range(args.events):
                m = Machine(DEFAULT_DEADLINES_MS)
                m.feed(Armed(frozenset(med.devpaths), med.media_watched))
                firer = Firer(m, staged, Path(state), live=False)
                started: list[int] = []
                real_kill = firer._stages[Stage.KILL]

                def kill_stage(deadline: float, real=real_kill, started=started):  # instrumentation only
                    started.append(time.monotonic_ns())
                    return real(deadline)

                firer._stages[Stage.KILL] = kill_stage
                t0 = time.monotonic_ns()
                uevent.write_text("remove")
                actions: list = []
                while not actions:
                    select.select([watcher.fileno()], [], [], 5)
                    events, _ = watcher.drain(med.media_watched)
                    t1 = time.monotonic_ns()
                    for ev in events:
                        actions += m.feed(ev)
                t2 = time.monotonic_ns()
                assert isinstance(actions[0], RunStage) and actions[0].stage is Stage.KILL
                firer.run(actions[0])
                received.append(t1 - t0)
                decided.append(t2 - t0)
                acted.append(started[0] - t0)
        finally:
            subprocess.run(["losetup", "--detach", dev], check=False)

    result = {
        "benchmark": "uevent trigger latency (dry-run)",
        "events": args.events,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "event_to_received": summary(received),
        "event_to_decision": summary(decided),
        "decision_only": summary([d - r for d, r in zip(decided, received)]),
        "event_to_first_action": summary(acted),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
