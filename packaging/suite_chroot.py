#!/usr/bin/python3
"""Chroots of a Debian suite for `make deb` and its install test: apt sources, cached
tarballs, and commands run inside one.

    suite_chroot.py sources SUITE           the machine's apt sources, for SUITE
    suite_chroot.py tarball SUITE KIND      build (or reuse) the chroot tarball; prints its path
    suite_chroot.py run TARBALL DIR SCRIPT  unpack TARBALL, bind DIR at /work, run SCRIPT (sh) there

The mirror comes from this machine's own apt sources (/etc/apt/sources.list.d/*.sources and
/etc/apt/sources.list): every entry for the machine's suite (bookworm, bookworm-updates,
bookworm-security) is taken with the suite name swapped (trixie, trixie-updates,
trixie-security). No host name is written anywhere: whatever mirror or proxy the machine
uses, the chroots use too. Entries for other suites (third-party repositories) are left out.

Tarballs are cached under .cache/chroot/, named by a hash of what makes them (suite, kind,
package list, the sources): a change to any of them builds a new one. Stdlib only: it runs
with the machine's python3 before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "chroot"
SUITES = ("trixie", "bookworm")  # Debian 13 (stable), Debian 12 (oldstable)

# What each kind of chroot holds on top of its mmdebstrap variant. Bump RECIPE when the way
# a tarball is made changes in a way these lists do not show.
RECIPE = 1
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    # dpkg-buildpackage and the suite's own lintian (buildd: build-essential, dpkg-dev)
    "build": ("buildd", ("debhelper", "lintian", "python3")),
    # a fresh installed system: systemd, a kernel and initramfs-tools, so that the package's
    # units and initramfs hook meet what they will meet on a machine
    "install": ("apt", ("systemd-sysv", "linux-image-amd64", "initramfs-tools")),
}


class SourcesError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    """One apt source: deb822 fields (Types, URIs, Suites, Components, Signed-By...)."""
    fields: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str:
        return next((v for k, v in self.fields if k.lower() == key.lower()), "")


def host_codename(os_release: Path = Path("/etc/os-release")) -> str:
    for line in os_release.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            return value.strip().strip('"')
    raise SourcesError(f"{os_release} has no VERSION_CODENAME: cannot tell which suite this machine runs")


def parse_deb822(text: str) -> list[Entry]:
    entries: list[Entry] = []
    fields: list[tuple[str, str]] = []
    for raw in text.splitlines() + [""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                entries.append(Entry(tuple(fields)))
                fields = []
            continue
        if raw[0] in " \t" and fields:  # continuation line
            key, value = fields[-1]
            fields[-1] = (key, f"{value}\n{raw.rstrip()}")
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            raise SourcesError(f"not a deb822 line: {raw!r}")
        fields.append((key.strip(), value.strip()))
    return entries


_OPTION_NAMES = {"signed-by": "Signed-By", "arch": "Architectures", "trusted": "Trusted"}


def parse_one_line(text: str) -> list[Entry]:
    """sources.list's one-line style: `deb [opt=value ...] URI SUITE COMPONENT...`."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        options: list[tuple[str, str]] = []
        m = re.match(r"^(\S+)\s+\[([^\]]*)\]\s+(.*)$", line)
        if m:
            kind, opts, rest = m.groups()
            for opt in opts.split():
                key, _, value = opt.partition("=")
                if key.lower() in _OPTION_NAMES:
                    options.append((_OPTION_NAMES[key.lower()], value.replace(",", " ")))
        else:
            kind, _, rest = line.partition(" ")
        words = rest.split()
        if len(words) < 2:
            raise SourcesError(f"not a sources.list line: {raw!r}")
        fields = [("Types", kind), ("URIs", words[0]), ("Suites", words[1])]
        if words[2:]:
            fields.append(("Components", " ".join(words[2:])))
        entries.append(Entry(tuple(fields + options)))
    return entries


def host_entries(etc_apt: Path = Path("/etc/apt")) -> list[Entry]:
    entries: list[Entry] = []
    one_line = etc_apt / "sources.list"
    if one_line.is_file():
        entries += parse_one_line(one_line.read_text())
    for f in sorted((etc_apt / "sources.list.d").glob("*.list")):
        entries += parse_one_line(f.read_text())
    for f in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        entries += parse_deb822(f.read_text())
    return entries


def swap_suite(suite: str, host: str, target: str) -> str | None:
    """bookworm -> trixie, bookworm-updates -> trixie-updates, bookworm-security ->
    trixie-security; None for a suite that is not the host's (a third-party repository)."""
    if suite == host:
        return target
    for sep in ("-", "/"):
        if suite.startswith(host + sep):
            return target + suite[len(host):]
    return None


def sources_for(target: str, entries: list[Entry], host: str) -> str:
    """The deb822 sources for `target`: every enabled `deb` entry of the host's suite, the
    suite swapped. Raises SourcesError when there is none."""
    stanzas = []
    for entry in entries:
        if entry.get("Enabled").lower() == "no" or "deb" not in entry.get("Types").split():
            continue
        suites = [s for s in (swap_suite(s, host, target) for s in entry.get("Suites").split()) if s]
        if not suites:
            continue
        out = [("Types", "deb"), ("URIs", entry.get("URIs")), ("Suites", " ".join(suites)),
               ("Components", entry.get("Components") or "main")]
        out += [(k, v) for k, v in entry.fields if k.lower() in ("signed-by", "architectures", "trusted")]
        stanzas.append("\n".join(f"{k}: {v}" for k, v in out))
    if not stanzas:
        raise SourcesError(
            f"no apt source for this machine's suite ({host}) in /etc/apt/sources.list or "
            f"/etc/apt/sources.list.d/: cannot derive a mirror for {target}; add a `deb` entry for "
            f"{host} (Suites: {host} {host}-updates) to /etc/apt/sources.list.d/debian.sources")
    return "\n\n".join(stanzas) + "\n"


def machine_sources(target: str) -> str:
    return sources_for(target, host_entries(), host_codename())


def tarball_key(suite: str, kind: str, sources: str) -> str:
    variant, packages = KINDS[kind]
    blob = json.dumps([RECIPE, suite, kind, variant, sorted(packages), sources]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tarball(suite: str, kind: str, cache: Path = CACHE, log=sys.stderr) -> Path:
    """The cached chroot tarball of `kind` for `suite`, built with mmdebstrap if missing."""
    if suite not in SUITES:
        raise SourcesError(f"unknown suite {suite!r}: use one of {', '.join(SUITES)}")
    if kind not in KINDS:
        raise SourcesError(f"unknown chroot kind {kind!r}: use one of {', '.join(KINDS)}")
    sources = machine_sources(suite)
    target = cache / f"{suite}-{kind}-{tarball_key(suite, kind, sources)}.tar"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f"{suite}-{kind}-*"):  # what an interrupted build left
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    variant, packages = KINDS[kind]
    with tempfile.TemporaryDirectory(prefix=f"{suite}-{kind}-", dir=cache) as tmp:
        src = Path(tmp) / "debian.sources"
        src.write_text(sources)
        partial = Path(tmp) / "chroot.tar"
        cmd = ["mmdebstrap", f"--variant={variant}", "--mode=root", "--format=tar",
               f"--include={','.join(packages)}",
               # the sources as the chroot's own deb822 file, in place of what mmdebstrap wrote
               "--setup-hook=rm -f \"$1\"/etc/apt/sources.list \"$1\"/etc/apt/sources.list.d/*",
               f"--setup-hook=copy-in {src} /etc/apt/sources.list.d",
               suite, str(partial), str(src)]
        print(f"chroot: building {target.name} (mmdebstrap {variant} {suite} + {' '.join(packages)})",
              file=log, flush=True)
        subprocess.run(cmd, check=True, stdout=log, stderr=log)
        os.replace(partial, target)
    for old in cache.glob(f"{suite}-{kind}-*.tar"):  # one tarball per suite and kind
        if old != target:
            old.unlink()
    return target


def _mounts_under(tree: Path) -> list[str]:
    prefix = str(tree.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        return [m for m in (line.split()[4] for line in f) if m.startswith(prefix)]


def run(tarball_path: Path, workdir: Path, script: str, scratch: Path, log=sys.stderr) -> int:
    """Unpack the tarball under `scratch`, bind `workdir` at /work, run `script` with sh in
    the chroot, remove the chroot; the script's exit status.

    The chroot gets a mount and PID namespace of its own (unshare): its /proc, /sys (read-only)
    and the bind vanish with it, and nothing it starts outlives it. Services are not started
    (policy-rc.d). It shares the network, and gets this machine's resolv.conf for apt."""
    scratch.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="chroot-", dir=scratch))
    try:
        subprocess.run(["tar", "-C", str(root), "-xf", str(tarball_path)], check=True)
        if Path("/etc/resolv.conf").exists():
            (root / "etc/resolv.conf").unlink(missing_ok=True)
            shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# no service starts in this chroot\nexit 101\n")
        policy.chmod(0o755)
        (root / "work").mkdir(exist_ok=True)
        inner = (f"mount --bind {shlex.quote(str(workdir))} {shlex.quote(str(root / 'work'))} && "
                 f"mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {shlex.quote(str(root / 'sys'))} && "
                 f"exec chroot {shlex.quote(str(root))} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "
                 f"HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive /bin/sh -ec {shlex.quote(script)}")
        cmd = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
               f"--mount-proc={root / 'proc'}", "sh", "-c", inner]
        return subprocess.run(cmd, stdout=log, stderr=log).returncode
    finally:
        left = _mounts_under(root)
        if left:  # never delete through a mount (it would be the machine's own files)
            print(f"chroot: {root} still has mounts {left}: left in place", file=log)
        else:
            subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "sources":
            print(machine_sources(argv[1]), end="")
            return 0
        if len(argv) == 3 and argv[0] == "tarball":
            print(tarball(argv[1], argv[2]))
            return 0
        if len(argv) == 4 and argv[0] == "run":
            return run(Path(argv[1]), Path(argv[2]).resolve(), argv[3], ROOT / "out" / "build")
    except SourcesError as e:
        print(f"suite_chroot: ERROR: {e}", file=sys.stderr)
        return 2
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
