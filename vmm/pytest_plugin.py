"""A pytest plugin that boots microVMs with this monitor for tests of your own kernels and images.

Installed with the package (entry point `pytest11`), it adds:

- `microvm_factory`: builds `MicroVm` objects in the test's temporary directory;
  `microvm_factory.build(kernel, rootfs=None, ...)` configures one over the API,
  `vm.start()` boots it.
- `microvm`: one VM booted from `--microvm-kernel` and `--microvm-rootfs`
  (skipped when they are not given).

A `MicroVm` logs in over the serial console (pexpect) or SSH (paramiko), runs
commands, flushes and reads metrics, and reports the figures the budgets are
about: API-ready time, boot time from the boot-timer device, and memory beyond
guest RAM.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

BOOT_TIME_PATTERN = re.compile(r"Guest-boot-time = (\d+) us")
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1"
_CONSOLE_TAIL = 3000


class _UnixHttpConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class MicroVm:
    """One monitor process, its API socket and serial console, in `workdir`.

    Calls raise AssertionError with the console and log tails when the guest or
    the monitor does not do what the call waits for.
    """

    def __init__(self, workdir: Path, command: list[str] | None = None,
                 extra_args: tuple[str, ...] = ("--boot-timer",)) -> None:
        self.workdir = workdir
        self.socket_path = str(workdir / "api.sock")
        self.log_path = workdir / "monitor.log"
        self.metrics_path = workdir / "metrics.json"
        self.log_path.touch()
        self.metrics_path.touch()
        self.mem_size_mib = 0
        base = command or [sys.executable, "-m", "vmm"]
        args = [*base[1:], "--api-sock", self.socket_path, "--log-path", str(self.log_path),
                "--level", "Info", "--metrics-path", str(self.metrics_path), *extra_args]
        self.spawned_at = time.monotonic()
        self.console = pexpect.spawn(base[0], args, cwd=str(workdir), timeout=None,
                                     encoding="utf-8", codec_errors="replace",
                                     maxread=65536, dimensions=(50, 200))
        self.console.delaybeforesend = None
        self.api_ready_s = self._wait_for_api(20.0)

    # API -------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        """Send one API request; return the status and the decoded JSON body (or None)."""
        connection = _UnixHttpConnection(self.socket_path, 30.0)
        try:
            payload = None if body is None else json.dumps(body)
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            connection.request(method, path, payload, headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        return response.status, json.loads(raw) if raw else None

    def put(self, path: str, body: object) -> None:
        """PUT `body` to `path` and assert the monitor accepted it (204)."""
        status, reply = self.request("PUT", path, body)
        assert status == 204, f"PUT {path} -> {status}: {reply}"

    def _wait_for_api(self, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.console.isalive():
            if os.path.exists(self.socket_path):
                try:
                    if self.request("GET", "/")[0] == 200:
                        return time.monotonic() - self.spawned_at
                except OSError:
                    pass
            time.sleep(0.005)
        raise AssertionError(f"API not ready after {timeout_s} s; log:\n{self._log_tail()}")

    # Set-up and boot -------------------------------------------------------------------------

    def configure(self, kernel: Path, rootfs: Path | None = None,
                  boot_args: str = DEFAULT_BOOT_ARGS, vcpu_count: int = 1,
                  mem_size_mib: int = 128, devices: dict[str, object] | None = None) -> None:
        """Set machine, boot source, root drive and extra devices (API path -> body)."""
        self.mem_size_mib = mem_size_mib
        self.put("/machine-config", {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib})
        self.put("/boot-source", {"kernel_image_path": str(kernel), "boot_args": boot_args})
        if rootfs is not None:
            self.put("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(rootfs),
                                        "is_root_device": True, "is_read_only": False})
        for path, body in (devices or {}).items():
            self.put(path, body)

    def start(self) -> float:
        """Send InstanceStart; return the monotonic time just before the request."""
        started = time.monotonic()
        self.put("/actions", {"action_type": "InstanceStart"})
        return started

    # Console and SSH -------------------------------------------------------------------------

    def expect(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """Wait for regular expression `pattern` on the serial console."""
        try:
            self.console.expect(pattern, timeout=timeout_s)
        except (pexpect.TIMEOUT, pexpect.EOF) as error:
            kind = "timed out" if isinstance(error, pexpect.TIMEOUT) else "console closed"
            tail = (self.console.before or "")[-_CONSOLE_TAIL:]
            raise AssertionError(f"{kind} waiting {timeout_s} s for {pattern!r}; console:\n"
                                 f"{tail}\nlog:\n{self._log_tail()}") from None
        match = self.console.match
        assert isinstance(match, re.Match)
        return match

    def login_serial(self, user: str = "root", password: str = "root",
                     prompt: str = "# ", timeout_s: float = 60.0) -> None:
        """Answer `login:` and `Password:` on the console and wait for `prompt`."""
        self.prompt = prompt
        self.expect("login: ", timeout_s)
        self.console.sendline(user)
        self.expect("Password: ", timeout_s)
        self.console.sendline(password)
        self.expect(re.escape(prompt), timeout_s)

    def run(self, command: str, timeout_s: float = 30.0) -> str:
        """Run one shell command over serial after login_serial; return its output."""
        self.console.sendline(command)
        self.expect(re.escape(self.prompt), timeout_s)
        output = (self.console.before or "").replace("\r\n", "\n")
        return output.partition("\n")[2].rstrip("\n")

    def ssh(self, host: str, user: str = "root", password: str = "root") -> Any:
        """Return a connected paramiko SSHClient; the caller closes it."""
        import paramiko

        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        client.connect(host, username=user, password=password, timeout=30,
                       allow_agent=False, look_for_keys=False)
        return client

    # Figures ---------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Flush the metrics and return the last JSON line of the metrics file."""
        self.put("/actions", {"action_type": "FlushMetrics"})
        lines = self.metrics_path.read_text().strip().splitlines()
        assert lines, f"metrics file {self.metrics_path} is empty after FlushMetrics"
        loaded: dict[str, Any] = json.loads(lines[-1])
        return loaded

    def boot_time_us(self, timeout_s: float = 60.0) -> int:
        """Return the first Guest-boot-time the monitor logged, waiting for it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = BOOT_TIME_PATTERN.search(self.log_path.read_text(errors="replace"))
            if found:
                return int(found[1])
            time.sleep(0.05)
        raise AssertionError(f"no Guest-boot-time in the log; log:\n{self._log_tail()}")

    def rss_beyond_guest_kib(self) -> int:
        """Return the RSS of every mapping except guest RAM (the mapping of its size), in KiB."""
        guest_bytes = self.mem_size_mib << 20
        total = 0
        skip = False
        with open(f"/proc/{self.console.pid}/smaps", encoding="ascii") as smaps:
            for line in smaps:
                fields = line.split()
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    start, end = (int(part, 16) for part in fields[0].split("-"))
                    skip = end - start == guest_bytes
                elif fields[0] == "Rss:" and not skip:
                    total += int(fields[1])
        return total

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-_CONSOLE_TAIL:]

    def kill(self) -> None:
        """End the monitor process and close the console."""
        if self.console.isalive():
            self.console.terminate(force=True)
        self.console.close()


class MicroVmFactory:
    """Builds MicroVm objects under one directory and kills them all at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vms: list[MicroVm] = []

    def build(self, kernel: Path, rootfs: Path | None = None, **configure: Any) -> MicroVm:
        """Start a monitor and configure it (see MicroVm.configure); it is not booted yet."""
        workdir = self.root / f"vm{len(self.vms)}"
        workdir.mkdir()
        vm = MicroVm(workdir)
        self.vms.append(vm)
        vm.configure(kernel, rootfs, **configure)
        return vm

    def kill_all(self) -> None:
        for vm in self.vms:
            vm.kill()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("microvm", "microVMs booted by the vmm monitor")
    group.addoption("--microvm-kernel", help="guest kernel (vmlinux or bzImage) for `microvm`")
    group.addoption("--microvm-rootfs", help="root file system image for `microvm`")


@pytest.fixture
def microvm_factory(tmp_path: Path) -> Iterator[MicroVmFactory]:
    """Return a factory of microVMs that are killed when the test ends."""
    factory = MicroVmFactory(tmp_path)
    yield factory
    factory.kill_all()


@pytest.fixture
def microvm(request: pytest.FixtureRequest, microvm_factory: MicroVmFactory) -> MicroVm:
    """Return a microVM booted from --microvm-kernel and --microvm-rootfs."""
    kernel = request.config.getoption("--microvm-kernel")
    if not kernel:
        pytest.skip("no --microvm-kernel given")
    rootfs = request.config.getoption("--microvm-rootfs")
    vm = microvm_factory.build(Path(kernel), Path(rootfs) if rootfs else None)
    vm.start()
    return vm


__all__: list[str] = ["MicroVm", "MicroVmFactory", "microvm", "microvm_factory"]
