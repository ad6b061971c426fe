"""PATCH /vm, FlushMetrics and PUT /metrics against a monitor process running a tiny kernel.

The ticking kernel writes a dot to COM1 after every busy-wait loop, so console output
shows whether the guest runs. Pausing must stop the dots and resuming must bring them
back; the monitor must answer the API throughout.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pexpect
import pytest

from tests.integration.microvm import Monitor
from tests.kvm.tiny_kernels import write_elf

pytestmark = pytest.mark.kvm

COM1_PORT = 0x3F8
# Iterations of the busy wait between two dots: about 30 ms per dot on a host whose KVM
# emulates guest supervisor code, well under 1 ms with hardware virtualisation.
TICK_LOOP_COUNT = 20_000


def ticking_kernel() -> bytes:
    """Code that writes '.' to COM1 forever, with a LOOP busy wait between dots."""
    code = (
        b"\x66\xba" + struct.pack("<H", COM1_PORT)        # mov dx, COM1
        + b"\xb0\x2e"                                     # 1: mov al, '.'
        + b"\xee"                                         # out dx, al
        + b"\xb9" + struct.pack("<I", TICK_LOOP_COUNT)    # mov ecx, count
        + b"\xe2\xfe"                                     # 2: loop 2b
    )
    back_to_label_1 = 4 - (len(code) + 2)
    return code + b"\xeb" + struct.pack("<b", back_to_label_1)   # jmp 1b


def idle_kernel() -> bytes:
    """Code that halts with interrupts off forever: the in-kernel LAPIC keeps it asleep."""
    return b"\xfa\xf4\xeb\xfd"                            # cli; 1: hlt; jmp 1b


def boot(monitor: Monitor, kernel: Path) -> None:
    api = monitor.api
    assert api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})[0] == 204
    assert api.put("/boot-source", {"kernel_image_path": str(kernel)})[0] == 204
    status, body = api.put("/actions", {"action_type": "InstanceStart"})
    assert status == 204, body


def read_console(monitor: Monitor, seconds: float) -> str:
    """Return what the console prints during the next `seconds`."""
    deadline = time.monotonic() + seconds
    output = ""
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            output += monitor.process.read_nonblocking(65536, timeout=remaining)
        except pexpect.TIMEOUT:
            break
    return output


def patch_vm(monitor: Monitor, state: str) -> tuple[int, object]:
    return monitor.api.request("PATCH", "/vm", {"state": state})


def test_pause_stops_guest_and_resume_continues(tmp_path: Path) -> None:
    kernel = write_elf(tmp_path / "tick.elf", ticking_kernel())
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        boot(monitor, kernel)
        monitor.expect(r"\.{5}", 60)

        assert patch_vm(monitor, "Paused") == (204, None)
        status, info = monitor.api.get("/")
        assert status == 200
        assert isinstance(info, dict) and info["state"] == "Paused"
        read_console(monitor, 0.3)  # dots already on their way before the pause
        assert read_console(monitor, 1.5) == ""

        assert patch_vm(monitor, "Paused") == (204, None)  # pausing again is allowed
        assert patch_vm(monitor, "Resumed") == (204, None)
        status, info = monitor.api.get("/")
        assert isinstance(info, dict) and info["state"] == "Running"
        monitor.expect(r"\.{5}", 30)
    finally:
        monitor.terminate()


def metrics_lines(monitor: Monitor) -> list[dict]:
    text = monitor.metrics_path.read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_flush_metrics_writes_a_line(tmp_path: Path) -> None:
    kernel = write_elf(tmp_path / "idle.elf", idle_kernel())
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        boot(monitor, kernel)
        before = metrics_lines(monitor)
        assert len(before) == 1  # the line written at InstanceStart
        for _ in range(3):
            assert monitor.api.get("/")[0] == 200
        status, body = monitor.api.put("/actions", {"action_type": "FlushMetrics"})
        assert status == 204, body
        after = metrics_lines(monitor)
        assert len(after) == 2
        line = after[-1]
        assert line["utc_timestamp_ms"] >= before[0]["utc_timestamp_ms"]
        for group in ("api_server", "block", "net", "vcpu", "vmm", "uart", "i8042",
                      "latencies_us", "signals", "seccomp", "mmds", "logger",
                      "put_api_requests", "get_api_requests", "emulation"):
            assert group in line, group
        # Counters are increases since the previous line: the three GET / requests.
        assert line["get_api_requests"]["instance_info_count"] == 3
        assert line["put_api_requests"]["actions_count"] == 1
    finally:
        monitor.terminate()


def test_put_metrics_fifo_then_flush(tmp_path: Path) -> None:
    """PUT /metrics on a named pipe without a reader must not block the API."""
    import os

    kernel = write_elf(tmp_path / "idle.elf", idle_kernel())
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    monitor = Monitor(tmp_path, "--metrics-path", "")
    try:
        monitor.wait_for_api()
        status, body = monitor.api.put("/metrics", {"metrics_path": str(fifo)})
        assert status == 204, body
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            boot(monitor, kernel)
            assert monitor.api.put("/actions", {"action_type": "FlushMetrics"})[0] == 204
            data = os.read(reader, 1 << 20).decode()
        finally:
            os.close(reader)
        lines = [json.loads(line) for line in data.splitlines()]
        assert len(lines) == 2
        assert lines[-1]["put_api_requests"]["metrics_count"] == 0
        assert lines[0]["put_api_requests"]["metrics_count"] == 1
    finally:
        monitor.terminate()
