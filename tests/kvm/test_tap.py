"""Real tap interfaces opened with vmm.devices.virtio.tap, inside network namespaces made here.

Each test creates a tap with a unique name (TUNSETIFF creates it), moves it
into a fresh network namespace, gives the namespace's side an address and
exchanges frames with that kernel. No traffic leaves the namespace. The
namespace and the tap are removed even when a test fails.
"""

from __future__ import annotations

import os
import select
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmm.devices.virtio.tap import TUN_DEVICE_PATH, TUN_F_CSUM, VNET_HEADER_SIZE, Tap, TapError
from vmm.mmds import packets


def _tap_unusable_reason() -> str | None:
    if os.geteuid() != 0:
        return "creating tap devices and network namespaces needs root"
    if not os.path.exists(TUN_DEVICE_PATH):
        return f"{TUN_DEVICE_PATH} does not exist"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    return None


pytestmark = pytest.mark.skipif(
    _tap_unusable_reason() is not None, reason=_tap_unusable_reason() or ""
)

HOST_ADDRESS = "10.254.7.1"
GUEST_ADDRESS = "10.254.7.2"
GUEST_MAC = bytes.fromhex("aafc00000002")
READ_TIMEOUT_S = 5.0


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, timeout=10)


@dataclass
class NamespacedTap:
    tap: Tap
    namespace: str


@pytest.fixture
def namespaced_tap() -> Iterator[NamespacedTap]:
    suffix = uuid.uuid4().hex[:8]
    namespace = f"vmmtest-{suffix}"
    name = f"vmmtap{suffix}"
    _ip("netns", "add", namespace)
    tap: Tap | None = None
    try:
        tap = Tap(name)
        _ip("link", "set", name, "netns", namespace)
        _ip("-n", namespace, "addr", "add", f"{HOST_ADDRESS}/24", "dev", name)
        _ip("-n", namespace, "link", "set", name, "up")
        yield NamespacedTap(tap, namespace)
    finally:
        if tap is not None:
            tap.close()
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)


def _read_frame(tap: Tap) -> bytes:
    """Wait for a frame, skipping IPv6 router solicitations and other noise, up to a timeout."""
    buffer = bytearray(65562)
    poller = select.poll()
    poller.register(tap.fileno(), select.POLLIN)
    if not poller.poll(int(READ_TIMEOUT_S * 1000)):
        raise AssertionError(f"no frame from tap {tap.name} within {READ_TIMEOUT_S} s")
    length = tap.read_frame(memoryview(buffer))
    return bytes(buffer[:length])


def _read_arp_reply(tap: Tap) -> packets.ArpPacket:
    for _ in range(20):
        frame = _read_frame(tap)[VNET_HEADER_SIZE:]
        ethernet = packets.parse_ethernet(frame)
        if ethernet.ethertype == packets.ETHERTYPE_ARP:
            arp = packets.parse_arp(ethernet.payload)
            if arp.operation == packets.ARP_OPER_REPLY:
                return arp
    raise AssertionError(f"no ARP reply among 20 frames from tap {tap.name}")


def _arp_request() -> bytes:
    request = packets.ArpPacket(
        packets.ARP_OPER_REQUEST, GUEST_MAC, bytes(map(int, GUEST_ADDRESS.split("."))),
        bytes(6), bytes(map(int, HOST_ADDRESS.split("."))),
    )
    return packets.build_ethernet(packets.BROADCAST_MAC, GUEST_MAC, packets.ETHERTYPE_ARP,
                                  packets.build_arp(request))


def test_arp_request_through_tap_is_answered(namespaced_tap: NamespacedTap) -> None:
    tap = namespaced_tap.tap
    header = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)
    written = tap.write_frame([header, _arp_request()])
    assert written == VNET_HEADER_SIZE + len(_arp_request())
    reply = _read_arp_reply(tap)
    assert reply.sender_ip == bytes(map(int, HOST_ADDRESS.split(".")))
    assert reply.target_mac == GUEST_MAC


def test_read_without_frame_raises_blocking(namespaced_tap: NamespacedTap) -> None:
    tap = namespaced_tap.tap
    # Let the namespace's own start-up frames (IPv6 solicitations) arrive, then drain them.
    select.select([tap.fileno()], [], [], 0.2)
    with pytest.raises(BlockingIOError):
        for _ in range(100):
            tap.read_frame(memoryview(bytearray(65562)))


def test_set_offload_is_accepted(namespaced_tap: NamespacedTap) -> None:
    namespaced_tap.tap.set_offload(TUN_F_CSUM)


def test_second_open_of_busy_tap_names_errno(namespaced_tap: NamespacedTap) -> None:
    namespace, name = namespaced_tap.namespace, namespaced_tap.tap.name
    script = (
        "from vmm.devices.virtio.tap import Tap, TapError\n"
        f"try:\n    Tap({name!r})\nexcept TapError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, "python3", "-c", script],
        capture_output=True, text=True, timeout=30,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert "EBUSY" in result.stdout, result.stdout + result.stderr
    assert name in result.stdout


def test_invalid_name_is_rejected() -> None:
    with pytest.raises(TapError, match="1 to 15 bytes"):
        Tap("x" * 16)


def test_monitor_boots_with_network_interface_and_mmds(tmp_path: Path) -> None:
    """InstanceStart opens the tap, attaches virtio-net with MMDS and the guest runs."""
    from tests.integration.microvm import Monitor
    from tests.kvm.test_monitor_boot import MESSAGE
    from tests.kvm.tiny_kernels import serial_message_then_reset, write_elf

    name = f"vmmtap{uuid.uuid4().hex[:8]}"
    # The tap stays down in the root namespace, so no frame leaves it.
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True, timeout=10)
    kernel = write_elf(tmp_path / "tiny.elf", serial_message_then_reset(MESSAGE))
    monitor = Monitor(tmp_path)
    try:
        monitor.wait_for_api()
        api = monitor.api
        assert api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})[0] == 204
        assert api.put("/boot-source", {"kernel_image_path": str(kernel)})[0] == 204
        assert api.put("/network-interfaces/eth0", {
            "iface_id": "eth0", "host_dev_name": name, "guest_mac": "AA:FC:00:00:00:01",
        })[0] == 204
        assert api.put("/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"})[0] == 204
        status, body = api.put("/actions", {"action_type": "InstanceStart"})
        assert status == 204, body
        monitor.expect("hello from the tiny kernel", 60)
        assert monitor.wait_exit(60) == 0
    finally:
        monitor.terminate()
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)
