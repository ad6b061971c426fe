"""The MMDS HTTP/1.1 service: request semantics (V1 and V2) and one h11 session per connection.

`MmdsService` answers a parsed request, as Firecracker's MMDS user guide
describes: GET reads the data store at the path (a JSON pointer), in JSON when
the request has `Accept: application/json` and in IMDS text otherwise; PUT
/latest/api/token issues a V2 session token. With version V2 a GET needs a
valid X-metadata-token header (401 otherwise); V1 serves GETs with or without
one. Other methods get 405 with an Allow header.

`HttpSession` parses the bytes of one TCP connection with h11 and returns the
response bytes; it serves pipelined requests in order and bounds what it buffers.
"""

from __future__ import annotations

import enum
import http
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Final

import h11

from vmm.mmds.data_store import (
    ResourceNotFound,
    UnsupportedImdsValue,
    render_imds,
    render_json,
    resolve,
)
from vmm.mmds.token import TokenAuthority, TokenTtlError

log = logging.getLogger(__name__)

TOKEN_PATH: Final = "/latest/api/token"
# Header names are compared lower-cased, as h11 delivers them.
TOKEN_HEADERS: Final = (b"x-metadata-token", b"x-aws-ec2-metadata-token")
TTL_HEADERS: Final = (b"x-metadata-token-ttl-seconds", b"x-aws-ec2-metadata-token-ttl-seconds")
FORWARDED_FOR_HEADER: Final = b"x-forwarded-for"
ALLOWED_METHODS: Final = "GET, PUT"
JSON_TYPE: Final = "application/json"
TEXT_TYPE: Final = "text/plain"
# Largest request head and body a session buffers; MMDS requests are a few hundred bytes.
MAX_REQUEST_SIZE: Final = 16 * 1024
SERVER_NAME: Final = b"vmm-mmds"


class MmdsVersion(enum.StrEnum):
    V1 = "V1"
    V2 = "V2"


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: str
    content_type: str = TEXT_TYPE
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class MmdsService:
    """Serves MMDS requests from the data store that `data_source` returns.

    `data_source` is called once per GET, so updates through the API are seen
    by the next request and a request never sees half an update.
    """

    data_source: Callable[[], Any]
    version: MmdsVersion = MmdsVersion.V1
    imds_compat: bool = False
    tokens: TokenAuthority = field(default_factory=TokenAuthority)

    def handle(self, method: str, target: str, headers: dict[bytes, bytes]) -> HttpResponse:
        """Return the response to one request; `headers` has lower-cased names."""
        path = target.split("?", 1)[0]
        if method == "PUT":
            return self._put(path, headers)
        if method == "GET":
            return self._get(path, headers)
        return HttpResponse(
            405, f"Not allowed HTTP method: {method}. Allowed: {ALLOWED_METHODS}.",
            headers=(("Allow", ALLOWED_METHODS),),
        )

    def _put(self, path: str, headers: dict[bytes, bytes]) -> HttpResponse:
        if path.rstrip("/") != TOKEN_PATH:
            return HttpResponse(404, f"Resource not found: {path}. PUT serves {TOKEN_PATH}.")
        if FORWARDED_FOR_HEADER in headers:
            return HttpResponse(
                400, "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For"
            )
        ttl = _first_header(headers, TTL_HEADERS)
        if ttl is None:
            return HttpResponse(400, "Token time to live value not found. Send the "
                                     "X-metadata-token-ttl-seconds header.")
        try:
            token = self.tokens.issue(ttl)
        except TokenTtlError as error:
            return HttpResponse(400, str(error))
        return HttpResponse(200, token, headers=(("X-metadata-token-ttl-seconds", ttl),))

    def _get(self, path: str, headers: dict[bytes, bytes]) -> HttpResponse:
        if self.version is MmdsVersion.V2:
            token = _first_header(headers, TOKEN_HEADERS)
            if token is None:
                return HttpResponse(401, "No MMDS token provided. Use `X-metadata-token` "
                                         "header to specify the session token.")
            if not self.tokens.is_valid(token):
                return HttpResponse(401, "MMDS token not valid.")
        try:
            value = resolve(self.data_source(), path)
        except ResourceNotFound as error:
            return HttpResponse(404, str(error))
        if self._wants_json(headers):
            return HttpResponse(200, render_json(value), JSON_TYPE)
        try:
            return HttpResponse(200, render_imds(value))
        except UnsupportedImdsValue as error:
            return HttpResponse(501, str(error))

    def _wants_json(self, headers: dict[bytes, bytes]) -> bool:
        if self.imds_compat:
            return False
        accept = headers.get(b"accept", b"").decode("latin-1").lower()
        return JSON_TYPE in accept


def _first_header(headers: dict[bytes, bytes], names: tuple[bytes, ...]) -> str | None:
    for name in names:
        if name in headers:
            return headers[name].decode("latin-1")
    return None


class HttpSession:
    """The HTTP side of one TCP connection: bytes in, response bytes out.

    After `receive` returns, `wants_close` tells whether the connection should
    be closed once the returned bytes are sent (the client asked for it, or the
    request was malformed and the session cannot continue).
    """

    def __init__(self, service: MmdsService) -> None:
        self.service = service
        self._connection = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_REQUEST_SIZE
        )
        self._request: h11.Request | None = None
        self._body_size = 0
        self.wants_close = False
        self.requests_served = 0
        self.malformed_requests = 0

    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the client (b"" at end of stream); return response bytes."""
        if self.wants_close:
            return b""
        self._connection.receive_data(data)
        output = bytearray()
        try:
            self._process_events(output)
        except h11.RemoteProtocolError as error:
            output += self._reject(error)
        return bytes(output)

    def _process_events(self, output: bytearray) -> None:
        while not self.wants_close:
            event = self._connection.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if event is h11.PAUSED and self._ready_for_next_cycle():
                    self._connection.start_next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self._request, self._body_size = event, 0
            elif isinstance(event, h11.Data):
                self._count_body(len(event.data))
            elif isinstance(event, h11.EndOfMessage):
                output += self._respond()
            elif isinstance(event, h11.ConnectionClosed):
                self.wants_close = True

    def _ready_for_next_cycle(self) -> bool:
        return self._connection.our_state is h11.DONE and self._connection.their_state is h11.DONE

    def _count_body(self, size: int) -> None:
        # MMDS requests carry no body; one is read and dropped, up to the size limit.
        self._body_size += size
        if self._body_size > MAX_REQUEST_SIZE:
            raise h11.RemoteProtocolError(
                f"request body is larger than {MAX_REQUEST_SIZE} bytes", 413
            )

    def _respond(self) -> bytes:
        request = self._request
        assert request is not None
        headers = {name.lower(): value for name, value in request.headers}
        response = self.service.handle(
            request.method.decode("ascii", "replace"),
            request.target.decode("latin-1"),
            headers,
        )
        self.requests_served += 1
        data = self._serialize(response)
        if self._connection.our_state is h11.MUST_CLOSE:
            self.wants_close = True
        return data

    def _serialize(self, response: HttpResponse) -> bytes:
        body = response.body.encode("utf-8")
        headers = [
            ("Server", SERVER_NAME),
            ("Content-Type", response.content_type.encode("ascii")),
            ("Content-Length", str(len(body)).encode("ascii")),
            *((name, value.encode("latin-1")) for name, value in response.headers),
        ]
        reason = http.HTTPStatus(response.status).phrase.encode("ascii")
        data = self._connection.send(
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        )
        data = (data or b"") + (self._connection.send(h11.Data(data=body)) or b"")
        return data + (self._connection.send(h11.EndOfMessage()) or b"")

    def _reject(self, error: h11.RemoteProtocolError) -> bytes:
        """Answer a malformed request with its status (400 unless h11 names one) and close."""
        self.malformed_requests += 1
        self.wants_close = True
        log.debug("MMDS: malformed HTTP request: %s", error)
        if self._connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return b""
        status = error.error_status_hint
        return self._serialize(HttpResponse(status, f"Malformed HTTP request: {error}"))
