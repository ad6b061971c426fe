"""virtio-blk (virtio 1.2 section 5.2) over a file or block device the monitor opened.

A request is one descriptor chain (5.2.6): the device reads a 16-byte header
{le32 type; le32 reserved; le64 sector}, then for T_OUT the data to write;
it writes the data for T_IN or T_GET_ID, then one status byte. The header and
data may be split across descriptors in any way (2.6.4), so the model reads
the device-readable buffers and fills the device-writable buffers as two
byte streams.

An optional rate limiter (Firecracker's drive `rate_limiter`) charges one op
per request and, for T_IN and T_OUT, one byte token per data byte. A request
the limiter rejects stays in the available ring: the device rewinds its
position and the limiter's timer restarts the queue (see vmm/rate_limiter.py
for requests larger than the bucket).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import Any, Final, Protocol

from vmm.devices.virtio.device import (
    VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice,
    feature_bit,
)
from vmm.devices.virtio.queue import Descriptor, DescriptorChain
from vmm.memory import GuestMemory
from vmm.rate_limiter import RateLimiter

logger = logging.getLogger(__name__)

# 5.2.1 Device ID.
VIRTIO_ID_BLOCK: Final = 2
# 5.2.2 Virtqueues: one request queue. 256 entries as Firecracker offers.
BLOCK_QUEUE_SIZE: Final = 256

# 5.2.3 Feature bits.
VIRTIO_BLK_F_RO: Final = 5
VIRTIO_BLK_F_FLUSH: Final = 9

# 5.2.4 Device configuration layout: le64 capacity, in 512-byte sectors, at offset 0.
CONFIG_CAPACITY_OFFSET: Final = 0
CONFIG_CAPACITY_SIZE: Final = 8
SECTOR_SIZE: Final = 512

# 5.2.6 Device Operation: request header, types and status values.
REQUEST_HEADER: Final = struct.Struct("<IIQ")
VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2
VIRTIO_BLK_ID_BYTES: Final = 20
STATUS_SIZE: Final = 1

# Firecracker's drive cache types: "Unsafe" never reaches the disk on flush.
CACHE_UNSAFE: Final = "Unsafe"
CACHE_WRITEBACK: Final = "Writeback"
CACHE_TYPES: Final = (CACHE_UNSAFE, CACHE_WRITEBACK)


class BlockBackend(Protocol):
    """Storage behind a block device. Offsets and sizes are in bytes."""

    @property
    def size(self) -> int: ...

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill all of `buffer` from `offset`, or raise OSError."""

    def write(self, offset: int, data: memoryview) -> None:
        """Write all of `data` at `offset`, or raise OSError."""

    def flush(self) -> None:
        """Make earlier writes durable, or raise OSError."""


class FileBackend:
    """A regular file or block device, opened by the caller, accessed by offset.

    The caller keeps ownership of `fd` and closes it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        done = 0
        while done < len(buffer):
            count = os.preadv(self.fd, [buffer[done:]], offset + done)
            if count == 0:
                raise OSError(
                    f"read of {len(buffer)} bytes at offset {offset} ended at end of file "
                    f"after {done} bytes"
                )
            done += count

    def write(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def flush(self) -> None:
        os.fsync(self.fd)


@dataclass
class BlockMetrics:
    """Counters for the metrics endpoint; bytes count guest data only."""

    read_bytes: int = 0
    read_count: int = 0
    write_bytes: int = 0
    write_count: int = 0
    flush_count: int = 0
    get_id_count: int = 0
    io_errors: int = 0
    unsupported_requests: int = 0
    invalid_requests: int = 0
    rate_limiter_throttled_events: int = 0
    rate_limiter_event_count: int = 0


class InvalidRequest(Exception):
    """A chain that does not hold a well-formed request; it is returned with length 0."""


class _WritableStream:
    """The device-writable buffers of a chain, filled front to back."""

    def __init__(self, memory: GuestMemory, buffers: tuple[Descriptor, ...]) -> None:
        self.views = [memory.view(d.address, d.length) for d in buffers]
        self.total = sum(d.length for d in buffers)

    def slices(self, start: int, length: int) -> list[memoryview]:
        """Return views covering bytes [start, start + length) of the stream."""
        result: list[memoryview] = []
        position = 0
        for view in self.views:
            low = max(start, position)
            high = min(start + length, position + len(view))
            if low < high:
                result.append(view[low - position : high - position])
            position += len(view)
        return result

    def release(self) -> None:
        """Drop the views into guest RAM, so that the memory can be unmapped later."""
        for view in self.views:
            view.release()
        self.views = []

    def write(self, start: int, data: bytes) -> None:
        consumed = 0
        for part in self.slices(start, len(data)):
            part[:] = data[consumed : consumed + len(part)]
            consumed += len(part)


class Block(VirtioDevice):
    """A virtio block device serving one drive from a `BlockBackend`.

    Read-only drives offer VIRTIO_BLK_F_RO and complete writes with IOERR.
    "Writeback" drives offer VIRTIO_BLK_F_FLUSH and flush the back end on
    T_FLUSH, "Unsafe" drives treat T_FLUSH as done at once. With a
    `rate_limiter`, the monitor calls `on_rate_limiter_timer` when the limiter's
    timerfd fires and processes the queue again when it returns True.
    """

    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = (BLOCK_QUEUE_SIZE,)

    def __init__(
        self,
        drive_id: str,
        backend: BlockBackend,
        read_only: bool = False,
        cache_type: str = CACHE_UNSAFE,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__()
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"cache type {cache_type!r} is not one of {CACHE_TYPES}")
        self.drive_id = drive_id
        self.backend = backend
        self.read_only = read_only
        self.cache_type = cache_type
        self.rate_limiter = rate_limiter
        self.metrics = BlockMetrics()
        self.avail_features |= feature_bit(VIRTIO_RING_F_EVENT_IDX)
        if read_only:
            self.avail_features |= feature_bit(VIRTIO_BLK_F_RO)
        if cache_type == CACHE_WRITEBACK:
            self.avail_features |= feature_bit(VIRTIO_BLK_F_FLUSH)
        self.update_capacity()

    def __repr__(self) -> str:
        return (
            f"Block(drive_id={self.drive_id!r}, read_only={self.read_only}, "
            f"rate_limiter={self.rate_limiter!r})"
        )

    @property
    def capacity_sectors(self) -> int:
        """Drive size in 512-byte sectors; a partial last sector is not reachable."""
        return self.disk_size // SECTOR_SIZE

    def update_capacity(self) -> None:
        """Read the back end's size again and publish it in configuration space (5.2.4).

        An activated device also raises a configuration-change interrupt, so the
        guest rereads the capacity.
        """
        with self.lock:
            self.disk_size = self.backend.size
            self.config_space = bytearray(
                self.capacity_sectors.to_bytes(CONFIG_CAPACITY_SIZE, "little")
            )
            self.config_generation += 1
            if self.interrupt is not None:
                self.interrupt.signal_config_change()

    def process_queue(self, index: int) -> None:
        """Serve available requests until the queue is empty or the limiter rejects one.

        Interrupts once if anything was served.
        """
        with self.lock:
            queue = self.queues[index]
            served = False
            while True:
                next_avail = queue.next_avail
                chain = queue.pop()
                if chain is None:
                    break
                if not self._admit(chain):
                    # Leave the request in the ring; the limiter's timer restarts the queue.
                    queue.next_avail = next_avail
                    break
                queue.add_used(chain.head_index, self._serve(chain))
                served = True
            if served:
                self.signal_used_queue(queue)

    def on_rate_limiter_timer(self) -> bool:
        """Acknowledge the limiter's timerfd; return True when the queue should be processed."""
        with self.lock:
            if self.rate_limiter is None or not self.rate_limiter.on_timer():
                return False
            self.metrics.rate_limiter_event_count += 1
            return self.is_activated

    def update_rate_limiter(self, config: dict[str, Any]) -> bool:
        """Apply a PATCH `rate_limiter` body to the existing limiter.

        Return False when the drive has no limiter, so that the caller creates one
        (it owns the timerfd's registration with the event loop).
        """
        with self.lock:
            if self.rate_limiter is None:
                return False
            self.rate_limiter.update(config)
            return True

    def _admit(self, chain: DescriptorChain) -> bool:
        """Take one op and the request's data bytes from the rate limiter, or nothing."""
        limiter = self.rate_limiter
        if limiter is None:
            return True
        if not limiter.consume_request(self._data_length(chain)):
            self.metrics.rate_limiter_throttled_events += 1
            return False
        return True

    def _data_length(self, chain: DescriptorChain) -> int:
        """Return the data bytes a T_IN or T_OUT request moves; 0 for other or invalid ones."""
        try:
            request_type = self._read_header(self._memory(), chain)[0]
        except InvalidRequest:
            return 0
        if request_type == VIRTIO_BLK_T_IN:
            return max(0, sum(d.length for d in chain.writable) - STATUS_SIZE)
        if request_type == VIRTIO_BLK_T_OUT:
            return max(0, sum(d.length for d in chain.readable) - REQUEST_HEADER.size)
        return 0

    def _serve(self, chain: DescriptorChain) -> int:
        """Carry out one request and return the number of bytes written to the driver."""
        memory = self._memory()
        try:
            header = self._read_header(memory, chain)
            writable = _WritableStream(memory, chain.writable)
            if writable.total < STATUS_SIZE:
                raise InvalidRequest("chain has no device-writable status byte")
        except InvalidRequest as error:
            self.metrics.invalid_requests += 1
            logger.debug("%r: invalid request from head %d: %s", self, chain.head_index, error)
            return 0
        request_type, _reserved, sector = header
        try:
            status, written = self._dispatch(request_type, sector, memory, chain, writable)
            writable.write(writable.total - STATUS_SIZE, bytes([status]))
        finally:
            writable.release()
        return written + STATUS_SIZE

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise RuntimeError(f"{self!r} processes a queue before activation")
        return self.memory

    @staticmethod
    def _read_header(memory: GuestMemory, chain: DescriptorChain) -> tuple[int, int, int]:
        raw = bytearray()
        for descriptor in chain.readable:
            needed = REQUEST_HEADER.size - len(raw)
            raw += memory.read(descriptor.address, min(needed, descriptor.length))
            if len(raw) == REQUEST_HEADER.size:
                return REQUEST_HEADER.unpack(raw)
        raise InvalidRequest(
            f"request header is truncated: the device-readable buffers contain {len(raw)} "
            f"bytes, less than {REQUEST_HEADER.size} (5.2.6)"
        )

    def _dispatch(
        self,
        request_type: int,
        sector: int,
        memory: GuestMemory,
        chain: DescriptorChain,
        writable: _WritableStream,
    ) -> tuple[int, int]:
        """Return (status, data bytes written to the driver) for one request."""
        if request_type == VIRTIO_BLK_T_IN:
            return self._read_sectors(sector, writable)
        if request_type == VIRTIO_BLK_T_OUT:
            return self._write_sectors(sector, memory, chain), 0
        if request_type == VIRTIO_BLK_T_FLUSH:
            return self._flush(), 0
        if request_type == VIRTIO_BLK_T_GET_ID:
            return self._get_id(writable)
        self.metrics.unsupported_requests += 1
        return VIRTIO_BLK_S_UNSUPP, 0

    def _check_range(self, sector: int, length: int) -> bool:
        """Tell whether `length` bytes from `sector` are whole sectors inside the drive."""
        if length % SECTOR_SIZE:
            return False
        return sector * SECTOR_SIZE + length <= self.capacity_sectors * SECTOR_SIZE

    def _read_sectors(self, sector: int, writable: _WritableStream) -> tuple[int, int]:
        length = writable.total - STATUS_SIZE
        if not self._check_range(sector, length):
            self.metrics.io_errors += 1
            return VIRTIO_BLK_S_IOERR, 0
        offset = sector * SECTOR_SIZE
        try:
            for part in writable.slices(0, length):
                self.backend.read_into(offset, part)
                offset += len(part)
        except OSError as error:
            return self._io_error("read", sector, error), 0
        self.metrics.read_count += 1
        self.metrics.read_bytes += length
        return VIRTIO_BLK_S_OK, length

    def _write_sectors(self, sector: int, memory: GuestMemory, chain: DescriptorChain) -> int:
        data_parts = self._data_after_header(memory, chain.readable)
        try:
            return self._write_parts(sector, data_parts)
        finally:
            for part in data_parts:
                part.release()

    def _write_parts(self, sector: int, data_parts: list[memoryview]) -> int:
        length = sum(len(part) for part in data_parts)
        if self.read_only or not self._check_range(sector, length):
            self.metrics.io_errors += 1
            return VIRTIO_BLK_S_IOERR
        offset = sector * SECTOR_SIZE
        try:
            for part in data_parts:
                self.backend.write(offset, part)
                offset += len(part)
        except OSError as error:
            return self._io_error("write", sector, error)
        self.metrics.write_count += 1
        self.metrics.write_bytes += length
        return VIRTIO_BLK_S_OK

    @staticmethod
    def _data_after_header(
        memory: GuestMemory, readable: tuple[Descriptor, ...]
    ) -> list[memoryview]:
        parts: list[memoryview] = []
        skip = REQUEST_HEADER.size
        for descriptor in readable:
            taken = min(skip, descriptor.length)
            skip -= taken
            if descriptor.length > taken:
                parts.append(memory.view(descriptor.address + taken, descriptor.length - taken))
        return parts

    def _flush(self) -> int:
        self.metrics.flush_count += 1
        if self.cache_type != CACHE_WRITEBACK:
            return VIRTIO_BLK_S_OK
        try:
            self.backend.flush()
        except OSError as error:
            return self._io_error("flush", 0, error)
        return VIRTIO_BLK_S_OK

    def _get_id(self, writable: _WritableStream) -> tuple[int, int]:
        """Write the drive id, NUL-padded to 20 bytes, or as much as fits (5.2.6)."""
        self.metrics.get_id_count += 1
        identifier = self.drive_id.encode()[:VIRTIO_BLK_ID_BYTES]
        identifier = identifier.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        length = min(VIRTIO_BLK_ID_BYTES, writable.total - STATUS_SIZE)
        writable.write(0, identifier[:length])
        return VIRTIO_BLK_S_OK, length

    def _io_error(self, operation: str, sector: int, error: OSError) -> int:
        self.metrics.io_errors += 1
        # Log the 1st, 2nd, 4th, 8th... failure so that a failing disk cannot flood the log.
        if self.metrics.io_errors & (self.metrics.io_errors - 1) == 0:
            logger.warning(
                "%r: %s at sector %d failed (%d I/O errors so far): %s",
                self, operation, sector, self.metrics.io_errors, str(error),
            )
        return VIRTIO_BLK_S_IOERR

