"""QEMU benchmark (not a test): how soon killcord sees its medium go, against the reference
listener in the same guest, on the guest's own clock.

The reference (tests/vm/guest/killcord-ref-uevent) is the least user space can do: a bare
netlink socket, one recv, one line to /dev/kmsg. Both print to the kernel's log, so both
carry the guest's printk timestamp; killcord's detection is its `fire` line's timestamp
less that line's logged_after_ms (the line is written after the kill and the keys).

Three cases, each run on a fresh boot of the Debian 13 live image (TCG, 2 vCPUs, 2 GiB):
  idle      nothing else runs;
  squashfs  four processes keep reading files of the live root (each page dropped after
            it is read, so every read goes to the squashfs on the stick): after the
            unplug they fail on the missing medium, with a kernel error line each time;
  storm     1,500 `change` uevents a second on an unrelated device (udev handles each).
Per run: detection minus the reference (ms, guest clock; negative: killcord first) and the
kexec call minus the reference. When killcord's kill reached the reference before it could
print (reference_killed_first), killcord was first by an unknown margin: the run counts as
0 ms and the kexec from killcord's detection, upper bounds (so the medians are too). With --modes realtime normal, each case also runs with the
detector kept off real-time (a unit drop-in sets RestrictRealtime=yes), side by side.

Writes JSON (default out/bench/vm-detect.json). Needs root, QEMU and the trixie .deb (make deb).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from guest_bench import ROOT, median, prepare
from vm import live

CASES = ("idle", "squashfs", "storm")  # the last two are live.LOADS
MODES = ("realtime", "normal")

NOT_REALTIME = "/run/systemd/system/killcord.service.d/bench-not-realtime.conf"


def one_run(image, case: str, mode: str, memory_mib: int, log: Path) -> dict[str, object]:  # noqa: ANN001
    notes: dict[str, object] = {}
    with live.boot(image, log, memory_mib=memory_mib) as g:
        status = live.wait_armed(g)
        if mode == "normal":
            g.run(f"mkdir -p {os.path.dirname(NOT_REALTIME)} && printf '[Service]\\nRestrictRealtime=yes\\n' > "
                  f"{NOT_REALTIME} && systemctl daemon-reload && systemctl restart killcord")
            time.sleep(1)
            status = live.wait_armed(g)
        if case != "idle":
            live.start_load(g, case)
            time.sleep(5)  # the load is under way
        if case == "storm":
            notes["storm_uevents_per_s"] = live.storm_rate(g)
        notes["loadavg"] = g.run("cat /proc/loadavg")["out"].strip()
        t0 = time.monotonic()
        g.qmp("device_del", id="stick")
        g.wait_status("shutdown", 300)
    after = live.after_reference_ms(g, t0)
    return {"case": case, "mode": mode, "detector": status.get("detector"), "memory_mib": memory_mib,
            "detect_after_ref_ms": after["detect"], "kexec_after_ref_ms": after["kexec"],
            "reference_killed_first": after["upper_bound"],
            "trigger": live.trigger_of(g, t0), **notes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "vm-detect.json")
    ap.add_argument("--runs", type=int, default=3, help="boots per case and mode (default 3)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["realtime"],
                    help="realtime (as packaged); normal adds the detector kept off real-time, side by side")
    ap.add_argument("--memory", type=int, default=2048, help="guest MiB (default 2048)")
    args = ap.parse_args()
    image, logs = prepare("bench-vm-detect", args.out)
    runs: list[dict[str, object]] = []
    started = time.time()
    for rep in range(args.runs):
        for case in args.cases:
            for mode in (args.modes if rep % 2 == 0 else args.modes[::-1]):
                run = one_run(image, case, mode, args.memory, logs / f"{case}-{mode}-{rep}.log")
                runs.append(run)
                print(f"bench-vm-detect: {case:<8} {mode:<8} run {rep + 1}: detect {run['detect_after_ref_ms']} ms "
                      f"and kexec {run['kexec_after_ref_ms']} ms after the reference ({run['detector']})", flush=True)
    summary = {case: {mode: {m: median([r[m] for r in runs if r["case"] == case and r["mode"] == mode], 2)
                             for m in ("detect_after_ref_ms", "kexec_after_ref_ms")}
                      for mode in args.modes} for case in args.cases}
    doc = {"bench": "detection and kexec call after the reference listener, guest clock (QEMU TCG, 2 vCPUs)",
           "memory_mib": args.memory, "runs_per_case_and_mode": args.runs, "seconds": round(time.time() - started),
           "median": summary, "runs": runs}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for case, modes in summary.items():
        for mode, m in modes.items():
            print(f"bench-vm-detect: {case:<8} {mode:<8} median: detect {m['detect_after_ref_ms']} ms, "
                  f"kexec {m['kexec_after_ref_ms']} ms after the reference")
    print(f"bench-vm-detect: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
