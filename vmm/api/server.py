"""The HTTP/1.1 API server on a Unix domain socket.

h11 parses and frames HTTP; this module only moves bytes between the socket and h11 and
hands each complete request to a handler `(method, target, body) -> (status, JSON or
None)`. Each connection runs on its own thread, so a slow or stuck client holds only its
own thread. Connections are kept alive between requests. When h11 rejects a request, or
its body is larger than the payload limit, the client gets a 400 response and its
connection is closed. Other clients are not affected.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
from http import HTTPStatus
from typing import Callable

import h11

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD_SIZE = 51200
LISTEN_BACKLOG = 64
_RECV_SIZE = 65536
# h11's limit on a request line plus headers; bodies are limited separately.
_MAX_HEADER_SIZE = 16 * 1024
_SERVER_HEADER = ("Server", "vmm API")
_DRAIN_TIMEOUT_S = 1.0
_DRAIN_MAX_BYTES = 1 << 20

Handler = Callable[[str, str, bytes], tuple[int, "dict | None"]]


# sockaddr_un.sun_path size on Linux (sys/un.h), terminating NUL included.
UNIX_PATH_MAX = 108


class ApiServerError(Exception):
    """The API socket cannot be set up; the message names the path and the reason."""


class _BadRequest(Exception):
    """A request rejected with 400, after which the connection is closed."""


class ApiServer:
    """Serves `handler` on the Unix socket at `socket_path`."""

    def __init__(
        self,
        socket_path: str,
        handler: Handler,
        max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE,
    ) -> None:
        self.socket_path = socket_path
        self.handler = handler
        self.max_payload_size = max_payload_size
        self._listener: socket.socket | None = None
        self._closed = threading.Event()

    def bind(self) -> None:
        """Create, bind and listen on the socket, replacing a stale socket file.

        Raises ApiServerError if a live server accepts connections on the path, or if the path is
        something other than a socket (it is not removed then).
        """
        _remove_stale_socket(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bind and listen under a temporary name, then rename: a client that sees the
        # socket file can connect at once, with no window in which it is refused.
        staging_path = f"{self.socket_path}.{os.getpid()}.tmp"
        if len(os.fsencode(staging_path)) >= UNIX_PATH_MAX:
            staging_path = self.socket_path
        try:
            listener.bind(staging_path)
            listener.listen(LISTEN_BACKLOG)
            if staging_path != self.socket_path:
                os.rename(staging_path, self.socket_path)
        except OSError as error:
            listener.close()
            if staging_path != self.socket_path and os.path.exists(staging_path):
                os.unlink(staging_path)
            raise ApiServerError(
                f"cannot listen on API socket {self.socket_path!r}: {error.strerror or error}"
            ) from None
        self._listener = listener

    def start(self) -> threading.Thread:
        """Bind if not yet bound, then accept connections on a daemon thread."""
        if self._listener is None:
            self.bind()
        thread = threading.Thread(target=self.serve_forever, name="fc_api", daemon=True)
        thread.start()
        return thread

    def serve_forever(self) -> None:
        """Accept connections until close(); each gets its own thread."""
        listener = self._listener
        if listener is None:
            raise ApiServerError("serve_forever() called before bind()")
        log.info("API server listening on %s", self.socket_path)
        while not self._closed.is_set():
            try:
                connection, _address = listener.accept()
            except OSError as error:
                if self._closed.is_set():
                    break
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("API server cannot accept a connection: %s", error)
                    self._closed.wait(0.1)
                    continue
                raise
            threading.Thread(
                target=self._serve_connection, args=(connection,), name="fc_api_conn",
                daemon=True,
            ).start()

    def close(self) -> None:
        """Stop accepting and remove the socket file; open connections finish on their own."""
        self._closed.set()
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    # One connection ---------------------------------------------------------------------

    def _serve_connection(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_SIZE)
        try:
            with sock:
                self._serve_requests(sock, conn)
        except OSError as error:
            log.debug("API connection ended: %s", error)
        except Exception:
            log.exception("API connection failed")

    def _serve_requests(self, sock: socket.socket, conn: h11.Connection) -> None:
        while True:
            try:
                request = _next_event(sock, conn)
                if isinstance(request, (h11.ConnectionClosed, h11.PAUSED)):
                    return
                assert isinstance(request, h11.Request)
                body = self._read_body(sock, conn, request)
            except (h11.RemoteProtocolError, _BadRequest) as error:
                self._reject(sock, conn, error)
                return
            method = request.method.decode("ascii", "replace")
            target = request.target.decode("ascii", "replace")
            try:
                status, payload = self.handler(method, target, body)
            except Exception as error:
                log.exception("API handler failed on %s %s", method, target)
                status, payload = 500, {"fault_message": f"internal error: {error!r}"}
            _send_response(sock, conn, status, payload)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    def _read_body(self, sock: socket.socket, conn: h11.Connection,
                   request: h11.Request) -> bytes:
        length = _content_length(request)
        if length is not None and length > self.max_payload_size:
            raise _BadRequest(
                f"the request body of {length} bytes is larger than the limit of "
                f"{self.max_payload_size} bytes (--http-api-max-payload-size)"
            )
        chunks: list[bytes] = []
        received = 0
        while True:
            event = _next_event(sock, conn)
            if isinstance(event, h11.Data):
                received += len(event.data)
                if received > self.max_payload_size:
                    raise _BadRequest(
                        f"the request body is larger than the limit of "
                        f"{self.max_payload_size} bytes (--http-api-max-payload-size)"
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise _BadRequest("the connection ended in the middle of the request body")

    def _reject(self, sock: socket.socket, conn: h11.Connection, error: Exception) -> None:
        message = str(error)
        if isinstance(error, h11.RemoteProtocolError):
            message = f"malformed HTTP request: {error}"
        log.info("API request rejected: %s", message)
        try:
            _send_response(sock, conn, 400, {"fault_message": message}, close=True)
        except h11.LocalProtocolError:
            # h11 cannot frame a response in this state (for example the request line
            # never arrived); the connection is closed without a response.
            return
        _drain_before_close(sock)


def _drain_before_close(sock: socket.socket) -> None:
    """Read what the client is still sending, so that closing does not reset the socket
    before the client has read the 400 response. Bounded in time and size."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(_DRAIN_TIMEOUT_S)
        drained = 0
        while drained < _DRAIN_MAX_BYTES:
            data = sock.recv(_RECV_SIZE)
            if not data:
                return
            drained += len(data)
    except OSError:
        pass


def _next_event(sock: socket.socket, conn: h11.Connection) -> object:
    pending = b""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = sock.recv(_RECV_SIZE)
        if conn.their_state is not h11.IDLE or not data or conn.trailing_data[0]:
            conn.receive_data(pending + data)
            pending = b""
            continue
        # A new request starts and h11 holds none of it yet: keep its bytes until the
        # header block is complete, so that a missing Host header can be added first.
        pending += data
        if b"\r\n\r\n" in pending or len(pending) > _MAX_HEADER_SIZE:
            conn.receive_data(_add_default_host(pending))
            pending = b""


def _add_default_host(data: bytes) -> bytes:
    """Add `Host: localhost` to an HTTP/1.1 header block at the start of `data` that has none.

    h11 rejects HTTP/1.1 requests without Host (RFC 9112, section 3.2), but Firecracker's
    server accepts them, and clients written against it may omit the header on a Unix
    socket. Only the first request in `data` is changed; a later pipelined request
    without Host is still rejected with 400.
    """
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        return data
    request_line, _, headers = head.partition(b"\r\n")
    if not request_line.endswith(b" HTTP/1.1"):
        return data
    for line in headers.split(b"\r\n"):
        if line[:5].lower() == b"host:":
            return data
    head = request_line + b"\r\nHost: localhost" + (b"\r\n" + headers if headers else b"")
    return head + separator + rest


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def _send_response(sock: socket.socket, conn: h11.Connection, status: int,
                   payload: dict | None, close: bool = False) -> None:
    headers = [_SERVER_HEADER]
    if close:
        headers.append(("Connection", "close"))
    reason = _reason_phrase(status)
    if payload is None or status == 204:
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
        sock.sendall(data + conn.send(h11.EndOfMessage()))
        return
    body = json.dumps(payload).encode()
    headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
    data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    sock.sendall(data)


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiServerError(
            f"API socket path {path!r} exists and is not a socket; remove it or choose "
            "another --api-sock"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale API socket %s", path)
        return
    finally:
        probe.close()
    raise ApiServerError(
        f"API socket {path!r} is in use by a running server; stop it or choose another "
        "--api-sock"
    )
