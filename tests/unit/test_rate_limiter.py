"""Token buckets and the rate limiter, on a controllable clock and a real timerfd."""

from __future__ import annotations

import select
import time

import pytest

from vmm.rate_limiter import (
    NANOSECONDS_PER_MILLISECOND,
    RateLimiter,
    TimerFd,
    TokenBucket,
    TokenKind,
    bucket_from_config,
)

MS = NANOSECONDS_PER_MILLISECOND


class FakeClock:
    """Monotonic nanoseconds that advance only when the test calls advance_ms."""

    def __init__(self) -> None:
        self.now = 1_000 * MS

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, milliseconds: float) -> None:
        self.now += int(milliseconds * MS)


def test_bucket_starts_full_and_empties() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 100, clock=clock)
    assert bucket.consume(600)
    assert bucket.consume(400)
    assert not bucket.consume(1)
    assert bucket.budget == 0


def test_bucket_refills_at_size_per_refill_time() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 100, clock=clock)
    assert bucket.consume(1000)
    clock.advance_ms(50)
    assert not bucket.consume(501)
    assert bucket.consume(500)
    clock.advance_ms(1000)
    bucket.refill()
    assert bucket.budget == 1000


def test_bucket_keeps_fractional_refill() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3, 10, clock=clock)
    assert bucket.consume(3)
    for _ in range(10):
        clock.advance_ms(1)
        bucket.refill()
    assert bucket.budget == 3


def test_one_time_burst_spent_first_and_not_refilled() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 100, one_time_burst=50, clock=clock)
    assert bucket.consume(150)
    assert bucket.one_time_burst == 0
    assert bucket.budget == 0
    clock.advance_ms(1000)
    bucket.refill()
    assert bucket.budget == 100
    assert bucket.one_time_burst == 0


def test_oversized_request_passes_when_full_and_leaves_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 100, clock=clock)
    assert bucket.consume(250)
    assert bucket.budget == -150
    assert not bucket.consume(1)
    # The debt of 150 tokens plus 1 takes 151 ms to repay at 1 token per ms.
    assert bucket.wait_ns(1) == 151 * MS
    clock.advance_ms(151)
    assert bucket.consume(1)


def test_oversized_request_waits_for_full_bucket() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 100, clock=clock)
    assert bucket.consume(10)
    assert not bucket.consume(500)
    assert bucket.wait_ns(500) == 10 * MS
    clock.advance_ms(10)
    assert bucket.consume(500)


def test_wait_ns_is_exact_for_partial_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 1000, clock=clock)
    assert bucket.consume(1000)
    clock.advance_ms(0.5)
    assert bucket.wait_ns(1) == MS // 2


def test_bucket_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="size 0"):
        TokenBucket(0, 100)


def test_bucket_from_config_disabled_forms() -> None:
    clock = FakeClock()
    assert bucket_from_config(None, clock) is None
    assert bucket_from_config({"size": 0, "refill_time": 100}, clock) is None
    assert bucket_from_config({"size": 10, "refill_time": 0}, clock) is None
    bucket = bucket_from_config({"size": 10, "refill_time": 5, "one_time_burst": 3}, clock)
    assert bucket is not None
    assert (bucket.size, bucket.refill_time_ms, bucket.one_time_burst) == (10, 5, 3)


def test_limiter_from_config_without_buckets_is_none() -> None:
    assert RateLimiter.from_config(None) is None
    assert RateLimiter.from_config({}) is None


def test_limiter_without_bucket_passes_everything() -> None:
    limiter = RateLimiter(ops=TokenBucket(1, 1000, clock=FakeClock()))
    try:
        assert limiter.consume(10**12, TokenKind.BYTES)
        assert limiter.consume(1, TokenKind.OPS)
        assert not limiter.consume(1, TokenKind.OPS)
    finally:
        limiter.close()


def _wait_readable(fd: int, timeout_s: float) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout_s)
    return bool(readable)


def test_limiter_blocks_then_timer_unblocks() -> None:
    limiter = RateLimiter(bandwidth=TokenBucket(1000, 20))
    try:
        assert limiter.consume(1000, TokenKind.BYTES)
        assert not limiter.consume(1000, TokenKind.BYTES)
        assert limiter.is_blocked
        assert limiter.throttled_count == 1
        assert not limiter.consume(1, TokenKind.BYTES)
        start = time.monotonic()
        assert _wait_readable(limiter.timer_fd, 2.0)
        assert time.monotonic() - start >= 0.015
        assert limiter.on_timer()
        assert not limiter.is_blocked
        assert limiter.consume(1000, TokenKind.BYTES)
    finally:
        limiter.close()


def test_limiter_replenish_returns_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(ops=TokenBucket(2, 1000, clock=clock), clock=clock)
    try:
        assert limiter.consume(2, TokenKind.OPS)
        limiter.replenish(1, TokenKind.OPS)
        assert limiter.consume(1, TokenKind.OPS)
    finally:
        limiter.close()


def test_limiter_update_unblocks_at_once() -> None:
    clock = FakeClock()
    limiter = RateLimiter(bandwidth=TokenBucket(10, 60_000, clock=clock), clock=clock)
    try:
        assert limiter.consume(10, TokenKind.BYTES)
        assert not limiter.consume(10, TokenKind.BYTES)
        assert limiter.is_blocked
        limiter.update({"bandwidth": {"size": 1000, "refill_time": 100}})
        assert _wait_readable(limiter.timer_fd, 1.0)
        assert limiter.on_timer()
        assert limiter.consume(1000, TokenKind.BYTES)
        assert limiter.buckets[TokenKind.OPS] is None
    finally:
        limiter.close()


def test_limiter_update_keeps_absent_bucket_and_disables_zero() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        bandwidth=TokenBucket(10, 100, clock=clock), ops=TokenBucket(5, 100, clock=clock),
        clock=clock,
    )
    try:
        limiter.update({"ops": {"size": 0, "refill_time": 0}})
        assert limiter.buckets[TokenKind.OPS] is None
        bandwidth = limiter.buckets[TokenKind.BYTES]
        assert bandwidth is not None
        assert bandwidth.size == 10
    finally:
        limiter.close()


def test_timerfd_periodic_expirations() -> None:
    timer = TimerFd()
    try:
        assert timer.read_expirations() == 0
        timer.arm(MS, interval_ns=MS)
        time.sleep(0.02)
        assert timer.read_expirations() >= 2
        timer.disarm()
        timer.read_expirations()
        time.sleep(0.005)
        assert timer.read_expirations() == 0
    finally:
        timer.close()


def test_consume_request_takes_op_and_bytes_or_neither() -> None:
    """A request that gets its op but not its bytes gives the op back."""
    limiter = RateLimiter.from_config(
        {"ops": {"size": 2, "refill_time": 1000}, "bandwidth": {"size": 100, "refill_time": 1000}},
        clock=FakeClock(),
    )
    assert limiter is not None
    try:
        assert limiter.consume_request(60)
        assert not limiter.consume_request(60)
        assert limiter.buckets[TokenKind.OPS].budget == 1
        assert limiter.buckets[TokenKind.BYTES].budget == 40
    finally:
        limiter.close()
