"""Every shell script in the repository parses (sh -n, bash -n) and passes shellcheck.

The scripts are found by their shebang (and by a .sh name), among the files git tracks or
would track, so a new script is covered as soon as it exists. The hooks that run in an
initramfs or the shutdown root, where /bin/sh is busybox, must parse in busybox sh too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

SHEBANG = re.compile(rb"#!\s*(?:/usr)?/bin/(?:env\s+)?(sh|dash|bash)\b")
BUSYBOX_DIRS = ("initramfs-hooks/",)  # run by busybox sh in an initramfs or the shutdown root


def repo_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files (build outputs, caches and the venv are
    ignored), relative to ROOT."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    return sorted({f for f in out.decode().split("\0") if f})


def shell_of(path: Path) -> str | None:
    """sh or bash from the shebang; sh for a .sh file without one (shellcheck then says
    what is missing)."""
    if path.is_symlink() or not path.is_file():
        return None
    with path.open("rb") as f:
        first = f.readline(200)
    m = SHEBANG.match(first)
    if m:
        return "bash" if m[1] == b"bash" else "sh"
    if path.suffix == ".sh":
        return "sh"
    return None


SCRIPTS = {f: shell for f in repo_files() if (shell := shell_of(ROOT / f))}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: install it (make setup installs the Makefile's APT_PACKAGES)")
    return path


def test_the_scripts_are_found() -> None:
    # a broken discovery would pass every test below by testing nothing
    for expected in ("initramfs-hooks/killcord-wipe", "initramfs-hooks/killcord-shutdown",
                     "initramfs-hooks/prepare-shutdown", "initramfs-hooks/dracut/90killcord/module-setup.sh",
                     "systemd/killcord.sleep", "systemd/killcord.shutdown", "packaging/debian/killcord.postinst",
                     "packaging/build-deb.sh", "scripts/demo.sh", "tests/vm/guest/killcord-ci-panic", ".ci/run"):
        assert expected in SCRIPTS, f"{expected} not found among {sorted(SCRIPTS)}"
    assert SCRIPTS["scripts/demo.sh"] == "bash" and SCRIPTS["initramfs-hooks/killcord-wipe"] == "sh"
    assert "packaging/killcord-launcher" not in SCRIPTS  # python


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_syntax(script: str) -> None:
    shell = SCRIPTS[script]
    r = subprocess.run([need("dash" if shell == "sh" else "bash"), "-n", script], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shell == "sh" and script.startswith(BUSYBOX_DIRS):
        r = subprocess.run([need("busybox"), "sh", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, "busybox sh: " + r.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_shellcheck(script: str) -> None:
    # the shell comes from the shebang (or a `# shellcheck shell=` directive); every
    # severity counts: a finding is fixed, or disabled where it is with the reason why
    r = subprocess.run([need("shellcheck"), "--format=gcc", script], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
