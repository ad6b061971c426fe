"""Inflating the balloon gives guest pages back to the host: the process RSS really drops."""

from __future__ import annotations

import struct

from tests.unit.test_virtio_balloon import BalloonDevice
from vmm.memory import GuestMemory

MIB = 1 << 20
PAGE = 4096
GUEST_RAM = 64 * MIB
# Pages the guest hands over: 32 MiB from 16 MiB up, far from the test's queue rings.
INFLATED_BASE = 16 * MIB
INFLATED_SIZE = 32 * MIB
# One inflate buffer holds this many page frame numbers (4 bytes each): 16 KiB per buffer.
PFNS_PER_BUFFER = 4096


def mapping_rss_kib(memory: GuestMemory) -> int:
    """Return the resident KiB of the guest RAM mapping, read from /proc/self/smaps."""
    start = memory.regions[0].host_address
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                low = int(fields[0].split("-")[0], 16)
                inside = low == start
            elif inside and fields[0] == "Rss:":
                return int(fields[1])
    raise AssertionError(f"no mapping at {start:#x} in /proc/self/smaps")


def test_inflate_returns_memory_to_host() -> None:
    memory = GuestMemory([(0, GUEST_RAM)])
    try:
        balloon = BalloonDevice(memory)
        memory.fill(INFLATED_BASE, INFLATED_SIZE, 0x5A)
        resident_before = mapping_rss_kib(memory)

        inflate = balloon.queues[0]
        first_pfn = INFLATED_BASE // PAGE
        pfn_count = INFLATED_SIZE // PAGE
        for offset in range(0, pfn_count, PFNS_PER_BUFFER):
            pfns = range(first_pfn + offset, first_pfn + offset + PFNS_PER_BUFFER)
            data = struct.pack(f"<{PFNS_PER_BUFFER}I", *pfns)
            inflate.add_chain([inflate.buffer(data)])
            balloon.transport.notify(0)
        resident_after = mapping_rss_kib(memory)

        assert balloon.device.metrics.discarded_pages == pfn_count
        # Allow 1% for pages the kernel accounts differently (the queue rings, huge pages).
        assert resident_before - resident_after >= INFLATED_SIZE // 1024 * 99 // 100
        assert memory.read(INFLATED_BASE, PAGE) == bytes(PAGE)
    finally:
        memory.close()
