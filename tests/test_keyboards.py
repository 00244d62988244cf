"""keyboards.py's reading of key events. This machine has no input device and no uinput,
so a pipe stands in for an evdev node here (a fake, named as such): it carries the
kernel's struct input_event bytes. The real keyboards, the emulated PS/2 one and a USB
keyboard plugged in after arming, are read in a QEMU guest (tests/vm, scenario q)."""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import pytest
from conftest import needs_root

from killcord.chord import Held, parse
from killcord.keyboards import EV_KEY, EV_SYN, EVENT, SYN_DROPPED, Keyboard, Keyboards

pytestmark = needs_root  # the udev monitor's netlink socket

CHORD = parse("ctrl+alt+shift+k")
CTRL, ALT, SHIFT, K = 29, 56, 42, 37


def ev(kind: int, code: int, value: int) -> bytes:
    return EVENT.pack(0, 0, kind, code, value)


def key(code: int, value: int) -> bytes:
    return ev(EV_KEY, code, value) + ev(EV_SYN, 0, 0)


@pytest.fixture
def pipe_keyboard() -> Iterator[tuple[queue.Queue[str], Keyboards, int]]:
    kb = Keyboards(CHORD)
    assert kb.keyboards() == []  # no input device on this machine
    r, w = os.pipe()
    os.set_blocking(r, False)
    fake = Keyboard("/dev/input/event-pipe", "a pipe standing in for a keyboard", r, Held(CHORD))
    kb.open[r] = fake
    kb.sel.register(r, 1, fake)
    fired: queue.Queue[str] = queue.Queue()

    def reader() -> None:  # as the daemon's keys thread: each completed chord, in turn
        while True:
            fired.put(kb.wait())

    threading.Thread(target=reader, daemon=True).start()
    yield fired, kb, w
    if fake.fd in kb.open:
        os.close(w)


def waited(fired: queue.Queue[str], timeout: float = 5.0) -> str | None:
    try:
        return fired.get(timeout=timeout)
    except queue.Empty:
        return None


def test_the_chord_on_one_keyboard_is_reported_with_its_name(pipe_keyboard) -> None:
    fired, kb, w = pipe_keyboard
    os.write(w, key(CTRL, 1) + key(ALT, 1) + key(SHIFT, 1) + key(K, 2) + key(K, 1))
    assert waited(fired) == "/dev/input/event-pipe (a pipe standing in for a keyboard)"


def test_a_part_of_it_or_a_dropped_buffer_does_not_fire(pipe_keyboard) -> None:
    fired, kb, w = pipe_keyboard
    # three of four, released, then all four but with the kernel's overflow in between:
    # after SYN_DROPPED only what the device says is down counts (a pipe says nothing)
    os.write(w, key(CTRL, 1) + key(ALT, 1) + key(K, 1) + key(K, 0) + key(ALT, 0)
             + key(ALT, 1) + key(SHIFT, 1) + ev(EV_SYN, SYN_DROPPED, 0) + key(K, 1))
    assert waited(fired, 2.0) is None
    os.write(w, key(CTRL, 1) + key(ALT, 1) + key(SHIFT, 1) + key(K, 0) + key(K, 1))
    assert waited(fired) is not None


def test_a_keyboard_that_goes_away_is_closed_not_fatal(pipe_keyboard) -> None:
    fired, kb, w = pipe_keyboard
    os.write(w, key(CTRL, 1) + b"\x00" * 5)  # a torn write, then the end: as an unplugged device
    os.close(w)
    assert waited(fired, 2.0) is None
    assert kb.keyboards() == []


# capabilities/key as the kernel prints it (hex longs, most significant first), from a
# QEMU guest's devices (Debian 13 kernel)
AT_KEYBOARD = "402000000 3803078f800d001 feffffdfffefffff fffffffffffffffe"
POWER_BUTTON = "10000000000000 0"
NO_RIGHT_ALT = "0 0 fffffffffffffffe"  # codes 1 to 63 only: no rightalt (100), no meta (125)


def test_a_keyboard_is_a_device_that_can_produce_the_whole_chord() -> None:
    from killcord.keyboards import capable
    assert capable(AT_KEYBOARD, CHORD)
    assert not capable(POWER_BUTTON, CHORD)
    assert capable(NO_RIGHT_ALT, CHORD)  # either alt will do
    assert not capable(NO_RIGHT_ALT, parse("rightalt+k"))
    assert not capable(NO_RIGHT_ALT, parse("meta+k"))
    assert not capable("", CHORD) and not capable("zz", CHORD)
