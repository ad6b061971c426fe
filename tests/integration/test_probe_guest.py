"""The probe guest booted by the monitor: serial login, shell commands and real back ends.

The probe (images/probe) is a freestanding 64-bit kernel with polled virtio drivers. It
stays in supervisor mode, so it runs on hosts whose KVM cannot run guest user space. One
booted probe serves every test that does not end the VM; the reboot test boots its own
with two vCPUs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
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
# The network test's namespace: the tap's kernel side and the probe's addresses.
NAMESPACE_ADDRESS = "10.254.9.1"
PROBE_ADDRESS = "10.254.9.2"
PROBE_MAC = "aa:fc:00:00:00:02"
ETHERTYPE_ARP = 0x0806
ARP_REQUEST = 1
ARP_REPLY = 2


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
                devices: dict[str, dict[str, object]] | None = None,
                boot_args: str = "console=ttyS0") -> float:
    """Configure and start a probe VM; return the seconds from InstanceStart to `login:`.

    `devices` maps API paths such as "/entropy" to the body PUT there before the start.
    """
    monitor.wait_for_api()
    api = monitor.api
    status, body = api.put("/machine-config", {"vcpu_count": vcpu_count, "mem_size_mib": 64})
    assert status == 204, body
    status, body = api.put("/boot-source", {"kernel_image_path": str(build_probe()),
                                            "boot_args": boot_args})
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
    """Send `user` and `password` at the login prompts, wait for `expected` and return the
    output between the password and `expected`."""
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


def test_backspace_edits_the_line(probe: ProbeVm) -> None:
    monitor = probe.monitor
    monitor.process.send("echo abX\x7fc\bd\r")
    monitor.expect(re.escape(PROMPT), COMMAND_TIMEOUT_S)
    output = (monitor.process.before or "").replace("\r\n", "\n")
    assert output.splitlines()[-1] == "abd"


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of process `pid` from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_probe_costs_no_cpu(probe: ProbeVm, figures: dict[str, object]) -> None:
    idle_s = 2.0
    before = cpu_seconds(probe.monitor.process.pid)
    time.sleep(idle_s)
    used = cpu_seconds(probe.monitor.process.pid) - before
    figures["idle_cpu_fraction"] = round(used / idle_s, 4)
    # The probe waits in HLT for the serial interrupt: no polling, so no CPU.
    assert used < 0.1 * idle_s
    assert probe.run("echo awake") == "awake"


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
    # The command line names a device at an address where ACPI lists none.
    phantom = "virtio_mmio.device=4K@0xc0009000:12"
    monitor = Monitor(tmp_path)
    try:
        boot_s = start_probe(monitor, 2, [], boot_args=f"console=ttyS0 {phantom}")
        figures["boot_to_login_2_vcpus_s"] = round(boot_s, 3)
        log_in(monitor, "root", "root", re.escape(PROMPT))
        vm = ProbeVm(monitor, tmp_path, tmp_path, tmp_path, boot_s)
        output = vm.run("devices")
        lines = output.splitlines()
        assert lines[0] == "cpus 2"
        assert lines[1] == "discovery cmdline=1 acpi=0 disagree"
        assert "mmio=0xc0009000 irq=12" in lines[2]
        assert "found=cmdline-only" in lines[2]
        assert "error=" in lines[2]
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


def tap_unusable_reason() -> str | None:
    """Return why this test cannot make a namespace with a tap, or None when it can."""
    if os.geteuid() != 0:
        return "creating network namespaces and tap devices needs root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    return None


def ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def make_tap_namespace(
    namespace_prefix: str, tap_prefix: str, address: str
) -> Iterator[tuple[str, str]]:
    """Make a network namespace with a tap at `address`/24; yield (namespace, tap).

    Skips the test when namespaces or taps cannot be made; removes the namespace, and
    the tap with it, even when the test fails.
    """
    reason = tap_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    # Interface names have at most 15 characters (IFNAMSIZ 16 with the NUL).
    suffix = uuid.uuid4().hex[:6]
    namespace, tap = f"{namespace_prefix}{suffix}", f"{tap_prefix}{suffix}"
    ip("netns", "add", namespace)
    try:
        ip("-n", namespace, "tuntap", "add", "dev", tap, "mode", "tap")
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", tap)
        ip("-n", namespace, "link", "set", tap, "up")
        yield namespace, tap
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


@pytest.fixture
def tap_namespace() -> Iterator[tuple[str, str]]:
    """A network namespace with a tap at NAMESPACE_ADDRESS, as (namespace, tap)."""
    with make_tap_namespace("probetest-", "probetap", NAMESPACE_ADDRESS) as made:
        yield made


def arp_frame(operation: int, source_mac: bytes, source_ip: str, target_mac: bytes,
              target_ip: str, destination: bytes) -> bytes:
    """Build an Ethernet frame carrying an ARP packet for IPv4 over Ethernet (RFC 826)."""
    header = destination + source_mac + ETHERTYPE_ARP.to_bytes(2, "big")
    arp = (bytes.fromhex("000108000604") + operation.to_bytes(2, "big") + source_mac
           + socket.inet_aton(source_ip) + target_mac + socket.inet_aton(target_ip))
    return header + arp


def test_net_arp_round_trip_through_tap(tmp_path: Path, tap_namespace: tuple[str, str],
                                        figures: dict[str, object]) -> None:
    namespace, tap = tap_namespace
    monitor = Monitor(tmp_path, netns=namespace)
    interface = {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": PROBE_MAC}
    try:
        start_probe(monitor, 1, [], {"/network-interfaces/eth0": interface})
        log_in(monitor, "root", "root", re.escape(PROMPT))
        vm = ProbeVm(monitor, tmp_path, tmp_path, tmp_path, 0.0)
        assert vm.run("net mac 0") == f"mac {PROBE_MAC}"

        probe_mac = bytes.fromhex(PROBE_MAC.replace(":", ""))
        request = arp_frame(ARP_REQUEST, probe_mac, PROBE_ADDRESS, bytes(6),
                            NAMESPACE_ADDRESS, b"\xff" * 6)
        assert vm.run(f"net send 0 {request.hex()}") == f"sent {len(request)}"
        figures["net_send_s"] = round(vm.command_times["net"], 4)

        # The namespace's kernel may send other frames first (IPv6 router solicitations).
        reply = b""
        for _ in range(8):
            lines = vm.run("net recv 0 3000").splitlines()
            assert lines[-1] != "none", "no ARP reply arrived from the namespace"
            frame = bytes.fromhex("".join(lines[:-1]))
            if frame[12:14] == ETHERTYPE_ARP.to_bytes(2, "big"):
                reply = frame
                break
        assert reply[:6] == probe_mac
        assert int.from_bytes(reply[20:22], "big") == ARP_REPLY
        assert reply[28:32] == socket.inet_aton(NAMESPACE_ADDRESS)
        assert reply[38:42] == socket.inet_aton(PROBE_ADDRESS)
        assert vm.run("net send 0 zz").startswith("error: net send: HEXFRAME")
    finally:
        monitor.terminate()
