"""The guest images, one per suite, each built once per session (or taken from the cache),
and which scenario CI runs on which suite.

Every test that takes `image` runs once per suite in $KILLCORD_SUITES (default: Debian 13
trixie and Debian 12 bookworm; `make test-vm-all SUITE=trixie` sets it). CI (`-m "not
extended"`) runs the matrix below; the rest is marked extended and runs in make test-vm-all.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from .image import ROOT, SUITES, Image, build, find_deb
from .installed import SUITE as INSTALLED_SUITE

# The CI matrix: which scenarios run on which suite. A scenario is the letter (or word)
# after test_ in the test's name: test_a_..., test_anti_..., test_sanitizing_...
# The whole .ci/run must stay within 60 minutes on 2 cores under TCG (issues 4 and 10); each
# guest costs about two minutes there. Extended (make test-vm-all): a and f on Debian 13,
# whose checks h makes in the same boot (a's staging and timings, f's refused unprivileged
# panic; root's panic is the sanitizing path's `panic`); q, r and mor, whose parts the host
# tests cover in dry-run (test_chord, test_keyboards, test_grace, test_mor); i (the
# standby), m (the target's boot clearing alone), n (a failed jump), p (detection under
# load, which make bench-vm-detect measures), and k with init_on_free=0.
CI_MATRIX: dict[str, frozenset[str]] = {
    # Debian 13: the core scenarios (h with a's and f's checks, e, g, anti), the fallback ones
    # of the hardening issue (k, l), keys first (o), the sanitizing path
    "trixie": frozenset({"e", "g", "h", "k", "l", "o", "anti", "package", "wipe", "fallback", "panic"}),
    # Debian 12 (oldstable): the kexec path and the fallback
    "bookworm": frozenset({"a", "g"}),
}
# A scenario CI runs with these parameters only; its other parameter sets are extended
CI_PARAMS: dict[str, dict[str, object]] = {"k": {"init_on_free": 1}}


def in_ci(suite: str, test_name: str, params: dict[str, object]) -> bool:
    scenario = scenario_of(test_name)
    return scenario in CI_MATRIX[suite] and all(params.get(k, v) == v for k, v in CI_PARAMS.get(scenario, {}).items())


def suites() -> list[str]:
    names = os.environ.get("KILLCORD_SUITES", " ".join(SUITES)).split()
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise pytest.UsageError(f"KILLCORD_SUITES={' '.join(names)}: unknown suite {unknown[0]!r}; "
                                f"use one or more of {', '.join(SUITES)} (make test-vm-all SUITE=trixie)")
    return names


def scenario_of(test_name: str) -> str:
    return test_name.split("[", 1)[0].removeprefix("test_").split("_", 1)[0]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "image" in metafunc.fixturenames:
        metafunc.parametrize("image", suites(), indirect=True, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted, dropped = suites(), []
    for item in items:
        spec = getattr(item, "callspec", None)
        suite = spec.params.get("image") if spec else None
        if suite and not in_ci(suite, item.name, spec.params):
            item.add_marker(pytest.mark.extended)
        # the installed dracut guest (test_dracut.py) is of one suite: it runs when that suite is asked for
        if "installed" in getattr(item, "fixturenames", ()) and INSTALLED_SUITE not in wanted:
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


@pytest.fixture(scope="session")
def image(request: pytest.FixtureRequest) -> Image:
    suite = request.param
    try:
        deb = find_deb(suite)
    except FileNotFoundError:
        subprocess.run(["make", "-C", str(ROOT), "deb", f"SUITE={suite}"], check=True)
        deb = find_deb(suite)
    image = build(suite, deb)
    image.out.mkdir(parents=True, exist_ok=True)
    return image
