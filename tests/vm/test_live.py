"""Proof on a Tails-like live system (live-boot, squashfs on a USB stick, overlay on tmpfs)
under QEMU: fill memory with a random pattern, trigger, dump guest memory, count what
survived. Each scenario writes out/vm/<scenario>.json (pattern written, found before,
left, timings) and its console to out/vm/<scenario>.log.

Pass: the positive control finds at least 99 % of what was written before the trigger;
after it, at most 16 KiB of pattern is left and the guest powered itself off.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path

import pytest

from killcord import mor, wipetarget

from . import live
from .image import Image

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mmdebstrap builds the guest (CI runs as root)"),
]


def check_wiped(result: live.Result, image: Image) -> None:
    result.write(image.out)
    assert result.powered_off
    assert result.pattern_bytes_left is not None
    assert result.pattern_bytes_left <= live.MAX_LEFT_BYTES, result.as_dict()


def control(g, result: live.Result, pattern: bytes) -> None:
    """Positive control before a trigger: the dump method sees what was written."""
    result.pattern_bytes_found_before = live.pattern_bytes(g, pattern)
    assert result.pattern_bytes_found_before >= 0.99 * result.pattern_bytes_written, result.as_dict()


def assert_untouched(g, result: live.Result, pattern: bytes) -> None:
    """Nothing happened: what was written is all still there."""
    assert live.pattern_bytes(g, pattern) >= 0.99 * result.pattern_bytes_written, result.as_dict()


def fill_and_control(g, result: live.Result, pattern: bytes, mib: int = 128) -> None:
    result.free_bytes_before_fill = live.mem_free_bytes(g)
    result.pattern_bytes_written = live.fill_process(g, pattern, mib)
    control(g, result, pattern)


def test_a_process_memory_is_wiped_after_unplug(image: Image) -> None:
    result, pattern = live.Result("a-process"), live.new_pattern()
    with live.boot(image, image.out / "a-process.log") as g:
        status = live.wait_armed(g)
        initrd = assert_staged_for_live_boot(status)
        fill_and_control(g, result, pattern)
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
    result.notes["medium"] = status["medium"]["device"]
    result.notes["initrd"] = initrd
    check_wiped(result, image)
    assert_timed_to_the_wipe(result)


def test_f_panic_root_fires_unprivileged_is_refused(image: Image) -> None:
    result, pattern = live.Result("f-panic"), live.new_pattern()
    with live.boot(image, image.out / "f-panic.log") as g:
        live.wait_armed(g)
        fill_and_control(g, result, pattern)
        refused = g.run("runuser -u user -- killcord panic", check=False)
        assert refused["rc"] == 13 and "permission denied" in refused["err"]
        time.sleep(1)
        assert json.loads(g.run("killcord status --json")["out"])["state"] == "armed"
        assert_untouched(g, result, pattern)
        result.notes["refused_rc"] = refused["rc"]
        live.trigger_and_measure(g, result, pattern, lambda: g.run("setsid -f killcord panic >/dev/null 2>&1"))
    check_wiped(result, image)


def test_g_without_kexec_the_initramfs_fallback_wipes(image: Image) -> None:
    result, pattern = live.Result("g-no-kexec"), live.new_pattern()
    with live.boot(image, image.out / "g-no-kexec.log", append="sysctl.kernel.kexec_load_disabled=1") as g:
        status = live.wait_armed(g)
        assert not status["kexec"]["loaded"]
        fill_and_control(g, result, pattern)
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
        console = g.text()
    assert "killcord: poweroff wiped_ok=True" in console  # the daemon's own fallback
    assert not live.sysrq_fired(console)
    assert result.timings_ms["unplug_to_kexec"] is None
    check_wiped(result, image)


def unplug_and_measure(g, result: live.Result, pattern: bytes) -> str:
    """Pull the stick, measure, and add the fallback's own moments (host times from the
    console, from the unplug); returns the console."""
    t0 = time.monotonic()
    live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
    result.timings_ms["unplug_to_kexec_skipped"] = live.ms(live.first_line_after(g, r"stage=kexec outcome=skipped", t0), t0)
    result.timings_ms["unplug_to_fallback_done"] = live.ms(live.first_line_after(g, r"killcord: poweroff ", t0), t0)
    return g.text()


@pytest.mark.parametrize("init_on_free", [1, 0])
def test_k_fallback_needs_nothing_from_the_stick(image: Image, init_on_free: int) -> None:
    """kexec refused from boot, files on tmpfs and on the overlay root, the page cache
    dropped (what memory pressure does anyway): nothing on the path to power-off may read
    the pulled stick. Everything is freed and wiped, and the machine is off within the
    poweroff stage's deadline, not by sysrq. With init_on_free=0 on the first kernel too:
    the wipe of free memory must then do all of the clearing."""
    name = f"k-fallback-iof{init_on_free}"
    result, pattern = live.Result(name), live.new_pattern()
    append = f"sysctl.kernel.kexec_load_disabled=1 init_on_free={init_on_free}"  # the last one wins
    with live.boot(image, image.out / f"{name}.log", append=append, memory_mib=2048) as g:
        status = live.wait_armed(g)
        assert not status["kexec"]["loaded"]
        result.free_bytes_before_fill = live.mem_free_bytes(g)
        written = fill_file(g, pattern, "/dev/shm/tmpfs-secret", 256)
        written += fill_file(g, pattern, "/root/overlay-secret", 64)
        g.run("sync && echo 3 > /proc/sys/vm/drop_caches")
        result.pattern_bytes_written = written
        control(g, result, pattern)
        console = unplug_and_measure(g, result, pattern)
    done = [line for line in console.splitlines() if "killcord: poweroff " in line]
    result.notes["fallback"] = done[0].split("killcord: poweroff ", 1)[1] if done else None
    result.write(image.out)
    assert done and "wiped_ok=True" in done[0], done
    assert not live.sysrq_fired(console) and "Failed to execute shutdown binary" not in console
    t = result.timings_ms
    assert t["unplug_to_poweroff"] - t["unplug_to_kexec_skipped"] < 10_000  # the poweroff stage's deadline
    if init_on_free:
        check_wiped(result, image)
        return
    # Without init_on_free nothing zeroes a page when it is freed: what the wipe cannot claim,
    # the reserve it leaves the kernel (1/64 of RAM) and the kernel's own watermarks, keeps
    # whatever it held. That residue is measured and bounded by the reserve, not hidden.
    reserve = int(re.search(r"'reserve_bytes': (\d+)", done[0])[1])
    result.notes["reserve_bytes"] = reserve
    result.write(image.out)
    assert result.powered_off and result.pattern_bytes_left is not None
    assert result.pattern_bytes_left <= reserve, result.as_dict()


STUCK = """
import mmap, os, time
held = bytes.fromhex('{hex}') * {copies}
fd = os.open('/dev/mapper/kc-stuck', os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
open('/run/stuck-pid', 'w').write(str(os.getpid()))
os.preadv(fd, [buf], 0)  # the mapping is suspended: uninterruptible sleep until it resumes
time.sleep(10 ** 6)
"""


@pytest.mark.parametrize("path", ["kexec", "fallback"])
def test_l_a_process_in_uninterruptible_sleep_cannot_hold_its_memory(image: Image, path: str) -> None:
    """A process holding the pattern sits in D state (a direct read from a suspended
    device-mapper mapping) when the stick is pulled: SIGKILL cannot end it. On the kexec
    path the target's boot clears its memory; on the fallback the daemon replaces the
    mapping's table, the read fails, the process dies and its memory is wiped. Nothing
    may hang on the way."""
    name = f"l-dstate-{path}"
    result, pattern = live.Result(name), live.new_pattern()
    append = "sysctl.kernel.kexec_load_disabled=1" if path == "fallback" else ""
    mib = 128
    copies = mib * 1024 * 1024 // len(pattern)
    script = base64.b64encode(STUCK.format(hex=pattern.hex(), copies=copies).encode()).decode()
    with live.boot(image, image.out / f"{name}.log", append=append) as g:
        status = live.wait_armed(g)
        assert status["kexec"]["loaded"] == (path == "kexec")
        result.free_bytes_before_fill = live.mem_free_bytes(g)
        g.run("modprobe dm_mod && truncate -s 8M /run/stuck.img && dev=$(losetup -f --show /run/stuck.img) && "
              "dmsetup create kc-stuck --table \"0 16384 linear $dev 0\" && dmsetup suspend kc-stuck")
        g.run(f"echo {script} | base64 -d > /run/stuck.py && setsid -f python3 /run/stuck.py >/dev/null 2>&1 </dev/null")
        state = g.run("until [ -s /run/stuck-pid ]; do sleep 0.2; done; pid=$(cat /run/stuck-pid); "
                      "for i in $(seq 100); do s=$(cut -d' ' -f3 /proc/$pid/stat); [ \"$s\" = D ] && break; "
                      "sleep 0.1; done; echo $s", timeout=120)["out"].strip()
        assert state == "D", state
        result.pattern_bytes_written = copies * len(pattern)
        control(g, result, pattern)
        console = unplug_and_measure(g, result, pattern)
    kill = [line for line in console.splitlines() if "killcord: stage stage=kill " in line]
    result.notes["kill_stage"] = kill[0].split("killcord: stage ", 1)[1][:300] if kill else None
    result.write(image.out)
    if path == "fallback":
        done = [line for line in console.splitlines() if "killcord: poweroff " in line]
        assert done and "'name': 'kc-stuck'" in done[0] and "wiped_ok=True" in done[0], done
    assert not live.sysrq_fired(console)
    check_wiped(result, image)


def test_n_the_jump_fails_the_fallback_waits_for_the_killed_then_wipes(image: Image) -> None:
    """An image staged at arm time that is gone at the trigger (unloaded behind killcord's
    back): the kill stage did not wait for its targets (a kexec was expected), the jump
    fails, and the poweroff stage first waits for the killed processes to exit (kill.finish),
    so that their memory is free when the fallback wipes."""
    result, pattern = live.Result("n-jump-fails"), live.new_pattern()
    with live.boot(image, image.out / "n-jump-fails.log") as g:
        status = live.wait_armed(g)
        assert status["kexec"]["loaded"], status["kexec"]
        fill_and_control(g, result, pattern)
        g.run("kexec -u && test \"$(cat /sys/kernel/kexec_loaded)\" = 0")
        console = unplug_and_measure(g, result, pattern)
    lines = console.splitlines()
    kill_line = next((line for line in lines if "killcord: stage stage=kill " in line), "")
    kexec_line = next((line for line in lines if "killcord: stage stage=kexec " in line), "")
    done = next((line for line in lines if "killcord: poweroff " in line), "")
    result.notes.update(kill_stage=kill_line.split("killcord: stage ", 1)[-1][:300],
                        kexec_stage=kexec_line.split("killcord: stage ", 1)[-1][:200])
    result.write(image.out)
    assert "'waited': False" in kill_line, kill_line  # the kill went on without waiting
    assert "outcome=failed" in kexec_line, kexec_line  # the jump was refused: nothing staged
    assert "wiped_ok=True" in done, done
    # kill.finish ran before the wipe and saw every target gone
    assert "reaped={'outcome': 'done'" in done and "'remaining': []" in done.split("reaped=", 1)[1], done
    assert not live.sysrq_fired(console)
    check_wiped(result, image)


def assert_staged_for_live_boot(status: dict) -> dict:
    """Armed on the live system: kexec staged with killcord's own wipe target, as the package
    built it (not the live system's initrd), the medium found through live-boot. Returns
    what was staged as the initrd, for the result's notes."""
    assert status["kexec"]["loaded"] and status["medium"]["source"] == "live-boot"
    staged = status["kexec"]
    assert staged["initrd_kind"] == "wipe-target" and staged["initrd_bytes"] <= 1024 * 1024, staged
    return {k: staged[k] for k in ("initrd", "initrd_kind", "initrd_bytes")}


def assert_timed_to_the_wipe(result: live.Result) -> None:
    """The console gave the detection, the kexec call and the target's wipe their moments."""
    t = result.timings_ms
    assert t["unplug_to_detect"] is not None and t["unplug_to_kexec"] is not None
    assert t["unplug_to_wiped"] is not None


def test_h_other_stick_and_unrelated_events_never_fire(image: Image, tmp_path: Path) -> None:
    """What must not fire, then what must: another stick pulled, 1,000 unrelated uevents and
    an unprivileged `killcord panic` (refused, exit 13) leave it armed and RAM untouched; then
    the stick is pulled and the path runs as in a (whose checks this makes too: CI runs h in
    place of a and f on Debian 13, conftest.CI_MATRIX)."""
    extra = live.usb_drive(tmp_path / "other.img", "other", "16M", mkfs="mkfs.ext4")
    result, pattern = live.Result("h-no-false-trigger"), live.new_pattern()
    with live.boot(image, image.out / "h-no-false-trigger.log", extra_args=extra) as g:
        initrd = assert_staged_for_live_boot(live.wait_armed(g))
        fill_and_control(g, result, pattern)
        refused = g.run("runuser -u user -- killcord panic", check=False)
        assert refused["rc"] == 13 and "permission denied" in refused["err"], refused
        g.qmp("device_del", id="other")
        g.run("truncate -s 8M /run/u.img && dev=$(losetup -f --show /run/u.img) && "
              "for i in $(seq 1000); do echo change > /sys/class/block/${dev#/dev/}/uevent; done; "
              "losetup -d $dev")
        time.sleep(3)
        status = json.loads(g.run("killcord status --json")["out"])
        assert status["state"] == "armed" and status["stages"] == []
        assert_untouched(g, result, pattern)
        result.notes["other_stick_pulled"] = True
        result.notes["unrelated_uevents"] = 1000
        result.notes["refused_rc"] = refused["rc"]
        # and the real stick still fires afterwards
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
    result.notes["initrd"] = initrd
    check_wiped(result, image)
    assert_timed_to_the_wipe(result)


def test_anti_without_killcord_a_reset_keeps_the_pattern(image: Image) -> None:
    """The dump method's own proof: with killcord stopped, reset the guest: the pattern is
    still found, so a low count after a trigger means a wipe, not a blind dump."""
    result, pattern = live.Result("anti-test"), live.new_pattern()
    with live.boot(image, image.out / "anti-test.log") as g:
        live.wait_armed(g)
        g.run("systemctl stop killcord.service")
        fill_and_control(g, result, pattern)
        g.qmp("system_reset")
        time.sleep(2)
        g.qmp("stop")
        result.pattern_bytes_left = live.pattern_bytes(g, pattern)
    result.write(image.out)
    assert result.pattern_bytes_left >= 0.90 * result.pattern_bytes_written, result.as_dict()


def test_e_luks_caches_and_volume_key_are_gone(image: Image, tmp_path: Path) -> None:
    extra = live.usb_drive(tmp_path / "luks.img", "luks", "64M")
    result, pattern = live.Result("e-luks"), live.new_pattern()
    mib = 16
    copies = mib * 1024 * 1024 // len(pattern)
    write = f"python3 -c \"open('/mnt/secret/{{0}}', 'wb').write(bytes.fromhex('{pattern.hex()}') * {copies})\""
    with live.boot(image, image.out / "e-luks.log", extra_args=extra) as g:
        live.wait_armed(g)
        result.free_bytes_before_fill = live.mem_free_bytes(g)
        halves = live.open_luks(g)
        # read cache: written, flushed, dropped, read back; write cache: written, not flushed
        g.run(write.format("read-cache") + " && sync && echo 3 > /proc/sys/vm/drop_caches && "
              "cat /mnt/secret/read-cache > /dev/null && " + write.format("write-cache"))
        result.pattern_bytes_written = 2 * copies * len(pattern)
        control(g, result, pattern)
        key_before = [g.count_in_memory(h) for h in halves]
        assert min(key_before) >= 1  # the kernel holds the key while the mapping is open
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
        key_after = [g.count_in_memory(h) for h in halves]
    result.notes.update(volume_key_half_copies_before=key_before, volume_key_half_copies_after=key_after)
    check_wiped(result, image)
    assert key_after == [0, 0]


def test_p_under_load_the_realtime_detector_fires_on_the_medium_s_own_uevent(image: Image) -> None:
    """Both loads of bench/vm_detect.py at once while the stick goes: processes reading the
    squashfs (failing once it is gone) and 1,500 uevents a second. The detector thread runs
    SCHED_FIFO, and it fires on the medium's own `remove`, not on a sysfs re-check after
    lost uevents; RAM is clean. How soon, against the reference listener on the guest's
    clock, is written to the JSON (notes.after_reference_ms), measured, not bounded here:
    bench/vm_detect.py takes the medians."""
    result, pattern = live.Result("p-busy"), live.new_pattern()
    with live.boot(image, image.out / "p-busy.log") as g:
        status = live.wait_armed(g)
        assert status["detector"] == "SCHED_FIFO 50", status["detector"]
        fill_and_control(g, result, pattern)
        live.start_load(g, "squashfs")
        live.start_load(g, "storm")
        time.sleep(5)  # both under way
        result.notes["storm_uevents_per_s"] = live.storm_rate(g)
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
    check_wiped(result, image)
    assert result.notes["storm_uevents_per_s"] >= 1000, result.notes  # it was a storm
    assert str(result.notes["trigger"]).startswith("uevent remove "), result.notes
    assert result.notes["after_reference_ms"]["detect"] is not None, result.notes


CHORD = ["ctrl", "alt", "shift", "k"]  # panic_keys = "ctrl+alt+shift+k", in QEMU's key names
PARTS = [CHORD[:3], CHORD[1:], ["ctrl", "alt", "k"], ["ctrl", "shift", "k"], ["k"]]
DRY = "KILLCORD_SOCKET=/run/kc-dry/control.sock"


def status_when(g, text: str, env: str = "", tries: int = 100) -> dict:
    """killcord's status (of the daemon at `env`'s socket) once its JSON holds `text`, or
    the last one after `tries` looks, 0.3 s apart."""
    look = f"{env} killcord status --json 2>/dev/null"
    out = g.run(f"for i in $(seq {tries}); do {look} | grep -qF '{text}' && break; sleep 0.3; done; {look}",
                timeout=tries * 0.5 + 30)["out"]
    return json.loads(out)


def test_q_the_panic_keys_on_the_real_keyboards_and_one_plugged_in_later(image: Image) -> None:
    """The chord through the guest's real input path: QEMU's PS/2 keyboard, then a usb-kbd
    hot-plugged after arming. First a second daemon, in dry-run with its own socket and
    state, reads the PS/2 keyboard: parts of the chord do nothing, the chord fires it (the
    packaged daemon, without panic_keys, stays armed). Then the packaged daemon is
    restarted with panic_keys, a USB keyboard is plugged in, parts of the chord on it do
    nothing, and the chord on it fires for real: kexec, wipe, off, RAM clean."""
    result, pattern = live.Result("q-panic-keys"), live.new_pattern()
    with live.boot(image, image.out / "q-panic-keys.log") as g:
        live.wait_armed(g)
        g.run(f"mkdir -p /run/kc-dry && {DRY} KILLCORD_STATE_DIR=/run/kc-dry KILLCORD_MODE=dry-run KILLCORD_MOR=off "
              "KILLCORD_PANIC_KEYS=ctrl+alt+shift+k setsid -f killcord daemon >/run/kc-dry.log 2>&1 </dev/null")
        dry = status_when(g, '"state": "armed"', DRY)
        ps2 = dry["panic_keys"]["keyboards"]
        assert [k["name"] for k in ps2] == ["AT Translated Set 2 keyboard"], dry["panic_keys"]
        for part in PARTS:
            live.send_keys(g, part)
        after_parts = json.loads(g.run(f"{DRY} killcord status --json")["out"])
        live.send_keys(g, CHORD)
        fired = status_when(g, '"state": "fired"', DRY)
        live_daemon = json.loads(g.run("killcord status --json")["out"])
        g.run(f"kill {dry['pid']} && while kill -0 {dry['pid']} 2>/dev/null; do sleep 0.2; done")

        status = live.restart_with(g, "keys", "panic_keys", "ctrl+alt+shift+k")
        fill_and_control(g, result, pattern)
        g.qmp("device_add", driver="usb-kbd", id="kbd1", bus="xhci.0")
        boards = status_when(g, '"hotplugged": true')["panic_keys"]["keyboards"]
        for part in PARTS:
            live.send_keys(g, part)
        still = json.loads(g.run("killcord status --json")["out"])["state"]
        assert_untouched(g, result, pattern)
        live.trigger_and_measure(g, result, pattern, lambda: live.send_keys(g, CHORD, hold_ms=500))
    result.notes.update(dry_trigger=fired["trigger"], keyboards=boards)
    assert after_parts["state"] == "armed", after_parts["events"]
    assert fired["state"] == "fired" and fired["mode"] == "dry-run", fired
    assert fired["trigger"].startswith("panic keys ctrl+alt+shift+k on /dev/input/event"), fired["trigger"]
    assert fired["trigger"].endswith("(AT Translated Set 2 keyboard)"), fired["trigger"]
    assert live_daemon["state"] == "armed" and live_daemon["panic_keys"] is None
    assert status["panic_keys"]["sched"] == "SCHED_FIFO 50", status["panic_keys"]
    assert [k["name"] for k in status["panic_keys"]["keyboards"]] == ["AT Translated Set 2 keyboard"]
    usb = [k for k in boards if k["hotplugged"]]
    assert len(usb) == 1 and "USB Keyboard" in usb[0]["name"], boards
    assert still == "armed"
    assert str(result.notes["trigger"]).startswith("panic keys ctrl+alt+shift+k on "), result.notes
    assert str(result.notes["trigger"]).endswith("USB Keyboard)"), result.notes
    check_wiped(result, image)


def test_r_a_grace_period_tells_the_console_then_fires(image: Image) -> None:
    """grace_ms = 3000: the stick pulled, the console shows the notice at once (the
    daemon's critical line, through /dev/kmsg, under `quiet`), nothing fires until the
    period ends, then the whole path runs and RAM is clean. The medium is identified by the
    stick's USB serial number, the identity a stick plugged back in would be found by."""
    result, pattern = live.Result("r-grace"), live.new_pattern()
    with live.boot(image, image.out / "r-grace.log") as g:
        live.wait_armed(g)
        status = live.restart_with(g, "grace", "grace_ms", "3000")
        fill_and_control(g, result, pattern)
        t0 = time.monotonic()
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
        grace = live.line_after(g, r"killcord: grace seconds=3 ", t0)
        jump = live.line_after(g, r"kexec_core: Starting new kernel", t0)
        fire = live.fire_line_after(g, t0)
    assert status["grace"]["ms"] == 3000 and status["grace"]["back_if"].startswith("serial:"), status["grace"]
    assert grace is not None and "back_if=serial:" in grace.text, "no notice on the console"
    assert fire is not None and jump is not None
    waited = live.guest_seconds(fire) - live.guest_seconds(grace)
    result.notes.update(grace_line=grace.text, fired_after_grace_s=round(waited, 3), trigger=result.notes.get("trigger"))
    assert waited >= 2.9, result.notes  # not before the period ended
    assert str(result.notes["trigger"]).endswith("gone still when the grace period ended"), result.notes
    check_wiped(result, image)


# A variable of the test's own (OVMF write-protects MemoryOverwriteRequestControl: below)
TEST_VARIABLE = "KillcordTestMor-5f0a3c1e-8b7d-4e2a-9c6f-1d2e3f405162"
MOR_IN_GUEST = ("import sys, json; sys.path.insert(0, '/usr/lib/killcord'); from killcord import mor; "
                "print(json.dumps(mor.arm(True, name='{name}').as_dict()))")


def test_mor_through_the_real_efivarfs_of_an_ovmf_guest(image: Image) -> None:
    """Debian's OVMF offers no MemoryOverwriteRequestControl (tried: plain, with a swtpm TPM
    2.0, and the secure-boot SMM build); its variable driver, unable to guard the variable
    without SMM, deletes and write-protects it (creating it fails with EIO). So: killcord
    arms under OVMF and says the firmware offers none, having found the real efivarfs; then
    mor.py, as installed, sets a variable the test planted under a name of its own, through
    that real efivarfs and into OVMF's store: the value's ClearMemory and DisableAutoDetect
    bits set, the attributes kept, efivarfs's immutable flag lifted and put back."""
    var = f"/sys/firmware/efi/efivars/{TEST_VARIABLE}"
    with live.boot(image, image.out / "mor-ovmf.log", uefi=True) as g:
        status = live.wait_armed(g)
        planted = g.run(f"printf '\\007\\000\\000\\000\\002' > {var} && od -An -tx1 {var} && lsattr {var}")
        written = json.loads(g.run(f"python3 -c \"{MOR_IN_GUEST.format(name=TEST_VARIABLE)}\"")["out"])
        after = g.run(f"od -An -tx1 {var}; lsattr {var}")["out"].split()
        check = g.run("killcord check --json", check=False)["out"]
    assert status["mor"] == {"offered": False, "value": None, "is_set": False,
                             "note": "this firmware offers no MemoryOverwriteRequestControl"}, status["mor"]
    item = next(i for i in json.loads(check)["items"] if i["name"] == "mor")
    assert item["ok"] and "not offered" in item["detail"], item
    before = planted["out"].split()
    assert before[:5] == ["07", "00", "00", "00", "02"] and "i" in before[5], before  # efivarfs: immutable
    assert written["is_set"] and written["value"] == 0x13, written  # 0x02 kept
    assert after[:5] == ["07", "00", "00", "00", "13"] and "i" in after[5], after


def test_o_keys_are_gone_right_after_the_kill(image: Image, tmp_path: Path) -> None:
    """Keys first: the guest is stopped (QMP stop) as soon as the console shows the keys
    stage, and dumped there. The volume key must be gone from RAM at that point while the
    rest is not wiped yet (the first kernel runs init_on_free=0, so the killed process's
    128 MiB are still there); then the guest goes on, and the kexec target clears the rest.
    Times are the guest's own clock, from killcord's detection (its `fire` line) to the line
    that ends the keys stage: the key is gone by then at the latest."""
    extra = live.usb_drive(tmp_path / "luks.img", "luks", "64M")
    result, pattern = live.Result("o-keys-first"), live.new_pattern()
    with live.boot(image, image.out / "o-keys-first.log", extra_args=extra, append="init_on_free=0") as g:
        live.wait_armed(g)
        halves = live.open_luks(g)
        fill_and_control(g, result, pattern)
        key_before = g.counts_in_memory(*halves)
        assert min(key_before) >= 1
        t0 = time.monotonic()
        g.qmp("device_del", id="stick")
        i, keys_line = g.wait_for(r"killcord: stage stage=keys ", 60)
        g.qmp("stop")
        stopped_after_ms = round((time.monotonic() - keys_line.at) * 1000, 1)
        *key_at_stop, pattern_at_stop = g.counts_in_memory(*halves, pattern)
        console = g.text()
        g.qmp("cont")
        t_off = g.wait_status("shutdown", 300)
        result.powered_off = True
        result.pattern_bytes_left = live.pattern_bytes(g, pattern)
        key_after = g.counts_in_memory(*halves)
    fire = next(line for line in console.splitlines() if "killcord: fire " in line)
    kill_line = next(line for line in console.splitlines() if "killcord: stage stage=kill " in line)
    # The fire line is written the moment the keys stage has ended, and says how long after
    # the detection (logged_after_ms, the daemon's clock, the guest's): the keys were gone then.
    detect_to_keys_gone = round(1000 * live.logged_after_s(fire), 1)
    kill_ms = float(re.search(r"stage=kill outcome=\w+ duration_ms=([\d.]+)", kill_line)[1])
    keys_ms = float(re.search(r"stage=keys outcome=\w+ duration_ms=([\d.]+)", keys_line.text)[1])
    result.timings_ms = {"unplug_to_poweroff": round((t_off - t0) * 1000, 1),
                         "guest_detect_to_keys_gone": detect_to_keys_gone,
                         "guest_kill_stage": kill_ms, "guest_keys_stage": keys_ms,
                         "host_keys_line_to_stop": stopped_after_ms}
    result.notes.update(keys_stage=keys_line.text.split("killcord: stage ", 1)[1][:400],
                        key_half_copies_before=key_before, key_half_copies_at_stop=key_at_stop,
                        pattern_bytes_at_stop=pattern_at_stop * len(pattern),
                        jumped_before_the_stop="kexec_core: Starting new kernel" in console,
                        key_half_copies_after=key_after)
    check_wiped(result, image)
    assert "outcome=done" in keys_line.text and "'name': 'secret'" in keys_line.text, keys_line.text
    assert "realtime=ok" in fire, fire  # the kill and the keys ran SCHED_FIFO
    assert key_at_stop == [0, 0], result.as_dict()
    # the rest of RAM was not wiped yet: the killed process's pages still hold the pattern
    assert pattern_at_stop * len(pattern) >= 0.5 * result.pattern_bytes_written, result.as_dict()
    assert key_after == [0, 0]
    # detect_to_keys_gone is measured, not bounded here: issue 11 asks for 50 ms under TCG,
    # which the kill's /proc scan and the console lines before the keys stage still exceed


# The target's wiper replaced for scenario m: it wipes nothing and reports what the kernel
# says of its own clearing, so that what the dump finds is what the kernel's boot left.
NO_WIPE = b"""#!/bin/sh
echo "<2>killcord-wipe: skipped (scenario m: no wipe pass); kernel: $(dmesg | grep -o 'mem auto-init:.*')" > /dev/kmsg
exit 0
"""


@pytest.mark.parametrize("target_init_on_free", [1, 0])
def test_m_the_targets_boot_alone_clears_ram(image: Image, target_init_on_free: int) -> None:
    """What the kexec target's boot clears by itself, the wipe pass turned off. The first
    kernel runs init_on_free=0, so the killed process's pages keep the pattern until the
    target boots. The test stages killcord's wipe target again with killcord-wipe replaced
    by a stand-in that wipes nothing (a cpio appended to it overrides the file) and the
    command line killcord built. With init_on_free=1 on the target (killcord's line) the
    boot alone leaves at most 16 KiB; with init_on_free=0 last (the control) most of the
    pattern survives, so the dump could have seen what the boot left."""
    name = f"m-boot-clearing-iof{target_init_on_free}"
    result, pattern = live.Result(name), live.new_pattern()
    stub = base64.b64encode(wipetarget.newc([("usr/lib/killcord/killcord-wipe", 0o100755, NO_WIPE, 0)])).decode()
    with live.boot(image, image.out / f"{name}.log", append="init_on_free=0") as g:
        status = live.wait_armed(g)
        staged = status["kexec"]
        assert staged["loaded"] and "init_on_free=1" in staged["cmdline"], staged
        cmdline = staged["cmdline"] + ("" if target_init_on_free else " init_on_free=0")
        # The kernel reads an uncompressed archive after a compressed one only at a 4-byte
        # aligned offset (init/initramfs.c, unpack_to_rootfs; zeros between are skipped): pad.
        g.run(f"echo {stub} | base64 -d > /run/no-wipe.cpio && cat {staged['initrd']} > /run/initrd-no-wipe.img && "
              f"truncate -s %4 /run/initrd-no-wipe.img && cat /run/no-wipe.cpio >> /run/initrd-no-wipe.img && "
              f"kexec -l {staged['kernel']} --initrd=/run/initrd-no-wipe.img --append='{cmdline}'")
        fill_and_control(g, result, pattern)
        t0 = time.monotonic()
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
        skipped = live.first_line_after(g, r"killcord-wipe: skipped", t0)
        console = g.text()
    report = [line for line in console.splitlines() if "killcord-wipe: skipped" in line]
    result.notes["target_cmdline"] = cmdline
    result.notes["target_kernel_says"] = report[0].split("kernel: ", 1)[1] if report else None
    result.timings_ms["unplug_to_target_userspace"] = live.ms(skipped, t0)
    result.write(image.out)
    assert "Initramfs unpacking failed" not in console, "the target's initrd (with the stand-in) did not unpack"
    assert report, "the target never ran its (stand-in) wiper"
    assert "killcord-wipe: wiped" not in console  # nothing but the boot cleared
    assert f"heap free:{'on' if target_init_on_free else 'off'}" in report[0], report[0]
    assert result.powered_off
    if target_init_on_free:
        check_wiped(result, image)
    else:
        assert result.pattern_bytes_left >= 0.5 * result.pattern_bytes_written, result.as_dict()


# ---- the extended scenarios: `make test-vm-all` (conftest.CI_MATRIX: what CI runs per suite) ----

def fill_file(g, pattern: bytes, path: str, mib: int = 64) -> int:
    copies = mib * 1024 * 1024 // len(pattern)
    g.run(f"python3 -c \"open('{path}', 'wb').write(bytes.fromhex('{pattern.hex()}') * {copies})\"")
    return copies * len(pattern)


@pytest.mark.extended
@pytest.mark.parametrize(("scenario", "path"), [("b-tmpfs", "/dev/shm/secret"), ("c-overlay-root", "/root/secret")])
def test_bc_files_in_ram_file_systems_are_wiped(image: Image, scenario: str, path: str) -> None:
    result, pattern = live.Result(scenario), live.new_pattern()
    with live.boot(image, image.out / f"{scenario}.log") as g:
        live.wait_armed(g)
        result.free_bytes_before_fill = live.mem_free_bytes(g)
        result.pattern_bytes_written = fill_file(g, pattern, path)
        control(g, result, pattern)
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
    check_wiped(result, image)


@pytest.mark.extended
def test_d_vfat_drive_caches_are_wiped(image: Image, tmp_path: Path) -> None:
    extra = live.usb_drive(tmp_path / "vfat.img", "vfat", "96M")
    result, pattern = live.Result("d-vfat"), live.new_pattern()
    with live.boot(image, image.out / "d-vfat.log", extra_args=extra) as g:
        live.wait_armed(g)
        result.free_bytes_before_fill = live.mem_free_bytes(g)
        dev = live.device_of_size(g, 96 << 20)
        g.run(f"mkfs.vfat -I {dev} >/dev/null && mkdir -p /mnt/vfat && mount -t vfat {dev} /mnt/vfat")
        # read cache: written, flushed, dropped, read back; write cache: written, not flushed
        written = fill_file(g, pattern, "/mnt/vfat/read-cache", 16)
        g.run("sync && echo 3 > /proc/sys/vm/drop_caches && cat /mnt/vfat/read-cache > /dev/null")
        written += fill_file(g, pattern, "/mnt/vfat/write-cache", 16)
        result.pattern_bytes_written = written
        control(g, result, pattern)
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
    check_wiped(result, image)


def test_i_killcord_killed_and_the_stick_pulled_at_once_the_standby_fires(image: Image) -> None:
    """killcord.service killed with SIGKILL (every process of the unit, as `systemctl kill`
    does) and the stick pulled at once. The restarted daemon cannot start without the stick
    on Debian 13 (its Python reads the squashfs); the standby, a fork of the armed daemon in
    a scope unit of its own, is not in the unit, so it lives on, takes over and fires."""
    result, pattern = live.Result("i-restart"), live.new_pattern()
    with live.boot(image, image.out / "i-restart.log") as g:
        status = live.wait_armed(g)
        scope = g.run(f"systemctl show -p ActiveState --value {status['standby']['scope']}", check=False)["out"]
        fill_and_control(g, result, pattern)

        def pull_while_down() -> None:
            g.run("systemctl kill --signal=KILL killcord.service")  # systemd restarts it (Restart=always)
            g.qmp("device_del", id="stick")

        live.trigger_and_measure(g, result, pattern, pull_while_down)
        console = g.text()
    spare = status["standby"]
    assert spare["scope"] == f"killcord-standby-{spare['pid']}.scope" and scope.strip() == "active", (spare, scope)
    assert f"killcord: standby_takeover daemon_pid={status['pid']} pid={spare['pid']}" in console
    assert "killcord: fire trigger=medium absent" in console or "killcord: fire trigger=uevent" in console
    result.notes["standby"] = spare
    check_wiped(result, image)


@pytest.mark.extended
def test_j_suspend_keeps_armed_and_a_stick_pulled_asleep_fires_on_resume(image: Image) -> None:
    result, pattern = live.Result("j-suspend"), live.new_pattern()
    with live.boot(image, image.out / "j-suspend.log", s3=True) as g:
        live.wait_armed(g)
        fill_and_control(g, result, pattern)

        # suspend and resume with the stick in: nothing fires; the sleep hook asked the
        # daemon to re-check, and the check found the medium
        live.suspend(g)
        g.wakeup()
        g.wait_agent(120)
        g.run("until journalctl -b -o cat | grep -q 'killcord-sleep: resumed from suspend'; do sleep 0.5; done",
              timeout=60)
        status = json.loads(g.run("killcord status --json")["out"])
        assert status["state"] == "armed" and status["stages"] == [], status
        checks = [e for e in status["events"] if e["event"] == "MediumCheck" and e["reason"] == "resume"]
        assert checks and checks[-1]["present"] and not checks[-1]["fired"], status["events"]
        assert_untouched(g, result, pattern)
        result.notes["resumed_with_stick_in"] = "armed, nothing fired"

        # the stick pulled while the machine sleeps: it fires on resume
        live.suspend(g)
        asleep, woken = 1.0, []

        def pull_asleep_then_wake() -> None:
            g.qmp("device_del", id="stick")
            time.sleep(asleep)
            woken.append(time.monotonic())
            g.wakeup()

        live.trigger_and_measure(g, result, pattern, pull_asleep_then_wake)
        console = g.text()
        detect = live.detected_at(g, woken[0])
    result.notes["asleep_after_unplug_ms"] = asleep * 1000
    result.notes["wakeup_to_detect_ms"] = live.ms(detect, woken[0])
    fired = [line for line in console.splitlines() if "killcord: fire " in line]
    assert fired, "killcord never fired"
    result.notes["fired_by"] = fired[0].split("killcord: fire ", 1)[1]
    check_wiped(result, image)
