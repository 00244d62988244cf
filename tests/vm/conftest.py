"""The guest image, built once per session (or taken from the cache)."""

from __future__ import annotations

import subprocess

import pytest

from .image import ROOT, Image, build, find_deb

OUT = ROOT / "out" / "vm"


@pytest.fixture(scope="session")
def image() -> Image:
    try:
        deb = find_deb()
    except FileNotFoundError:
        subprocess.run(["make", "-C", str(ROOT), "deb"], check=True)
        deb = find_deb()
    OUT.mkdir(parents=True, exist_ok=True)
    return build(deb)
