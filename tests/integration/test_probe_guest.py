"""The probe guest booted by the monitor: serial login, shell commands and real back ends.

The probe (images/probe) is a freestanding 64-bit kernel with polled virtio drivers. It
stays in supervisor mode, so it runs on hosts whose KVM cannot run guest user space. One
booted probe serves every test that does not end the VM; the reboot test boots its own
with two vCPUs.
"""

from __future__ import annotations

import re
import socket
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
GUEST_CID = 3
BALLOON_START_MIB = 4
PAGES_PER_MIB = 256
VSOCK_HOST_PORT = 5005
VSOCK_GUEST_PORT = 6006


@dataclass
class ProbeVm:
    """A booted, logged-in probe, its drive files and what the login printed."""

    monitor: Monitor
    rw_drive: Path
    ro_drive: Path
    vsock_path: Path
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


def start_probe(monitor: Monitor, vcpu_count: int, drives: list[dict[str, object]],
                devices: dict[str, dict[str, object]] | None = None) -> float:
    """Configure and start a probe VM; return the seconds from InstanceStart to `login:`.

    `devices` maps API paths such as "/entropy" to the body PUT there before the start.
    """
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
    for path, device_body in (devices or {}).items():
        status, body = api.put(path, device_body)
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
    vsock_path = workdir / "vsock.sock"
    monitor = Monitor(workdir, "--boot-timer")
    devices: dict[str, dict[str, object]] = {
        "/entropy": {},
        "/balloon": {"amount_mib": BALLOON_START_MIB, "deflate_on_oom": False},
        "/vsock": {"guest_cid": GUEST_CID, "uds_path": str(vsock_path)},
    }
    try:
        boot_s = start_probe(monitor, 1, [
            drive("scratch", rw_drive, read_only=False, cache_type="Writeback"),
            drive("readonly", ro_drive, read_only=True, cache_type="Unsafe"),
        ], devices)
        vm = ProbeVm(monitor, rw_drive, ro_drive, vsock_path, boot_s)
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
    assert "discovery cmdline=5 acpi=5 agree" in output
    lines = device_lines(output)
    assert set(lines) == {"blk0", "blk1", "rng0", "balloon0", "vsock0"}
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


def test_rng_returns_fresh_bytes(probe: ProbeVm, figures: dict[str, object]) -> None:
    first = probe.run("rng 64").splitlines()
    figures["rng_s"] = round(probe.command_times["rng"], 4)
    second = probe.run("rng 64").splitlines()
    assert first[-1] == "rng 64 bytes"
    assert len(bytes.fromhex("".join(first[:-1]))) == 64
    assert first[:-1] != second[:-1]


def test_rng_count_out_of_range_is_error(probe: ProbeVm) -> None:
    output = probe.run("rng 5000")
    assert output.startswith("error:")
    assert "5000" in output


def free_pages(probe: ProbeVm) -> int:
    match = re.fullmatch(r"free (\d+) pages of \d+", probe.run("mem"))
    assert match, "mem output has the wrong form"
    return int(match.group(1))


def test_balloon_follows_target(probe: ProbeVm, figures: dict[str, object]) -> None:
    target = BALLOON_START_MIB * PAGES_PER_MIB
    before = free_pages(probe)
    assert probe.run("balloon") == f"balloon target {target} actual {target}"
    figures["balloon_inflate_s"] = round(probe.command_times["balloon"], 4)
    assert free_pages(probe) == before - target

    status, body = probe.monitor.api.request("PATCH", "/balloon", {"amount_mib": 0})
    assert status == 204, body
    assert probe.run("balloon") == "balloon target 0 actual 0"
    assert free_pages(probe) == before
    status, body = probe.monitor.api.get("/balloon")
    assert status == 200, body
    assert body["amount_mib"] == 0


def test_vsock_guest_connects_to_host(probe: ProbeVm, figures: dict[str, object]) -> None:
    listener_path = f"{probe.vsock_path}_{VSOCK_HOST_PORT}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(listener_path)
        listener.listen(1)
        listener.settimeout(COMMAND_TIMEOUT_S)
        output = probe.run(f"vsock connect {VSOCK_HOST_PORT}")
        figures["vsock_connect_s"] = round(probe.command_times["vsock"], 4)
        assert output.startswith(f"connected cid 2 port {VSOCK_HOST_PORT}")
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(COMMAND_TIMEOUT_S)
            assert probe.run("vsock send hello host") == "sent 11"
            assert connection.recv(64) == b"hello host\n"
            connection.sendall(b"hello guest")
            assert probe.run("vsock recv 5000") == "recv 11 hello guest"
            assert probe.run("vsock close").startswith("closed")
            assert connection.recv(64) == b""


def test_vsock_host_connects_to_guest(probe: ProbeVm) -> None:
    probe.monitor.process.sendline(f"vsock listen {VSOCK_GUEST_PORT} 20000")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(COMMAND_TIMEOUT_S)
        client.connect(str(probe.vsock_path))
        client.sendall(f"CONNECT {VSOCK_GUEST_PORT}\n".encode())
        probe.monitor.expect(r"accepted cid 2 port \d+", COMMAND_TIMEOUT_S)
        probe.monitor.expect(re.escape(PROMPT), COMMAND_TIMEOUT_S)
        assert client.recv(64).startswith(b"OK ")
        client.sendall(b"ping")
        assert probe.run("vsock recv 5000") == "recv 4 ping"
        assert probe.run("vsock send pong") == "sent 5"
        assert client.recv(64) == b"pong\n"
        assert probe.run("vsock close").startswith("closed")


def test_vsock_errors_name_what_failed(probe: ProbeVm) -> None:
    assert probe.run("vsock send nobody").startswith("error: vsock send: not connected")
    refused = probe.run("vsock connect 7777")
    assert refused.startswith("error: vsock connect to port 7777")
