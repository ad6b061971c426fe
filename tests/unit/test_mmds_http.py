"""MMDS data store reads, V1 and V2 tokens and the h11 session, with requests built here."""

from __future__ import annotations

import json

import h11
import pytest

from vmm.mmds.data_store import ResourceNotFound, render_imds, resolve
from vmm.mmds.http import HttpSession, MmdsService, MmdsVersion
from vmm.mmds.token import MAX_TOKEN_TTL_S, TokenAuthority

STORE = {
    "latest": {
        "meta-data": {"ami-id": "ami-87654321", "reservation-id": "r-79054aef",
                      "network": {"count": 2}},
        "a/b": "slash",
    }
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_resolve_follows_json_pointer() -> None:
    assert resolve(STORE, "/latest/meta-data/ami-id") == "ami-87654321"
    assert resolve(STORE, "/latest/meta-data/") == STORE["latest"]["meta-data"]
    assert resolve(STORE, "/latest/a~1b") == "slash"


def test_resolve_missing_path_names_it() -> None:
    with pytest.raises(ResourceNotFound, match="/latest/nothing"):
        resolve(STORE, "/latest/nothing")


def test_imds_lists_keys_with_slash_for_objects() -> None:
    assert render_imds(STORE["latest"]["meta-data"]) == "ami-id\nreservation-id\nnetwork/"


def _request(method: str, target: str, *headers: tuple[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 169.254.169.254"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _parse_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    responses = []
    status, headers, body = 0, {}, b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status, headers, body = event.status_code, dict(event.headers), b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            responses.append((status, headers, body))
            if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                return responses
            client.start_next_cycle()
            client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
        else:
            return responses


def _exchange(service: MmdsService, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    (response,) = _parse_responses(HttpSession(service).receive(request))
    return response


def test_v1_get_returns_imds_text() -> None:
    status, headers, body = _exchange(MmdsService(lambda: STORE),
                                      _request("GET", "/latest/meta-data"))
    assert status == 200
    assert headers[b"content-type"] == b"text/plain"
    assert body == b"ami-id\nreservation-id\nnetwork/"


def test_v1_get_returns_json_on_request() -> None:
    status, headers, body = _exchange(
        MmdsService(lambda: STORE),
        _request("GET", "/latest/meta-data/network", ("Accept", "application/json")),
    )
    assert status == 200
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {"count": 2}


def test_imds_compat_ignores_accept_json() -> None:
    status, headers, body = _exchange(
        MmdsService(lambda: STORE, imds_compat=True),
        _request("GET", "/latest/meta-data/ami-id", ("Accept", "application/json")),
    )
    assert (status, body) == (200, b"ami-87654321")
    assert headers[b"content-type"] == b"text/plain"


def test_imds_has_no_form_for_numbers() -> None:
    status, _headers, body = _exchange(MmdsService(lambda: STORE),
                                       _request("GET", "/latest/meta-data/network/count"))
    assert status == 501
    assert b"invalid type" in body


def test_missing_resource_is_404() -> None:
    status, _headers, body = _exchange(MmdsService(lambda: STORE), _request("GET", "/nope"))
    assert status == 404
    assert b"/nope" in body


def test_other_methods_are_405_with_allow() -> None:
    status, headers, _body = _exchange(MmdsService(lambda: STORE), _request("DELETE", "/"))
    assert status == 405
    assert headers[b"allow"] == b"GET, PUT"


def test_store_updates_are_seen_by_next_request() -> None:
    store = {"key": "old"}
    service = MmdsService(lambda: store)
    assert _exchange(service, _request("GET", "/key"))[2] == b"old"
    store = {"key": "new"}
    assert _exchange(service, _request("GET", "/key"))[2] == b"new"


def _token(service: MmdsService, ttl: str = "60") -> bytes:
    status, _headers, body = _exchange(
        service, _request("PUT", "/latest/api/token", ("X-metadata-token-ttl-seconds", ttl))
    )
    assert status == 200
    return body


def test_v2_get_without_token_is_401() -> None:
    service = MmdsService(lambda: STORE, MmdsVersion.V2)
    status, _headers, body = _exchange(service, _request("GET", "/latest"))
    assert status == 401
    assert b"X-metadata-token" in body


def test_v2_get_with_token_succeeds() -> None:
    service = MmdsService(lambda: STORE, MmdsVersion.V2)
    token = _token(service).decode()
    status, _headers, body = _exchange(
        service, _request("GET", "/latest/meta-data/ami-id", ("X-metadata-token", token))
    )
    assert (status, body) == (200, b"ami-87654321")


def test_v2_rejects_forged_and_expired_tokens() -> None:
    clock = FakeClock()
    service = MmdsService(lambda: STORE, MmdsVersion.V2, tokens=TokenAuthority(clock))
    token = _token(service, "10").decode()
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert _exchange(service, _request("GET", "/", ("X-metadata-token", forged)))[0] == 401
    clock.now += 11
    assert _exchange(service, _request("GET", "/", ("X-metadata-token", token)))[0] == 401


def test_v1_ignores_invalid_token() -> None:
    service = MmdsService(lambda: STORE)
    assert _exchange(service, _request("GET", "/", ("X-metadata-token", "bogus")))[0] == 200


def test_token_from_other_authority_is_invalid() -> None:
    issuer = TokenAuthority()
    assert not TokenAuthority().is_valid(issuer.issue("60"))
    assert issuer.is_valid(issuer.issue("60"))


@pytest.mark.parametrize("ttl", ["0", str(MAX_TOKEN_TTL_S + 1), "-5", "ten"])
def test_token_ttl_out_of_range_is_400(ttl: str) -> None:
    status, _headers, body = _exchange(
        MmdsService(lambda: STORE, MmdsVersion.V2),
        _request("PUT", "/latest/api/token", ("X-metadata-token-ttl-seconds", ttl)),
    )
    assert status == 400
    assert b"between 1 and 21600" in body


def test_token_without_ttl_is_400() -> None:
    status, _headers, _body = _exchange(MmdsService(lambda: STORE, MmdsVersion.V2),
                                        _request("PUT", "/latest/api/token"))
    assert status == 400


def test_token_with_forwarded_for_is_400() -> None:
    status, _headers, body = _exchange(
        MmdsService(lambda: STORE, MmdsVersion.V2),
        _request("PUT", "/latest/api/token", ("X-metadata-token-ttl-seconds", "60"),
                 ("X-Forwarded-For", "1.2.3.4")),
    )
    assert status == 400
    assert b"X-Forwarded-For" in body


def test_session_serves_pipelined_requests_in_order() -> None:
    session = HttpSession(MmdsService(lambda: STORE))
    data = session.receive(_request("GET", "/latest/a~1b") + _request("GET", "/missing"))
    responses = _parse_responses(data)
    assert [status for status, _h, _b in responses] == [200, 404]
    assert session.requests_served == 2
    assert not session.wants_close


def test_session_accepts_request_split_across_segments() -> None:
    session = HttpSession(MmdsService(lambda: STORE))
    request = _request("GET", "/latest/meta-data/ami-id")
    assert session.receive(request[:10]) == b""
    assert _parse_responses(session.receive(request[10:]))[0][2] == b"ami-87654321"


def test_session_closes_after_connection_close() -> None:
    session = HttpSession(MmdsService(lambda: STORE))
    session.receive(_request("GET", "/latest/a~1b", ("Connection", "close")))
    assert session.wants_close


def test_malformed_request_gets_400_and_close() -> None:
    session = HttpSession(MmdsService(lambda: STORE))
    (response,) = _parse_responses(session.receive(b"NOT HTTP\r\n\r\n"))
    assert response[0] == 400
    assert session.wants_close
    assert session.malformed_requests == 1


def test_oversized_request_head_is_rejected() -> None:
    session = HttpSession(MmdsService(lambda: STORE))
    data = session.receive(b"GET /" + b"a" * 20000)
    assert session.wants_close
    assert _parse_responses(data)[0][0] in (400, 431)
