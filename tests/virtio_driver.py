"""A driver-side split virtqueue for device tests: what a guest driver does, in guest RAM.

`VirtqueueDriver` lays out a descriptor table, available ring and used ring
in a `GuestMemory`, adds descriptor chains (direct or through an indirect
table), publishes them and reads back used entries. `MmioDriver` programs a
virtio-mmio transport through its registers, the way Linux's virtio_mmio
driver does at probe time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vmm.devices.virtio import mmio
from vmm.devices.virtio.queue import (
    AVAIL_FLAGS_OFFSET,
    AVAIL_IDX_OFFSET,
    AVAIL_RING_OFFSET,
    DESCRIPTOR_SIZE,
    USED_IDX_OFFSET,
    USED_RING_OFFSET,
    USED_ENTRY_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    avail_ring_size,
)
from vmm.memory import GuestMemory

TEST_RAM_SIZE = 0x10_0000
RING_BASE = 0x1000
DATA_BASE = 0x4_0000


@dataclass(frozen=True)
class Buffer:
    """One buffer the driver offers: guest address, length, device-writable or not."""

    address: int
    length: int
    writable: bool = False


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class VirtqueueDriver:
    """The driver's side of one split virtqueue placed at `ring_base`."""

    def __init__(
        self, memory: GuestMemory, size: int, ring_base: int = RING_BASE,
        data_base: int = DATA_BASE,
    ) -> None:
        self.memory = memory
        self.size = size
        self.desc_table = ring_base
        self.avail_ring = _align(self.desc_table + DESCRIPTOR_SIZE * size, 2)
        self.used_ring = _align(self.avail_ring + avail_ring_size(size), 4)
        self.next_descriptor = 0
        self.avail_idx = 0
        self.last_used_idx = 0
        self._next_data = data_base

    def configure(self, queue: Queue) -> None:
        """Set a device-side Queue's size and addresses directly, as a transport would."""
        queue.size = self.size
        queue.desc_table_address = self.desc_table
        queue.avail_ring_address = self.avail_ring
        queue.used_ring_address = self.used_ring
        queue.ready = True

    def alloc(self, length: int, fill: bytes | None = None) -> int:
        """Reserve `length` bytes of data area (16-byte aligned) and optionally fill them."""
        address = self._next_data
        self._next_data = _align(address + max(length, 1), 16)
        if fill is not None:
            self.memory.write(address, fill)
        return address

    def buffer(self, data: bytes = b"", length: int = 0, writable: bool = False) -> Buffer:
        """Allocate a buffer holding `data`, or `length` zero bytes."""
        size = len(data) or length
        address = self.alloc(size, data or bytes(size))
        return Buffer(address, size, writable)

    def write_descriptor(
        self, table: int, index: int, address: int, length: int, flags: int, next_index: int
    ) -> None:
        base = table + DESCRIPTOR_SIZE * index
        self.memory.write_le64(base, address)
        self.memory.write_le32(base + 8, length)
        self.memory.write_le16(base + 12, flags)
        self.memory.write_le16(base + 14, next_index)

    def _take_descriptors(self, count: int) -> list[int]:
        indexes = [(self.next_descriptor + i) % self.size for i in range(count)]
        self.next_descriptor = (self.next_descriptor + count) % self.size
        return indexes

    def _write_chain(self, table: int, indexes: list[int], buffers: Sequence[Buffer]) -> None:
        for position, (index, buf) in enumerate(zip(indexes, buffers)):
            flags = VIRTQ_DESC_F_WRITE if buf.writable else 0
            next_index = 0
            if position + 1 < len(buffers):
                flags |= VIRTQ_DESC_F_NEXT
                next_index = indexes[position + 1]
            self.write_descriptor(table, index, buf.address, buf.length, flags, next_index)

    def add_chain(self, buffers: Sequence[Buffer], publish: bool = True) -> int:
        """Write `buffers` as one chain in the descriptor table; return its head index."""
        indexes = self._take_descriptors(len(buffers))
        self._write_chain(self.desc_table, indexes, buffers)
        if publish:
            self.publish(indexes[0])
        return indexes[0]

    def add_indirect_chain(self, buffers: Sequence[Buffer], publish: bool = True) -> int:
        """Write `buffers` into an indirect table referenced by one descriptor."""
        table = self.alloc(DESCRIPTOR_SIZE * len(buffers))
        self._write_chain(table, list(range(len(buffers))), buffers)
        (head,) = self._take_descriptors(1)
        self.write_descriptor(
            self.desc_table, head, table, DESCRIPTOR_SIZE * len(buffers),
            VIRTQ_DESC_F_INDIRECT, 0,
        )
        if publish:
            self.publish(head)
        return head

    def publish(self, head: int) -> None:
        """Put `head` in the available ring and advance avail.idx."""
        slot = self.avail_idx % self.size
        self.memory.write_le16(self.avail_ring + AVAIL_RING_OFFSET + 2 * slot, head)
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value % 0x10000
        self.memory.write_le16(self.avail_ring + AVAIL_IDX_OFFSET, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_le16(self.avail_ring + AVAIL_FLAGS_OFFSET, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_le16(self.avail_ring + AVAIL_RING_OFFSET + 2 * self.size, value)

    @property
    def avail_event(self) -> int:
        return self.memory.read_le16(self.used_ring + USED_RING_OFFSET + 8 * self.size)

    @property
    def used_idx(self) -> int:
        return self.memory.read_le16(self.used_ring + USED_IDX_OFFSET)

    def used_entries(self) -> list[tuple[int, int]]:
        """Return the (id, len) used entries added since the last call."""
        entries: list[tuple[int, int]] = []
        while self.last_used_idx != self.used_idx:
            slot = self.last_used_idx % self.size
            entry = self.used_ring + USED_RING_OFFSET + USED_ENTRY_SIZE * slot
            entries.append((self.memory.read_le32(entry), self.memory.read_le32(entry + 4)))
            self.last_used_idx = (self.last_used_idx + 1) % 0x10000
        return entries


class MmioDriver:
    """Programs a virtio-mmio transport through 32-bit register accesses."""

    def __init__(self, transport: mmio.MmioTransport) -> None:
        self.transport = transport

    def read32(self, offset: int) -> int:
        data = bytearray(4)
        self.transport.read(offset, data)
        return int.from_bytes(data, "little")

    def write32(self, offset: int, value: int) -> None:
        self.transport.write(offset, value.to_bytes(4, "little"))

    def device_features(self) -> int:
        self.write32(mmio.DEVICE_FEATURES_SEL_OFFSET, 0)
        low = self.read32(mmio.DEVICE_FEATURES_OFFSET)
        self.write32(mmio.DEVICE_FEATURES_SEL_OFFSET, 1)
        return low | self.read32(mmio.DEVICE_FEATURES_OFFSET) << 32

    def write_driver_features(self, features: int) -> None:
        for page in (0, 1):
            self.write32(mmio.DRIVER_FEATURES_SEL_OFFSET, page)
            self.write32(mmio.DRIVER_FEATURES_OFFSET, (features >> (32 * page)) & 0xFFFF_FFFF)

    def set_status(self, bits: int) -> None:
        self.write32(mmio.STATUS_OFFSET, self.read32(mmio.STATUS_OFFSET) | bits)

    def negotiate(self, features: int | None = None) -> None:
        """Reset, then ACKNOWLEDGE, DRIVER, features (all offered by default), FEATURES_OK."""
        self.write32(mmio.STATUS_OFFSET, 0)
        self.set_status(mmio.STATUS_ACKNOWLEDGE)
        self.set_status(mmio.STATUS_DRIVER)
        self.write_driver_features(self.device_features() if features is None else features)
        self.set_status(mmio.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, queue: VirtqueueDriver) -> None:
        """Select queue `index`, program its size and the three addresses, set it ready."""
        self.write32(mmio.QUEUE_SEL_OFFSET, index)
        self.write32(mmio.QUEUE_NUM_OFFSET, queue.size)
        for low, address in (
            (mmio.QUEUE_DESC_LOW_OFFSET, queue.desc_table),
            (mmio.QUEUE_DRIVER_LOW_OFFSET, queue.avail_ring),
            (mmio.QUEUE_DEVICE_LOW_OFFSET, queue.used_ring),
        ):
            self.write32(low, address & 0xFFFF_FFFF)
            self.write32(low + 4, address >> 32)
        self.write32(mmio.QUEUE_READY_OFFSET, 1)

    def start(self, queues: Sequence[VirtqueueDriver], features: int | None = None) -> None:
        """Negotiate, set up `queues` in order, and set DRIVER_OK."""
        self.negotiate(features)
        for index, queue in enumerate(queues):
            self.setup_queue(index, queue)
        self.set_status(mmio.STATUS_DRIVER_OK)

    def notify(self, index: int) -> None:
        self.write32(mmio.QUEUE_NOTIFY_OFFSET, index)
