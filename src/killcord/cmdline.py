"""The kernel command line, read as the kernel reads it: the one owner of that parsing for
kexec (the wipe kernel's line), check (what this boot runs with) and config (kexec_append).
initramfs-hooks/killcord-cmdline is its shell twin for the initramfs hooks; a differential
test keeps the two in step.

Mirrored from Linux (6.x; unchanged in these respects since 4.x):
- lib/cmdline.c next_arg(): a token ends at whitespace outside double quotes; each `"`
  toggles "inside quotes"; a token that starts with `"` begins inside quotes and loses that
  quote. The first `=` after the token's first byte splits param from value. A value that
  starts with `"` loses it, and then a `"` ending the token goes too; so does a `"` ending
  a token that began with one. No escapes. An open quote runs to the end of the line:
  everything after it is one token.
- lib/ctype.c isspace(): bytes 9-13, 32 and 160 (0xA0, Latin-1's no-break space; so in
  UTF-8, "à" = C3 A0 ends a token). We therefore parse bytes, never str.
- kernel/params.c parse_args(): skip whitespace, take tokens; a token whose param is "--"
  and that has no "=" (also `"--"`, whose quotes next_arg drops) ends the kernel's
  parameters: the rest goes to init (init/main.c, set_init_arg), and parse_early_param()
  stops there too.
- kernel/params.c parameq()/parameqn(): `-` and `_` are the same in names, case matters.
  Every occurrence is handed to the parameter's handler in order: the last one wins.
  init/main.c obsolete_checksetup() matches a __setup("name") without "=" as a prefix
  (parameqn over strlen(name)): hence PREFIX_STRIPPED.
- kernel/crash_reserve.c get_last_crashkernel(): strstr(boot_command_line, "crashkernel=")
  over the whole line: inside other values, in quotes, after "--". Any token holding that
  text is dropped, init's included; our own text never contains it.

Written by hand: no library parses the way the kernel does (shlex has escapes and other
quote rules), and the point is to be exactly the kernel's parser, tested against a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Always last, before any " -- ": the last init_on_free wins, and what follows "--" goes to
# init, not to the kernel (vm-findings.md, "What the kexec target must not inherit").
# init_on_alloc=1 lets the initramfs wiper claim free memory with fallocate: the kernel
# then zeroes every page it hands over, far faster than writing zeros from user space.
WIPE_PARAMS = ("init_on_alloc=1", "init_on_free=1", "killcord.wipe=1")
OURS = frozenset({"init_on_alloc", "init_on_free", "killcord.wipe"})

# Parameters that keep RAM from the page allocator at boot, so the wiper never sees it.
# mem=, memmap=, crashkernel= and gigantic hugepages were measured to leave 15-50 % of RAM
# unwiped; the others reserve the same way (memblock), not measurable here:
#   reserve_mem, cma, hugetlb_cma, efi_fake_mem (as listed in the issue); cma_pernuma and
#   numa_cma (per-node CMA areas, like cma); elfcorehdr (makes the target a dump kernel that
#   keeps the old kernel's core header); initrdmem (and initrd=<addr>,<size>): a physical
#   range taken as the initrd; kho, kho_scratch (kexec handover: memory preserved for, and
#   scratch areas reserved in, the next kernel); reservelow (x86 low memory);
#   trace_instance (a ring buffer mapped over a physical range that survives reboot);
#   kvm-arm.mode (arm64 pKVM carves out EL2 memory with memblock_phys_alloc, not zeroed).
# The wipe kernel needs no hugepages at all, so every hugepage parameter goes.
# Kept on purpose: kernelcore=, movablecore=, memtest=, page_poison=, log_buf_len=
# (measured: no residue); swiotlb= and other boot allocations (memblock_alloc zeroes them);
# efi=nosoftreserve (hands more RAM to the allocator, reserves none); nr_cpus= and
# hugetlb_free_vmemmap= (no reservation).
MEMORY_RESERVING = frozenset({
    "mem", "memmap", "crashkernel", "hugepages", "hugepagesz", "default_hugepagesz",
    "reserve_mem", "cma", "hugetlb_cma", "efi_fake_mem", "cma_pernuma", "numa_cma",
    "elfcorehdr", "initrdmem", "kho", "kho_scratch", "reservelow", "trace_instance",
    "kvm-arm.mode",
})
# Parameters that keep the initramfs from reaching the wipe: rdinit= runs another program
# than the initramfs's /init; break= (initramfs-tools), rd.break/rdbreak and
# rd.cmdline=ask (dracut) stop at a console shell or prompt first; bootconfig pulls in
# kernel parameters from the initrd that this line does not show.
STOPS_WIPE = frozenset({"rdinit", "break", "rd.break", "rdbreak", "rd.cmdline", "bootconfig"})
# initramfs-tools and dracut read these by splitting /proc/cmdline on whitespace, quotes
# and all: `x="a break=top"` is one harmless parameter to the kernel, but breaks there.
INITRAMFS_SPLIT = frozenset({"break", "rd.break", "rdbreak", "rd.cmdline"})
# __setup("noinitrd") has no "=": the kernel matches any parameter that starts with it.
PREFIX_STRIPPED = ("noinitrd",)
# The boot loader's; kexec passes our own initrd.
BOOT_LOADER = frozenset({"initrd", "BOOT_IMAGE"})

CRASHKERNEL = b"crashkernel="
# COMMAND_LINE_SIZE (x86_64, arm64) less its NUL: a longer line is cut (ours are at its end)
# or refused by the load.
MAX_BYTES = 2047
SPACE = frozenset(b" \t\n\v\f\r\xa0")
QUOTE = ord('"')
EQUALS = ord("=")


def norm(name: str | bytes) -> bytes:
    """parameq()'s view of a name: dashes are underscores."""
    raw = name.encode() if isinstance(name, str) else name
    return raw.replace(b"-", b"_")


_WHY = {
    **{norm(n): "it keeps memory from being wiped" for n in MEMORY_RESERVING},
    **{norm(n): "it keeps the initramfs from running the wipe" for n in STOPS_WIPE},
    **{norm(n): "it belongs to the boot loader (kexec_initrd sets the initrd)" for n in BOOT_LOADER},
    **{norm(n): "killcord sets it itself, last" for n in OURS},
}
STRIPPED = frozenset(_WHY)
_SPLIT = frozenset(norm(n) for n in INITRAMFS_SPLIT)


class CmdlineError(ValueError):
    """A command line we cannot make safe: the message says why, `fix` what to do."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


@dataclass(frozen=True)
class Token:
    raw: bytes  # what next_arg consumed, quotes included, without the whitespace around it
    param: bytes  # next_arg's param: quotes dropped where it drops them
    value: bytes | None  # None: no "=" (next_arg's val == NULL)
    closed: bool  # False: a quote was still open at the end of the line


@dataclass(frozen=True)
class Parsed:
    kernel: tuple[Token, ...]  # the kernel's parameters, in order
    dashes: bool  # a "--" ended them
    init: tuple[Token, ...]  # init's arguments (tokenised the same way)


def _bytes(line: str | bytes) -> bytes:
    return line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")


def _text(line: bytes) -> str:
    return line.decode("utf-8", "surrogateescape")


def next_arg(line: bytes, pos: int) -> tuple[Token, int]:
    """lib/cmdline.c next_arg() from `pos` (not whitespace); returns the token and the
    position after it and the whitespace that follows."""
    start = pos
    quoted = line[pos] == QUOTE
    in_quote = quoted
    i = pos + 1 if quoted else pos
    body = i
    equals = -1
    while i < len(line):
        c = line[i]
        if c in SPACE and not in_quote:
            break
        if equals < 0 and c == EQUALS and i > body:  # equals == 0 means "none" in C
            equals = i
        if c == QUOTE:
            in_quote = not in_quote
        i += 1
    end = i
    last_is_quote = end > body and line[end - 1] == QUOTE
    value: bytes | None = None
    if equals < 0:
        param = line[body:end]
        if quoted and last_is_quote:
            param = param[:-1]
    else:
        param = line[body:equals]
        value = line[equals + 1:end]
        lead = value[:1] == b'"'
        if lead:
            value = value[1:]
        if (lead or quoted) and value.endswith(b'"'):  # the token's last byte, nulled once
            value = value[:-1]
    nxt = end
    while nxt < len(line) and line[nxt] in SPACE:
        nxt += 1
    return Token(line[start:end], param, value, closed=not in_quote), nxt


def _tokens(line: bytes, pos: int) -> list[Token]:
    out = []
    while pos < len(line):
        tok, pos = next_arg(line, pos)
        out.append(tok)
    return out


def parse(line: str | bytes) -> Parsed:
    """kernel/params.c parse_args(): the kernel's parameters up to "--", then init's."""
    raw = _bytes(line)
    pos = 0
    while pos < len(raw) and raw[pos] in SPACE:
        pos += 1
    kernel: list[Token] = []
    while pos < len(raw):
        tok, pos = next_arg(raw, pos)
        if tok.value is None and tok.param == b"--":
            return Parsed(tuple(kernel), True, tuple(_tokens(raw, pos)))
        kernel.append(tok)
    return Parsed(tuple(kernel), False, ())


def last_value(cmdline: str | bytes, name: str) -> str | None:
    """The value the kernel ends up with for parameter `name` (`-`/`_` alike): its last
    occurrence before "--"; "" when that one has no "="; None when it is absent."""
    want = norm(name)
    value: str | None = None
    for tok in parse(cmdline).kernel:
        if norm(tok.param) == want:
            value = _text(tok.value or b"")
    return value


def kernel_bool(value: str | None) -> bool | None:
    """A boolean parameter's value as lib/kstrtox.c kstrtobool() reads it: y/Y/t/T/1 and
    on are true, n/N/f/F/0 and off false; anything else (an empty value, no "=") is refused,
    and so is the parameter's absence: None, the kernel keeps its default. (A refused later
    occurrence leaves an earlier one in force; last_value() sees only the last, so callers
    reading None as "off" err towards doing the work themselves.)"""
    if not value:
        return None
    if value[0] in "yYtT1":
        return True
    if value[0] in "nNfF0":
        return False
    if value[0] in "oO" and len(value) > 1:
        return {"n": True, "f": False}.get(value[1].lower())
    return None


def poisons_pages(line: str | bytes) -> bool:
    """page_poison=1 (mm/page_poison.c): freed pages are filled with a pattern, and the
    kernel turns init_on_alloc and init_on_free off in its favour (mm/mm_init.c)."""
    return kernel_bool(last_value(line, "page_poison")) is True


def frees_zeroed(line: str | bytes) -> bool:
    """Whether a kernel booted with this line zeroes every page as it is freed, its boot's
    own freeing of all memory included: init_on_free on (the last one wins), page
    poisoning off. Debian's kernels leave it off by default (CONFIG_INIT_ON_FREE_DEFAULT_ON
    unset), so the parameter's absence reads as off."""
    return kernel_bool(last_value(line, "init_on_free")) is True and not poisons_pages(line)


def initramfs_words(line: str) -> list[str]:
    """The line as initramfs scripts (initramfs-tools, live-boot, dracut's shell) read it:
    `for x in $(cat /proc/cmdline)`, split on whitespace, quotes and `--` not special. What
    they decide from it (live-boot's toram, a break) follows this reading, not the kernel's."""
    return line.split()


def read_proc(path: Path = Path("/proc/cmdline")) -> str:
    """This boot's command line, without the newline procfs adds."""
    raw = path.read_bytes()
    return _text(raw[:-1] if raw.endswith(b"\n") else raw)


def _why_init_stripped(tok: Token) -> str | None:
    """Why a token must go even where the kernel does not take it as a parameter (after
    "--", or inside another value)."""
    if CRASHKERNEL in tok.raw:
        return "the kernel finds crashkernel= anywhere in the line and reserves memory for it"
    for word in tok.raw.replace(b'"', b" ").split():
        if norm(word.split(b"=", 1)[0]) in _SPLIT:
            return "the initramfs, which splits the whole line on spaces, would stop before the wipe"
    return None


def _why_stripped(tok: Token) -> str | None:
    name = norm(tok.param)
    if name in _WHY:
        return _WHY[name]
    if any(name.startswith(norm(p)) for p in PREFIX_STRIPPED):
        return "it keeps the initramfs from running the wipe"
    return _why_init_stripped(tok)


def check_append(append: str) -> None:
    """kexec_append: only parameters that stay the kernel's, take effect as written and
    keep nothing from the wipe. Raises CmdlineError naming the first offending token."""
    raw = _bytes(append)
    fix = "remove it from kexec_append"
    if b"\0" in raw:
        raise CmdlineError("kexec_append contains a NUL byte: the kernel would stop reading there", fix)
    parsed = parse(raw)
    if parsed.dashes:
        raise CmdlineError(
            "'--' is not allowed in kexec_append: what follows it goes to init, and so would "
            f"killcord's own {' '.join(WIPE_PARAMS)}", fix)
    for tok in parsed.kernel:
        if not tok.closed:
            raise CmdlineError(
                f"{_text(tok.raw)!r} is not allowed in kexec_append: its quote is never closed, so it "
                f"would swallow killcord's own {' '.join(WIPE_PARAMS)}", "close the quote or " + fix)
        why = _why_stripped(tok)
        if why:
            raise CmdlineError(
                f"{_text(tok.raw)!r} is not allowed in kexec_append: {why} "
                f"(killcord always adds {' '.join(WIPE_PARAMS)} last)", fix)


def sanitize(current: str | bytes, append: str = "") -> str:
    """The wipe kernel's line: `current` without what keeps RAM from the wipe (see
    _why_stripped; a token with a quote left open is dropped too: it would swallow what
    follows), then `append`, then WIPE_PARAMS, then " -- " and init's arguments if
    `current` had them (less crashkernel= and the initramfs's break parameters, which are
    found there too). Raises CmdlineError if that cannot be safe."""
    check_append(append)
    raw = _bytes(current)
    if b"\0" in raw:
        raise CmdlineError("the command line contains a NUL byte", "fix the boot loader's kernel command line")
    parsed = parse(raw)
    kept = [t.raw for t in parsed.kernel if t.closed and _why_stripped(t) is None]
    parts = kept + [t.raw for t in parse(append).kernel] + [p.encode() for p in WIPE_PARAMS]
    if parsed.dashes:
        parts += [b"--"] + [t.raw for t in parsed.init if _why_init_stripped(t) is None]
    out = b" ".join(parts)
    if len(out) > MAX_BYTES:
        raise CmdlineError(
            f"the wipe kernel's command line would be {len(out)} bytes, over the kernel's "
            f"{MAX_BYTES}: the end, where killcord's {' '.join(WIPE_PARAMS)} go, would be lost",
            "shorten the boot loader's kernel command line or kexec_append")
    return _text(out)
