"""Build (or take from the cache) a Debian 13 system installed on a USB stick, with dracut
as its initramfs generator: a portable install, root on the stick, the way Kicksecure
runs installed (non-live) systems.

The stick is a disk image with an MBR partition table and one ext4 partition (label
ROOT_LABEL) holding the whole system, /boot included: killcord's medium is the device
behind `/` (medium.py "auto", source "root") and its kexec target is the installed
kernel with the initrd dracut made for it, /boot/initrd.img-<release>, which carries
killcord's dracut module (initramfs-hooks/dracut/90killcord).

dracut runs in mmdebstrap's chroot, where host-only mode would describe the build
machine, not the guest: the initrd is generic (hostonly=no), with the stick's drivers
named. Cached under .cache/vm/trixie-dracut-<key>, the key made of the .deb, the package
list, the apt sources, the guest's test files and this file, like image.py's images.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .image import CACHE, GUEST, ROOT, _mounts_under, cache_key, extract_vmlinux, find_deb, guest_hooks, suite_sources

SUITE = "trixie"  # Debian 13: dracut 106 is one of its two initramfs generators
NAME = f"{SUITE}-dracut"
ROOT_LABEL = "kcroot"
PART_OFFSET_MIB = 1  # the partition starts at sector 2048, as partitioning tools put it
# dracut instead of initramfs-tools (they conflict; linux-image-amd64 takes either).
PACKAGES = [
    "systemd-sysv", "udev", "linux-image-amd64", "dracut", "busybox-static", "dmsetup", "kexec-tools",
    "memlockd", "python3", "procps", "kmod", "e2fsprogs",
]
# Written before any package is installed, so that every initrd dracut makes, the kernel's
# first and the one killcord's trigger makes, is one the guest can boot.
DRACUT_CONF = """\
# killcord test guest: built in a chroot, whose host-only view is the build machine's.
# A generic initrd, with the drivers of the stick the system lives on named.
hostonly="no"
add_drivers+=" xhci_pci xhci_hcd usb_storage uas sd_mod ext4 "
"""
FSTAB = f"LABEL={ROOT_LABEL} / ext4 rw,errors=remount-ro 0 1\n"


@dataclass(frozen=True)
class Installed:
    dir: Path

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        """The same file as the guest's /boot/initrd.img-<release>: dracut's."""
        return self.dir / "initrd.img"

    @property
    def disk(self) -> Path:
        """The stick: MBR, partition 1 ext4 with the whole installed system."""
        return self.dir / "disk.img"

    @property
    def initrd_listing(self) -> str:
        """lsinitrd's report on the initrd (its dracut modules, then its files)."""
        return (self.dir / "lsinitrd.txt").read_text()

    @property
    def info(self) -> dict:
        return json.loads((self.dir / "info.json").read_text())

    @property
    def release(self) -> str:
        return self.info["kernel"].removeprefix("vmlinuz-")

    @property
    def out(self) -> Path:
        """Where its scenarios write their results: out/vm/trixie-dracut/."""
        return ROOT / "out" / "vm" / NAME


def mbr(start_sector: int, sectors: int, disk_id: int = 0x6B636F72) -> bytes:
    """A DOS partition table with one Linux partition (type 0x83), addressed by LBA alone
    (its CHS fields say "beyond CHS", as partitioning tools write them on large disks).
    Written by hand: sfdisk is in fdisk, which our machines do not install."""
    beyond_chs = bytes([0xFE, 0xFF, 0xFF])
    entry = bytes([0x00]) + beyond_chs + bytes([0x83]) + beyond_chs + struct.pack("<II", start_sector, sectors)
    sector = bytearray(512)
    sector[440:444] = struct.pack("<I", disk_id)
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def make_disk(tree: Path, disk: Path, log=sys.stderr) -> None:
    """The stick: an ext4 file system made from `tree` at PART_OFFSET_MIB, and an MBR
    whose one partition covers it (no loop device, no mount)."""
    used_mib = int(subprocess.run(["du", "-sm", str(tree)], check=True, capture_output=True,
                                  text=True).stdout.split()[0])
    fs_mib = used_mib + 512
    subprocess.run(["truncate", "-s", f"{fs_mib + PART_OFFSET_MIB}M", str(disk)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-L", ROOT_LABEL, "-E", f"offset={PART_OFFSET_MIB * 1024 * 1024}",
                    "-d", str(tree), str(disk), f"{fs_mib}M"], check=True, stdout=log, stderr=log)
    with open(disk, "r+b") as f:
        f.write(mbr(PART_OFFSET_MIB * 2048, fs_mib * 2048))


def _discard(path: Path, log) -> None:
    """Remove a build directory, never through a mount left in it (the host's /dev, /proc)."""
    left = _mounts_under(path)
    if left:
        print(f"installed: {path} still has mounts {left}: left in place", file=log)
        return
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def build(deb: Path | None = None, cache: Path = CACHE, log=sys.stderr) -> Installed:
    deb = deb or find_deb(SUITE)
    sources = suite_sources(SUITE)
    target = cache / f"{NAME}-{cache_key(deb, [SUITE, PACKAGES, DRACUT_CONF, FSTAB, sources], Path(__file__))}"
    if (target / "info.json").exists():
        return Installed(target)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"build-{NAME}-", dir=cache))
    tree, hooks = work / "tree", work / "hooks"
    shutil.copytree(GUEST, hooks)
    shutil.copy(deb, hooks / "killcord.deb")
    (hooks / "90-killcord-test.conf").write_text(DRACUT_CONF)
    (hooks / "fstab").write_text(FSTAB)
    (work / "debian.sources").write_text(sources)
    setup = [
        'mkdir -p "$1/etc/dracut.conf.d"',
        f'copy-in {hooks}/90-killcord-test.conf /etc/dracut.conf.d',
    ]
    customize = [
        f'copy-in {hooks}/killcord.deb /tmp',
        # its postinst triggers dracut: the initrd is made again, with 90killcord in it
        'chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/killcord.deb',
        'rm -f "$1/tmp/killcord.deb"',
        *guest_hooks(hooks),
        f'copy-in {hooks}/fstab /etc',
        'echo killcord-installed > "$1/etc/hostname"',
        f'chroot "$1" sh -c "lsinitrd /boot/initrd.img-*" > {work}/lsinitrd.txt',
    ]
    cmd = ["mmdebstrap", "--variant=apt", "--mode=root", "--format=directory",
           f"--include={','.join(PACKAGES)}"]
    cmd += [f"--setup-hook={h}" for h in setup]
    cmd += [f"--customize-hook={h}" for h in customize]
    cmd += [SUITE, str(tree), str(work / "debian.sources")]
    print(f"installed: building {target.name} with mmdebstrap ({deb.name})", file=log, flush=True)
    try:
        subprocess.run(cmd, check=True, stdout=log, stderr=log)
        for mnt in sorted(_mounts_under(tree), reverse=True):  # see image.build
            subprocess.run(["umount", "-l", mnt], check=False)
        vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
        release = vmlinuz.name.removeprefix("vmlinuz-")
        shutil.copy(vmlinuz, work / "vmlinuz")
        shutil.copy(tree / "boot" / f"initrd.img-{release}", work / "initrd.img")
        extract_vmlinux(vmlinuz, work / "vmlinux")
        make_disk(tree, work / "disk.img", log)
        info = {"suite": SUITE, "initramfs": "dracut", "deb": deb.name, "kernel": vmlinuz.name,
                "root_label": ROOT_LABEL, "packages": PACKAGES}
        (work / "info.json").write_text(json.dumps(info, indent=2))
    except BaseException:
        _discard(work, log)
        raise
    _discard(tree, log)
    _discard(hooks, log)
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)
    return Installed(target)


if __name__ == "__main__":
    print(build().dir)
