"""Build (or take from the cache) a Debian system of one suite (Debian 13 trixie or 12
bookworm) with that suite's killcord .deb installed.

The mirror is the machine's own apt sources with the suite swapped
(packaging/suite_chroot.py sources SUITE). The result is cached under
.cache/vm/<suite>-<key>, the key made of the suite, the .deb, the package list, the
sources and this file, so a second run does not rebuild. Outputs: the kernel (bzImage and the uncompressed vmlinux
that QEMU boots faster), the initramfs, a root file system image, and what the build saw
(the initramfs listing, the installed killcord.toml).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "vm"
SUITES = ("trixie", "bookworm")  # Debian 13 (stable) first: what the demo boots
# dbus: a live desktop system has its system bus, and systemd 257's `systemctl suspend`
# asks logind over it (without it, Debian 13's guest never suspended: scenario j)
PACKAGES = [
    "systemd-sysv", "udev", "linux-image-amd64", "initramfs-tools", "busybox-static", "dmsetup",
    "kexec-tools", "memlockd", "procps", "kmod", "live-boot", "cryptsetup-bin", "e2fsprogs", "dosfstools", "dbus",
]

GUEST = Path(__file__).resolve().parent / "guest"  # test-only files, inert unless killcord_ci=...


@dataclass(frozen=True)
class Image:
    dir: Path

    @property
    def suite(self) -> str:
        return self.info["suite"]

    @property
    def out(self) -> Path:
        """Where the scenarios on this image write their results: out/vm/<suite>/."""
        return ROOT / "out" / "vm" / self.suite

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.ext4"

    @property
    def stick(self) -> Path:
        """A Tails-like live USB stick: ext4 with live/vmlinuz, live/initrd.img and the
        root as live/filesystem.squashfs (live-boot finds it by itself)."""
        return self.dir / "stick.img"

    @property
    def initrd_files(self) -> list[str]:
        return (self.dir / "initrd-files.txt").read_text().split()

    @property
    def config_text(self) -> str:
        return (self.dir / "killcord.toml").read_text()

    @property
    def info(self) -> dict:
        return json.loads((self.dir / "info.json").read_text())


def find_deb(suite: str) -> Path:
    """The package built for `suite`: out/deb/<suite>/killcord_*.deb (any arch: amd64 for
    bookworm, all for trixie)."""
    debs = sorted((ROOT / "out" / "deb" / suite).glob("killcord_*.deb"))
    if not debs:
        raise FileNotFoundError(f"no out/deb/{suite}/killcord_*.deb: run `make deb SUITE={suite}` first")
    return debs[-1]


def suite_sources(suite: str) -> str:
    """The machine's apt sources for `suite` (deb822), from the one owner of that rule."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: use one of {', '.join(SUITES)}")
    return subprocess.run([sys.executable, str(ROOT / "packaging" / "suite_chroot.py"), "sources", suite],
                          check=True, capture_output=True, text=True).stdout


def cache_key(deb: Path, inputs: list[object], builder: Path = Path(__file__)) -> str:
    """The cache key of a guest image: the .deb, the builder's other `inputs` (suite,
    packages, sources...), the builder's own source file and the guest's test files."""
    h = hashlib.sha256()
    h.update(deb.read_bytes())
    h.update(json.dumps(inputs).encode())
    h.update(builder.read_bytes())
    for f in sorted(GUEST.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def guest_hooks(hooks: Path) -> list[str]:
    """mmdebstrap customize hooks that install the test agent and its units (tests/vm/guest,
    copied to `hooks`): inert unless the command line says killcord_ci=."""
    units = sorted(p.name for p in GUEST.glob("*.service"))
    programs = " ".join(f"{hooks}/{p.name}" for p in sorted(GUEST.iterdir()) if p.suffix != ".service")
    return [
        f'copy-in {programs} /usr/local/sbin',
        'chmod 0755 "$1"/usr/local/sbin/*',
        f'copy-in {" ".join(f"{hooks}/{u}" for u in units)} /etc/systemd/system',
        f'chroot "$1" systemctl enable {" ".join(units)}',
        # a clean console for the tests that read it, and ttyS1 for the agent alone
        'chroot "$1" systemctl mask serial-getty@ttyS0.service serial-getty@ttyS1.service getty@tty1.service',
    ]


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """The uncompressed kernel: QEMU boots it through its PVH entry, twice as fast under
    TCG as the bzImage (vm-findings.md). Debian 12's bzImage carries an xz payload, Debian
    13's a zstd one (no zstd in the standard library: the zstd command, which stops with an
    error at the bytes after the frame, after writing the kernel)."""
    data = bzimage.read_bytes()
    xz, zstd = data.find(b"\xfd7zXZ\x00"), data.find(b"\x28\xb5\x2f\xfd")
    if xz >= 0:
        kernel = lzma.LZMADecompressor().decompress(data[xz:])
    elif zstd >= 0:
        kernel = subprocess.run(["zstd", "-dcq"], input=data[zstd:], capture_output=True).stdout
    else:
        raise ValueError(f"{bzimage}: no xz or zstd payload found")
    if not kernel.startswith(b"\x7fELF"):
        raise ValueError(f"{bzimage}: its payload did not decompress to an ELF kernel")
    out.write_bytes(kernel)


def _mounts_under(tree: Path) -> list[str]:
    prefix = str(tree) + "/"
    with open("/proc/self/mountinfo") as f:
        return [m for m in (line.split()[4] for line in f) if m.startswith(prefix)]


def build(suite: str, deb: Path | None = None, cache: Path = CACHE, log=sys.stderr) -> Image:
    deb = deb or find_deb(suite)
    sources = suite_sources(suite)
    target = cache / f"{suite}-{cache_key(deb, [suite, PACKAGES, sources])}"
    if (target / "info.json").exists():
        return Image(target)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"build-{suite}-", dir=cache))
    tree = work / "tree"
    hooks = work / "hooks"
    shutil.copytree(GUEST, hooks)
    (work / "debian.sources").write_text(sources)
    shutil.copy(deb, hooks / "killcord.deb")
    customize = [
        f'copy-in {hooks}/killcord.deb /tmp',
        'chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/killcord.deb',
        'rm -f "$1/tmp/killcord.deb"',
        *guest_hooks(hooks),
        'echo killcord-test > "$1/etc/hostname"',
        'chroot "$1" useradd --create-home --shell /bin/sh user',
        f'chroot "$1" sh -c "lsinitramfs /boot/initrd.img-*" > {work}/initrd-files.txt',
    ]
    cmd = ["mmdebstrap", "--variant=apt", "--mode=root", "--format=directory",
           f"--include={','.join(PACKAGES)}"]
    cmd += [f"--customize-hook={h}" for h in customize]
    cmd += [suite, str(tree), str(work / "debian.sources")]
    print(f"image: building {target.name} with mmdebstrap ({deb.name})", file=log, flush=True)
    subprocess.run(cmd, check=True, stdout=log, stderr=log)
    # mmdebstrap only warns when it cannot unmount what it mounted in the tree ("umount
    # /proc failed" when something on the host touched it at that moment): detach it, or
    # du, mkfs and mksquashfs below would copy a live /proc
    for mnt in sorted(_mounts_under(tree), reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False)
    try:
        boot = tree / "boot"
        vmlinuz = next(boot.glob("vmlinuz-*"))
        initrd = next(boot.glob("initrd.img-*"))
        shutil.copy(vmlinuz, work / "vmlinuz")
        shutil.copy(initrd, work / "initrd.img")
        extract_vmlinux(vmlinuz, work / "vmlinux")
        shutil.copy(tree / "etc" / "killcord" / "killcord.toml", work / "killcord.toml")
        size_mib = int(subprocess.run(["du", "-sm", str(tree)], check=True, capture_output=True,
                                      text=True).stdout.split()[0]) + 512
        subprocess.run(["mkfs.ext4", "-q", "-L", "root", "-d", str(tree), str(work / "rootfs.ext4"),
                        f"{size_mib}M"], check=True)
        # the live stick: zstd at level 6 is 10x faster than the default for 5 % more size
        live = work / "stick" / "live"
        live.mkdir(parents=True)
        subprocess.run(["mksquashfs", str(tree), str(live / "filesystem.squashfs"), "-comp", "zstd",
                        "-Xcompression-level", "6", "-noappend", "-quiet", "-no-progress", "-e", "boot"],
                       check=True, stdout=log)
        shutil.copy(work / "vmlinuz", live / "vmlinuz")
        shutil.copy(work / "initrd.img", live / "initrd.img")
        stick_mib = int(subprocess.run(["du", "-sm", str(work / "stick")], check=True, capture_output=True,
                                       text=True).stdout.split()[0]) + 64
        subprocess.run(["mkfs.ext4", "-q", "-L", "KILLCORD", "-d", str(work / "stick"), str(work / "stick.img"),
                        f"{stick_mib}M"], check=True)
        shutil.rmtree(work / "stick")
        info = {"suite": suite, "deb": deb.name, "kernel": vmlinuz.name, "packages": PACKAGES}
        (work / "info.json").write_text(json.dumps(info, indent=2))
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    shutil.rmtree(hooks, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)
    return Image(target)


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else SUITES[0]).dir)
