"""Proof on an installed system with dracut (Debian 13, dracut 106): the system lives on a
USB stick (a portable install, tests/vm/installed.py), killcord watches the device behind
`/`, and its kexec target is the installed kernel with the initrd dracut made, whose
killcord module (initramfs-hooks/dracut/90killcord) wipes when the command line says
killcord.wipe=1. Each scenario writes out/vm/trixie-dracut/<scenario>.json and its console
to <scenario>.log, as test_live.py does.

a: pull the stick: kexec into the dracut initrd, wipe, power off (CI runs this one).
b: kexec refused from boot: the daemon's own fallback frees, wipes and powers off with
   reboot(2). That path execs nothing, so neither dracut's shutdown (its restore of
   /run/initramfs, its shutdown hooks, 90killcord's among them) nor killcord's own
   shutdown root runs: the test says so from the console.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from . import live
from .installed import ROOT_LABEL, SUITE, Installed, build
from .image import ROOT, find_deb
from .qemu import Guest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mmdebstrap builds the guest (CI runs as root)"),
]

BASE_APPEND = f"root=LABEL={ROOT_LABEL} rw console=ttyS0 quiet init_on_free=1 killcord_ci=agent systemd.show_status=0"
DRACUT_WIPE_HOOK = "var/lib/dracut/hooks/cmdline/00-killcord-wipe-hook.sh"  # as lsinitrd lists it


@pytest.fixture(scope="module")
def installed() -> Installed:
    try:
        deb = find_deb(SUITE)
    except FileNotFoundError:
        subprocess.run(["make", "-C", str(ROOT), "deb", f"SUITE={SUITE}"], check=True)
        deb = find_deb(SUITE)
    image = build(deb)
    assert DRACUT_WIPE_HOOK in image.initrd_listing, "killcord's dracut module is not in the initrd"
    image.out.mkdir(parents=True, exist_ok=True)
    return image


def boot(image: Installed, log: Path, append: str = "") -> Guest:
    """Boot the installed system from the stick (qemu-xhci + usb-storage, id "stick"), with
    its own kernel and dracut initrd; the stick's writes go to a throw-away snapshot."""
    args = [
        "-kernel", str(image.vmlinux), "-initrd", str(image.initrd),
        "-append", f"{BASE_APPEND} {append}".strip(),
        "-device", "qemu-xhci,id=xhci",
        "-drive", f"if=none,id=stickdrive,format=raw,file={image.disk},snapshot=on",
        "-device", "usb-storage,bus=xhci.0,drive=stickdrive,id=stick,removable=on",
    ]
    return Guest(args, memory_mib=1024, cpus=2, log=log, agent=True, stop_on_poweroff=True)


def fill_and_control(g: Guest, result: live.Result, pattern: bytes) -> None:
    """128 MiB of the pattern in a process; the dump must see (almost) all of it."""
    result.free_bytes_before_fill = live.mem_free_bytes(g)
    result.pattern_bytes_written = live.fill_process(g, pattern)
    result.pattern_bytes_found_before = live.pattern_bytes(g, pattern)
    assert result.pattern_bytes_found_before >= 0.99 * result.pattern_bytes_written, result.as_dict()


def console_since(g: Guest, t0: float) -> str:
    return "\n".join(line.text for line in list(g.lines) if line.at >= t0)


def check_wiped(image: Installed, result: live.Result) -> None:
    result.write(image.out)
    assert result.powered_off
    assert result.pattern_bytes_left is not None
    assert result.pattern_bytes_left <= live.MAX_LEFT_BYTES, result.as_dict()


def armed_on_root(g: Guest, image: Installed) -> dict:
    status = live.wait_armed(g)
    medium = status["medium"]
    assert medium["source"] == "root" and medium["device"] == "/dev/sda1", medium
    assert g.run("findmnt -no SOURCE /")["out"].strip() == "/dev/sda1"
    return status


def test_a_unplug_kexecs_into_the_dracut_initrd_which_wipes(installed: Installed) -> None:
    result, pattern = live.Result("a-process"), live.new_pattern()
    with boot(installed, installed.out / "a-process.log") as g:
        status = armed_on_root(g, installed)
        assert status["kexec"]["initrd_kind"] == "wipe-target", status["kexec"]  # what it stages by itself
        # this scenario proves dracut's own initrd with killcord's module as the target
        status = live.restage_with_initrd(g, f"/boot/initrd.img-{installed.release}")
        kexec = status["kexec"]
        assert kexec["loaded"], kexec
        # the installed kernel and the initrd dracut made for it, read from the stick at arm time
        assert (kexec["kernel"], kexec["initrd"]) == (f"/boot/vmlinuz-{installed.release}",
                                                      f"/boot/initrd.img-{installed.release}"), kexec
        fill_and_control(g, result, pattern)
        t0 = time.monotonic()
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
        after = console_since(g, t0)
    result.notes.update(medium=status["medium"]["device"], chain=status["medium"]["chain"],
                        kexec_method=kexec["method"], initrd=kexec["initrd"])
    check_wiped(installed, result)
    t = result.timings_ms
    assert t["unplug_to_detect"] is not None and t["unplug_to_kexec"] is not None
    # the wipe ran in the target's dracut initrd: 90killcord's cmdline hook says so, after
    # killcord-wipe's own report
    assert t["unplug_to_wiped"] is not None
    assert "killcord: wipe finished (exit 0), poweroff now" in after, after[-3000:]


@pytest.mark.extended
def test_b_without_kexec_the_daemon_fallback_wipes(installed: Installed) -> None:
    result, pattern = live.Result("b-fallback"), live.new_pattern()
    with boot(installed, installed.out / "b-fallback.log", append="sysctl.kernel.kexec_load_disabled=1") as g:
        status = armed_on_root(g, installed)
        assert not status["kexec"]["loaded"], status["kexec"]
        # Who owns /run/initramfs on a dracut system: killcord-shutdown-prepare builds it at
        # boot, and dracut-shutdown.service (which would unpack the initrd from /boot into
        # it at a normal shutdown) is skipped for it. Neither is on the fallback's path.
        owner = g.run("readlink /run/initramfs/shutdown; "
                      "systemctl show -P ConditionResult dracut-shutdown.service")["out"].split()
        result.notes["shutdown_root"] = {"shutdown": owner[0], "dracut_shutdown_condition": owner[1]}
        assert owner == ["./usr/lib/killcord/killcord-shutdown", "no"], owner
        fill_and_control(g, result, pattern)
        t0 = time.monotonic()
        live.trigger_and_measure(g, result, pattern, live.unplug_stick(g))
        after = console_since(g, t0)
    check_wiped(installed, result)
    assert "killcord: poweroff wiped_ok=True" in after, after[-3000:]
    assert not live.sysrq_fired(after)
    assert result.timings_ms["unplug_to_kexec"] is None
    # The daemon powered off with reboot(2) itself: PID 1 never reached systemd-shutdown, so
    # no shutdown root ran (dracut's hooks nor killcord-shutdown) and no wipe but the daemon's.
    assert "killcord-shutdown" not in after and "killcord-wipe:" not in after, after[-3000:]
