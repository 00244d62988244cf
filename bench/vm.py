"""QEMU benchmark (not a test): from unplug to a clean, powered-off machine, killcord's wipe
target against the path it replaced (the live system's own initrd as the kexec target),
side by side in one run.

Each run boots the Debian 13 live image (TCG, 2 vCPUs) at the given memory size, arms,
fills 128 MiB with a pattern, pulls the stick (QMP device_del) and times, from the host's
reading of the guest console (tests/vm/live.py): the reference C listener's uevent,
killcord's detection, all killed, keys gone, the kexec call, RAM clean (the target's
`killcord-wipe: wiped` line) and the power-off (QMP). The two paths alternate within each
repetition (which one goes first alternates too), so that a noisy host weighs on both
alike; the ratios of the medians are what to read. What survived is counted each time.

Writes JSON (default out/bench/vm.json). Needs root, QEMU and the trixie .deb (make deb).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from guest_bench import ROOT, median, prepare
from vm import live

PATHS = ("system-initrd", "wipe-target")  # what it was, what it is
METRICS = ("unplug_to_uevent", "unplug_to_detect", "unplug_to_killed", "unplug_to_keys_gone",
           "unplug_to_kexec", "unplug_to_wiped", "unplug_to_poweroff")


def one_run(image, memory_mib: int, path: str, log: Path) -> dict[str, object]:
    result, pattern = live.Result(f"bench-{path}-{memory_mib}"), live.new_pattern()
    with live.boot(image, log, memory_mib=memory_mib) as g:
        status = live.wait_armed(g)
        if path == "system-initrd":
            initrd = g.run("ls /run/live/medium/live/initrd.img*")["out"].split()[0]
            status = live.restage_with_initrd(g, initrd)
        else:
            assert status["kexec"]["initrd_kind"] == "wipe-target", status["kexec"]
        result.free_bytes_before_fill = live.mem_free_bytes(g)
        result.pattern_bytes_written = live.fill_process(g, pattern, 128)
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
    return {"path": path, "memory_mib": memory_mib, "initrd": status["kexec"]["initrd"],
            "initrd_bytes": status["kexec"].get("initrd_bytes"), "pattern_bytes_written": result.pattern_bytes_written,
            "pattern_bytes_left": result.pattern_bytes_left, "powered_off": result.powered_off,
            "timings_ms": result.timings_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "vm.json")
    ap.add_argument("--runs", type=int, default=3, help="repetitions per size and path (default 3)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="guest MiB (default 1024 2048)")
    args = ap.parse_args()
    image, logs = prepare("bench-vm", args.out)
    runs: list[dict[str, object]] = []
    started = time.time()
    for size in args.sizes:
        for rep in range(args.runs):
            for path in (PATHS if rep % 2 == 0 else PATHS[::-1]):
                run = one_run(image, size, path, logs / f"{size}-{path}-{rep}.log")
                runs.append(run)
                t = run["timings_ms"]
                print(f"bench-vm: {size} MiB {path:<13} run {rep + 1}: detect {t['unplug_to_detect']} ms, "
                      f"keys {t['unplug_to_keys_gone']} ms, kexec {t['unplug_to_kexec']} ms, "
                      f"clean {t['unplug_to_wiped']} ms, off {t['unplug_to_poweroff']} ms, "
                      f"left {run['pattern_bytes_left']} B", flush=True)
    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    ratios: dict[str, float | None] = {}
    for size in args.sizes:
        summary[str(size)] = {
            path: {m: median([r["timings_ms"].get(m) for r in runs if r["memory_mib"] == size and r["path"] == path])
                   for m in METRICS} for path in PATHS}
        new, old = (summary[str(size)][p]["unplug_to_poweroff"] for p in ("wipe-target", "system-initrd"))
        ratios[str(size)] = round(new / old, 3) if new and old else None
    doc = {"bench": "unplug to power-off, wipe target vs the system's initrd (QEMU TCG, 2 vCPUs)",
           "runs_per_size_and_path": args.runs, "seconds": round(time.time() - started), "runs": runs,
           "median_ms": summary, "poweroff_ratio_wipe_target_to_system_initrd": ratios,
           "max_pattern_bytes_left": max((r["pattern_bytes_left"] or 0) for r in runs)}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for size, ratio in ratios.items():
        s = summary[size]
        print(f"bench-vm: {size} MiB: off {s['wipe-target']['unplug_to_poweroff']} ms with the wipe target, "
              f"{s['system-initrd']['unplug_to_poweroff']} ms with the system's initrd: ratio {ratio}")
    print(f"bench-vm: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
