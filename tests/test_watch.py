"""The watcher on real netlink kernel uevents (synthetic ones, written to sysfs)."""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

from conftest import needs_root, send_uevent

from killcord import medium, watch
from killcord.config import DEFAULT_DEADLINES_MS
from killcord.events import Armed, Uevent
from killcord.machine import Machine

pytestmark = needs_root


def wait_readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_remove_arrives_as_uevent(loopdev) -> None:
    dev = loopdev()
    w = watch.Watcher()
    send_uevent(dev, "remove")
    devpath = f"/devices/virtual/block/{Path(dev).name}"
    seen: list[Uevent] = []
    while wait_readable(w.fileno()):
        events, overflow = w.drain(frozenset())
        assert not overflow
        seen += events
        if any(e.devpath == devpath for e in seen):
            break
    mine = [e for e in seen if e.devpath == devpath]
    assert mine == [Uevent("remove", devpath, "block", "disk", None)]


def test_change_on_a_media_watched_disk_reads_media_presence(loopdev) -> None:
    dev = loopdev()
    devpath = f"/devices/virtual/block/{Path(dev).name}"
    w = watch.Watcher()
    send_uevent(dev, "change")
    assert wait_readable(w.fileno())
    events, _ = w.drain(frozenset({devpath}))  # treated as a removable disk or an optical drive
    assert [e.media_present for e in events if e.devpath == devpath] == [True]


def until(w: watch.Watcher, devpath: str, action: str, media_watched: frozenset[str]) -> list[Uevent]:
    seen: list[Uevent] = []
    while not any(e.devpath == devpath and e.action == action for e in seen) and wait_readable(w.fileno()):
        seen += w.drain(media_watched)[0]
    return seen


def test_a_real_change_to_size_zero_fires_on_a_media_watched_disk(loopdev) -> None:
    """The kernel's own `change` when a disk's media goes: a loop whose file is truncated to
    nothing, then `losetup -c` (a loop is not removable: as a stand-in for a card reader's disk,
    it is put in media_watched by hand; which disks are is tested on the fake sysfs)."""
    dev = loopdev()
    m = medium.resolve(dev, Path("/x"))
    as_removable = frozenset({m.disk})
    machine = Machine(DEFAULT_DEADLINES_MS)
    machine.feed(Armed(frozenset(m.devpaths), as_removable))
    not_removable = Machine(DEFAULT_DEADLINES_MS)
    not_removable.feed(Armed(frozenset(m.devpaths), frozenset()))
    w = watch.Watcher()
    os.truncate(Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip(), 0)
    subprocess.run(["losetup", "--set-capacity", dev], check=True)
    mine = [e for e in until(w, m.disk, "change", as_removable) if e.devpath == m.disk]
    assert mine == [Uevent("change", m.disk, "block", "disk", media_present=False)]
    assert machine.feed(mine[0]) and machine.trigger == f"uevent change {m.disk}"
    assert not_removable.feed(mine[0]) == []  # a fixed disk's `change` is never enough
    assert not medium.present(m)  # and the re-check agrees: the device is there, its media is not


def test_drain_does_not_block_when_nothing_is_queued() -> None:
    w = watch.Watcher()
    assert w.drain(frozenset()) == ([], False)


def test_drain_limit_leaves_the_rest_queued(loopdev) -> None:
    dev = loopdev()
    devpath = f"/devices/virtual/block/{Path(dev).name}"
    w = watch.Watcher()
    for _ in range(5):
        send_uevent(dev, "change")
    assert wait_readable(w.fileno())
    batches: list[list[Uevent]] = []
    while sum(e.devpath == devpath for b in batches for e in b) < 5 and wait_readable(w.fileno(), 2):
        batches.append(w.drain(frozenset(), limit=2)[0])
    assert batches[0] and all(len(b) <= 2 for b in batches)  # bounded batches...
    assert sum(e.devpath == devpath for b in batches for e in b) == 5  # ...and nothing lost between them
    assert w.drain(frozenset(), limit=0) == ([], False)


def test_drain_limit_still_reports_overflow(loopdev) -> None:
    dev = loopdev()
    w = watch.Watcher(buffer_bytes=4096)
    for _ in range(300):
        send_uevent(dev, "change")
    events, overflow = w.drain(frozenset(), limit=3)
    assert overflow and len(events) == 3
    rest, _ = w.drain(frozenset())
    assert rest  # what fitted in the buffer is still there for the next batch


def test_event_storm_overflow_is_reported(loopdev) -> None:
    dev = loopdev()
    w = watch.Watcher(buffer_bytes=4096)  # tiny: a few events fill it
    for _ in range(300):
        send_uevent(dev, "change")
    events, overflow = w.drain(frozenset())
    assert overflow  # the kernel dropped events: the daemon re-checks the medium
    assert len(events) < 300
