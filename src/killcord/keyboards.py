"""The keyboards the panic chord is read from (chord.py says what completes it).

A keyboard here is an input event device whose key capabilities (the kernel's bitmap in
sysfs) can produce the whole chord. Those present at arm time are opened then; one
plugged in later is opened on the kernel's own `add` uevent for its eventN (devtmpfs has
made the node by then). Only the kernel is asked, not udev: the daemon arms before
systemd-udevd has processed the devices, as it does for the medium. Events are read raw
from evdev, below X, Wayland and the console, so a frozen desktop does not stop them, and
never grabbed: the session still gets every key.
"""

from __future__ import annotations

import errno
import fcntl
import os
import selectors
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from killcord import chord as chord_mod
from killcord import watch

INPUT_MAJOR = 13
# struct input_event on 64-bit Linux: struct timeval (two longs), __u16 type, __u16 code, __s32 value
EVENT = struct.Struct("@llHHi")
EV_SYN, EV_KEY = 0, 1
SYN_DROPPED = 3
KEY_MAX = 0x2FF
MAX_KEYBOARDS = 32  # far more than a machine has; a bound on fds whatever udev reports
READ_EVENTS = 64

logger = structlog.get_logger("killcord.keyboards")


def eviocgkey(length: int) -> int:
    """EVIOCGKEY(len), _IOC(_IOC_READ, 'E', 0x18, len): the keys down now, as a bitmap."""
    return (2 << 30) | (length << 16) | (ord("E") << 8) | 0x18


def capable(bitmap: str, chord: chord_mod.Chord) -> bool:
    """Whether a device whose capabilities/key reads `bitmap` can produce the chord: one key
    of each of its names. The kernel prints the bitmap as hex longs, most significant first."""
    try:
        words = [int(w, 16) for w in bitmap.split()]
    except ValueError:
        return False
    bits = 0
    for word in words:
        bits = (bits << 64) | word
    return all(any(bits >> code & 1 for code in group) for group in chord.groups)


def keys_down(fd: int) -> set[int]:
    buf = bytearray((KEY_MAX + 8) // 8)
    fcntl.ioctl(fd, eviocgkey(len(buf)), buf)
    return {i for i in range(KEY_MAX + 1) if buf[i // 8] >> (i % 8) & 1}


@dataclass
class Keyboard:
    node: str  # /dev/input/eventN
    name: str  # the kernel's name for it, e.g. "AT Translated Set 2 keyboard"
    fd: int
    held: chord_mod.Held
    hotplugged: bool = False

    @property
    def label(self) -> str:
        return f"{self.node} ({self.name})"

    def as_dict(self) -> dict[str, object]:
        return {"node": self.node, "name": self.name, "hotplugged": self.hotplugged}


@dataclass
class Keyboards:
    """The open keyboards, and the uevent socket that adds new ones. wait() blocks until the
    chord is complete on one of them and returns its label."""

    chord: chord_mod.Chord
    sysfs: Path = Path("/sys/class/input")
    dev: Path = Path("/dev/input")
    open: dict[int, Keyboard] = field(default_factory=dict)  # by fd
    refused: list[str] = field(default_factory=list)  # devices not opened, and why (the last few)

    def __post_init__(self) -> None:
        # Listen first: a keyboard plugged in while we look is then not missed. Only `add`
        # reaches the queue; a keyboard unplugged shows as ENODEV on its own descriptor.
        self.watcher = watch.Watcher(buffer_bytes=None)
        self.watcher.attach(watch.prefix_filter((b"add@",)))
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.watcher.fileno(), selectors.EVENT_READ, None)
        self.scan(hotplugged=False)

    def scan(self, hotplugged: bool) -> None:
        """Every input event device in sysfs (at arm time; again when uevents were lost)."""
        for entry in sorted(self.sysfs.glob("event*")):
            self._add(entry.name, hotplugged)

    def _add(self, name: str, hotplugged: bool) -> None:
        node = str(self.dev / name)
        if any(k.node == node for k in self.open.values()):
            return
        device = self.sysfs / name / "device"
        try:
            if not capable((device / "capabilities" / "key").read_text(), self.chord):
                return  # a mouse, a power button, a keyboard lacking a key of the chord
            label = (device / "name").read_text().strip() or "?"
        except OSError:
            return  # gone already, or no key capabilities at all
        if len(self.open) >= MAX_KEYBOARDS:
            self._refuse(node, f"already {MAX_KEYBOARDS} keyboards open")
            return
        try:
            fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            self._refuse(node, exc.strerror or str(exc))
            return
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) != INPUT_MAJOR:
            os.close(fd)
            self._refuse(node, "not an input character device")
            return
        keyboard = Keyboard(node, label, fd, chord_mod.Held(self.chord), hotplugged)
        self._resync(keyboard)
        self.open[fd] = keyboard
        self.sel.register(fd, selectors.EVENT_READ, keyboard)
        logger.info("keyboard_opened", node=node, name=label, hotplugged=hotplugged)

    def _refuse(self, node: str, why: str) -> None:
        self.refused = (self.refused + [f"{node}: {why}"])[-8:]
        logger.warning("keyboard_not_opened", node=node, error=why)

    def _close(self, keyboard: Keyboard, why: str) -> None:
        self.open.pop(keyboard.fd, None)
        try:
            self.sel.unregister(keyboard.fd)
        except (KeyError, ValueError):
            pass
        os.close(keyboard.fd)
        logger.info("keyboard_closed", node=keyboard.node, why=why)

    def _resync(self, keyboard: Keyboard) -> None:
        try:
            keyboard.held.reset(keys_down(keyboard.fd))
        except OSError:
            keyboard.held.reset(set())  # no key state to ask for: only new presses count

    def keyboards(self) -> list[Keyboard]:
        return list(self.open.values())

    def wait(self) -> str:
        """Block until the chord is complete on one keyboard; its label."""
        while True:
            for key, _ in self.sel.select():
                if key.data is None:
                    self._on_uevents()
                    continue
                hit = self._on_keyboard(key.data)
                if hit is not None:
                    return hit

    def _on_uevents(self) -> None:
        events, overflow = self.watcher.drain(frozenset())
        for event in events:
            name = os.path.basename(event.devpath)
            if event.subsystem == "input" and name.startswith("event"):
                self._add(name, hotplugged=True)
        if overflow:  # an `add` may be among the lost: look at sysfs instead
            self.scan(hotplugged=True)

    def _on_keyboard(self, keyboard: Keyboard) -> str | None:
        try:
            data = os.read(keyboard.fd, EVENT.size * READ_EVENTS)
        except BlockingIOError:
            return None
        except OSError as exc:  # ENODEV: unplugged
            self._close(keyboard, errno.errorcode.get(exc.errno or 0, str(exc)))
            return None
        if not data:
            self._close(keyboard, "end of file")
            return None
        hit = None
        for _sec, _usec, kind, code, value in EVENT.iter_unpack(data[: len(data) - len(data) % EVENT.size]):
            if kind == EV_KEY and keyboard.held.key(code, value):
                hit = keyboard.label
            elif kind == EV_SYN and code == SYN_DROPPED:
                self._resync(keyboard)  # the kernel's buffer overflowed: ask what is down now
        return hit

    def close(self) -> None:
        for keyboard in self.keyboards():
            self._close(keyboard, "stopping")
        self.sel.close()
