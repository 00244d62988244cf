"""Print the QEMU scenarios' results (out/vm/<suite>/*.json) as the Markdown table in README.md,
one row per scenario and suite."""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "out" / "vm"
COLUMNS = ["unplug_to_uevent", "unplug_to_detect", "unplug_to_killed", "unplug_to_kexec",
           "unplug_to_wiped", "unplug_to_poweroff"]


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def main() -> int:
    rows = []
    for path in sorted(OUT.glob("*/*.json"), key=lambda p: (p.stem, p.parent.name)):
        d = json.loads(path.read_text())
        if "pattern_bytes_written" not in d:
            continue  # the initramfs tests' records have another shape
        left = d.get("pattern_bytes_left")
        written = d["pattern_bytes_written"]
        found = d["pattern_bytes_found_before"]
        tails = d.get("tails_limit_bytes", 0)
        t = d.get("timings_ms") or {}
        verdict = "-" if left is None else ("pass" if left <= tails else "over")
        rows.append(
            f"| {d['scenario']} | {path.parent.name} | {written / 2**20:.0f} MiB | {100 * found / written:.2f} % | "
            f"{'-' if left is None else f'{left:,} B'} | {tails / 2**20:.1f} MiB ({verdict}) | "
            f"{'yes' if d.get('powered_off') else 'no'} | " + " | ".join(fmt_ms(t.get(c)) for c in COLUMNS) + " |")
    if not rows:
        print(f"no results in {OUT}: run `make test-vm-all`", file=sys.stderr)
        return 1
    print("| scenario | suite | written | found before | left after | Tails' 0.8 % of free memory | powered off | "
          "uevent ms | detect ms | killed ms | kexec ms | wiped ms | poweroff ms |")
    print("| --- " * 13 + "|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
