"""killcord-wipe, the real script, run by dash and by busybox sh on a small fake machine.

The machine is faked only where this host cannot be that machine: in a private mount
namespace, fake_proc/meminfo is bound over /proc/meminfo (a machine with little free memory,
whose MemAvailable falls by what the wiper's tmpfs really holds), fake_proc/cmdline over
/proc/cmdline, fake_proc/drop_caches over /proc/sys/vm/drop_caches (the host's caches stay),
fake_dev_kmsg over /dev/kmsg (the console lines come to the test, not to the host's console),
and fake_bin/dmesg prints a crafted boot log. The tmpfs, dd, fallocate, tr and wc are real:
the script really mounts and fills a tmpfs of the target's size.

KILLCORD_WIPE=/path/to/killcord-wipe runs these tests against another copy of the script.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT, needs_root

WIPE = Path(os.environ.get("KILLCORD_WIPE", ROOT / "initramfs-hooks" / "killcord-wipe"))
MIB = 1024 * 1024
TOTAL_MIB = 1024  # the fake machine's RAM: the wiper's default reserve is then 16 MiB
RESERVE_MIB = 16
# what the wiper runs, beside shell builtins; the initramfs hooks must provide the same
TOOLS = ["dd", "tr", "wc", "mount", "umount", "mkdir", "rm", "rmdir", "cat", "fallocate", "grep"]
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
SHELLS = {"dash": ["/usr/bin/dash"], "busybox": ["/usr/bin/busybox", "sh"]}

ALLOC_ON = "mem auto-init: stack:all(zero), heap alloc:on, heap free:off"
FREE_ON = "mem auto-init: stack:all(zero), heap alloc:off, heap free:on"
BOTH_OFF = "mem auto-init: stack:all(zero), heap alloc:off, heap free:off"

pytestmark = [needs_root, pytest.mark.skipif(not WIPE.exists(), reason=f"{WIPE} not found")]


def boot_log(meminit: str | None) -> str:
    """A boot log as dmesg prints it; without the mem auto-init line when the ring buffer
    has wrapped since boot."""
    lines = ["[    0.000000] Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)",
             "[    0.000000] Command line: BOOT_IMAGE=/vmlinuz root=/dev/sda1 quiet"]
    if meminit:
        lines.append(f"[    0.205868] {meminit}")
    lines.append("[    0.210000] software IO TLB: mapped [mem 0x00000000bbfdf000-0x00000000bffdf000] (64MB)")
    return "\n".join(lines) + "\n"


class FakeMeminfo:
    """fake_proc/meminfo: a machine of TOTAL_MIB with `avail_mib` available at the start and
    nothing else running, so MemAvailable falls by exactly what the wiper's tmpfs holds
    (its allocated blocks, read through /proc/PID/root: the tmpfs lives in the wiper's mount
    namespace), plus what `thief(used_mib, mounted)` says another consumer took meanwhile (mounted:
    the wiper has mounted its tmpfs).

    A FIFO, so that every open sees the state of that moment: a thread writes one rendering
    per open, then waits until that reader has closed (POLLERR on the write end) before it
    serves the next one, so two reads never share a rendering."""

    def __init__(self, path: Path, avail_mib: int, wipe_dir: Path, thief: Callable[[int, bool], int]) -> None:
        self.path, self.avail_mib, self.wipe_dir, self.thief = path, avail_mib, wipe_dir, thief
        self.pid: int | None = None
        self.used_seen: list[int] = []  # the tmpfs's usage in MiB at every read
        self._stop = False
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _tmpfs(self) -> tuple[int, bool]:
        """(bytes held, mounted) of the wiper's tmpfs"""
        if self.pid is None:
            return 0, False
        d = Path(f"/proc/{self.pid}/root{self.wipe_dir}")
        try:
            return sum(e.stat().st_blocks * 512 for e in os.scandir(d) if e.is_file()), os.path.ismount(d)
        except OSError:  # not there yet, or gone
            return 0, False

    def render(self) -> str:
        held, mounted = self._tmpfs()
        used = held // MIB
        self.used_seen.append(used)
        avail = self.avail_mib - used - self.thief(used, mounted)
        return (f"MemTotal:       {TOTAL_MIB * 1024:8d} kB\n"
                f"MemFree:        {avail * 1024:8d} kB\n"
                f"MemAvailable:   {avail * 1024:8d} kB\n"
                f"Buffers:               0 kB\n"
                f"Cached:         {used * 1024:8d} kB\n"
                f"Shmem:          {used * 1024:8d} kB\n")

    def _serve(self) -> None:
        while True:
            fd = os.open(self.path, os.O_WRONLY)  # waits for a reader
            try:
                if self._stop:
                    return
                try:
                    os.write(fd, self.render().encode())
                except BrokenPipeError:
                    continue
                poll = select.poll()
                poll.register(fd, select.POLLERR)
                poll.poll(200)  # a reader that reads to the end gets its EOF from our close
            finally:
                os.close(fd)

    def close(self) -> None:
        self._stop = True
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # lets a waiting open return
        self._thread.join(5)
        os.close(fd)


@dataclass
class Run:
    rc: int
    console: list[str]  # what the wiper wrote to /dev/kmsg, without "<2>killcord-wipe: "
    stdout: str
    stderr: str
    used_seen: list[int] = field(default_factory=list)
    drop_caches: str = ""

    def line(self, prefix: str) -> str:
        found = [x for x in self.console if x.startswith(prefix)]
        assert found, f"no console line starting {prefix!r} in:\n" + "\n".join(self.console)
        return found[-1]

    def wiped(self) -> tuple[int, str, str]:
        """MiB, method and sample verdict from the line the QEMU tests parse."""
        line = self.line("wiped ")
        m = re.fullmatch(r"wiped (\d+) MiB by (\w+) in ([\d.]+) s \((\d+) MiB/s\); sample ok: (.*)", line)
        assert m, line
        return int(m[1]), m[2], m[5]

    def text(self) -> str:
        return "\n".join(self.console) + f"\n(exit {self.rc})\nstderr: {self.stderr}"


def tools_dir(base: Path, shell: str, without: tuple[str, ...] = ()) -> Path:
    """The commands the wiper may use: the host's for dash (as dracut installs them), every
    busybox applet for busybox sh (as initramfs-tools' busybox hook links them)."""
    d = base / f"tools-{shell}"
    d.mkdir()
    if shell == "busybox":
        names = subprocess.run(["busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
        for name in names:
            if name not in without:
                (d / name).symlink_to("/usr/bin/busybox")
    else:
        for name in TOOLS:
            if name not in without:
                path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
                assert path, f"{name} is missing on this host"
                (d / name).symlink_to(path)
    return d


@pytest.fixture(params=sorted(SHELLS))
def shell(request: pytest.FixtureRequest) -> str:
    if shutil.which(SHELLS[request.param][0]) is None:
        pytest.fail(f"{SHELLS[request.param][0]} is missing: install it (make setup)")
    return request.param


@pytest.fixture
def wipe(tmp_path: Path, shell: str) -> Iterator[Callable[..., Run]]:
    runs = 0

    def run(avail_mib: int, meminit: str | None = ALLOC_ON, cmdline: str = "quiet", args: tuple[str, ...] = (),
            thief: Callable[[int, bool], int] = lambda used, mounted: 0, without: tuple[str, ...] = (),
            fake_tools: dict[str, str] | None = None) -> Run:
        nonlocal runs
        runs += 1
        base = tmp_path / f"run{runs}"
        fake_proc, fake_bin, wipe_dir = base / "fake_proc", base / "fake_bin", base / "wipe"
        fake_proc.mkdir(parents=True)
        fake_bin.mkdir()
        (fake_proc / "cmdline").write_text(cmdline + "\n")
        (fake_proc / "drop_caches").write_text("")
        (base / "fake_dmesg.txt").write_text(boot_log(meminit))
        (fake_bin / "dmesg").write_text(f"#!/bin/sh\nexec /bin/cat {base / 'fake_dmesg.txt'}\n")
        for name, body in (fake_tools or {}).items():
            (fake_bin / name).write_text(body)
        for f in fake_bin.iterdir():
            f.chmod(0o755)
        kmsg = base / "fake_dev_kmsg"
        os.mkfifo(kmsg)
        kmsg_fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)  # held open: the wiper's writes never block
        meminfo = FakeMeminfo(fake_proc / "meminfo", avail_mib, wipe_dir, thief)
        # set -e: if any fake cannot be put in place, the wiper does not run at all
        setup = ('set -e; /bin/mount --bind "$1" /proc/meminfo; /bin/mount --bind "$2" /proc/cmdline; '
                 '/bin/mount --bind "$3" /proc/sys/vm/drop_caches; /bin/mount --bind "$4" /dev/kmsg; '
                 'shift 4; exec "$@"')
        argv = [UNSHARE, "--mount", "--propagation", "private", "/bin/sh", "-c", setup, "setup",
                str(fake_proc / "meminfo"), str(fake_proc / "cmdline"), str(fake_proc / "drop_caches"), str(kmsg),
                *SHELLS[shell], str(WIPE), "--dir", str(wipe_dir), *args]
        env = {"PATH": f"{fake_bin}:{tools_dir(base, shell, without)}", "LC_ALL": "C"}
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        meminfo.pid = p.pid  # unshare and the setup shell exec: the wiper keeps this pid
        try:
            out, err = p.communicate(timeout=120)
            raw = b""
            while chunk := os.read(kmsg_fd, 65536):
                raw += chunk
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            os.close(kmsg_fd)
            meminfo.close()
        console = [x.removeprefix("<2>killcord-wipe: ") for x in raw.decode().splitlines()]
        assert not (wipe_dir.exists() and any(wipe_dir.iterdir())), "the test's own copy of the wipe dir was written"
        return Run(p.returncode, console, out, err, meminfo.used_seen, (fake_proc / "drop_caches").read_text())

    yield run


def avail_for(target_mib: int) -> int:
    """MemAvailable that makes the wiper's target `target_mib` (free minus its reserve)."""
    return target_mib + RESERVE_MIB


# ---- every chunk is written, the last one too ----


@pytest.mark.parametrize(("target", "chunk"), [(48, 64), (64, 64), (100, 16)],
                         ids=["48-of-64", "64-of-64", "100-by-16"])
def test_the_whole_target_is_wiped_to_the_last_chunk(wipe: Callable[..., Run], target: int, chunk: int) -> None:
    r = wipe(avail_for(target), args=("--chunk-mib", str(chunk)))
    assert r.rc == 0, r.text()
    start = f"start: {avail_for(target)} MiB free of {TOTAL_MIB} MiB, reserve {RESERVE_MIB} MiB"
    assert r.line("start: ").startswith(start)
    wiped, method, sample = r.wiped()
    assert (wiped, method, sample) == (target, "fallocate", "yes"), r.text()
    assert max(r.used_seen) == target  # the tmpfs really held every MiB at the final read
    assert r.drop_caches.strip() == "3"  # caches dropped first (into the fake: the host keeps its own)
    assert not any(x.startswith("FAILED") for x in r.console), r.text()


# ---- fallocate that fails: dd takes over, and the console says so ----


def test_a_failing_fallocate_falls_back_to_dd(wipe: Callable[..., Run]) -> None:
    # the initramfs has no fallocate (a busybox built without it): the command really fails
    r = wipe(avail_for(100), args=("--chunk-mib", "16"), without=("fallocate",))
    assert r.rc == 0, r.text()
    fallback = r.line("fallocate failed")
    assert re.fullmatch(r"fallocate failed after 8 MiB \(.*not found.*\): writing zeros by dd from here",
                        fallback), fallback
    wiped, method, sample = r.wiped()
    assert (wiped, method, sample) == (100, "dd", "yes"), r.text()
    assert max(r.used_seen) == 100


# ---- less than 90 %: FAILED and a non-zero exit ----


def test_less_than_90_percent_wiped_fails_loudly(wipe: Callable[..., Run]) -> None:
    # once the wiper holds its first 8 MiB, something else takes 70 MiB: the wiper must stop
    # at its reserve (30 of 100 MiB), not run the kernel out of memory, and not claim success
    r = wipe(avail_for(100), args=("--chunk-mib", "16"), thief=lambda used, mounted: 70 if used >= 8 else 0)
    assert r.rc == 1, r.text()
    wiped, _, _ = r.wiped()
    assert wiped == 30, r.text()
    assert r.line("FAILED") == "FAILED: wiped 30 MiB of the 100 MiB target, less than 90 %"
    stopped = f"stopped early: the kernel had {RESERVE_MIB} MiB left, reserve {RESERVE_MIB} MiB"
    assert r.line("stopped early: ") == stopped
    assert max(r.used_seen) == 30


def test_nothing_wiped_is_never_success(wipe: Callable[..., Run]) -> None:
    # once the wiper has sized its target and mounted its tmpfs, something else takes all
    # free memory: it wipes nothing, and must say so
    r = wipe(avail_for(48), thief=lambda used, mounted: 48 if mounted else 0)
    assert r.rc == 1, r.text()
    assert r.wiped()[0] == 0
    assert r.line("FAILED") == "FAILED: wiped 0 MiB of the 48 MiB target, less than 90 %"


# ---- the method: the kernel's boot log, not the command line's text ----


@pytest.mark.parametrize(("meminit", "cmdline", "method"), [
    (ALLOC_ON, "quiet init_on_alloc=0", "fallocate"),   # e.g. overridden again later, or a build default
    (FREE_ON, "quiet init_on_free=1", "fallocate"),     # freed pages were zeroed: what is free is zeros
    (BOTH_OFF, "quiet init_on_alloc=1", "dd"),          # the text says on; the kernel says off (page_poison wins)
    (None, "quiet init_on_alloc=1", "dd"),              # the line has left the ring buffer: cannot tell
], ids=["alloc-on", "free-on", "both-off", "no-line"])
def test_method_comes_from_the_boot_logs_mem_auto_init_line(wipe: Callable[..., Run], meminit: str | None,
                                                           cmdline: str, method: str) -> None:
    r = wipe(avail_for(48), meminit=meminit, cmdline=cmdline)
    assert r.rc == 0, r.text()
    assert r.line("start: ").endswith(f"wiping up to 48 MiB by {method}")
    assert r.wiped() == (48, method, "yes"), r.text()
    reason = r.line(f"method {method}: ")
    if meminit is None:
        assert "no 'mem auto-init' line in the boot log" in reason
    else:
        assert meminit.split("mem auto-init: ", 1)[1] in reason


# ---- the sample: a pattern written to real pages and read back ----

# A fake tr whose translation writes its input unchanged: the pattern never reaches the pages,
# as with memory that does not hold what was written. Everything else is the real tr.
FAKE_TR_NO_PATTERN = """#!/bin/sh
# fake_bin/tr: the real tr, except that translating NUL to 0x5a passes the zeros through
if [ "$#" = 2 ] && [ "$1" = '\\000' ]; then exec /bin/cat; fi
exec {real_tr} "$@"
"""


def test_sample_pattern_is_written_and_read_back(wipe: Callable[..., Run]) -> None:
    r = wipe(avail_for(100), args=("--chunk-mib", "16"))
    assert r.rc == 0, r.text()
    assert r.line("sample: ") == "sample: 8 MiB of 0x5a written and read back, then zeros written and read back: yes"


def test_a_sample_that_does_not_read_back_fails(wipe: Callable[..., Run], shell: str) -> None:
    real_tr = "/usr/bin/busybox tr" if shell == "busybox" else "/usr/bin/tr"
    r = wipe(avail_for(100), args=("--chunk-mib", "16"), fake_tools={"tr": FAKE_TR_NO_PATTERN.format(real_tr=real_tr)})
    assert r.rc == 1, r.text()
    wiped, _, sample = r.wiped()
    assert wiped == 100  # the wipe itself still went on to the end
    why = f"(pattern: {8 * MIB} bytes of {8 * MIB} written, {8 * MIB} read back wrong)"
    assert sample == f"no {why}", r.text()
    assert r.line("FAILED") == f"FAILED: sample check: {why}"


# ---- --boot-cleared (the wipe target): no second pass only when the kernel says it cleared ----


@pytest.mark.parametrize(("meminit", "passes"), [
    (FREE_ON, False),   # init_on_free: every free page was zeroed at boot, nothing for a pass
    (ALLOC_ON, True),   # zeroed when handed out, not when freed: the old contents are still there
    (BOTH_OFF, True),   # e.g. page_poison=1 won over init_on_free=1
    (None, True),       # no report: cannot tell, so wipe
], ids=["free-on", "alloc-on", "both-off", "no-line"])
def test_boot_cleared_skips_the_pass_only_on_the_kernels_word(wipe: Callable[..., Run], meminit: str | None,
                                                              passes: bool) -> None:
    r = wipe(avail_for(48), meminit=meminit, args=("--boot-cleared",))
    assert r.rc == 0, r.text()
    if passes:
        assert r.line("the kernel did not zero free memory at boot").endswith(": wiping it here"), r.text()
        assert r.wiped()[0] == 48, r.text()
        assert max(r.used_seen) == 48
        return
    assert r.console == [f"wiped {avail_for(48)} MiB free of {TOTAL_MIB} MiB: the kernel zeroed all free memory "
                         "as it booted (stack:all(zero), heap alloc:off, heap free:on); no second pass"], r.text()
    assert not r.used_seen or max(r.used_seen) == 0  # no tmpfs filled
