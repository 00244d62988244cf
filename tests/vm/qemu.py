"""A QEMU guest for tests: TCG, serial console read line by line with host timestamps,
QMP for device_del, dump-guest-memory and powerdown. The qemu process belongs to the
test: it is killed by its PID when the test ends, however it ends."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Line:
    at: float  # host time.monotonic()
    text: str


class GuestCrashedBooting(RuntimeError):
    """The guest's kernel died before its agent ever answered: nothing of the test had run.
    Seen under TCG with 2 vCPUs ("Oops: int3" in enqueue_timer at 1.6 s, a kernel text
    patch racing QEMU's translation of it). pytest reruns a test once on this error alone
    (pyproject's addopts, pytest-rerunfailures); any other failure counts at once.

    Also raised for the same TCG artefact wherever a console wait sees it (tcg_crash): in
    the kernel killcord jumped to, where it cost CI a 300 s timeout and a red run, and in a
    guest without an agent, which has only its console to wait on."""


JUMP = "kexec_core: Starting new kernel"


def tcg_crash(lines: list[str]) -> str | None:
    """A kernel died of QEMU's text-patching race: an "Oops: int3" (the kernel met a
    breakpoint no text patch of its own left there, as when one vCPU runs code QEMU
    translated before another vCPU's patch finished) and then a panic, in the kernel
    running now: the one killcord jumped to when there was a jump, else the first. Seen in
    CI in sched_clock_cpu during late initcalls, in the second kernel (trixie, 2 vCPUs,
    scenario a) and in the first (the agent-less fallback guest, which then waited 400 s
    for its "armed" line). Only this signature counts: any other crash (no root, a bad
    command line, a wipe gone wrong) stays a failure."""
    start = max((i for i, text in enumerate(lines) if JUMP in text), default=-1)
    after = lines[start + 1:]
    oops = next((t for t in after if "Oops: int3" in t), None)
    panic = next((t for t in after if "Kernel panic - not syncing" in t), None)
    if oops is None or panic is None:
        return None
    which = "the kernel killcord jumped to" if start >= 0 else "the guest's first kernel"
    return f"{which}: {oops.strip()}; {panic.strip()}"


class Guest:
    def __init__(self, args: list[str], memory_mib: int = 1024, cpus: int = 1, log: Path | None = None,
                 agent: bool = False, stop_on_poweroff: bool = False) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="killcord-vm-"))
        self.qmp_path = self.tmp / "qmp.sock"
        self.agent_path = self.tmp / "agent.sock"
        extra: list[str] = []
        if agent:  # ttyS1: the guest's test agent (tests/vm/guest/killcord-agent)
            extra += ["-serial", f"unix:{self.agent_path},server=on,wait=off"]
        if stop_on_poweroff:  # the guest's poweroff stops the VM: its RAM can still be dumped
            extra += ["-no-shutdown"]
        self.log_path = log
        self.lines: list[Line] = []
        self._cond = threading.Condition()
        self.cmd = [
            shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
            "-accel", "tcg", "-machine", "q35", "-cpu", "qemu64", "-smp", str(cpus), "-m", str(memory_mib),
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *extra, *args,
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._qmp: socket.socket | None = None
        self._qmp_file = None
        self._agent: socket.socket | None = None
        self._agent_buf = b""
        self._agent_id = 0
        self.events: list[dict] = []  # QMP events seen, in order

    # ---- console ----

    def _read(self) -> None:
        assert self.proc.stdout is not None
        logf = open(self.log_path, "w") if self.log_path else None
        try:
            for raw in self.proc.stdout:
                text = raw.decode(errors="replace").rstrip("\r\n")
                line = Line(time.monotonic(), text)
                if logf:
                    logf.write(f"{line.at - self.started:9.3f} {text}\n")
                    logf.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        finally:
            if logf:
                logf.close()
            with self._cond:
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> tuple[int, Line]:
        """The first console line from index `start` on that matches; raises TimeoutError
        with the console's tail, or if qemu exits first."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i].text):
                        return i, self.lines[i]
                    i += 1
                self._check_target()
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(l.text for l in self.lines[-40:])
                    why = "timed out" if left <= 0 else f"qemu exited ({self.proc.returncode})"
                    raise TimeoutError(f"{why} waiting for {pattern!r}; console tail:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def _check_target(self) -> None:
        with self._cond:
            crash = tcg_crash([line.text for line in self.lines])
        if crash is not None:
            raise GuestCrashedBooting(f"a kernel crashed ({crash}); "
                                      "QEMU's text-patching race under TCG, not killcord's doing")

    def text(self) -> str:
        with self._cond:
            return "\n".join(l.text for l in self.lines)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the guest to end qemu by itself (poweroff with -no-reboot)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            tail = "\n".join(l.text for l in self.lines[-40:])
            raise TimeoutError(f"qemu still running after {timeout} s; console tail:\n{tail}") from None
        self._reader.join(5)
        return rc

    # ---- QMP ----

    def qmp(self, command: str, **arguments: object) -> dict:
        if self._qmp is None:
            for _ in range(100):
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(str(self.qmp_path))
                    break
                except OSError:
                    s.close()
                    time.sleep(0.1)
            else:
                raise RuntimeError("QMP socket never appeared")
            self._qmp = s
            self._qmp_file = s.makefile("rwb")
            json.loads(self._qmp_file.readline())  # greeting
            self._send({"execute": "qmp_capabilities"})
        return self._send({"execute": command, "arguments": arguments} if arguments else {"execute": command})

    def _send(self, msg: dict) -> dict:
        assert self._qmp_file is not None
        self._qmp_file.write(json.dumps(msg).encode() + b"\n")
        self._qmp_file.flush()
        while True:
            reply = json.loads(self._qmp_file.readline())
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {msg.get('execute')}: {reply['error']}")
            return reply.get("return", {})

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def wait_status(self, status: str, timeout: float, poll: float = 0.05) -> float:
        """Wait until QMP reports `status` (e.g. "shutdown" after the guest's own poweroff
        with stop_on_poweroff); returns the host time it was first seen."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.status() == status:
                return time.monotonic()
            self._check_target()
            time.sleep(poll)
        raise TimeoutError(f"guest not in status {status!r} after {timeout} s (is {self.status()!r}); "
                           "console tail:\n" + "\n".join(l.text for l in self.lines[-30:]))

    def wait_event(self, name: str, timeout: float, since: int = 0) -> dict:
        """The first QMP event `name` from index `since` of self.events on (events arrive
        with command replies, so this polls query-status)."""
        end = time.monotonic() + timeout
        while True:
            for event in self.events[since:]:
                if event["event"] == name:
                    return event
            if time.monotonic() > end:
                raise TimeoutError(f"no QMP event {name} in {timeout} s (saw {self.events[since:]})")
            self.qmp("query-status")
            time.sleep(0.02)

    # The ICH9 LPC bridge's ACPI PM base (config 0x40) and ACPI enable (0x44), as SeaBIOS
    # sets them at boot. QEMU's S3 wakeup resets the chipset and SeaBIOS 1.16's resume path
    # does not program them again (real firmware does), so after one resume the guest's
    # PM1 registers are gone: its poweroff and its next suspend do nothing. wakeup()
    # restores them from the host, as the firmware would have.
    LPC_PM = {0x8000F840: 0x0601, 0x8000F844: 0x80}  # CF8 address (00:1f.0, register): value

    def _hmp(self, line: str) -> str:
        out = str(self.qmp("human-monitor-command", **{"command-line": line}))
        if "invalid" in out or "Try \"help" in out:
            raise RuntimeError(f"HMP {line!r}: {out}")
        return out

    def _port_read(self, port: int) -> int:
        return int(self._hmp(f"i /w {port:#x}").rsplit("=", 1)[1], 16)

    def _config_read(self, address: int) -> int:
        self._hmp(f"o /w 0xcf8 {address:#x}")
        return self._port_read(0xCFC)

    def _config_write(self, address: int, value: int) -> None:
        self._hmp(f"o /w 0xcf8 {address:#x}")
        self._hmp(f"o /w 0xcfc {value:#x}")

    def wakeup(self, timeout: float = 60) -> None:
        """Wake the guest from S3 (QMP system_wakeup) and restore the firmware's ACPI PM
        setup once the firmware has handed over to the guest's kernel: SeaBIOS's resume
        path sets up SMM through those very registers if it finds them, and the resume
        then fails now and then. Each look is made with the guest paused, and CF8 (the
        guest's own PCI config address, the same ports) is put back as it was."""
        since = len(self.events)
        self.qmp("system_wakeup")
        self.wait_event("WAKEUP", timeout, since)
        end = time.monotonic() + timeout
        pm_base = next(iter(self.LPC_PM))
        while True:
            self.qmp("stop")
            try:
                saved = self._port_read(0xCF8)
                reset = self._config_read(pm_base) != self.LPC_PM[pm_base]  # by QEMU's wakeup
                in_kernel = "RIP=ffff" in self._hmp("info registers")  # 64-bit, the kernel's half
                if reset and in_kernel:
                    for address, value in self.LPC_PM.items():
                        self._config_write(address, value)
                        if (got := self._config_read(address)) != value:
                            raise RuntimeError(f"LPC register {address:#x}: wrote {value:#x}, reads {got:#x}")
                self._hmp(f"o /w 0xcf8 {saved:#x}")
            finally:
                self.qmp("cont")
            if reset and in_kernel:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"the guest did not resume in {timeout} s (chipset reset: {reset})")
            time.sleep(0.01)

    def count_in_memory(self, pattern: bytes) -> int:
        """Dump guest RAM (QMP dump-guest-memory, to RAM on the host) and count every
        occurrence of the pattern (occurrences, not lines)."""
        return self.counts_in_memory(pattern)[0]

    def counts_in_memory(self, *patterns: bytes) -> list[int]:
        """One dump, every occurrence of each pattern counted."""
        fd, name = tempfile.mkstemp(prefix="killcord-dump-", dir="/dev/shm")
        os.close(fd)  # an fd left open would keep the unlinked dump in RAM until the run ends
        path = Path(name)
        try:
            self.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}")
            with open(path, "rb") as f:
                data = f.read()
            return [data.count(p) for p in patterns]
        finally:
            path.unlink(missing_ok=True)

    # ---- the agent on ttyS1 ----

    def _agent_line(self, timeout: float) -> dict | None:
        assert self._agent is not None
        end = time.monotonic() + timeout
        while b"\n" not in self._agent_buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            self._agent.settimeout(left)
            try:
                chunk = self._agent.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise RuntimeError("agent connection closed")
            self._agent_buf += chunk
        line, self._agent_buf = self._agent_buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return {}

    def _is_reply(self, msg: dict) -> bool:
        # before the agent puts ttyS1 in raw mode, the line discipline echoes our requests
        # back: an echo has our id but no rc
        return msg.get("id") == self._agent_id and "rc" in msg

    def _panic(self) -> str | None:
        with self._cond:
            return next((line.text for line in self.lines if "Kernel panic - not syncing" in line.text), None)

    def wait_agent(self, timeout: float) -> float:
        """Until the guest's agent answers; returns the host time it did."""
        end = time.monotonic() + timeout
        while self._agent is None:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(self.agent_path))
                self._agent = s
            except OSError:
                s.close()
                if time.monotonic() > end:
                    raise TimeoutError("agent socket never appeared") from None
                time.sleep(0.2)
        while time.monotonic() < end and self._panic() is None:
            self._agent_id += 1
            try:
                self._agent.sendall(json.dumps({"id": self._agent_id, "cmd": "true"}).encode() + b"\n")
                reply = self._agent_line(2.0)
                while reply is not None and not self._is_reply(reply):
                    reply = self._agent_line(0.5)
            except (OSError, RuntimeError):  # qemu gone (socket closed), or a hung guest's full buffer
                break
            if reply is not None:
                return time.monotonic()
            if self.proc.poll() is not None:
                self._reader.join(5)  # the console to its end
                break
        try:
            status = self.status() if self.proc.poll() is None else f"qemu exited ({self.proc.returncode})"
        except (OSError, RuntimeError):  # exiting right now (a panic with panic=-1 and -no-reboot)
            status = "qemu exiting"
        panic = self._panic()
        if panic is not None:
            first = next(line.text for line in self.lines if "Oops" in line.text or "Kernel panic" in line.text)
            raise GuestCrashedBooting(f"the guest kernel crashed before its agent answered ({first.strip()}; "
                                      f"{panic.strip()}); guest {status}")
        raise TimeoutError(f"the guest agent did not answer (guest {status}); console tail:\n"
                           + "\n".join(l.text for l in self.lines[-30:]))

    def run(self, cmd: str, timeout: float = 120.0, check: bool = True) -> dict:
        """Run a shell command in the guest (as root) through the agent."""
        assert self._agent is not None, "wait_agent() first"
        self._agent_id += 1
        self._agent.sendall(json.dumps({"id": self._agent_id, "cmd": cmd, "timeout": timeout}).encode() + b"\n")
        end = time.monotonic() + timeout + 10
        while time.monotonic() < end:
            reply = self._agent_line(end - time.monotonic())
            if reply is not None and self._is_reply(reply):
                if check and reply["rc"] != 0:
                    raise RuntimeError(f"guest command failed ({reply['rc']}): {cmd}\n{reply['out']}{reply['err']}")
                return reply
        raise TimeoutError(f"guest command did not answer in {timeout} s: {cmd}")

    # ---- the end ----

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for s in (self._qmp, self._agent):
            if s is not None:
                s.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
