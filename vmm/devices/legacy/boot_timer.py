"""The boot-timer device: the guest's init writes one magic byte when boot is done.

A one-byte write of BOOT_COMPLETE_MAGIC at offset 0 of the page at
layout.BOOT_TIMER_ADDRESS records the wall-clock and process CPU time since
the clock started (InstanceStart). The first such write after each start is
logged as `Guest-boot-time = N us N ms, N CPU us N CPU ms`; later ones are
ignored until `start_clock`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Final

from vmm.arch.x86_64 import layout

logger = logging.getLogger(__name__)

BOOT_COMPLETE_OFFSET: Final = 0
BOOT_COMPLETE_MAGIC: Final = 123
DEVICE_ADDRESS: Final = layout.BOOT_TIMER_ADDRESS
DEVICE_SIZE: Final = layout.BOOT_TIMER_SIZE


class BootTimer:
    """MMIO device that measures the guest's boot time; reads return 0.

    `start_wall` is a time.monotonic() value and `start_cpu` a
    time.process_time() value, both in seconds; by default the clock starts now.
    After the guest's write, `boot_wall_us` and `boot_cpu_us` hold the figures.
    """

    def __init__(self, start_wall: float | None = None, start_cpu: float | None = None) -> None:
        self._lock = threading.Lock()
        self.start_clock(start_wall, start_cpu)

    def start_clock(self, start_wall: float | None = None, start_cpu: float | None = None) -> None:
        """Start measuring from the given instants (default: now) and forget earlier figures."""
        with self._lock:
            self.start_wall = time.monotonic() if start_wall is None else start_wall
            self.start_cpu = time.process_time() if start_cpu is None else start_cpu
            self.boot_wall_us: int | None = None
            self.boot_cpu_us: int | None = None

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        """Record the boot time on a one-byte write of BOOT_COMPLETE_MAGIC at offset 0."""
        if offset != BOOT_COMPLETE_OFFSET or bytes(data) != bytes([BOOT_COMPLETE_MAGIC]):
            return
        wall_us = int((time.monotonic() - self.start_wall) * 1_000_000)
        cpu_us = int((time.process_time() - self.start_cpu) * 1_000_000)
        with self._lock:
            if self.boot_wall_us is not None:
                return
            self.boot_wall_us = wall_us
            self.boot_cpu_us = cpu_us
        logger.info(
            "Guest-boot-time = %d us %d ms, %d CPU us %d CPU ms",
            wall_us, wall_us // 1000, cpu_us, cpu_us // 1000,
        )
