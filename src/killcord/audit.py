"""Kernel slab audit: snapshot /proc/slabinfo, parse it, diff two snapshots, record one.

`record` runs on the firing path right after every process was killed, so it only
uses what is imported here at start and does no parsing that could stop the raw
snapshot from being written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from killcord import arm_fds, statedir

SLABINFO = Path("/proc/slabinfo")

# The only format SLUB (and SLAB since 2.6) emits; 2.0 lacked nothing we read but is
# long gone, so anything else is more likely a wrong file than an old kernel.
SUPPORTED_VERSION = "2.1"
_HEADER_PREFIX = "slabinfo - version:"

# name, 5 ints, ": tunables" 3 ints, ": slabdata" 3 ints
_FIELDS = 16
_TUNABLES_AT = 6
_SLABDATA_AT = 11

TOP_N = 10


@dataclass(frozen=True)
class SlabRow:
    name: str
    active_objs: int
    num_objs: int
    objsize: int

    @property
    def active_bytes(self) -> int:
        return self.active_objs * self.objsize


@dataclass(frozen=True)
class SlabDelta:
    name: str
    before_bytes: int
    after_bytes: int
    delta_bytes: int
    before_objs: int
    after_objs: int


def open_snapshot(path: Path = SLABINFO) -> int | None:
    """At arm time: a descriptor to read snapshots from at fire time (no path lookup then),
    or None if the file cannot be opened (the audit stage then says why)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def read_snapshot(path: Path = SLABINFO, fd: int | None = None) -> bytes:
    """The raw file, read through `fd` (from open_snapshot) when given, from its start each
    time (a seq_file restarts at offset 0). OSError if absent (no CONFIG_SLUB_DEBUG) or
    unreadable (not root)."""
    return path.read_bytes() if fd is None else arm_fds.read_all(fd)


# ---- parsing ----


def _malformed(lineno: int, line: str, why: str) -> ValueError:
    return ValueError(f"slabinfo line {lineno}: {why}: {line!r}")


def _check_header(lineno: int, line: str) -> None:
    if not line.startswith(_HEADER_PREFIX):
        raise _malformed(lineno, line, f"expected '{_HEADER_PREFIX} {SUPPORTED_VERSION}' header")
    version = line[len(_HEADER_PREFIX) :].strip()
    if version != SUPPORTED_VERSION:
        raise _malformed(lineno, line, f"unsupported slabinfo version {version!r}")


def _parse_row(lineno: int, line: str) -> SlabRow:
    fields = line.split()
    if len(fields) != _FIELDS:
        raise _malformed(lineno, line, f"expected {_FIELDS} fields, got {len(fields)}")
    if fields[_TUNABLES_AT : _TUNABLES_AT + 2] != [":", "tunables"] or fields[
        _SLABDATA_AT : _SLABDATA_AT + 2
    ] != [":", "slabdata"]:
        raise _malformed(lineno, line, "expected ': tunables' and ': slabdata' sections")
    try:
        active, total, objsize = (int(f) for f in fields[1:4])
        for f in fields[4:6] + fields[8:11] + fields[13:16]:
            int(f)
    except ValueError:
        raise _malformed(lineno, line, "non-integer count") from None
    if min(active, total, objsize) < 0:
        raise _malformed(lineno, line, "negative count")
    return SlabRow(fields[0], active, total, objsize)


def parse(text: str) -> dict[str, SlabRow]:
    """Parse slabinfo 2.1. ValueError naming the line number and line on anything else.

    The kernel allows two caches with one name (kmem_cache_create does not refuse);
    later ones are keyed "name#2", "name#3", ... so nothing is silently summed or lost.
    """
    rows: dict[str, SlabRow] = {}
    header_seen = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not header_seen:
            _check_header(lineno, line)
            header_seen = True
            continue
        if not line.strip() or line.startswith("#"):
            continue  # the column legend, blank trailing lines
        row = _parse_row(lineno, line)
        key, n = row.name, 1
        while key in rows:
            n += 1
            key = f"{row.name}#{n}"
        rows[key] = row if key == row.name else SlabRow(key, row.active_objs, row.num_objs, row.objsize)
    if not header_seen:
        raise ValueError(f"slabinfo line 1: missing '{_HEADER_PREFIX}' header: ''")
    return rows


# ---- comparing ----


def diff(before: dict[str, SlabRow], after: dict[str, SlabRow]) -> list[SlabDelta]:
    """Caches present in either snapshot that changed; absent counts as zero.

    Unchanged caches are left out (a full slabinfo has hundreds), so equal inputs give [].
    Sorted by |delta_bytes| descending, then name.
    """
    deltas = []
    for name in before.keys() | after.keys():
        b, a = before.get(name), after.get(name)
        b_bytes, a_bytes = (b.active_bytes if b else 0), (a.active_bytes if a else 0)
        b_objs, a_objs = (b.active_objs if b else 0), (a.active_objs if a else 0)
        if (b is None) == (a is None) and b_bytes == a_bytes and b_objs == a_objs:
            continue
        deltas.append(SlabDelta(name, b_bytes, a_bytes, a_bytes - b_bytes, b_objs, a_objs))
    deltas.sort(key=lambda d: (-abs(d.delta_bytes), d.name))
    return deltas


_UNITS = ("KiB", "MiB", "GiB", "TiB")


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; under 1 KiB stays exact ('512 B')."""
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _signed(n: int) -> str:
    if n == 0:
        return "0 B"
    return ("+" if n > 0 else "-") + human_bytes(abs(n))


def format_diff(deltas: list[SlabDelta], limit: int | None = 20) -> str:
    """A table for a person: largest change first, human sizes, signed deltas."""
    if not deltas:
        return "slab caches: no change"
    shown = deltas if limit is None else deltas[:limit]
    table = [("cache", "before", "after", "delta", "objects")]
    for d in shown:
        objs = f"{d.before_objs} -> {d.after_objs}"
        table.append((d.name, human_bytes(d.before_bytes), human_bytes(d.after_bytes), _signed(d.delta_bytes), objs))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]).rstrip()
        for row in table
    ]
    if len(shown) < len(deltas):
        lines.append(f"... and {len(deltas) - len(shown)} more changed caches")
    total = sum(d.delta_bytes for d in deltas)
    lines.append(f"total: {_signed(total)} across {len(deltas)} changed caches")
    return "\n".join(lines)


def top(rows: dict[str, SlabRow], n: int = 10) -> list[dict[str, object]]:
    """The n largest caches by active bytes (ties by name), as plain dicts for the log."""
    largest = sorted(rows.values(), key=lambda r: (-r.active_bytes, r.name))[:n]
    return [
        {"name": r.name, "active_bytes": r.active_bytes, "active_objs": r.active_objs, "objsize": r.objsize}
        for r in largest
    ]


# ---- recording (firing path) ----


def _utc_stamp() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f".{now.microsecond // 1000:03d}Z"


def _unique_stamp(records: int) -> str:
    """The UTC stamp, suffixed -1, -2... if a record within the same millisecond took it."""
    base = stamp = _utc_stamp()
    n = 0
    while statedir.exists(records, f"audit-{stamp}.json") or statedir.exists(records, f"slabinfo-{stamp}.txt"):
        n += 1
        stamp = f"{base}-{n}"
    return stamp


def _summary(snapshot: bytes) -> dict[str, object]:
    # The raw snapshot is the record; a parse problem must not stop it being written.
    try:
        return {"top": top(parse(snapshot.decode("utf-8", "replace")), TOP_N)}
    except ValueError as e:
        return {"top": [], "parse_error": str(e)}


# Why a record may lack its summary: parsing costs more than reading (about 15 ms under
# QEMU's emulation), and right before a kexec the record goes with the rest of RAM.
SUMMARY_LEFT_OUT = "left out before the jump; the raw snapshot is beside it (killcord slabinfo-diff reads it)"


def record(state_dir: Path, snapshot: bytes, meta: dict[str, object], summarize: bool = True) -> Path:
    """Write slabinfo-<stamp>.txt (raw) then audit-<stamp>.json in state_dir/records (see
    statedir: root's alone, no link followed); return the JSON path.

    The snapshot is written first so the JSON never names a file that is not there. The
    daemon holds the records directory open since arm time (statedir.hold_records).
    summarize: add the largest caches (parsed from the snapshot) to the JSON.
    """
    with statedir.Records(state_dir) as records:
        stamp = _unique_stamp(records)
        snap_name = f"slabinfo-{stamp}.txt"
        json_name = f"audit-{stamp}.json"
        statedir.write_atomic(records, snap_name, snapshot)
        doc = {**meta, "recorded_at": stamp, "snapshot": snap_name, "snapshot_bytes": len(snapshot)}
        doc.update(_summary(snapshot) if summarize else {"top": None, "summary": SUMMARY_LEFT_OUT})
        # default=str: meta may carry Paths or enums; an unserialisable value must not lose the audit
        statedir.write_atomic(records, json_name, json.dumps(doc, indent=2, default=str).encode("utf-8") + b"\n")
    return statedir.records_path(state_dir) / json_name
