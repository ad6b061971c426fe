"""MMDS version 2 session tokens: issued by PUT /latest/api/token, checked on every GET.

A token carries its own expiry and an HMAC-SHA256 over it, keyed with a secret
drawn at random when the authority is created. So the monitor keeps no table
of issued tokens (nothing for a guest to grow), a token cannot be forged or
extended without the key, and tokens from an earlier boot of the monitor are
invalid. A token is text: URL-safe base64 of the 8-byte expiry in milliseconds
of the monotonic clock followed by the 32-byte MAC.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from typing import Callable, Final

# Firecracker's MMDS user guide: the time to live is 1 to 21600 seconds (6 hours).
MIN_TOKEN_TTL_S: Final = 1
MAX_TOKEN_TTL_S: Final = 21600
_KEY_SIZE: Final = 32
_EXPIRY_SIZE: Final = 8
_MAC_SIZE: Final = hashlib.sha256().digest_size
# Longer header values are rejected before decoding: a valid token is 56 characters.
_MAX_TOKEN_TEXT: Final = 128


class TokenTtlError(ValueError):
    """The requested time to live is not an integer from 1 to 21600 (HTTP 400)."""


class TokenAuthority:
    """Issues and checks session tokens; `clock` returns seconds, monotonic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._key = os.urandom(_KEY_SIZE)
        self._clock = clock

    def issue(self, ttl_text: str) -> str:
        """Return a token valid for `ttl_text` seconds, or raise TokenTtlError."""
        ttl = parse_ttl(ttl_text)
        expiry_ms = int((self._clock() + ttl) * 1000)
        expiry = expiry_ms.to_bytes(_EXPIRY_SIZE, "big")
        return base64.urlsafe_b64encode(expiry + self._mac(expiry)).decode("ascii")

    def is_valid(self, token: str) -> bool:
        """Tell whether `token` was issued by this authority and has not expired."""
        if len(token) > _MAX_TOKEN_TEXT:
            return False
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError):
            return False
        if len(raw) != _EXPIRY_SIZE + _MAC_SIZE:
            return False
        expiry, mac = raw[:_EXPIRY_SIZE], raw[_EXPIRY_SIZE:]
        if not hmac.compare_digest(mac, self._mac(expiry)):
            return False
        return int.from_bytes(expiry, "big") > self._clock() * 1000

    def _mac(self, expiry: bytes) -> bytes:
        return hmac.new(self._key, expiry, hashlib.sha256).digest()


def parse_ttl(text: str) -> int:
    """Return the time to live in seconds, or raise TokenTtlError naming the value."""
    stripped = text.strip()
    if not stripped.isdigit() or not MIN_TOKEN_TTL_S <= int(stripped) <= MAX_TOKEN_TTL_S:
        raise TokenTtlError(
            f"Invalid time to live value provided for token: {text[:32]!r}. Please provide "
            f"a value between {MIN_TOKEN_TTL_S} and {MAX_TOKEN_TTL_S}."
        )
    return int(stripped)
