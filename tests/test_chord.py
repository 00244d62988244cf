"""The panic key chord's rules and matcher (chord.py): what is refused, and that only a
press completing every name fires, never a part of it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from killcord.chord import KEYS, MODIFIERS, ChordError, Held, parse

HEADER = Path("/usr/include/linux/input-event-codes.h")  # linux-libc-dev (make setup installs it)


def test_every_code_is_the_kernels() -> None:
    defined = {m[1].lower(): int(m[2], 0) for m in re.finditer(r"#define KEY_(\w+)\s+(\w+)", HEADER.read_text())
               if re.fullmatch(r"\d+|0x[0-9a-fA-F]+", m[2])}
    assert {name: code for name, code in KEYS.items()} == {name: defined[name] for name in KEYS}
    for name, codes in MODIFIERS.items():
        if name.startswith(("left", "right")):
            assert codes == {defined[name]}, name


def test_a_chord_names_modifiers_and_keys() -> None:
    c = parse("Ctrl+Alt+Shift+K")
    assert c.text == "ctrl+alt+shift+k"
    assert c.groups == (frozenset({29, 97}), frozenset({56, 100}), frozenset({42, 54}), frozenset({37}))
    assert parse("control + win + del").text == "ctrl+meta+delete"
    assert parse("rightalt+f12").groups == (frozenset({100}), frozenset({88}))


@pytest.mark.parametrize("text, why", [
    ("k", "one key"),
    ("ctrl", "one key"),
    ("ctrl+leftctrl+k", "one key satisfies two"),
    ("shift+rightshift+k", "one key satisfies two"),
    ("a+b+c", "no modifier"),
    ("ctrl+alt", "modifiers alone"),
    ("ctrl+alt+shift+meta", "modifiers alone"),
    ("ctrl+ctrl+k", "twice"),
    ("ctrl+control+k", "twice"),
    ("ctrl++k", "empty key name"),
    ("", "empty key name"),
    ("ctrl+alt+kk", "unknown key 'kk'"),
    ("hyper+k", "unknown key 'hyper'"),
])
def test_refused_chords_say_why_and_how(text: str, why: str) -> None:
    with pytest.raises(ChordError, match=re.escape(why)) as err:
        parse(text)
    assert repr(text) in str(err.value) and ("e.g." in str(err.value) or "keys are" in str(err.value))


CHORD = parse("ctrl+alt+shift+k")


def press_all(held: Held, keys: list[int]) -> list[bool]:
    return [held.key(code, 1) for code in keys]


@given(st.data())
def test_a_part_of_the_chord_never_fires(data: st.DataObject) -> None:
    groups = list(CHORD.groups)
    missing = data.draw(st.sampled_from(range(len(groups))))
    keys = [data.draw(st.sampled_from(sorted(g))) for i, g in enumerate(groups) if i != missing]
    others = data.draw(st.lists(st.integers(1, 255).filter(lambda c: c not in groups[missing]), max_size=6))
    order = data.draw(st.permutations(keys + others))
    held = Held(CHORD)
    assert not any(press_all(held, order))
    assert not any(held.key(code, 2) for code in order)  # auto-repeat


@given(st.data())
def test_the_whole_chord_fires_on_its_last_press_in_any_order(data: st.DataObject) -> None:
    keys = [data.draw(st.sampled_from(sorted(g))) for g in CHORD.groups]
    order = data.draw(st.permutations(keys))
    held = Held(CHORD)
    assert press_all(held, order) == [False] * (len(order) - 1) + [True]
    # let one go and press it again: fires again; a key outside the chord pressed meanwhile does not
    assert held.key(order[0], 0) is False
    assert held.key(1, 1) is False
    assert held.key(order[0], 1) is True


def test_after_lost_events_only_a_new_press_completes_it() -> None:
    held = Held(CHORD)
    held.reset({29, 56, 42, 37})  # all down when the kernel dropped events
    assert held.complete()
    assert held.key(37, 2) is False  # repeat: no
    assert held.key(37, 0) is False
    assert held.key(37, 1) is True
