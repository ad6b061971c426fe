"""virtio-vsock, stream sockets between the guest and the host (virtio 1.2 section 5.10).

The guest driver sends packets on the tx queue and offers empty buffers on the
rx queue; every packet starts with the 44-byte header of 5.10.6. The device is
the host end (CID 2) of each connection: it keeps one `Connection` per
(host port, guest port) pair and relays its bytes to a `HostStream` that a
host back end provides (`vsock_unix.py` maps them to Unix sockets).

Connections
-----------
A guest-initiated connection starts with OP_REQUEST to host port P; the device
asks `HostEndpoint.connect(P)` for a stream and answers OP_RESPONSE, or OP_RST
when nobody listens. A host-initiated connection arrives through
`connect_from_host`; the device sends OP_REQUEST to the guest port and, once
the guest answers OP_RESPONSE, calls `HostStream.confirm` with the host port it
picked. OP_SHUTDOWN carries the two half-close flags; OP_RST ends a connection
at once. A host stream that fails only resets its own connection.

Flow control (5.10.6.3)
-----------------------
Each side advertises `buf_alloc`, its receive buffer, and `fwd_cnt`, the bytes
it has consumed. A sender keeps `tx_cnt - peer_fwd_cnt <= peer_buf_alloc`.
Towards the guest, the device reads from the host stream only as much as that
credit allows, so host data waits in the host socket. From the guest, bytes
the host stream does not take at once wait in `to_host`, bounded by the
device's own `buf_alloc`; as they drain, `fwd_cnt` grows and the device sends
OP_CREDIT_UPDATE once a quarter of the buffer has been consumed unreported.

Threads: the event loop calls `on_stream_ready` and `process_queue`; a vCPU
may call `process_queue` too. Every entry point holds the device lock.
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
from dataclasses import dataclass, field
from typing import Callable, Final, Protocol

from vmm.devices.virtio.device import VIRTIO_RING_F_EVENT_IDX, VirtioDevice, feature_bit
from vmm.devices.virtio.queue import Descriptor, DescriptorChain, Queue
from vmm.memory import GuestMemory

logger = logging.getLogger(__name__)

# 5.10.1 Device ID.
VIRTIO_ID_VSOCK: Final = 19
# 5.10.2 Virtqueues: rx, tx, event.
RX_QUEUE_INDEX: Final = 0
TX_QUEUE_INDEX: Final = 1
EVENT_QUEUE_INDEX: Final = 2
VSOCK_QUEUE_SIZE: Final = 256

# 5.10.4 Device configuration layout: le64 guest_cid.
CONFIG_GUEST_CID_OFFSET: Final = 0
CONFIG_GUEST_CID_SIZE: Final = 8

# 5.10.4: CIDs 0-2 are reserved; 2 is the host (VMADDR_CID_HOST in linux/vm_sockets.h).
VMADDR_CID_HOST: Final = 2
# 5.10.4: the upper 32 bits of guest_cid are reserved and zero.
GUEST_CID_MAX: Final = 0xFFFF_FFFF

# 5.10.6 Device Operation: struct virtio_vsock_hdr {le64 src_cid; le64 dst_cid;
# le32 src_port; le32 dst_port; le32 len; le16 type; le16 op; le32 flags;
# le32 buf_alloc; le32 fwd_cnt;} is 44 bytes, packed.
PACKET_HEADER: Final = struct.Struct("<QQIIIHHIII")
VIRTIO_VSOCK_TYPE_STREAM: Final = 1


class Op(enum.IntEnum):
    """5.10.6 packet operations."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


# 5.10.6.4: OP_SHUTDOWN flags.
VIRTIO_VSOCK_SHUTDOWN_RCV: Final = 1
VIRTIO_VSOCK_SHUTDOWN_SEND: Final = 2

# Largest payload per packet in either direction: Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE.
MAX_PACKET_PAYLOAD: Final = 64 * 1024
# Receive buffer per connection that the device advertises as buf_alloc.
CONNECTION_BUFFER_SIZE: Final = 256 * 1024
# Consumed-but-unreported bytes that trigger an OP_CREDIT_UPDATE.
CREDIT_UPDATE_THRESHOLD: Final = CONNECTION_BUFFER_SIZE // 4
# Host ports the device assigns to host-initiated connections: the upper half of
# the 32-bit port space, so they do not meet the low ports guests connect to.
LOCAL_PORT_FIRST: Final = 1 << 31
LOCAL_PORT_LAST: Final = 0xFFFF_FFFE

ReadyCallback = Callable[[bool, bool], None]


@dataclass(frozen=True)
class PacketHeader:
    """One virtio_vsock_hdr (5.10.6); `length` is the payload length `len`."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    length: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return PACKET_HEADER.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.length,
            self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> PacketHeader:
        return cls(*PACKET_HEADER.unpack(raw))


class HostStream(Protocol):
    """The host end of one connection: a non-blocking byte stream.

    The back end calls `on_ready(readable, writable)` from the event loop when
    the stream is ready for what `set_interest` asked. Failures raise OSError.
    """

    on_ready: ReadyCallback | None

    def recv(self, max_bytes: int) -> bytes:
        """Return up to `max_bytes`; b"" at end of stream; BlockingIOError when none wait."""

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Send a prefix of `data` and return its length; BlockingIOError when full."""

    def shutdown_write(self) -> None:
        """Tell the host peer that no more bytes follow."""

    def set_interest(self, read: bool, write: bool) -> None:
        """Choose which readiness `on_ready` reports."""

    def confirm(self, local_port: int) -> None:
        """Tell a host-initiated peer that the guest accepted, naming the host port."""

    def close(self) -> None:
        """Close the stream; the back end stops reporting it."""


class HostEndpoint(Protocol):
    """The host side that guest-initiated connections reach."""

    def connect(self, port: int) -> HostStream:
        """Open a stream to whatever listens on host `port`, or raise OSError."""


class State(enum.Enum):
    """Connection state, from the host end's view."""

    REQUEST_SENT = "request sent"
    ESTABLISHED = "established"


@dataclass
class Connection:
    """One stream connection between host port `local_port` and guest port `peer_port`."""

    local_port: int
    peer_port: int
    stream: HostStream
    state: State
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    rx_cnt: int = 0
    fwd_cnt: int = 0
    reported_fwd_cnt: int = 0
    to_host: bytearray = field(default_factory=bytearray)
    host_readable: bool = False
    host_eof: bool = False
    guest_shut_send: bool = False
    guest_shut_recv: bool = False
    host_write_shut: bool = False
    credit_requested: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def peer_credit(self) -> int:
        """Return how many bytes the guest can take now (5.10.6.3)."""
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)

    def wants_host_data(self) -> bool:
        return (
            self.state is State.ESTABLISHED and not self.host_eof and not self.guest_shut_recv
        )


@dataclass(frozen=True)
class _Control:
    """A packet without payload waiting for an rx buffer."""

    local_port: int
    peer_port: int
    op: Op
    flags: int = 0


@dataclass
class VsockMetrics:
    """Counters for the metrics endpoint's "vsock" group; rx is towards the guest."""

    conns_added: int = 0
    conns_removed: int = 0
    conns_killed: int = 0
    host_connect_fails: int = 0
    rx_packets_count: int = 0
    rx_bytes_count: int = 0
    tx_packets_count: int = 0
    tx_bytes_count: int = 0
    tx_dropped_packets: int = 0
    rx_dropped_packets: int = 0
    host_write_fails: int = 0
    host_read_fails: int = 0


class Vsock(VirtioDevice):
    """A vsock device for guest `guest_cid`, relaying connections to `host`."""

    device_type = VIRTIO_ID_VSOCK
    queue_max_sizes = (VSOCK_QUEUE_SIZE,) * 3

    def __init__(self, guest_cid: int, host: HostEndpoint) -> None:
        super().__init__()
        if not VMADDR_CID_HOST < guest_cid <= GUEST_CID_MAX:
            raise ValueError(
                f"guest_cid {guest_cid} is not in {VMADDR_CID_HOST + 1}..{GUEST_CID_MAX}: "
                f"CIDs 0-2 are reserved (virtio 1.2 section 5.10.4)"
            )
        self.guest_cid = guest_cid
        self.host = host
        self.metrics = VsockMetrics()
        self.avail_features |= feature_bit(VIRTIO_RING_F_EVENT_IDX)
        self.config_space = bytearray(guest_cid.to_bytes(CONFIG_GUEST_CID_SIZE, "little"))
        self.connections: dict[tuple[int, int], Connection] = {}
        self._control: collections.deque[_Control] = collections.deque()
        self._spare_rx: DescriptorChain | None = None
        self._next_local_port = LOCAL_PORT_FIRST

    def __repr__(self) -> str:
        return f"Vsock(guest_cid={self.guest_cid}, connections={len(self.connections)})"

    # Lifecycle -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Close every host stream: a reset guest driver has forgotten its sockets."""
        with self.lock:
            for connection in list(self.connections.values()):
                self._remove(connection)
            self._control.clear()
            self._spare_rx = None
            super().reset()

    def close(self) -> None:
        """Close every host stream when the monitor shuts down."""
        with self.lock:
            for connection in list(self.connections.values()):
                self._remove(connection)

    # Queue notifications -------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        """Take the guest's packets (tx) or buffers (rx); the event queue's buffers stay."""
        with self.lock:
            if index == TX_QUEUE_INDEX:
                self._process_tx()
            if index in (RX_QUEUE_INDEX, TX_QUEUE_INDEX):
                self._fill_rx()

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise RuntimeError(f"{self!r} processes a queue before activation")
        return self.memory

    # Host side -----------------------------------------------------------------------------

    def connect_from_host(self, stream: HostStream, guest_port: int) -> bool:
        """Start a host-initiated connection to `guest_port`; False when no driver runs."""
        with self.lock:
            if not self.is_activated:
                return False
            local_port = self._allocate_local_port(guest_port)
            # NOTE: a guest that never replies to this OP_REQUEST keeps the connection and
            # the host socket open until the device resets; there is no connect timeout.
            connection = Connection(local_port, guest_port, stream, State.REQUEST_SENT)
            self._add(connection)
            self._queue_control(connection, Op.REQUEST)
            self._fill_rx()
            return True

    def _allocate_local_port(self, guest_port: int) -> int:
        while (self._next_local_port, guest_port) in self.connections:
            self._advance_local_port()
        port = self._next_local_port
        self._advance_local_port()
        return port

    def _advance_local_port(self) -> None:
        self._next_local_port += 1
        if self._next_local_port > LOCAL_PORT_LAST:
            self._next_local_port = LOCAL_PORT_FIRST

    def on_stream_ready(self, key: tuple[int, int], readable: bool, writable: bool) -> None:
        """Handle readiness the back end reported for the connection `key`."""
        with self.lock:
            connection = self.connections.get(key)
            if connection is None:
                return
            if writable:
                self._flush_to_host(connection)
            if readable and key in self.connections:
                connection.host_readable = True
            if key in self.connections:
                self._update_interest(connection)
            if self.is_activated:
                self._fill_rx()

    def _add(self, connection: Connection) -> None:
        key = connection.key

        def ready(readable: bool, writable: bool) -> None:
            self.on_stream_ready(key, readable, writable)

        connection.stream.on_ready = ready
        self.connections[key] = connection
        self.metrics.conns_added += 1
        self._update_interest(connection)

    def _remove(self, connection: Connection) -> None:
        self.connections.pop(connection.key, None)
        connection.stream.on_ready = None
        try:
            connection.stream.close()
        except OSError as error:
            logger.debug("%r: closing host stream %s failed: %s", self, connection.key, error)
        self.metrics.conns_removed += 1

    def _reset(self, connection: Connection, reason: str) -> None:
        """Send OP_RST to the guest and drop the connection."""
        logger.debug("%r: resetting connection %s: %s", self, connection.key, reason)
        self.metrics.conns_killed += 1
        self._queue_control(connection, Op.RST)
        self._remove(connection)

    def _update_interest(self, connection: Connection) -> None:
        read = connection.wants_host_data() and not connection.host_readable
        connection.stream.set_interest(read, bool(connection.to_host))

    # Guest to host (tx queue) --------------------------------------------------------------

    def _process_tx(self) -> None:
        queue = self.queues[TX_QUEUE_INDEX]
        served = False
        while (chain := queue.pop()) is not None:
            self._take_packet(chain)
            queue.add_used(chain.head_index, 0)
            served = True
        if served:
            self.signal_used_queue(queue)

    def _take_packet(self, chain: DescriptorChain) -> None:
        memory = self._memory()
        raw = _gather(memory, chain.readable, PACKET_HEADER.size + MAX_PACKET_PAYLOAD)
        if len(raw) < PACKET_HEADER.size:
            self._drop(f"packet of {len(raw)} bytes is shorter than its 44-byte header")
            return
        header = PacketHeader.unpack(raw[: PACKET_HEADER.size])
        payload = raw[PACKET_HEADER.size :]
        if header.length > len(payload):
            self._drop(
                f"header len {header.length} exceeds the {len(payload)} payload bytes sent "
                f"(max {MAX_PACKET_PAYLOAD})"
            )
            self._reset_if_known(header, "truncated packet")
            return
        self.metrics.tx_packets_count += 1
        self._dispatch(header, payload[: header.length])

    def _drop(self, reason: str) -> None:
        self.metrics.tx_dropped_packets += 1
        logger.debug("%r: dropped a guest packet: %s", self, reason)

    def _reset_if_known(self, header: PacketHeader, reason: str) -> None:
        connection = self.connections.get((header.dst_port, header.src_port))
        if connection is not None:
            self._reset(connection, reason)

    def _dispatch(self, header: PacketHeader, payload: bytes) -> None:
        if header.src_cid != self.guest_cid:
            self._drop(f"src_cid {header.src_cid} is not the guest's CID {self.guest_cid}")
            return
        if header.dst_cid != VMADDR_CID_HOST or header.type != VIRTIO_VSOCK_TYPE_STREAM:
            if header.op != Op.RST:
                self._reply_rst(header)
            return
        connection = self.connections.get((header.dst_port, header.src_port))
        if connection is None:
            if header.op == Op.REQUEST:
                self._accept_guest_connection(header)
            elif header.op != Op.RST:
                self._reply_rst(header)
            return
        connection.peer_buf_alloc = header.buf_alloc
        connection.peer_fwd_cnt = header.fwd_cnt
        connection.credit_requested = False
        self._handle_op(connection, header, payload)
        if connection.key in self.connections:
            self._update_interest(connection)

    def _reply_rst(self, header: PacketHeader) -> None:
        self._control.append(_Control(header.dst_port, header.src_port, Op.RST))

    def _accept_guest_connection(self, header: PacketHeader) -> None:
        try:
            stream = self.host.connect(header.dst_port)
        except OSError as error:
            self.metrics.host_connect_fails += 1
            logger.debug(
                "%r: guest port %d cannot reach host port %d: %s",
                self, header.src_port, header.dst_port, error,
            )
            self._reply_rst(header)
            return
        connection = Connection(
            header.dst_port, header.src_port, stream, State.ESTABLISHED,
            peer_buf_alloc=header.buf_alloc, peer_fwd_cnt=header.fwd_cnt,
        )
        self._add(connection)
        self._queue_control(connection, Op.RESPONSE)

    def _handle_op(self, connection: Connection, header: PacketHeader, payload: bytes) -> None:
        op = header.op
        if op == Op.RESPONSE:
            self._on_response(connection)
        elif op == Op.RW:
            self._on_data(connection, payload)
        elif op == Op.CREDIT_REQUEST:
            self._queue_control(connection, Op.CREDIT_UPDATE)
        elif op == Op.SHUTDOWN:
            self._on_shutdown(connection, header.flags)
        elif op == Op.RST:
            self._remove(connection)
        elif op != Op.CREDIT_UPDATE:
            self._reset(connection, f"unexpected op {op} in state {connection.state.value}")

    def _on_response(self, connection: Connection) -> None:
        if connection.state is not State.REQUEST_SENT:
            self._reset(connection, "OP_RESPONSE on an established connection")
            return
        connection.state = State.ESTABLISHED
        try:
            connection.stream.confirm(connection.local_port)
        except OSError as error:
            self._reset(connection, f"host peer is gone: {error}")

    def _on_data(self, connection: Connection, payload: bytes) -> None:
        if connection.state is not State.ESTABLISHED or connection.guest_shut_send:
            self._reset(connection, "OP_RW before the connection is established or after "
                                    "the guest shut down sending")
            return
        connection.rx_cnt += len(payload)
        connection.to_host += payload
        self.metrics.tx_bytes_count += len(payload)
        if len(connection.to_host) > CONNECTION_BUFFER_SIZE:
            self._reset(connection, f"guest sent {len(connection.to_host)} bytes beyond the "
                                    f"{CONNECTION_BUFFER_SIZE}-byte credit it was given")
            return
        self._flush_to_host(connection)

    def _on_shutdown(self, connection: Connection, flags: int) -> None:
        if flags & VIRTIO_VSOCK_SHUTDOWN_RCV:
            connection.guest_shut_recv = True
        if flags & VIRTIO_VSOCK_SHUTDOWN_SEND:
            connection.guest_shut_send = True
        if connection.guest_shut_recv and connection.guest_shut_send:
            # 5.10.6.4: the peer of a full shutdown replies with OP_RST, which ends the connection.
            self._flush_to_host(connection)
            if connection.key in self.connections:
                self._queue_control(connection, Op.RST)
                self._remove(connection)
            return
        self._flush_to_host(connection)

    def _flush_to_host(self, connection: Connection) -> None:
        """Send what the host stream takes now, then shut its write side if the guest is done."""
        while connection.to_host:
            try:
                sent = connection.stream.send(connection.to_host)
            except BlockingIOError:
                break
            except OSError as error:
                self.metrics.host_write_fails += 1
                self._reset(connection, f"write to the host peer failed: {error}")
                return
            del connection.to_host[:sent]
            connection.fwd_cnt += sent
        if connection.guest_shut_send and not connection.to_host:
            self._shut_host_write(connection)
        unreported = connection.fwd_cnt - connection.reported_fwd_cnt
        if unreported >= CREDIT_UPDATE_THRESHOLD:
            self._queue_control(connection, Op.CREDIT_UPDATE)
            connection.reported_fwd_cnt = connection.fwd_cnt

    def _shut_host_write(self, connection: Connection) -> None:
        if connection.host_write_shut:
            return
        connection.host_write_shut = True
        try:
            connection.stream.shutdown_write()
        except OSError as error:
            logger.debug("%r: shutdown of host stream %s failed: %s", self, connection.key, error)
        if connection.host_eof:
            # Both directions are done: end the connection as the guest expects (5.10.6.4).
            self._queue_control(connection, Op.RST)
            self._remove(connection)

    # Host to guest (rx queue) --------------------------------------------------------------

    def _queue_control(self, connection: Connection, op: Op, flags: int = 0) -> None:
        self._control.append(_Control(connection.local_port, connection.peer_port, op, flags))

    def _next_rx_chain(self, queue: Queue) -> DescriptorChain | None:
        if self._spare_rx is not None:
            chain, self._spare_rx = self._spare_rx, None
            return chain
        return queue.pop()

    def _fill_rx(self) -> None:
        """Deliver control packets, then host data, while the guest has rx buffers."""
        if not self.is_activated or not self.queues[RX_QUEUE_INDEX].ready:
            return
        queue = self.queues[RX_QUEUE_INDEX]
        delivered = False
        while self._data_pending() or self._control:
            chain = self._next_rx_chain(queue)
            if chain is None:
                break
            if self._control:
                length = self._write_control(chain, self._control.popleft())
            else:
                length = self._write_data(chain)
            if length is None:
                self._spare_rx = chain
                continue
            queue.add_used(chain.head_index, length)
            if length:
                self.metrics.rx_packets_count += 1
            delivered = True
        if delivered:
            self.signal_used_queue(queue)

    def _data_pending(self) -> bool:
        for connection in self.connections.values():
            if connection.host_readable and connection.wants_host_data():
                if connection.peer_credit() > 0:
                    return True
                self._request_credit(connection)
        return False

    def _request_credit(self, connection: Connection) -> None:
        if not connection.credit_requested:
            connection.credit_requested = True
            self._queue_control(connection, Op.CREDIT_REQUEST)

    def _header_for(self, local_port: int, peer_port: int, op: Op, flags: int,
                    length: int) -> PacketHeader:
        connection = self.connections.get((local_port, peer_port))
        fwd_cnt = 0 if connection is None else connection.fwd_cnt
        if connection is not None:
            connection.reported_fwd_cnt = fwd_cnt
        return PacketHeader(
            src_cid=VMADDR_CID_HOST, dst_cid=self.guest_cid, src_port=local_port,
            dst_port=peer_port, length=length, type=VIRTIO_VSOCK_TYPE_STREAM, op=op,
            flags=flags, buf_alloc=CONNECTION_BUFFER_SIZE, fwd_cnt=fwd_cnt,
        )

    def _write_control(self, chain: DescriptorChain, control: _Control) -> int:
        header = self._header_for(control.local_port, control.peer_port, control.op,
                                  control.flags, 0)
        return self._write_packet(chain, header, b"")

    def _write_packet(self, chain: DescriptorChain, header: PacketHeader, payload: bytes) -> int:
        """Write one packet into an rx chain and return its length, or 0 if it cannot fit.

        A chain too small for the packet goes back to the guest empty, and the packet
        is lost. Linux drivers offer buffers of about 4 KiB (VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE),
        far more than a header.
        """
        capacity = _capacity(chain)
        if capacity < PACKET_HEADER.size + len(payload):
            self.metrics.rx_dropped_packets += 1
            logger.debug("%r: rx buffer of %d bytes is too small for a packet", self, capacity)
            return 0
        _scatter(self._memory(), chain.writable, header.pack() + payload)
        return PACKET_HEADER.size + len(payload)

    def _write_data(self, chain: DescriptorChain) -> int | None:
        """Read host bytes of one ready connection into `chain`.

        Returns the used length, 0 for a chain too small to carry data, or None
        when no bytes were read, so that the chain waits for the next packet.
        """
        room = _capacity(chain) - PACKET_HEADER.size
        if room <= 0:
            self.metrics.rx_dropped_packets += 1
            return 0
        for connection in list(self.connections.values()):
            if not (connection.host_readable and connection.wants_host_data()):
                continue
            credit = connection.peer_credit()
            if credit <= 0:
                continue
            payload = self._read_host(connection, min(room, credit, MAX_PACKET_PAYLOAD))
            if payload:
                header = self._header_for(connection.local_port, connection.peer_port,
                                          Op.RW, 0, len(payload))
                connection.tx_cnt += len(payload)
                self.metrics.rx_bytes_count += len(payload)
                return self._write_packet(chain, header, payload)
        return None

    def _read_host(self, connection: Connection, limit: int) -> bytes:
        """Read up to `limit` host bytes; handle end of stream and errors, return b"" then."""
        try:
            payload = connection.stream.recv(limit)
        except BlockingIOError:
            connection.host_readable = False
            self._update_interest(connection)
            return b""
        except OSError as error:
            self.metrics.host_read_fails += 1
            self._reset(connection, f"read from the host peer failed: {error}")
            return b""
        if not payload:
            self._on_host_eof(connection)
        return payload

    def _on_host_eof(self, connection: Connection) -> None:
        """The host peer sent its last byte: tell the guest it will receive no more."""
        connection.host_eof = True
        connection.host_readable = False
        self._queue_control(connection, Op.SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND)
        if connection.host_write_shut:
            self._queue_control(connection, Op.RST)
            self._remove(connection)
            return
        self._update_interest(connection)


def _capacity(chain: DescriptorChain) -> int:
    return sum(descriptor.length for descriptor in chain.writable)


def _gather(memory: GuestMemory, buffers: tuple[Descriptor, ...], limit: int) -> bytes:
    """Read the buffers in order as one byte string of at most `limit` bytes."""
    parts: list[bytes] = []
    remaining = limit
    for descriptor in buffers:
        if remaining <= 0:
            break
        length = min(descriptor.length, remaining)
        parts.append(memory.read(descriptor.address, length))
        remaining -= length
    return b"".join(parts)


def _scatter(memory: GuestMemory, buffers: tuple[Descriptor, ...], data: bytes) -> None:
    """Write `data` across the buffers in order; the caller checked that it fits."""
    offset = 0
    for descriptor in buffers:
        if offset >= len(data):
            break
        part = data[offset : offset + descriptor.length]
        memory.write(descriptor.address, part)
        offset += len(part)
