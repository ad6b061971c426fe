"""virtio-balloon (virtio 1.2 section 5.5), driven through virtio-mmio with driver-side queues."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from tests.virtio_driver import TEST_RAM_SIZE, Buffer, MmioDriver, VirtqueueDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.balloon import (
    PAGES_PER_MIB,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_ID_BALLOON,
    Balloon,
)
from vmm.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG
from vmm.memory import GuestMemory

QUEUE_SIZE = 16
# Guest pages the tests inflate: far above the rings and data areas of the queues.
TEST_PAGE_BASE = 0xE_0000
PAGE = 4096


class FakeTimer:
    """Records how the device arms its statistics timer."""

    def __init__(self) -> None:
        self.armed: tuple[int, int] | None = None
        self.disarm_count = 0

    def arm(self, delay_ns: int, interval_ns: int = 0) -> None:
        self.armed = (delay_ns, interval_ns)

    def disarm(self) -> None:
        self.armed = None
        self.disarm_count += 1


class BalloonDevice:
    """A Balloon started by a driver over virtio-mmio, with one driver queue per device queue."""

    def __init__(
        self,
        memory: GuestMemory,
        amount_mib: int = 0,
        deflate_on_oom: bool = False,
        stats_interval_s: int = 0,
        reporting: bool = False,
    ) -> None:
        self.memory = memory
        self.timer = FakeTimer()
        self.device = Balloon(
            amount_mib, deflate_on_oom, stats_interval_s, reporting,
            self.timer if stats_interval_s else None,
        )
        self.irq_count = 0
        self.transport = mmio.MmioTransport(self.device, memory, self.raise_irq)
        self.queues = [
            VirtqueueDriver(
                memory, QUEUE_SIZE, ring_base=0x1000 + 0x2000 * index,
                data_base=0x4_0000 + 0x2_0000 * index,
            )
            for index in range(len(self.device.queue_max_sizes))
        ]
        self.driver = MmioDriver(self.transport)
        self.driver.start(self.queues)

    def raise_irq(self) -> None:
        self.irq_count += 1

    def pfn_buffer(self, queue: VirtqueueDriver, pfns: list[int]) -> Buffer:
        return queue.buffer(struct.pack(f"<{len(pfns)}I", *pfns))

    def config_u32(self, offset: int) -> int:
        return self.driver.read32(mmio.CONFIG_SPACE_OFFSET + offset)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory([(0, TEST_RAM_SIZE)])
    yield ram
    ram.close()


def test_balloon_identity_and_features(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, deflate_on_oom=True, stats_interval_s=1, reporting=True)
    assert balloon.driver.read32(mmio.DEVICE_ID_OFFSET) == VIRTIO_ID_BALLOON
    features = balloon.driver.device_features()
    for bit in (
        VIRTIO_F_VERSION_1, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_STATS_VQ,
        VIRTIO_BALLOON_F_REPORTING,
    ):
        assert features & (1 << bit), bit
    assert len(balloon.device.queue_max_sizes) == 4


def test_balloon_minimal_features(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory)
    features = balloon.driver.device_features()
    assert features == 1 << VIRTIO_F_VERSION_1
    assert len(balloon.device.queue_max_sizes) == 2


def test_balloon_config_target_pages(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, amount_mib=3)
    assert balloon.config_u32(0) == 3 * PAGES_PER_MIB
    assert balloon.config_u32(4) == 0


def test_balloon_update_target_raises_config_interrupt(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, amount_mib=1)
    generation = balloon.driver.read32(mmio.CONFIG_GENERATION_OFFSET)
    balloon.device.update_target(5)
    assert balloon.config_u32(0) == 5 * PAGES_PER_MIB
    assert balloon.irq_count == 1
    assert balloon.transport.interrupt.status & VIRTIO_MMIO_INT_CONFIG
    assert balloon.driver.read32(mmio.CONFIG_GENERATION_OFFSET) != generation


def test_balloon_driver_writes_actual(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, amount_mib=2)
    balloon.driver.write32(mmio.CONFIG_SPACE_OFFSET + 4, 300)
    balloon.driver.write32(mmio.CONFIG_SPACE_OFFSET + 0, 7)
    stats = balloon.device.statistics()
    assert stats["actual_pages"] == 300
    assert stats["actual_mib"] == 1
    assert stats["target_pages"] == 2 * PAGES_PER_MIB
    assert stats["target_mib"] == 2


def test_balloon_inflate_discards_pages(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory)
    for page in range(4):
        memory.fill(TEST_PAGE_BASE + page * PAGE, PAGE, 0x5A)
    pfns = [TEST_PAGE_BASE // PAGE + 2, TEST_PAGE_BASE // PAGE, TEST_PAGE_BASE // PAGE + 1]
    inflate = balloon.queues[0]
    head = inflate.add_chain([balloon.pfn_buffer(inflate, pfns)])
    balloon.transport.notify(0)
    assert inflate.used_entries() == [(head, 0)]
    for page in range(3):
        assert memory.read(TEST_PAGE_BASE + page * PAGE, PAGE) == bytes(PAGE), page
    assert memory.read(TEST_PAGE_BASE + 3 * PAGE, PAGE) == b"\x5a" * PAGE
    assert balloon.device.metrics.discarded_pages == 3
    assert balloon.device.metrics.inflate_count == 1
    assert balloon.irq_count == 1


def test_balloon_inflate_skips_pfn_outside_ram(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory)
    last_ram_pfn = TEST_RAM_SIZE // PAGE - 1
    inflate = balloon.queues[0]
    inflate.add_chain([balloon.pfn_buffer(inflate, [last_ram_pfn, last_ram_pfn + 1, 0xFFFF_FFFF])])
    balloon.transport.notify(0)
    assert len(inflate.used_entries()) == 1
    assert balloon.device.metrics.discarded_pages == 1
    assert balloon.device.metrics.invalid_pfns == 2
    assert not balloon.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET


def test_balloon_deflate_returns_buffers(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory)
    memory.fill(TEST_PAGE_BASE, PAGE, 0x11)
    deflate = balloon.queues[1]
    head = deflate.add_chain([balloon.pfn_buffer(deflate, [TEST_PAGE_BASE // PAGE])])
    balloon.transport.notify(1)
    assert deflate.used_entries() == [(head, 0)]
    assert memory.read(TEST_PAGE_BASE, PAGE) == b"\x11" * PAGE
    assert balloon.device.metrics.deflate_count == 1


def _stats_payload(values: dict[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in values.items())


def test_balloon_statistics_held_until_poll(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, stats_interval_s=2)
    assert balloon.timer.armed == (2_000_000_000, 2_000_000_000)
    stats_queue = balloon.queues[2]
    head = stats_queue.add_chain(
        [stats_queue.buffer(_stats_payload({4: 1 << 20, 5: 1 << 27, 15: 9, 99: 1}))]
    )
    balloon.transport.notify(2)
    assert stats_queue.used_entries() == []
    stats = balloon.device.statistics()
    assert stats["free_memory"] == 1 << 20
    assert stats["total_memory"] == 1 << 27
    assert stats["direct_reclaim"] == 9
    assert "swap_in" not in stats
    balloon.device.on_stats_timer()
    assert stats_queue.used_entries() == [(head, 0)]
    assert balloon.device.metrics.stats_updates_count == 1


def test_balloon_statistics_rejects_partial_entry(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, stats_interval_s=1)
    stats_queue = balloon.queues[2]
    stats_queue.add_chain([stats_queue.buffer(_stats_payload({4: 5})[:-1])])
    balloon.transport.notify(2)
    assert balloon.device.metrics.stats_update_fails == 1
    assert "free_memory" not in balloon.device.statistics()


def test_balloon_update_statistics_interval(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, stats_interval_s=1)
    balloon.device.update_statistics_interval(7)
    assert balloon.timer.armed == (7_000_000_000, 7_000_000_000)
    with pytest.raises(ValueError, match="positive interval"):
        balloon.device.update_statistics_interval(0)


def test_balloon_statistics_interval_needs_enabled_stats(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory)
    with pytest.raises(ValueError, match="disabled at creation"):
        balloon.device.update_statistics_interval(5)


def test_balloon_reset_disarms_timer(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, stats_interval_s=1)
    balloon.driver.write32(mmio.STATUS_OFFSET, 0)
    assert balloon.timer.armed is None
    assert balloon.timer.disarm_count == 1


def test_balloon_free_page_reporting_discards(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, reporting=True)
    memory.fill(TEST_PAGE_BASE, 2 * PAGE, 0x77)
    reporting = balloon.queues[2]
    head = reporting.add_chain([Buffer(TEST_PAGE_BASE, 2 * PAGE, writable=True)])
    balloon.transport.notify(2)
    assert reporting.used_entries() == [(head, 0)]
    assert memory.read(TEST_PAGE_BASE, 2 * PAGE) == bytes(2 * PAGE)
    assert balloon.device.metrics.reported_free_bytes == 2 * PAGE


def test_balloon_free_page_report_unaligned_is_counted(memory: GuestMemory) -> None:
    balloon = BalloonDevice(memory, reporting=True)
    reporting = balloon.queues[2]
    reporting.add_chain([Buffer(TEST_PAGE_BASE + 8, PAGE, writable=True)])
    balloon.transport.notify(2)
    assert len(reporting.used_entries()) == 1
    assert balloon.device.metrics.invalid_reports == 1
