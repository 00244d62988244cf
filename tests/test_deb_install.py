"""Each built package installed with apt into a fresh chroot of its own suite (Debian 13
trixie, Debian 12 bookworm): apt resolves its dependencies from that suite, the postinst
runs, the hook lands in the initramfs, and killcord runs under that suite's python3.

The chroot is a base system with a kernel and initramfs-tools (what a machine killcord is
installed on has), from a tarball cached under .cache/chroot/ (packaging/suite_chroot.py,
the mirror from this machine's apt sources). Root: mmdebstrap, unshare, chroot. Network:
apt fetches the dependencies. About 2-3 minutes a suite once the tarball is cached; both
suites install at once.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import killcord
from conftest import load_suite_chroot, needs_root

ROOT = Path(__file__).resolve().parent.parent
SUITES = {"trixie": "3.13", "bookworm": "3.11"}  # suite: its python3

pytestmark = [pytest.mark.root, needs_root]


# Runs in the chroot; /work is the test's directory. What it saw goes to /work/*.txt for the
# assertions, so that a failure shows the evidence.
SCRIPT = r"""
apt-get update -q > /work/apt.log 2>&1
apt-get install -y -q /work/{deb} >> /work/apt.log 2>&1
python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' > /work/python.txt
killcord --version > /work/version.txt 2>&1
rc=0; killcord check --json > /work/check.json 2> /work/check.err || rc=$?
echo "$rc" > /work/check.rc
cp /etc/killcord/killcord.toml /work/killcord.toml
cp /etc/memlockd.d/killcord.cfg /work/memlockd.cfg
lsinitramfs /boot/initrd.img-* > /work/initrd.txt
killcord wipe-target verify --json > /work/wipe-target.json 2>&1
# where the launcher's path finds pydantic (Debian's on 13, the vendored one on 12)
python3 -I -c '
import os, sys
sys.path[0:0] = ["/usr/lib/killcord"] + (["/usr/lib/killcord/vendor"] if os.path.isdir("/usr/lib/killcord/vendor") else [])
import pydantic, pydantic_settings
print(pydantic.__file__, pydantic.VERSION, pydantic_settings.__file__)
' > /work/pydantic.txt
# the daemon's imports under MemoryDenyWriteExecute=, which systemd >= 254 applies with the
# PR_SET_MDWE prctl (kernel >= 6.3), inherited by all it runs; every module, warnings as errors
python3 -I -W error -c '
import ctypes, importlib, os, pkgutil, sys
assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0, "PR_SET_MDWE"
sys.path[0:0] = ["/usr/lib/killcord"] + (["/usr/lib/killcord/vendor"] if os.path.isdir("/usr/lib/killcord/vendor") else [])
import killcord
names = [m.name for m in pkgutil.iter_modules(killcord.__path__)]
for name in names:
    importlib.import_module("killcord." + name)
print("imported", len(names), "modules under MDWE")
' > /work/mdwe.txt 2>&1
# the units as this suite's systemd reads them
rc=0; systemd-analyze verify --man=no "$(readlink -f /lib/systemd/system/killcord.service)" \
    "$(readlink -f /lib/systemd/system/killcord-shutdown-prepare.service)" > /work/verify.txt 2>&1 || rc=$?
echo "$rc" > /work/verify.rc
"""


def install(sc, suite: str, deb: Path, tmp_path: Path) -> int:  # noqa: ANN001 (suite_chroot)
    """Build (or take) the suite's chroot, install `deb` in it and run SCRIPT: its exit status;
    what it saw is in tmp_path/work, its output in tmp_path/chroot.log."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(deb, work / deb.name)
    with (tmp_path / "chroot.log").open("w") as log:
        return sc.run(sc.tarball(suite, "install", log=log), work, SCRIPT.format(deb=deb.name),
                      ROOT / "out" / "build", log=log)


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory):
    """Both suites' installs at once: each is mostly one process at a time (mmdebstrap, apt,
    dpkg, the initramfs): on 2 cores the two overlap."""
    debs = {s: sorted((ROOT / "out" / "deb" / s).glob("killcord_*.deb")) for s in SUITES}
    sc = load_suite_chroot()
    with ThreadPoolExecutor(max_workers=len(SUITES)) as pool:
        yield {s: (tmp, pool.submit(install, sc, s, found[-1], tmp))
               for s, found in debs.items() if found
               for tmp in [tmp_path_factory.mktemp(f"install-{s}")]}


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_installs_in_a_fresh_chroot_of_its_suite_and_runs(suite: str, installs) -> None:
    if suite not in installs:
        pytest.skip(f"needs a built package: out/deb/{suite}/killcord_*.deb does not exist (run `make deb`)")
    tmp_path, running = installs[suite]
    work = tmp_path / "work"
    rc = running.result()

    def seen(name: str) -> str:
        f = work / name
        return f.read_text() if f.exists() else f"<{name} not written>"

    assert rc == 0, f"{suite}: the install or a command failed (exit {rc})\n" \
                    f"{(tmp_path / 'chroot.log').read_text()[-3000:]}\n{seen('apt.log')[-3000:]}"
    # that suite's interpreter, and killcord runs under it
    assert seen("python.txt").strip() == SUITES[suite]
    assert killcord.__version__ in seen("version.txt"), seen("version.txt")
    # check: JSON, every item judged; exit 0 or 1 (1: what a chroot lacks, e.g. no medium),
    # never 2 (bad configuration) or a traceback
    assert seen("check.rc").strip() in ("0", "1"), seen("check.err")
    assert "Traceback" not in seen("check.err"), seen("check.err")
    report = json.loads(seen("check.json"))
    assert report["items"] and all("ok" in i for i in report["items"]), report
    # protection on, as installed
    assert tomllib.loads(seen("killcord.toml"))["mode"] == "live"
    # the wipe mode is in the initramfs the postinst's trigger rebuilt
    initrd = seen("initrd.txt").split()
    assert "usr/lib/killcord/killcord-wipe" in initrd and "scripts/init-top/killcord" in initrd, initrd[:20]
    assert "usr/lib/killcord/killcord-cmdline" in initrd and "usr/lib/killcord/killcord-wipe-boot" in initrd
    # the postinst built the wipe target from busybox-static (a dependency), within 1 MiB
    target = json.loads(seen("wipe-target.json"))
    assert target["image"] == "/var/lib/killcord/wipe-target.img" and target["bytes"] <= 1024 * 1024, target
    assert target["busybox"] in ("/bin/busybox", "/usr/bin/busybox"), target
    # memlockd's list names this suite's interpreter (generated by the postinst)
    assert re.search(rf"^\+/usr/bin/python{re.escape(SUITES[suite])}$", seen("memlockd.cfg"), re.M), \
        seen("memlockd.cfg")[:500]
    # killcord's modules import under MDWE with no warning (removed/deprecated APIs)
    assert re.fullmatch(r"imported \d+ modules under MDWE\n", seen("mdwe.txt")), seen("mdwe.txt")
    # its systemd accepts the units (installed and enabled by the postinst)
    assert seen("verify.rc").strip() == "0" and "killcord" not in seen("verify.txt"), seen("verify.txt")
    # Debian 13: Debian's pydantic; Debian 12: the vendored one
    pydantic = seen("pydantic.txt")
    if suite == "trixie":
        assert pydantic.startswith("/usr/lib/python3/dist-packages/pydantic/"), pydantic
    else:
        assert pydantic.startswith("/usr/lib/killcord/vendor/pydantic/"), pydantic
