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
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(l.text for l in self.lines[-40:])
                    why = "timed out" if left <= 0 else f"qemu exited ({self.proc.returncode})"
                    raise TimeoutError(f"{why} waiting for {pattern!r}; console tail:\n{tail}")
                self._cond.wait(min(left, 0.5))

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
            time.sleep(poll)
        raise TimeoutError(f"guest not in status {status!r} after {timeout} s (is {self.status()!r}); "
                           "console tail:\n" + "\n".join(l.text for l in self.lines[-30:]))

    def count_in_memory(self, pattern: bytes) -> int:
        """Dump guest RAM (QMP dump-guest-memory, to RAM on the host) and count every
        occurrence of the pattern (occurrences, not lines)."""
        path = Path(tempfile.mkstemp(prefix="killcord-dump-", dir="/dev/shm")[1])
        try:
            self.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}")
            with open(path, "rb") as f:
                return f.read().count(pattern)
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
        while time.monotonic() < end:
            self._agent_id += 1
            self._agent.sendall(json.dumps({"id": self._agent_id, "cmd": "true"}).encode() + b"\n")
            reply = self._agent_line(2.0)
            while reply is not None and not self._is_reply(reply):
                reply = self._agent_line(0.5)
            if reply is not None:
                return time.monotonic()
            if self.proc.poll() is not None:
                break
        raise TimeoutError("the guest agent did not answer; console tail:\n"
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
