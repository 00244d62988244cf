"""The panic key chord: its names, the rules a chord must pass, and the matcher that says
when one keyboard holds all of it. Pure: no device is opened here (keyboards.py reads them).

Written by hand: the key codes are the kernel's stable input ABI (linux/input-event-codes.h),
and the one binding that carries them (python-evdev) is not among our dependencies for the
sake of about sixty numbers. tests/test_chord.py checks every number against the header.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Modifiers: a name matches either side's key, unless the side is named.
MODIFIERS: dict[str, frozenset[int]] = {
    "ctrl": frozenset({29, 97}), "leftctrl": frozenset({29}), "rightctrl": frozenset({97}),
    "shift": frozenset({42, 54}), "leftshift": frozenset({42}), "rightshift": frozenset({54}),
    "alt": frozenset({56, 100}), "leftalt": frozenset({56}), "rightalt": frozenset({100}),
    "meta": frozenset({125, 126}), "leftmeta": frozenset({125}), "rightmeta": frozenset({126}),
}
MODIFIERS["super"] = MODIFIERS["meta"]

KEYS: dict[str, int] = {
    "esc": 1, "minus": 12, "equal": 13, "backspace": 14, "tab": 15,
    "leftbrace": 26, "rightbrace": 27, "enter": 28, "semicolon": 39, "apostrophe": 40, "grave": 41,
    "backslash": 43, "comma": 51, "dot": 52, "slash": 53, "space": 57, "capslock": 58,
    "numlock": 69, "scrolllock": 70, "f11": 87, "f12": 88, "sysrq": 99,
    "home": 102, "up": 103, "pageup": 104, "left": 105, "right": 106, "end": 107, "down": 108,
    "pagedown": 109, "insert": 110, "delete": 111, "pause": 119,
}
KEYS.update({str(n): 2 + (n - 1) % 10 for n in range(10)})  # KEY_1 = 2 ... KEY_9 = 10, KEY_0 = 11
KEYS.update({c: 16 + i for i, c in enumerate("qwertyuiop")})  # KEY_Q = 16
KEYS.update({c: 30 + i for i, c in enumerate("asdfghjkl")})  # KEY_A = 30
KEYS.update({c: 44 + i for i, c in enumerate("zxcvbnm")})  # KEY_Z = 44
KEYS.update({f"f{n}": 58 + n for n in range(1, 11)})  # KEY_F1 = 59 ... KEY_F10 = 68

ALIASES = {"control": "ctrl", "win": "meta", "escape": "esc", "del": "delete", "return": "enter",
           "pgup": "pageup", "pgdn": "pagedown", "prtsc": "sysrq", "print": "sysrq"}


class ChordError(ValueError):
    """A refused chord: the message names the value and the fix."""


@dataclass(frozen=True)
class Chord:
    text: str  # as configured, normalised: "ctrl+alt+shift+k"
    groups: tuple[frozenset[int], ...]  # one per name: any one key of a group satisfies it

    @property
    def codes(self) -> frozenset[int]:
        return frozenset().union(*self.groups)


def parse(text: str) -> Chord:
    """A chord from "ctrl+alt+shift+k". Refused: an unknown name, a name twice, a chord that
    one key can complete (a single name, or names a single key satisfies at once, such as
    ctrl+leftctrl), a chord with no modifier, or one of modifiers alone (complete on the way
    to every ordinary shortcut that starts with them, such as ctrl+alt+t)."""
    names = [ALIASES.get(n, n) for n in (part.strip().lower() for part in text.split("+"))]
    fix = "write modifiers and one or more keys joined by '+', e.g. \"ctrl+alt+shift+k\""
    if any(not n for n in names):
        raise ChordError(f"panic_keys {text!r} has an empty key name; {fix}")
    unknown = [n for n in names if n not in MODIFIERS and n not in KEYS]
    if unknown:
        raise ChordError(f"panic_keys {text!r}: unknown key {unknown[0]!r}; modifiers are "
                         f"{', '.join(sorted(MODIFIERS))}; keys are a-z, 0-9, f1-f12 and {', '.join(sorted(k for k in KEYS if len(k) > 3 and not k.startswith('f')))}")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ChordError(f"panic_keys {text!r} names {twice!r} twice; {fix}")
    groups = tuple(MODIFIERS[n] if n in MODIFIERS else frozenset({KEYS[n]}) for n in names)
    if len(groups) < 2:
        raise ChordError(f"panic_keys {text!r} is one key, pressed by accident as easily as on purpose; {fix}")
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if a & b:
                raise ChordError(f"panic_keys {text!r}: one key satisfies two of its names at once; "
                                 f"name each key once (ctrl, or leftctrl, not both); {fix}")
    mods = [n for n in names if n in MODIFIERS]
    if not mods:
        raise ChordError(f"panic_keys {text!r} has no modifier (ctrl, alt, shift, meta): typing would fire it; {fix}")
    if len(mods) == len(names):
        raise ChordError(f"panic_keys {text!r} is modifiers alone: it is complete on the way to every "
                         f"shortcut that starts with them; add a key; {fix}")
    return Chord("+".join(names), groups)


@dataclass
class Held:
    """What one keyboard holds down, from its key events, and whether the chord is complete.
    Only a press can complete it: a key held through a SYN_DROPPED resync, or auto-repeat,
    never fires by itself."""

    chord: Chord
    down: set[int] = field(default_factory=set)

    def key(self, code: int, value: int) -> bool:
        """One EV_KEY event (value 1 press, 0 release, 2 auto-repeat); True when this press
        completes the chord."""
        if value == 0:
            self.down.discard(code)
            return False
        if value != 1:
            return False
        self.down.add(code)
        return code in self.chord.codes and self.complete()

    def complete(self) -> bool:
        return all(group & self.down for group in self.chord.groups)

    def reset(self, down: set[int]) -> None:
        """After events were lost (SYN_DROPPED): the keys the kernel says are down now."""
        self.down = set(down)
