"""Token-bucket rate limiters for device I/O, configured like Firecracker's `rate_limiter` object.

A `RateLimiter` holds up to two buckets: `bandwidth` counts bytes and `ops`
counts requests. Each bucket is the API's TokenBucket: it contains at most `size`
tokens, refills at `size` tokens per `refill_time` milliseconds, starts full,
and spends a `one_time_burst` of extra tokens first, which never refill. A
bucket with size 0 or refill_time 0 is disabled and lets everything through.

A device asks `consume(tokens, kind)` before it serves a request. When that
returns False the device stops taking requests from its queue. The limiter
then arms its timerfd for the moment the bucket holds enough tokens. The
monitor's event loop watches `timer_fd` and calls `on_timer` followed by the
device's queue handler, so a blocked queue resumes without a guest
notification.

Requests larger than the bucket
-------------------------------
A single request may need more tokens than `size` (a 64 KiB packet through a
16 KiB bucket). Waiting for that many tokens would stall the queue forever, and
the device cannot split a request the guest made as one unit. So such a request
passes when the bucket is full and leaves the bucket in debt: its balance goes
below zero, and later requests wait until the refill has paid the debt. Over
time the rate still averages `size` tokens per `refill_time`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Final

NANOSECONDS_PER_MILLISECOND: Final = 1_000_000
NANOSECONDS_PER_SECOND: Final = 1_000_000_000

# linux/time.h and linux/timerfd.h (sys/timerfd.h in glibc).
CLOCK_MONOTONIC: Final = 1
TFD_NONBLOCK: Final = os.O_NONBLOCK
TFD_CLOEXEC: Final = os.O_CLOEXEC
# A timerfd read returns the number of expirations as a native 64-bit integer.
TIMERFD_READ_SIZE: Final = 8

Clock = Callable[[], int]


class TokenKind(enum.Enum):
    """The unit a bucket counts."""

    BYTES = "bandwidth"
    OPS = "ops"


class _Timespec(ctypes.Structure):
    """struct timespec of linux/time_types.h on a 64-bit host."""

    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    """struct itimerspec: the period (it_interval) and the first expiry (it_value)."""

    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_create.restype = ctypes.c_int
_libc.timerfd_settime.argtypes = [
    ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.POINTER(_Itimerspec),
]
_libc.timerfd_settime.restype = ctypes.c_int


def _timespec(nanoseconds: int) -> _Timespec:
    seconds, rest = divmod(nanoseconds, NANOSECONDS_PER_SECOND)
    return _Timespec(seconds, rest)


class TimerFd:
    """A non-blocking CLOCK_MONOTONIC timerfd (timerfd_create(2)), for an EventLoop reader.

    Python before 3.13 has no os.timerfd_create, so this calls glibc through ctypes.
    """

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"timerfd_create failed: {os.strerror(errno)}")
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def arm(self, delay_ns: int, interval_ns: int = 0) -> None:
        """Expire after `delay_ns` (at least 1 ns), then every `interval_ns` if it is non-zero."""
        spec = _Itimerspec(_timespec(interval_ns), _timespec(max(delay_ns, 1)))
        self._settime(spec)

    def disarm(self) -> None:
        self._settime(_Itimerspec(_timespec(0), _timespec(0)))

    def _settime(self, spec: _Itimerspec) -> None:
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"timerfd_settime on fd {self.fd} failed: {os.strerror(errno)}")

    def read_expirations(self) -> int:
        """Return how many times the timer expired since the last read, 0 if it did not."""
        try:
            data = os.read(self.fd, TIMERFD_READ_SIZE)
        except BlockingIOError:
            return 0
        return int.from_bytes(data, "little")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class TokenBucket:
    """A bucket of `size` tokens that refills completely in `refill_time_ms` milliseconds.

    `budget` is the refillable balance; it drops below zero after a request
    larger than `size` (see the module docstring). `one_time_burst` is spent
    before the budget and never refills. `clock` returns monotonic nanoseconds.
    """

    size: int
    refill_time_ms: int
    one_time_burst: int = 0
    clock: Clock = time.monotonic_ns
    budget: int = field(init=False)
    _last_refill_ns: int = field(init=False)
    # Refill progress below one token, as a numerator over refill_time in ns.
    _fraction: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.refill_time_ms <= 0:
            raise ValueError(
                f"token bucket size {self.size} and refill_time {self.refill_time_ms} ms must "
                f"both be positive; a bucket with either at 0 is disabled, not created"
            )
        if self.one_time_burst < 0:
            raise ValueError(f"one_time_burst {self.one_time_burst} is negative")
        self.budget = self.size
        self._last_refill_ns = self.clock()

    @property
    def refill_time_ns(self) -> int:
        return self.refill_time_ms * NANOSECONDS_PER_MILLISECOND

    def refill(self) -> None:
        """Add the tokens earned since the last refill, up to `size`."""
        now = self.clock()
        elapsed = max(0, now - self._last_refill_ns)
        self._last_refill_ns = now
        earned, self._fraction = divmod(elapsed * self.size + self._fraction, self.refill_time_ns)
        self.budget += earned
        if self.budget >= self.size:
            self.budget = self.size
            self._fraction = 0

    def consume(self, tokens: int) -> bool:
        """Take `tokens`, the one-time burst first; return False and take nothing if short.

        A request larger than `size` passes only when the bucket is full, and leaves
        the budget negative by the excess.
        """
        self.refill()
        from_burst = min(tokens, self.one_time_burst)
        rest = tokens - from_burst
        if rest > self.size:
            if self.budget < self.size:
                return False
        elif rest > self.budget:
            return False
        self.one_time_burst -= from_burst
        self.budget -= rest
        return True

    def replenish(self, tokens: int) -> None:
        """Give back `tokens` taken by a request that was not served after all."""
        self.budget = min(self.size, self.budget + tokens)

    def wait_ns(self, tokens: int) -> int:
        """Return nanoseconds until `consume(tokens)` can succeed, 0 if it can now."""
        self.refill()
        needed = min(max(0, tokens - self.one_time_burst), self.size)
        deficit = needed - self.budget
        if deficit <= 0:
            return 0
        # Tokens arrive at size per refill_time_ns; part of the next one has accrued already.
        numerator = deficit * self.refill_time_ns - self._fraction
        return -(-numerator // self.size)


def bucket_from_config(config: dict[str, Any] | None, clock: Clock) -> TokenBucket | None:
    """Build a bucket from the API's TokenBucket object; None for absent or disabled ones."""
    if not config:
        return None
    size = int(config.get("size", 0))
    refill_time_ms = int(config.get("refill_time", 0))
    if size == 0 or refill_time_ms == 0:
        return None
    return TokenBucket(size, refill_time_ms, int(config.get("one_time_burst", 0) or 0), clock)


class RateLimiter:
    """A bandwidth bucket and an ops bucket, with a timerfd that fires when a wait ends.

    Devices call `consume` from the event-loop thread; `update` may come from
    the API thread, so the owner calls both under the device's lock.
    """

    def __init__(
        self,
        bandwidth: TokenBucket | None = None,
        ops: TokenBucket | None = None,
        clock: Clock = time.monotonic_ns,
    ) -> None:
        self.buckets: dict[TokenKind, TokenBucket | None] = {
            TokenKind.BYTES: bandwidth,
            TokenKind.OPS: ops,
        }
        self.clock = clock
        self.timer = TimerFd()
        self.is_blocked = False
        self.throttled_count = 0

    @classmethod
    def from_config(
        cls, config: dict[str, Any] | None, clock: Clock = time.monotonic_ns
    ) -> RateLimiter | None:
        """Build a limiter from the API's RateLimiter object; None when it limits nothing."""
        if not config:
            return None
        bandwidth = bucket_from_config(config.get("bandwidth"), clock)
        ops = bucket_from_config(config.get("ops"), clock)
        return cls(bandwidth, ops, clock)

    def __repr__(self) -> str:
        parts = []
        for kind, bucket in self.buckets.items():
            if bucket is not None:
                parts.append(f"{kind.value}={bucket.size}/{bucket.refill_time_ms}ms")
        return f"RateLimiter({', '.join(parts) or 'unlimited'}, blocked={self.is_blocked})"

    @property
    def timer_fd(self) -> int:
        return self.timer.fileno()

    def consume(self, tokens: int, kind: TokenKind) -> bool:
        """Take `tokens` of `kind`, or block: arm the timer for when they exist, return False."""
        bucket = self.buckets[kind]
        if bucket is None:
            return True
        if self.is_blocked:
            return False
        if bucket.consume(tokens):
            return True
        self.is_blocked = True
        self.throttled_count += 1
        self.timer.arm(bucket.wait_ns(tokens))
        return False

    def consume_request(self, byte_count: int) -> bool:
        """Take one op and `byte_count` bytes for one request, or neither; False when blocked."""
        if not self.consume(1, TokenKind.OPS):
            return False
        if not self.consume(byte_count, TokenKind.BYTES):
            self.replenish(1, TokenKind.OPS)
            return False
        return True

    def replenish(self, tokens: int, kind: TokenKind) -> None:
        """Return `tokens` of `kind` taken for a request that was not served."""
        bucket = self.buckets[kind]
        if bucket is not None:
            bucket.replenish(tokens)

    def wait_ns(self, tokens: int, kind: TokenKind) -> int:
        """Return nanoseconds until `tokens` of `kind` exist, 0 if they do now."""
        bucket = self.buckets[kind]
        return 0 if bucket is None else bucket.wait_ns(tokens)

    def on_timer(self) -> bool:
        """Acknowledge the timerfd after it fired; return True when the limiter unblocked."""
        expired = self.timer.read_expirations() > 0
        if expired:
            self.is_blocked = False
        return expired

    def update(self, config: dict[str, Any]) -> None:
        """Apply a PATCH: each bucket present in `config` is replaced, absent ones are kept.

        A bucket given with size 0 or refill_time 0 is disabled. A blocked limiter
        arms its timer to fire at once, so the device retries under the new limits
        instead of waiting out the old ones.
        """
        for kind in TokenKind:
            if kind.value in config:
                self.buckets[kind] = bucket_from_config(config[kind.value], self.clock)
        if self.is_blocked:
            self.timer.arm(1)

    def close(self) -> None:
        self.timer.close()

