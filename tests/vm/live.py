"""The Tails-like live system under QEMU: boot it from the virtual USB stick, fill memory
with a pattern, pull the stick, count what survived. Shared by tests/vm/test_live.py and
the demo (scripts/demo.py)."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .image import Image
from .qemu import Guest

PATTERN_LEN = 16
MAX_LEFT_BYTES = 16 * 1024  # the second kernel's earliest allocations (vm-findings.md)
TAILS_FRACTION = 0.008  # Tails: less than 0.8 % of free memory

BASE_APPEND = "boot=live console=ttyS0 quiet init_on_free=1 killcord_ci=agent systemd.show_status=0"


@dataclass
class Result:
    scenario: str
    pattern_bytes_written: int = 0
    pattern_bytes_found_before: int = 0
    pattern_bytes_left: int | None = None
    powered_off: bool = False
    free_bytes_before_fill: int = 0
    timings_ms: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def tails_limit_bytes(self) -> int:
        return int(self.free_bytes_before_fill * TAILS_FRACTION)

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["tails_limit_bytes"] = self.tails_limit_bytes
        d["max_left_bytes"] = MAX_LEFT_BYTES
        return d

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.scenario}.json"
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path


def boot(image: Image, log: Path, append: str = "", extra_args: list[str] | None = None,
         memory_mib: int = 1024) -> Guest:
    """Boot the live system from the stick (qemu-xhci + usb-storage, id "stick"); the
    stick's writes go to a throw-away snapshot, the cached image stays as built."""
    args = [
        "-kernel", str(image.vmlinux), "-initrd", str(image.initrd),
        "-append", f"{BASE_APPEND} {append}".strip(),
        "-device", "qemu-xhci,id=xhci",
        "-drive", f"if=none,id=stickdrive,format=raw,file={image.stick},snapshot=on",
        "-device", "usb-storage,bus=xhci.0,drive=stickdrive,id=stick,removable=on",
        *(extra_args or []),
    ]
    return Guest(args, memory_mib=memory_mib, cpus=2, log=log, agent=True, stop_on_poweroff=True)


def wait_armed(g: Guest, timeout: float = 400) -> dict:
    g.wait_agent(timeout)
    reply = g.run("end=$(( $(date +%s) + 300 )); while [ $(date +%s) -lt $end ]; do "
                  "killcord status --json 2>/dev/null | grep -q '\"state\": \"armed\"' && exit 0; "
                  "sleep 0.5; done; exit 1", timeout=timeout, check=False)
    if reply["rc"] != 0:
        journal = g.run("journalctl -b -u killcord.service --no-pager -o cat | tail -40", check=False)["out"]
        raise AssertionError(f"killcord did not arm; its journal:\n{journal}")
    return json.loads(g.run("killcord status --json")["out"])


def fill_process(g: Guest, pattern: bytes, mib: int = 128) -> int:
    """A process holding `mib` MiB of the pattern; returns the bytes written."""
    copies = mib * 1024 * 1024 // len(pattern)
    code = (f"import time; b = bytes.fromhex('{pattern.hex()}') * {copies}; "
            "open('/run/filled', 'w').write('1'); time.sleep(10**6)")
    g.run(f"setsid -f python3 -c \"{code}\" >/dev/null 2>&1 </dev/null")
    g.run("until [ -e /run/filled ]; do sleep 0.2; done", timeout=120)
    return copies * len(pattern)


def mem_free_bytes(g: Guest) -> int:
    return int(g.run("awk '/^MemFree:/ { print $2 }' /proc/meminfo")["out"]) * 1024


def first_line_after(g: Guest, pattern: str, t0: float) -> float | None:
    rx = re.compile(pattern)
    for line in list(g.lines):
        if line.at >= t0 and rx.search(line.text):
            return line.at
    return None


def ms(t: float | None, t0: float) -> float | None:
    return None if t is None else round((t - t0) * 1000, 1)


def trigger_and_measure(g: Guest, result: Result, pattern: bytes, trigger, poweroff_timeout: float = 300) -> None:
    """Pull the trigger (a callable), wait for the guest to power itself off, dump its
    memory and count the pattern; fill in the timings from the console's host times."""
    t0 = time.monotonic()
    trigger()
    t_off = g.wait_status("shutdown", poweroff_timeout)
    result.powered_off = True
    result.pattern_bytes_left = g.count_in_memory(pattern) * len(pattern)
    uevent = first_line_after(g, r"ref-uevent: remove ", t0)
    detect = first_line_after(g, r"killcord: fire ", t0)
    result.timings_ms = {
        "unplug_to_uevent": ms(uevent, t0),
        "unplug_to_detect": ms(detect, t0),
        "unplug_to_killed": ms(first_line_after(g, r"killcord: stage stage=kill ", t0), t0),
        # killcord's own line right before reboot(2); the kernel's may be lost in the jump
        "unplug_to_kexec": ms(first_line_after(g, r"killcord: kexec |kexec_core: Starting new kernel", t0), t0),
        "unplug_to_wiped": ms(first_line_after(g, r"killcord-wipe: wiped ", t0), t0),
        "unplug_to_poweroff": ms(t_off, t0),
    }
    if uevent is not None and detect is not None and uevent > t0:
        result.notes["detect_to_reference_ratio"] = round((detect - t0) / (uevent - t0), 2)


def unplug_stick(g: Guest):
    return lambda: g.qmp("device_del", id="stick")


def new_pattern() -> bytes:
    return os.urandom(PATTERN_LEN)
