"""End to end through the monitor process: API, builder, vCPU thread, serial and i8042.

A tiny kernel prints a line on COM1 and pulses the i8042 reset line; the
monitor must show the line on its console and exit 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.microvm import Monitor
from tests.kvm.tiny_kernels import serial_message_then_reset, write_elf

pytestmark = pytest.mark.kvm

MESSAGE = b"hello from the tiny kernel\r\n"


def start_tiny_kernel(monitor: Monitor, kernel: Path, vcpu_count: int = 1) -> None:
    api = monitor.api
    status, body = api.put("/machine-config", {"vcpu_count": vcpu_count, "mem_size_mib": 32})
    assert status == 204, body
    status, body = api.put("/boot-source", {"kernel_image_path": str(kernel)})
    assert status == 204, body
    status, body = api.put("/actions", {"action_type": "InstanceStart"})
    assert status == 204, body


def test_tiny_kernel_prints_and_reset_exits_zero(tmp_path: Path) -> None:
    kernel = write_elf(tmp_path / "tiny.elf", serial_message_then_reset(MESSAGE))
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        start_tiny_kernel(monitor, kernel)
        monitor.expect("hello from the tiny kernel", 60)
        assert monitor.wait_exit(60) == 0
        log = monitor.read_log()
        assert "the guest reset the machine" in log
    finally:
        monitor.terminate()


def test_tiny_kernel_with_two_vcpus(tmp_path: Path) -> None:
    kernel = write_elf(tmp_path / "tiny.elf", serial_message_then_reset(MESSAGE))
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        start_tiny_kernel(monitor, kernel, vcpu_count=2)
        monitor.expect("hello from the tiny kernel", 60)
        assert monitor.wait_exit(60) == 0
    finally:
        monitor.terminate()


def test_missing_kernel_is_400_naming_path(tmp_path: Path) -> None:
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        missing = str(tmp_path / "no-such-vmlinux")
        status, body = monitor.api.put("/boot-source", {"kernel_image_path": missing})
        assert status == 400
        assert missing in body["fault_message"]
        assert monitor.api.get("/")[0] == 200
    finally:
        monitor.terminate()


def test_failed_start_releases_everything(tmp_path: Path) -> None:
    """InstanceStart that fails late (a kernel that is not ELF) leaves no fd or socket behind.

    The kernel is loaded after every device is created, so the failure has to undo all
    of them.
    """
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"garbage" * 100)
    drive = tmp_path / "disk.img"
    drive.write_bytes(bytes(1 << 20))
    vsock_path = tmp_path / "v.sock"
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        api = monitor.api
        assert api.put("/boot-source", {"kernel_image_path": str(kernel)})[0] == 204
        body = {"drive_id": "d", "path_on_host": str(drive), "is_root_device": False}
        assert api.put("/drives/d", body)[0] == 204
        assert api.put("/vsock", {"guest_cid": 3, "uds_path": str(vsock_path)})[0] == 204
        fds_before = len(os.listdir(f"/proc/{monitor.process.pid}/fd"))

        status, body = api.put("/actions", {"action_type": "InstanceStart"})

        assert status == 400
        assert str(kernel) in body["fault_message"]
        assert not vsock_path.exists()
        assert len(os.listdir(f"/proc/{monitor.process.pid}/fd")) == fds_before
        assert api.get("/")[0] == 200
    finally:
        monitor.terminate()
