#!/usr/bin/python3
"""Write killcord(8) from the CLI's own argparse parser, so the man page cannot drift from
`killcord --help`. Run by debian/rules at build time (stdlib only: killcord.cli imports
nothing else at module level). Usage: mkman.py SRC_DIR VERSION [CONFFILE] > killcord.8
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def esc(text: str) -> str:
    """Escape for roff: backslashes, hyphens, and a leading '.' or "'"."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in out.split("\n"))


def options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):  # noqa: SLF001
            continue
        if action.option_strings:
            names = ", ".join(f"\\fB{esc(o)}\\fR" for o in action.option_strings)
            if action.nargs != 0:
                names += f" \\fI{esc(action.metavar or action.dest.upper())}\\fR"
        else:
            names = f"\\fI{esc(action.metavar or action.dest)}\\fR"
        lines += [".TP", names, esc(action.help or "")]
    return lines


def settings(conffile: str) -> list[str]:
    """A CONFIGURATION section from the conffile's own comments (the one place each setting
    is explained): every block that ends in a setting, shown with its default."""
    lines: list[str] = []
    blocks = [b for b in open(conffile).read().split("\n\n")[1:] if b.strip()]
    for block in blocks:
        text = [line.removeprefix("#").strip() for line in block.strip().splitlines()]
        values = [t for t in text if re.match(r"^[a-z_]+ = ", t)]
        unset = re.match(r"^([a-z_]+): ", text[0])
        if not values and unset:  # a setting with no default ("cord: ... Unset by default")
            lines += [".TP", "\\fB" + esc(unset[1]) + "\\fR (unset)", esc(" ".join(text).split(": ", 1)[1])]
            continue
        if not values:
            continue
        table = next((t for t in text if re.match(r"^\[[a-z_]+\]$", t)), None)
        prose = " ".join(t for t in text if t not in values and t != table)
        if table:  # a TOML table: its name, then its entries
            lines += [".TP", f"\\fB{esc(table)}\\fR " + ", ".join(esc(v) for v in values), esc(prose)]
            continue
        shown = (f"\\fB{esc(v.split(' = ')[0])}\\fR = {esc(v.split(' = ', 1)[1])}" for v in values)
        lines += [".TP", ", ".join(shown), esc(prose)]
    return lines


def main() -> int:
    src, version = sys.argv[1], sys.argv[2]
    conffile = sys.argv[3] if len(sys.argv) > 3 else os.path.join(os.path.dirname(src) or ".", "packaging",
                                                                   "killcord.toml")
    sys.path.insert(0, src)
    from killcord import cli

    parser = cli.parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    helps = {a.dest: a.help for a in sub._choices_actions}  # noqa: SLF001
    when = time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time())))
    paragraphs = [" ".join(p.split()) for p in (cli.__doc__ or "").split("\n\n")]
    exit_codes = next((p.removeprefix("Exit codes:").strip() for p in paragraphs if p.startswith("Exit codes:")),
                      "0 on success")

    out = [
        f'.TH KILLCORD 8 "{time.strftime("%Y-%m-%d", when)}" "killcord {esc(version)}" "System Administration"',
        ".SH NAME",
        "killcord \\- emergency shutdown for live systems when the boot medium is pulled",
        ".SH SYNOPSIS",
        ".B killcord",
        "[\\fB\\-\\-config\\fR \\fIFILE\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        esc(parser.description or ""),
        ".SH OPTIONS",
        *options(parser),
        ".TP",
        "\\fB\\-h\\fR, \\fB\\-\\-help\\fR",
        "show the help (also after a command) and exit",
        ".SH COMMANDS",
    ]
    for name, subparser in sub.choices.items():
        out += [".SS " + esc(subparser.format_usage().removeprefix("usage: ").strip()),
                esc(subparser.description or helps.get(name) or "")]
        if len(subparser._actions) > 1:  # noqa: SLF001 - more than -h
            out += [".RS", *options(subparser), ".RE"]
    out += [".SH CONFIGURATION", "Settings of \\fI/etc/killcord/killcord.toml\\fR, each with its default:",
            *settings(conffile)]
    out += [
        ".SH EXIT STATUS",
        esc(exit_codes),
        ".SH FILES",
        ".TP", "\\fI/etc/killcord/killcord.toml\\fR",
        "configuration (each setting commented with its default); KILLCORD_CONFIG or "
        "\\fB\\-\\-config\\fR name another file, KILLCORD_\\fINAME\\fR variables override settings",
        ".TP", "\\fI/run/killcord/\\fR",
        "the control socket and the audit records (RAM only)",
        ".TP", "\\fI/etc/memlockd.d/killcord.cfg\\fR",
        "the files memlockd keeps in RAM, written at install by \\fBkillcord memlock\\-config\\fR",
        ".SH SEE ALSO",
        "\\fBmemlockd\\fR(8), \\fBkexec\\fR(8), \\fBsystemd\\-shutdown\\fR(8), "
        "\\fI/usr/share/doc/killcord/README.md\\fR",
    ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
