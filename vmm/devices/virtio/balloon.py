"""virtio-balloon, the traditional memory balloon (virtio 1.2 section 5.5).

The host sets a target size in configuration space (`num_pages`). The guest
driver allocates that many pages and sends their page frame numbers (PFNs,
4 KiB units) on the inflate queue; the device returns the host memory behind
them with `GuestMemory.discard`, so a later guest access reads zeroes. Pages
sent on the deflate queue are the guest's again; nothing needs doing, because
the host maps fresh pages on first touch. The driver reports its balloon size
in `actual`.

With statistics enabled the driver places one buffer of {le16 tag; le64 val}
entries on the stats queue (5.5.6.3). The device keeps that buffer and returns
it every polling interval, so that the driver refills it with fresh values and
offers it again.

With free page reporting (Linux's VIRTIO_BALLOON_F_REPORTING) the driver
offers device-writable buffers that cover free guest pages, and the device
discards them.

Queue indexes are compact: a queue whose feature is off takes no index, as
Linux's virtio_balloon driver and virtio-mmio transport number them.
"""

from __future__ import annotations

import logging
import mmap
import struct
from dataclasses import dataclass
from typing import Callable, Final, Protocol

from vmm.devices.virtio.device import VirtioDevice, VirtioInterrupt, feature_bit
from vmm.devices.virtio.queue import DescriptorChain, Queue
from vmm.memory import GuestMemory, GuestMemoryError

logger = logging.getLogger(__name__)

# 5.5.1 Device ID.
VIRTIO_ID_BALLOON: Final = 5
# 5.5.2 Virtqueues. 256 entries: a Linux driver sends up to 256 PFNs per buffer.
BALLOON_QUEUE_SIZE: Final = 256

# 5.5.3 Feature bits; VIRTIO_BALLOON_F_REPORTING is from linux/virtio_balloon.h.
VIRTIO_BALLOON_F_MUST_TELL_HOST: Final = 0
VIRTIO_BALLOON_F_STATS_VQ: Final = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM: Final = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT: Final = 3
VIRTIO_BALLOON_F_PAGE_POISON: Final = 4
VIRTIO_BALLOON_F_REPORTING: Final = 5

# 5.5.4 Device configuration layout: le32 num_pages; le32 actual (then fields this
# device offers no feature for, which read as 0).
CONFIG_NUM_PAGES_OFFSET: Final = 0
CONFIG_ACTUAL_OFFSET: Final = 4
CONFIG_FIELD_SIZE: Final = 4
CONFIG_SIZE: Final = 8

# 5.5.6: PFNs are le32 in units of 4 KiB, whatever the guest's page size.
VIRTIO_BALLOON_PFN_SHIFT: Final = 12
BALLOON_PAGE_SIZE: Final = 1 << VIRTIO_BALLOON_PFN_SHIFT
PFN_ENTRY_SIZE: Final = 4
PAGES_PER_MIB: Final = (1 << 20) // BALLOON_PAGE_SIZE

# 5.5.6.3 Memory Statistics: struct virtio_balloon_stat {le16 tag; le64 val;}, packed.
STAT_ENTRY: Final = struct.Struct("<HQ")
# A Linux 6.12 driver sends 16 entries; anything past this is ignored.
MAX_STATS_BYTES: Final = 4096

# Statistic tags (5.5.6.3; tags 10-15 from linux/virtio_balloon.h since Linux 6.12) and
# the names Firecracker's GET /balloon/statistics gives them.
STAT_NAMES: Final = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
    10: "oom_kill",
    11: "alloc_stall",
    12: "async_scan",
    13: "direct_scan",
    14: "async_reclaim",
    15: "direct_reclaim",
}

NANOSECONDS_PER_SECOND: Final = 1_000_000_000


class StatsTimer(Protocol):
    """A periodic timer the monitor watches; `vmm.rate_limiter.TimerFd` is one."""

    def arm(self, delay_ns: int, interval_ns: int = 0) -> None: ...

    def disarm(self) -> None: ...


@dataclass
class BalloonMetrics:
    """Counters for the metrics endpoint's "balloon" group."""

    inflate_count: int = 0
    deflate_count: int = 0
    discarded_pages: int = 0
    invalid_pfns: int = 0
    stats_updates_count: int = 0
    stats_update_fails: int = 0
    reported_free_bytes: int = 0
    invalid_reports: int = 0


class Balloon(VirtioDevice):
    """A memory balloon whose target comes from the API, in MiB.

    `stats_polling_interval_s` above 0 adds the stats queue and requires
    `stats_timer`; the monitor calls `on_stats_timer` when that timer fires.
    """

    device_type = VIRTIO_ID_BALLOON

    def __init__(
        self,
        amount_mib: int,
        deflate_on_oom: bool,
        stats_polling_interval_s: int = 0,
        free_page_reporting: bool = False,
        stats_timer: StatsTimer | None = None,
    ) -> None:
        super().__init__()
        if stats_polling_interval_s > 0 and stats_timer is None:
            raise ValueError(
                f"stats_polling_interval_s {stats_polling_interval_s} needs a stats timer"
            )
        self.deflate_on_oom = deflate_on_oom
        self.stats_polling_interval_s = stats_polling_interval_s
        self.stats_enabled = stats_polling_interval_s > 0
        self.free_page_reporting = free_page_reporting
        self.stats_timer = stats_timer
        self.metrics = BalloonMetrics()
        self.target_pages = 0
        self.actual_pages = 0
        self.latest_stats: dict[str, int] = {}
        self._held_stats_head: int | None = None
        self._setup_queues()
        self._set_target_pages(amount_mib * PAGES_PER_MIB)

    def _setup_queues(self) -> None:
        """Assign queue indexes: inflate 0, deflate 1, then stats and reporting when on."""
        self.inflate_index, self.deflate_index = 0, 1
        self.stats_index: int | None = None
        self.reporting_index: int | None = None
        count = 2
        if self.deflate_on_oom:
            self.avail_features |= feature_bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        if self.stats_enabled:
            self.avail_features |= feature_bit(VIRTIO_BALLOON_F_STATS_VQ)
            self.stats_index, count = count, count + 1
        if self.free_page_reporting:
            self.avail_features |= feature_bit(VIRTIO_BALLOON_F_REPORTING)
            self.reporting_index, count = count, count + 1
        self.queue_max_sizes = (BALLOON_QUEUE_SIZE,) * count

    def __repr__(self) -> str:
        return f"Balloon(target_pages={self.target_pages}, actual_pages={self.actual_pages})"

    # Configuration space (5.5.4) --------------------------------------------------------

    def _set_target_pages(self, pages: int) -> None:
        self.target_pages = pages
        self.config_space = bytearray(
            struct.pack("<II", self.target_pages, self.actual_pages)
        )

    def write_config(self, offset: int, data: bytes) -> None:
        """Accept the driver's `actual`; every other field is read-only."""
        with self.lock:
            end = offset + len(data)
            if offset < CONFIG_ACTUAL_OFFSET or end > CONFIG_ACTUAL_OFFSET + CONFIG_FIELD_SIZE:
                logger.debug("%r: ignored config write at %d length %d", self, offset, len(data))
                return
            self.config_space[offset:end] = data
            actual = self.config_space[CONFIG_ACTUAL_OFFSET : CONFIG_ACTUAL_OFFSET + 4]
            self.actual_pages = int.from_bytes(actual, "little")

    # API ------------------------------------------------------------------------------------

    def update_target(self, amount_mib: int) -> None:
        """Set the balloon target and tell an active driver with a config-change interrupt."""
        with self.lock:
            self._set_target_pages(amount_mib * PAGES_PER_MIB)
            self.config_generation += 1
            if self.interrupt is not None:
                self.interrupt.signal_config_change()

    def statistics(self) -> dict[str, int]:
        """Return target and actual size and the latest guest statistics (Firecracker's names)."""
        with self.lock:
            return {
                "target_pages": self.target_pages,
                "actual_pages": self.actual_pages,
                "target_mib": self.target_pages // PAGES_PER_MIB,
                "actual_mib": self.actual_pages // PAGES_PER_MIB,
                **self.latest_stats,
            }

    def update_statistics_interval(self, interval_s: int) -> None:
        """Change the polling interval; statistics cannot be turned on or off after creation."""
        with self.lock:
            if not self.stats_enabled or interval_s <= 0:
                raise ValueError(
                    f"statistics interval {interval_s} s: statistics were "
                    f"{'enabled' if self.stats_enabled else 'disabled'} at creation, and "
                    f"only a positive interval on an enabled device can be set"
                )
            self.stats_polling_interval_s = interval_s
            if self.is_activated:
                self._arm_stats_timer()

    def _arm_stats_timer(self) -> None:
        assert self.stats_timer is not None
        period = self.stats_polling_interval_s * NANOSECONDS_PER_SECOND
        self.stats_timer.arm(period, period)

    # Lifecycle -------------------------------------------------------------------------------

    def activate(
        self, memory: GuestMemory, queues: list[Queue], interrupt: VirtioInterrupt
    ) -> None:
        """Start the device; with statistics negotiated, start polling the driver."""
        super().activate(memory, queues, interrupt)
        if self.stats_enabled and self.has_feature(VIRTIO_BALLOON_F_STATS_VQ):
            self._arm_stats_timer()

    def reset(self) -> None:
        with self.lock:
            if self.stats_timer is not None:
                self.stats_timer.disarm()
            self._held_stats_head = None
            super().reset()

    # Queues ----------------------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        """Serve the inflate, deflate, stats or reporting queue, by index."""
        with self.lock:
            queue = self.queues[index]
            if index == self.inflate_index:
                self._drain(queue, self._inflate)
            elif index == self.deflate_index:
                self._drain(queue, self._deflate)
            elif index == self.stats_index:
                self._take_stats(queue)
            elif index == self.reporting_index:
                self._drain(queue, self._report_free_pages)

    def _drain(self, queue: Queue, serve: Callable[[DescriptorChain], None]) -> None:
        served = False
        while (chain := queue.pop()) is not None:
            serve(chain)
            queue.add_used(chain.head_index, 0)
            served = True
        if served:
            self.signal_used_queue(queue)

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise RuntimeError(f"{self!r} processes a queue before activation")
        return self.memory

    def _read_pfns(self, chain: DescriptorChain) -> list[int]:
        memory = self._memory()
        pfns: list[int] = []
        for descriptor in chain.readable:
            count = descriptor.length // PFN_ENTRY_SIZE
            raw = memory.read(descriptor.address, count * PFN_ENTRY_SIZE)
            pfns.extend(struct.unpack(f"<{count}I", raw))
        return pfns

    def _inflate(self, chain: DescriptorChain) -> None:
        pfns = self._read_pfns(chain)
        self.metrics.inflate_count += 1
        for first, count in _runs(sorted(set(pfns))):
            self._discard_run(first, count)

    def _discard_run(self, first_pfn: int, count: int) -> None:
        """Discard `count` pages from `first_pfn`; pages outside guest RAM are counted, skipped."""
        memory = self._memory()
        try:
            self._discard(memory, first_pfn << VIRTIO_BALLOON_PFN_SHIFT, count * BALLOON_PAGE_SIZE)
            self.metrics.discarded_pages += count
            return
        except GuestMemoryError:
            pass
        # The run crosses a region end or leaves RAM: take the pages one by one.
        for pfn in range(first_pfn, first_pfn + count):
            try:
                self._discard(memory, pfn << VIRTIO_BALLOON_PFN_SHIFT, BALLOON_PAGE_SIZE)
                self.metrics.discarded_pages += 1
            except GuestMemoryError:
                self.metrics.invalid_pfns += 1

    @staticmethod
    def _discard(memory: GuestMemory, address: int, length: int) -> None:
        if BALLOON_PAGE_SIZE % mmap.PAGESIZE:
            # NOTE: a host page larger than 4 KiB cannot be returned per balloon page,
            # so the pages stay mapped although the guest counts them as given away.
            return
        memory.discard(address, length)

    def _deflate(self, chain: DescriptorChain) -> None:
        self._read_pfns(chain)
        self.metrics.deflate_count += 1

    def _report_free_pages(self, chain: DescriptorChain) -> None:
        memory = self._memory()
        for descriptor in chain.writable:
            try:
                self._discard(memory, descriptor.address, descriptor.length)
                self.metrics.reported_free_bytes += descriptor.length
            except GuestMemoryError:
                self.metrics.invalid_reports += 1

    # Statistics (5.5.6.3) -------------------------------------------------------------------

    def _take_stats(self, queue: Queue) -> None:
        """Parse each new stats buffer and keep the latest one until the next poll."""
        while (chain := queue.pop()) is not None:
            if self._held_stats_head is not None:
                # A driver keeps one buffer outstanding; return an older one at once.
                queue.add_used(self._held_stats_head, 0)
                self.signal_used_queue(queue)
            self._held_stats_head = chain.head_index
            self._parse_stats(chain)

    def _parse_stats(self, chain: DescriptorChain) -> None:
        memory = self._memory()
        raw = bytearray()
        for descriptor in chain.readable:
            raw += memory.read(descriptor.address, min(descriptor.length, MAX_STATS_BYTES))
        raw = raw[:MAX_STATS_BYTES]
        if len(raw) % STAT_ENTRY.size:
            self.metrics.stats_update_fails += 1
            logger.debug("%r: stats buffer of %d bytes is not whole entries", self, len(raw))
            return
        for tag, value in STAT_ENTRY.iter_unpack(raw):
            name = STAT_NAMES.get(tag)
            if name is not None:
                self.latest_stats[name] = value
        self.metrics.stats_updates_count += 1

    def on_stats_timer(self) -> None:
        """Return the held stats buffer, which makes the driver send fresh statistics."""
        with self.lock:
            if self.stats_index is None or self._held_stats_head is None or not self.is_activated:
                return
            queue = self.queues[self.stats_index]
            head, self._held_stats_head = self._held_stats_head, None
            queue.add_used(head, 0)
            self.signal_used_queue(queue)


def _runs(sorted_pfns: list[int]) -> list[tuple[int, int]]:
    """Group sorted PFNs into (first, count) runs of consecutive frames."""
    runs: list[tuple[int, int]] = []
    for pfn in sorted_pfns:
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs
