"""Regressions from feeding bad input to a running monitor.

Each case once returned 500 with a Python exception, or named no value. Expected: a 400
whose fault_message names the field and the rule, and the monitor still serves GET /.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.microvm import REPO_ROOT, ApiClient, Monitor
from tests.kvm.tiny_kernels import serial_message_then_reset, write_elf

pytestmark = pytest.mark.kvm

JMP_SELF = b"\xeb\xfe"
# More than the monitor may map under ADDRESS_SPACE_LIMIT, so the guest RAM mmap fails.
UNMAPPABLE_MEM_SIZE_MIB = 8192
ADDRESS_SPACE_LIMIT = 4 << 30
# Monitors started at once, each with a guest that resets at its first instructions.
RACING_MONITORS = 12


def start_with_boot_args(monitor: Monitor, kernel: Path, boot_args: str) -> tuple[int, dict]:
    api = monitor.api
    assert api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})[0] == 204
    body = {"kernel_image_path": str(kernel), "boot_args": boot_args}
    assert api.put("/boot-source", body)[0] == 204
    status, response = api.put("/actions", {"action_type": "InstanceStart"})
    assert isinstance(response, dict)
    return status, response


@pytest.mark.parametrize(
    ("boot_args", "rule"),
    [
        ("a" * 2048, "the maximum is 2047"),
        ("console=ttyS0 \u00e9", "non-ASCII character"),
        ("console=ttyS0\0", "contains a NUL"),
    ],
    ids=["too-long", "non-ascii", "nul"],
)
def test_bad_boot_args_are_400(
    tmp_path: Path, boot_args: str, rule: str
) -> None:
    kernel = write_elf(tmp_path / "tiny.elf", JMP_SELF)
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        status, body = start_with_boot_args(monitor, kernel, boot_args)
        assert status == 400, body
        assert "boot_args" in body["fault_message"]
        assert rule in body["fault_message"]
        status, info = monitor.api.get("/")
        assert status == 200
        assert isinstance(info, dict) and info["state"] == "Not started"
    finally:
        monitor.terminate()


@pytest.mark.parametrize("route", ["/boot-source", "/drives/d"])
def test_nul_in_host_path_is_400(tmp_path: Path, route: str) -> None:
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        if route == "/boot-source":
            body: dict = {"kernel_image_path": "vmlinux\0x"}
        else:
            body = {"drive_id": "d", "path_on_host": "disk\0x", "is_root_device": False}
        status, response = monitor.api.put(route, body)
        assert status == 400, response
        assert isinstance(response, dict)
        assert "contains a NUL byte" in response["fault_message"]
        assert monitor.api.get("/")[0] == 200
    finally:
        monitor.terminate()


def test_guest_memory_that_cannot_be_mapped_is_400_naming_mem_size(tmp_path: Path) -> None:
    kernel = write_elf(tmp_path / "tiny.elf", JMP_SELF)
    socket_path = str(tmp_path / "api.sock")
    process = subprocess.Popen(
        ["prlimit", f"--as={ADDRESS_SPACE_LIMIT}", sys.executable, "-m", "vmm",
         "--api-sock", socket_path, "--level", "Off"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    api = ApiClient(socket_path)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(socket_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        config = {"vcpu_count": 1, "mem_size_mib": UNMAPPABLE_MEM_SIZE_MIB}
        assert api.put("/machine-config", config)[0] == 204
        assert api.put("/boot-source", {"kernel_image_path": str(kernel)})[0] == 204
        status, body = api.put("/actions", {"action_type": "InstanceStart"})
        assert status == 400, body
        assert isinstance(body, dict)
        assert f"mem_size_mib: cannot map {UNMAPPABLE_MEM_SIZE_MIB} MiB" in body["fault_message"]
        assert api.get("/")[0] == 200
    finally:
        api.close()
        process.kill()
        process.wait()


def test_instance_start_survives_a_guest_that_resets_at_once(tmp_path: Path) -> None:
    """Check that InstanceStart returns 204 when the guest resets before the handler returns.

    The main thread then closes the machine while the API thread is still in start(). The
    handler once wrote to the closed event-loop eventfd and returned 500 (EBADF). The window
    is narrow, so 12 monitors start at once to widen it (fails every run without the fix).
    """
    kernel = write_elf(tmp_path / "reset.elf", serial_message_then_reset(b"x"))
    results: list[tuple[int, object, int]] = []

    def run_one(index: int) -> None:
        workdir = tmp_path / f"m{index}"
        workdir.mkdir()
        monitor = Monitor(workdir)
        try:
            monitor.wait_for_api()
            api = monitor.api
            api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 32})
            api.put("/boot-source", {"kernel_image_path": str(kernel)})
            status, body = api.put("/actions", {"action_type": "InstanceStart"})
            results.append((status, body, monitor.wait_exit(60)))
        finally:
            monitor.terminate()

    threads = [threading.Thread(target=run_one, args=(i,)) for i in range(RACING_MONITORS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == RACING_MONITORS
    for status, body, exit_code in results:
        assert status == 204, body
        assert exit_code == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_stop_signal_with_running_guest_exits_zero(tmp_path: Path, signum: int) -> None:
    """SIGTERM or SIGINT once ended the monitor with 143 or a KeyboardInterrupt traceback."""
    kernel = write_elf(tmp_path / "spin.elf", JMP_SELF)
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        api = monitor.api
        assert api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 32})[0] == 204
        assert api.put("/boot-source", {"kernel_image_path": str(kernel)})[0] == 204
        assert api.put("/actions", {"action_type": "InstanceStart"})[0] == 204
        monitor.process.kill(signum)
        assert monitor.wait_exit(30) == 0
        log = monitor.read_log()
        assert "stop requested" in log
        assert "Traceback" not in log
    finally:
        monitor.terminate()
