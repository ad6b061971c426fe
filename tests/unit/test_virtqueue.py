"""Split virtqueue (virtio 1.2 section 2.7): chain walking, validation, used ring, EVENT_IDX."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.virtio_driver import TEST_RAM_SIZE, Buffer, VirtqueueDriver
from vmm.devices.virtio.queue import (
    DESCRIPTOR_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    QueueError,
    vring_need_event,
)
from vmm.memory import GuestMemory

QUEUE_SIZE = 8


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory([(0, TEST_RAM_SIZE)])
    yield ram
    ram.close()


def make_queue(
    memory: GuestMemory, event_idx: bool = False, indirect: bool = False
) -> tuple[Queue, VirtqueueDriver]:
    driver = VirtqueueDriver(memory, QUEUE_SIZE)
    queue = Queue(QUEUE_SIZE)
    driver.configure(queue)
    queue.activate(memory, event_idx=event_idx, indirect=indirect)
    return queue, driver


def test_pop_empty_queue_returns_none(memory: GuestMemory) -> None:
    queue, _ = make_queue(memory)
    assert queue.pop() is None


def test_pop_returns_chain_in_order(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    head = driver.add_chain([
        Buffer(0x5000, 16), Buffer(0x6000, 100), Buffer(0x7000, 1, writable=True)
    ])
    chain = queue.pop()
    assert chain is not None
    assert chain.head_index == head
    assert [(d.address, d.length) for d in chain.readable] == [(0x5000, 16), (0x6000, 100)]
    assert [(d.address, d.length) for d in chain.writable] == [(0x7000, 1)]
    assert queue.pop() is None


def test_add_used_publishes_entry_and_index(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    first = driver.add_chain([Buffer(0x5000, 4, writable=True)])
    second = driver.add_chain([Buffer(0x6000, 4, writable=True)])
    chains = [queue.pop(), queue.pop()]
    for chain, length in zip(chains, (3, 4)):
        assert chain is not None
        queue.add_used(chain.head_index, length)
    assert driver.used_idx == 2
    assert driver.used_entries() == [(first, 3), (second, 4)]


def test_indexes_wrap_past_65535(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    driver.set_avail_idx(0xFFFF)
    queue.next_avail = 0xFFFF
    driver.add_chain([Buffer(0x5000, 4)])
    assert driver.avail_idx == 0
    chain = queue.pop()
    assert chain is not None
    assert queue.next_avail == 0


def test_head_index_out_of_range_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    driver.publish(QUEUE_SIZE)
    with pytest.raises(QueueError, match="head 8 is not below the queue size 8"):
        queue.pop()


def test_next_index_out_of_range_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    driver.write_descriptor(driver.desc_table, 0, 0x5000, 4, VIRTQ_DESC_F_NEXT, 9)
    driver.publish(0)
    with pytest.raises(QueueError, match="next index 9"):
        queue.pop()


def test_descriptor_loop_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    driver.write_descriptor(driver.desc_table, 0, 0x5000, 4, VIRTQ_DESC_F_NEXT, 1)
    driver.write_descriptor(driver.desc_table, 1, 0x6000, 4, VIRTQ_DESC_F_NEXT, 0)
    driver.publish(0)
    with pytest.raises(QueueError, match="longer than the queue size 8"):
        queue.pop()


def test_buffer_outside_ram_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    driver.add_chain([Buffer(TEST_RAM_SIZE - 8, 16)])
    with pytest.raises(QueueError, match="outside guest RAM"):
        queue.pop()


def test_readable_after_writable_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    driver.add_chain([Buffer(0x5000, 4, writable=True), Buffer(0x6000, 4)])
    with pytest.raises(QueueError, match="readable buffer at position 1"):
        queue.pop()


def test_avail_index_too_far_ahead_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    driver.set_avail_idx(QUEUE_SIZE + 1)
    with pytest.raises(QueueError, match="9 entries ahead of 0"):
        queue.pop()


def test_indirect_chain_read(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory, indirect=True)
    head = driver.add_indirect_chain([Buffer(0x5000, 16), Buffer(0x6000, 8, writable=True)])
    chain = queue.pop()
    assert chain is not None
    assert chain.head_index == head
    assert [(d.address, d.length) for d in chain.readable] == [(0x5000, 16)]
    assert [(d.address, d.length) for d in chain.writable] == [(0x6000, 8)]


def test_indirect_without_feature_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory, indirect=False)
    driver.add_indirect_chain([Buffer(0x5000, 16)])
    with pytest.raises(QueueError, match="not negotiated"):
        queue.pop()


def test_indirect_with_next_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory, indirect=True)
    table = driver.alloc(DESCRIPTOR_SIZE, bytes(DESCRIPTOR_SIZE))
    flags = VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT
    driver.write_descriptor(driver.desc_table, 0, table, DESCRIPTOR_SIZE, flags, 1)
    driver.publish(0)
    with pytest.raises(QueueError, match="both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT"):
        queue.pop()


def test_indirect_length_not_multiple_of_16_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory, indirect=True)
    table = driver.alloc(32, bytes(32))
    driver.write_descriptor(driver.desc_table, 0, table, 24, VIRTQ_DESC_F_INDIRECT, 0)
    driver.publish(0)
    with pytest.raises(QueueError, match="length 24 is not a non-zero multiple of 16"):
        queue.pop()


def test_nested_indirect_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory, indirect=True)
    inner = driver.alloc(DESCRIPTOR_SIZE, bytes(DESCRIPTOR_SIZE))
    outer = driver.alloc(DESCRIPTOR_SIZE)
    driver.write_descriptor(outer, 0, inner, DESCRIPTOR_SIZE, VIRTQ_DESC_F_INDIRECT, 0)
    driver.write_descriptor(driver.desc_table, 0, outer, DESCRIPTOR_SIZE,
                            VIRTQ_DESC_F_INDIRECT, 0)
    driver.publish(0)
    with pytest.raises(QueueError, match="tables do not nest"):
        queue.pop()


def test_indirect_loop_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory, indirect=True)
    table = driver.alloc(2 * DESCRIPTOR_SIZE)
    driver.write_descriptor(table, 0, 0x5000, 4, VIRTQ_DESC_F_NEXT, 1)
    driver.write_descriptor(table, 1, 0x5000, 4, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0)
    driver.write_descriptor(driver.desc_table, 0, table, 2 * DESCRIPTOR_SIZE,
                            VIRTQ_DESC_F_INDIRECT, 0)
    driver.publish(0)
    with pytest.raises(QueueError, match="loop"):
        queue.pop()


def test_indirect_table_larger_than_queue_rejected(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory, indirect=True)
    count = QUEUE_SIZE + 1
    table = driver.alloc(count * DESCRIPTOR_SIZE, bytes(count * DESCRIPTOR_SIZE))
    driver.write_descriptor(driver.desc_table, 0, table, count * DESCRIPTOR_SIZE,
                            VIRTQ_DESC_F_INDIRECT, 0)
    driver.publish(0)
    with pytest.raises(QueueError, match="exceeds the queue size 8"):
        queue.pop()


@pytest.mark.parametrize(
    ("size", "message"),
    [(0, "size 0 is not a power of two"), (6, "size 6 is not a power of two"),
     (16, "size 16 is not a power of two <= 8")],
)
def test_validate_rejects_bad_size(memory: GuestMemory, size: int, message: str) -> None:
    driver = VirtqueueDriver(memory, QUEUE_SIZE)
    queue = Queue(QUEUE_SIZE)
    driver.configure(queue)
    queue.size = size
    with pytest.raises(QueueError, match=message):
        queue.validate(memory)


def test_validate_rejects_misaligned_descriptor_table(memory: GuestMemory) -> None:
    driver = VirtqueueDriver(memory, QUEUE_SIZE)
    queue = Queue(QUEUE_SIZE)
    driver.configure(queue)
    queue.desc_table_address += 8
    with pytest.raises(QueueError, match="not 16-byte aligned"):
        queue.validate(memory)


def test_validate_rejects_used_ring_outside_ram(memory: GuestMemory) -> None:
    driver = VirtqueueDriver(memory, QUEUE_SIZE)
    queue = Queue(QUEUE_SIZE)
    driver.configure(queue)
    queue.used_ring_address = TEST_RAM_SIZE - 4
    with pytest.raises(QueueError, match="used ring .* outside guest RAM"):
        queue.validate(memory)


def test_max_size_must_be_power_of_two() -> None:
    with pytest.raises(ValueError, match="300 is not a power of two"):
        Queue(300)


def test_no_interrupt_flag_suppresses_notification(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory)
    assert queue.needs_notification()
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not queue.needs_notification()


def test_event_idx_notifies_when_used_event_crossed(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory, event_idx=True)
    for _ in range(3):
        driver.add_chain([Buffer(0x5000, 4, writable=True)])
    driver.set_used_event(1)
    chain = queue.pop()
    assert chain is not None
    queue.add_used(chain.head_index, 0)
    assert queue.needs_notification()
    assert not queue.needs_notification()
    chain = queue.pop()
    assert chain is not None
    queue.add_used(chain.head_index, 0)
    # used.idx went from 1 to 2, passing used_event 1: the driver wants this one.
    assert queue.needs_notification()
    chain = queue.pop()
    assert chain is not None
    queue.add_used(chain.head_index, 0)
    # used.idx went from 2 to 3; used_event 1 was passed already.
    assert not queue.needs_notification()


def test_event_idx_publishes_avail_event(memory: GuestMemory) -> None:
    queue, driver = make_queue(memory, event_idx=True)
    driver.add_chain([Buffer(0x5000, 4)])
    driver.add_chain([Buffer(0x6000, 4)])
    queue.pop()
    assert driver.avail_event == 1
    queue.pop()
    assert queue.pop() is None
    assert driver.avail_event == 2


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [(0, 1, 0, True), (1, 1, 0, False), (5, 10, 4, True), (0xFFFF, 0, 0xFFFE, True),
     (0xFFFE, 0, 0xFFFF, False)],
)
def test_vring_need_event_wraps(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


@settings(max_examples=200, deadline=None)
@given(
    table=st.lists(
        st.tuples(st.integers(0, 0x2_0000), st.integers(0, 0x2000), st.integers(0, 7),
                  st.integers(0, QUEUE_SIZE)),
        min_size=QUEUE_SIZE, max_size=QUEUE_SIZE,
    ),
    heads=st.lists(st.integers(0, QUEUE_SIZE), min_size=1, max_size=QUEUE_SIZE),
    indirect=st.booleans(),
)
def test_random_descriptor_tables_raise_only_queue_error(
    table: list[tuple[int, int, int, int]], heads: list[int], indirect: bool
) -> None:
    """2.7: whatever the driver writes, pop returns a valid chain, None, or QueueError.

    Accepted: chains whose buffers lie inside guest RAM with readable buffers
    first. Rejected with QueueError: everything else. Any other exception fails.
    """
    memory = GuestMemory([(0, 0x2_0000)])
    try:
        queue, driver = make_queue(memory, indirect=indirect)
        for index, (address, length, flags, next_index) in enumerate(table):
            driver.write_descriptor(driver.desc_table, index, address, length, flags, next_index)
        for head in heads:
            driver.publish(head)
        for _ in range(len(heads)):
            try:
                chain = queue.pop()
            except QueueError:
                continue
            assert chain is not None
            assert len(chain.descriptors) <= QUEUE_SIZE
            for descriptor in chain.descriptors:
                assert memory.contains(descriptor.address, descriptor.length)
            writable_seen = [d.is_write_only for d in chain.descriptors]
            assert writable_seen == sorted(writable_seen)
        assert queue.pop() is None
    finally:
        memory.close()
