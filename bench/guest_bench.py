"""What the QEMU benchmarks (vm.py, vm_detect.py) share: the guest image, a place for their
consoles, and the median of what was measured."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vm.image import Image, build, find_deb  # noqa: E402


def prepare(name: str, out: Path) -> tuple[Image, Path]:
    """The trixie live image (built from the .deb, or cached) and the directory for the
    runs' consoles beside `out`. Exits 2 unless root (mmdebstrap, QEMU)."""
    if os.geteuid() != 0:
        print(f"{name}: run as root (mmdebstrap, QEMU)", file=sys.stderr)
        sys.exit(2)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / f"{out.stem}-logs"
    logs.mkdir(exist_ok=True)
    with open(logs / "build.log", "w") as log:
        return build("trixie", find_deb("trixie"), log=log), logs


def median(values: list[float | None], digits: int = 1) -> float | None:
    got = [v for v in values if v is not None]
    return round(statistics.median(got), digits) if got else None
