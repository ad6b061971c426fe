"""Ethernet II, ARP, IPv4 and TCP headers: parsing and building, with checksums.

Only what the MMDS stack needs: untagged Ethernet II frames, ARP for IPv4 over
Ethernet (RFC 826), IPv4 without fragmentation (RFC 791) and TCP segments (RFC
9293) whose only option we send or read is the maximum segment size. Parsers
raise `PacketError` naming the field and value that broke a rule; the stack
counts such frames and drops them.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Final

# IEEE 802.3 Ethernet II header: destination MAC, source MAC, EtherType.
ETHERNET_HEADER: Final = struct.Struct("!6s6sH")
ETHERTYPE_IPV4: Final = 0x0800
ETHERTYPE_ARP: Final = 0x0806
MAC_SIZE: Final = 6
BROADCAST_MAC: Final = b"\xff" * MAC_SIZE

# RFC 826 ARP packet for IPv4 over Ethernet: htype, ptype, hlen, plen, oper, sha, spa,
# tha, tpa.
ARP_PACKET: Final = struct.Struct("!HHBBH6s4s6s4s")
ARP_HTYPE_ETHERNET: Final = 1
ARP_OPER_REQUEST: Final = 1
ARP_OPER_REPLY: Final = 2
IPV4_ADDRESS_SIZE: Final = 4

# RFC 791 section 3.1: the 20-byte IPv4 header without options.
IPV4_HEADER: Final = struct.Struct("!BBHHHBBH4s4s")
IPV4_VERSION: Final = 4
IPV4_MIN_IHL: Final = 5
IPV4_FLAG_DF: Final = 0x4000
IPV4_FLAG_MF: Final = 0x2000
IPV4_FRAGMENT_OFFSET_MASK: Final = 0x1FFF
IPV4_DEFAULT_TTL: Final = 64
IP_PROTOCOL_TCP: Final = 6

# RFC 9293 section 3.1: the 20-byte TCP header without options.
TCP_HEADER: Final = struct.Struct("!HHIIBBHHH")
TCP_MIN_DATA_OFFSET: Final = 5
TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10
# RFC 9293 section 3.2: option kinds; MSS is kind 2, length 4.
TCP_OPTION_END: Final = 0
TCP_OPTION_NOP: Final = 1
TCP_OPTION_MSS: Final = 2
TCP_OPTION_MSS_LENGTH: Final = 4
# RFC 9293 section 3.7.1: the MSS a peer that sends no MSS option accepts.
TCP_DEFAULT_MSS: Final = 536

SEQUENCE_MODULUS: Final = 1 << 32


class PacketError(Exception):
    """A frame that breaks a header rule; the caller drops it and counts it."""


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """Return the 16-bit one's complement of the one's complement sum of `data` (RFC 1071)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    # The sum is taken over 16-bit words in host byte order; RFC 1071 section 2(B) shows
    # the one's complement sum is independent of byte order, so reading the result's
    # bytes back in host order gives the checksum in network order.
    total = sum(memoryview(bytes(data)).cast("H"))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    checksum = ~total & 0xFFFF
    return int.from_bytes(checksum.to_bytes(2, sys.byteorder), "big")


# Ethernet ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EthernetFrame:
    destination: bytes
    source: bytes
    ethertype: int
    payload: bytes


def parse_ethernet(frame: bytes) -> EthernetFrame:
    """Split an Ethernet II frame into its header fields and payload."""
    if len(frame) < ETHERNET_HEADER.size:
        raise PacketError(
            f"Ethernet frame of {len(frame)} bytes is shorter than its "
            f"{ETHERNET_HEADER.size}-byte header"
        )
    destination, source, ethertype = ETHERNET_HEADER.unpack_from(frame)
    return EthernetFrame(destination, source, ethertype, bytes(frame[ETHERNET_HEADER.size :]))


def build_ethernet(destination: bytes, source: bytes, ethertype: int, payload: bytes) -> bytes:
    return ETHERNET_HEADER.pack(destination, source, ethertype) + payload


# ARP -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArpPacket:
    operation: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes


def parse_arp(payload: bytes) -> ArpPacket:
    """Parse an ARP packet for IPv4 over Ethernet, or raise PacketError."""
    if len(payload) < ARP_PACKET.size:
        raise PacketError(
            f"ARP packet of {len(payload)} bytes is shorter than {ARP_PACKET.size} bytes"
        )
    htype, ptype, hlen, plen, operation, sha, spa, tha, tpa = ARP_PACKET.unpack_from(payload)
    if (htype, ptype, hlen, plen) != (
        ARP_HTYPE_ETHERNET, ETHERTYPE_IPV4, MAC_SIZE, IPV4_ADDRESS_SIZE
    ):
        raise PacketError(
            f"ARP packet for hardware type {htype}, protocol {ptype:#06x}, address sizes "
            f"{hlen}/{plen}: only IPv4 over Ethernet (1, 0x0800, 6/4) is served"
        )
    return ArpPacket(operation, sha, spa, tha, tpa)


def build_arp(packet: ArpPacket) -> bytes:
    return ARP_PACKET.pack(
        ARP_HTYPE_ETHERNET, ETHERTYPE_IPV4, MAC_SIZE, IPV4_ADDRESS_SIZE, packet.operation,
        packet.sender_mac, packet.sender_ip, packet.target_mac, packet.target_ip,
    )


# IPv4 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ipv4Packet:
    source: bytes
    destination: bytes
    protocol: int
    payload: bytes


def peek_ipv4_destination(payload: bytes) -> tuple[bytes, int] | None:
    """Return (destination address, protocol) of an IPv4 header, or None if it is too short.

    The header is not validated: this only decides where a frame goes.
    """
    if len(payload) < IPV4_HEADER.size or payload[0] >> 4 != IPV4_VERSION:
        return None
    fields = IPV4_HEADER.unpack_from(payload)
    return fields[9], fields[6]


def parse_ipv4(payload: bytes) -> Ipv4Packet:
    """Validate an IPv4 header (version, lengths, checksum, no fragments) and split it off."""
    if len(payload) < IPV4_HEADER.size:
        raise PacketError(f"IPv4 packet of {len(payload)} bytes is shorter than 20 bytes")
    (version_ihl, _tos, total_length, _ident, flags_offset, _ttl, protocol, _checksum,
     source, destination) = IPV4_HEADER.unpack_from(payload)
    version, ihl = version_ihl >> 4, version_ihl & 0xF
    header_length = ihl * 4
    if version != IPV4_VERSION or ihl < IPV4_MIN_IHL:
        raise PacketError(f"IPv4 header has version {version} and IHL {ihl}; expected 4, >= 5")
    if not header_length <= total_length <= len(payload):
        raise PacketError(
            f"IPv4 total length {total_length} is not between the header length "
            f"{header_length} and the {len(payload)} bytes received"
        )
    if internet_checksum(payload[:header_length]) != 0:
        raise PacketError("IPv4 header checksum is invalid")
    if flags_offset & (IPV4_FLAG_MF | IPV4_FRAGMENT_OFFSET_MASK):
        raise PacketError(f"IPv4 fragment (flags and offset {flags_offset:#06x}) is not served")
    return Ipv4Packet(source, destination, protocol, bytes(payload[header_length:total_length]))


def build_ipv4(
    source: bytes, destination: bytes, protocol: int, payload: bytes, identification: int
) -> bytes:
    """Return a 20-byte IPv4 header with DF set and its checksum, followed by `payload`."""
    header = bytearray(
        IPV4_HEADER.pack(
            (IPV4_VERSION << 4) | IPV4_MIN_IHL, 0, IPV4_HEADER.size + len(payload),
            identification & 0xFFFF, IPV4_FLAG_DF, IPV4_DEFAULT_TTL, protocol, 0,
            source, destination,
        )
    )
    header[10:12] = internet_checksum(header).to_bytes(2, "big")
    return bytes(header) + payload


# TCP -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpSegment:
    source_port: int
    destination_port: int
    sequence: int
    acknowledgment: int
    flags: int
    window: int
    payload: bytes
    mss: int | None = None

    @property
    def sequence_length(self) -> int:
        """Sequence numbers the segment occupies: its payload plus one for SYN and for FIN."""
        return len(self.payload) + bool(self.flags & TCP_SYN) + bool(self.flags & TCP_FIN)


def _pseudo_header(source: bytes, destination: bytes, length: int) -> bytes:
    """RFC 9293 section 3.1: the IPv4 pseudo-header that the TCP checksum covers."""
    return source + destination + struct.pack("!BBH", 0, IP_PROTOCOL_TCP, length)


def parse_tcp(packet: Ipv4Packet) -> TcpSegment:
    """Validate a TCP segment (length, data offset, checksum) carried in `packet`."""
    data = packet.payload
    if len(data) < TCP_HEADER.size:
        raise PacketError(f"TCP segment of {len(data)} bytes is shorter than 20 bytes")
    if internet_checksum(_pseudo_header(packet.source, packet.destination, len(data)) + data):
        raise PacketError("TCP checksum is invalid")
    (source_port, destination_port, sequence, acknowledgment, offset_byte, flags, window,
     _checksum, _urgent) = TCP_HEADER.unpack_from(data)
    header_length = (offset_byte >> 4) * 4
    if not TCP_HEADER.size <= header_length <= len(data):
        raise PacketError(
            f"TCP data offset {header_length} bytes is not between 20 and the segment "
            f"length {len(data)}"
        )
    mss = _read_mss_option(data[TCP_HEADER.size : header_length])
    return TcpSegment(source_port, destination_port, sequence, acknowledgment, flags, window,
                      bytes(data[header_length:]), mss)


def _read_mss_option(options: bytes) -> int | None:
    position = 0
    while position < len(options):
        kind = options[position]
        if kind == TCP_OPTION_END:
            return None
        if kind == TCP_OPTION_NOP:
            position += 1
            continue
        if position + 1 >= len(options) or options[position + 1] < 2:
            raise PacketError(f"TCP option {kind} at offset {position} has no valid length")
        length = options[position + 1]
        if kind == TCP_OPTION_MSS and length == TCP_OPTION_MSS_LENGTH:
            return int.from_bytes(options[position + 2 : position + 4], "big")
        position += length
    return None


def build_tcp(segment: TcpSegment, source_ip: bytes, destination_ip: bytes) -> bytes:
    """Return the TCP header (with an MSS option when `segment.mss` is set) and payload."""
    options = b""
    if segment.mss is not None:
        options = struct.pack("!BBH", TCP_OPTION_MSS, TCP_OPTION_MSS_LENGTH, segment.mss)
    offset_words = (TCP_HEADER.size + len(options)) // 4
    header = bytearray(
        TCP_HEADER.pack(
            segment.source_port, segment.destination_port, segment.sequence,
            segment.acknowledgment, offset_words << 4, segment.flags, segment.window, 0, 0,
        )
        + options
    )
    body = bytes(header) + segment.payload
    checksum = internet_checksum(_pseudo_header(source_ip, destination_ip, len(body)) + body)
    header[16:18] = checksum.to_bytes(2, "big")
    return bytes(header) + segment.payload
