"""virtio-net (virtio 1.2 section 5.1) driven through virtio-mmio, with a datagram-socket back end.

The back end is a SOCK_SEQPACKET socket pair: like a tap, it keeps frame
boundaries and is non-blocking, so the device reads and writes real frames.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Sequence

import pytest

from tests.virtio_driver import TEST_RAM_SIZE, Buffer, MmioDriver, VirtqueueDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, feature_bit
from vmm.devices.virtio.net import (
    MAX_FRAME_SIZE,
    RX_QUEUE_INDEX,
    TX_QUEUE_INDEX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    Net,
    parse_mac,
)
from vmm.devices.virtio.tap import TUN_F_CSUM, TUN_F_TSO4, VNET_HEADER_SIZE
from vmm.memory import GuestMemory
from vmm.mmds import packets
from vmm.mmds.http import MmdsService
from vmm.mmds.stack import MMDS_MAC, MmdsStack
from vmm.rate_limiter import RateLimiter, TokenBucket

GUEST_MAC = parse_mac("AA:FC:00:00:00:01")
PEER_MAC = bytes.fromhex("02aabbccddee")
GUEST_IP = bytes([169, 254, 0, 2])
QUEUE_SIZE = 16


class SocketBackend:
    """A frame-preserving back end: the device's end of a SOCK_SEQPACKET pair."""

    def __init__(self) -> None:
        self.device_end, self.host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.device_end.setblocking(False)
        self.host_end.setblocking(False)
        self.offload_flags: list[int] = []

    def read_frame(self, buffer: memoryview) -> int:
        return self.device_end.recv_into(buffer)

    def write_frame(self, parts: Sequence[bytes | memoryview]) -> int:
        return self.device_end.sendmsg(parts)

    def set_offload(self, flags: int) -> None:
        self.offload_flags.append(flags)

    def host_frames(self) -> list[bytes]:
        frames = []
        while True:
            try:
                frames.append(self.host_end.recv(MAX_FRAME_SIZE))
            except BlockingIOError:
                return frames

    def close(self) -> None:
        self.device_end.close()
        self.host_end.close()


def vnet_header(num_buffers: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, num_buffers)


def ethernet_frame(payload_size: int, source: bytes = GUEST_MAC) -> bytes:
    payload = bytes(index % 251 for index in range(payload_size))
    return packets.build_ethernet(PEER_MAC, source, 0x88B5, payload)


class NetFixture:
    """A started net device: driver-side queues, transport and the back end's host end."""

    def __init__(
        self, memory: GuestMemory, features: int | None = None, mmds: MmdsStack | None = None,
        tx_rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.memory = memory
        self.backend = SocketBackend()
        self.interest: list[bool] = []
        self.device = Net("eth0", self.backend, GUEST_MAC, mtu=1500, mmds=mmds,
                          tx_rate_limiter=tx_rate_limiter, on_rx_interest=self.interest.append)
        self.irq_count = 0
        self.transport = mmio.MmioTransport(self.device, memory, self.raise_irq)
        self.rx = VirtqueueDriver(memory, QUEUE_SIZE, ring_base=0x1000, data_base=0x4_0000)
        self.tx = VirtqueueDriver(memory, QUEUE_SIZE, ring_base=0x8000, data_base=0x8_0000)
        MmioDriver(self.transport).start([self.rx, self.tx], features)

    def raise_irq(self) -> None:
        self.irq_count += 1

    def transmit(self, data: bytes, split_at: int | None = None) -> list[tuple[int, int]]:
        if split_at is None:
            self.tx.add_chain([self.tx.buffer(data)])
        else:
            self.tx.add_chain([self.tx.buffer(data[:split_at]), self.tx.buffer(data[split_at:])])
        self.transport.notify(TX_QUEUE_INDEX)
        return self.tx.used_entries()

    def add_rx_buffers(self, count: int, size: int, notify: bool = True) -> list[Buffer]:
        buffers = []
        for _ in range(count):
            buffer = self.rx.buffer(length=size, writable=True)
            self.rx.add_chain([buffer])
            buffers.append(buffer)
        if notify:
            self.transport.notify(RX_QUEUE_INDEX)
        return buffers

    def close(self) -> None:
        self.backend.close()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory([(0, TEST_RAM_SIZE)])
    yield ram
    ram.close()


@pytest.fixture
def net(memory: GuestMemory) -> Iterator[NetFixture]:
    fixture = NetFixture(memory)
    yield fixture
    fixture.close()


def test_offered_features_and_config(net: NetFixture) -> None:
    features = net.device.avail_features
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
                VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF):
        assert features & feature_bit(bit), bit
    config = bytearray(12)
    net.transport.read(mmio.CONFIG_SPACE_OFFSET, config)
    assert bytes(config[:6]) == GUEST_MAC
    assert struct.unpack_from("<H", config, 10)[0] == 1500


def test_no_mac_feature_without_guest_mac() -> None:
    backend = SocketBackend()
    device = Net("eth1", backend)
    assert not device.avail_features & feature_bit(VIRTIO_NET_F_MAC)
    assert not device.avail_features & feature_bit(VIRTIO_NET_F_MTU)
    backend.close()


def test_config_write_is_ignored(net: NetFixture) -> None:
    net.transport.write(mmio.CONFIG_SPACE_OFFSET, b"\x01\x02")
    config = bytearray(6)
    net.transport.read(mmio.CONFIG_SPACE_OFFSET, config)
    assert bytes(config) == GUEST_MAC
    assert net.device.metrics.cfg_fails == 1


def test_activation_sets_offloads_of_acked_features(memory: GuestMemory) -> None:
    features = (feature_bit(VIRTIO_F_VERSION_1) | feature_bit(VIRTIO_NET_F_GUEST_CSUM)
                | feature_bit(VIRTIO_NET_F_GUEST_TSO4))
    fixture = NetFixture(memory, features)
    assert fixture.backend.offload_flags == [TUN_F_CSUM | TUN_F_TSO4]
    assert fixture.interest == [True]
    fixture.close()


def test_transmit_sends_header_and_frame(net: NetFixture) -> None:
    frame = ethernet_frame(100)
    used = net.transmit(vnet_header() + frame, split_at=VNET_HEADER_SIZE)
    assert len(used) == 1
    assert net.backend.host_frames() == [vnet_header() + frame]
    assert net.device.metrics.tx_packets_count == 1
    assert net.device.metrics.tx_bytes_count == len(frame)
    assert net.irq_count >= 1


def test_transmit_short_chain_is_malformed(net: NetFixture) -> None:
    used = net.transmit(b"\0" * (VNET_HEADER_SIZE - 1))
    assert len(used) == 1
    assert net.backend.host_frames() == []
    assert net.device.metrics.tx_malformed_frames == 1
    assert net.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET == 0


def test_transmit_oversized_chain_is_malformed(net: NetFixture) -> None:
    net.transmit(b"\0" * (MAX_FRAME_SIZE + 1))
    assert net.backend.host_frames() == []
    assert net.device.metrics.tx_malformed_frames == 1
    frame = ethernet_frame(60)
    net.transmit(vnet_header() + frame)
    assert net.backend.host_frames() == [vnet_header() + frame]


def test_transmit_counts_spoofed_source_mac(net: NetFixture) -> None:
    net.transmit(vnet_header() + ethernet_frame(60, source=PEER_MAC))
    assert net.device.metrics.tx_spoofed_mac_count == 1
    assert len(net.backend.host_frames()) == 1


def test_receive_fills_one_buffer(net: NetFixture) -> None:
    (buffer,) = net.add_rx_buffers(1, 2048)
    frame = ethernet_frame(200)
    net.backend.host_end.send(vnet_header() + frame)
    net.device.process_backend()
    ((head, length),) = net.rx.used_entries()
    assert length == VNET_HEADER_SIZE + len(frame)
    data = net.memory.read(buffer.address, length)
    assert struct.unpack_from("<H", data, 10)[0] == 1
    assert data[VNET_HEADER_SIZE:] == frame
    assert net.device.metrics.rx_packets_count == 1
    assert net.device.metrics.rx_bytes_count == len(frame)


def test_receive_merges_buffers_for_large_frame(net: NetFixture) -> None:
    buffers = net.add_rx_buffers(4, 1024)
    frame = ethernet_frame(2900)
    net.backend.host_end.send(vnet_header() + frame)
    net.device.process_backend()
    used = net.rx.used_entries()
    assert [length for _head, length in used] == [1024, 1024, VNET_HEADER_SIZE + len(frame) - 2048]
    joined = b"".join(net.memory.read(b.address, length) for b, (_, length) in zip(buffers, used))
    assert struct.unpack_from("<H", joined, 10)[0] == 3
    assert joined[VNET_HEADER_SIZE:] == frame


def test_receive_waits_for_buffers(net: NetFixture) -> None:
    frame = ethernet_frame(1400)
    net.backend.host_end.send(vnet_header() + frame)
    net.device.process_backend()
    assert net.rx.used_entries() == []
    assert net.device.metrics.no_rx_avail_buffer == 1
    assert net.interest[-1] is False
    net.add_rx_buffers(1, 1024)
    assert net.rx.used_entries() == []
    net.add_rx_buffers(1, 1024)
    used = net.rx.used_entries()
    assert [length for _head, length in used] == [1024, VNET_HEADER_SIZE + len(frame) - 1024]
    assert net.interest[-1] is True


def test_receive_without_mergeable_drops_frame_larger_than_chain(memory: GuestMemory) -> None:
    fixture = NetFixture(memory, feature_bit(VIRTIO_F_VERSION_1))
    fixture.add_rx_buffers(1, 256)
    fixture.backend.host_end.send(vnet_header() + ethernet_frame(600))
    small = ethernet_frame(100)
    fixture.backend.host_end.send(vnet_header() + small)
    fixture.device.process_backend()
    ((_head, length),) = fixture.rx.used_entries()
    assert length == VNET_HEADER_SIZE + len(small)
    assert fixture.device.metrics.rx_fails == 1
    fixture.close()


def test_reset_stops_watching_backend(net: NetFixture) -> None:
    assert net.interest == [True]
    net.transport.write(mmio.STATUS_OFFSET, bytes(4))
    assert net.interest == [True, False]


def _arp_request(target_ip: bytes) -> bytes:
    request = packets.ArpPacket(packets.ARP_OPER_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), target_ip)
    return packets.build_ethernet(packets.BROADCAST_MAC, GUEST_MAC, packets.ETHERTYPE_ARP,
                                  packets.build_arp(request))


def _mmds_stack() -> MmdsStack:
    return MmdsStack(MmdsService(lambda: {"latest": {"meta-data": {"ami-id": "ami-1"}}}))


def test_arp_for_mmds_is_answered_into_receive_queue(memory: GuestMemory) -> None:
    stack = _mmds_stack()
    fixture = NetFixture(memory, mmds=stack)
    (buffer,) = fixture.add_rx_buffers(1, 2048)
    fixture.transmit(vnet_header() + _arp_request(stack.ipv4_address))
    assert fixture.backend.host_frames() == []
    ((_head, length),) = fixture.rx.used_entries()
    reply = packets.parse_ethernet(fixture.memory.read(buffer.address + VNET_HEADER_SIZE,
                                                       length - VNET_HEADER_SIZE))
    assert reply.destination == GUEST_MAC
    arp = packets.parse_arp(reply.payload)
    assert arp.operation == packets.ARP_OPER_REPLY
    assert arp.sender_mac == MMDS_MAC
    assert fixture.device.metrics.mmds_frames_detoured == 1
    fixture.close()


def test_arp_for_other_address_goes_to_backend(memory: GuestMemory) -> None:
    fixture = NetFixture(memory, mmds=_mmds_stack())
    fixture.transmit(vnet_header() + _arp_request(bytes([169, 254, 0, 1])))
    assert len(fixture.backend.host_frames()) == 1
    assert fixture.device.metrics.mmds_frames_detoured == 0
    fixture.close()


def _tcp_frame(stack: MmdsStack, segment: packets.TcpSegment) -> bytes:
    tcp = packets.build_tcp(segment, GUEST_IP, stack.ipv4_address)
    ip = packets.build_ipv4(GUEST_IP, stack.ipv4_address, packets.IP_PROTOCOL_TCP, tcp, 7)
    return vnet_header() + packets.build_ethernet(MMDS_MAC, GUEST_MAC, packets.ETHERTYPE_IPV4, ip)


def _received_segments(fixture: NetFixture, buffers: list[Buffer]) -> list[packets.TcpSegment]:
    by_address = {buffer.address: buffer for buffer in buffers}
    segments = []
    for head, length in fixture.rx.used_entries():
        address = memory_address_of(fixture, head)
        assert address in by_address
        data = fixture.memory.read(address + VNET_HEADER_SIZE, length - VNET_HEADER_SIZE)
        ip = packets.parse_ipv4(packets.parse_ethernet(data).payload)
        segments.append(packets.parse_tcp(ip))
    return segments


def memory_address_of(fixture: NetFixture, head: int) -> int:
    return fixture.memory.read_le64(fixture.rx.desc_table + 16 * head)


def test_http_get_from_mmds_through_device(memory: GuestMemory) -> None:
    stack = _mmds_stack()
    fixture = NetFixture(memory, mmds=stack)
    buffers = fixture.add_rx_buffers(8, 2048)
    fixture.transmit(_tcp_frame(stack, packets.TcpSegment(50000, 80, 100, 0, packets.TCP_SYN,
                                                          65535, b"", 1460)))
    (syn_ack,) = _received_segments(fixture, buffers)
    assert syn_ack.flags == packets.TCP_SYN | packets.TCP_ACK
    request = b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: mmds\r\n\r\n"
    fixture.transmit(_tcp_frame(stack, packets.TcpSegment(
        50000, 80, 101, (syn_ack.sequence + 1) % 2**32, packets.TCP_ACK, 65535, request)))
    (response,) = _received_segments(fixture, buffers)
    assert response.payload.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.payload.endswith(b"\r\n\r\nami-1")
    assert response.acknowledgment == 101 + len(request)
    fixture.close()


def test_tx_rate_limiter_defers_frames(memory: GuestMemory) -> None:
    limiter = RateLimiter(ops=TokenBucket(size=1, refill_time_ms=60_000))
    fixture = NetFixture(memory, tx_rate_limiter=limiter)
    frame = ethernet_frame(60)
    fixture.tx.add_chain([fixture.tx.buffer(vnet_header() + frame)])
    fixture.tx.add_chain([fixture.tx.buffer(vnet_header() + frame)])
    fixture.transport.notify(TX_QUEUE_INDEX)
    assert len(fixture.tx.used_entries()) == 1
    assert len(fixture.backend.host_frames()) == 1
    assert fixture.device.metrics.tx_rate_limiter_throttled == 1
    limiter.close()
    fixture.close()
