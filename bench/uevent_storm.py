"""Remove latency in a uevent storm, with and without the watcher's kernel filter (not a test).

Two loop devices: B gets `change` uevents as fast as a separate process can write them;
meanwhile, for each trial, we write `remove` to A's sysfs uevent file and time, with one
monotonic clock, until each of two Watchers (the daemon's 8 MiB buffer each, read side by side
in batches of 64 as the daemon does) yields it: one with set_filter (A standing in for a
media-watched disk), one without. Between trials both are drained for --gap seconds, as the
daemon's loop would. A trial whose `remove` does not come within 2 s is counted lost (the
daemon's sysfs re-check would then have to fire). Writes JSON (default out/bench/uevent_storm.json).
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

from killcord.watch import Watcher

BATCH = 64  # as daemon.UEVENT_BATCH
WAIT_S = 2.0

STORM = """
import os, signal, sys
n = 0
def stop(*_):
    print(n, flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
fd = os.open(sys.argv[1], os.O_WRONLY)
while True:
    os.write(fd, b"change")
    n += 1
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values_ns: list[int], lost: int, overflows: int) -> dict[str, float | int | None]:
    ms = [v / 1e6 for v in values_ns]
    counts = {"received": len(ms), "lost": lost, "overflows": overflows}
    if not ms:  # every remove lost
        return {**counts, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {**counts, "p50_ms": round(pct(ms, 50), 4), "p99_ms": round(pct(ms, 99), 4),
            "max_ms": round(max(ms), 4), "mean_ms": round(statistics.fmean(ms), 4)}


def loop_device(img: Path) -> str:
    with open(img, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    return subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                          capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--gap", type=float, default=0.05, help="seconds of draining between trials")
    ap.add_argument("--out", type=Path, default=Path("out/bench/uevent_storm.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (loop devices, sysfs uevents)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        a, b = loop_device(Path(tmp) / "a.img"), loop_device(Path(tmp) / "b.img")
        try:
            devpath = f"/devices/virtual/block/{Path(a).name}"
            media = frozenset({devpath})
            watchers = {"filtered": Watcher(), "unfiltered": Watcher()}
            watchers["filtered"].set_filter(media)
            latency: dict[str, list[int]] = {name: [] for name in watchers}
            lost = dict.fromkeys(watchers, 0)
            overflows = dict.fromkeys(watchers, 0)

            def serve(names: set[str], timeout: float, t0: int | None = None) -> set[str]:
                """One select and one batch per ready watcher; the names that yielded A's remove."""
                ready = select.select([watchers[n].fileno() for n in names], [], [], timeout)[0]
                found: set[str] = set()
                for name in names:
                    if watchers[name].fileno() not in ready:
                        continue
                    events, overflow = watchers[name].drain(media, limit=BATCH)
                    overflows[name] += overflow
                    if t0 is not None and any(e.action == "remove" and e.devpath == devpath for e in events):
                        latency[name].append(time.monotonic_ns() - t0)
                        found.add(name)
                return found

            storm = subprocess.Popen([sys.executable, "-c", STORM, f"/sys/class/block/{Path(b).name}/uevent"],
                                     stdout=subprocess.PIPE, text=True)
            started = time.monotonic()
            with open(f"/sys/class/block/{Path(a).name}/uevent", "wb", buffering=0) as remove_a:
                for _ in range(args.trials):
                    until = time.monotonic() + args.gap
                    while (left := until - time.monotonic()) > 0:
                        serve(set(watchers), left)
                    deadline = time.monotonic() + WAIT_S
                    t0 = time.monotonic_ns()
                    remove_a.write(b"remove")
                    pending = set(watchers)
                    while pending and (left := deadline - time.monotonic()) > 0:
                        pending -= serve(pending, left, t0)
                    for name in pending:
                        lost[name] += 1
            storm.terminate()
            storm_events = int(storm.communicate(timeout=10)[0] or 0)
            duration = time.monotonic() - started
        finally:
            for dev in (a, b):
                subprocess.run(["losetup", "--detach", dev], check=False)

    result = {
        "benchmark": "remove latency in a uevent storm, with and without the kernel filter",
        "trials": args.trials,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "storm": {"change_events": storm_events, "seconds": round(duration, 2),
                  "per_second": round(storm_events / duration)},
        **{name: summary(latency[name], lost[name], overflows[name]) for name in watchers},
    }
    f, u = result["filtered"]["p50_ms"], result["unfiltered"]["p50_ms"]
    result["p50_ratio_unfiltered_over_filtered"] = round(u / f, 1) if f and u else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"p50 remove latency: unfiltered / filtered = {result['p50_ratio_unfiltered_over_filtered']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
