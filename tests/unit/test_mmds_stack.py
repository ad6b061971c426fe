"""The MMDS ARP/IPv4/TCP stack, fed with frames built here as a guest would send them."""

from __future__ import annotations

import pytest

from vmm.mmds import packets
from vmm.mmds.http import MmdsService
from vmm.mmds.stack import MAX_CONNECTIONS, MMDS_MAC, MmdsStack
from vmm.mmds.tcp import MAX_RETRANSMISSIONS, RETRANSMIT_TIMEOUT_S

GUEST_MAC = bytes.fromhex("aafc00000001")
GUEST_IP = bytes([169, 254, 0, 2])
STORE = {"latest": {"meta-data": {"ami-id": "ami-1"}}}
REQUEST = b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: mmds\r\n\r\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Guest:
    """One guest TCP client talking to a stack through frames."""

    def __init__(self, stack: MmdsStack, port: int = 40000) -> None:
        self.stack = stack
        self.port = port
        self.sequence = 1000
        self.server_next = 0

    def send(self, flags: int, payload: bytes = b"", sequence: int | None = None,
             acknowledgment: int | None = None, mss: int | None = None,
             window: int = 65535) -> list[packets.TcpSegment]:
        segment = packets.TcpSegment(
            self.port, 80, self.sequence if sequence is None else sequence,
            self.server_next if acknowledgment is None else acknowledgment, flags, window,
            payload, mss,
        )
        self.stack.receive_frame(self.frame(segment))
        return drain(self.stack)

    def frame(self, segment: packets.TcpSegment) -> bytes:
        tcp = packets.build_tcp(segment, GUEST_IP, self.stack.ipv4_address)
        ip = packets.build_ipv4(GUEST_IP, self.stack.ipv4_address, packets.IP_PROTOCOL_TCP,
                                tcp, 1)
        return packets.build_ethernet(MMDS_MAC, GUEST_MAC, packets.ETHERTYPE_IPV4, ip)

    def connect(self, mss: int | None = 1460, window: int = 65535) -> packets.TcpSegment:
        (syn_ack,) = self.send(packets.TCP_SYN, mss=mss, window=window)
        self.sequence += 1
        self.server_next = (syn_ack.sequence + 1) % 2**32
        self.send(packets.TCP_ACK, window=window)
        return syn_ack

    def get(self, window: int = 65535) -> list[packets.TcpSegment]:
        replies = self.send(packets.TCP_ACK | packets.TCP_PSH, REQUEST, window=window)
        self.sequence += len(REQUEST)
        return replies


def drain(stack: MmdsStack) -> list[packets.TcpSegment]:
    segments = []
    while (frame := stack.pop_frame()) is not None:
        ethernet = packets.parse_ethernet(frame)
        assert ethernet.destination == GUEST_MAC
        assert ethernet.source == MMDS_MAC
        segments.append(packets.parse_tcp(packets.parse_ipv4(ethernet.payload)))
    return segments


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stack(clock: FakeClock) -> MmdsStack:
    return MmdsStack(MmdsService(lambda: STORE), clock=clock)


def test_arp_request_gets_reply(stack: MmdsStack) -> None:
    request = packets.ArpPacket(packets.ARP_OPER_REQUEST, GUEST_MAC, GUEST_IP, bytes(6),
                                stack.ipv4_address)
    frame = packets.build_ethernet(packets.BROADCAST_MAC, GUEST_MAC, packets.ETHERTYPE_ARP,
                                   packets.build_arp(request))
    assert stack.is_for_mmds(frame)
    stack.receive_frame(frame)
    reply_frame = stack.pop_frame()
    assert reply_frame is not None
    ethernet = packets.parse_ethernet(reply_frame)
    reply = packets.parse_arp(ethernet.payload)
    assert ethernet.destination == GUEST_MAC
    assert reply == packets.ArpPacket(packets.ARP_OPER_REPLY, MMDS_MAC, stack.ipv4_address,
                                      GUEST_MAC, GUEST_IP)


def test_configured_address_is_used() -> None:
    stack = MmdsStack(MmdsService(lambda: STORE), "169.254.170.2")
    assert stack.ipv4_address == bytes([169, 254, 170, 2])
    guest = Guest(stack)
    assert stack.is_for_mmds(guest.frame(packets.TcpSegment(1, 80, 0, 0, packets.TCP_SYN, 0,
                                                            b"")))


def test_other_destinations_are_not_for_mmds(stack: MmdsStack) -> None:
    tcp = packets.build_tcp(packets.TcpSegment(1, 80, 0, 0, packets.TCP_SYN, 0, b""), GUEST_IP,
                            bytes([10, 0, 0, 1]))
    ip = packets.build_ipv4(GUEST_IP, bytes([10, 0, 0, 1]), packets.IP_PROTOCOL_TCP, tcp, 1)
    assert not stack.is_for_mmds(packets.build_ethernet(MMDS_MAC, GUEST_MAC, 0x0800, ip))
    udp = packets.build_ipv4(GUEST_IP, stack.ipv4_address, 17, bytes(8), 1)
    assert not stack.is_for_mmds(packets.build_ethernet(MMDS_MAC, GUEST_MAC, 0x0800, udp))


def test_handshake_get_and_close(stack: MmdsStack) -> None:
    guest = Guest(stack)
    syn_ack = guest.connect()
    assert syn_ack.flags == packets.TCP_SYN | packets.TCP_ACK
    assert syn_ack.acknowledgment == 1001
    assert syn_ack.mss == 1460
    (response,) = guest.get()
    assert response.payload.startswith(b"HTTP/1.1 200 OK")
    assert response.payload.endswith(b"ami-1")
    assert response.acknowledgment == guest.sequence
    guest.server_next = (response.sequence + len(response.payload)) % 2**32
    (fin,) = guest.send(packets.TCP_ACK | packets.TCP_FIN)
    guest.sequence += 1
    assert fin.flags & packets.TCP_FIN
    assert fin.acknowledgment == guest.sequence
    guest.server_next = (guest.server_next + 1) % 2**32
    assert guest.send(packets.TCP_ACK) == []
    assert stack.connection_count == 0
    assert stack.metrics.connections_created == stack.metrics.connections_destroyed == 1


def test_response_is_split_at_peer_mss(clock: FakeClock) -> None:
    big = {"blob": "x" * 3000}
    stack = MmdsStack(MmdsService(lambda: big), clock=clock)
    guest = Guest(stack)
    guest.connect(mss=1000)
    replies = guest.send(packets.TCP_ACK, b"GET /blob HTTP/1.1\r\nHost: m\r\n\r\n")
    assert [len(segment.payload) for segment in replies][:3] == [1000, 1000, 1000]
    assert replies[-1].flags & packets.TCP_PSH
    assert b"".join(segment.payload for segment in replies).endswith(b"x" * 100)


def test_sending_respects_peer_window(stack: MmdsStack) -> None:
    guest = Guest(stack)
    guest.connect(window=10)
    (first,) = guest.get(window=10)
    assert len(first.payload) == 10
    guest.server_next = (first.sequence + 10) % 2**32
    more = guest.send(packets.TCP_ACK, window=65535)
    assert more
    assert more[0].sequence == guest.server_next


def test_out_of_order_data_is_reacknowledged(stack: MmdsStack) -> None:
    guest = Guest(stack)
    guest.connect()
    (ack,) = guest.send(packets.TCP_ACK, REQUEST, sequence=guest.sequence + 5)
    assert ack.acknowledgment == guest.sequence
    assert ack.payload == b""


def test_segment_without_connection_gets_rst(stack: MmdsStack) -> None:
    guest = Guest(stack)
    (reset,) = guest.send(packets.TCP_ACK, b"x", acknowledgment=777)
    assert reset.flags == packets.TCP_RST
    assert reset.sequence == 777


def test_rst_is_never_answered(stack: MmdsStack) -> None:
    assert Guest(stack).send(packets.TCP_RST) == []


def test_syn_to_other_port_gets_rst(stack: MmdsStack) -> None:
    guest = Guest(stack)
    segment = packets.TcpSegment(40000, 8080, 5, 0, packets.TCP_SYN, 100, b"")
    tcp = packets.build_tcp(segment, GUEST_IP, stack.ipv4_address)
    ip = packets.build_ipv4(GUEST_IP, stack.ipv4_address, 6, tcp, 1)
    stack.receive_frame(packets.build_ethernet(MMDS_MAC, GUEST_MAC, 0x0800, ip))
    (reset,) = drain(stack)
    assert reset.flags == packets.TCP_RST | packets.TCP_ACK
    assert reset.acknowledgment == 6
    assert guest.stack.connection_count == 0


def test_guest_rst_removes_connection(stack: MmdsStack) -> None:
    guest = Guest(stack)
    guest.connect()
    guest.send(packets.TCP_RST)
    assert stack.connection_count == 0


def test_connection_limit(stack: MmdsStack) -> None:
    for port in range(MAX_CONNECTIONS):
        Guest(stack, 10000 + port).connect()
    assert stack.connection_count == MAX_CONNECTIONS
    (reset,) = Guest(stack, 20000).send(packets.TCP_SYN)
    assert reset.flags & packets.TCP_RST
    assert stack.connection_count == MAX_CONNECTIONS


def test_unacknowledged_data_is_retransmitted_then_reset(
    stack: MmdsStack, clock: FakeClock
) -> None:
    guest = Guest(stack)
    guest.connect()
    (response,) = guest.get()
    stack.retransmit_due()
    assert drain(stack) == []
    for _ in range(MAX_RETRANSMISSIONS):
        clock.now += RETRANSMIT_TIMEOUT_S
        stack.retransmit_due()
        (again,) = drain(stack)
        assert again.sequence == response.sequence
        assert again.payload == response.payload
    clock.now += RETRANSMIT_TIMEOUT_S
    stack.retransmit_due()
    (reset,) = drain(stack)
    assert reset.flags & packets.TCP_RST
    assert stack.connection_count == 0


def test_corrupted_frame_is_counted_and_dropped(stack: MmdsStack) -> None:
    frame = bytearray(Guest(stack).frame(packets.TcpSegment(1, 80, 0, 0, packets.TCP_SYN, 0,
                                                            b"")))
    frame[-1] ^= 0xFF
    stack.receive_frame(bytes(frame))
    assert stack.pop_frame() is None
    assert stack.metrics.rx_accepted_err == 1
