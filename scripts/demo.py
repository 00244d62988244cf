"""The demo: a Tails-like live system boots under QEMU from a virtual USB stick, opens a
LUKS2 volume on a second USB drive, fills 128 MiB of memory with a random pattern, and the
stick is pulled. killcord kills, wipes the volume key, kexecs into its wipe target, which
powers off; the guest's memory is dumped and counted (the pattern and the volume key).

Writes out/demo/result.json, out/demo/timeline.png and out/demo/console.log; prints a
short report. Needs root, the .deb (make deb) and QEMU; builds or reuses the cached image.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vm import live  # noqa: E402
from vm.image import build, find_deb  # noqa: E402

OUT = ROOT / "out" / "demo"
SUITE = "trixie"  # the demo runs today's stable, Debian 13
LABELS = {
    "unplug_to_uevent": "kernel uevent (reference listener)",
    "unplug_to_detect": "killcord detects",
    "unplug_to_killed": "all processes killed",
    "unplug_to_keys_gone": "dm-crypt keys wiped",
    "unplug_to_kexec": "kexec into the wipe kernel",
    "unplug_to_wiped": "free memory wiped",
    "unplug_to_poweroff": "powered off",
}


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.2f} MiB"


def chart(timings: dict[str, float | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(LABELS[k], v) for k, v in timings.items() if v is not None]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, (label, value) in enumerate(items):
        ax.barh(i, value, color="#b03030" if "wiped" in label or "powered" in label else "#3060a0")
        ax.text(value * 1.08, i, f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms", va="center", fontsize=9)
    ax.set_yticks(range(len(items)), [label for label, _ in items])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(1, max(v for _, v in items) * 4)
    ax.set_xlabel("ms after the stick was pulled (QMP device_del), log scale")
    ax.set_title("killcord: from unplug to a wiped, powered-off machine (QEMU, TCG)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (mmdebstrap, QEMU)", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"demo: building the {SUITE} live image (cached after the first run)...", flush=True)
    image = build(SUITE, find_deb(SUITE), log=open(OUT / "build.log", "w"))
    result, pattern = live.Result("demo"), live.new_pattern()
    print("demo: booting the live system from the virtual USB stick (TCG: about a minute)...", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="killcord-demo-"))
    with live.boot(image, OUT / "console.log", extra_args=live.usb_drive(tmp / "luks.img", "luks", "64M")) as g:
        status = live.wait_armed(g)
        kx = status["kexec"]
        print(f"demo: killcord armed on {status['medium']['device']} (via {status['medium']['source']}), "
              f"kexec staged: {kx['loaded']}, initramfs: {kx.get('initrd_kind')} ({kx.get('initrd_bytes')} bytes)",
              flush=True)
        halves = live.open_luks(g)
        key_before = g.counts_in_memory(*halves)
        print(f"demo: a LUKS2 volume is open on a second USB drive; copies of its volume key's two halves "
              f"in RAM: {key_before}", flush=True)
        result.free_bytes_before_fill = live.mem_free_bytes(g)
        result.pattern_bytes_written = live.fill_process(g, pattern, 128)
        result.pattern_bytes_found_before = live.pattern_bytes(g, pattern)
        print(f"demo: a process holds {mib(result.pattern_bytes_written)} of pattern {pattern.hex()}; "
              f"the memory dump finds {mib(result.pattern_bytes_found_before)}", flush=True)
        print("demo: pulling the stick...", flush=True)
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
        key_after = g.counts_in_memory(*halves)
    shutil.rmtree(tmp, ignore_errors=True)
    result.notes.update(volume_key_half_copies_before=key_before, volume_key_half_copies_after=key_after,
                        initrd_kind=kx.get("initrd_kind"), initrd_bytes=kx.get("initrd_bytes"))
    doc = result.as_dict()
    (OUT / "result.json").write_text(json.dumps(doc, indent=2) + "\n")
    chart(result.timings_ms, OUT / "timeline.png")

    left = result.pattern_bytes_left or 0
    ok = result.powered_off and left <= live.MAX_LEFT_BYTES and key_after == [0, 0] and min(key_before) >= 1
    print()
    print("killcord demo report")
    print(f"  pattern written:        {mib(result.pattern_bytes_written)}")
    print(f"  found before the pull:  {mib(result.pattern_bytes_found_before)}")
    print(f"  left after:             {left} bytes (limit {live.MAX_LEFT_BYTES}; "
          f"Tails' 0.8 % of free memory would allow {mib(result.tails_limit_bytes)})")
    print(f"  volume key halves in RAM: {key_before} before, {key_after} after")
    print(f"  guest powered itself off: {'yes' if result.powered_off else 'NO'}")
    for key, label in LABELS.items():
        value = result.timings_ms.get(key)
        print(f"  {label:<36} {'-' if value is None else f'{value:>10,.1f} ms'}")
    if "detect_to_reference_ratio" in result.notes:
        print(f"  detection / reference listener: {result.notes['detect_to_reference_ratio']}x")
    print(f"  written: {OUT / 'result.json'}, {OUT / 'timeline.png'}, console in {OUT / 'console.log'}")
    print("demo: PASS" if ok else "demo: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
