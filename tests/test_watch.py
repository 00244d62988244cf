"""The watcher on real netlink kernel uevents (synthetic ones, written to sysfs)."""

from __future__ import annotations

import os
import select
import socket
import subprocess
from pathlib import Path

import pytest
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


# ---- the kernel-side filter and the hand-written parser ----


def loop_devpath(dev: str) -> str:
    return f"/devices/virtual/block/{Path(dev).name}"


def seen_of(events: list[Uevent], *devpaths: str) -> list[tuple[str, str]]:
    return [(e.action, e.devpath) for e in events if e.devpath in devpaths]


def storm(dev: str, n: int) -> None:
    """n `change` uevents on dev, written as fast as we can."""
    fd = os.open(f"/sys/class/block/{Path(dev).name}/uevent", os.O_WRONLY)
    try:
        for _ in range(n):
            os.write(fd, b"change")
    finally:
        os.close(fd)


def test_filter_passes_every_remove_and_only_a_watched_devpaths_change(loopdev) -> None:
    a, b = loopdev(), loopdev()
    pa, pb = loop_devpath(a), loop_devpath(b)
    filtered, unfiltered = watch.Watcher(), watch.Watcher()  # before set_filter: everything
    filtered.set_filter(frozenset({pa}))
    for dev, action in ((a, "add"), (b, "change"), (a, "change"), (b, "remove")):
        send_uevent(dev, action)
    got = until(filtered, pb, "remove", frozenset({pa}))
    assert seen_of(got, pa, pb) == [("change", pa), ("remove", pb)]
    assert [e.media_present for e in got if e.devpath == pa] == [True]
    # whatever else this machine sent meanwhile: only removes got through
    assert all(e.action == "remove" for e in got if e.devpath != pa)
    all_four = seen_of(until(unfiltered, pb, "remove", frozenset()), pa, pb)
    assert all_four == [("add", pa), ("change", pb), ("change", pa), ("remove", pb)]


def test_set_filter_again_replaces_the_watched_set(loopdev) -> None:
    a, b = loopdev(), loopdev()
    pa, pb = loop_devpath(a), loop_devpath(b)
    w = watch.Watcher()
    w.set_filter(frozenset({pa}))
    w.set_filter(frozenset({pb}))
    for dev, action in ((a, "change"), (b, "change"), (a, "remove")):
        send_uevent(dev, action)
    assert seen_of(until(w, pa, "remove", frozenset({pb})), pa, pb) == [("change", pb), ("remove", pa)]


def test_a_storm_of_unrelated_changes_never_reaches_the_queue(loopdev) -> None:
    """Both watchers get a tiny buffer (8 KiB, a few events): the unfiltered one overflows
    in the same storm, so the storm was real."""
    a, b = loopdev(), loopdev()
    pa, pb = loop_devpath(a), loop_devpath(b)
    filtered, unfiltered = watch.Watcher(buffer_bytes=4096), watch.Watcher(buffer_bytes=4096)
    filtered.set_filter(frozenset({pa}))
    storm(b, 20000)
    send_uevent(a, "remove")  # the kernel queues it before the write returns
    events, overflow = filtered.drain(frozenset({pa}))
    assert not overflow
    assert seen_of(events, pa, pb) == [("remove", pa)]  # and none of b's 20000 changes
    assert unfiltered.drain(frozenset())[1]


def raw_socket(w: watch.Watcher) -> socket.socket:
    """The watcher's own socket, read past drain(): what the kernel's filter let through."""
    return socket.socket(fileno=os.dup(w.fileno()))


def uevent_sender() -> socket.socket:
    # as root (CAP_NET_ADMIN) the kernel lets any process send to a uevent socket's port id;
    # unprivileged, it refuses (EPERM), and only the kernel sends from port id 0
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, watch.NETLINK_KOBJECT_UEVENT)


def through_filter(w: watch.Watcher, messages: list[bytes]) -> list[bytes]:
    """Send `messages` to w's port, then an end marker (a `remove`): which ones were queued."""
    end = b"remove@/devices/killcord-test-end\0"
    got: list[bytes] = []
    with raw_socket(w) as raw, uevent_sender() as sender:
        for m in messages + [end]:
            sender.sendto(m, (raw.getsockname()[0], 0))
        me = sender.getsockname()[0]
        while end not in got and wait_readable(raw.fileno()):
            data, (port_id, _) = raw.recvfrom(watch.MESSAGE_MAX)
            if port_id == me:
                got.append(data)
    assert got[-1:] == [end]
    return got[:-1]


def test_the_kernel_filter_compares_the_whole_devpath_up_to_its_nul() -> None:
    """Crafted messages, from a root sender, through the kernel's BPF filter: devpaths of
    every length modulo 4 (word, half-word and byte loads) and one long enough that a
    mismatch jumps farther than a conditional jump can (BPF_JA)."""
    devpaths = ["/devices/a", "/devices/bb", "/devices/ccc", "/devices/dddd", "/devices/" + "x" * 1500 + "y"]
    w = watch.Watcher()
    w.set_filter(frozenset(devpaths))
    passes, dropped = [], []
    for d in map(str.encode, devpaths):
        passes += [b"change@" + d + b"\0", b"change@" + d + b"\0SUBSYSTEM=block\0", b"remove@" + d + b"\0"]
        dropped += [b"change@" + d[:-1] + b"\0",  # a prefix of it
                    b"change@" + d + b"1\0", b"change@" + d + b"/sub\0",  # a sibling, a child
                    b"change@" + d[:-1] + b"z\0", b"change@" + d[:9] + b"q" + d[10:] + b"\0",  # one byte off
                    b"change@" + d,  # no NUL: the last load runs past the end
                    b"add@" + d + b"\0", b"chang@" + d + b"\0", b"Remove@" + d + b"\0"]
    dropped += [b"remove", b"remov@/devices/a\0", b"r", b"change@/devices/other\0"]
    assert through_filter(w, passes + dropped) == passes


def test_a_uevent_from_another_sender_than_the_kernel_is_dropped(loopdev) -> None:
    """A root process forges the medium's `remove` and sends garbage to the watcher's port:
    none of it is an event (nor an error); the kernel's own `remove` still is."""
    dev = loopdev()
    devpath = loop_devpath(dev)
    machine = Machine(DEFAULT_DEADLINES_MS)
    machine.feed(Armed(frozenset({devpath})))
    w = watch.Watcher()
    forged = f"remove@{devpath}\0ACTION=remove\0DEVPATH={devpath}\0SUBSYSTEM=block\0DEVTYPE=disk\0".encode()
    assert watch.parse_uevent(forged, frozenset()) == Uevent("remove", devpath, "block", "disk")  # well formed
    with raw_socket(w) as raw, uevent_sender() as sender:
        for data in (forged, b"\xff\xfe\0", b"libudev\0\xfe\xed\xca\xfe", b"x" * 4000):
            sender.sendto(data, (raw.getsockname()[0], 0))  # returns once queued
    events, overflow = w.drain(frozenset())
    assert not overflow and [e for e in events if e.devpath == devpath] == []
    assert not any(machine.feed(e) for e in events)
    send_uevent(dev, "remove")
    assert any(machine.feed(e) for e in until(w, devpath, "remove", frozenset()))


def test_parse_refuses_what_is_not_a_kernel_uevent() -> None:
    """The function drain() parses with (a kernel message cannot be made malformed here)."""
    for data in (b"", b"\0", b"remove", b"remove@/devices/x",  # no header NUL
                 b"remove/devices/x\0", b"@/devices/x\0", b"remove@\0", b"remove@devices/x\0",
                 b"libudev\0\xfe\xed\xca\xfe", b"remove@/devices/\xff\0SUBSYSTEM=block\0",
                 b"re\xe9move@/devices/x\0", b"remove@/devices/x\0SUBSYSTEM=bl\xffock\0",
                 b"remove@/devices/x\0DEVTYPE=\xc3\0"):
        assert watch.parse_uevent(data, frozenset()) is None, data
    ok = b"remove@/devices/x/sda/sda1\0ACTION=remove\0SUBSYSTEM=block\0PARTNAME=Donn\xe9es\0DEVTYPE=partition"
    assert watch.parse_uevent(ok, frozenset()) == Uevent("remove", "/devices/x/sda/sda1", "block", "partition")
    assert watch.parse_uevent(b"add@/devices/x\0XSUBSYSTEM=a\0", frozenset()) == Uevent("add", "/devices/x")


def test_a_filter_over_the_kernels_limit_is_refused_and_the_previous_one_stays(loopdev) -> None:
    dev = loopdev()
    devpath = loop_devpath(dev)
    w = watch.Watcher()
    w.set_filter(frozenset())
    too_many = frozenset(f"/devices/virtual/block/{'x' * 200}{i}" for i in range(40))
    with pytest.raises(ValueError, match="over the kernel's limit of 4096"):
        w.set_filter(too_many | {devpath})
    send_uevent(dev, "change")
    send_uevent(dev, "remove")
    assert seen_of(until(w, devpath, "remove", frozenset()), devpath) == [("remove", devpath)]
