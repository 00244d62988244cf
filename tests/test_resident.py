"""Tests for killcord.resident.

Every expectation comes from the test's own knowledge: files of known size with known pages
written, processes the test starts and the files it makes them map, a copy of the package with
known contents, and what the dynamic loader (`ldd`) or the kernel (/proc/PID/exe, VmLck) say,
never from resident's own helpers.
"""

from __future__ import annotations

import errno
import importlib.util
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from killcord import resident
from killcord.resident import FileResidency

# the src tree the module under test came from (children must import the same code)
SRC = Path(resident.__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
NOBODY = 65534
# memlockd reads its config with fgets(buf, 1024): a line of at most 1023 characters arrives
# whole, and a "+" line spends one of them on the "+".
MEMLOCKD_LONGEST_PATH = 1022


def _exe() -> str:
    """The interpreter running this test, as the kernel names it."""
    return os.readlink("/proc/self/exe")


def _which(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} not on PATH"
    return path


def _ldd(binary: str) -> set[str]:
    """The shared libraries the dynamic loader resolves for `binary`, as real paths."""
    out = subprocess.run([_which("ldd"), binary], capture_output=True, text=True, check=True).stdout
    libs = set()
    for line in out.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        words = [w for w in line.split() if w.startswith("/")]
        if words:
            libs.add(os.path.realpath(words[0]))
    assert libs, f"ldd found no libraries for {binary}: {out}"
    return libs


def _status_field(pid: int, field: str) -> str | None:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    return None


def _wait_zombie(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not (_status_field(pid, "State") or "").startswith("Z"):
        assert time.monotonic() < end, f"{pid} did not become a zombie"
        time.sleep(0.01)


@pytest.fixture
def zombie() -> Iterator[int]:
    """A pid that maps nothing: a child that exited and is not reaped yet."""
    proc = subprocess.Popen(["true"])
    _wait_zombie(proc.pid)
    yield proc.pid
    proc.wait()


@pytest.fixture
def mapper(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A fresh python process that maps a file of its own (and nothing the test maps)."""
    own = tmp_path.resolve() / "daemon-only.bin"
    own.write_bytes(b"d" * (3 * PAGE))
    code = (
        "import mmap, sys\n"
        "f = open(sys.argv[1], 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(own)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc.pid, own
    finally:
        proc.communicate(b"")  # EOF ends it


@pytest.fixture
def own_mapping(tmp_path: Path) -> Iterator[Path]:
    """A file only this (test) process maps."""
    p = tmp_path.resolve() / "test-only.bin"
    p.write_bytes(b"t" * PAGE)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ):
        yield p


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


def test_mincore_file_counts_exactly_the_pages_written(tmp_path: Path) -> None:
    # a hole of 8 pages, then one byte written into pages 2 and 5 (nothing read, so no
    # readahead): exactly those two pages are in the page cache
    p = tmp_path / "partial"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 8 * PAGE)
        os.pwrite(fd, b"x", 2 * PAGE)
        os.pwrite(fd, b"y", 5 * PAGE + 17)
    finally:
        os.close(fd)
    r = resident.mincore_file(str(p))
    assert r == FileResidency(str(p), 8, 2)
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
    assert info.value.errno == errno.EINVAL
    assert str(tmp_path) in str(info.value)


# ---- report ----


def test_report_counts_and_collects_errors(tmp_path: Path) -> None:
    hot, cold, partial, empty = (tmp_path / n for n in ("hot", "cold", "partial", "empty"))
    hot.write_bytes(b"x" * (2 * PAGE))
    hot.read_bytes()
    with open(cold, "wb") as f:
        f.truncate(3 * PAGE)
    with open(partial, "wb") as f:
        f.truncate(4 * PAGE)
        f.seek(3 * PAGE)
        f.write(b"p")  # page 3 of 4
    empty.touch()
    missing = str(tmp_path / "missing")
    nul = "bad\0path"

    rep = resident.report([str(hot), str(cold), missing, str(partial), str(empty), nul])

    assert rep["files"] == 4
    assert rep["pages"] == 2 + 3 + 4
    assert rep["resident_pages"] == 2 + 1
    assert rep["not_resident"] == [str(cold), str(partial)]
    assert rep["not_resident_count"] == 2
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
    assert (rep["files"], rep["pages"], rep["resident_pages"]) == (25, 25, 0)


def test_report_empty() -> None:
    assert resident.report([]) == {
        "files": 0,
        "pages": 0,
        "resident_pages": 0,
        "not_resident": [],
        "not_resident_count": 0,
        "errors": {},
    }


# ---- mapped_files ----


def test_mapped_files_of_self_has_interpreter_and_its_libraries() -> None:
    # what the dynamic loader loaded into this interpreter at start, found by ldd
    files = resident.mapped_files()
    assert _exe() in files
    missing = _ldd(_exe()) - set(files)
    assert not missing, f"libraries of {_exe()} not reported: {missing}"


def test_mapped_files_only_existing_regular_files_sorted_unique() -> None:
    files = resident.mapped_files()
    assert files == sorted(set(files))
    for p in files:
        assert p.startswith("/") and os.path.isfile(p), p
        assert "(deleted)" not in p and "[" not in p


def test_mapped_files_of_another_process(mapper: tuple[int, Path], own_mapping: Path) -> None:
    # the child's own mapping is there, this process's is not: the pid is really read
    pid, own = mapper
    files = resident.mapped_files(str(pid))
    assert str(own) in files
    assert str(own_mapping) not in files
    assert str(own_mapping) in resident.mapped_files()
    assert _exe() in files
    assert _ldd(_exe()) <= set(files)


def test_mapped_files_of_sleep_are_its_binary_and_libraries() -> None:
    sleep = os.path.realpath(_which("sleep"))
    proc = subprocess.Popen([sleep, "60"], env={**os.environ, "LC_ALL": "C"})
    try:
        # wait until sleep has been exec'd, loaded and sleeps (the exe link changes before
        # the loader has mapped anything)
        end = time.monotonic() + 10
        while not (os.readlink(f"/proc/{proc.pid}/exe") == sleep
                   and (_status_field(proc.pid, "State") or "").startswith("S")):
            assert time.monotonic() < end
            time.sleep(0.01)
        files = set(resident.mapped_files(str(proc.pid)))
        # without locale data to load, sleep maps only itself and what ldd lists
        assert files == {sleep} | _ldd(sleep)
    finally:
        proc.kill()  # our own child
        proc.wait()


def test_mapped_files_of_a_zombie_is_empty(zombie: int) -> None:
    assert resident.mapped_files(str(zombie)) == []


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


def test_mapped_files_path_with_spaces(tmp_path: Path) -> None:
    p = tmp_path / "a file  with spaces.bin"
    p.write_bytes(b"s" * PAGE)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ):
        assert str(p) in resident.mapped_files()


def test_mapped_files_missing_pid_raises() -> None:
    with pytest.raises(OSError):
        resident.mapped_files("999999999")


# ---- killcord_files, firing_path and memlockd_config, on a package of known contents ----


@pytest.fixture
def pkg_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, Path]:
    """resident.py, loaded from a copy of the package whose files the test chose."""
    pkg = tmp_path / "site" / "killcord"
    (pkg / "sub").mkdir(parents=True)
    shutil.copy(resident.__file__, pkg / "resident.py")
    (pkg / "__init__.py").write_text('"""a copy"""\n')
    (pkg / "zeta.py").write_text("Z = 1\n")
    (pkg / "sub" / "alpha.py").write_text("A = 1\n")
    (pkg / "_speedups.so").write_bytes(b"\x7fELF, or so it says")
    (pkg / "empty.py").touch()  # listed, but memlockd cannot map an empty file
    (pkg / "README.txt").write_text("not code")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "zeta.cpython-311.pyc").write_bytes(b"bytecode")
    name = "killcord_resident_copy"
    spec = importlib.util.spec_from_file_location(name, pkg / "resident.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module, pkg.resolve()


def test_killcord_files_are_the_package_sources_and_extensions(pkg_copy: tuple[ModuleType, Path]) -> None:
    mod, pkg = pkg_copy
    assert mod.killcord_files() == [
        f"{pkg}/__init__.py",
        f"{pkg}/_speedups.so",
        f"{pkg}/empty.py",
        f"{pkg}/resident.py",
        f"{pkg}/sub/alpha.py",
        f"{pkg}/zeta.py",
    ]


def test_killcord_files_of_the_real_package() -> None:
    files = resident.killcord_files()
    package = Path(resident.__file__).resolve().parent
    for name in ("__init__.py", "resident.py", "kill.py", "events.py", "fire.py", "daemon.py", "cli.py"):
        assert str(package / name) in files


@pytest.fixture
def binaries(tmp_path: Path) -> dict[str, str]:
    """Executables (and non-executables) at known paths."""
    d = tmp_path.resolve() / "bin"
    d.mkdir()
    tool = d / "tool"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    (d / "tool-link").symlink_to(tool)
    (d / "noexec").write_text("#!/bin/sh\n")
    (d / "noexec").chmod(0o644)
    (d / "empty").touch()
    (d / "empty").chmod(0o755)
    return {n: str(d / n) for n in ("tool", "tool-link", "noexec", "empty")} | {"missing": str(d / "nope")}


def _config_lines(config: str) -> tuple[list[str], list[str]]:
    lines = config.splitlines()
    assert config.endswith("\n")
    head = [l for l in lines if l.startswith("#")]
    return head, [l for l in lines if not l.startswith("#")]


def test_firing_path_and_memlockd_config_of_known_inputs(
    pkg_copy: tuple[ModuleType, Path], binaries: dict[str, str], zombie: int
) -> None:
    # a pid that maps nothing, a package of known files, known binaries: every line is known
    mod, pkg = pkg_copy
    python, dash = _exe(), os.path.realpath(_which("sh"))
    asked = ["sh", "/bin/sh", "no-such-binary-xyz", binaries["missing"], binaries["tool"],
             binaries["tool-link"], binaries["noexec"], binaries["empty"], sys.executable]
    expected = {
        python: True,  # the interpreter, with its libraries; asked for again: still once
        f"{pkg}/__init__.py": False,
        f"{pkg}/_speedups.so": False,
        f"{pkg}/resident.py": False,
        f"{pkg}/sub/alpha.py": False,
        f"{pkg}/zeta.py": False,
        dash: True,  # sh and /bin/sh are one file
        binaries["tool"]: True,  # and its symlink too
    }
    path = mod.firing_path(asked, pid=str(zombie))
    assert list(path.items()) == list(expected.items())

    head, body = _config_lines(mod.memlockd_config(asked, pid=str(zombie)))
    assert body == [
        f"+{python}",
        f"{pkg}/__init__.py",
        f"{pkg}/_speedups.so",
        f"{pkg}/resident.py",
        f"{pkg}/sub/alpha.py",
        f"{pkg}/zeta.py",
        f"+{dash}",
        f"+{binaries['tool']}",
    ]
    assert "killcord memlock-config" in head[0]
    assert f"# for python {python} ({platform.python_version()})" in head


def test_memlockd_config_skips_paths_memlockd_cannot_read(
    pkg_copy: tuple[ModuleType, Path], tmp_path: Path, zombie: int
) -> None:
    mod, pkg = pkg_copy

    def executable_at(length: int) -> str:
        # a path of exactly `length` bytes, in directories of at most 200 bytes each
        base = str(tmp_path / "long")
        parts, left = [], length - len(base) - 1
        while left > 201:
            parts.append("d" * 200)
            left -= 201
        path = os.path.join(base, *parts, "x" * left)
        assert len(path.encode()) == length
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).write_text("#!/bin/sh\n")
        os.chmod(path, 0o755)
        return path

    fits, too_long = executable_at(MEMLOCKD_LONGEST_PATH), executable_at(MEMLOCKD_LONGEST_PATH + 1)
    newline = tmp_path / "new\nline"
    newline.write_text("#!/bin/sh\n")
    newline.chmod(0o755)

    _, body = _config_lines(mod.memlockd_config([fits, too_long, str(newline)], pid=str(zombie)))
    assert body[-1] == "+" + fits and len(body[-1]) == 1023  # fgets(buf, 1024) reads it whole
    assert not any(too_long in l for l in body)
    assert not any("new" in l for l in body)


def test_firing_path_of_another_process(
    pkg_copy: tuple[ModuleType, Path], mapper: tuple[int, Path], own_mapping: Path
) -> None:
    # as `killcord check` asks for the daemon's pid: that process's mappings, not ours
    mod, pkg = pkg_copy
    pid, own = mapper
    dash = os.path.realpath(_which("sh"))
    path = mod.firing_path(["sh"], pid=str(pid))
    items = list(path.items())
    assert items[0] == (_exe(), True)
    assert path[str(own)] is False
    assert str(own_mapping) not in path
    for lib in _ldd(_exe()):
        assert path[lib] is False, lib
    # in this order: the interpreter, what the process maps, the package, the binaries
    assert items[-6:] == [
        (f"{pkg}/__init__.py", False),
        (f"{pkg}/_speedups.so", False),
        (f"{pkg}/resident.py", False),
        (f"{pkg}/sub/alpha.py", False),
        (f"{pkg}/zeta.py", False),
        (dash, True),
    ]
    mapped = [p for p, _ in items[1:-6]]
    assert mapped == sorted(mapped) and str(own) in mapped


def test_memlockd_config_default_of_this_process() -> None:
    # what `killcord memlock-config` prints: the interpreter first, the fallback's shell with
    # its libraries, this process's libraries and killcord's own sources
    head, body = _config_lines(resident.memlockd_config())
    python = _exe()
    assert head and all(l.startswith("#") for l in head)
    assert body[0] == "+" + python
    assert "+" + os.path.realpath(_which("sh")) in body
    for lib in _ldd(python):
        assert lib in body, lib
    package = Path(resident.__file__).resolve().parent
    assert str(package / "resident.py") in body
    assert str(package / "kill.py") in body
    paths = [l.removeprefix("+") for l in body]
    assert len(paths) == len(set(paths))
    for line, p in zip(body, paths):
        assert line.startswith(("/", "+/")), line  # memlockd acts on nothing else
        assert os.path.isfile(p) and os.path.realpath(p) == p and os.path.getsize(p) > 0, p


# ---- locking ----


def _vmlck(pid: int) -> int:
    value = _status_field(pid, "VmLck")
    assert value is not None and value.endswith(" kB"), value
    return int(value.split()[0])


def _child(code: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _expect(proc: subprocess.Popen[str], want: str) -> None:
    """Wait until the child has done its step and says so; it then waits for _go()."""
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != want:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child said {line!r}, not {want!r}: {err}")


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


def test_lock_all_locks_what_is_mapped_and_what_is_mapped_later() -> None:
    # mlockall only ever in a short-lived child, never in the pytest process
    if os.geteuid() != 0:
        pytest.skip("locking tens of MiB needs CAP_IPC_LOCK (CI runs as root)")
    code = (
        "import sys, killcord.resident as r\n"
        "def step(word):\n"
        "    print(word, flush=True); sys.stdin.readline()\n"
        "before = bytearray(32 << 20)\n"  # mapped before the lock: MCL_CURRENT
        "step('mapped')\n"
        "r.lock_all()\n"
        "step('locked')\n"
        "after = bytearray(64 << 20)\n"  # mapped after it: MCL_FUTURE
        "step('grown')\n"
    )
    proc = _child(code)
    try:
        _expect(proc, "mapped")
        assert _vmlck(proc.pid) == 0
        assert resident.locked_kib(str(proc.pid)) == 0
        _go(proc)
        _expect(proc, "locked")
        locked = _vmlck(proc.pid)
        assert locked >= 32 << 10, locked
        assert resident.locked_kib(str(proc.pid)) >= 32 << 10
        _go(proc)
        _expect(proc, "grown")
        assert _vmlck(proc.pid) - locked >= 64 << 10
        assert resident.locked_kib(str(proc.pid)) >= (32 + 64) << 10
    finally:
        proc.kill()  # our own child
        proc.communicate()


def test_lock_all_refused_raises_oserror_with_errno() -> None:
    # a real refusal: no CAP_IPC_LOCK and RLIMIT_MEMLOCK 0 make mlockall fail with EPERM
    drop = f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n" if os.geteuid() == 0 else ""
    code = (
        "import os, resource, killcord.resident as r\n"
        "resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))\n"
        + drop +
        "try:\n"
        "    r.lock_all()\n"
        "except OSError as e:\n"
        "    print(e.errno, e)\n"
        "else:\n"
        "    print('locked')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    number, _, message = out.stdout.strip().partition(" ")
    assert number == str(errno.EPERM), out.stdout
    assert "mlockall" in message


def test_locked_kib_of_unlocked_self_is_zero() -> None:
    assert resident.locked_kib() == 0
    assert resident.locked_kib(str(os.getpid())) == 0


def test_locked_kib_where_the_kernel_reports_none_is_zero(zombie: int) -> None:
    # a zombie (like a kernel thread) has no memory map and so no VmLck line
    assert _status_field(zombie, "VmLck") is None
    assert resident.locked_kib(str(zombie)) == 0


def test_locked_kib_missing_pid_raises() -> None:
    with pytest.raises(OSError):
        resident.locked_kib("999999999")

