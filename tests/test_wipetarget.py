"""killcord's wipe target, built from Debian's busybox-static and the repository's scripts:
what is in it (read back by busybox's own cpio and xz), its size bound, its manifest, and
what it refuses. Booted for real in QEMU by tests/vm/test_wipe_target.py and the live
scenarios."""

from __future__ import annotations

import json
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from killcord import cli, kexec, wipetarget

CACHE = ROOT / ".cache" / "busybox-static"


@pytest.fixture(scope="session")
def static_busybox() -> Path:
    """Debian's busybox-static binary: the host's own if it is that package, else the
    package fetched with apt-get download (the host keeps its dynamic busybox, which the
    shell tests need: busybox-static's shell runs its applets before PATH, so their fakes
    would never run) and unpacked into .cache."""
    for p in wipetarget.BUSYBOX:
        if p.is_file() and wipetarget.is_static(p):
            return p
    binary = CACHE / "bin" / "busybox"
    if not binary.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        got = subprocess.run(["apt-get", "download", "busybox-static"], cwd=CACHE, capture_output=True, text=True)
        debs = sorted(CACHE.glob("busybox-static_*.deb"))
        assert debs, f"apt-get download busybox-static failed: {got.stderr}"
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(CACHE)], check=True)
    assert wipetarget.is_static(binary)
    return binary


def listing(image: Path) -> dict[str, str]:
    """name -> `ls -l` style mode column, read back by busybox's cpio from xz's output."""
    raw = subprocess.run(["xz", "-dc", str(image)], capture_output=True, check=True).stdout
    out = subprocess.run([shutil.which("busybox") or "busybox", "cpio", "-tv"], input=raw, capture_output=True,
                         check=True).stdout.decode()
    rows = {}
    for line in out.splitlines():
        fields = line.split()
        name = fields[-3] if " -> " in line else fields[-1]
        rows[name] = fields[0]
    return rows


def test_the_image_holds_init_busybox_and_the_scripts_and_fits_1_mib(tmp_path: Path, static_busybox: Path) -> None:
    image = tmp_path / "wipe-target.img"
    m = wipetarget.build(image, static_busybox)
    assert m.bytes == image.stat().st_size <= wipetarget.MAX_BYTES
    rows = listing(image)
    assert rows["init"].startswith("-rwxr-xr-x")
    assert rows["dev/console"].startswith("crw-------")  # init's stdio, before any /dev is mounted
    assert rows["bin/busybox"].startswith("-rwx") and rows["bin/sh"].startswith("l")
    for name in ("killcord-wipe-boot", "killcord-wipe"):
        assert rows[f"usr/lib/killcord/{name}"].startswith("-rwx"), name
    assert rows["usr/lib/killcord/killcord-cmdline"].startswith("-rw-r--r--")
    # the kernel's decoder takes CRC32 (or no check), not xz's default CRC64
    assert image.read_bytes()[6:8] == b"\x00\x01"
    raw = lzma.decompress(image.read_bytes())
    assert (ROOT / "initramfs-hooks" / "wipe-target-init").read_bytes() in raw
    assert static_busybox.read_bytes() in raw


def test_same_inputs_same_bytes_and_the_manifest_says_what_was_built(tmp_path: Path, static_busybox: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    ma, mb = wipetarget.build(a, static_busybox), wipetarget.build(b, static_busybox)
    assert a.read_bytes() == b.read_bytes() and ma.sha256 == mb.sha256
    recorded = json.loads(wipetarget.manifest_path(a).read_text())
    assert recorded == ma.as_dict() and recorded["busybox"] == str(static_busybox)
    assert wipetarget.verify(a) == ma


def test_a_dynamic_busybox_is_refused_with_the_fix(tmp_path: Path) -> None:
    dynamic = Path(shutil.which("python3") or "/usr/bin/python3").resolve()  # has a PT_INTERP
    assert not wipetarget.is_static(dynamic)
    with pytest.raises(wipetarget.WipeTargetError, match="not a static executable: install busybox-static"):
        wipetarget.build(tmp_path / "x.img", dynamic)
    assert not (tmp_path / "x.img").exists()


def test_an_image_over_1_mib_is_refused(tmp_path: Path, static_busybox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wipetarget, "MAX_BYTES", 100_000)
    with pytest.raises(wipetarget.WipeTargetError, match="over 100000"):
        wipetarget.build(tmp_path / "x.img", static_busybox)
    assert not (tmp_path / "x.img").exists()


@pytest.mark.parametrize("damage", ["append", "manifest-missing", "image-missing"])
def test_verify_names_what_is_wrong_and_the_fix(tmp_path: Path, static_busybox: Path, damage: str) -> None:
    image = tmp_path / "wipe-target.img"
    wipetarget.build(image, static_busybox)
    if damage == "append":
        with image.open("ab") as f:
            f.write(b"x")
    else:
        (wipetarget.manifest_path(image) if damage == "manifest-missing" else image).unlink()
    with pytest.raises(wipetarget.WipeTargetError, match="killcord wipe-target build"):
        wipetarget.verify(image)


def test_cli_build_and_verify(tmp_path: Path, static_busybox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "t.img"
    assert cli.main(["wipe-target", "build", "--image", str(image), "--busybox", str(static_busybox)]) == 0
    assert "wipe target built" in capsys.readouterr().out
    assert cli.main(["wipe-target", "verify", "--image", str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == image.stat().st_size
    image.write_bytes(b"tampered")
    assert cli.main(["wipe-target", "verify", "--image", str(image)]) == cli.EXIT_FAILED
    assert "rebuild it: killcord wipe-target build" in capsys.readouterr().err


# ---- what kexec stages ----

def stage(tmp_path: Path, image: Path, initrd: str = "auto") -> kexec.Staged:
    (tmp_path / "live").mkdir(exist_ok=True)
    (tmp_path / "live" / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "live" / "initrd.img").write_bytes(b"the live system's initrd")
    return kexec.stage("auto", initrd, "", live=False, lock=False, live_mount=tmp_path,
                       current_cmdline="boot=live", wipe_image=image)


def test_auto_stages_the_wipe_target_while_it_matches_its_manifest(tmp_path: Path, static_busybox: Path) -> None:
    image = tmp_path / "wipe-target.img"
    m = wipetarget.build(image, static_busybox)
    staged = stage(tmp_path, image)
    assert (staged.initrd, staged.initrd_kind, staged.note) == (str(image), "wipe-target", None)
    assert (staged.initrd_bytes, staged.initrd_sha256) == (m.bytes, m.sha256)
    image.write_bytes(image.read_bytes() + b"\0")  # changed behind the manifest's back
    staged = stage(tmp_path, image)
    assert (staged.initrd, staged.initrd_kind) == (str(tmp_path / "live" / "initrd.img"), "system")
    assert "wipe target not used" in staged.note and "killcord wipe-target build" in staged.note


def test_an_explicit_initrd_is_staged_as_set(tmp_path: Path, static_busybox: Path) -> None:
    image = tmp_path / "wipe-target.img"
    wipetarget.build(image, static_busybox)
    own = tmp_path / "mine.img"
    own.write_bytes(b"x")
    staged = stage(tmp_path, image, str(own))
    assert (staged.initrd, staged.initrd_kind) == (str(own), "explicit")
    assert stage(tmp_path, image, "none").initrd_kind == "none"


# ---- `check` verifies what the daemon staged ----

def test_check_says_which_initramfs_the_jump_boots(tmp_path: Path, static_busybox: Path) -> None:
    from killcord import check
    from killcord.config import Config

    image = tmp_path / "wipe-target.img"
    m = wipetarget.build(image, static_busybox)
    ours = kexec.Staged("/k", str(image), "x", "kexec_file_load", True, initrd_kind="wipe-target",
                        initrd_bytes=m.bytes, initrd_sha256=m.sha256).as_dict()
    item = check.wipe_target_item(Config(), ours, image)
    assert item.ok and f"{m.bytes} bytes" in item.detail and m.sha256[:12] in item.detail
    # rebuilt since the daemon staged it (another busybox): the staged one is not what was built
    stale = dict(ours, initrd_sha256="0" * 64)
    item = check.wipe_target_item(Config(), stale, image)
    assert not item.ok and "not the one built now" in item.detail and "restart killcord" in item.fix
    system = kexec.Staged("/k", "/run/live/medium/live/initrd.img", "x", "kexec_file_load", True,
                          initrd_kind="system", initrd_bytes=41_000_000,
                          note="wipe target not used: ... does not exist").as_dict()
    item = check.wipe_target_item(Config(), system, image)
    assert not item.ok and not item.required and "system's initramfs" in item.detail
    assert "busybox-static" in item.fix
    # no daemon: whether the built image is sound
    assert check.wipe_target_item(Config(), None, image).ok
    image.unlink()
    item = check.wipe_target_item(Config(), None, image)
    assert not item.ok and "does not exist" in item.detail
