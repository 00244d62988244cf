"""killcord's wipe target: the initramfs staged for the kexec jump in place of the system's.

The system's initramfs (a live system's is 35-40 MB) costs seconds after the jump: purgatory
checksums it, the kernel unpacks it, udev and modules start before the wipe hook runs. The
target needs none of that: its kernel, booted with init_on_free=1, zeroes all free memory
before any user space runs. This image holds only a static busybox, /init
(wipe-target-init), killcord-wipe-boot, killcord-wipe and killcord-cmdline: under 1 MiB.

Built at install and on every kernel, initramfs or busybox update (the package's postinst
and dpkg triggers: `killcord wipe-target build`), written with a manifest beside it; kexec
stages it only while it matches that manifest, and `check` verifies what the daemon staged.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import stat
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from killcord import __version__

IMAGE = Path("/var/lib/killcord/wipe-target.img")
MAX_BYTES = 1024 * 1024  # the staged image: the kernel plus at most this (issue 11)
# busybox-static's binary; /usr/bin first (Debian 13 ships it there), /bin on Debian 12.
BUSYBOX = (Path("/usr/bin/busybox"), Path("/bin/busybox"))
# What goes in besides busybox, from killcord's library directory (the package's
# /usr/lib/killcord, or the repository's initramfs-hooks/).
SCRIPTS = ("wipe-target-init", "killcord-wipe-boot", "killcord-wipe", "killcord-cmdline")
# The kernel's xz decoder (lib/xz) takes CRC32 or no check, LZMA2 and the x86 BCJ filter
# (Debian's kernels: CONFIG_RD_XZ, CONFIG_XZ_DEC_X86). A small dictionary: the decoder
# allocates what the header names.
XZ_FILTERS = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                                         "dict_size": 4 * 1024 * 1024}]


class WipeTargetError(Exception):
    """Cannot build (or trust) the wipe target: the message names the file and the fix."""


@dataclass(frozen=True)
class Manifest:
    image: str
    bytes: int
    sha256: str
    busybox: str
    busybox_sha256: str
    killcord: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def manifest_path(image: Path) -> Path:
    return image.with_name(image.name + ".json")


def library_dir() -> Path:
    """Where the scripts are: the package's /usr/lib/killcord (this module lives in
    /usr/lib/killcord/killcord), else the repository's initramfs-hooks/."""
    here = Path(__file__).resolve().parent
    for d in (here.parent, here.parents[1] / "initramfs-hooks"):
        if all((d / s).is_file() for s in SCRIPTS):
            return d
    raise WipeTargetError(f"killcord's initramfs scripts ({', '.join(SCRIPTS)}) are not in {here.parent}: "
                          "reinstall the killcord package")


def find_busybox() -> Path:
    for p in BUSYBOX:
        if p.is_file() and is_static(p):
            return p
    found = [str(p) for p in BUSYBOX if p.is_file()]
    raise WipeTargetError(
        (f"{found[0]} is linked dynamically" if found else "no busybox found")
        + ": the wipe target needs a static one; install busybox-static (apt install busybox-static)")


def is_static(path: Path) -> bool:
    """An ELF executable with no program interpreter (PT_INTERP): it runs with nothing else
    in the image. (Parsed here: the standard library reads no ELF, and this is one table.)"""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64
            return False
        end = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(end + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = [struct.unpack_from(end + "I", table, i * phentsize)[0] for i in range(phnum)]
    return len(table) == phentsize * phnum and 3 not in types  # PT_INTERP


# ---- the archive ----

def newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio archive in the kernel's "newc" format (what the kernel unpacks as an initramfs;
    usr/gen_init_cpio writes the same). Entries: (name, mode with file type, data, rdev);
    a symlink's data is its target. Written here rather than by cpio(1): the image holds
    /dev/console, a device node that cpio can only copy from a real one (mknod, root), and
    every field is fixed (uid 0, mtime 0) so that the same inputs give the same bytes."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], start=1):
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = [ino if name != "TRAILER!!!" else 0, mode, 0, 0, nlink, 0, len(data), 0, 0,
                  os.major(rdev), os.minor(rdev), len(name) + 1, 0]
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)
    return bytes(out)


def archive(busybox: bytes, lib: Path) -> bytes:
    """The uncompressed archive: directories, /dev/console (the kernel opens it for init's
    stdio before /init runs), /init, busybox with /bin/sh, the scripts."""
    d, f, ln = stat.S_IFDIR | 0o755, stat.S_IFREG, stat.S_IFLNK | 0o777
    entries: list[tuple[str, int, bytes, int]] = [
        (name, d, b"", 0) for name in ("bin", "dev", "proc", "sys", "run", "usr", "usr/lib", "usr/lib/killcord")]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)))
    entries.append(("init", f | 0o755, (lib / "wipe-target-init").read_bytes(), 0))
    entries.append(("bin/busybox", f | 0o755, busybox, 0))
    entries.append(("bin/sh", ln, b"busybox", 0))
    for name in SCRIPTS[1:]:
        mode = 0o644 if name == "killcord-cmdline" else 0o755  # sourced, not run
        entries.append((f"usr/lib/killcord/{name}", f | mode, (lib / name).read_bytes(), 0))
    return newc(entries)


# ---- build and verify ----

def build(image: Path = IMAGE, busybox: Path | None = None, lib: Path | None = None) -> Manifest:
    """Build the image and its manifest (atomically: a reader sees the old pair or the new
    one's image first, never a half-written file). Refuses, naming the fix, when busybox is
    not static or the image would not fit MAX_BYTES."""
    busybox = busybox or find_busybox()
    if not is_static(busybox):
        raise WipeTargetError(f"{busybox} is not a static executable: install busybox-static "
                              "(apt install busybox-static) or name a static busybox with --busybox")
    lib = lib or library_dir()
    bb = busybox.read_bytes()
    data = lzma.compress(archive(bb, lib), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=XZ_FILTERS)
    if len(data) > MAX_BYTES:
        raise WipeTargetError(f"the wipe target would be {len(data)} bytes, over {MAX_BYTES}: "
                              f"{busybox} ({len(bb)} bytes) is too large; use Debian's busybox-static")
    manifest = Manifest(str(image), len(data), hashlib.sha256(data).hexdigest(), str(busybox),
                        hashlib.sha256(bb).hexdigest(), __version__)
    image.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(image, data, 0o644)
    _write_atomic(manifest_path(image), (json.dumps(manifest.as_dict(), indent=2) + "\n").encode(), 0o644)
    return manifest


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def verify(image: Path = IMAGE) -> Manifest:
    """The image as its manifest describes it (size, sha256, within MAX_BYTES), or
    WipeTargetError saying what is wrong and how to rebuild it."""
    fix = "rebuild it: killcord wipe-target build"
    try:
        m = Manifest(**json.loads(manifest_path(image).read_text()))
        data = image.read_bytes()
    except FileNotFoundError as exc:
        raise WipeTargetError(f"{exc.filename} does not exist; {fix} (needs busybox-static)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise WipeTargetError(f"{manifest_path(image)} or {image} unreadable ({exc}); {fix}") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != m.bytes or digest != m.sha256:
        raise WipeTargetError(f"{image} ({len(data)} bytes, sha256 {digest[:12]}) is not what "
                              f"{manifest_path(image)} records ({m.bytes} bytes, sha256 {m.sha256[:12]}); {fix}")
    if m.bytes > MAX_BYTES:
        raise WipeTargetError(f"{image} is {m.bytes} bytes, over {MAX_BYTES}; {fix}")
    return m
