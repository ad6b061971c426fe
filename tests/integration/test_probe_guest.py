"""The probe guest booted by the monitor: serial login, shell commands and real back ends.

The probe (images/probe) is a freestanding 64-bit kernel with polled virtio drivers. It
stays in supervisor mode, so it runs on hosts whose KVM cannot run guest user space. One
booted probe serves every test that does not end the VM; the reboot test boots its own
with two vCPUs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from images.probe_build import build_probe
from tests.integration.microvm import Monitor

pytestmark = pytest.mark.kvm

SECTOR_SIZE = 512
PROMPT = "probe# "
BOOT_BUDGET_S = 10.0
COMMAND_TIMEOUT_S = 30.0
RW_DRIVE_SECTORS = 2048
RO_DRIVE_SECTORS = 128
PRESET_SECTOR = 3
PRESET_PATTERN = bytes(range(256)) * 2
# virtio 1.2: VIRTIO_F_VERSION_1 is feature bit 32; VIRTIO_BLK_F_RO (5.2.3) is bit 5.
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9


@dataclass
class ProbeVm:
    """A booted, logged-in probe, its drive files and what the login printed."""

    monitor: Monitor
    rw_drive: Path
    ro_drive: Path
    boot_to_login_s: float
    rejected_login: str = ""
    accepted_login: str = ""
    command_times: dict[str, float] = field(default_factory=dict)

    def run(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        """Send one command line and return its output, without the echo and the prompt."""
        started = time.monotonic()
        self.monitor.process.sendline(command)
        self.monitor.expect(re.escape(PROMPT), timeout_s)
        self.command_times[command.split()[0]] = time.monotonic() - started
        output = (self.monitor.process.before or "").replace("\r\n", "\n")
        echo, _, rest = output.partition("\n")
        assert echo.strip() == command, f"echo {echo!r} is not the command {command!r}"
        return rest.rstrip("\n")


def start_probe(monitor: Monitor, vcpu_count: int, drives: list[dict[str, object]]) -> float:
    """Configure and start a probe VM; return the seconds from InstanceStart to `login:`."""
    monitor.wait_for_api()
    api = monitor.api
    status, body = api.put("/machine-config", {"vcpu_count": vcpu_count, "mem_size_mib": 64})
    assert status == 204, body
    status, body = api.put("/boot-source", {"kernel_image_path": str(build_probe()),
                                            "boot_args": "console=ttyS0"})
    assert status == 204, body
    for drive in drives:
        status, body = api.put(f"/drives/{drive['drive_id']}", drive)
        assert status == 204, body
    started = time.monotonic()
    status, body = api.put("/actions", {"action_type": "InstanceStart"})
    assert status == 204, body
    monitor.expect("login: ", BOOT_BUDGET_S * 3)
    return time.monotonic() - started


def log_in(monitor: Monitor, user: str, password: str, expected: str) -> str:
    """Answer `login:` and `Password:` and wait for `expected`; return what came between."""
    monitor.process.sendline(user)
    monitor.expect("Password: ", COMMAND_TIMEOUT_S)
    monitor.process.sendline(password)
    monitor.expect(expected, COMMAND_TIMEOUT_S)
    return monitor.process.before or ""


def drive(drive_id: str, path: Path, read_only: bool, cache_type: str) -> dict[str, object]:
    return {"drive_id": drive_id, "path_on_host": str(path), "is_root_device": False,
            "is_read_only": read_only, "cache_type": cache_type}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProbeVm]:
    workdir = tmp_path_factory.mktemp("probe")
    rw_drive = workdir / "rw.img"
    image = bytearray(RW_DRIVE_SECTORS * SECTOR_SIZE)
    image[PRESET_SECTOR * SECTOR_SIZE:(PRESET_SECTOR + 1) * SECTOR_SIZE] = PRESET_PATTERN
    rw_drive.write_bytes(bytes(image))
    ro_drive = workdir / "ro.img"
    ro_drive.write_bytes(bytes(RO_DRIVE_SECTORS * SECTOR_SIZE))
    monitor = Monitor(workdir, "--boot-timer")
    try:
        boot_s = start_probe(monitor, 1, [
            drive("scratch", rw_drive, read_only=False, cache_type="Writeback"),
            drive("readonly", ro_drive, read_only=True, cache_type="Unsafe"),
        ])
        vm = ProbeVm(monitor, rw_drive, ro_drive, boot_s)
        vm.rejected_login = log_in(monitor, "root", "wrong", "login: ")
        vm.accepted_login = log_in(monitor, "root", "root", re.escape(PROMPT))
        yield vm
    finally:
        monitor.terminate()


def device_lines(output: str) -> dict[str, str]:
    """Map each device name of `devices` output (blk0, net0, ...) to its line."""
    lines = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[0].isdigit():
            lines[fields[1]] = line
    return lines


def features_of(line: str) -> int:
    match = re.search(r"features=0x([0-9a-f]+)", line)
    assert match, f"no features= in {line!r}"
    return int(match.group(1), 16)


def test_boot_to_login_within_budget(probe: ProbeVm, figures: dict[str, object]) -> None:
    figures["boot_to_login_s"] = round(probe.boot_to_login_s, 3)
    assert probe.boot_to_login_s < BOOT_BUDGET_S
    log = probe.monitor.read_log()
    assert "Guest-boot-time" in log, "the probe did not write the boot-timer byte"


def test_login_rejects_wrong_password(probe: ProbeVm) -> None:
    assert "Login incorrect" in probe.rejected_login
    assert "wrong" not in probe.rejected_login, "the password was echoed"
    assert "Login incorrect" not in probe.accepted_login
    assert "root" not in probe.accepted_login, "the password was echoed"


def test_echo_uname_and_help(probe: ProbeVm, figures: dict[str, object]) -> None:
    assert probe.run("echo hello   probe world") == "hello   probe world"
    assert probe.run("uname").startswith("probe ")
    help_text = probe.run("help")
    for command in ("blk read", "net send", "vsock connect", "balloon", "exits", "reboot"):
        assert command in help_text
    figures["echo_s"] = round(probe.command_times["echo"], 4)


def test_unknown_command_is_an_error(probe: ProbeVm) -> None:
    output = probe.run("frobnicate now")
    assert output.startswith("error:")
    assert "frobnicate" in output


def test_devices_both_discovery_paths_agree(probe: ProbeVm,
                                            figures: dict[str, object]) -> None:
    output = probe.run("devices")
    figures["devices_s"] = round(probe.command_times["devices"], 4)
    assert "cpus 1" in output.splitlines()
    assert "discovery cmdline=2 acpi=2 agree" in output
    lines = device_lines(output)
    assert set(lines) == {"blk0", "blk1"}
    for name, line in lines.items():
        assert "found=cmdline+acpi" in line, name
        assert "irq-mismatch" not in line, name
        assert features_of(line) & VIRTIO_F_VERSION_1, name


def test_devices_show_capacity_and_mode(probe: ProbeVm) -> None:
    lines = device_lines(probe.run("devices"))
    assert f"sectors={RW_DRIVE_SECTORS} rw" in lines["blk0"]
    assert f"sectors={RO_DRIVE_SECTORS} ro" in lines["blk1"]
    assert features_of(lines["blk1"]) & VIRTIO_BLK_F_RO
    assert features_of(lines["blk0"]) & VIRTIO_BLK_F_FLUSH
    assert "mmio=0xc0001000 irq=5" in lines["blk0"]
    assert "mmio=0xc0002000 irq=6" in lines["blk1"]


def test_blk_write_lands_in_host_file(probe: ProbeVm, figures: dict[str, object]) -> None:
    sector = 17
    output = probe.run(f"blk write 0 {sector} written by the probe")
    figures["blk_write_s"] = round(probe.command_times["blk"], 4)
    assert output == "status ok"
    data = probe.rw_drive.read_bytes()[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE]
    text = b"written by the probe"
    assert data[:len(text)] == text
    assert data[len(text):] == bytes(SECTOR_SIZE - len(text))


def test_blk_read_returns_host_data(probe: ProbeVm, figures: dict[str, object]) -> None:
    output = probe.run(f"blk read 0 {PRESET_SECTOR}")
    figures["blk_read_s"] = round(probe.command_times["blk"], 4)
    lines = output.splitlines()
    assert lines[-1] == "status ok"
    assert len(lines) == 1 + SECTOR_SIZE // 32
    assert all(len(line) == 64 for line in lines[:-1])
    assert bytes.fromhex("".join(lines[:-1])) == PRESET_PATTERN


def test_blk_read_only_write_is_ioerr(probe: ProbeVm) -> None:
    assert probe.run("blk write 1 0 must not land") == "status ioerr"
    assert probe.ro_drive.read_bytes() == bytes(RO_DRIVE_SECTORS * SECTOR_SIZE)


def test_blk_read_past_end_is_ioerr(probe: ProbeVm) -> None:
    assert probe.run(f"blk read 1 {RO_DRIVE_SECTORS}") == "status ioerr"


def test_blk_id_and_flush(probe: ProbeVm) -> None:
    assert probe.run("blk id 0") == "id scratch\nstatus ok"
    assert probe.run("blk id 1") == "id readonly\nstatus ok"
    assert probe.run("blk flush 0") == "status ok"


def test_blk_errors_name_what_failed(probe: ProbeVm) -> None:
    missing = probe.run("blk read 7 0")
    assert missing.startswith("error:")
    assert "blk device 7" in missing
    invalid = probe.run("blk read 0 sector")
    assert invalid.startswith("error:")
    assert "'sector'" in invalid


def test_mem_reports_free_pages(probe: ProbeVm) -> None:
    match = re.fullmatch(r"free (\d+) pages of (\d+)", probe.run("mem"))
    assert match, "mem output has the wrong form"
    free, total = int(match.group(1)), int(match.group(2))
    assert 0 < free <= total
    # 64 MiB of RAM less the low megabyte and the probe image.
    assert 15_000 < total < 16_384


def test_exits_benchmark(probe: ProbeVm, figures: dict[str, object]) -> None:
    count = 2000
    output = probe.run(f"exits {count}")
    match = re.fullmatch(rf"exits {count} in (\d+) us", output)
    assert match, f"unexpected output {output!r}"
    figures["port_exit_us"] = round(int(match.group(1)) / count, 2)
    figures["exits_wall_s"] = round(probe.command_times["exits"], 4)


def test_two_vcpus_boot_and_reboot_exits_zero(tmp_path: Path,
                                              figures: dict[str, object]) -> None:
    monitor = Monitor(tmp_path)
    try:
        figures["boot_to_login_2_vcpus_s"] = round(start_probe(monitor, 2, []), 3)
        log_in(monitor, "root", "root", re.escape(PROMPT))
        monitor.process.sendline("devices")
        match = monitor.expect(r"cpus (\d+)", COMMAND_TIMEOUT_S)
        assert match.group(1) == "2"
        monitor.expect(re.escape(PROMPT), COMMAND_TIMEOUT_S)
        monitor.process.sendline("reboot")
        assert monitor.wait_exit(COMMAND_TIMEOUT_S) == 0
        assert "the guest reset the machine" in monitor.read_log()
    finally:
        monitor.terminate()
