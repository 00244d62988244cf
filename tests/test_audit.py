from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from killcord import audit
from killcord.audit import SlabDelta, SlabRow

SRC = Path(__file__).resolve().parents[1] / "src"

LEGEND = (
    "# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab>"
    " : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>"
)


def slabinfo(*rows: tuple[str, int, int, int]) -> str:
    lines = ["slabinfo - version: 2.1", LEGEND]
    for name, active, total, size in rows:
        lines.append(
            f"{name:<17} {active:>6} {total:>6} {size:>6}   32    2 : tunables    0    0    0 : slabdata      4      4      0"
        )
    return "\n".join(lines) + "\n"


FIXTURE = slabinfo(
    ("dentry", 1000, 1050, 192),  # 192000 B
    ("kmalloc-64", 512, 512, 64),  # 32768 B
    ("ext4_inode_cache", 300, 310, 1128),  # 338400 B
    ("empty_cache", 0, 0, 312),
)


def rows(**caches: tuple[int, int]) -> dict[str, SlabRow]:
    """name=(active_objs, objsize)"""
    return {n: SlabRow(n, a, a, size) for n, (a, size) in caches.items()}


# ---- parse ----


def test_parse_fixture() -> None:
    parsed = audit.parse(FIXTURE)
    assert list(parsed) == ["dentry", "kmalloc-64", "ext4_inode_cache", "empty_cache"]
    assert parsed["dentry"] == SlabRow("dentry", 1000, 1050, 192)
    assert parsed["dentry"].active_bytes == 192_000
    assert parsed["empty_cache"].active_bytes == 0


@pytest.mark.root
def test_parse_real_proc_slabinfo() -> None:
    try:
        raw = audit.read_snapshot()
    except FileNotFoundError:
        pytest.skip("kernel without /proc/slabinfo (CONFIG_SLUB_DEBUG off)")
    except PermissionError:
        pytest.skip("/proc/slabinfo needs root")
    assert raw.startswith(b"slabinfo - version: 2.1\n")
    parsed = audit.parse(raw.decode())
    data_lines = [l for l in raw.decode().splitlines()[1:] if l and not l.startswith("#")]
    assert len(parsed) == len(data_lines) > 10
    assert any(name.startswith("kmalloc-") for name in parsed)
    for row in parsed.values():
        assert row.objsize > 0 and 0 <= row.active_objs <= row.num_objs


def test_read_snapshot_missing_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        audit.read_snapshot(tmp_path / "nope")


def test_read_snapshot_returns_raw_bytes(tmp_path: Path) -> None:
    p = tmp_path / "slabinfo"
    p.write_bytes(FIXTURE.encode())
    assert audit.read_snapshot(p) == FIXTURE.encode()


def test_a_snapshot_descriptor_opened_at_arm_reads_the_whole_file_each_time(tmp_path: Path) -> None:
    """The audit stage reads through a descriptor opened at arm time: the file may be gone
    from its path by then, and every read starts from the beginning."""
    p = tmp_path / "slabinfo"
    p.write_text(FIXTURE * 200)  # more than one 64 KiB read
    fd = audit.open_snapshot(p)
    assert fd is not None
    try:
        p.unlink()
        assert audit.read_snapshot(p, fd=fd) == (FIXTURE * 200).encode()
        assert audit.read_snapshot(p, fd=fd) == (FIXTURE * 200).encode()
    finally:
        os.close(fd)
    assert audit.open_snapshot(tmp_path / "nope") is None


@pytest.mark.skipif(not audit.SLABINFO.exists() or os.geteuid() != 0, reason="needs /proc/slabinfo and root")
def test_the_real_slabinfo_through_a_descriptor_twice() -> None:
    fd = audit.open_snapshot()
    assert fd is not None
    try:
        first, second = audit.read_snapshot(fd=fd), audit.read_snapshot(fd=fd)
    finally:
        os.close(fd)
    assert audit.parse(first.decode()) and audit.parse(second.decode())
    assert first.count(b"\n") == second.count(b"\n")


def test_duplicate_names_are_kept_apart() -> None:
    parsed = audit.parse(slabinfo(("dup", 1, 1, 8), ("dup", 2, 2, 16), ("dup", 3, 3, 32)))
    assert list(parsed) == ["dup", "dup#2", "dup#3"]
    assert parsed["dup#2"] == SlabRow("dup#2", 2, 2, 16)


@pytest.mark.parametrize(
    "bad_line",
    [
        "dentry 1000 1050",  # truncated
        "dentry 1000 1050 abc 32 2 : tunables 0 0 0 : slabdata 4 4 0",  # not a number
        "dentry 1000 1050 192 32 2 : tunables 0 0 0 : slabdata 4 4",  # slabdata short
        "dentry 1000 1050 192 32 2 ; tunables 0 0 0 : slabdata 4 4 0",  # wrong separator
        "dentry -1 1050 192 32 2 : tunables 0 0 0 : slabdata 4 4 0",  # negative
    ],
)
def test_malformed_line_names_line_number_and_text(bad_line: str) -> None:
    text = FIXTURE + bad_line + "\n"
    lineno = len(FIXTURE.splitlines()) + 1
    with pytest.raises(ValueError) as info:
        audit.parse(text)
    msg = str(info.value)
    assert f"line {lineno}" in msg
    assert bad_line in msg


@pytest.mark.parametrize(
    "header",
    ["slabinfo - version: 2.0", "slabinfo - version: 3.1", "Slab stats", "# name <active_objs>"],
)
def test_wrong_header_raises(header: str) -> None:
    text = header + "\n" + FIXTURE.split("\n", 1)[1]
    with pytest.raises(ValueError) as info:
        audit.parse(text)
    assert "line 1" in str(info.value)
    assert header in str(info.value)


def test_missing_header_raises_on_empty_input() -> None:
    with pytest.raises(ValueError, match="line 1"):
        audit.parse("")


# ---- diff ----


def test_diff_added_removed_changed_and_unchanged() -> None:
    before = rows(grows=(10, 100), shrinks=(50, 100), gone=(3, 1000), same=(7, 64))
    after = rows(grows=(30, 100), shrinks=(40, 100), new=(1, 4096), same=(7, 64))
    deltas = {d.name: d for d in audit.diff(before, after)}
    assert set(deltas) == {"grows", "shrinks", "gone", "new"}  # "same" left out
    assert deltas["grows"] == SlabDelta("grows", 1000, 3000, 2000, 10, 30)
    assert deltas["shrinks"] == SlabDelta("shrinks", 5000, 4000, -1000, 50, 40)
    assert deltas["gone"] == SlabDelta("gone", 3000, 0, -3000, 3, 0)
    assert deltas["new"] == SlabDelta("new", 0, 4096, 4096, 0, 1)


def test_diff_orders_by_absolute_delta_then_name() -> None:
    before = rows(a=(10, 100), b=(0, 100), c=(20, 100), d=(5, 10))
    after = rows(a=(0, 100), b=(10, 100), c=(50, 100), d=(6, 10))
    # |deltas|: a 1000, b 1000, c 3000, d 10
    assert [d.name for d in audit.diff(before, after)] == ["c", "a", "b", "d"]


def test_diff_equal_inputs_is_empty() -> None:
    parsed = audit.parse(FIXTURE)
    assert audit.diff(parsed, dict(parsed)) == []


# ---- format_diff ----


def test_format_diff_largest_first_human_sizes_and_signs() -> None:
    before = rows(small=(1, 1024), big=(0, 1024), gone=(4, 512))
    after = rows(small=(2, 1024), big=(1536, 1024))  # big: +1.5 MiB
    text = audit.format_diff(audit.diff(before, after))
    lines = text.splitlines()
    assert "cache" in lines[0] and "delta" in lines[0]
    assert lines[1].startswith("big")
    assert "+1.5 MiB" in lines[1]
    assert text.index("big") < text.index("gone") < text.index("small")
    gone_line = next(l for l in lines if l.startswith("gone"))
    assert "-2.0 KiB" in gone_line
    small_line = next(l for l in lines if l.startswith("small"))
    assert "+1.0 KiB" in small_line


def test_format_diff_no_change() -> None:
    parsed = audit.parse(FIXTURE)
    assert "no change" in audit.format_diff(audit.diff(parsed, parsed))


def test_format_diff_limit_says_how_many_more() -> None:
    after = rows(**{f"c{i:02d}": (i + 1, 8) for i in range(30)})
    deltas = audit.diff({}, after)
    text = audit.format_diff(deltas, limit=5)
    assert "25 more" in text
    assert "c29" in text and "c00" not in text
    assert "c00" in audit.format_diff(deltas, limit=None)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536 * 1024, "1.5 MiB"), (3 * 1024**3, "3.0 GiB")],
)
def test_human_bytes(n: int, text: str) -> None:
    assert audit.human_bytes(n) == text


# ---- top ----


def test_top_orders_by_active_bytes_then_name() -> None:
    result = audit.top(rows(a=(10, 10), b=(1, 1000), c=(1, 100), d=(100, 1)), n=3)
    assert [r["name"] for r in result] == ["b", "a", "c"]  # 1000, 100, 100 (a < c)
    assert result[0] == {"name": "b", "active_bytes": 1000, "active_objs": 1, "objsize": 1000}


def test_top_of_fixture() -> None:
    assert [r["name"] for r in audit.top(audit.parse(FIXTURE))] == [
        "ext4_inode_cache",
        "dentry",
        "kmalloc-64",
        "empty_cache",
    ]


# ---- record ----


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_record_writes_snapshot_and_json(tmp_path: Path) -> None:
    state = tmp_path / "run" / "killcord"
    snapshot = FIXTURE.encode()
    out = audit.record(state, snapshot, {"trigger": "panic", "uid": 0})

    records = state / "records"
    assert out.parent == records and out.name.startswith("audit-") and out.suffix == ".json"
    assert _mode(state) == 0o755 and _mode(records) == 0o700  # the socket's dir; root's records
    doc = json.loads(out.read_text())
    snap = records / doc["snapshot"]
    assert snap.name.startswith("slabinfo-") and snap.suffix == ".txt"
    assert snap.read_bytes() == snapshot
    # same timestamp in both names
    assert snap.name.removeprefix("slabinfo-").removesuffix(".txt") == out.name.removeprefix(
        "audit-"
    ).removesuffix(".json")
    assert _mode(snap) == 0o600 and _mode(out) == 0o600
    assert doc["trigger"] == "panic" and doc["uid"] == 0
    assert [r["name"] for r in doc["top"]][:2] == ["ext4_inode_cache", "dentry"]
    assert sorted(p.name for p in records.iterdir()) == sorted([snap.name, out.name])  # no temp files


def test_record_keeps_top_to_ten(tmp_path: Path) -> None:
    text = slabinfo(*[(f"c{i:02d}", i + 1, i + 1, 8) for i in range(15)])
    doc = json.loads(audit.record(tmp_path, text.encode(), {}).read_text())
    assert len(doc["top"]) == 10
    assert doc["top"][0]["name"] == "c14"


def test_record_keeps_existing_dir_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    audit.record(tmp_path, FIXTURE.encode(), {})
    assert _mode(tmp_path) == 0o755


def test_record_unparseable_snapshot_still_recorded(tmp_path: Path) -> None:
    out = audit.record(tmp_path, b"garbage\x00\xff", {"stage": "audit"})
    doc = json.loads(out.read_text())
    assert (out.parent / doc["snapshot"]).read_bytes() == b"garbage\x00\xff"
    assert doc["top"] == [] and "line 1" in doc["parse_error"]


def test_record_unserialisable_meta_does_not_fail(tmp_path: Path) -> None:
    out = audit.record(tmp_path, FIXTURE.encode(), {"dir": tmp_path, "when": object()})
    assert json.loads(out.read_text())["dir"] == str(tmp_path)


def test_record_imports_nothing_at_call_time(tmp_path: Path) -> None:
    """Run record() with an audit hook that fails on any import after the module loaded."""
    code = f"""
import sys
from pathlib import Path
from killcord import audit
snap = Path({str(tmp_path / 'in')!r}).read_bytes()
imported = []
sys.addaudithook(lambda ev, args: imported.append(args[0]) if ev == "import" else None)
audit.record(Path({str(tmp_path / 'state')!r}), snap, {{"k": 1}})
audit.record(Path({str(tmp_path / 'state')!r}), b"bad", {{}})
print(imported)
"""
    (tmp_path / "in").write_bytes(FIXTURE.encode())
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert len(list((tmp_path / "state" / "records").glob("audit-*.json"))) >= 1


def test_record_twice_keeps_both(tmp_path: Path) -> None:
    first = audit.record(tmp_path, b"one", {})
    second = audit.record(tmp_path, b"two", {})
    assert first != second
    assert (first.parent / json.loads(first.read_text())["snapshot"]).read_bytes() == b"one"
    assert (second.parent / json.loads(second.read_text())["snapshot"]).read_bytes() == b"two"


# ---- where records may be written (statedir; its refusals are OSErrors: UnsafeStateDir) ----


def test_record_refuses_a_state_dir_that_is_a_link(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state").symlink_to(elsewhere)
    with pytest.raises(OSError, match="symbolic link"):
        audit.record(tmp_path / "state", b"x", {})
    assert list(elsewhere.iterdir()) == []


def test_record_refuses_a_planted_records_link(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "records").symlink_to(elsewhere)
    with pytest.raises(OSError, match="records"):
        audit.record(tmp_path, b"x", {})
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
def test_record_refuses_a_state_dir_of_another_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    with pytest.raises(OSError, match="owned by uid 65534"):
        audit.record(state, b"x", {})
    assert list(state.iterdir()) == []


def test_record_refuses_a_state_dir_anyone_can_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(OSError, match="writable by group or others"):
        audit.record(state, b"x", {})
    assert list(state.iterdir()) == []


def test_records_dir_of_wrong_mode_is_put_back_to_0700(tmp_path: Path) -> None:
    (tmp_path / "records").mkdir(mode=0o755)
    (tmp_path / "records").chmod(0o755)
    audit.record(tmp_path, b"x", {})
    assert _mode(tmp_path / "records") == 0o700


def test_record_uses_the_directory_held_since_arm_time(tmp_path: Path) -> None:
    """Held open at arm time: a state_dir renamed (or gone) since is still written to."""
    from killcord import arm_fds, statedir

    state = tmp_path / "state"
    statedir.hold_records(state)
    try:
        state.rename(tmp_path / "moved")
        out = audit.record(state, b"held", {})
    finally:
        arm_fds.release_all()
    assert not state.exists()
    assert (tmp_path / "moved" / "records" / out.name).exists()
