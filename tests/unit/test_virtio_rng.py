"""virtio-rng (virtio 1.2 section 5.4), driven through virtio-mmio with a driver-side queue."""

from __future__ import annotations

import select
from collections.abc import Iterator

import pytest

from tests.virtio_driver import TEST_RAM_SIZE, MmioDriver, VirtqueueDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.rng import MAX_REQUEST_BYTES, VIRTIO_ID_ENTROPY, Rng
from vmm.memory import GuestMemory
from vmm.rate_limiter import RateLimiter, TokenBucket, TokenKind


class CountingSource:
    """An entropy source that returns a recognisable byte pattern and counts calls."""

    def __init__(self, fail: bool = False) -> None:
        self.requests: list[int] = []
        self.fail = fail

    def __call__(self, length: int) -> bytes:
        self.requests.append(length)
        if self.fail:
            raise OSError(5, "entropy source broken")
        return bytes((i * 7 + 1) % 256 for i in range(length))


class EntropyDevice:
    """An Rng started by a driver over virtio-mmio."""

    def __init__(
        self, memory: GuestMemory, source: CountingSource, limiter: RateLimiter | None = None
    ) -> None:
        self.memory = memory
        self.device = Rng(source, limiter)
        self.irq_count = 0
        self.transport = mmio.MmioTransport(self.device, memory, self.raise_irq)
        self.queue = VirtqueueDriver(memory, 16)
        self.driver = MmioDriver(self.transport)
        self.driver.start([self.queue])

    def raise_irq(self) -> None:
        self.irq_count += 1


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory([(0, TEST_RAM_SIZE)])
    yield ram
    ram.close()


def test_rng_device_id(memory: GuestMemory) -> None:
    rng = EntropyDevice(memory, CountingSource())
    assert rng.driver.read32(mmio.DEVICE_ID_OFFSET) == VIRTIO_ID_ENTROPY
    assert rng.transport.status & mmio.STATUS_DRIVER_OK


def test_rng_fills_writable_buffer(memory: GuestMemory) -> None:
    source = CountingSource()
    rng = EntropyDevice(memory, source)
    buffer = rng.queue.buffer(length=32, writable=True)
    head = rng.queue.add_chain([buffer])
    rng.transport.notify(0)
    assert rng.queue.used_entries() == [(head, 32)]
    assert memory.read(buffer.address, 32) == source(32)
    assert rng.irq_count == 1
    assert rng.device.metrics.entropy_bytes == 32
    assert rng.device.metrics.entropy_event_count == 1


def test_rng_fills_chain_across_buffers(memory: GuestMemory) -> None:
    source = CountingSource()
    rng = EntropyDevice(memory, source)
    first = rng.queue.buffer(length=5, writable=True)
    second = rng.queue.buffer(length=11, writable=True)
    rng.queue.add_chain([first, second])
    rng.transport.notify(0)
    ((_, length),) = rng.queue.used_entries()
    assert length == 16
    pattern = source(16)
    assert memory.read(first.address, 5) == pattern[:5]
    assert memory.read(second.address, 11) == pattern[5:]


def test_rng_skips_readable_buffers(memory: GuestMemory) -> None:
    rng = EntropyDevice(memory, CountingSource())
    readable = rng.queue.buffer(b"\xaa" * 8)
    rng.queue.add_chain([readable])
    rng.transport.notify(0)
    ((_, length),) = rng.queue.used_entries()
    assert length == 0
    assert memory.read(readable.address, 8) == b"\xaa" * 8
    assert rng.device.metrics.invalid_requests == 1


def test_rng_caps_huge_request(memory: GuestMemory) -> None:
    source = CountingSource()
    rng = EntropyDevice(memory, source)
    buffer = rng.queue.buffer(length=MAX_REQUEST_BYTES + 4096, writable=True)
    rng.queue.add_chain([buffer])
    rng.transport.notify(0)
    ((_, length),) = rng.queue.used_entries()
    assert length == MAX_REQUEST_BYTES
    assert source.requests[0] == MAX_REQUEST_BYTES


def test_rng_source_failure_returns_empty(memory: GuestMemory) -> None:
    rng = EntropyDevice(memory, CountingSource(fail=True))
    rng.queue.add_chain([rng.queue.buffer(length=8, writable=True)])
    rng.transport.notify(0)
    ((_, length),) = rng.queue.used_entries()
    assert length == 0
    assert rng.device.metrics.host_rng_fails == 1
    assert not rng.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET


def test_rng_rate_limiter_defers_then_resumes(memory: GuestMemory) -> None:
    limiter = RateLimiter(bandwidth=TokenBucket(64, 30))
    rng = EntropyDevice(memory, CountingSource(), limiter)
    try:
        heads = [
            rng.queue.add_chain([rng.queue.buffer(length=64, writable=True)]) for _ in range(2)
        ]
        rng.transport.notify(0)
        assert rng.queue.used_entries() == [(heads[0], 64)]
        assert rng.device.metrics.entropy_rate_limiter_throttled == 1
        assert not rng.device.on_rate_limiter_timer()
        readable, _, _ = select.select([limiter.timer_fd], [], [], 2.0)
        assert readable
        assert rng.device.on_rate_limiter_timer()
        rng.transport.notify(0)
        assert rng.queue.used_entries() == [(heads[1], 64)]
        assert rng.device.metrics.rate_limiter_event_count == 1
    finally:
        limiter.close()


def test_rng_bandwidth_block_returns_op(memory: GuestMemory) -> None:
    limiter = RateLimiter(bandwidth=TokenBucket(4, 60_000), ops=TokenBucket(2, 60_000))
    rng = EntropyDevice(memory, CountingSource(), limiter)
    try:
        for _ in range(2):
            rng.queue.add_chain([rng.queue.buffer(length=4, writable=True)])
        rng.transport.notify(0)
        assert len(rng.queue.used_entries()) == 1
        assert limiter.is_blocked
        ops = limiter.buckets[TokenKind.OPS]
        assert ops is not None
        assert ops.budget == 1
    finally:
        limiter.close()


def test_rng_reset_drops_deferred_request(memory: GuestMemory) -> None:
    limiter = RateLimiter(ops=TokenBucket(1, 60_000))
    rng = EntropyDevice(memory, CountingSource(), limiter)
    try:
        for _ in range(2):
            rng.queue.add_chain([rng.queue.buffer(length=4, writable=True)])
        rng.transport.notify(0)
        rng.driver.write32(mmio.STATUS_OFFSET, 0)
        assert not rng.device.is_activated
        assert rng.device._deferred is None
    finally:
        limiter.close()
