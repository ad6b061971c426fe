"""The split virtqueue of virtio 1.2 section 2.7, as seen from the device side.

The driver places three areas in guest RAM and writes their addresses to the
transport:

    descriptor table  size * 16 bytes, 16-byte aligned   (2.7.5)
    available ring    flags, idx, ring[size], used_event  (2.7.6), 2-byte aligned
    used ring         flags, idx, ring[size] of {id, len}, avail_event (2.7.8), 4-byte aligned

`Queue.pop` walks the next available chain and checks every rule a device can
check before it touches a buffer; a broken rule raises `QueueError` and the
transport marks the device as needing reset. `Queue.add_used` returns a chain
to the driver, and `needs_notification` applies VIRTIO_F_EVENT_IDX (2.7.10).

Memory ordering: a device in C issues a read barrier between reading avail.idx
and the ring entries, and a write barrier between a used entry and used.idx.
Python offers no barrier, but the stores here are made in program order by one
thread, and x86-64 keeps stores ordered with stores and loads with loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from vmm.memory import GuestMemory

# 2.7.5 The Virtqueue Descriptor Table: struct virtq_desc {le64 addr; le32 len;
# le16 flags; le16 next;} is 16 bytes.
DESCRIPTOR_SIZE: Final = 16
DESC_ADDR_OFFSET: Final = 0
DESC_LEN_OFFSET: Final = 8
DESC_FLAGS_OFFSET: Final = 12
DESC_NEXT_OFFSET: Final = 14
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4

# 2.7.6 The Virtqueue Available Ring: le16 flags; le16 idx; le16 ring[size]; le16 used_event.
AVAIL_FLAGS_OFFSET: Final = 0
AVAIL_IDX_OFFSET: Final = 2
AVAIL_RING_OFFSET: Final = 4
AVAIL_ENTRY_SIZE: Final = 2
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1

# 2.7.8 The Virtqueue Used Ring: le16 flags; le16 idx; struct virtq_used_elem
# {le32 id; le32 len;} ring[size]; le16 avail_event.
USED_FLAGS_OFFSET: Final = 0
USED_IDX_OFFSET: Final = 2
USED_RING_OFFSET: Final = 4
USED_ENTRY_SIZE: Final = 8
VIRTQ_USED_F_NO_NOTIFY: Final = 1

# 2.7 Split Virtqueues, table of alignments.
DESCRIPTOR_TABLE_ALIGNMENT: Final = 16
AVAIL_RING_ALIGNMENT: Final = 2
USED_RING_ALIGNMENT: Final = 4

# 2.7: queue size is a power of two and at most 32768.
QUEUE_SIZE_LIMIT: Final = 32768
_INDEX_MODULUS: Final = 1 << 16


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring: 6 + 2 * size (2.7.6), used_event included."""
    return AVAIL_RING_OFFSET + AVAIL_ENTRY_SIZE * size + 2


def used_ring_size(size: int) -> int:
    """Bytes of the used ring: 6 + 8 * size (2.7.8), avail_event included."""
    return USED_RING_OFFSET + USED_ENTRY_SIZE * size + 2


class QueueError(Exception):
    """A driver broke a virtqueue rule of virtio 1.2 section 2.7.

    The message names the rule and the values. The caller marks the device
    DEVICE_NEEDS_RESET and stops using the queue until the driver resets it.
    """


@dataclass(frozen=True)
class Descriptor:
    """One buffer of a chain: guest physical address, length and direction."""

    address: int
    length: int
    is_write_only: bool


@dataclass(frozen=True)
class DescriptorChain:
    """A validated chain: the head index to return in the used ring and its buffers.

    Device-readable buffers come first, then device-writable ones (2.7.4.2).
    """

    head_index: int
    descriptors: tuple[Descriptor, ...]

    @property
    def readable(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.descriptors if not d.is_write_only)

    @property
    def writable(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.descriptors if d.is_write_only)


@dataclass(frozen=True)
class _RawDescriptor:
    address: int
    length: int
    flags: int
    next_index: int


def vring_need_event(event_index: int, new_index: int, old_index: int) -> bool:
    """Tell whether moving an index from old to new crossed event_index (2.7.10).

    All three are 16-bit ring indexes; the comparison wraps modulo 2^16.
    """
    distance_to_event = (new_index - event_index - 1) % _INDEX_MODULUS
    distance_moved = (new_index - old_index) % _INDEX_MODULUS
    return distance_to_event < distance_moved


class Queue:
    """Device-side state of one split virtqueue.

    The transport sets `size`, `ready` and the three addresses from driver
    writes, then calls `activate`. `pop` and `add_used` run on the thread that
    processes the queue; the device model holds its lock around them.
    """

    def __init__(self, max_size: int) -> None:
        if not _is_power_of_two(max_size) or max_size > QUEUE_SIZE_LIMIT:
            raise ValueError(
                f"queue max size {max_size} is not a power of two <= {QUEUE_SIZE_LIMIT}"
            )
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Return to the state after a device reset: not ready, size max, addresses 0."""
        self.size = self.max_size
        self.ready = False
        self.desc_table_address = 0
        self.avail_ring_address = 0
        self.used_ring_address = 0
        self.event_idx_enabled = False
        self.indirect_enabled = False
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used: int | None = None
        self.memory: GuestMemory | None = None

    def __repr__(self) -> str:
        return (
            f"Queue(size={self.size}, ready={self.ready}, "
            f"desc={self.desc_table_address:#x}, avail={self.avail_ring_address:#x}, "
            f"used={self.used_ring_address:#x})"
        )

    def validate(self, memory: GuestMemory) -> None:
        """Check size, alignment and placement of a ready queue, or raise QueueError."""
        if not _is_power_of_two(self.size) or self.size > self.max_size:
            raise QueueError(
                f"queue size {self.size} is not a power of two <= {self.max_size} (2.7)"
            )
        areas = (
            ("descriptor table", self.desc_table_address, DESCRIPTOR_TABLE_ALIGNMENT,
             DESCRIPTOR_SIZE * self.size),
            ("available ring", self.avail_ring_address, AVAIL_RING_ALIGNMENT,
             avail_ring_size(self.size)),
            ("used ring", self.used_ring_address, USED_RING_ALIGNMENT,
             used_ring_size(self.size)),
        )
        for name, address, alignment, length in areas:
            if address % alignment:
                raise QueueError(
                    f"{name} address {address:#x} is not {alignment}-byte aligned (2.7)"
                )
            if not memory.contains(address, length):
                raise QueueError(
                    f"{name} at {address:#x} length {length:#x} is outside guest RAM"
                )

    def activate(self, memory: GuestMemory, event_idx: bool, indirect: bool) -> None:
        """Validate the driver's layout and start using it with the negotiated features.

        Both ring indexes start at 0, as a driver that has just set the queue up expects.
        """
        self.validate(memory)
        self.memory = memory
        self.event_idx_enabled = event_idx
        self.indirect_enabled = indirect
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used = None

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise QueueError(f"{self!r} is used before activation")
        return self.memory

    def avail_idx(self) -> int:
        """Return the driver's available index (2.7.6 idx)."""
        return self._memory().read_le16(self.avail_ring_address + AVAIL_IDX_OFFSET)

    def pending_count(self) -> int:
        """Return how many chains the driver made available that pop has not taken.

        Raises QueueError when the driver's index runs more than `size` ahead,
        which no correct driver does (2.7.6: it adds at most size entries).
        """
        pending = (self.avail_idx() - self.next_avail) % _INDEX_MODULUS
        if pending > self.size:
            raise QueueError(
                f"available index {self.avail_idx()} is {pending} entries ahead of "
                f"{self.next_avail}, more than the queue size {self.size} (2.7.6)"
            )
        return pending

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, validated, or return None when there is none.

        With VIRTIO_F_EVENT_IDX, an empty queue publishes avail_event so that the
        driver notifies on its next addition, then looks once more.
        """
        if self.pending_count() == 0:
            if not self.event_idx_enabled:
                return None
            self._write_avail_event()
            if self.pending_count() == 0:
                return None
        memory = self._memory()
        slot = self.next_avail % self.size
        head = memory.read_le16(self.avail_ring_address + AVAIL_RING_OFFSET + 2 * slot)
        self.next_avail = (self.next_avail + 1) % _INDEX_MODULUS
        if self.event_idx_enabled:
            self._write_avail_event()
        return self._read_chain(head)

    def _write_avail_event(self) -> None:
        address = self.used_ring_address + USED_RING_OFFSET + USED_ENTRY_SIZE * self.size
        self._memory().write_le16(address, self.next_avail)

    def _read_descriptor(self, table: int, index: int) -> _RawDescriptor:
        memory = self._memory()
        base = table + DESCRIPTOR_SIZE * index
        return _RawDescriptor(
            address=memory.read_le64(base + DESC_ADDR_OFFSET),
            length=memory.read_le32(base + DESC_LEN_OFFSET),
            flags=memory.read_le16(base + DESC_FLAGS_OFFSET),
            next_index=memory.read_le16(base + DESC_NEXT_OFFSET),
        )

    def _read_chain(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise QueueError(
                f"available ring head {head} is not below the queue size {self.size} (2.7.6)"
            )
        descriptors: list[Descriptor] = []
        index = head
        for _ in range(self.size):
            raw = self._read_descriptor(self.desc_table_address, index)
            if raw.flags & VIRTQ_DESC_F_INDIRECT:
                self._check_indirect(raw)
                descriptors.extend(self._read_indirect_table(raw, len(descriptors)))
                return self._finish_chain(head, descriptors)
            descriptors.append(self._to_buffer(raw))
            if not raw.flags & VIRTQ_DESC_F_NEXT:
                return self._finish_chain(head, descriptors)
            index = raw.next_index
            if index >= self.size:
                raise QueueError(
                    f"descriptor next index {index} is not below the queue size "
                    f"{self.size} (2.7.5)"
                )
        raise QueueError(
            f"chain from head {head} is longer than the queue size {self.size}: "
            f"a loop (2.7.5.2)"
        )

    def _check_indirect(self, raw: _RawDescriptor) -> None:
        if not self.indirect_enabled:
            raise QueueError(
                "descriptor has VIRTQ_DESC_F_INDIRECT but VIRTIO_RING_F_INDIRECT_DESC "
                "was not negotiated (2.7.5.3.1)"
            )
        if raw.flags & VIRTQ_DESC_F_NEXT:
            raise QueueError(
                "descriptor sets both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT (2.7.5.3.1)"
            )
        if raw.length == 0 or raw.length % DESCRIPTOR_SIZE:
            raise QueueError(
                f"indirect table length {raw.length} is not a non-zero multiple of "
                f"{DESCRIPTOR_SIZE} (2.7.5.3.1)"
            )

    def _read_indirect_table(self, raw: _RawDescriptor, used: int) -> list[Descriptor]:
        count = raw.length // DESCRIPTOR_SIZE
        if used + count > self.size:
            raise QueueError(
                f"indirect table of {count} entries after {used} direct ones exceeds the "
                f"queue size {self.size} (2.7.5.3.1)"
            )
        if not self._memory().contains(raw.address, raw.length):
            raise QueueError(
                f"indirect table at {raw.address:#x} length {raw.length:#x} is outside "
                f"guest RAM"
            )
        descriptors: list[Descriptor] = []
        index = 0
        for _ in range(count):
            entry = self._read_descriptor(raw.address, index)
            if entry.flags & VIRTQ_DESC_F_INDIRECT:
                raise QueueError(
                    "indirect table entry sets VIRTQ_DESC_F_INDIRECT: tables do not nest "
                    "(2.7.5.3.1)"
                )
            descriptors.append(self._to_buffer(entry))
            if not entry.flags & VIRTQ_DESC_F_NEXT:
                return descriptors
            index = entry.next_index
            if index >= count:
                raise QueueError(
                    f"indirect next index {index} is not below the table's {count} "
                    f"entries (2.7.5.3.2)"
                )
        raise QueueError(f"indirect chain is longer than its table of {count} entries: a loop")

    def _to_buffer(self, raw: _RawDescriptor) -> Descriptor:
        if not self._memory().contains(raw.address, raw.length):
            raise QueueError(
                f"buffer at {raw.address:#x} length {raw.length:#x} is outside guest RAM"
            )
        return Descriptor(raw.address, raw.length, bool(raw.flags & VIRTQ_DESC_F_WRITE))

    def _finish_chain(self, head: int, descriptors: list[Descriptor]) -> DescriptorChain:
        seen_writable = False
        for position, descriptor in enumerate(descriptors):
            if descriptor.is_write_only:
                seen_writable = True
            elif seen_writable:
                raise QueueError(
                    f"chain from head {head} has a device-readable buffer at position "
                    f"{position} after a device-writable one (2.7.4.2)"
                )
        return DescriptorChain(head, tuple(descriptors))

    def add_used(self, head_index: int, length: int) -> None:
        """Return chain `head_index` to the driver with `length` bytes written (2.7.8).

        The entry is written before the index, so the used index never
        covers an entry that is not yet written.
        """
        if head_index >= self.size:
            raise QueueError(
                f"used head {head_index} is not below the queue size {self.size}"
            )
        memory = self._memory()
        slot = self.next_used % self.size
        entry = self.used_ring_address + USED_RING_OFFSET + USED_ENTRY_SIZE * slot
        memory.write_le32(entry, head_index)
        memory.write_le32(entry + 4, length)
        self.next_used = (self.next_used + 1) % _INDEX_MODULUS
        memory.write_le16(self.used_ring_address + USED_IDX_OFFSET, self.next_used)

    def needs_notification(self) -> bool:
        """Tell whether the driver wants an interrupt for the used entries added so far.

        Without VIRTIO_F_EVENT_IDX this honours VIRTQ_AVAIL_F_NO_INTERRUPT (2.7.7).
        With it, the result is True when used.idx has moved past used_event
        since the last notification (2.7.10). Call it once after a batch of add_used.
        """
        memory = self._memory()
        if not self.event_idx_enabled:
            flags = memory.read_le16(self.avail_ring_address + AVAIL_FLAGS_OFFSET)
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        old = self.signalled_used
        new = self.next_used
        self.signalled_used = new
        if old is None:
            return True
        if old == new:
            return False
        used_event_address = self.avail_ring_address + AVAIL_RING_OFFSET + 2 * self.size
        return vring_need_event(memory.read_le16(used_event_address), new, old)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


__all__ = [
    "Descriptor",
    "DescriptorChain",
    "Queue",
    "QueueError",
    "vring_need_event",
]
