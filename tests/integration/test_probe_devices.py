"""The probe guest against device features that need more than one booted VM to check.

- Block rate limiter: a drive limited by `rate_limiter` serves the probe's reads no
  faster than its bucket allows, an unlimited drive in the same guest is not slowed,
  and PATCH /drives changes the limits of the running drives.
- Network frames both ways through a tap: a frame the probe sends is captured on the
  tap inside the test's network namespace, and a frame written there reaches the probe.
- MMDS from inside the guest: the test builds ARP, IPv4 and TCP frames itself, the probe
  sends them with `net send` and prints the replies with `net recv`.

Each VM is a probe of its own (a boot takes well under a second here), and all traffic
stays inside a network namespace that the test creates and deletes.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.microvm import Monitor
from tests.integration.test_probe_guest import (  # noqa: F401 (tap_namespace is a fixture)
    ARP_REPLY,
    ARP_REQUEST,
    COMMAND_TIMEOUT_S,
    ETHERTYPE_ARP,
    PROBE_ADDRESS,
    PROBE_MAC,
    PROMPT,
    SECTOR_SIZE,
    ProbeVm,
    arp_frame,
    drive,
    log_in,
    start_probe,
    tap_namespace,
)

pytestmark = pytest.mark.kvm

DRIVE_SECTORS = 64
# A bucket smaller than one 512-byte sector, so that every read also takes the path of a
# request larger than the bucket: it passes when the bucket is full and leaves a debt.
LIMITED_BUCKET = {"size": 256, "refill_time": 125}
LIMITED_READS = 5
UNLIMITED_BUCKET = {"size": 0, "refill_time": 0}
MILLISECONDS_PER_SECOND = 1000

# IEEE 802 Local Experimental EtherType 1, so that no host stack handles the test frames.
ETHERTYPE_EXPERIMENTAL = 0x88B5
ETHERTYPE_IPV4 = 0x0800
BROADCAST_MAC = b"\xff" * 6
# IEEE 802.3: a frame carries at least 60 bytes before its FCS.
MIN_FRAME_SIZE = 60
RECV_ATTEMPTS = 10
RECV_TIMEOUT_MS = 3000
HELPER_TIMEOUT_S = 20.0
# Console input typed at a time; half the probe's 256-byte input ring.
INPUT_CHUNK_CHARS = 128

MMDS_ADDRESS = "169.254.169.254"
HTTP_PORT = 80
IP_PROTOCOL_TCP = 6
# RFC 9293 section 3.1 control bits.
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_WINDOW = 8192
GUEST_ISN = 1_000_000
MMDS_DATA = {"latest": {"meta-data": {"ami-id": "ami-probe-0001", "zone": "probe-1a"}}}
TOKEN_TTL_S = 60

# Runs inside the namespace: "capture IFACE ETHERTYPE TIMEOUT_S" prints "ready", then
# the first frame of that EtherType as hex. "send IFACE ETHERTYPE HEXFRAME" sends a frame.
PACKET_HELPER = """
import socket, sys
mode, interface, ethertype = sys.argv[1], sys.argv[2], int(sys.argv[3], 0)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
sock.bind((interface, ethertype))
if mode == "send":
    sock.send(bytes.fromhex(sys.argv[4]))
    print("sent", flush=True)
else:
    sock.settimeout(float(sys.argv[4]))
    print("ready", flush=True)
    print(sock.recv(65536).hex(), flush=True)
"""


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ethernet(destination: bytes, source: bytes, ethertype: int, payload: bytes) -> bytes:
    """Build an Ethernet II frame, zero-padded to the minimum frame size."""
    frame = destination + source + ethertype.to_bytes(2, "big") + payload
    return frame.ljust(MIN_FRAME_SIZE, b"\0")


def booted_probe(workdir: Path, drives: list[dict[str, object]],
                 devices: dict[str, dict[str, object]], netns: str | None = None) -> ProbeVm:
    """Start a monitor, boot the probe with `drives` and `devices`, log in; return it."""
    monitor = Monitor(workdir, netns=netns)
    try:
        boot_s = start_probe(monitor, 1, drives, devices)
        log_in(monitor, "root", "root", re.escape(PROMPT))
    except BaseException:
        monitor.terminate()
        raise
    return ProbeVm(monitor, workdir, workdir, workdir, boot_s)


def send_frame(vm: ProbeVm, frame: bytes) -> None:
    """Run `net send 0 HEX`, typing the line in chunks that the probe echoes one by one.

    The probe buffers 256 characters of console input, and echoing each character is
    slow where guest kernel code is emulated, so a line of 600 characters sent at once
    can overflow the buffer and lose characters.
    """
    command = f"net send 0 {frame.hex()}"
    process = vm.monitor.process
    for start in range(0, len(command), INPUT_CHUNK_CHARS):
        chunk = command[start:start + INPUT_CHUNK_CHARS]
        process.send(chunk)
        vm.monitor.expect(re.escape(chunk), COMMAND_TIMEOUT_S)
    process.send("\r")
    vm.monitor.expect(re.escape(PROMPT), COMMAND_TIMEOUT_S)
    output = (process.before or "").replace("\r\n", "\n").strip("\n")
    assert output == f"sent {len(frame)}", output


def receive_frame(vm: ProbeVm, matches: Callable[[bytes], bool]) -> bytes:
    """Run `net recv` until a frame for which `matches` is true arrives; return it.

    The namespace's kernel may send frames of its own first (IPv6 router solicitations).
    """
    skipped = []
    for _ in range(RECV_ATTEMPTS):
        lines = vm.run(f"net recv 0 {RECV_TIMEOUT_MS}").splitlines()
        if lines[-1] == "none":
            break
        frame = bytes.fromhex("".join(lines[:-1]))
        assert lines[-1] == f"frame {len(frame)} bytes"
        if matches(frame):
            return frame
        skipped.append(frame[:34].hex())
    raise AssertionError(f"the expected frame did not arrive; frames skipped: {skipped}")


# Block rate limiter --------------------------------------------------------------------------


def timed_reads(vm: ProbeVm, device: int, count: int) -> float:
    """Read sector i of blk device `device` for i < count; return the seconds taken."""
    started = time.monotonic()
    for sector in range(count):
        output = vm.run(f"blk read {device} {sector}")
        assert output.splitlines()[-1] == "status ok", output
    return time.monotonic() - started


def refill_lower_bound_s(bucket: dict[str, int], reads: int) -> float:
    """Return the least time in which `reads` 512-byte reads can pass a full bandwidth bucket.

    The last read starts once the bucket contains min(512, size) tokens again, so the refill
    must have paid for every earlier read: (reads - 1) * 512 + min(512, size) - size tokens
    at size tokens per refill_time.
    """
    size, refill_ms = bucket["size"], bucket["refill_time"]
    tokens = (reads - 1) * SECTOR_SIZE + min(SECTOR_SIZE, size) - size
    return tokens / size * refill_ms / MILLISECONDS_PER_SECOND


def block_metrics(vm: ProbeVm) -> dict[str, dict[str, int]]:
    """Flush the metrics; return each drive's counters since the previous flush, by drive id.

    Counters in a metrics line are the change since the line before it.
    """
    status, body = vm.monitor.api.put("/actions", {"action_type": "FlushMetrics"})
    assert status == 204, body
    line = json.loads(vm.monitor.metrics_path.read_text().splitlines()[-1])
    return {name.removeprefix("block_"): group for name, group in line.items()
            if name.startswith("block_")}


@pytest.fixture
def limited_probe(tmp_path: Path) -> Iterator[ProbeVm]:
    """A probe with blk0 "limited" (LIMITED_BUCKET) and blk1 "free" (no limiter)."""
    drives = []
    for drive_id in ("limited", "free"):
        path = tmp_path / f"{drive_id}.img"
        path.write_bytes(bytes(DRIVE_SECTORS * SECTOR_SIZE))
        drives.append(drive(drive_id, path, read_only=False, cache_type="Unsafe"))
    drives[0]["rate_limiter"] = {"bandwidth": LIMITED_BUCKET}
    vm = booted_probe(tmp_path, drives, {})
    yield vm
    vm.monitor.terminate()


def test_limited_drive_reads_no_faster_than_bucket(
    limited_probe: ProbeVm, figures: dict[str, object]
) -> None:
    lower_bound_s = refill_lower_bound_s(LIMITED_BUCKET, LIMITED_READS)
    block_metrics(limited_probe)
    limited_s = timed_reads(limited_probe, 0, LIMITED_READS)
    free_s = timed_reads(limited_probe, 1, LIMITED_READS)
    figures["limited_reads_s"] = round(limited_s, 3)
    figures["limited_lower_bound_s"] = round(lower_bound_s, 3)
    figures["free_reads_s"] = round(free_s, 3)
    assert limited_s >= lower_bound_s
    assert free_s < limited_s
    counters = block_metrics(limited_probe)
    assert counters["limited"]["rate_limiter_throttled_events"] > 0
    assert counters["limited"]["rate_limiter_event_count"] > 0
    assert counters["limited"]["read_count"] == LIMITED_READS
    assert counters["free"]["rate_limiter_throttled_events"] == 0
    assert counters["free"]["read_count"] == LIMITED_READS


def test_patch_moves_limit_between_drives(
    limited_probe: ProbeVm, figures: dict[str, object]
) -> None:
    api = limited_probe.monitor.api
    for drive_id, bucket in (("limited", UNLIMITED_BUCKET), ("free", LIMITED_BUCKET)):
        status, body = api.request("PATCH", f"/drives/{drive_id}", {
            "drive_id": drive_id, "rate_limiter": {"bandwidth": bucket},
        })
        assert status == 204, body
    block_metrics(limited_probe)
    unlimited_s = timed_reads(limited_probe, 0, LIMITED_READS)
    limited_s = timed_reads(limited_probe, 1, LIMITED_READS)
    figures["formerly_limited_reads_s"] = round(unlimited_s, 3)
    figures["newly_limited_reads_s"] = round(limited_s, 3)
    assert limited_s >= refill_lower_bound_s(LIMITED_BUCKET, LIMITED_READS)
    counters = block_metrics(limited_probe)
    assert counters["free"]["rate_limiter_throttled_events"] > 0
    assert counters["limited"]["rate_limiter_throttled_events"] == 0


# Network frames both ways through a tap ------------------------------------------------------


def run_packet_helper(namespace: str, *arguments: str) -> subprocess.Popen[str]:
    """Start PACKET_HELPER inside `namespace` with `arguments`; return the process."""
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", PACKET_HELPER, *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def helper_output(helper: subprocess.Popen[str]) -> str:
    stdout, stderr = helper.communicate(timeout=HELPER_TIMEOUT_S)
    assert helper.returncode == 0, f"packet helper failed ({helper.returncode}): {stderr}"
    return stdout


@pytest.fixture
def net_probe(tmp_path: Path, tap_namespace: tuple[str, str]) -> Iterator[ProbeVm]:
    namespace, tap = tap_namespace
    interface = {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": PROBE_MAC}
    vm = booted_probe(tmp_path, [], {"/network-interfaces/eth0": interface}, namespace)
    yield vm
    vm.monitor.terminate()


def test_probe_frame_reaches_tap(net_probe: ProbeVm, tap_namespace: tuple[str, str],
                                 figures: dict[str, object]) -> None:
    namespace, tap = tap_namespace
    frame = ethernet(BROADCAST_MAC, mac_bytes(PROBE_MAC), ETHERTYPE_EXPERIMENTAL,
                     b"from the probe to the tap")
    capture = run_packet_helper(namespace, "capture", tap, hex(ETHERTYPE_EXPERIMENTAL),
                                str(HELPER_TIMEOUT_S))
    try:
        assert capture.stdout is not None
        assert capture.stdout.readline().strip() == "ready"
        started = time.monotonic()
        send_frame(net_probe, frame)
        captured = bytes.fromhex(helper_output(capture).strip())
        figures["probe_to_tap_s"] = round(time.monotonic() - started, 4)
    finally:
        capture.kill()
        capture.wait()
    assert captured == frame


def test_tap_frame_reaches_probe(net_probe: ProbeVm, tap_namespace: tuple[str, str],
                                 figures: dict[str, object]) -> None:
    namespace, tap = tap_namespace
    frame = ethernet(mac_bytes(PROBE_MAC), bytes.fromhex("02aabbccddee"),
                     ETHERTYPE_EXPERIMENTAL, b"from the tap to the probe")
    started = time.monotonic()
    sender = run_packet_helper(namespace, "send", tap, hex(ETHERTYPE_EXPERIMENTAL), frame.hex())
    assert helper_output(sender).strip() == "sent"
    received = receive_frame(net_probe, lambda data: data[12:14] == frame[12:14])
    figures["tap_to_probe_s"] = round(time.monotonic() - started, 4)
    assert received == frame


# MMDS from inside the probe ------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """Return the Internet checksum of `data` (RFC 1071): ones' complement of the sum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(source: str, destination: str, protocol: int, payload: bytes) -> bytes:
    """Build an IPv4 packet (RFC 791) without options, Don't Fragment set, TTL 64."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64,
                         protocol, 0, socket.inet_aton(source), socket.inet_aton(destination))
    return header[:10] + checksum(header).to_bytes(2, "big") + header[12:] + payload


def tcp_segment(source: str, destination: str, ports: tuple[int, int], sequence: int,
                acknowledgement: int, flags: int, payload: bytes = b"") -> bytes:
    """Build a TCP segment (RFC 9293 section 3.1) without options, with its checksum."""
    header = struct.pack("!HHIIBBHHH", ports[0], ports[1], sequence, acknowledgement,
                         5 << 4, flags, TCP_WINDOW, 0, 0)
    pseudo = (socket.inet_aton(source) + socket.inet_aton(destination)
              + struct.pack("!BBH", 0, IP_PROTOCOL_TCP, len(header) + len(payload)))
    value = checksum(pseudo + header + payload)
    return header[:16] + value.to_bytes(2, "big") + header[18:] + payload


@dataclass(frozen=True)
class Segment:
    """The fields of a received TCP segment that the exchange checks."""

    source_port: int
    destination_port: int
    sequence: int
    acknowledgement: int
    flags: int
    payload: bytes


def parse_tcp_frame(frame: bytes) -> Segment | None:
    """Return the TCP segment an Ethernet frame from the MMDS carries, or None."""
    if frame[12:14] != ETHERTYPE_IPV4.to_bytes(2, "big"):
        return None
    packet = frame[14:]
    header_length = (packet[0] & 0x0F) * 4
    total_length = int.from_bytes(packet[2:4], "big")
    if packet[9] != IP_PROTOCOL_TCP or packet[12:16] != socket.inet_aton(MMDS_ADDRESS):
        return None
    assert checksum(packet[:header_length]) == 0, "IPv4 header checksum is wrong"
    tcp = packet[header_length:total_length]
    source_port, destination_port, sequence, acknowledgement, offset, flags = struct.unpack(
        "!HHIIBB", tcp[:14])
    pseudo = (packet[12:20] + struct.pack("!BBH", 0, IP_PROTOCOL_TCP, len(tcp)))
    assert checksum(pseudo + tcp) == 0, "TCP checksum is wrong"
    return Segment(source_port, destination_port, sequence, acknowledgement, flags,
                   tcp[(offset >> 4) * 4:])


class MmdsClient:
    """One TCP connection from the probe to the MMDS, driven frame by frame."""

    def __init__(self, vm: ProbeVm, mmds_mac: bytes, port: int) -> None:
        self.vm = vm
        self.mmds_mac = mmds_mac
        self.port = port
        self.sequence = GUEST_ISN
        self.acknowledgement = 0

    def send(self, flags: int, payload: bytes = b"") -> None:
        segment = tcp_segment(PROBE_ADDRESS, MMDS_ADDRESS, (self.port, HTTP_PORT),
                              self.sequence, self.acknowledgement, flags, payload)
        packet = ipv4_packet(PROBE_ADDRESS, MMDS_ADDRESS, IP_PROTOCOL_TCP, segment)
        frame = ethernet(self.mmds_mac, mac_bytes(PROBE_MAC), ETHERTYPE_IPV4, packet)
        send_frame(self.vm, frame)
        self.sequence += len(payload) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)

    def receive(self) -> Segment:
        def ours(frame: bytes) -> bool:
            segment = parse_tcp_frame(frame)
            return segment is not None and segment.destination_port == self.port

        segment = parse_tcp_frame(receive_frame(self.vm, ours))
        assert segment is not None
        assert segment.source_port == HTTP_PORT
        return segment

    def connect(self) -> None:
        """Send a SYN and check the SYN-ACK that acknowledges it."""
        self.send(TCP_SYN)
        reply = self.receive()
        assert reply.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        assert reply.acknowledgement == self.sequence
        self.acknowledgement = reply.sequence + 1
        self.send(TCP_ACK)

    def request(self, text: str) -> tuple[int, dict[str, str], bytes]:
        """Send one HTTP/1.1 request; return the response's status, headers and body."""
        self.send(TCP_PSH | TCP_ACK, text.encode())
        received = b""
        while not response_complete(received):
            segment = self.receive()
            if segment.sequence == self.acknowledgement and segment.payload:
                received += segment.payload
                self.acknowledgement += len(segment.payload)
                self.send(TCP_ACK)
        return parse_response(received)

    def close(self) -> None:
        """Send a FIN and check that the MMDS acknowledges it."""
        self.send(TCP_FIN | TCP_ACK)
        for _ in range(RECV_ATTEMPTS):
            segment = self.receive()
            if segment.acknowledgement == self.sequence:
                return
        raise AssertionError("the MMDS did not acknowledge the FIN")


def response_complete(data: bytes) -> bool:
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        return False
    match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return match is not None and len(body) >= int(match.group(1))


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def mmds_probe(workdir: Path, tap_namespace: tuple[str, str], version: str) -> ProbeVm:
    namespace, tap = tap_namespace
    interface = {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": PROBE_MAC}
    devices: dict[str, dict[str, object]] = {
        "/network-interfaces/eth0": interface,
        "/mmds/config": {"network_interfaces": ["eth0"], "version": version},
        "/mmds": MMDS_DATA,
    }
    return booted_probe(workdir, [], devices, namespace)


def resolve_mmds_mac(vm: ProbeVm) -> bytes:
    """ARP for the MMDS address from the probe; return the MAC in the reply."""
    probe_mac = mac_bytes(PROBE_MAC)
    request = arp_frame(ARP_REQUEST, probe_mac, PROBE_ADDRESS, bytes(6), MMDS_ADDRESS,
                        BROADCAST_MAC)
    send_frame(vm, request)
    reply = receive_frame(vm, lambda frame: frame[12:14] == ETHERTYPE_ARP.to_bytes(2, "big"))
    assert reply[:6] == probe_mac
    assert int.from_bytes(reply[20:22], "big") == ARP_REPLY
    assert reply[28:32] == socket.inet_aton(MMDS_ADDRESS)
    assert reply[32:38] == probe_mac
    assert reply[22:28] == reply[6:12], "the ARP sender MAC is not the frame's source"
    return reply[22:28]


def test_mmds_v1_arp_tcp_and_get(tmp_path: Path, tap_namespace: tuple[str, str],
                                 figures: dict[str, object]) -> None:
    vm = mmds_probe(tmp_path, tap_namespace, "V1")
    try:
        started = time.monotonic()
        mmds_mac = resolve_mmds_mac(vm)
        assert mmds_mac[0] & 0x01 == 0, "the MMDS MAC is a multicast address"
        client = MmdsClient(vm, mmds_mac, 40001)
        client.connect()
        status, _, body = client.request(
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
        assert status == 200
        assert body == b"ami-probe-0001"
        status, _, body = client.request(
            "GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
        assert status == 200
        assert body.split(b"\n") == [b"ami-id", b"zone"]
        client.close()
        figures["mmds_v1_exchange_s"] = round(time.monotonic() - started, 3)
    finally:
        vm.monitor.terminate()


def test_mmds_v2_token_required(tmp_path: Path, tap_namespace: tuple[str, str],
                                figures: dict[str, object]) -> None:
    vm = mmds_probe(tmp_path, tap_namespace, "V2")
    try:
        started = time.monotonic()
        client = MmdsClient(vm, resolve_mmds_mac(vm), 40002)
        client.connect()
        status, headers, token = client.request(
            "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            f"X-metadata-token-ttl-seconds: {TOKEN_TTL_S}\r\nContent-Length: 0\r\n\r\n")
        assert status == 200
        assert headers["x-metadata-token-ttl-seconds"] == str(TOKEN_TTL_S)
        assert token
        status, _, body = client.request(
            "GET /latest/meta-data/zone HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            f"X-metadata-token: {token.decode()}\r\n\r\n")
        assert status == 200
        assert body == b"probe-1a"
        status, _, body = client.request(
            "GET /latest/meta-data/zone HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
        assert status == 401
        assert b"probe-1a" not in body
        client.close()
        figures["mmds_v2_exchange_s"] = round(time.monotonic() - started, 3)
    finally:
        vm.monitor.terminate()


# Throughput from inside the guest: how fast the monitor moves frames and block requests.
NET_FLOOD_FRAMES = 2000
NET_FLOOD_FRAME_BYTES = 1514
BLK_BENCH_REQUESTS = 500


def sum_metric(path: Path, group: str, name: str) -> int:
    """Add up one counter over every metrics line (each line holds the change since the last)."""
    total = 0
    for line in path.read_text().splitlines():
        total += json.loads(line).get(group, {}).get(name, 0)
    return total


def test_net_transmit_rate(net_probe: ProbeVm, figures: dict[str, object]) -> None:
    """The probe sends full-size frames as fast as virtio-net takes them; all reach the tap.

    The time includes the probe's own copy of each frame into its transmit buffer, which
    runs through the instruction emulator on a host that emulates guest kernel code.
    """
    output = net_probe.run(
        f"net flood 0 {NET_FLOOD_FRAMES} {NET_FLOOD_FRAME_BYTES}", timeout_s=300
    )
    match = re.search(r"net flood (\d+) frames of (\d+) bytes in (\d+) us", output)
    assert match, output
    frames, size, elapsed_us = (int(group) for group in match.groups())
    assert frames == NET_FLOOD_FRAMES
    assert elapsed_us > 0
    status, body = net_probe.monitor.api.put("/actions", {"action_type": "FlushMetrics"})
    assert status == 204, body
    written = sum_metric(net_probe.monitor.metrics_path, "net", "tx_packets_count")
    failed = sum_metric(net_probe.monitor.metrics_path, "net", "tap_write_fails")
    assert written >= NET_FLOOD_FRAMES
    assert failed == 0
    figures["net_tx_frames_per_s"] = round(frames * 1e6 / elapsed_us)
    figures["net_tx_bytes_per_s"] = round(frames * size * 1e6 / elapsed_us)
    figures["net_tx_frame_bytes"] = size


def test_blk_request_rate(tmp_path: Path, figures: dict[str, object]) -> None:
    """The probe reads sectors one request at a time; every request completes with ok."""
    disk = tmp_path / "bench.img"
    disk.write_bytes(bytes(DRIVE_SECTORS * SECTOR_SIZE))
    vm = booted_probe(tmp_path, [drive("bench", disk, False, "Unsafe")], {}, None)
    try:
        output = vm.run(f"blk bench 0 {BLK_BENCH_REQUESTS}", timeout_s=300)
    finally:
        vm.monitor.terminate()
    match = re.search(r"blk bench (\d+) requests in (\d+) us", output)
    assert match, output
    requests, elapsed_us = (int(group) for group in match.groups())
    assert requests == BLK_BENCH_REQUESTS
    figures["blk_requests_per_s"] = round(requests * 1e6 / elapsed_us)
    figures["blk_read_bytes_per_s"] = round(requests * SECTOR_SIZE * 1e6 / elapsed_us)
