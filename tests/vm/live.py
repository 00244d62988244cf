"""The Tails-like live system under QEMU: boot it from the virtual USB stick, fill memory
with a pattern, pull the stick, count what survived. Shared by tests/vm/test_live.py and
the demo (scripts/demo.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
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


OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")  # Debian's ovmf package
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


# An S3 guest has one vCPU: Debian 13's kernel (6.12) under QEMU 7.2's TCG double-faulted
# as it resumed with two (in irqrouter_resume -> acpi_pci_link_set, right after "Restoring
# platform NVS memory": on qemu64 in 3 of 3 tries, on max in 1 of 2), and resumed with one.
S3_CPUS = 1


def boot(image: Image, log: Path, append: str = "", extra_args: list[str] | None = None,
         memory_mib: int = 1024, s3: bool = False, uefi: bool = False) -> Guest:
    """Boot the live system from the stick (qemu-xhci + usb-storage, id "stick"); the
    stick's writes go to a throw-away snapshot, the cached image stays as built.

    s3: the guest can suspend to RAM and be woken (QMP system_wakeup). It boots the
    bzImage then: a kernel entered through QEMU's PVH entry (the faster vmlinux) resets
    instead of resuming, SeaBIOS's jump to its wakeup vector ends in a second reset.
    The stick is then not flagged removable: QEMU's wakeup resets every device, the
    stick answers the next read with a Unit Attention, and Linux fails every later read
    from a removable disk that did so ("device offline or changed"), which takes the live
    root away. A real port mostly keeps its power through S3; this keeps the test about
    killcord rather than about that artefact. And the CPU model is QEMU's max (below), with
    one vCPU (S3_CPUS).

    uefi: boot through OVMF (its EFI stub: the bzImage), with a writable copy of its
    variable store beside the log, so that the guest has efivarfs."""
    kernel = image.vmlinuz if s3 or uefi else image.vmlinux
    removable = "off" if s3 else "on"
    # -cpu max for S3 (QEMU takes the last -cpu): Debian 13's kernel on the default qemu64
    # model double-faults as it resumes (in acpi_rs_set_srs_method_data, right after
    # "Restoring platform NVS memory"), and never comes back; with max it resumes.
    machine_args = ["-global", "ICH9-LPC.disable_s3=0", "-cpu", "max"] if s3 else []
    if uefi:
        store = log.with_suffix(".ovmf-vars.fd")
        store.write_bytes(OVMF_VARS.read_bytes())
        machine_args += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={store}"]
    args = [
        "-kernel", str(kernel), "-initrd", str(image.initrd), *machine_args,
        "-append", f"{BASE_APPEND} {append}".strip(),
        "-device", "qemu-xhci,id=xhci",
        "-drive", f"if=none,id=stickdrive,format=raw,file={image.stick},snapshot=on",
        "-device", f"usb-storage,bus=xhci.0,drive=stickdrive,id=stick,removable={removable}",
        *(extra_args or []),
    ]
    return Guest(args, memory_mib=memory_mib, cpus=S3_CPUS if s3 else 2, log=log, agent=True,
                 stop_on_poweroff=True)


def usb_drive(path: Path, id: str, size: str, mkfs: str | None = None) -> list[str]:
    """QEMU arguments for a second USB drive on the stick's bus: a sparse image of `size`
    (truncate's units) at `path`, made with `mkfs` if given; device id `id`."""
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    if mkfs:
        subprocess.run([mkfs, "-q", str(path)], check=True)
    return ["-drive", f"if=none,id={id}drive,format=raw,file={path}",
            "-device", f"usb-storage,bus=xhci.0,drive={id}drive,id={id},removable=on"]


def device_of_size(g: Guest, size: int) -> str:
    """The guest's whole-disk device of exactly `size` bytes (a drive from usb_drive)."""
    names = g.run(f"lsblk -bdno NAME,SIZE | awk '$2 == {size} {{ print $1 }}'")["out"].split()
    assert len(names) == 1, f"want one disk of {size} bytes, found {names}"
    return "/dev/" + names[0]


def volume_key(luks_dump: str) -> bytes:
    """The volume key from `cryptsetup luksDump --dump-volume-key` ("MK dump:" hex lines)."""
    hexes: list[str] = []
    lines = luks_dump.splitlines()
    for i, line in enumerate(lines):
        if "MK dump:" in line:
            hexes += line.split("MK dump:", 1)[1].split()
            for cont in lines[i + 1:]:
                tokens = cont.split()
                if not tokens or not all(len(t) == 2 for t in tokens):
                    break
                hexes += tokens
            break
    return bytes.fromhex("".join(hexes))


def open_luks(g, size: int = 64 << 20) -> tuple[bytes, bytes]:
    """A LUKS2 volume on the drive of `size` bytes (live.usb_drive), opened as
    /dev/mapper/secret with ext4 mounted on /mnt/secret; returns its volume key's two
    halves: aes-xts keeps them apart (one AES key schedule each), so each is counted."""
    dev = device_of_size(g, size)
    g.run(f"printf secret | cryptsetup luksFormat --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 "
          f"--batch-mode {dev} - && printf secret | cryptsetup open {dev} secret --key-file - && "
          "mkfs.ext4 -q /dev/mapper/secret && mkdir -p /mnt/secret && mount /dev/mapper/secret /mnt/secret")
    key = volume_key(g.run(f"printf secret | cryptsetup luksDump --dump-volume-key --batch-mode "
                           f"--key-file - {dev}")["out"])
    assert len(key) == 64  # aes-xts-plain64, 512 bits
    return key[:32], key[32:]


SYSRQ = re.compile(r"stage=sysrq|sysrq ?: Power Off", re.IGNORECASE)


def sysrq_fired(console: str) -> bool:
    """Whether the last resort ran: its stage's line, or the kernel's own when sysrq's power
    off went through (the stage's line may never get out: the machine is off by then, as a
    Debian 12 guest's fallback showed once its poweroff stage had run past its deadline)."""
    return SYSRQ.search(console) is not None


def wait_armed(g: Guest, timeout: float = 400) -> dict:
    g.wait_agent(timeout)
    reply = g.run("end=$(( $(date +%s) + 300 )); while [ $(date +%s) -lt $end ]; do "
                  "killcord status --json 2>/dev/null | grep -q '\"state\": \"armed\"' && exit 0; "
                  "sleep 0.5; done; exit 1", timeout=timeout, check=False)
    if reply["rc"] != 0:
        journal = g.run("journalctl -b -u killcord.service --no-pager -o cat | tail -40", check=False)["out"]
        raise AssertionError(f"killcord did not arm; its journal:\n{journal}")
    return json.loads(g.run("killcord status --json")["out"])


def restart_with(g: Guest, name: str, setting: str, value: str) -> dict:
    """Restart killcord with KILLCORD_<SETTING>=value (a systemd drop-in in /run, `name`.conf);
    returns the new status once armed."""
    g.run("mkdir -p /run/systemd/system/killcord.service.d && printf '[Service]\\nEnvironment=KILLCORD_%s=%s\\n' "
          f"'{setting.upper()}' '{value}' > /run/systemd/system/killcord.service.d/{name}.conf && "
          "systemctl daemon-reload && systemctl restart killcord", timeout=300)
    return wait_armed(g)


def restage_with_initrd(g: Guest, initrd: str) -> dict:
    """Restart killcord with kexec_initrd = `initrd` instead of its wipe target; returns the
    new status once armed."""
    status = restart_with(g, "initrd", "kexec_initrd", initrd)
    assert status["kexec"]["initrd"] == initrd and status["kexec"]["initrd_kind"] == "explicit", status["kexec"]
    return status


def fill_process(g: Guest, pattern: bytes, mib: int = 128) -> int:
    """A process holding `mib` MiB of the pattern; returns the bytes written."""
    copies = mib * 1024 * 1024 // len(pattern)
    code = (f"import time; b = bytes.fromhex('{pattern.hex()}') * {copies}; "
            "open('/run/filled', 'w').write('1'); time.sleep(10**6)")
    g.run(f"setsid -f python3 -c \"{code}\" >/dev/null 2>&1 </dev/null")
    g.run("until [ -e /run/filled ]; do sleep 0.2; done", timeout=120)
    return copies * len(pattern)


def pattern_bytes(g: Guest, pattern: bytes) -> int:
    """Bytes of pattern in the guest's memory now (every occurrence counted)."""
    return g.count_in_memory(pattern) * len(pattern)


def mem_free_bytes(g: Guest) -> int:
    return int(g.run("awk '/^MemFree:/ { print $2 }' /proc/meminfo")["out"]) * 1024


def line_after(g: Guest, pattern: str, t0: float):
    """The first console line (a qemu.Line) from host time t0 on that matches, or None."""
    rx = re.compile(pattern)
    return next((line for line in list(g.lines) if line.at >= t0 and rx.search(line.text)), None)


def first_line_after(g: Guest, pattern: str, t0: float) -> float | None:
    line = line_after(g, pattern, t0)
    return None if line is None else line.at


def fire_line_after(g: Guest, t0: float):
    """killcord's `fire` line after t0 (a Line), or None."""
    return line_after(g, r"killcord: fire ", t0)


def logged_after_s(text: str) -> float:
    """The `fire` line is written after the kill and the keys stages; it says how long after
    the detection (logged_after_ms): subtract that from its time to get the detection's."""
    m = re.search(r"logged_after_ms=([\d.]+)", text)
    return float(m[1]) / 1000 if m else 0.0


def detected_at(g: Guest, t0: float) -> float | None:
    """Host time of killcord's detection after t0: its fire line's, less logged_after_ms."""
    line = fire_line_after(g, t0)
    return None if line is None else line.at - logged_after_s(line.text)


def stage_seconds(text: str) -> float | None:
    """A stage line's duration_ms, in seconds."""
    m = re.search(r"duration_ms=([\d.]+)", text)
    return float(m[1]) / 1000 if m else None


def ms(t: float | None, t0: float) -> float | None:
    return None if t is None else round((t - t0) * 1000, 1)


GUEST_STAMP = re.compile(r"\[\s*(\d+\.\d+)\]")


def guest_seconds(line) -> float | None:  # noqa: ANN001 (a qemu.Line or None)
    """A console line's printk timestamp: the guest's own clock, free of the host's noise."""
    m = None if line is None else GUEST_STAMP.search(line.text)
    return float(m[1]) if m else None


def trigger_and_measure(g: Guest, result: Result, pattern: bytes, trigger, poweroff_timeout: float = 300) -> None:
    """Pull the trigger (a callable), wait for the guest to power itself off, dump its
    memory and count the pattern; fill in the timings from the console's host times."""
    t0 = time.monotonic()
    trigger()
    t_off = g.wait_status("shutdown", poweroff_timeout)
    result.powered_off = True
    result.pattern_bytes_left = pattern_bytes(g, pattern)
    uevent = first_line_after(g, r"ref-uevent: remove ", t0)
    detect = detected_at(g, t0)
    fire = fire_line_after(g, t0)
    kill_line = line_after(g, r"killcord: stage stage=kill ", t0)
    kill_s = stage_seconds(kill_line.text) if kill_line else None
    result.timings_ms = {
        "unplug_to_uevent": ms(uevent, t0),
        "unplug_to_detect": ms(detect, t0),
        # the kill and keys stages' lines are written after both ran (fire.py): the kill's end
        # is the detection plus its duration; the keys were gone when the fire line was written
        "unplug_to_killed": ms(None if detect is None or kill_s is None else detect + kill_s, t0),
        "unplug_to_keys_gone": ms(fire.at if fire else None, t0),
        # killcord's own line right before reboot(2); the kernel's may be lost in the jump
        "unplug_to_kexec": ms(first_line_after(g, r"killcord: kexec |kexec_core: Starting new kernel", t0), t0),
        # the target's wiper, or the daemon's own fallback when kexec could not run
        "unplug_to_wiped": ms(first_line_after(g, r"killcord-wipe: wiped |killcord: poweroff wiped_ok=True", t0), t0),
        "unplug_to_poweroff": ms(t_off, t0),
    }
    if uevent is not None and detect is not None and uevent > t0:
        result.notes["detect_to_reference_ratio"] = round((detect - t0) / (uevent - t0), 2)
    result.notes["trigger"] = trigger_of(g, t0)
    result.notes["after_reference_ms"] = after_reference_ms(g, t0)


def trigger_of(g: Guest, t0: float) -> str | None:
    """What killcord's `fire` line after t0 says fired it."""
    fire = fire_line_after(g, t0)
    return fire.text.split("trigger=", 1)[1].split(" realtime=")[0] if fire else None


def after_reference_ms(g: Guest, t0: float) -> dict[str, float | bool | None]:
    """killcord's detection and its kexec call after the reference listener's line, on the
    guest's clock (negative: killcord was first).

    Under load the reference (a normal task) may not have printed yet when killcord's kill
    reached it: killcord was first, by an unknown margin. Its line would have come after
    killcord's detection, so the times are then taken from the detection: upper bounds
    (detect 0), and `upper_bound` says so."""
    ref = guest_seconds(line_after(g, r"ref-uevent: remove ", t0))
    fire = fire_line_after(g, t0)
    fire_at = guest_seconds(fire)
    detect_at = None if fire is None or fire_at is None else fire_at - logged_after_s(fire.text)
    kexec_at = guest_seconds(line_after(g, r"killcord: kexec ", t0))
    bound = ref is None and detect_at is not None
    if bound:
        ref = detect_at
    times: dict[str, float | bool | None] = {
        name: None if at is None or ref is None else round((at - ref) * 1000, 2)
        for name, at in (("detect", detect_at), ("kexec", kexec_at))}
    return {**times, "upper_bound": bound}


# Loads to run while the medium goes (bench/vm_detect.py, scenario p): started detached in the
# guest, killed with everything else when killcord fires.
LOADS = {
    # reads files of the live root, dropping each page after reading it: every read goes to
    # the squashfs on the stick, and fails (with a kernel error line) once it is gone
    "squashfs": ("""
import os
files = []
for d, _, names in os.walk("/usr/lib/python3"):
    files += [os.path.join(d, n) for n in names]
while True:
    for p in files:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.read(fd, 1 << 20)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            pass
""", 4),
    # 1,500 `change` uevents a second on an unrelated device (udev handles each); the count
    # so far goes to /run/storm.count once a second
    "storm": ("""
import os, time
rate = 1500
fd = os.open("/sys/devices/virtual/mem/null/uevent", os.O_WRONLY)
n, t0 = 0, time.monotonic()
while True:
    os.write(fd, b"change")
    n += 1
    if n % rate == 0:
        with open("/run/storm.count", "w") as f:
            f.write(f"{n} {time.monotonic() - t0:.3f}\\n")
    ahead = n / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
""", 1),
}


def start_load(g: Guest, kind: str) -> None:
    source, copies = LOADS[kind]
    g.run(f"cat > /run/load-{kind}.py <<'EOF'\n{source}\nEOF")
    for _ in range(copies):
        g.run(f"setsid -f python3 /run/load-{kind}.py </dev/null >/dev/null 2>&1")


def storm_rate(g: Guest) -> int:
    """Uevents a second the storm load has sent so far."""
    n, secs = g.run("cat /run/storm.count")["out"].split()
    return round(int(n) / float(secs))


def suspend(g: Guest, timeout: float = 60) -> None:
    """Suspend the guest to RAM as a desktop would (systemctl suspend: systemd-sleep runs
    killcord's sleep hook) and wait until QEMU reports it asleep. A suspend asked for
    while the last resume's hooks still run does not happen: wait for them first."""
    g.run("while systemctl -q is-active systemd-suspend.service; do sleep 0.2; done", timeout=60)
    g.run("setsid -f systemctl suspend >/dev/null 2>&1 </dev/null")
    g.wait_status("suspended", timeout)


def send_keys(g: Guest, keys: list[str], hold_ms: int = 300) -> None:
    """Type a chord on QEMU's active keyboard (QMP send-key, QEMU key names): each key
    pressed in order, all released after `hold_ms`. The active keyboard is the last one
    plugged in: the PS/2 keyboard until a usb-kbd is added, then that one."""
    g.qmp("send-key", keys=[{"type": "qcode", "data": k} for k in keys], **{"hold-time": hold_ms})
    time.sleep(hold_ms / 1000 + 0.7)  # released, and read by whoever reads


def unplug_stick(g: Guest):
    return lambda: g.qmp("device_del", id="stick")


def new_pattern() -> bytes:
    return os.urandom(PATTERN_LEN)
