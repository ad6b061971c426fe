"""Ethernet, ARP, IPv4 and TCP parsing and building for the MMDS stack, on frames built here."""

from __future__ import annotations

import struct

import pytest

from vmm.mmds import packets

SOURCE_IP = bytes([169, 254, 0, 2])
DESTINATION_IP = bytes([169, 254, 169, 254])


def test_checksum_matches_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2, so the checksum is 220d.
    assert packets.internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_checksum_of_odd_length_pads_with_zero() -> None:
    assert packets.internet_checksum(b"\x01") == packets.internet_checksum(b"\x01\x00")


def test_ipv4_round_trip_and_checksum() -> None:
    packet = packets.build_ipv4(SOURCE_IP, DESTINATION_IP, packets.IP_PROTOCOL_TCP, b"data", 9)
    assert packets.internet_checksum(packet[:20]) == 0
    parsed = packets.parse_ipv4(packet)
    assert parsed.source == SOURCE_IP
    assert parsed.destination == DESTINATION_IP
    assert parsed.payload == b"data"


def test_ipv4_trailing_ethernet_padding_is_ignored() -> None:
    packet = packets.build_ipv4(SOURCE_IP, DESTINATION_IP, packets.IP_PROTOCOL_TCP, b"x", 1)
    assert packets.parse_ipv4(packet + bytes(10)).payload == b"x"


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [(0, 0x65, "version 6"), (10, 0, "checksum"), (6, 0x20, "fragment"), (2, 0xFF, "total")],
)
def test_ipv4_rejects_broken_header(offset: int, value: int, message: str) -> None:
    packet = bytearray(packets.build_ipv4(SOURCE_IP, DESTINATION_IP, 6, b"abcd", 1))
    packet[offset] = value
    if offset != 10:
        packet[10:12] = b"\0\0"
        packet[10:12] = packets.internet_checksum(packet[:20]).to_bytes(2, "big")
    with pytest.raises(packets.PacketError, match=message):
        packets.parse_ipv4(bytes(packet))


def _tcp_packet(segment: packets.TcpSegment) -> packets.Ipv4Packet:
    return packets.Ipv4Packet(SOURCE_IP, DESTINATION_IP, packets.IP_PROTOCOL_TCP,
                              packets.build_tcp(segment, SOURCE_IP, DESTINATION_IP))


def test_tcp_round_trip_with_mss_option() -> None:
    segment = packets.TcpSegment(40000, 80, 7, 0, packets.TCP_SYN, 64240, b"", 1460)
    parsed = packets.parse_tcp(_tcp_packet(segment))
    assert parsed == segment
    assert parsed.sequence_length == 1


def test_tcp_rejects_bad_checksum() -> None:
    packet = _tcp_packet(packets.TcpSegment(1, 80, 1, 1, packets.TCP_ACK, 100, b"hello"))
    corrupted = bytearray(packet.payload)
    corrupted[-1] ^= 0xFF
    with pytest.raises(packets.PacketError, match="checksum"):
        packets.parse_tcp(packets.Ipv4Packet(SOURCE_IP, DESTINATION_IP, 6, bytes(corrupted)))


def test_tcp_rejects_data_offset_past_segment() -> None:
    raw = bytearray(struct.pack("!HHIIBBHHH", 1, 80, 0, 0, 15 << 4, packets.TCP_ACK, 0, 0, 0))
    checksum = packets.internet_checksum(
        SOURCE_IP + DESTINATION_IP + struct.pack("!BBH", 0, 6, len(raw)) + raw
    )
    raw[16:18] = checksum.to_bytes(2, "big")
    with pytest.raises(packets.PacketError, match="data offset 60"):
        packets.parse_tcp(packets.Ipv4Packet(SOURCE_IP, DESTINATION_IP, 6, bytes(raw)))


def test_arp_round_trip() -> None:
    arp = packets.ArpPacket(packets.ARP_OPER_REQUEST, b"\xaa" * 6, SOURCE_IP, bytes(6),
                            DESTINATION_IP)
    assert packets.parse_arp(packets.build_arp(arp)) == arp


def test_arp_rejects_other_protocols() -> None:
    raw = bytearray(packets.build_arp(packets.ArpPacket(1, b"\xaa" * 6, SOURCE_IP, bytes(6),
                                                        DESTINATION_IP)))
    raw[2:4] = (0x86DD).to_bytes(2, "big")
    with pytest.raises(packets.PacketError, match="only IPv4 over Ethernet"):
        packets.parse_arp(bytes(raw))


def test_ethernet_rejects_short_frame() -> None:
    with pytest.raises(packets.PacketError, match="13 bytes"):
        packets.parse_ethernet(bytes(13))
