"""The split virtqueue (virtio 1.2 section 2.7) on its own, with indirect tables enabled.

These drive `Queue` directly, so features no device offers yet (indirect
descriptors) are covered too: every pop either returns a chain that obeys
the rules or raises QueueError, and never reads past guest RAM or loops.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import strategies_virtio as sv
from tests.virtio_driver import VirtqueueDriver
from vmm.devices.virtio.queue import DescriptorChain, Queue, QueueError

_MAX_SIZE = 256


def _activated(memory: sv.CountingMemory, size: int, event_idx: bool = False,
               ) -> tuple[Queue, VirtqueueDriver]:
    driver = VirtqueueDriver(memory, size, ring_base=sv.FUZZ_RING_BASE)
    queue = Queue(_MAX_SIZE)
    driver.configure(queue)
    queue.activate(memory, event_idx=event_idx, indirect=True)
    return queue, driver


def _check_chain(chain: DescriptorChain, size: int, memory: sv.CountingMemory) -> None:
    assert chain.head_index < size
    assert 1 <= len(chain.descriptors) <= size
    seen_writable = False
    for descriptor in chain.descriptors:
        assert memory.contains(descriptor.address, descriptor.length)
        assert not (seen_writable and not descriptor.is_write_only)
        seen_writable |= descriptor.is_write_only


@sv.fuzz_settings()
@given(data=st.data())
def test_2_7_5_descriptor_chains_are_validated(data: st.DataObject) -> None:
    """2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total;
    this implies that loops in the descriptor chain are forbidden!" and 2.7.5.3.1: "The
    driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor".

    Whatever the table holds (cycles, next indexes past the table, nested or oversized
    indirect tables, buffers in the RAM hole or wrapping 2^64, readable after writable),
    pop returns a chain that obeys every rule or raises QueueError; it reads at most
    a bounded number of descriptors and never a byte outside guest RAM.
    """
    size = data.draw(sv.queue_sizes(_MAX_SIZE))
    image = data.draw(sv.queue_images(size))
    memory = sv.new_memory()
    try:
        queue, driver = _activated(memory, size)
        sv.write_image(memory, driver, image)
        memory.access_count = 0
        for _ in range(size + 1):
            try:
                chain = queue.pop()
            except QueueError:
                break
            if chain is None:
                break
            _check_chain(chain, size, memory)
        assert memory.outside == []
        assert memory.access_count <= 8 + sv.ACCESSES_PER_DESCRIPTOR * (size + 1) * (2 * size)
    finally:
        memory.close()


@sv.fuzz_settings()
@given(jump=st.integers(0, 0xFFFF), size=sv.queue_sizes(_MAX_SIZE))
def test_2_7_6_available_index_jumps(jump: int, size: int) -> None:
    """2.7.6: the driver adds at most Queue Size entries; "idx field indicates where the
    driver would put the next descriptor entry in the ring (modulo the queue size)".
    An index more than Queue Size ahead is a driver error, never a long loop.
    """
    memory = sv.new_memory()
    try:
        queue, driver = _activated(memory, size)
        for index in range(size):
            driver.write_descriptor(driver.desc_table, index, sv.FUZZ_DATA[0], 16, 0, 0)
            driver.memory.write_le16(driver.avail_ring + 4 + 2 * index, index)
        driver.set_avail_idx(jump)
        popped = 0
        try:
            while queue.pop() is not None:
                popped += 1
        except QueueError:
            assert jump > size
        else:
            assert jump <= size and popped == jump
    finally:
        memory.close()


@sv.fuzz_settings()
@given(start=st.integers(0, 0xFFFF), count=st.integers(1, 40), size=st.sampled_from([1, 4, 16]))
def test_2_7_8_used_ring_wraps(start: int, count: int, size: int) -> None:
    """2.7.8: used idx "indicates where the device would put the next descriptor entry in
    the ring (modulo the queue size)" and wraps at 2^16: after any number of chains from any
    starting index, the driver reads back exactly the heads it offered, in order.
    """
    memory = sv.new_memory()
    try:
        queue, driver = _activated(memory, size)
        queue.next_avail = queue.next_used = start
        driver.avail_idx = driver.last_used_idx = start
        driver.set_avail_idx(start)
        memory.write_le16(driver.used_ring + 2, start)
        for round_ in range(count):
            head = driver.add_chain([driver.buffer(length=8, writable=True)])
            chain = queue.pop()
            assert chain is not None and chain.head_index == head
            queue.add_used(chain.head_index, round_)
            assert driver.used_entries() == [(head, round_)]
        assert driver.used_idx == (start + count) % 0x10000
    finally:
        memory.close()


@sv.fuzz_settings()
@given(used_event=st.integers(0, 0xFFFF), batches=st.lists(st.integers(1, 5), max_size=8))
def test_2_7_10_event_index_suppression(used_event: int, batches: list[int]) -> None:
    """2.7.10: with VIRTIO_F_EVENT_IDX "the device MUST NOT send a notification" unless
    used idx passed used_event since the last one, and the device writes avail_event so the
    driver knows where to notify; checked against a direct reading of the rule.
    """
    memory = sv.new_memory()
    try:
        queue, driver = _activated(memory, 16, event_idx=True)
        driver.set_used_event(used_event)
        previous: int | None = None
        for batch in batches:
            for _ in range(batch):
                driver.add_chain([driver.buffer(length=4, writable=True)])
                chain = queue.pop()
                assert chain is not None
                assert driver.avail_event == queue.next_avail
                queue.add_used(chain.head_index, 0)
            new = queue.next_used
            # The rule read directly: notify when used_event lies in [previous, new).
            expected = previous is None or (
                (used_event - previous) % 0x10000 < (new - previous) % 0x10000)
            assert queue.needs_notification() == expected
            previous = new
            driver.used_entries()
    finally:
        memory.close()
