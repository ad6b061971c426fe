"""virtio-mmio transport (virtio 1.2 section 4.2.2) and the status state machine (3.1.1)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator

import pytest

from tests.virtio_driver import TEST_RAM_SIZE, Buffer, MmioDriver, VirtqueueDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.block import BLOCK_QUEUE_SIZE, VIRTIO_ID_BLOCK, Block, FileBackend
from vmm.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
)
from vmm.memory import GuestMemory

DISK_SIZE = 64 * 512


class Harness:
    """A block device behind a transport, with a counting IRQ line and a driver."""

    def __init__(self, memory: GuestMemory, fd: int) -> None:
        self.irq_count = 0
        self.device = Block("disk0", FileBackend(fd))
        self.transport = mmio.MmioTransport(self.device, memory, self.raise_irq)
        self.driver = MmioDriver(self.transport)
        self.queue = VirtqueueDriver(memory, 16)

    def raise_irq(self) -> None:
        self.irq_count += 1

    def status(self) -> int:
        return self.driver.read32(mmio.STATUS_OFFSET)


@pytest.fixture
def harness() -> Iterator[Harness]:
    memory = GuestMemory([(0, TEST_RAM_SIZE)])
    with tempfile.TemporaryFile() as disk:
        disk.truncate(DISK_SIZE)
        yield Harness(memory, disk.fileno())
    memory.close()


def test_identification_registers(harness: Harness) -> None:
    driver = harness.driver
    assert driver.read32(mmio.MAGIC_VALUE_OFFSET) == 0x74726976
    assert driver.read32(mmio.VERSION_OFFSET) == 2
    assert driver.read32(mmio.DEVICE_ID_OFFSET) == VIRTIO_ID_BLOCK
    assert driver.read32(mmio.VENDOR_ID_OFFSET) == mmio.MMIO_VENDOR_ID


def test_device_features_pages(harness: Harness) -> None:
    features = harness.driver.device_features()
    assert features & (1 << VIRTIO_F_VERSION_1)
    assert features == harness.device.avail_features
    harness.driver.write32(mmio.DEVICE_FEATURES_SEL_OFFSET, 2)
    assert harness.driver.read32(mmio.DEVICE_FEATURES_OFFSET) == 0


def test_queue_num_max_per_selected_queue(harness: Harness) -> None:
    harness.driver.write32(mmio.QUEUE_SEL_OFFSET, 0)
    assert harness.driver.read32(mmio.QUEUE_NUM_MAX_OFFSET) == BLOCK_QUEUE_SIZE
    harness.driver.write32(mmio.QUEUE_SEL_OFFSET, 1)
    assert harness.driver.read32(mmio.QUEUE_NUM_MAX_OFFSET) == 0
    assert harness.driver.read32(mmio.QUEUE_READY_OFFSET) == 0


def test_status_sequence_activates_device(harness: Harness) -> None:
    harness.driver.start([harness.queue])
    expected = (mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER | mmio.STATUS_FEATURES_OK
                | mmio.STATUS_DRIVER_OK)
    assert harness.status() == expected
    assert harness.device.is_activated
    assert harness.transport.queues[0].size == 16
    assert harness.transport.queues[0].desc_table_address == harness.queue.desc_table
    assert harness.transport.queues[0].used_ring_address == harness.queue.used_ring


def test_features_ok_without_version_1_stays_clear(harness: Harness) -> None:
    harness.driver.negotiate(features=0)
    assert not harness.status() & mmio.STATUS_FEATURES_OK
    assert harness.device.acked_features == 0


def test_features_ok_with_unoffered_bit_stays_clear(harness: Harness) -> None:
    harness.driver.negotiate(features=(1 << VIRTIO_F_VERSION_1) | (1 << 7))
    assert not harness.status() & mmio.STATUS_FEATURES_OK


def test_accepted_features_reach_device(harness: Harness) -> None:
    wanted = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    harness.driver.negotiate(features=wanted)
    assert harness.status() & mmio.STATUS_FEATURES_OK
    assert harness.device.acked_features == wanted


def test_driver_features_after_features_ok_needs_reset(harness: Harness) -> None:
    harness.driver.negotiate()
    harness.driver.write32(mmio.DRIVER_FEATURES_OFFSET, 0)
    assert harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET


def test_queue_setup_before_features_ok_needs_reset(harness: Harness) -> None:
    harness.driver.set_status(mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
    harness.driver.write32(mmio.QUEUE_NUM_OFFSET, 16)
    assert harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET
    assert harness.transport.queues[0].size == BLOCK_QUEUE_SIZE


def test_queue_setup_after_driver_ok(harness: Harness) -> None:
    harness.driver.start([harness.queue])
    harness.driver.write32(mmio.QUEUE_DESC_LOW_OFFSET, 0x8000)
    assert harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET
    assert harness.transport.queues[0].desc_table_address == harness.queue.desc_table
    assert harness.driver.read32(mmio.INTERRUPT_STATUS_OFFSET) == VIRTIO_MMIO_INT_CONFIG
    assert harness.irq_count == 1


def test_status_bit_out_of_order_needs_reset(harness: Harness) -> None:
    harness.driver.write32(mmio.STATUS_OFFSET, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER_OK)
    assert harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET
    assert not harness.status() & mmio.STATUS_DRIVER_OK


def test_status_clearing_bit_needs_reset(harness: Harness) -> None:
    harness.driver.negotiate()
    harness.driver.write32(mmio.STATUS_OFFSET, mmio.STATUS_ACKNOWLEDGE)
    assert harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET


def test_failed_bit_accepted_any_time(harness: Harness) -> None:
    harness.driver.set_status(mmio.STATUS_ACKNOWLEDGE)
    harness.driver.set_status(mmio.STATUS_FAILED)
    assert harness.status() == mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_FAILED


def test_status_write_zero_resets_everything(harness: Harness) -> None:
    harness.driver.start([harness.queue])
    harness.driver.write32(mmio.QUEUE_DESC_LOW_OFFSET, 0)
    harness.driver.write32(mmio.STATUS_OFFSET, 0)
    assert harness.status() == 0
    assert not harness.device.is_activated
    assert harness.device.acked_features == 0
    assert harness.driver.read32(mmio.INTERRUPT_STATUS_OFFSET) == 0
    assert not harness.transport.queues[0].ready
    assert harness.transport.queues[0].desc_table_address == 0


def test_device_works_again_after_reset(harness: Harness) -> None:
    harness.driver.start([harness.queue])
    harness.driver.start([harness.queue])
    assert harness.device.is_activated
    assert not harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET


def test_queue_ready_zero_accepted_after_reset(harness: Harness) -> None:
    harness.driver.write32(mmio.QUEUE_READY_OFFSET, 0)
    assert harness.status() == 0


def test_invalid_queue_at_driver_ok_needs_reset(harness: Harness) -> None:
    harness.driver.negotiate()
    harness.driver.setup_queue(0, harness.queue)
    harness.driver.write32(mmio.QUEUE_NUM_OFFSET, 12)
    harness.driver.set_status(mmio.STATUS_DRIVER_OK)
    assert harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET
    assert not harness.device.is_activated
    assert harness.irq_count == 1


def test_notify_processes_queue_and_interrupts(harness: Harness) -> None:
    harness.driver.start([harness.queue])
    queue = harness.queue
    header = queue.buffer((8).to_bytes(4, "little") + bytes(12))
    head = queue.add_chain([header, queue.buffer(length=21, writable=True)])
    harness.driver.notify(0)
    assert queue.used_entries() == [(head, 21)]
    assert harness.driver.read32(mmio.INTERRUPT_STATUS_OFFSET) == VIRTIO_MMIO_INT_VRING
    assert harness.irq_count == 1
    harness.driver.write32(mmio.INTERRUPT_ACK_OFFSET, VIRTIO_MMIO_INT_VRING)
    assert harness.driver.read32(mmio.INTERRUPT_STATUS_OFFSET) == 0


def test_notify_before_driver_ok_is_ignored(harness: Harness) -> None:
    harness.driver.negotiate()
    harness.driver.setup_queue(0, harness.queue)
    harness.queue.add_chain([harness.queue.buffer(bytes(16))])
    harness.transport.notify(0)
    assert harness.transport.ignored_notify_count == 1
    assert harness.queue.used_idx == 0


def test_notify_unknown_queue_is_ignored(harness: Harness) -> None:
    harness.driver.start([harness.queue])
    harness.transport.notify(3)
    assert harness.transport.ignored_notify_count == 1
    assert not harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET


def test_queue_error_marks_needs_reset_and_logs_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.driver.start([harness.queue])
    harness.queue.publish(99)
    with caplog.at_level(logging.WARNING, logger=mmio.__name__):
        harness.driver.notify(0)
        harness.transport.notify(0)
        harness.driver.write32(mmio.QUEUE_NUM_OFFSET, 4)
    assert harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET
    assert harness.driver.read32(mmio.INTERRUPT_STATUS_OFFSET) & VIRTIO_MMIO_INT_CONFIG
    assert harness.transport.ignored_notify_count == 1
    assert harness.transport.needs_reset_count == 2
    assert len(caplog.records) == 1
    assert "head 99" in caplog.records[0].getMessage()


def test_narrow_register_access_is_ignored_and_counted(harness: Harness) -> None:
    data = bytearray(b"\xff\xff")
    harness.transport.read(mmio.MAGIC_VALUE_OFFSET, data)
    assert data == bytearray(2)
    harness.transport.write(mmio.STATUS_OFFSET, b"\x01")
    assert harness.status() == 0
    assert harness.transport.invalid_access_count == 2


def test_write_only_register_reads_zero(harness: Harness) -> None:
    harness.driver.negotiate()
    harness.driver.write32(mmio.QUEUE_SEL_OFFSET, 0)
    harness.driver.write32(mmio.QUEUE_DESC_LOW_OFFSET, 0x1000)
    assert harness.driver.read32(mmio.QUEUE_DESC_LOW_OFFSET) == 0


def test_shared_memory_region_absent(harness: Harness) -> None:
    assert harness.driver.read32(mmio.SHM_LEN_LOW_OFFSET) == 0xFFFF_FFFF
    assert harness.driver.read32(mmio.SHM_LEN_HIGH_OFFSET) == 0xFFFF_FFFF


def test_config_space_any_width(harness: Harness) -> None:
    capacity = bytearray(8)
    harness.transport.read(mmio.CONFIG_SPACE_OFFSET, capacity)
    assert int.from_bytes(capacity, "little") == DISK_SIZE // 512
    low_byte = bytearray(1)
    harness.transport.read(mmio.CONFIG_SPACE_OFFSET, low_byte)
    assert low_byte[0] == DISK_SIZE // 512
    generation = harness.driver.read32(mmio.CONFIG_GENERATION_OFFSET)
    assert generation == harness.device.config_generation


def test_config_generation_changes_with_capacity(harness: Harness) -> None:
    before = harness.driver.read32(mmio.CONFIG_GENERATION_OFFSET)
    os.ftruncate(harness.device.backend.fd, 2 * DISK_SIZE)  # type: ignore[attr-defined]
    harness.device.update_capacity()
    assert harness.driver.read32(mmio.CONFIG_GENERATION_OFFSET) != before
    capacity = bytearray(8)
    harness.transport.read(mmio.CONFIG_SPACE_OFFSET, capacity)
    assert int.from_bytes(capacity, "little") == 2 * DISK_SIZE // 512


def test_queue_address_high_word(harness: Harness) -> None:
    harness.driver.negotiate()
    harness.driver.write32(mmio.QUEUE_DEVICE_LOW_OFFSET, 0x2000)
    harness.driver.write32(mmio.QUEUE_DEVICE_HIGH_OFFSET, 0x1)
    assert harness.transport.queues[0].used_ring_address == 0x1_0000_2000


def test_chain_with_buffer_outside_ram_needs_reset(harness: Harness) -> None:
    harness.driver.start([harness.queue])
    harness.queue.add_chain([Buffer(TEST_RAM_SIZE, 16), Buffer(0x5000, 1, writable=True)])
    harness.driver.notify(0)
    assert harness.status() & mmio.STATUS_DEVICE_NEEDS_RESET
    assert harness.queue.used_idx == 0
