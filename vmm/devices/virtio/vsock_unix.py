"""The host side of virtio-vsock: Unix stream sockets, as Firecracker maps them.

Host-initiated connections: a host program connects to the Unix socket at
`uds_path` and writes `CONNECT <port>\\n`. The device opens a connection to
that guest port; once the guest accepts, the program reads
`OK <host_port>\\n`, where host_port is the port the device assigned to its
end, and from then on the socket carries the stream. When the guest refuses,
the socket is closed.

Guest-initiated connections to host port P go to the Unix socket
`<uds_path>_<P>`, which a host program listens on.

All sockets are non-blocking. They sit in one inner epoll set whose file
descriptor the monitor's event loop watches (`fileno`, `handle_events`), so
that streams can ask for write readiness too. Connection sockets use
EPOLLONESHOT: after each event a socket stays quiet until the device states
its interest again. A peer that hung up therefore cannot make the loop spin
while the device waits for guest credit.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from typing import Callable, Final

from vmm.devices.virtio.vsock import ReadyCallback, Vsock

logger = logging.getLogger(__name__)

# "CONNECT 4294967295\n" is 19 bytes; a longer first line is not a CONNECT command.
MAX_COMMAND_LENGTH: Final = 32
CONNECT_COMMAND: Final = b"CONNECT"
RECV_CHUNK: Final = 4096


class UnixStream:
    """One connection's host end: a non-blocking Unix stream socket in the back end's epoll."""

    def __init__(
        self, sock: socket.socket, backend: UnixVsockBackend, pending: bytes = b""
    ) -> None:
        self.sock = sock
        self.backend = backend
        self.on_ready: ReadyCallback | None = None
        # Bytes that arrived after the CONNECT line, before the guest accepted.
        self._pending = bytearray(pending)
        self.mask = 0
        self.armed = False

    def __repr__(self) -> str:
        return f"UnixStream(fd={self.sock.fileno()})"

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, max_bytes: int) -> bytes:
        if self._pending:
            data = bytes(self._pending[:max_bytes])
            del self._pending[:max_bytes]
            return data
        return self.sock.recv(max_bytes)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        return self.sock.send(data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def set_interest(self, read: bool, write: bool) -> None:
        mask = 0
        if read:
            mask |= select.EPOLLIN
        if write:
            mask |= select.EPOLLOUT
        if read and self._pending:
            # The buffered bytes never raise an epoll event: report them at once.
            self.backend.call_ready_later(self)
        self.backend.rearm(self, mask)

    def confirm(self, local_port: int) -> None:
        message = f"OK {local_port}\n".encode()
        if self.sock.send(message) != len(message):
            raise OSError(f"short write of the {len(message)}-byte OK line to the host peer")

    def close(self) -> None:
        self.backend.forget(self)
        self.sock.close()


class UnixVsockBackend:
    """Listens on `uds_path` for host-initiated connections and connects guest-initiated ones.

    Call `attach(device)` before the first event; the monitor adds `fileno()`
    to its event loop with `handle_events` as the callback. `close()` closes
    every socket and removes `uds_path`.
    """

    def __init__(self, uds_path: str) -> None:
        self.uds_path = uds_path
        self.device: Vsock | None = None
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._streams: dict[int, UnixStream] = {}
        self._handshakes: dict[int, tuple[socket.socket, bytearray]] = {}
        self._ready_soon: list[UnixStream] = []
        # Makes the epoll set readable when buffered bytes wait (see call_ready_later).
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._listener = self._listen(uds_path)
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)

    @staticmethod
    def _listen(path: str) -> socket.socket:
        if os.path.exists(path):
            raise OSError(f"vsock uds_path {path} already exists; remove it or choose another")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(path)
            listener.listen()
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        return listener

    def __repr__(self) -> str:
        return f"UnixVsockBackend({self.uds_path!r}, streams={len(self._streams)})"

    def attach(self, device: Vsock) -> None:
        self.device = device

    def fileno(self) -> int:
        return self._epoll.fileno()

    # HostEndpoint --------------------------------------------------------------------------

    def connect(self, port: int) -> UnixStream:
        """Connect to `<uds_path>_<port>` for a guest-initiated connection, or raise OSError."""
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            sock.connect(f"{self.uds_path}_{port}")
        except OSError:
            sock.close()
            raise
        return self._register_stream(sock, b"")

    def _register_stream(self, sock: socket.socket, pending: bytes) -> UnixStream:
        stream = UnixStream(sock, self, pending)
        with self._lock:
            self._streams[sock.fileno()] = stream
        self._epoll.register(sock.fileno(), select.EPOLLONESHOT)
        stream.armed = True
        return stream

    # Called by UnixStream --------------------------------------------------------------------

    def rearm(self, stream: UnixStream, mask: int) -> None:
        """Watch `stream` for `mask`; leave a quiet socket quiet while nothing is wanted."""
        if mask == stream.mask and (stream.armed or mask == 0):
            return
        stream.mask = mask
        try:
            self._epoll.modify(stream.fileno(), mask | select.EPOLLONESHOT)
        except (OSError, ValueError) as error:
            logger.debug("%r: cannot watch %r: %s", self, stream, error)
            return
        stream.armed = True

    def call_ready_later(self, stream: UnixStream) -> None:
        """Report `stream` readable on the next `handle_events`, which the wakeup triggers."""
        with self._lock:
            if stream not in self._ready_soon:
                self._ready_soon.append(stream)
        os.eventfd_write(self._wakeup, 1)

    def forget(self, stream: UnixStream) -> None:
        with self._lock:
            self._streams.pop(stream.fileno(), None)
            if stream in self._ready_soon:
                self._ready_soon.remove(stream)
        try:
            self._epoll.unregister(stream.fileno())
        except (OSError, ValueError):
            pass

    # Events ----------------------------------------------------------------------------------

    def handle_events(self) -> None:
        """Serve every ready socket once; the event loop calls this when `fileno()` is readable."""
        for fd, events in self._epoll.poll(0):
            if fd == self._wakeup:
                _drain_eventfd(fd)
            elif fd == self._listener.fileno():
                self._accept_all()
            elif fd in self._handshakes:
                self._read_command(fd)
            else:
                self._stream_event(fd, events)
        self._run_ready_soon()

    def _run_ready_soon(self) -> None:
        with self._lock:
            ready, self._ready_soon = self._ready_soon, []
        for stream in ready:
            self._notify(stream, True, False)

    def _stream_event(self, fd: int, events: int) -> None:
        with self._lock:
            stream = self._streams.get(fd)
        if stream is None:
            return
        stream.armed = False
        failed = bool(events & (select.EPOLLHUP | select.EPOLLERR))
        readable = bool(events & select.EPOLLIN) or (failed and bool(stream.mask & select.EPOLLIN))
        writable = bool(events & select.EPOLLOUT) or (
            failed and bool(stream.mask & select.EPOLLOUT)
        )
        self._notify(stream, readable, writable)
        # The device restates its interest in on_ready; without a callback, stay quiet.

    @staticmethod
    def _notify(stream: UnixStream, readable: bool, writable: bool) -> None:
        callback: Callable[[bool, bool], None] | None = stream.on_ready
        if callback is not None:
            callback(readable, writable)

    def _accept_all(self) -> None:
        while True:
            try:
                sock, _address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                logger.warning("%r: accept failed: %s", self, error)
                return
            sock.setblocking(False)
            with self._lock:
                self._handshakes[sock.fileno()] = (sock, bytearray())
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _read_command(self, fd: int) -> None:
        sock, buffer = self._handshakes[fd]
        try:
            data = sock.recv(RECV_CHUNK)
        except BlockingIOError:
            return
        except OSError as error:
            self._drop_handshake(fd, f"read failed: {error}")
            return
        if not data:
            self._drop_handshake(fd, "peer closed before a CONNECT line")
            return
        buffer += data
        newline = buffer.find(b"\n")
        if newline < 0:
            if len(buffer) > MAX_COMMAND_LENGTH:
                self._drop_handshake(fd, f"no newline in the first {len(buffer)} bytes")
            return
        self._start_connection(fd, bytes(buffer[:newline]), bytes(buffer[newline + 1 :]))

    def _start_connection(self, fd: int, line: bytes, rest: bytes) -> None:
        port = _parse_connect(line)
        if port is None:
            self._drop_handshake(fd, f"invalid command {line[:MAX_COMMAND_LENGTH]!r}, expected "
                                     f"'CONNECT <port>'")
            return
        sock, _buffer = self._handshakes.pop(fd)
        self._epoll.unregister(fd)
        stream = self._register_stream(sock, rest)
        device = self.device
        if device is None or not device.connect_from_host(stream, port):
            logger.info("%r: CONNECT %d refused: the guest's vsock driver is not running",
                        self, port)
            stream.close()

    def _drop_handshake(self, fd: int, reason: str) -> None:
        sock, _buffer = self._handshakes.pop(fd)
        logger.info("%r: closing a host connection on %s: %s", self, self.uds_path, reason)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        sock.close()

    def close(self) -> None:
        """Close every socket and remove the listening socket's path."""
        for sock, _buffer in list(self._handshakes.values()):
            sock.close()
        self._handshakes.clear()
        for stream in list(self._streams.values()):
            stream.close()
        self._listener.close()
        self._epoll.close()
        os.close(self._wakeup)
        try:
            os.unlink(self.uds_path)
        except FileNotFoundError:
            pass


def _drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _parse_connect(line: bytes) -> int | None:
    """Return the port of `CONNECT <port>` (an optional trailing \\r is accepted), else None."""
    parts = line.rstrip(b"\r").split()
    if len(parts) != 2 or parts[0] != CONNECT_COMMAND or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= 0xFFFF_FFFF else None
