"""A passive TCP endpoint for MMDS: one connection per guest (address, port) pair.

The guest always opens the connection, so the endpoint implements the
passive side of RFC 9293 only:

- Opening: a SYN creates the connection and gets a SYN-ACK with an MSS option.
- Receiving: in-order data is accepted up to the receive window and handed to
  the HTTP session. Out-of-order or duplicate segments are dropped and
  answered with an ACK for the next expected byte, so the guest retransmits.
- Sending: response bytes are sent in segments of at most the guest's MSS,
  within the window the guest advertises. Unacknowledged data is sent again,
  from the oldest byte, when `retransmit_due` finds it RETRANSMIT_TIMEOUT_S old;
  after MAX_RETRANSMISSIONS the connection is reset.
- Closing: a FIN from the guest is acknowledged and answered with our FIN
  once the response is sent; when the HTTP session asks to close, our FIN
  goes first. The connection is removed when both FINs are acknowledged,
  without TIME-WAIT: a late duplicate gets an RST, which the guest ignores.
- RST from the guest removes the connection.

Buffers are bounded: at most RECEIVE_WINDOW unread bytes (the advertised
window) and the responses to the requests in that window.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from typing import Callable, Final

from vmm.mmds.http import HttpSession
from vmm.mmds.packets import (
    SEQUENCE_MODULUS,
    TCP_ACK,
    TCP_DEFAULT_MSS,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TcpSegment,
)

# Receive window we advertise, and so the most request bytes buffered per connection.
RECEIVE_WINDOW: Final = 16 * 1024
# MSS we advertise and the largest segment we send: a 1500-byte MTU less 40 header bytes.
OUR_MSS: Final = 1460
RETRANSMIT_TIMEOUT_S: Final = 1.0
MAX_RETRANSMISSIONS: Final = 5


def seq_add(value: int, delta: int) -> int:
    return (value + delta) % SEQUENCE_MODULUS


def seq_diff(later: int, earlier: int) -> int:
    """Return `later - earlier` in sequence space, as a signed 32-bit distance."""
    difference = (later - earlier) % SEQUENCE_MODULUS
    return difference - SEQUENCE_MODULUS if difference >= SEQUENCE_MODULUS // 2 else difference


class TcpState(enum.Enum):
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    CLOSED = "CLOSED"


@dataclass(frozen=True)
class Endpoint:
    """The guest's side of a connection: IPv4 address and TCP port."""

    address: bytes
    port: int


def reset_for(segment: TcpSegment) -> TcpSegment | None:
    """Return the RST that answers `segment` for a connection that does not exist.

    RFC 9293 section 3.5.2: an RST is never answered; a segment with ACK gets
    an RST at its acknowledgment number, one without gets RST-ACK covering it.
    """
    if segment.flags & TCP_RST:
        return None
    if segment.flags & TCP_ACK:
        return TcpSegment(segment.destination_port, segment.source_port,
                          segment.acknowledgment, 0, TCP_RST, 0, b"")
    return TcpSegment(segment.destination_port, segment.source_port, 0,
                      seq_add(segment.sequence, segment.sequence_length),
                      TCP_RST | TCP_ACK, 0, b"")


class TcpConnection:
    """The server side of one connection; `receive` returns the segments to send."""

    def __init__(
        self,
        syn: TcpSegment,
        session: HttpSession,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local_port = syn.destination_port
        self.remote_port = syn.source_port
        self.session = session
        self._clock = clock
        self.state = TcpState.SYN_RECEIVED
        self.receive_next = seq_add(syn.sequence, 1)
        self.initial_sequence = int.from_bytes(os.urandom(4), "big")
        self.send_unacknowledged = self.initial_sequence
        # Sequence number of the next new byte: the SYN occupies the initial one.
        self.send_next = seq_add(self.initial_sequence, 1)
        self.send_buffer = bytearray()  # bytes from send_unacknowledged + SYN/FIN offsets
        self.peer_window = syn.window
        self.peer_mss = min(syn.mss or TCP_DEFAULT_MSS, OUR_MSS)
        self.close_requested = False
        self.fin_sent = False
        self.fin_acknowledged = False
        self.peer_fin_received = False
        self.last_progress = clock()
        self.retransmissions = 0

    # Segment construction --------------------------------------------------------------

    def _segment(self, sequence: int, flags: int, payload: bytes = b"",
                 mss: int | None = None) -> TcpSegment:
        # Received bytes go to the HTTP session at once, so the full window stays open.
        return TcpSegment(self.local_port, self.remote_port, sequence, self.receive_next,
                          flags | TCP_ACK, RECEIVE_WINDOW, payload, mss)

    def syn_ack(self) -> TcpSegment:
        return self._segment(self.initial_sequence, TCP_SYN, mss=OUR_MSS)

    def _ack(self) -> TcpSegment:
        return self._segment(self.send_next, 0)

    @property
    def is_closed(self) -> bool:
        return self.state is TcpState.CLOSED

    # Receiving ----------------------------------------------------------------------------

    def receive(self, segment: TcpSegment) -> list[TcpSegment]:
        """Apply one segment from the guest and return the segments to send back."""
        if segment.flags & TCP_RST:
            if self._in_window(segment.sequence):
                self.state = TcpState.CLOSED
            return []
        if segment.flags & TCP_SYN:
            return self._receive_syn(segment)
        if not segment.flags & TCP_ACK:
            return []
        self._receive_ack(segment)
        if self.state is TcpState.SYN_RECEIVED:
            # The ACK does not acknowledge our SYN (RFC 9293 section 3.10.7.4).
            reset = reset_for(segment)
            return [] if reset is None else [reset]
        acknowledgment = self._receive_payload(segment)
        replies = self._send_pending()
        self._close_when_done()
        # Every segment we send carries the acknowledgment, so a bare ACK goes out only
        # when there is nothing else to send.
        return replies or acknowledgment

    def _in_window(self, sequence: int) -> bool:
        return 0 <= seq_diff(sequence, self.receive_next) <= RECEIVE_WINDOW

    def _receive_syn(self, segment: TcpSegment) -> list[TcpSegment]:
        # A retransmitted SYN of this connection gets the SYN-ACK again; any other SYN
        # means the guest lost the connection, so it is reset.
        expected = seq_add(segment.sequence, 1) == self.receive_next
        if self.state is TcpState.SYN_RECEIVED and expected:
            return [self.syn_ack()]
        self.state = TcpState.CLOSED
        return [TcpSegment(self.local_port, self.remote_port, self.send_next, 0, TCP_RST, 0,
                           b"")]

    def _receive_ack(self, segment: TcpSegment) -> None:
        acknowledged = seq_diff(segment.acknowledgment, self.send_unacknowledged)
        outstanding = seq_diff(self._send_limit(), self.send_unacknowledged)
        if acknowledged <= 0 or acknowledged > outstanding:
            self.peer_window = segment.window
            return
        if self.state is TcpState.SYN_RECEIVED:
            self.state = TcpState.ESTABLISHED
            acknowledged -= 1  # the SYN
        data_acknowledged = min(acknowledged, len(self.send_buffer))
        del self.send_buffer[:data_acknowledged]
        if self.fin_sent and segment.acknowledgment == self._send_limit():
            self.fin_acknowledged = True
        self.send_unacknowledged = segment.acknowledgment
        self.peer_window = segment.window
        self.last_progress = self._clock()
        self.retransmissions = 0

    def _send_limit(self) -> int:
        """Return one past the last sequence number we have sent (FIN included)."""
        return seq_add(self.send_next, int(self.fin_sent))

    def _receive_payload(self, segment: TcpSegment) -> list[TcpSegment]:
        if not segment.payload and not segment.flags & TCP_FIN:
            return []
        if segment.sequence != self.receive_next or self.peer_fin_received:
            return [self._ack()]
        payload = segment.payload[:RECEIVE_WINDOW]
        self.receive_next = seq_add(self.receive_next, len(payload))
        response = self.session.receive(payload) if payload else b""
        if segment.flags & TCP_FIN and len(payload) == len(segment.payload):
            self.receive_next = seq_add(self.receive_next, 1)
            self.peer_fin_received = True
            response += self.session.receive(b"")
        self.send_buffer += response
        if self.session.wants_close or self.peer_fin_received:
            self.close_requested = True
        return [self._ack()]

    # Sending -------------------------------------------------------------------------------

    def _send_pending(self) -> list[TcpSegment]:
        """Send unsent buffered bytes within the peer's window, then our FIN when due."""
        segments: list[TcpSegment] = []
        if self.fin_sent:
            return segments
        in_flight = seq_diff(self.send_next, self.send_unacknowledged)
        while in_flight < len(self.send_buffer) and in_flight < self.peer_window:
            size = min(self.peer_mss, len(self.send_buffer) - in_flight,
                       self.peer_window - in_flight)
            payload = bytes(self.send_buffer[in_flight : in_flight + size])
            flags = TCP_PSH if in_flight + size == len(self.send_buffer) else 0
            segments.append(self._segment(self.send_next, flags, payload))
            self.send_next = seq_add(self.send_next, size)
            in_flight += size
        if self.close_requested and not self.fin_sent and in_flight == len(self.send_buffer):
            segments.append(self._segment(self.send_next, TCP_FIN))
            self.fin_sent = True
        return segments

    def _close_when_done(self) -> None:
        if self.fin_acknowledged and self.peer_fin_received:
            self.state = TcpState.CLOSED

    def retransmit_due(self) -> list[TcpSegment]:
        """Send unacknowledged bytes again if they are RETRANSMIT_TIMEOUT_S old.

        Returns the segments to send, or an RST after MAX_RETRANSMISSIONS tries,
        which also closes the connection.
        """
        outstanding = seq_diff(self._send_limit(), self.send_unacknowledged)
        if outstanding <= 0 or self._clock() - self.last_progress < RETRANSMIT_TIMEOUT_S:
            return []
        if self.retransmissions >= MAX_RETRANSMISSIONS:
            self.state = TcpState.CLOSED
            return [TcpSegment(self.local_port, self.remote_port, self.send_next, 0, TCP_RST,
                               0, b"")]
        self.retransmissions += 1
        self.last_progress = self._clock()
        if self.state is TcpState.SYN_RECEIVED:
            return [self.syn_ack()]
        # Go back to the oldest unacknowledged byte and send the window again.
        self.send_next = self.send_unacknowledged
        self.fin_sent = False
        return self._send_pending()
