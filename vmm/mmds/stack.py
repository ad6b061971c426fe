"""The MMDS network stack behind one network interface: ARP, IPv4 and TCP to HTTP.

The net device hands over every frame from the guest that `is_for_mmds`
accepts: an ARP packet asking for the MMDS address, or an IPv4 packet to that
address. `receive_frame` answers ARP requests, checks IPv4 and TCP headers and
drives the TCP connections; the frames to send back wait in a queue that the
net device drains into the guest's receive queue (`pop_frame`).

The queue is not bounded by a count: each connection only sends within the
window the guest advertises, so the queue holds at most that much per
connection, and at most MAX_CONNECTIONS connections exist at a time (a SYN
beyond that gets an RST).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Final

from vmm.mmds.http import HttpSession, MmdsService
from vmm.mmds.packets import (
    ARP_OPER_REPLY,
    ARP_OPER_REQUEST,
    ARP_PACKET,
    ETHERNET_HEADER,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    IP_PROTOCOL_TCP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    ArpPacket,
    PacketError,
    TcpSegment,
    build_arp,
    build_ethernet,
    build_ipv4,
    build_tcp,
    parse_arp,
    parse_ethernet,
    parse_ipv4,
    parse_tcp,
    peek_ipv4_destination,
)
from vmm.mmds.tcp import Endpoint, TcpConnection, reset_for

log = logging.getLogger(__name__)

DEFAULT_IPV4_ADDRESS: Final = "169.254.169.254"
# The MMDS's own MAC address in ARP replies and frames it sends: locally administered
# (bit 1 of the first octet set), unicast (bit 0 clear), ending in the default address.
MMDS_MAC: Final = bytes.fromhex("06 01 a9 fe a9 fe")
MAX_CONNECTIONS: Final = 30
# The HTTP port; segments to other ports get an RST.
HTTP_PORT: Final = 80


@dataclass
class MmdsMetrics:
    """Counters under Firecracker's "mmds" metric names."""

    rx_accepted: int = 0
    rx_accepted_err: int = 0
    rx_accepted_unusual: int = 0
    rx_bad_eth: int = 0
    rx_count: int = 0
    tx_bytes: int = 0
    tx_count: int = 0
    tx_errors: int = 0
    tx_frames: int = 0
    connections_created: int = 0
    connections_destroyed: int = 0


class MmdsStack:
    """ARP, IPv4 and TCP for the MMDS address on one interface; not thread-safe.

    The net device calls it with its own lock held.
    """

    def __init__(
        self,
        service: MmdsService,
        ipv4_address: str = DEFAULT_IPV4_ADDRESS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.ipv4_address = ipaddress.IPv4Address(ipv4_address).packed
        self.mac = MMDS_MAC
        self._clock = clock
        self._connections: dict[Endpoint, tuple[TcpConnection, bytes]] = {}
        self._output: collections.deque[bytes] = collections.deque()
        self._ip_identification = 0
        self.metrics = MmdsMetrics()

    def __repr__(self) -> str:
        return f"MmdsStack({ipaddress.IPv4Address(self.ipv4_address)})"

    # Frame classification ------------------------------------------------------------------

    def is_for_mmds(self, frame: bytes) -> bool:
        """Tell whether a frame from the guest goes to MMDS instead of the tap.

        `frame` may be just the start of the frame: the Ethernet header and the
        first 28 bytes of its payload decide.
        """
        if len(frame) < ETHERNET_HEADER.size:
            return False
        ethertype = int.from_bytes(frame[12:14], "big")
        payload = bytes(frame[ETHERNET_HEADER.size :])
        if ethertype == ETHERTYPE_ARP:
            return len(payload) >= ARP_PACKET.size and payload[24:28] == self.ipv4_address
        if ethertype == ETHERTYPE_IPV4:
            peeked = peek_ipv4_destination(payload)
            return peeked is not None and peeked == (self.ipv4_address, IP_PROTOCOL_TCP)
        return False

    # Input -----------------------------------------------------------------------------------

    def receive_frame(self, frame: bytes) -> None:
        """Process one frame from the guest; replies are queued for `pop_frame`."""
        self.metrics.rx_count += 1
        try:
            ethernet = parse_ethernet(frame)
            if ethernet.ethertype == ETHERTYPE_ARP:
                self._receive_arp(ethernet.source, ethernet.payload)
            elif ethernet.ethertype == ETHERTYPE_IPV4:
                self._receive_ipv4(ethernet.source, ethernet.payload)
            else:
                self.metrics.rx_bad_eth += 1
                return
        except PacketError as error:
            self.metrics.rx_accepted_err += 1
            log.debug("%r: dropped a frame: %s", self, error)
            return
        self.metrics.rx_accepted += 1

    def _receive_arp(self, source_mac: bytes, payload: bytes) -> None:
        request = parse_arp(payload)
        if request.operation != ARP_OPER_REQUEST or request.target_ip != self.ipv4_address:
            self.metrics.rx_accepted_unusual += 1
            return
        reply = ArpPacket(ARP_OPER_REPLY, self.mac, self.ipv4_address, request.sender_mac,
                          request.sender_ip)
        self._emit(build_ethernet(source_mac, self.mac, ETHERTYPE_ARP, build_arp(reply)))

    def _receive_ipv4(self, source_mac: bytes, payload: bytes) -> None:
        packet = parse_ipv4(payload)
        if packet.destination != self.ipv4_address or packet.protocol != IP_PROTOCOL_TCP:
            self.metrics.rx_accepted_unusual += 1
            return
        segment = parse_tcp(packet)
        endpoint = Endpoint(packet.source, segment.source_port)
        entry = self._connections.get(endpoint)
        if entry is None:
            self._receive_without_connection(endpoint, source_mac, segment)
            return
        connection, _mac = entry
        self._send_segments(endpoint, source_mac, connection.receive(segment))
        self._forget_if_closed(endpoint, connection)

    def _receive_without_connection(
        self, endpoint: Endpoint, source_mac: bytes, segment: TcpSegment
    ) -> None:
        is_open_request = segment.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
        if (
            is_open_request
            and segment.destination_port == HTTP_PORT
            and len(self._connections) < MAX_CONNECTIONS
        ):
            connection = TcpConnection(segment, HttpSession(self.service), self._clock)
            self._connections[endpoint] = (connection, source_mac)
            self.metrics.connections_created += 1
            self._send_segments(endpoint, source_mac, [connection.syn_ack()])
            return
        reset = reset_for(segment)
        if reset is not None:
            self._send_segments(endpoint, source_mac, [reset])

    def _forget_if_closed(self, endpoint: Endpoint, connection: TcpConnection) -> None:
        if connection.is_closed:
            del self._connections[endpoint]
            self.metrics.connections_destroyed += 1

    # Output ----------------------------------------------------------------------------------

    def _send_segments(
        self, endpoint: Endpoint, destination_mac: bytes, segments: list[TcpSegment]
    ) -> None:
        for segment in segments:
            self._ip_identification = (self._ip_identification + 1) & 0xFFFF
            tcp = build_tcp(segment, self.ipv4_address, endpoint.address)
            ip = build_ipv4(self.ipv4_address, endpoint.address, IP_PROTOCOL_TCP, tcp,
                            self._ip_identification)
            self._emit(build_ethernet(destination_mac, self.mac, ETHERTYPE_IPV4, ip))
            self.metrics.tx_bytes += len(segment.payload)

    def _emit(self, frame: bytes) -> None:
        self._output.append(frame)
        self.metrics.tx_frames += 1

    @property
    def has_output(self) -> bool:
        return bool(self._output)

    def pop_frame(self) -> bytes | None:
        """Return the next frame for the guest, or None when nothing waits."""
        if not self._output:
            return None
        self.metrics.tx_count += 1
        return self._output.popleft()

    def push_back_frame(self, frame: bytes) -> None:
        """Return a frame that `pop_frame` gave out but the guest had no room for."""
        self.metrics.tx_count -= 1
        self._output.appendleft(frame)

    # Timers ----------------------------------------------------------------------------------

    def retransmit_due(self) -> None:
        """Send again what connections have had unacknowledged for too long."""
        for endpoint, (connection, mac) in list(self._connections.items()):
            self._send_segments(endpoint, mac, connection.retransmit_due())
            self._forget_if_closed(endpoint, connection)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def metrics_snapshot(self) -> dict[str, int | float]:
        return dict(asdict(self.metrics))
