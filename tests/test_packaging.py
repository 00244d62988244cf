"""The Debian package's parts: systemd units, sleep/shutdown hooks, the conffile, the
maintainer scripts, the changelog's version; and the built .deb when there is one.

Fast and static: nothing here installs, starts or runs a hook for real (the shutdown hook
would drop caches and wipe). The real install in a chroot is tests/vm's job.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import killcord
from conftest import load_suite_chroot
from killcord.config import Config, load

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
DEBIAN = ROOT / "packaging" / "debian"
CONFFILE = ROOT / "packaging" / "killcord.toml"

# What killcord.service may hold at most (see the comments in the unit for each one).
ALLOWED_CAPS = {"CAP_SYS_BOOT", "CAP_KILL", "CAP_SYS_ADMIN", "CAP_IPC_LOCK", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN",
                "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SYS_NICE", "CAP_SETUID", "CAP_SETGID"}
# Sandboxing that would break firing (each explained in the unit): must stay off.
BREAKS_FIRING = {
    "ProtectKernelTunables": "makes /proc/sys and /proc/sysrq-trigger read-only",
    "ProtectKernelLogs": "hides /dev/kmsg",
    "ProtectClock": "turns on the device allow-list, which blocks /dev/kmsg",
    "PrivateDevices": "hides /dev/kmsg and block devices",
    "ProtectProc": "hides processes from the kill sweeps",
    "ProcSubset": "hides /proc/slabinfo, /proc/sys, /proc/sysrq-trigger",
    "PrivateNetwork": "kernel uevents go to the initial network namespace",
    "PrivateUsers": "capabilities in a user namespace cannot kexec or signal init",
    "DynamicUser": "it must run as root",
    "RestrictRealtime": "the uevent detector and the kill and keys stages run SCHED_FIFO",
    # the poweroff fallback frees the system's own RAM file systems, not private copies
    "ProtectSystem": "the fallback could not free files on /run, /dev/shm or the overlay",
    "ProtectHome": "the fallback would not see /run/user",
    "PrivateTmp": "the fallback would free a private /tmp instead of the system's",
    "PrivateMounts": "the fallback would free mounts of its own namespace only",
    "User": "it must run as root",
}
HOOKS = [SYSTEMD / "killcord.sleep", SYSTEMD / "killcord.shutdown"]
MAINTAINER_SCRIPTS = [DEBIAN / f"killcord.{s}" for s in ("postinst", "postrm", "prerm")]


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}: keys may repeat, order kept,
    comments dropped, backslash continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} before any [section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times: {found}"
    return found[0]


@pytest.fixture(scope="module")
def daemon_unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(SYSTEMD / "killcord.service")


@pytest.fixture(scope="module")
def prepare_unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(SYSTEMD / "killcord-shutdown-prepare.service")


# ---- killcord.service ----


def test_daemon_unit_runs_the_daemon_under_the_watchdog(daemon_unit) -> None:
    assert one(daemon_unit, "Service", "Type") == "notify"
    assert one(daemon_unit, "Service", "ExecStart") == "/usr/bin/killcord daemon"
    watchdog = one(daemon_unit, "Service", "WatchdogSec")
    assert re.fullmatch(r"\d+", watchdog) and 0 < int(watchdog) <= 30, watchdog
    assert one(daemon_unit, "Service", "Restart") == "always"
    assert one(daemon_unit, "Service", "OOMScoreAdjust") == "-1000"


def test_daemon_unit_is_armed_early_and_keeps_its_state(daemon_unit) -> None:
    assert one(daemon_unit, "Unit", "DefaultDependencies") == "no"
    assert "sysinit.target" in " ".join(values(daemon_unit, "Unit", "Before"))
    assert values(daemon_unit, "Install", "WantedBy") == ["sysinit.target"]
    assert one(daemon_unit, "Service", "RuntimeDirectory") == "killcord"
    # unprivileged users must reach the socket (so their panic is refused and logged)
    assert one(daemon_unit, "Service", "RuntimeDirectoryMode") == "0755"
    # the record of the armed medium must survive a restart
    assert one(daemon_unit, "Service", "RuntimeDirectoryPreserve") == "yes"


def test_daemon_unit_capabilities_are_allowed_and_each_explained(daemon_unit) -> None:
    caps = set(" ".join(values(daemon_unit, "Service", "CapabilityBoundingSet")).split())
    assert caps, "CapabilityBoundingSet= must be set"
    assert not any(c.startswith("~") for c in caps), "an allow-list, not a deny-list"
    assert caps <= ALLOWED_CAPS, f"not allowed: {sorted(caps - ALLOWED_CAPS)}"
    ambient = set(" ".join(values(daemon_unit, "Service", "AmbientCapabilities")).split())
    assert ambient <= caps
    text = (SYSTEMD / "killcord.service").read_text()
    for cap in caps:
        assert re.search(rf"^# {cap}\s+\S", text, re.M), f"{cap} has no comment saying why"


def test_daemon_unit_sandbox_does_not_break_firing(daemon_unit) -> None:
    for key, why in BREAKS_FIRING.items():
        for value in values(daemon_unit, "Service", key):
            assert value in ("no", "false", "default", ""), f"{key}={value}: {why}"
    families = set(one(daemon_unit, "Service", "RestrictAddressFamilies").split())
    assert {"AF_UNIX", "AF_NETLINK"} <= families
    # a refused call must fail the stage (next stage runs), not kill the daemon
    assert one(daemon_unit, "Service", "SystemCallErrorNumber") == "EPERM"


SYSCALLS_NEEDED = ["kexec_file_load", "kexec_load", "reboot", "kill", "mlockall", "mincore", "setsockopt"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_daemon_unit_syscall_filter_allows_the_firing_path(daemon_unit) -> None:
    allowed: set[str] = set()
    groups = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True,
                            text=True, check=True).stdout

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        block = re.search(rf"^{re.escape(name)}\n(.*?)(?:\n\n|\Z)", groups, re.M | re.S)
        assert block, f"unknown group {name}"
        out: set[str] = set()
        for line in block.group(1).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out |= expand(line)
        return out

    for entry in " ".join(values(daemon_unit, "Service", "SystemCallFilter")).split():
        assert not entry.startswith("~"), "an allow-list, not a deny-list"
        allowed |= expand(entry)
    missing = [s for s in SYSCALLS_NEEDED if s not in allowed]
    assert not missing, f"SystemCallFilter= refuses {missing}"


# ---- killcord-shutdown-prepare.service ----


def test_prepare_unit(prepare_unit) -> None:
    assert one(prepare_unit, "Service", "Type") == "oneshot"
    assert one(prepare_unit, "Service", "RemainAfterExit") == "yes"
    assert one(prepare_unit, "Service", "ExecStart") == "/usr/lib/killcord/prepare-shutdown"
    assert "!/run/initramfs/shutdown" in values(prepare_unit, "Unit", "ConditionPathExists")
    assert values(prepare_unit, "Install", "WantedBy")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # a root with the units and stand-ins for the programs they run
    units = tmp_path / "lib/systemd/system"
    units.mkdir(parents=True)
    for unit in SYSTEMD.glob("*.service"):
        shutil.copy(unit, units / unit.name)
    for program in ("usr/bin/killcord", "usr/lib/killcord/prepare-shutdown"):
        p = tmp_path / program
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    names = [f"/lib/systemd/system/{u.name}" for u in SYSTEMD.glob("*.service")]
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}", *names],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


# ---- hooks and maintainer scripts ----


# Syntax and shellcheck of every shell script: tests/test_shell.py.


@pytest.mark.parametrize("script", HOOKS, ids=lambda p: p.name)
def test_hooks_are_executable_posix_sh(script: Path) -> None:
    assert script.read_text().startswith("#!/bin/sh\n")
    assert script.stat().st_mode & stat.S_IXUSR


def test_sleep_hook_pre_only_logs() -> None:
    # `pre` touches nothing (protection stays on); `post` would ask a daemon to re-check
    r = subprocess.run(["sh", str(SYSTEMD / "killcord.sleep"), "pre", "suspend"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "stays armed" in r.stdout


def test_shutdown_hook_defers_to_the_shutdown_root_and_says_so_on_the_console() -> None:
    text = (SYSTEMD / "killcord.shutdown").read_text()
    assert "/run/initramfs/shutdown" in text and "/usr/lib/killcord/killcord-wipe" in text
    assert '"<2>killcord-shutdown-hook:' in text  # level 2 passes `quiet`


@pytest.mark.parametrize("script", MAINTAINER_SCRIPTS, ids=lambda p: p.name)
def test_maintainer_scripts_keep_debhelper_snippets(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n") and "\nset -e\n" in text
    assert "#DEBHELPER#" in text


def test_postrm_purge_removes_config_memlockd_cfg_and_state() -> None:
    text = (DEBIAN / "killcord.postrm").read_text()
    purge = text[text.index("\npurge)"):]
    purge = purge[: purge.index(";;")]
    for path in ("/etc/killcord", "/run/killcord", "$MEMLOCK_CFG"):
        assert path in purge
    assert "MEMLOCK_CFG=/etc/memlockd.d/killcord.cfg" in text


# ---- the conffile ----


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("KILLCORD_"):
            monkeypatch.delenv(k)


def test_conffile_turns_protection_on(clean_env) -> None:
    data = tomllib.loads(CONFFILE.read_text())
    assert data == {"mode": "live"}
    config = load(CONFFILE)
    assert config.mode == "live" and config.live


def _uncommented(text: str) -> str:
    """The conffile with every commented `key = value` and `[table]` line switched on."""
    setting = re.compile(r"^# (\[[a-z_]+\]|[a-z_]+ = .*)$")
    return "\n".join(m.group(1) if (m := setting.match(line)) else line for line in text.splitlines()) + "\n"


def test_conffile_documents_every_setting_with_its_default(clean_env, tmp_path: Path) -> None:
    text = CONFFILE.read_text()
    for name in Config.model_fields:
        assert re.search(rf"^(# )?\[?{name}\b", text, re.M), f"setting {name!r} is not in the conffile"
    on = tmp_path / "all-defaults.toml"
    on.write_text(_uncommented(text))
    shown = load(on)  # every commented default is a valid value
    defaults = Config()
    for name in Config.model_fields:
        if name == "mode":
            continue
        assert getattr(shown, name) == getattr(defaults, name), f"{name}: the comment shows a value that is not the default"
    # a setting without a default value (None) is explained, not shown as an assignment
    shown_keys = set(tomllib.loads(on.read_text()))
    for name in Config.model_fields:
        if getattr(defaults, name) is None:
            assert name not in shown_keys


# ---- versions and package metadata ----


def test_changelog_version_is_the_package_version() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    m = re.match(r"^killcord \(([^)]+)\) ", first)
    assert m, first
    assert m.group(1) == killcord.__version__, "add a changelog entry: dch -c packaging/debian/changelog -v VERSION"


def suite_vars(suite: str) -> dict[str, str]:
    """packaging/suites/<suite>.mk: the KC_* settings that differ between the suites."""
    text = (ROOT / "packaging" / "suites" / f"{suite}.mk").read_text()
    return dict(re.findall(r"^(KC_[A-Z_]+) :=[ \t]*(.*)$", text, re.M))


def test_control_depends() -> None:
    control = (DEBIAN / "control").read_text()
    binary = control[control.index("\nPackage: killcord"):]
    # all (Debian 13); build-deb.sh makes the Debian 12 build amd64 (its vendored extension)
    assert re.search(r"^Architecture: all$", binary, re.M)
    depends = re.search(r"^Depends:(.*?)^\S", binary, re.M | re.S).group(1)
    for dep in ("python3 (>= 3.11)", "${killcord:Python}", "python3-pyudev", "python3-psutil", "python3-systemd",
                "python3-structlog", "kexec-tools", "memlockd", "busybox-static", "initramfs-tools | dracut",
                "${misc:Depends}", "${shlibs:Depends}"):
        assert dep in depends, dep
    assert "<< 3.12" not in depends, "Debian 13's python3 is 3.13: the bound belongs to the bookworm build only"
    rules = (DEBIAN / "rules").read_text()
    assert "-Vkillcord:Python=$(KC_PYTHON_DEPENDS)" in rules


def test_suites_say_what_differs() -> None:
    trixie, bookworm = suite_vars("trixie"), suite_vars("bookworm")
    assert set(trixie) == set(bookworm) == {"KC_ARCH", "KC_VENDOR", "KC_VERSION_SUFFIX", "KC_PYTHON_DEPENDS",
                                            "KC_SYSTEMD"}
    # Debian 13: Debian's own pydantic 2 and pydantic-settings, nothing vendored or compiled
    assert trixie["KC_ARCH"] == "all" and trixie["KC_VENDOR"] == "no" and trixie["KC_VERSION_SUFFIX"] == ""
    assert "python3-pydantic (>= 2" in trixie["KC_PYTHON_DEPENDS"]
    assert "python3-pydantic-settings" in trixie["KC_PYTHON_DEPENDS"]
    assert trixie["KC_SYSTEMD"] == "/usr/lib/systemd"
    # Debian 12: the cp311 wheels, so amd64 and python 3.11 only; a version below trixie's
    assert bookworm["KC_ARCH"] == "amd64" and bookworm["KC_VENDOR"] == "yes"
    assert bookworm["KC_PYTHON_DEPENDS"] == "python3 (<< 3.12)"
    assert "pydantic" not in bookworm["KC_PYTHON_DEPENDS"]  # Debian 12's python3-pydantic is 1.10
    assert bookworm["KC_SYSTEMD"] == "/lib/systemd"
    r = subprocess.run(["dpkg", "--compare-versions", f"1.0{bookworm['KC_VERSION_SUFFIX']}", "lt", "1.0"])
    assert r.returncode == 0, "an upgrade to Debian 13 must replace the bookworm build"
    # lintian overrides are per suite: Debian 13's lintian has no init.d-script tag, and an
    # override of a tag it does not know is an error there (alien-tag)
    assert not (DEBIAN / "killcord.lintian-overrides").exists()
    assert "package-supports-alternative-init-but-no-init.d-script" in \
        (ROOT / "packaging/suites/bookworm.lintian-overrides").read_text()
    assert not (ROOT / "packaging/suites/trixie.lintian-overrides").exists()


def test_build_deb_refuses_an_unknown_suite_before_doing_anything(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(ROOT / "packaging/build-deb.sh"), "sid"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert "unknown suite 'sid'" in r.stderr and "trixie" in r.stderr and "bookworm" in r.stderr, r.stderr
    assert "make deb SUITE=" in r.stderr


def test_vendored_wheels_are_pinned() -> None:
    lines = [line for line in (ROOT / "packaging/vendor/requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    names = {line.split("==")[0] for line in lines}
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9A-Za-z.]*", line) for line in lines), lines
    assert {"pydantic", "pydantic-core", "pydantic-settings"} <= names


def test_every_file_the_package_installs_exists() -> None:
    script = (ROOT / "packaging/build-deb.sh").read_text()
    block = re.search(r"^required=\((.*?)^\)", script, re.M | re.S).group(1)
    missing = [f for f in block.split() if not (ROOT / f).is_file()]
    assert not missing, f"`make deb` would stop: missing {missing}"


# ---- the mirror of another suite, from this machine's apt sources ----


def test_sources_for_another_suite_swap_the_suite_and_keep_the_mirror(tmp_path: Path) -> None:
    sc = load_suite_chroot()
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "# a comment\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://other.invalid/repo\nSuites: nodistro\nComponents: main\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nComponents: main\n")
    (etc / "sources.list").write_text(
        "deb [signed-by=/k.gpg arch=amd64] http://proxy.invalid:3142/debian bookworm-backports main\n"
        "deb-src http://proxy.invalid/debian bookworm main\n")
    entries = sc.host_entries(etc)
    text = sc.sources_for("trixie", entries, "bookworm")
    stanzas = [sc.parse_deb822(s)[0] for s in text.strip().split("\n\n")]
    got = [(e.get("URIs"), e.get("Suites"), e.get("Components"), e.get("Signed-By")) for e in stanzas]
    assert got == [
        ("http://proxy.invalid:3142/debian", "trixie-backports", "main", "/k.gpg"),
        ("http://mirror.invalid/debian", "trixie trixie-updates", "main contrib",
         "/usr/share/keyrings/debian-archive-keyring.gpg"),
        ("http://mirror.invalid/debian-security", "trixie-security", "main", ""),
    ]
    assert all(e.get("Types") == "deb" for e in stanzas)
    assert "bookworm" not in text and "nodistro" not in text and "off.invalid" not in text
    # the machine's own suite comes out unchanged
    assert "Suites: bookworm bookworm-updates" in sc.sources_for("bookworm", entries, "bookworm")
    # and so no host name is written anywhere in what builds the packages
    for f in [ROOT / "Makefile", *sorted((ROOT / "packaging").rglob("*"))]:
        if f.is_file() and f.name != "copyright":
            assert not re.search(r"\b(?:https?|ftp)://", f.read_text(errors="replace")), f


def test_sources_without_an_entry_for_this_suite_say_what_to_add(tmp_path: Path) -> None:
    sc = load_suite_chroot()
    entries = sc.parse_deb822("Types: deb\nURIs: http://other.invalid/repo\nSuites: nodistro\n")
    with pytest.raises(sc.SourcesError, match=r"no apt source for this machine's suite \(bookworm\).*trixie"):
        sc.sources_for("trixie", entries, "bookworm")



# ---- the built packages, when there are some ----

SUITES = ("trixie", "bookworm")


def built_deb(suite: str) -> Path | None:
    debs = sorted((ROOT / "out" / "deb" / suite).glob("killcord_*.deb"))
    return debs[-1] if debs else None


def expected_files(suite: str) -> dict[str, int]:
    """path in the package: mode"""
    sd = "." + suite_vars(suite)["KC_SYSTEMD"]
    return {
        "./usr/bin/killcord": 0o755,
        "./etc/killcord/killcord.toml": 0o644,
        f"{sd}/system/killcord.service": 0o644,
        f"{sd}/system/killcord-shutdown-prepare.service": 0o644,
        f"{sd}/system-sleep/killcord": 0o755,
        f"{sd}/system-shutdown/killcord": 0o755,
        "./usr/lib/killcord/killcord/cli.py": 0o644,
        "./usr/lib/killcord/killcord-wipe": 0o755,
        "./usr/lib/killcord/killcord-wipe-boot": 0o755,
        "./usr/lib/killcord/wipe-target-init": 0o755,
        "./usr/lib/killcord/killcord-shutdown": 0o755,
        "./usr/lib/killcord/killcord-cmdline": 0o644,  # sourced by the hooks, not run
        "./usr/lib/killcord/prepare-shutdown": 0o755,
        "./usr/share/initramfs-tools/hooks/killcord": 0o755,
        "./usr/share/initramfs-tools/scripts/init-top/killcord": 0o755,
        "./usr/lib/dracut/modules.d/90killcord/module-setup.sh": 0o755,
    }


def deb_listing(deb: Path) -> dict[str, int]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    modes: dict[str, int] = {}
    for line in listing.splitlines():
        perms, *_, path = line.split(maxsplit=5)
        modes[path.split(" -> ")[0]] = sum(
            (c != "-") << (8 - i) for i, c in enumerate(perms[1:10]))
    return modes


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True,
                          check=True).stdout.strip()


def deb_file(deb: Path, path: str) -> str:
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    return subprocess.run(["tar", "-xO", path], input=tar, capture_output=True, check=True).stdout.decode()


@pytest.mark.parametrize("suite", SUITES)
def test_built_deb_contents(suite: str) -> None:
    deb = built_deb(suite)
    if deb is None:
        pytest.skip(f"needs a built package: out/deb/{suite}/killcord_*.deb does not exist (run `make deb`); "
                    "tests/test_deb_install.py installs it in a chroot of its suite")
    kc = suite_vars(suite)
    version = killcord.__version__ + kc["KC_VERSION_SUFFIX"]
    assert deb.name == f"killcord_{version}_{kc['KC_ARCH']}.deb", f"{deb.name} is stale: run `make deb`"
    modes = deb_listing(deb)
    for path, mode in expected_files(suite).items():
        assert path in modes, f"{path} is not in {deb.name}"
        assert modes[path] == mode, f"{path}: mode {modes[path]:o}, want {mode:o}"
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in modes), "bytecode belongs to postinst"
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True,
                               check=True).stdout.split()
    assert conffiles == ["/etc/killcord/killcord.toml"]
    # nothing in the aliased /lib, /bin, /sbin on Debian 13 (its packages ship only /usr)
    if suite == "trixie":
        assert not [p for p in modes if re.match(r"\./(lib|bin|sbin)(/|$)", p)]


@pytest.mark.parametrize("suite", SUITES)
def test_built_deb_fields_and_vendoring_per_suite(suite: str) -> None:
    deb = built_deb(suite)
    if deb is None:
        pytest.skip(f"needs a built package: out/deb/{suite}/killcord_*.deb does not exist (run `make deb`)")
    modes = deb_listing(deb)
    depends = deb_field(deb, "Depends")
    vendored = [p for p in modes if p.startswith("./usr/lib/killcord/vendor/")]
    copyright_ = deb_file(deb, "./usr/share/doc/killcord/copyright")
    if suite == "trixie":
        assert deb_field(deb, "Architecture") == "all"
        assert "python3-pydantic (>= 2" in depends and "python3-pydantic-settings" in depends, depends
        assert "<< 3.12" not in depends, depends
        assert not vendored, f"Debian 13 has pydantic: nothing to vendor, found {vendored[:3]}"
        assert not any(p.endswith(".so") for p in modes), "nothing compiled on Debian 13"
        assert "usr/lib/killcord/vendor" not in copyright_
    else:
        assert deb_field(deb, "Architecture") == "amd64"
        assert "python3 (<< 3.12)" in depends and "python3 (>= 3.11)" in depends, depends
        assert "python3-pydantic" not in depends, depends  # Debian 12's is 1.10: vendored instead
        assert any(p.startswith("./usr/lib/killcord/vendor/pydantic_core/") and p.endswith(".so") for p in modes)
        assert any(p.startswith("./usr/lib/killcord/vendor/pydantic_settings/") for p in modes)
        assert "Files: usr/lib/killcord/vendor/pydantic/*" in copyright_


def test_the_man_page_explains_every_setting_from_the_conffile(tmp_path: Path) -> None:
    """killcord(8)'s CONFIGURATION section is the conffile's own comments (mkman.py): every
    setting of config.py is there, with its default, and each stage's deadline."""
    from killcord.config import DEFAULT_DEADLINES_MS, Config

    page = subprocess.run([sys.executable, str(DEBIAN / "mkman.py"), str(ROOT / "src"), "0", str(CONFFILE)],
                          check=True, capture_output=True, text=True).stdout
    section = page.split(".SH CONFIGURATION", 1)[1].split(".SH EXIT STATUS", 1)[0]
    for name in Config.model_fields:
        assert re.search(rf"\\fB\[?{name}\]?\\fR", section), f"{name} is not in the man page"
    for stage, ms in DEFAULT_DEADLINES_MS.items():
        assert f"{stage.value} = {ms}" in section


@pytest.mark.root
@pytest.mark.parametrize(("line", "told"), [
    ("boot=live quiet init_on_free=1", False),
    ("init_on_free=on", False),  # kstrtobool: what the kernel reads as on
    ("boot=live quiet", True),
    ("init_on_free=1 init_on_free=0", True),  # the last one wins
    ("init_on_free=1 page_poison=1", True),  # poisoning takes its place
    ('init_on_free=0 -- init_on_free=1', True),  # after "--": init's, not the kernel's
])
def test_postinst_tells_the_admin_when_the_kernel_does_not_zero_what_is_freed(
        tmp_path: Path, line: str, told: bool) -> None:
    """The postinst's notice, run as installed (its functions, the real killcord-cmdline)
    against a /proc/cmdline bind-mounted in a mount namespace of its own."""
    text = (DEBIAN / "killcord.postinst").read_text()
    functions = text[:text.index('case "$1" in')]  # the maintainer script's functions, not its actions
    assert "init_on_free_notice()" in functions
    lib = ROOT / "initramfs-hooks" / "killcord-cmdline"
    (tmp_path / "functions").write_text(functions.replace("/usr/lib/killcord/killcord-cmdline", str(lib)))
    (tmp_path / "cmdline").write_text(line + "\n")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f'mount --bind "{tmp_path}/cmdline" /proc/cmdline && . "{tmp_path}/functions" && init_on_free_notice'],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert ("NOTICE: the running kernel was booted without init_on_free=1" in r.stderr) is told, r.stderr
    assert r.stdout == ""
