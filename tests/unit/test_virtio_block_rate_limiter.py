"""virtio-blk with a drive `rate_limiter`: requests wait in the ring and resume on the timer.

The block device charges one op per request and one byte token per data byte of
T_IN and T_OUT. A rejected request stays in the available ring, so the driver's
view does not change until the limiter's timerfd fires and the queue is served
again.
"""

from __future__ import annotations

import select
import struct
import tempfile
from collections.abc import Iterator

import pytest

from tests.virtio_driver import TEST_RAM_SIZE, Buffer, MmioDriver, VirtqueueDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.block import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
    FileBackend,
)
from vmm.memory import GuestMemory
from vmm.rate_limiter import RateLimiter, TokenBucket, TokenKind

DISK_SECTORS = 64
# How long a test waits for a timerfd that should fire within milliseconds.
TIMER_WAIT_S = 2.0
# A refill time long enough that no token arrives during a test.
NO_REFILL_MS = 600_000


class FakeClock:
    """Monotonic nanoseconds that move only when the test sets them."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


class LimitedDisk:
    """A block device over a temporary file with `limiter`, started over virtio-mmio."""

    def __init__(self, memory: GuestMemory, fd: int, limiter: RateLimiter | None) -> None:
        self.memory = memory
        self.device = Block("limited", FileBackend(fd), rate_limiter=limiter)
        self.irq_count = 0
        self.transport = mmio.MmioTransport(self.device, memory, self.raise_irq)
        self.driver = MmioDriver(self.transport)
        self.queue = VirtqueueDriver(memory, 16)
        self.driver.start([self.queue])

    def raise_irq(self) -> None:
        self.irq_count += 1

    def add_read(self, sectors: int = 1) -> tuple[int, Buffer]:
        """Publish a T_IN of `sectors` from sector 0; return its head and status buffer."""
        header = self.queue.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
        data = self.queue.buffer(length=sectors * SECTOR_SIZE, writable=True)
        status = self.queue.buffer(length=1, writable=True)
        return self.queue.add_chain([header, data, status]), status

    def add_write(self, data: bytes) -> int:
        header = self.queue.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 1))
        status = self.queue.buffer(length=1, writable=True)
        return self.queue.add_chain([header, self.queue.buffer(data), status])

    def add_flush(self) -> int:
        header = self.queue.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
        return self.queue.add_chain([header, self.queue.buffer(length=1, writable=True)])

    def resume_after_timer(self, limiter: RateLimiter) -> None:
        """Wait for the limiter's timerfd, acknowledge it as the monitor does, and notify."""
        readable, _, _ = select.select([limiter.timer_fd], [], [], TIMER_WAIT_S)
        assert readable, f"the limiter's timerfd did not fire within {TIMER_WAIT_S} s"
        assert self.device.on_rate_limiter_timer()
        self.transport.notify(0)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory([(0, TEST_RAM_SIZE)])
    yield ram
    ram.close()


@pytest.fixture
def disk_fd() -> Iterator[int]:
    with tempfile.TemporaryFile() as disk:
        disk.write(bytes(DISK_SECTORS * SECTOR_SIZE))
        disk.flush()
        yield disk.fileno()


def test_limited_read_waits_in_ring(memory: GuestMemory, disk_fd: int) -> None:
    limiter = RateLimiter(bandwidth=TokenBucket(SECTOR_SIZE, 20))
    disk = LimitedDisk(memory, disk_fd, limiter)
    try:
        first, first_status = disk.add_read()
        second, second_status = disk.add_read()
        disk.transport.notify(0)
        assert disk.queue.used_entries() == [(first, SECTOR_SIZE + 1)]
        assert disk.memory.read_u8(first_status.address) == VIRTIO_BLK_S_OK
        assert disk.device.metrics.rate_limiter_throttled_events == 1
        assert disk.device.queues[0].next_avail == 1, "the refused request left the ring"
        assert disk.irq_count == 1

        # A guest notification while blocked serves nothing and raises no interrupt.
        disk.transport.notify(0)
        assert disk.queue.used_entries() == []
        assert disk.irq_count == 1

        disk.resume_after_timer(limiter)
        assert disk.queue.used_entries() == [(second, SECTOR_SIZE + 1)]
        assert disk.memory.read_u8(second_status.address) == VIRTIO_BLK_S_OK
        assert disk.device.metrics.rate_limiter_event_count == 1
        assert disk.device.metrics.read_count == 2
    finally:
        limiter.close()


def test_unfired_timer_keeps_queue_stopped(memory: GuestMemory, disk_fd: int) -> None:
    limiter = RateLimiter(ops=TokenBucket(1, NO_REFILL_MS))
    disk = LimitedDisk(memory, disk_fd, limiter)
    try:
        disk.add_read()
        disk.add_read()
        disk.transport.notify(0)
        assert len(disk.queue.used_entries()) == 1
        assert not disk.device.on_rate_limiter_timer()
        assert disk.device.metrics.rate_limiter_event_count == 0
    finally:
        limiter.close()


def test_oversized_read_passes_when_full(memory: GuestMemory, disk_fd: int) -> None:
    clock = FakeClock()
    bucket_bytes = SECTOR_SIZE
    limiter = RateLimiter(bandwidth=TokenBucket(bucket_bytes, 100, clock=clock), clock=clock)
    disk = LimitedDisk(memory, disk_fd, limiter)
    try:
        big, _ = disk.add_read(sectors=8)
        small, _ = disk.add_read()
        disk.transport.notify(0)
        # 4096 bytes through a 512-byte bucket: served at once, the bucket goes into debt.
        assert disk.queue.used_entries() == [(big, 8 * SECTOR_SIZE + 1)]
        bandwidth = limiter.buckets[TokenKind.BYTES]
        assert bandwidth is not None
        assert bandwidth.budget == bucket_bytes - 8 * SECTOR_SIZE
        # The next request waits until the refill has paid the debt and earned 512 tokens:
        # 4096 tokens at 512 per 100 ms, 800 ms.
        assert limiter.wait_ns(SECTOR_SIZE, TokenKind.BYTES) == 800_000_000
        # The timerfd runs on the real clock; unblocking here replaces its expiry.
        clock.now = 799_000_000
        limiter.is_blocked = False
        disk.transport.notify(0)
        assert disk.queue.used_entries() == []
        clock.now = 800_000_000
        limiter.is_blocked = False
        disk.transport.notify(0)
        assert disk.queue.used_entries() == [(small, SECTOR_SIZE + 1)]
    finally:
        limiter.close()


def test_write_costs_data_bytes(memory: GuestMemory, disk_fd: int) -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        bandwidth=TokenBucket(4 * SECTOR_SIZE, NO_REFILL_MS, clock=clock), clock=clock
    )
    disk = LimitedDisk(memory, disk_fd, limiter)
    try:
        head = disk.add_write(bytes(3 * SECTOR_SIZE))
        disk.transport.notify(0)
        assert disk.queue.used_entries() == [(head, 1)]
        bandwidth = limiter.buckets[TokenKind.BYTES]
        assert bandwidth is not None
        assert bandwidth.budget == SECTOR_SIZE
    finally:
        limiter.close()


def test_flush_costs_no_bytes(memory: GuestMemory, disk_fd: int) -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        bandwidth=TokenBucket(SECTOR_SIZE, NO_REFILL_MS, clock=clock),
        ops=TokenBucket(3, NO_REFILL_MS, clock=clock),
        clock=clock,
    )
    disk = LimitedDisk(memory, disk_fd, limiter)
    try:
        disk.add_read()
        flush = disk.add_flush()
        disk.transport.notify(0)
        assert [head for head, _ in disk.queue.used_entries()][1:] == [flush]
        ops = limiter.buckets[TokenKind.OPS]
        assert ops is not None
        assert ops.budget == 1
    finally:
        limiter.close()


def test_rejected_bytes_return_op(memory: GuestMemory, disk_fd: int) -> None:
    limiter = RateLimiter(
        bandwidth=TokenBucket(SECTOR_SIZE, NO_REFILL_MS), ops=TokenBucket(5, NO_REFILL_MS)
    )
    disk = LimitedDisk(memory, disk_fd, limiter)
    try:
        disk.add_read()
        disk.add_read()
        disk.transport.notify(0)
        assert len(disk.queue.used_entries()) == 1
        ops = limiter.buckets[TokenKind.OPS]
        assert ops is not None
        assert ops.budget == 4, "the rejected read kept an op token"
    finally:
        limiter.close()


def test_disabling_update_resumes_queue(memory: GuestMemory, disk_fd: int) -> None:
    limiter = RateLimiter(ops=TokenBucket(1, NO_REFILL_MS))
    disk = LimitedDisk(memory, disk_fd, limiter)
    try:
        disk.add_read()
        second, _ = disk.add_read()
        disk.transport.notify(0)
        assert len(disk.queue.used_entries()) == 1
        assert disk.device.update_rate_limiter({"ops": {"size": 0, "refill_time": 0}})
        disk.resume_after_timer(limiter)
        assert disk.queue.used_entries() == [(second, SECTOR_SIZE + 1)]
    finally:
        limiter.close()


def test_update_without_limiter_returns_false(memory: GuestMemory, disk_fd: int) -> None:
    disk = LimitedDisk(memory, disk_fd, None)
    assert not disk.device.update_rate_limiter({"ops": {"size": 1, "refill_time": 100}})
    assert disk.device.rate_limiter is None
    assert not disk.device.on_rate_limiter_timer()


def test_unlimited_drive_serves_all(memory: GuestMemory, disk_fd: int) -> None:
    disk = LimitedDisk(memory, disk_fd, None)
    heads = [disk.add_read(sectors=4)[0] for _ in range(10)]
    disk.transport.notify(0)
    assert [head for head, _ in disk.queue.used_entries()] == heads
    assert disk.device.metrics.rate_limiter_throttled_events == 0
