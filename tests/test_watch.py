"""The watcher on real netlink kernel uevents (synthetic ones, written to sysfs)."""

from __future__ import annotations

import select
from pathlib import Path

from conftest import needs_root, send_uevent

from killcord import watch
from killcord.events import Uevent

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


def test_change_on_optical_reads_media_presence(loopdev) -> None:
    dev = loopdev()
    devpath = f"/devices/virtual/block/{Path(dev).name}"
    w = watch.Watcher()
    send_uevent(dev, "change")
    assert wait_readable(w.fileno())
    events, _ = w.drain(frozenset({devpath}))  # treated as an optical drive
    assert [e.media_present for e in events if e.devpath == devpath] == [True]


def test_drain_does_not_block_when_nothing_is_queued() -> None:
    w = watch.Watcher()
    assert w.drain(frozenset()) == ([], False)


def test_event_storm_overflow_is_reported(loopdev) -> None:
    dev = loopdev()
    w = watch.Watcher(buffer_bytes=4096)  # tiny: a few events fill it
    for _ in range(300):
        send_uevent(dev, "change")
    events, overflow = w.drain(frozenset())
    assert overflow  # the kernel dropped events: the daemon re-checks the medium
    assert len(events) < 300
