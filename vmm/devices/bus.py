"""Port-I/O and MMIO buses: route a vCPU's access to the device that owns the address."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Protocol


class BusDevice(Protocol):
    """A device on a bus. Offsets are relative to the device's base address.

    `read` fills `data` (its length is the access width); `write` consumes it.
    Both run on a vCPU thread, so a device shared with another thread locks
    its own state.
    """

    def read(self, offset: int, data: bytearray) -> None: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(Exception):
    """A device range that overlaps another or is empty."""


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: BusDevice

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Sorted, non-overlapping address ranges, each owned by one device."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._lock = threading.Lock()

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        if length <= 0:
            raise BusError(f"{self.name} range at {base:#x} has length {length}")
        with self._lock:
            for existing in self._ranges:
                if base < existing.end and existing.base < base + length:
                    raise BusError(
                        f"{self.name} range {base:#x}+{length:#x} overlaps "
                        f"{existing.base:#x}+{existing.length:#x}"
                    )
            index = bisect.bisect(self._bases, base)
            self._ranges.insert(index, BusRange(base, length, device))
            self._bases.insert(index, base)

    def find(self, address: int) -> BusRange | None:
        index = bisect.bisect(self._bases, address) - 1
        if index < 0:
            return None
        entry = self._ranges[index]
        return entry if address < entry.end else None

    def read(self, address: int, data: bytearray) -> bool:
        """Fill `data` from the device at `address`; return False when no device owns it."""
        entry = self.find(address)
        if entry is None:
            return False
        entry.device.read(address - entry.base, data)
        return True

    def write(self, address: int, data: bytes) -> bool:
        """Hand `data` to the device at `address`; return False when no device owns it."""
        entry = self.find(address)
        if entry is None:
            return False
        entry.device.write(address - entry.base, data)
        return True
