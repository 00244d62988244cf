"""killcord-shutdown closes dm-crypt mappings by their target type (crypt), not by the
CRYPT- prefix cryptsetup gives their uuids: a mapping made by `dmsetup create` or another
tool holds a key just the same.

Only the closing step runs (`killcord-shutdown --close-crypt NAME...`), and only on the
test's own mappings: the host's are never touched. It runs in a sandbox all the same (mount
and PID namespaces, fake_dev_kmsg over /dev/kmsg, fake_sysrq over /proc/sysrq-trigger), so
that a script which went on to the rest of the shutdown could not end this machine.

Where the kernel has device-mapper, a real crypt mapping on a loop device is closed. Where it
has none (this test's usual host has no dm_mod), fake_dmsetup, bound over /usr/sbin/dmsetup,
models the kernel's mapping table.

KILLCORD_SHUTDOWN=/path/to/killcord-shutdown runs these tests against another copy.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, needs_root

SHUTDOWN = Path(os.environ.get("KILLCORD_SHUTDOWN", ROOT / "initramfs-hooks" / "killcord-shutdown"))
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
DMSETUP = "/usr/sbin/dmsetup"  # where the script finds it (PATH=/bin:/sbin:...; /sbin is /usr/sbin)

pytestmark = needs_root

# The kernel's mapping table as files: STATE/NAME holds "TYPE UUID". Every call is logged.
FAKE_DMSETUP = r"""#!/bin/sh
# fake_dmsetup: the dmsetup commands killcord-shutdown uses, on a table kept in files
state=@STATE@
echo "$*" >> "$state.log"
case "$1" in
--is-fake) echo fake_dmsetup ;;
ls)
	[ "$2 $3" = "--target crypt" ] || { echo "fake_dmsetup: unsupported: $*" >&2; exit 2; }
	found=no minor=0
	for f in "$state"/*; do
		[ -f "$f" ] || continue
		minor=$((minor + 1))
		read -r type _ < "$f"
		[ "$type" = crypt ] || [ "$type" = crypt-stuck ] || continue
		printf '%s\t(253:%s)\n' "${f##*/}" "$minor"; found=yes
	done
	[ "$found" = yes ] || echo "No devices found"
	;;
wipe_table|remove)
	name=$2; [ "$name" = --force ] && name=$3
	[ -f "$state/$name" ] || { echo "Device does not exist." >&2; exit 1; }
	read -r type uuid < "$state/$name"
	if [ "$type" = crypt-stuck ]; then
		echo "device-mapper: reload ioctl on $name failed: Device or resource busy" >&2; exit 1
	fi
	if [ "$1" = wipe_table ]; then echo "error $uuid" > "$state/$name"; else rm "$state/$name"; fi
	;;
*) echo "fake_dmsetup: unsupported: $*" >&2; exit 2 ;;
esac
"""


@dataclass
class Run:
    rc: int
    console: list[str]  # the script's /dev/kmsg lines, without "<2>killcord-shutdown: "
    stderr: str
    sysrq: str  # what reached fake_sysrq: must stay empty

    def text(self) -> str:
        return "\n".join(self.console) + f"\n(exit {self.rc})\nstderr: {self.stderr}"


def close_crypt(tmp_path: Path, names: list[str], fake_dmsetup: Path | None = None) -> Run:
    """killcord-shutdown --close-crypt NAMES, sandboxed; with fake_dmsetup bound over the real
    one when given."""
    text = SHUTDOWN.read_text()
    if '= --close-crypt ]' not in text:
        pytest.fail(f"{SHUTDOWN} has no --close-crypt: its closing step cannot be run alone, and running the "
                    "whole script would unmount, wipe and power off")
    kmsg, sysrq = tmp_path / "fake_dev_kmsg", tmp_path / "fake_sysrq"
    os.mkfifo(kmsg)
    sysrq.write_text("")
    # a kernel without magic SysRq has no /proc/sysrq-trigger: nothing to shield then
    setup = ('set -e; /bin/mount --bind "$1" /dev/kmsg; '
             'if [ -e /proc/sysrq-trigger ]; then /bin/mount --bind "$2" /proc/sysrq-trigger; fi; ')
    if fake_dmsetup:
        setup += (f'/bin/mount --bind "$3" {DMSETUP}; [ "$({DMSETUP} --is-fake)" = fake_dmsetup ] || '
                  '{ echo "fake_dmsetup not in place" >&2; exit 99; }; ')
    setup += 'shift 3; exec "$@"'
    argv = [UNSHARE, "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
            "/bin/sh", "-c", setup, "setup", str(kmsg), str(sysrq), str(fake_dmsetup or "-"),
            "/bin/sh", str(SHUTDOWN), "--close-crypt", *names]
    fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
    finally:
        os.close(fd)
    assert p.returncode != 99, p.stderr
    console = [x.removeprefix("<2>killcord-shutdown: ") for x in raw.decode().splitlines()]
    return Run(p.returncode, console, p.stderr, sysrq.read_text())


# ---- with fake_dmsetup: the closing logic, wherever the kernel has no device-mapper ----


@pytest.fixture
def fake_table(tmp_path: Path) -> Callable[[dict[str, str]], tuple[Path, Path]]:
    def make(devices: dict[str, str]) -> tuple[Path, Path]:
        state = tmp_path / "fake_dm_table"
        state.mkdir()
        for name, line in devices.items():
            (state / name).write_text(line + "\n")
        tool = tmp_path / "fake_dmsetup"
        tool.write_text(FAKE_DMSETUP.replace("@STATE@", str(state)))
        tool.chmod(0o755)
        return state, tool
    return make


def test_crypt_mappings_are_closed_whatever_their_uuid(tmp_path: Path, fake_table: Callable) -> None:
    state, tool = fake_table({
        "kc-plain": "crypt KCTEST-plain",           # dmsetup create: no CRYPT- uuid
        "kc-luks": "crypt CRYPT-LUKS2-0123-kc-luks",  # cryptsetup's
        "kc-linear": "linear CRYPT-looks-like-one",  # not a crypt target: no key to wipe
        "host-root": "crypt CRYPT-LUKS2-host-root",  # not named: stays
    })
    r = close_crypt(tmp_path, ["kc-plain", "kc-luks", "kc-linear"], tool)
    assert r.rc == 0, r.text()
    assert sorted(p.name for p in state.iterdir()) == ["host-root", "kc-linear"]
    calls = (tmp_path / "fake_dm_table.log").read_text().splitlines()
    assert [c for c in calls if not c.startswith(("ls ", "--is-fake"))] == [
        "wipe_table kc-luks", "remove kc-luks", "wipe_table kc-plain", "remove kc-plain"]  # key freed first
    assert "closed dm-crypt: kc-luks kc-plain" in r.console, r.text()
    assert "not dm-crypt mappings, left alone: kc-linear" in r.console, r.text()
    assert r.sysrq == ""


def test_every_crypt_mapping_is_closed_when_none_is_named(tmp_path: Path, fake_table: Callable) -> None:
    state, tool = fake_table({"a": "crypt KCTEST-a", "b": "crypt CRYPT-PLAIN-b", "c": "linear LVM-c"})
    r = close_crypt(tmp_path, [], tool)
    assert r.rc == 0, r.text()
    assert sorted(p.name for p in state.iterdir()) == ["c"]
    assert "closed dm-crypt: a b" in r.console, r.text()


def test_a_mapping_that_cannot_be_closed_is_reported(tmp_path: Path, fake_table: Callable) -> None:
    state, tool = fake_table({"kc-busy": "crypt-stuck KCTEST-busy", "kc-ok": "crypt KCTEST-ok"})
    r = close_crypt(tmp_path, ["kc-busy", "kc-ok"], tool)
    assert r.rc == 1, r.text()
    assert sorted(p.name for p in state.iterdir()) == ["kc-busy"]
    assert "closed dm-crypt: kc-ok" in r.console, r.text()
    assert "could not close dm-crypt (key may remain): kc-busy" in r.console, r.text()


# ---- with the kernel's device-mapper, where there is one ----


def _device_mapper() -> bool:
    if shutil.which("dmsetup") is None:
        return False
    return subprocess.run(["dmsetup", "version"], capture_output=True).returncode == 0


@pytest.fixture
def real_mappings(loopdev: Callable[..., str]) -> Iterator[dict[str, str]]:
    """A crypt mapping whose uuid is not CRYPT-... and a linear one whose uuid is, on a
    loop device, with a random key; both removed afterwards if still there."""
    if not _device_mapper():
        pytest.skip("this kernel has no device-mapper (dmsetup version fails); fake_dmsetup covers the logic")
    dev = loopdev(8)
    tag = secrets.token_hex(4)
    names = {"crypt": f"kc-test-crypt-{tag}", "linear": f"kc-test-linear-{tag}"}
    key = secrets.token_hex(64)  # aes-xts-plain64 with a 512-bit key
    subprocess.run(["dmsetup", "create", names["crypt"], "--uuid", f"KCTEST-{tag}",
                    "--table", f"0 16384 crypt aes-xts-plain64 {key} 0 {dev} 0"], check=True)
    subprocess.run(["dmsetup", "create", names["linear"], "--uuid", f"CRYPT-KCTEST-{tag}",
                    "--table", f"0 16384 linear {dev} 0"], check=True)
    try:
        yield names
    finally:
        for name in names.values():
            subprocess.run(["dmsetup", "remove", "--force", name], capture_output=True)


def _exists(name: str) -> bool:
    return subprocess.run(["dmsetup", "info", name], capture_output=True).returncode == 0


def test_a_real_crypt_mapping_without_a_crypt_uuid_is_closed(tmp_path: Path, real_mappings: dict[str, str]) -> None:
    r = close_crypt(tmp_path, [real_mappings["crypt"], real_mappings["linear"]])
    assert r.rc == 0, r.text()
    assert not _exists(real_mappings["crypt"])
    assert _exists(real_mappings["linear"])  # its CRYPT- uuid does not make it a crypt mapping
    assert f"closed dm-crypt: {real_mappings['crypt']}" in r.console, r.text()
    assert r.sysrq == ""
