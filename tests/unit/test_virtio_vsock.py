"""virtio-vsock (virtio 1.2 section 5.10) with real Unix sockets on the host side.

The guest side is a driver-side queue per virtqueue; the host side is the
Unix-socket back end, whose epoll set the tests poll directly instead of
running the monitor's event loop.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.virtio_driver import Buffer, MmioDriver, VirtqueueDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.vsock import (
    CONNECTION_BUFFER_SIZE,
    LOCAL_PORT_FIRST,
    MAX_PACKET_PAYLOAD,
    PACKET_HEADER,
    VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Op,
    PacketHeader,
    Vsock,
)
from vmm.devices.virtio.vsock_unix import UnixVsockBackend
from vmm.memory import GuestMemory

GUEST_CID = 3
RAM_SIZE = 8 << 20
QUEUE_SIZE = 64
RX_BUFFER_SIZE = PACKET_HEADER.size + 4096
GUEST_BUF_ALLOC = 1 << 20
# A fixed scratch area for large tx payloads, so the data areas do not run out.
SCRATCH = 7 << 20


class Guest:
    """The guest driver's view: a vsock device started over virtio-mmio, plus its host back end."""

    def __init__(self, memory: GuestMemory, uds_path: Path) -> None:
        self.memory = memory
        self.backend = UnixVsockBackend(str(uds_path))
        self.device = Vsock(GUEST_CID, self.backend)
        self.backend.attach(self.device)
        self.transport = mmio.MmioTransport(self.device, memory, lambda: None)
        self.queues = [
            VirtqueueDriver(memory, QUEUE_SIZE, ring_base=0x1000 + 0x4000 * index,
                            data_base=(1 + 2 * index) << 20)
            for index in range(3)
        ]
        self.driver = MmioDriver(self.transport)
        self.driver.start(self.queues)
        self.rx_buffers: dict[int, Buffer] = {}
        self.fwd_cnt = 0
        self.buf_alloc = GUEST_BUF_ALLOC

    @property
    def rx(self) -> VirtqueueDriver:
        return self.queues[0]

    @property
    def tx(self) -> VirtqueueDriver:
        return self.queues[1]

    def give_rx(self, count: int = 8) -> None:
        for _ in range(count):
            buffer = self.rx.buffer(length=RX_BUFFER_SIZE, writable=True)
            self.rx_buffers[self.rx.add_chain([buffer])] = buffer
        self.transport.notify(0)

    def send(self, op: Op, src_port: int, dst_port: int, payload: bytes = b"",
             flags: int = 0, dst_cid: int = VMADDR_CID_HOST) -> None:
        header = PacketHeader(
            GUEST_CID, dst_cid, src_port, dst_port, len(payload), VIRTIO_VSOCK_TYPE_STREAM,
            op, flags, self.buf_alloc, self.fwd_cnt,
        )
        buffers = [self.tx.buffer(header.pack())]
        if payload:
            if len(payload) > 4096:
                self.memory.write(SCRATCH, payload)
                buffers.append(Buffer(SCRATCH, len(payload)))
            else:
                buffers.append(self.tx.buffer(payload))
        self.tx.add_chain(buffers)
        self.transport.notify(1)
        assert len(self.tx.used_entries()) == 1

    def received(self) -> list[tuple[PacketHeader, bytes]]:
        """Return the packets the device placed in rx buffers since the last call."""
        packets = []
        for head, length in self.rx.used_entries():
            buffer = self.rx_buffers.pop(head)
            raw = self.memory.read(buffer.address, length)
            header = PacketHeader.unpack(raw[: PACKET_HEADER.size])
            payload = raw[PACKET_HEADER.size :]
            assert header.length == len(payload)
            packets.append((header, payload))
        return packets

    def pump(self, rounds: int = 20, wait_s: float = 0.01) -> None:
        """Serve the back end's events, as the event loop would."""
        for _ in range(rounds):
            select.select([self.backend.fileno()], [], [], wait_s)
            self.backend.handle_events()

    def wait_packets(
        self, count: int = 1, timeout_s: float = 2.0
    ) -> list[tuple[PacketHeader, bytes]]:
        packets: list[tuple[PacketHeader, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while len(packets) < count and time.monotonic() < deadline:
            self.pump(rounds=1)
            packets += self.received()
        return packets


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory([(0, RAM_SIZE)])
    yield ram
    ram.close()


@pytest.fixture
def guest(memory: GuestMemory, tmp_path: Path) -> Iterator[Guest]:
    vm = Guest(memory, tmp_path / "v.sock")
    vm.give_rx()
    yield vm
    vm.device.close()
    vm.backend.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    """A host program listening on host port 52 for guest-initiated connections."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "v.sock_52"))
    server.listen()
    server.settimeout(2.0)
    yield server
    server.close()


def ops(packets: list[tuple[PacketHeader, bytes]]) -> list[int]:
    return [header.op for header, _ in packets]


def recv_exactly(sock: socket.socket, length: int) -> bytes:
    data = b""
    sock.settimeout(2.0)
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            break
        data += chunk
    return data


def connect_from_guest(guest: Guest, listener: socket.socket,
                       guest_port: int = 1000) -> socket.socket:
    guest.send(Op.REQUEST, guest_port, 52)
    ((header, _),) = guest.received()
    assert header.op == Op.RESPONSE
    peer, _ = listener.accept()
    return peer


def connect_from_host(guest: Guest, guest_port: int = 1234) -> tuple[socket.socket, int]:
    """Run the CONNECT handshake; return the host socket and the device's host port."""
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(guest.backend.uds_path)
    host.sendall(f"CONNECT {guest_port}\n".encode())
    ((request, _),) = guest.wait_packets()
    assert request.op == Op.REQUEST
    assert request.dst_port == guest_port
    guest.send(Op.RESPONSE, guest_port, request.src_port)
    return host, request.src_port


def test_vsock_device_id_and_cid(guest: Guest) -> None:
    assert guest.driver.read32(mmio.DEVICE_ID_OFFSET) == VIRTIO_ID_VSOCK
    assert guest.driver.read32(mmio.CONFIG_SPACE_OFFSET) == GUEST_CID
    assert guest.driver.read32(mmio.CONFIG_SPACE_OFFSET + 4) == 0


def test_vsock_rejects_reserved_cid(tmp_path: Path) -> None:
    backend = UnixVsockBackend(str(tmp_path / "v.sock"))
    try:
        with pytest.raises(ValueError, match="guest_cid 2"):
            Vsock(2, backend)
    finally:
        backend.close()


def test_vsock_guest_connect_without_listener_resets(guest: Guest) -> None:
    guest.send(Op.REQUEST, 1000, 99)
    ((header, _),) = guest.received()
    assert header.op == Op.RST
    assert (header.src_port, header.dst_port) == (99, 1000)
    assert (header.src_cid, header.dst_cid) == (VMADDR_CID_HOST, GUEST_CID)
    assert guest.device.metrics.host_connect_fails == 1


def test_vsock_guest_connect_exchanges_data(guest: Guest, listener: socket.socket) -> None:
    peer = connect_from_guest(guest, listener)
    guest.send(Op.RW, 1000, 52, b"hello host")
    assert recv_exactly(peer, 10) == b"hello host"
    peer.sendall(b"hello guest")
    ((header, payload),) = guest.wait_packets()
    assert header.op == Op.RW
    assert payload == b"hello guest"
    assert header.buf_alloc == CONNECTION_BUFFER_SIZE
    assert header.fwd_cnt == 10
    assert guest.device.metrics.tx_bytes_count == 10
    assert guest.device.metrics.rx_bytes_count == 11
    peer.close()


def test_vsock_host_connect_handshake(guest: Guest) -> None:
    host, local_port = connect_from_host(guest)
    assert local_port >= LOCAL_PORT_FIRST
    assert recv_exactly(host, len(f"OK {local_port}\n")) == f"OK {local_port}\n".encode()
    host.sendall(b"ping")
    ((header, payload),) = guest.wait_packets()
    assert (header.op, payload) == (Op.RW, b"ping")
    guest.send(Op.RW, 1234, local_port, b"pong")
    assert recv_exactly(host, 4) == b"pong"
    host.close()


def test_vsock_host_bytes_before_accept_are_kept(guest: Guest) -> None:
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(guest.backend.uds_path)
    host.sendall(b"CONNECT 77\nearly bytes")
    ((request, _),) = guest.wait_packets()
    guest.send(Op.RESPONSE, 77, request.src_port)
    packets = guest.wait_packets()
    assert [(h.op, p) for h, p in packets] == [(Op.RW, b"early bytes")]
    host.close()


def test_vsock_host_connect_refused_by_guest(guest: Guest) -> None:
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(guest.backend.uds_path)
    host.sendall(b"CONNECT 5000\n")
    ((request, _),) = guest.wait_packets()
    guest.send(Op.RST, 5000, request.src_port)
    host.settimeout(2.0)
    assert host.recv(16) == b""
    assert guest.device.connections == {}
    host.close()


@pytest.mark.parametrize("command", [b"HELLO 5\n", b"CONNECT x\n", b"CONNECT 1 2\n",
                                     b"CONNECT " + b"9" * 40])
def test_vsock_invalid_command_closes(guest: Guest, command: bytes) -> None:
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(guest.backend.uds_path)
    host.sendall(command)
    guest.pump()
    host.settimeout(2.0)
    assert host.recv(16) == b""
    assert guest.received() == []
    host.close()


def test_vsock_flow_control_limits_host_data(guest: Guest, listener: socket.socket) -> None:
    guest.buf_alloc = 100
    peer = connect_from_guest(guest, listener)
    peer.sendall(bytes(range(250)))
    packets = guest.wait_packets(2)
    data = [p for h, p in packets if h.op == Op.RW]
    assert b"".join(data) == bytes(range(100))
    assert Op.CREDIT_REQUEST in ops(packets)
    guest.pump()
    assert guest.received() == []
    guest.fwd_cnt = 100
    guest.send(Op.CREDIT_UPDATE, 1000, 52)
    packets = guest.wait_packets()
    assert [p for h, p in packets if h.op == Op.RW] == [bytes(range(100, 200))]
    peer.close()


def test_vsock_credit_request_answered(guest: Guest, listener: socket.socket) -> None:
    peer = connect_from_guest(guest, listener)
    guest.send(Op.RW, 1000, 52, b"abc")
    guest.send(Op.CREDIT_REQUEST, 1000, 52)
    ((header, _),) = guest.received()
    assert header.op == Op.CREDIT_UPDATE
    assert header.fwd_cnt == 3
    assert header.buf_alloc == CONNECTION_BUFFER_SIZE
    peer.close()


def test_vsock_credit_update_after_host_drains(guest: Guest, listener: socket.socket) -> None:
    peer = connect_from_guest(guest, listener)
    payload = b"x" * MAX_PACKET_PAYLOAD
    for _ in range(CONNECTION_BUFFER_SIZE // 4 // MAX_PACKET_PAYLOAD):
        guest.send(Op.RW, 1000, 52, payload)
        assert recv_exactly(peer, len(payload)) == payload
    packets = guest.received()
    assert ops(packets) == [Op.CREDIT_UPDATE]
    assert packets[0][0].fwd_cnt == CONNECTION_BUFFER_SIZE // 4
    peer.close()


def test_vsock_guest_overrunning_credit_resets(guest: Guest, listener: socket.socket) -> None:
    peer = connect_from_guest(guest, listener)
    payload = b"y" * MAX_PACKET_PAYLOAD
    for _ in range(64):
        guest.send(Op.RW, 1000, 52, payload)
        if guest.device.connections == {}:
            break
    assert guest.device.connections == {}
    assert Op.RST in ops(guest.received())
    peer.close()


def test_vsock_guest_half_close(guest: Guest, listener: socket.socket) -> None:
    peer = connect_from_guest(guest, listener)
    guest.send(Op.RW, 1000, 52, b"last words")
    guest.send(Op.SHUTDOWN, 1000, 52, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert recv_exactly(peer, 64) == b"last words"
    peer.sendall(b"reply after half close")
    packets = guest.wait_packets()
    assert [(h.op, p) for h, p in packets] == [(Op.RW, b"reply after half close")]
    peer.close()
    packets = guest.wait_packets(2)
    assert ops(packets) == [Op.SHUTDOWN, Op.RST]
    assert packets[0][0].flags == VIRTIO_VSOCK_SHUTDOWN_SEND
    assert guest.device.connections == {}


def test_vsock_host_half_close(guest: Guest, listener: socket.socket) -> None:
    peer = connect_from_guest(guest, listener)
    peer.sendall(b"bye")
    peer.shutdown(socket.SHUT_WR)
    packets = guest.wait_packets(2)
    assert [(h.op, p) for h, p in packets] == [(Op.RW, b"bye"), (Op.SHUTDOWN, b"")]
    guest.send(Op.RW, 1000, 52, b"still open")
    assert recv_exactly(peer, 10) == b"still open"
    peer.close()


def test_vsock_guest_full_shutdown_gets_rst(guest: Guest, listener: socket.socket) -> None:
    peer = connect_from_guest(guest, listener)
    guest.send(Op.SHUTDOWN, 1000, 52,
               flags=VIRTIO_VSOCK_SHUTDOWN_SEND | VIRTIO_VSOCK_SHUTDOWN_RCV)
    ((header, _),) = guest.received()
    assert header.op == Op.RST
    assert recv_exactly(peer, 16) == b""
    assert guest.device.connections == {}
    peer.close()


def test_vsock_vanished_peer_resets_only_its_connection(
    guest: Guest, listener: socket.socket
) -> None:
    first = connect_from_guest(guest, listener, guest_port=1000)
    second = connect_from_guest(guest, listener, guest_port=2000)
    first.close()
    guest.send(Op.RW, 1000, 52, b"into the void")
    guest.pump()
    packets = guest.received()
    assert (Op.RST, 1000) in [(h.op, h.dst_port) for h, _ in packets]
    assert list(guest.device.connections) == [(52, 2000)]
    guest.send(Op.RW, 2000, 52, b"still here")
    assert recv_exactly(second, 10) == b"still here"
    assert guest.device.metrics.conns_killed >= 1
    second.close()


def test_vsock_packet_for_unknown_connection_resets(guest: Guest) -> None:
    guest.send(Op.RW, 1000, 52, b"data")
    ((header, _),) = guest.received()
    assert header.op == Op.RST
    guest.send(Op.RST, 1000, 52)
    assert guest.received() == []


def test_vsock_packet_to_other_cid_resets(guest: Guest) -> None:
    guest.send(Op.REQUEST, 1000, 52, dst_cid=7)
    ((header, _),) = guest.received()
    assert header.op == Op.RST


def test_vsock_truncated_packet_dropped(guest: Guest) -> None:
    header = PacketHeader(GUEST_CID, VMADDR_CID_HOST, 1000, 52, 100,
                          VIRTIO_VSOCK_TYPE_STREAM, Op.RW, 0, 0, 0)
    guest.tx.add_chain([guest.tx.buffer(header.pack() + b"short")])
    guest.transport.notify(1)
    assert guest.device.metrics.tx_dropped_packets == 1
    assert not guest.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET


def test_vsock_waits_for_rx_buffers(memory: GuestMemory, tmp_path: Path,
                                    listener: socket.socket) -> None:
    vm = Guest(memory, tmp_path / "v.sock")
    try:
        vm.send(Op.REQUEST, 1000, 52)
        assert vm.received() == []
        vm.give_rx(1)
        ((header, _),) = vm.received()
        assert header.op == Op.RESPONSE
    finally:
        vm.device.close()
        vm.backend.close()


def test_vsock_reset_closes_host_streams(guest: Guest, listener: socket.socket) -> None:
    peer = connect_from_guest(guest, listener)
    guest.driver.write32(mmio.STATUS_OFFSET, 0)
    assert guest.device.connections == {}
    assert recv_exactly(peer, 16) == b""
    peer.close()


def test_vsock_backend_rejects_existing_path(tmp_path: Path) -> None:
    path = tmp_path / "taken.sock"
    path.write_bytes(b"")
    with pytest.raises(OSError, match="already exists"):
        UnixVsockBackend(str(path))
