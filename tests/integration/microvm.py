"""Drive a monitor process as a user would: its API socket, its console and its log.

`Monitor` starts `python -m vmm` under pexpect (the console is its stdout and
stdin), talks to the API over the Unix socket with a plain HTTP/1.1 client, and
reads the monitor's own log file. A console wait that times out reports what it
waited for, for how long, and shows the tail of what the guest printed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pexpect

CONSOLE_TAIL_CHARS = 3000
# The monitor runs from this checkout, not from wherever `pip install -e` last pointed.
REPO_ROOT = Path(__file__).resolve().parents[2]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            # A socket file that exists before the server listens refuses the connection.
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """A keep-alive HTTP/1.1 client for the monitor's API socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._connection = UnixHTTPConnection(socket_path)

    def request(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        payload = None if body is None else json.dumps(body)
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            self._connection.request(method, path, body=payload, headers=headers)
            response = self._connection.getresponse()
        except (http.client.HTTPException, OSError):
            self._connection.close()
            self._connection = UnixHTTPConnection(self.socket_path)
            raise
        data = response.read()
        return response.status, (json.loads(data) if data else None)

    def put(self, path: str, body: object) -> tuple[int, object]:
        return self.request("PUT", path, body)

    def get(self, path: str) -> tuple[int, object]:
        return self.request("GET", path)

    def close(self) -> None:
        self._connection.close()


class ConsoleTimeout(AssertionError):
    pass


class Monitor:
    """One `vmm` process with its console under pexpect."""

    def __init__(
        self, workdir: Path, *extra_args: str, instance_id: str = "test-vm",
        netns: str | None = None,
    ) -> None:
        """Start `python -m vmm` in `workdir`; inside network namespace `netns` if given.

        The namespace (made by the caller, `ip netns add`) holds the taps the guest uses.
        The API socket is a file, so the test reaches it from any namespace.
        """
        self.workdir = workdir
        self.socket_path = str(workdir / "api.sock")
        self.log_path = workdir / "monitor.log"
        self.metrics_path = workdir / "metrics.json"
        self.log_path.touch()
        args = [
            "-m", "vmm",
            "--api-sock", self.socket_path,
            "--id", instance_id,
            "--log-path", str(self.log_path),
            "--level", "Info",
            "--metrics-path", str(self.metrics_path),
            *extra_args,
        ]
        command = sys.executable
        if netns is not None:
            command, args = "ip", ["netns", "exec", netns, sys.executable, *args]
        self.started = time.monotonic()
        self.process = pexpect.spawn(
            command, args, cwd=str(workdir), timeout=None, maxread=65536,
            encoding="utf-8", codec_errors="replace", dimensions=(50, 200),
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        self.process.delaybeforesend = None
        self.api = ApiClient(self.socket_path)

    def wait_for_api(self, timeout_s: float = 20.0) -> float:
        """Wait until the API socket accepts; return seconds since the process started."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if os.path.exists(self.socket_path):
                try:
                    status, _ = self.api.get("/")
                    if status == 200:
                        return time.monotonic() - self.started
                except OSError:
                    pass
            if not self.process.isalive():
                break
            time.sleep(0.01)
        output = ""
        if not self.process.isalive():
            output = self.process.read_nonblocking(CONSOLE_TAIL_CHARS, timeout=1) or ""
        raise AssertionError(
            f"API socket {self.socket_path} not ready after {timeout_s} s; "
            f"output:\n{output}\nlog:\n{self.read_log()[-CONSOLE_TAIL_CHARS:]}"
        )

    def expect(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """Wait for a regular expression on the console; explain a timeout."""
        began = time.monotonic()
        try:
            self.process.expect(pattern, timeout=timeout_s)
        except (pexpect.TIMEOUT, pexpect.EOF) as error:
            waited = time.monotonic() - began
            what = "timed out" if isinstance(error, pexpect.TIMEOUT) else "console closed"
            tail = (self.process.before or "")[-CONSOLE_TAIL_CHARS:]
            raise ConsoleTimeout(
                f"{what} after {waited:.1f} s waiting for {pattern!r} on the console.\n"
                f"--- console tail ---\n{tail}\n--- monitor log tail ---\n"
                f"{self.read_log()[-CONSOLE_TAIL_CHARS:]}"
            ) from None
        return self.process.match

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to end; return its exit code."""
        deadline = time.monotonic() + timeout_s
        while self.process.isalive() and time.monotonic() < deadline:
            try:
                self.process.expect(pexpect.EOF, timeout=max(0.1, deadline - time.monotonic()))
            except pexpect.TIMEOUT:
                break
        if self.process.isalive():
            raise AssertionError(
                f"monitor still running {timeout_s} s later; log:\n"
                f"{self.read_log()[-CONSOLE_TAIL_CHARS:]}"
            )
        self.process.close()
        return self.process.exitstatus if self.process.exitstatus is not None else (
            128 + (self.process.signalstatus or 0)
        )

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def rss_beyond_guest_kib(self, guest_mem_bytes: int) -> int:
        """Sum the RSS of every mapping of the process except guest RAM, in KiB.

        Guest RAM is the anonymous mapping whose size equals the configured memory
        (one mapping while the guest has less than 3 GiB).
        """
        total = 0
        skip = False
        with open(f"/proc/{self.process.pid}/smaps", encoding="ascii") as smaps:
            for line in smaps:
                fields = line.split()
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    start, end = (int(part, 16) for part in fields[0].split("-"))
                    skip = end - start == guest_mem_bytes
                elif fields[0] == "Rss:" and not skip:
                    total += int(fields[1])
        return total

    def terminate(self) -> None:
        self.api.close()
        if self.process.isalive():
            self.process.terminate(force=True)
        self.process.close()
