from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from killcord import resident
from killcord.resident import FileResidency

SRC = Path(__file__).resolve().parents[1] / "src"
PAGE = resident.PAGE_SIZE


# ---- mincore_file ----


def test_mincore_file_just_written_and_read_is_resident(tmp_path: Path) -> None:
    p = tmp_path / "hot"
    p.write_bytes(os.urandom(5 * PAGE + 100))
    assert len(p.read_bytes()) == 5 * PAGE + 100
    r = resident.mincore_file(str(p))
    assert r == FileResidency(str(p), 6, 6)
    assert r.ok


def test_mincore_file_sparse_unread_file_is_not_resident(tmp_path: Path) -> None:
    # ftruncate makes a hole: no page of it has ever been in the page cache
    p = tmp_path / "cold"
    with open(p, "wb") as f:
        f.truncate(64 * PAGE)
    r = resident.mincore_file(str(p))
    assert (r.pages, r.resident) == (64, 0)
    assert not r.ok


def test_mincore_file_empty(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.touch()
    r = resident.mincore_file(str(p))
    assert r == FileResidency(str(p), 0, 0)
    assert r.ok


def test_mincore_file_missing_names_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-file")
    with pytest.raises(OSError) as info:
        resident.mincore_file(missing)
    assert info.value.errno == errno.ENOENT
    assert missing in str(info.value)


def test_mincore_file_directory_names_path(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        resident.mincore_file(str(tmp_path))
    assert str(tmp_path) in str(info.value)


# ---- report ----


def test_report_counts_and_collects_errors(tmp_path: Path) -> None:
    hot, cold, empty = tmp_path / "hot", tmp_path / "cold", tmp_path / "empty"
    hot.write_bytes(b"x" * (2 * PAGE))
    hot.read_bytes()
    with open(cold, "wb") as f:
        f.truncate(3 * PAGE)
    empty.touch()
    missing = str(tmp_path / "missing")
    nul = "bad\0path"

    rep = resident.report([str(hot), str(cold), str(empty), missing, nul])

    assert rep["files"] == 3
    assert rep["pages"] == 5
    assert rep["resident_pages"] == 2
    assert rep["not_resident"] == [str(cold)]
    assert rep["not_resident_count"] == 1
    errors = rep["errors"]
    assert isinstance(errors, dict) and set(errors) == {missing, nul}
    assert missing in errors[missing]


def test_report_lists_at_most_twenty_not_resident(tmp_path: Path) -> None:
    paths = []
    for i in range(25):
        p = tmp_path / f"cold{i:02d}"
        with open(p, "wb") as f:
            f.truncate(PAGE)
        paths.append(str(p))
    rep = resident.report(paths)
    assert rep["not_resident"] == paths[:20]
    assert rep["not_resident_count"] == 25


def test_report_empty() -> None:
    assert resident.report([]) == {
        "files": 0,
        "pages": 0,
        "resident_pages": 0,
        "not_resident": [],
        "not_resident_count": 0,
        "errors": {},
    }


# ---- mapped_files / killcord_files ----


def _names(paths: list[str]) -> set[str]:
    return {os.path.basename(p) for p in paths}


def test_mapped_files_has_interpreter_or_libpython_and_libc() -> None:
    files = resident.mapped_files()
    python = os.path.realpath(sys.executable)
    assert python in files or any(n.startswith("libpython3") for n in _names(files))
    assert any(n == "libc.so.6" or (n.startswith("libc-") and n.endswith(".so")) for n in _names(files))


def test_mapped_files_only_existing_regular_files_sorted_unique() -> None:
    files = resident.mapped_files()
    assert files == sorted(set(files))
    for p in files:
        assert p.startswith("/") and os.path.isfile(p), p
        assert "(deleted)" not in p and "[" not in p


def test_mapped_files_by_pid_matches_self() -> None:
    assert resident.mapped_files(str(os.getpid())) == resident.mapped_files()


def test_mapped_files_includes_live_mapping_excludes_deleted(tmp_path: Path) -> None:
    kept, gone = tmp_path / "kept.bin", tmp_path / "gone.bin"
    maps = []
    try:
        for p in (kept, gone):
            p.write_bytes(b"z" * PAGE)
            with open(p, "rb") as f:
                maps.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
        # replaced on disk, as a library is by an upgrade: the mapping shows "(deleted)"
        gone.unlink()
        gone.write_bytes(b"new")
        # a file literally named like the maps entry: only the suffix check keeps it out
        Path(f"{gone} (deleted)").write_bytes(b"decoy")
        files = resident.mapped_files()
        assert str(kept) in files
        assert str(gone) not in files
        assert f"{gone} (deleted)" not in files
    finally:
        for m in maps:
            m.close()


def test_mapped_files_missing_pid_raises() -> None:
    with pytest.raises(OSError):
        resident.mapped_files("999999999")


def test_killcord_files_are_the_package_sources() -> None:
    files = resident.killcord_files()
    package = Path(resident.__file__).resolve().parent
    assert str(package / "resident.py") in files
    assert str(package / "events.py") in files
    assert files == sorted(set(files))
    assert all(Path(p).parent.is_relative_to(package) and p.endswith((".py", ".so")) for p in files)


# ---- memlockd_config ----


def _entries(config: str) -> list[str]:
    return [l for l in config.splitlines() if l and not l.startswith("#")]


def test_memlockd_config_interpreter_header_and_format() -> None:
    config = resident.memlockd_config()
    python = os.path.realpath(sys.executable)
    lines = config.splitlines()
    assert lines[0].startswith("#") and "killcord memlock-config" in lines[0]
    assert any(l.startswith("#") and python in l for l in lines)
    entries = _entries(config)
    assert entries[0] == "+" + python
    for line in entries:  # memlockd only acts on "/path" and "+/path"
        assert line.startswith(("/", "+/")), line


def test_memlockd_config_paths_exist_and_are_unique() -> None:
    entries = _entries(resident.memlockd_config())
    paths = [l.removeprefix("+") for l in entries]
    assert len(paths) == len(set(paths))
    assert len({os.path.realpath(p) for p in paths}) == len(paths)
    for p in paths:
        assert os.path.isfile(p) and os.path.realpath(p) == p, p


def test_memlockd_config_includes_mapped_libs_and_own_files() -> None:
    entries = set(_entries(resident.memlockd_config()))
    libc = next(p for p in resident.mapped_files() if os.path.basename(p) == "libc.so.6")
    assert os.path.realpath(libc) in entries
    assert os.path.realpath(resident.__file__) in entries


def test_memlockd_config_binaries_resolved_deduped_missing_skipped(tmp_path: Path) -> None:
    sh = shutil_which("sh")
    config = resident.memlockd_config(["sh", "/bin/sh", "no-such-binary-xyz", str(tmp_path / "nope")])
    entries = _entries(config)
    sh_lines = [l for l in entries if l.removeprefix("+") == os.path.realpath(sh)]
    assert sh_lines == ["+" + os.path.realpath(sh)]
    assert not any("no-such-binary-xyz" in l or "nope" in l for l in entries)


def test_memlockd_config_binary_already_mapped_gets_plus(tmp_path: Path) -> None:
    # the interpreter is both mapped and asked for as a binary: one line, with "+"
    python = os.path.realpath(sys.executable)
    entries = _entries(resident.memlockd_config([sys.executable]))
    assert [l for l in entries if l.removeprefix("+") == python] == ["+" + python]


def test_memlockd_config_lists_exactly_the_firing_path() -> None:
    # one list for the config memlockd reads and for `killcord check`'s residency check
    path = resident.firing_path()
    assert _entries(resident.memlockd_config()) == [("+" if libs else "") + p for p, libs in path.items()]
    sh = os.path.realpath(shutil_which("sh"))
    assert path[sh] is True  # a fallback binary: its libraries too
    assert path[os.path.realpath(resident.__file__)] is False


def test_memlockd_config_is_deterministic() -> None:
    assert resident.memlockd_config() == resident.memlockd_config()


def shutil_which(name: str) -> str:
    path = shutil.which(name)
    assert path is not None
    return path


# ---- locking ----


def test_lock_all_in_subprocess_locks_memory() -> None:
    # mlockall only ever in a short-lived child, never in the pytest process
    code = (
        "import killcord.resident as r\n"
        "before = r.locked_kib()\n"
        "r.lock_all()\n"
        "print(before, r.locked_kib())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"mlockall refused without root: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    before, after = (int(x) for x in out.stdout.split())
    assert before == 0
    assert after > 0


def test_lock_all_failure_raises_oserror_with_errno(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(flags: int) -> int:
        assert flags == resident.MCL_CURRENT | resident.MCL_FUTURE
        ctypes.set_errno(errno.ENOMEM)
        return -1

    monkeypatch.setattr(resident, "_mlockall", refuse)
    with pytest.raises(OSError) as info:
        resident.lock_all()
    assert info.value.errno == errno.ENOMEM
    assert "mlockall" in str(info.value)


def test_locked_kib_of_unlocked_self_is_zero() -> None:
    assert resident.locked_kib() == 0
    assert resident.locked_kib(str(os.getpid())) == 0


def test_locked_kib_missing_pid_raises() -> None:
    with pytest.raises(OSError):
        resident.locked_kib("999999999")
