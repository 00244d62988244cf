"""The state directory, opened and written without following links.

Layout (why): `state_dir` (default /run/killcord, the unit's RuntimeDirectory, 0755) holds
the control socket, which members of panic_group must be able to reach; its subdirectory
`records/` (0700) holds the audit records and the note of the armed medium, which only
root may read or write. Both must belong to us (root) and be writable by nobody else, or
a local user could plant a link where we write, or read what the audit saw.

Every path is opened one component at a time from / with O_NOFOLLOW, so a symbolic link
anywhere in it is refused rather than followed; files are created with O_EXCL under a
temporary name and renamed into place, relative to the directory's descriptor.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from killcord import arm_fds

RECORDS = "records"
FIRING_LOCK = ".firing"  # flock'ed by the daemon while its sequence runs
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_READ = 1 << 20


class UnsafeStateDir(OSError):
    """A directory we would write to is not safe (link, foreign owner, writable by others)."""


def _refuse(path: str, why: str, fix: str) -> UnsafeStateDir:
    return UnsafeStateDir(f"{path}: {why}; {fix}")


def open_dir(path: Path, create_mode: int | None = None) -> int:
    """A descriptor of the absolute directory `path`, owned by us and writable by nobody else.

    No component may be a symbolic link; an ancestor writable by others must be sticky
    (as /tmp and /dev/shm are), or someone else could swap the component below it.
    Missing components are created with `create_mode` (None: FileNotFoundError)."""
    text = os.path.normpath(str(path))  # no "..": every component is checked below
    if not os.path.isabs(text):
        raise _refuse(text, "not an absolute path", "give an absolute path")
    fd = os.open("/", _DIR_FLAGS)
    walked = ""
    try:
        for part in Path(text).parts[1:]:
            parent_st = os.fstat(fd)
            if parent_st.st_mode & stat.S_IWOTH and not parent_st.st_mode & stat.S_ISVTX:
                raise _refuse(text, f"{walked or '/'} is writable by everyone and not sticky",
                              "put it under a directory only root can write, such as /run")
            walked += "/" + part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create_mode is None:
                    raise
                try:
                    os.mkdir(part, create_mode, dir_fd=fd)
                except FileExistsError:
                    pass  # created meanwhile: opened and checked like any other
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if os.fstat(child).st_uid == os.geteuid():
                    os.fchmod(child, create_mode)  # mkdir's mode went through the umask
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse(text, f"{walked} is a symbolic link or not a directory",
                                  "give the real path of a directory (links are not followed)") from None
                raise
            os.close(fd)
            fd = child
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise _refuse(text, f"owned by uid {st.st_uid}, not {os.geteuid()}",
                          "give a directory owned by root, such as /run/killcord")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _refuse(text, f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                          "chmod go-w it, or give a directory only root can write, such as /run/killcord")
        return fd
    except BaseException:
        os.close(fd)
        raise


def records_path(state_dir: Path) -> Path:
    return Path(os.path.normpath(str(state_dir))) / RECORDS


def open_records(state_dir: Path, create: bool = True) -> int:
    """A descriptor of state_dir/records: ours, 0700 (created, or put back to 0700, if ours)."""
    parent = open_dir(state_dir, 0o755 if create else None)
    try:
        try:
            fd = os.open(RECORDS, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(RECORDS, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            fd = os.open(RECORDS, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _refuse(str(records_path(state_dir)), "is a symbolic link or not a directory",
                              "remove it: killcord creates it") from None
            raise
    finally:
        os.close(parent)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise _refuse(str(records_path(state_dir)), f"owned by uid {st.st_uid}, not {os.geteuid()}",
                      "remove it: killcord creates it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)
    return fd


class Records:
    """`with Records(state_dir) as fd`: the records directory held since arm time, or one
    opened now (and closed after) when nothing holds it (the CLI firing alone, tests)."""

    def __init__(self, state_dir: Path, create: bool = True) -> None:
        self.state_dir = state_dir
        self.create = create
        self._own: int | None = None

    def __enter__(self) -> int:
        held = arm_fds.held(str(records_path(self.state_dir)))
        if held is not None:
            return held
        self._own = open_records(self.state_dir, self.create)
        return self._own

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            os.close(self._own)
            self._own = None


def hold_records(state_dir: Path) -> int:
    """Open (creating) the records directory and keep it for the firing path."""
    fd = open_records(state_dir)
    arm_fds.hold(str(records_path(state_dir)), fd)
    return fd


def exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def write_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """Write `name` in the directory whole or not at all: an O_EXCL|O_NOFOLLOW temporary
    file, renamed over it. No fsync: the directory is in RAM (tmpfs)."""
    tmp = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        # left by an earlier process with our pid; the directory is ours alone (0700)
        os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        try:
            os.unlink(tmp, dir_fd=dir_fd)  # e.g. ENOSPC on a full tmpfs: no half file left
        except OSError:
            pass
        raise


def read(dir_fd: int, name: str, limit: int = MAX_READ) -> bytes:
    """A file's bytes (at most `limit`), never through a link."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_record(state_dir: Path, name: str, data: bytes) -> Path:
    """Write state_dir/records/<name> atomically; its path."""
    with Records(state_dir) as fd:
        write_atomic(fd, name, data)
    return records_path(state_dir) / name


def read_record(state_dir: Path, name: str) -> bytes:
    """state_dir/records/<name>; OSError (FileNotFoundError, UnsafeStateDir) if unreadable."""
    with Records(state_dir, create=False) as fd:
        return read(fd, name)


# ---- the firing lock: is a daemon's sequence under way? ----
# The daemon takes it when it starts firing and keeps it until it exits (the kernel drops
# it then, even on a crash). `killcord panic`, finding no daemon that answers, looks at it
# before firing by itself: a daemon busy firing does not answer, and a second sequence
# started by the CLI would kill it in the middle of its kexec or wipe.


def open_firing_lock(state_dir: Path) -> int:
    """Opened at arm time (no path lookup at fire time)."""
    with Records(state_dir) as records:
        return os.open(FIRING_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=records)


def take_firing_lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # another process fires already; ours goes on regardless


def firing_elsewhere(state_dir: Path) -> bool:
    """Does another process hold the firing lock? False when unsure: better fire twice
    than not at all."""
    try:
        fd = open_firing_lock(state_dir)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the lock if we got it
    return False
