"""Boot the project's Linux guest kernel through the API and check what it did.

One boot is shared by the checks of this module because a Linux boot takes
about a minute on a host whose KVM emulates guest supervisor code. The guest
has the root file system on its first drive (read-write) and a second,
read-only drive. On such a host the kernel hands over to init, init dies on
its first system call, the kernel panics and, with ``panic=1 reboot=k``,
resets through the i8042; the monitor then exits 0. On a host with hardware
virtualisation the user-space test logs in on the serial console instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import HOST_KIND
from tests.integration.microvm import Monitor
from vmm.arch.x86_64.emulation import HostKind

pytestmark = [pytest.mark.kvm, pytest.mark.boot]

MEM_SIZE_MIB = 128
SCRATCH_SECTORS = 4096
# Budgets for the time from InstanceStart to the kernel starting init.
EMULATING_HOST_BOOT_TIMEOUT_S = 400
HARDWARE_HOST_BOOT_TIMEOUT_S = 30
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"


@pytest.fixture(scope="session")
def guest_images() -> dict[str, str]:
    """Build (or reuse from the cache) the guest kernel and root file system."""
    from images import build_paths

    return build_paths()


@dataclass
class BootRecord:
    monitor: Monitor
    rootfs: Path
    scratch: Path
    instance_start: float = 0.0
    seconds_to_init: float = 0.0
    console: str = ""
    exit_code: int | None = None
    log: str = ""
    rss_beyond_guest_kib: int = 0
    api_ready_s: float = 0.0
    figures: dict[str, object] = field(default_factory=dict)


def configure_and_start(monitor: Monitor, kernel: str, rootfs: Path, scratch: Path) -> float:
    api = monitor.api
    assert api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_SIZE_MIB})[0] == 204
    status, body = api.put(
        "/boot-source", {"kernel_image_path": kernel, "boot_args": BOOT_ARGS}
    )
    assert status == 204, body
    root = {
        "drive_id": "rootfs",
        "path_on_host": str(rootfs),
        "is_root_device": True,
        "is_read_only": False,
    }
    assert api.put("/drives/rootfs", root)[0] == 204
    extra = {
        "drive_id": "scratch",
        "path_on_host": str(scratch),
        "is_root_device": False,
        "is_read_only": True,
    }
    assert api.put("/drives/scratch", extra)[0] == 204
    began = time.monotonic()
    status, body = api.put("/actions", {"action_type": "InstanceStart"})
    assert status == 204, body
    return began


@pytest.fixture(scope="module")
def booted(guest_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """Boot once to the hand-over to init (and, here, to the reset that follows)."""
    workdir = tmp_path_factory.mktemp("linux-boot")
    rootfs = workdir / "rootfs.ext4"
    shutil.copyfile(guest_images["rootfs"], rootfs)
    scratch = workdir / "scratch.img"
    scratch.write_bytes(b"read-only drive\n".ljust(SCRATCH_SECTORS * 512, b"\0"))
    monitor = Monitor(workdir, "--boot-timer")
    record = BootRecord(monitor, rootfs, scratch)
    try:
        record.api_ready_s = monitor.wait_for_api()
        record.instance_start = configure_and_start(
            monitor, guest_images["kernel"], rootfs, scratch
        )
        timeout = (
            EMULATING_HOST_BOOT_TIMEOUT_S
            if HOST_KIND is HostKind.EMULATING
            else HARDWARE_HOST_BOOT_TIMEOUT_S
        )
        monitor.expect(r"Run /sbin/init as init process", timeout)
        record.seconds_to_init = time.monotonic() - record.instance_start
        record.console = monitor.process.before or ""
        record.rss_beyond_guest_kib = monitor.rss_beyond_guest_kib(MEM_SIZE_MIB << 20)
        if HOST_KIND is HostKind.EMULATING:
            monitor.expect(r"Attempted to kill init", 60)
            record.console += monitor.process.before or ""
            record.exit_code = monitor.wait_exit(60)
        record.log = monitor.read_log()
        yield record
    finally:
        monitor.terminate()


def test_both_virtio_disks_found_with_sizes(booted: BootRecord) -> None:
    root_sectors = booted.rootfs.stat().st_size // 512
    assert re.search(rf"\[vda\] {root_sectors} 512-byte logical blocks", booted.console)
    assert re.search(rf"\[vdb\] {SCRATCH_SECTORS} 512-byte logical blocks", booted.console)


def test_ext4_root_mounted_read_write(booted: BootRecord) -> None:
    assert re.search(r"EXT4-fs \(vda\): mounted filesystem", booted.console)
    assert "VFS: Mounted root (ext4 filesystem) on device" in booted.console
    assert not re.search(r"Mounted root \(ext4 filesystem\) readonly", booted.console)


def test_kernel_hands_over_to_init(booted: BootRecord, figures: dict[str, object]) -> None:
    assert booted.seconds_to_init > 0
    figures["instance_start_to_run_init_s"] = round(booted.seconds_to_init, 2)
    figures["api_ready_s_wall"] = round(booted.api_ready_s, 3)
    figures["rss_beyond_guest_memory_kib"] = booted.rss_beyond_guest_kib


@pytest.mark.skipif(HOST_KIND is not HostKind.EMULATING, reason="only on emulating hosts")
def test_emulating_host_reports_and_exits_zero(
    booted: BootRecord, figures: dict[str, object]
) -> None:
    assert booted.exit_code == 0, booted.log[-3000:]
    assert "guest user space cannot run" in booted.log
    summary = re.search(
        r"vcpu exits: (?P<exits>.*) \(total (?P<total>\d+)\); emulation fallbacks: "
        r"fwait=(?P<fwait>\d+) int3=(?P<int3>\d+)",
        booted.log,
    )
    assert summary, booted.log[-3000:]
    assert int(summary["int3"]) >= 1  # int3_selftest() runs on every 6.1 boot
    figures["vcpu_exits"] = int(summary["total"])
    figures["fwait_completed"] = int(summary["fwait"])
    figures["int3_delivered"] = int(summary["int3"])


def test_metrics_file_has_emulation_counters(booted: BootRecord) -> None:
    lines = [json.loads(line) for line in booted.monitor.metrics_path.read_text().splitlines()]
    assert lines, "no metrics lines written"
    last = lines[-1]
    assert "vcpu" in last
    if HOST_KIND is HostKind.EMULATING:
        assert last["emulation"]["int3_delivered"] >= 1


@pytest.mark.hardware_virt
def test_login_and_commands_on_serial_console(
    guest_images: dict[str, str], tmp_path: Path, figures: dict[str, object]
) -> None:
    """Log in as root, run commands, use both drives, and reboot: needs guest user space."""
    rootfs = tmp_path / "rootfs.ext4"
    shutil.copyfile(guest_images["rootfs"], rootfs)
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(b"read-only drive\n".ljust(SCRATCH_SECTORS * 512, b"\0"))
    monitor = Monitor(tmp_path, "--boot-timer")
    try:
        monitor.wait_for_api()
        began = configure_and_start(monitor, guest_images["kernel"], rootfs, scratch)
        monitor.expect("login:", HARDWARE_HOST_BOOT_TIMEOUT_S)
        figures["instance_start_to_login_prompt_s"] = round(time.monotonic() - began, 3)
        monitor.process.sendline("root")
        monitor.expect("Password:", 10)
        monitor.process.sendline("root")
        monitor.expect(r"# ", 10)
        monitor.process.sendline("uname -r")
        monitor.expect(r"6\.1\.\d+", 10)
        monitor.process.sendline("cat /proc/cmdline")
        monitor.expect(r"root=/dev/vda rw", 10)
        monitor.process.sendline("echo written-by-test > /root/probe.txt && sync && cat /root/probe.txt")
        monitor.expect(r"\r\nwritten-by-test", 10)
        monitor.process.sendline("head -c 15 /dev/vdb; echo")
        monitor.expect(r"read-only drive", 10)
        monitor.process.sendline("echo x > /dev/vdb || echo write-$((1 + 1))-rejected")
        # The echoed command line shows the unexpanded "$((1 + 1))", so only the shell's
        # output of the failed write's fallback can match.
        monitor.expect(r"write-2-rejected", 10)
        monitor.process.sendline("reboot")
        assert monitor.wait_exit(30) == 0
        boot_ms = re.search(r"Guest-boot-time\s*=\s*(\d+)\s*us\s*(\d+)\s*ms", monitor.read_log())
        assert boot_ms, "boot timer never fired"
        figures["boot_timer_ms"] = int(boot_ms[2])
    finally:
        monitor.terminate()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_configures_monitor(tmp_path: Path, guest_images: dict[str, str]) -> None:
    """A stock HTTP client (curl over the Unix socket) can configure the monitor."""
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        result = subprocess.run(
            [
                "curl", "-sS", "--unix-socket", monitor.socket_path, "-X", "PUT",
                "-H", "Content-Type: application/json",
                "-d", json.dumps({"kernel_image_path": guest_images["kernel"]}),
                "-w", "%{http_code}", "http://localhost/boot-source",
            ],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert result.stdout.strip() == "204", result.stderr
        status, config = monitor.api.get("/vm/config")
        assert status == 200
        assert config["boot-source"]["kernel_image_path"] == guest_images["kernel"]
    finally:
        monitor.terminate()
    assert os.path.exists(guest_images["kernel"])


def test_send_ctrl_alt_del_resets_guest(
    guest_images: dict[str, str], tmp_path: Path, figures: dict[str, object]
) -> None:
    """SendCtrlAltDel reaches the guest's AT keyboard driver and ends in a reset, exit 0.

    Before init runs, Linux restarts at once on Ctrl-Alt-Del; once busybox init has
    turned that off, init runs its ctrlaltdel action (reboot). Both end in an i8042
    reset, so the test holds on either kind of host.
    """
    rootfs = tmp_path / "rootfs.ext4"
    shutil.copyfile(guest_images["rootfs"], rootfs)
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(bytes(SCRATCH_SECTORS * 512))
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        configure_and_start(monitor, guest_images["kernel"], rootfs, scratch)
        timeout = (
            EMULATING_HOST_BOOT_TIMEOUT_S
            if HOST_KIND is HostKind.EMULATING
            else HARDWARE_HOST_BOOT_TIMEOUT_S
        )
        monitor.expect(r"input: AT Translated Set 2 keyboard", timeout)
        sent = time.monotonic()
        status, body = monitor.api.put("/actions", {"action_type": "SendCtrlAltDel"})
        assert status == 204, body
        assert monitor.wait_exit(120) == 0
        figures["ctrl_alt_del_to_exit_s"] = round(time.monotonic() - sent, 2)
        assert "the guest reset the machine" in monitor.read_log()
    finally:
        monitor.terminate()
