"""The wipe kernel's command line, checked against a model of the kernel's own parser; the
shell twin (initramfs-hooks/killcord-cmdline) checked against the Python one; the
initramfs hooks run (as nobody, with every path they touch redirected) on real lines.

The model below is a separate, literal transcription of the kernel's C (lib/cmdline.c
next_arg with its in-place NUL writes, kernel/params.c parse_args, lib/ctype.c isspace,
kernel/crash_reserve.c's strstr): it shares no code with killcord.cmdline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from killcord import cmdline

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "initramfs-hooks" / "killcord-cmdline"
INIT_TOP = ROOT / "initramfs-hooks" / "initramfs-tools" / "scripts" / "init-top" / "killcord"
DRACUT_HOOK = ROOT / "initramfs-hooks" / "dracut" / "90killcord" / "killcord-wipe-hook.sh"
WIPE_BOOT = ROOT / "initramfs-hooks" / "killcord-wipe-boot"
OURS = [(b"init_on_alloc", b"1"), (b"init_on_free", b"1"), (b"killcord.wipe", b"1")]
TAIL = "init_on_alloc=1 init_on_free=1 killcord.wipe=1"

# The spec, written out (not imported): what must never reach the wipe kernel.
RESERVING = {"mem", "memmap", "crashkernel", "hugepages", "hugepagesz", "default_hugepagesz",
             "reserve_mem", "cma", "hugetlb_cma", "efi_fake_mem"}
NEVER = RESERVING | {"init_on_alloc", "init_on_free", "killcord.wipe", "initrd", "BOOT_IMAGE", "rdinit",
                     "bootconfig", "break", "rd.break", "rdbreak", "rd.cmdline", "cma_pernuma", "numa_cma",
                     "elfcorehdr", "initrdmem", "kho", "kho_scratch", "reservelow", "trace_instance",
                     "kvm_arm.mode"}
BREAKS_INITRAMFS = {b"break", b"rd.break", b"rdbreak", b"rd.cmdline"}  # read by splitting on spaces


# ---- the model: the kernel's C, transcribed ----

def isspace(c: int) -> bool:
    return c in (9, 10, 11, 12, 13, 32, 160)  # lib/ctype.c: _S


def cstr(buf: bytearray, p: int) -> bytes:
    return bytes(buf[p:buf.index(0, p)])


def model_next_arg(buf: bytearray, args: int) -> tuple[bytes, bytes | None, bytes, bool, int]:
    """next_arg(args, &param, &val) on a NUL-terminated buffer, writing NULs as C does.
    Returns param, val, the token as it stood, whether its quotes closed, the next args."""
    start = args
    in_quote = quoted = False
    equals = 0
    if buf[args] == ord('"'):
        args += 1
        in_quote = quoted = True
    i = 0
    while buf[args + i]:
        if isspace(buf[args + i]) and not in_quote:
            break
        if equals == 0 and buf[args + i] == ord("="):
            equals = i
        if buf[args + i] == ord('"'):
            in_quote = not in_quote
        i += 1
    token = bytes(buf[start:args + i])
    param = args
    val = None
    if equals:
        buf[args + equals] = 0
        val = args + equals + 1
        if buf[val] == ord('"'):
            val += 1
            if buf[args + i - 1] == ord('"'):
                buf[args + i - 1] = 0
    if quoted and buf[args + i - 1] == ord('"'):
        buf[args + i - 1] = 0
    if buf[args + i]:
        buf[args + i] = 0
        nxt = args + i + 1
    else:
        nxt = args + i
    while isspace(buf[nxt]):
        nxt += 1
    return cstr(buf, param), None if val is None else cstr(buf, val), token, not in_quote, nxt


def model_parse_args(line: bytes) -> tuple[list[tuple[bytes, bytes | None, bytes, bool]], bytes | None]:
    """parse_args: the kernel's params, and what follows "--" (None: no "--")."""
    buf = bytearray(line) + b"\0"
    args = 0
    while isspace(buf[args]):
        args += 1
    params = []
    while buf[args]:
        param, val, token, closed, args = model_next_arg(buf, args)
        if val is None and param == b"--":
            return params, bytes(buf[args:-1])
        params.append((param, val, token, closed))
    return params, None


def model_tokens(rest: bytes) -> list[bytes]:
    buf = bytearray(rest) + b"\0"
    args, out = 0, []
    while isspace(buf[args]):
        args += 1
    while buf[args]:
        _, _, token, _, args = model_next_arg(buf, args)
        out.append(token)
    return out


def dash2underscore(name: bytes) -> bytes:
    return name.replace(b"-", b"_")


def harmless(param: bytes, token: bytes, closed: bool) -> bool:
    words = token.replace(b'"', b" ").split()
    return (closed and dash2underscore(param) not in {n.encode() for n in NEVER}
            and not dash2underscore(param).startswith(b"noinitrd")
            and b"crashkernel=" not in token
            and not any(dash2underscore(w.split(b"=")[0]) in BREAKS_INITRAMFS for w in words))


def enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def assert_safe(current: str, append: str, out: str) -> None:
    """The wipe kernel, as the model parses `out`: nothing reserving memory, ours last and
    the kernel's, everything harmless from `current` kept as it was, init's args kept."""
    ob = enc(out)
    assert b"crashkernel=" not in ob  # the kernel's strstr over the whole line
    assert b"\0" not in ob and len(ob) <= 2047
    params, rest = model_parse_args(ob)
    for param, _, _, _ in params:
        assert dash2underscore(param).decode("utf-8", "replace") not in RESERVING, (param, out)
    assert [(p, v) for p, v, _, _ in params[-3:]] == OURS, out
    assert not any(dash2underscore(p) in {b"init_on_alloc", b"init_on_free", b"killcord.wipe"}
                   for p, _, _, _ in params[:-3])
    before, before_rest = model_parse_args(enc(current))
    wanted = [(p, v) for p, v, t, c in before if harmless(p, t, c)]
    wanted += [(p, v) for p, v, _, _ in model_parse_args(enc(append))[0]]
    assert [(p, v) for p, v, _, _ in params[:-3]] == wanted, out
    if before_rest is None:
        assert rest in (None, b""), out
    else:
        assert rest is not None
        assert model_tokens(rest) == [t for t in model_tokens(before_rest)
                                      if b"crashkernel=" not in t and harmless(b"", t, True)], out


# ---- the model itself, on the kernel's documented cases ----

@pytest.mark.parametrize(("line", "params", "rest"), [
    (b'  a=1  "b=2 3" c="4 5" -- d', [(b"a", b"1"), (b"b", b"2 3"), (b"c", b"4 5")], b"d"),
    (b'"--" x', [], b"x"),
    (b'x="y', [(b"x", b"y")], None),
    (b'=a=b', [(b"=a", b"b")], None),
    (b'"mem"=1G', [(b'mem"', b"1G")], None),
    (b"a\xc3\xa0mem=1G", [(b"a\xc3", None), (b"mem", b"1G")], None),
])
def test_model_reads_as_the_kernel_does(line: bytes, params: list, rest: bytes | None) -> None:
    got, got_rest = model_parse_args(line)
    assert [(p, v) for p, v, _, _ in got] == params and got_rest == rest


# ---- sanitize against the model ----

FRAGMENTS = [
    "mem", "memmap", "crashkernel", "hugepages", "hugepagesz", "default-hugepagesz", "reserve_mem",
    "reserve-mem", "efi_fake_mem", "efi-fake-mem", "hugetlb-cma", "cma", "init_on_free", "init-on-free",
    "init_on_alloc", "killcord.wipe", "killcord.wipe_then", "quiet", "boot", "a-b", "a_b", "BOOT_IMAGE",
    "initrd", "rdinit", "break", "rd.break", "noinitrd", "kvm-arm.mode", "--", "=", "1G", "0", "1", "64M@4G",
    '"', '""', "crashkernel=", "=x", " ", "  ", "\t", "\n", "\xa0", "à", "x",
]
lines = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(alphabet=' "=-_abm\t\xa0à', max_size=4)),
                 max_size=40).map("".join)
SAFE_APPENDS = ["", "memtest=1", 'dyndbg="file x.c +p"', "killcord.wipe_then=reboot", "a-b=1 quiet"]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(current=lines, append=st.sampled_from(SAFE_APPENDS))
@example(current='"mem=1G" quiet', append="")
@example(current="reserve-mem=64M:4096:trace efi-fake-mem=1G@4G:0x40000 x", append="")
@example(current='x foo="a crashkernel=256M" -- crashkernel=128M', append="")
@example(current='a "--" init_on_free=0', append="")
@example(current='a b="c d', append="memtest=1")
@example(current="x=\xe0mem=1G", append="")
def test_no_line_keeps_memory_from_the_wipe(current: str, append: str) -> None:
    assert_safe(current, append, cmdline.sanitize(current, append))


@settings(max_examples=800, deadline=None)
@given(append=lines)
def test_kexec_append_is_refused_or_safe(append: str) -> None:
    try:
        cmdline.check_append(append)
    except cmdline.CmdlineError as exc:
        assert str(exc) and exc.fix
        return
    assert_safe("quiet", append, cmdline.sanitize("quiet", append))


def test_reserving_list_covers_the_spec() -> None:
    stripped = {n.replace("-", "_") for n in cmdline.MEMORY_RESERVING}
    assert RESERVING <= stripped


@pytest.mark.parametrize("line", [
    "x " * 1100,  # the kernel keeps 2047 bytes: our parameters at the end would be cut
    "a\0mem=1G",  # a C string ends at NUL
])
def test_lines_that_cannot_be_made_safe_are_refused(line: str) -> None:
    with pytest.raises(cmdline.CmdlineError) as err:
        cmdline.sanitize(line)
    assert err.value.fix


@pytest.mark.parametrize(("line", "name", "value"), [
    ("init_on_free=0 init-on-free=1", "init_on_free", "1"),  # the last, either spelling
    ('x "init_on_free=1"', "init_on_free", "1"),  # quotes go
    ("init_on_free=1 -- init_on_free=0", "init_on_free", "1"),  # init's, not the kernel's
    ('a="b init_on_free=0" c', "init_on_free", None),  # inside a value
    ("quiet", "init_on_free", None),
    ("init_on_free", "init_on_free", ""),
    ("=a=b", "=a", "b"),  # a "=" as the first byte does not split
])
def test_last_value(line: str, name: str, value: str | None) -> None:
    assert cmdline.last_value(line, name) == value


def test_read_proc_drops_only_procfs_newline(tmp_path: Path) -> None:
    p = tmp_path / "cmdline"
    p.write_bytes(b'a "b\n\n')
    assert cmdline.read_proc(p) == 'a "b\n'


# ---- the shell twin ----

SHELLS = [["dash"], ["busybox", "sh"]]  # Debian's /bin/sh, and the initramfs's
NAMES = ["=x", "mem", "init_on_free", "init-on-free", "killcord.wipe", "killcord.wipe_then", "a_b", "x", "--", "quiet"]


def kc_param(shell: list[str], name: str, line: str) -> str | None:
    if shutil.which(shell[0]) is None:
        pytest.fail(f"{shell[0]} is not installed: apt-get install {shell[0]} (make setup does)")
    r = subprocess.run([*shell, "-c", f'. "{LIB}"; kc_param "$1" "$2"', "kc", name, enc(line)],
                       capture_output=True, env={"PATH": os.environ["PATH"], "LC_ALL": "C"}, timeout=30)
    assert r.returncode in (0, 1), r.stderr
    if r.returncode == 1:
        assert r.stdout == b""
        return None
    assert r.stdout.endswith(b"\n")
    return r.stdout[:-1].decode("utf-8", "surrogateescape")


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=lines, name=st.sampled_from(NAMES))
@example(line='a "killcord.wipe=1"', name="killcord.wipe")
@example(line='killcord.wipe=1 "--" killcord.wipe=0', name="killcord.wipe")
@example(line="killcord.wipe-then=reboot", name="killcord.wipe_then")
@example(line='x="killcord.wipe=0 y', name="killcord.wipe")
@example(line="=x=1", name="=x")
def test_shell_reads_the_line_as_python_does(shell: list[str], line: str, name: str) -> None:
    assume("\0" not in line)
    assert kc_param(shell, name, line) == cmdline.last_value(line, name)


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(["init_on_free", "init-on-free", "page_poison"]).flatmap(
    lambda n: st.sampled_from(["", "=", "=1", "=0", "=on", "=off", "=y", "=Yes", "=t", "=no", "=o", "=2", '="1"'])
    .map(lambda v: n + v)) | st.sampled_from(["--", "quiet", '"--"']), max_size=5))
@example(words=["init_on_free=1", "page_poison=1"])
@example(words=["init_on_free=1", "--", "init_on_free=0"])
def test_shell_decides_frees_zeroed_as_python_does(shell: list[str], words: list[str]) -> None:
    line = " ".join(words)
    r = subprocess.run([*shell, "-c", f'. "{LIB}"; kc_frees_zeroed "$1"', "kc", line],
                       capture_output=True, env={"PATH": os.environ["PATH"], "LC_ALL": "C"}, timeout=30)
    assert r.stderr == b"" and r.returncode in (0, 1)
    assert (r.returncode == 0) is cmdline.frees_zeroed(line), line


def test_shell_files_pass_shellcheck_and_sh_n() -> None:
    files = [LIB, *sorted((ROOT / "initramfs-hooks" / "dracut").rglob("*.sh")),
             *sorted(f for f in (ROOT / "initramfs-hooks" / "initramfs-tools").rglob("*") if f.is_file())]
    assert INIT_TOP in files and DRACUT_HOOK in files
    for f in files:
        assert subprocess.run(["sh", "-n", str(f)], capture_output=True).returncode == 0, f
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: apt-get install shellcheck (make setup does)")
    r = subprocess.run(["shellcheck", *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# ---- the hooks, run for real: as nobody, every path they touch moved into tmp ----

def run_hook(hook: Path, line: str, box: Path) -> tuple[list[str], str]:
    """Run a wipe hook on `line` and return what it ran and what it wrote to the console.
    Safety: it runs as nobody (poweroff and sysrq are refused anyway), with PATH holding
    only fakes, and a rewritten copy whose absolute paths all point into `box`."""
    (box / "cmdline").write_bytes(enc(line) + b"\n")
    bindir = box / "bin"
    bindir.mkdir()
    for fake in ("poweroff", "reboot", "halt", "killcord-wipe"):
        (bindir / fake).write_text(f'#!/bin/sh\necho "{fake} $*" >> "{box}/ran"\n')
        (bindir / fake).chmod(0o755)
    (bindir / "cat").symlink_to(shutil.which("cat"))
    lib = LIB.read_text().replace("/proc/cmdline", f"{box}/cmdline")
    assert "/proc/" not in lib.replace(str(box), "")
    (box / "killcord-cmdline").write_text(lib)
    def moved(script: Path) -> str:
        text = (script.read_text().replace("/usr/lib/killcord/killcord-cmdline", f"{box}/killcord-cmdline")
                .replace("/usr/lib/killcord/killcord-wipe", f"{bindir}/killcord-wipe")  # -boot too
                .replace("/dev/kmsg", f"{box}/kmsg").replace("/proc/sysrq-trigger", f"{box}/sysrq")
                .replace("/proc/cmdline", f"{box}/cmdline"))
        code = "\n".join(line for line in text.replace(str(box), "").splitlines() if not line.lstrip().startswith("#"))
        for real in ("/proc/", "/dev/", "/usr/lib/killcord", "/lib/"):
            assert real not in code, f"{script.name} still touches {real}"
        return text

    # the hook decides; killcord-wipe-boot (real, moved the same way) wipes and powers off
    (bindir / "killcord-wipe-boot").write_text(moved(WIPE_BOOT))
    (bindir / "killcord-wipe-boot").chmod(0o755)
    script = box / "hook"
    script.write_text(moved(hook))
    for f in box.iterdir():
        if f.is_file():
            f.chmod(0o755)
    r = subprocess.run([shutil.which("dash") or "/bin/sh", str(script)], capture_output=True, text=True, timeout=30, env={"PATH": str(bindir)},
                       preexec_fn=lambda: (os.setgroups([]), os.setgid(65534), os.setuid(65534)))
    assert r.returncode == 0, r.stderr
    ran = (box / "ran").read_text().splitlines() if (box / "ran").exists() else []
    assert not (box / "sysrq").exists() or ran, "sysrq written without the power-off being tried"
    return ran, (box / "kmsg").read_text() if (box / "kmsg").exists() else ""


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to nobody: needs root")
@pytest.mark.parametrize("hook", [INIT_TOP, DRACUT_HOOK], ids=["initramfs-tools", "dracut"])
@pytest.mark.parametrize(("line", "ran"), [
    ("quiet killcord.wipe=1", ["killcord-wipe ", "poweroff -f"]),
    ('quiet "killcord.wipe=1"', ["killcord-wipe ", "poweroff -f"]),  # the kernel drops the quotes
    ("killcord.wipe=1 killcord.wipe-then=reboot", ["killcord-wipe ", "reboot -f"]),  # - is _
    ("killcord.wipe=1 killcord.wipe_then=shutdown", ["killcord-wipe ", "poweroff -f"]),
    ("killcord.wipe=1 killcord.wipe=0", []),  # the last one wins
    ('x "--" killcord.wipe=1', []),  # init's argument, not the kernel's
    ('x="a killcord.wipe=1"', []),  # inside another value
    ("boot=live", []),
])
def test_hooks_wipe_exactly_when_the_kernel_says_so(hook: Path, line: str, ran: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as box:  # pytest's tmp_path is 0700: nobody cannot enter
        os.chmod(box, 0o777)
        got, console = run_hook(hook, line, Path(box))
    assert got == ran
    assert ("wipe finished" in console) == bool(ran)


@pytest.mark.parametrize(("line", "zeroed"), [
    ("quiet init_on_free=1", True),
    ("init_on_free=0 init_on_free=1", True),  # the last one wins
    ("init_on_free=1 init_on_free=0", False),
    ("init_on_free=1 -- init_on_free=0", True),  # after "--": init's, not the kernel's
    ("init_on_free=1 page_poison=1", False),  # poisoning takes init_on_free's place
    ("init_on_free=1 page_poison=0", True),
    ("init_on_free=on", True),  # kstrtobool: on, y, t are true too
    ("init_on_free=yes page_poison=off", True),
    ("init_on_free=1 page_poison=Y", False),
    ("init_on_free", False),  # no value: refused, the default (off) stays
    ("init_on_alloc=1", False),
    ("", False),
])
def test_the_claim_is_skipped_only_where_the_kernel_zeroes_what_is_freed(line: str, zeroed: bool) -> None:
    assert cmdline.frees_zeroed(line) is zeroed


@pytest.mark.parametrize(("value", "read"), [
    ("1", True), ("y", True), ("Yes", True), ("t", True), ("on", True), ("ON", True),
    ("0", False), ("n", False), ("false", False), ("off", False), ("Of", False),
    ("", None), (None, None), ("o", None), ("ox", None), ("2", None), ("enable", None),
])
def test_kernel_bool_reads_as_kstrtobool(value: str | None, read: bool | None) -> None:
    assert cmdline.kernel_bool(value) is read
