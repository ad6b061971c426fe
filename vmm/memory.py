"""Guest physical memory: the only module that reads or writes mmap'd guest RAM.

Guest RAM is a list of anonymous mappings, each backing one contiguous range of
guest physical addresses. Every access names a guest physical address and a
length; the sum is checked for overflow and the whole range must lie inside a
single region, so a guest-supplied address can never reach host memory outside
the mappings. Multi-byte accessors are explicit about endianness (virtio and
x86 boot structures are little-endian).
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass
from typing import NewType

GuestAddress = NewType("GuestAddress", int)
HostAddress = NewType("HostAddress", int)

# MADV_DONTNEED returns the pages of a private anonymous mapping to the host;
# the next guest access sees zero-filled pages.
_MADV_DONTNEED = 4
_U64_MAX = (1 << 64) - 1

_LE16 = struct.Struct("<H")
_LE32 = struct.Struct("<I")
_LE64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """An access outside guest RAM or across two regions.

    Raised for guest-supplied addresses too: a device that catches it marks
    itself as needing reset and keeps the VM running.
    """


@dataclass
class MemoryRegion:
    """One anonymous mapping backing guest physical [guest_base, guest_base + size)."""

    guest_base: int
    size: int
    mapping: mmap.mmap
    view: memoryview

    @property
    def guest_end(self) -> int:
        return self.guest_base + self.size

    @property
    def host_address(self) -> HostAddress:
        return HostAddress(ctypes.addressof(ctypes.c_char.from_buffer(self.mapping)))


class GuestMemory:
    """Guest RAM as non-overlapping regions of anonymous, private, lazily backed memory."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        """Map one region per (guest_base, size) pair; sizes are multiples of 4 KiB."""
        self.regions: list[MemoryRegion] = []
        for base, size in sorted(ranges):
            self._check_new_range(base, size)
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.regions.append(MemoryRegion(base, size, mapping, memoryview(mapping)))

    def _check_new_range(self, base: int, size: int) -> None:
        if size <= 0 or size % mmap.PAGESIZE or base % mmap.PAGESIZE:
            raise GuestMemoryError(
                f"region at {base:#x} size {size:#x} is not page-aligned and non-empty"
            )
        if base + size - 1 > _U64_MAX:
            raise GuestMemoryError(f"region at {base:#x} size {size:#x} passes 2^64")
        for region in self.regions:
            if base < region.guest_end and region.guest_base < base + size:
                raise GuestMemoryError(
                    f"region at {base:#x} size {size:#x} overlaps the one at "
                    f"{region.guest_base:#x}"
                )

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(region.size for region in self.regions)

    @property
    def end(self) -> int:
        """First guest physical address past the highest region."""
        return max(region.guest_end for region in self.regions)

    def find_region(self, address: int, length: int) -> MemoryRegion:
        """Return the region holding [address, address + length), or raise GuestMemoryError."""
        if address < 0 or length < 0 or address + length > _U64_MAX + 1:
            raise GuestMemoryError(
                f"range at {address:#x} length {length:#x} overflows the address space"
            )
        for region in self.regions:
            if region.guest_base <= address and address + length <= region.guest_end:
                return region
        raise GuestMemoryError(f"range at {address:#x} length {length:#x} is outside guest RAM")

    def contains(self, address: int, length: int) -> bool:
        """Tell whether [address, address + length) lies inside one region."""
        try:
            self.find_region(address, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, address: int, length: int) -> memoryview:
        """Return a writable view of [address, address + length) without copying.

        The view stays valid while this object lives; callers keep it for the
        duration of one request only.
        """
        region = self.find_region(address, length)
        offset = address - region.guest_base
        return region.view[offset : offset + length]

    def read(self, address: int, length: int) -> bytes:
        return bytes(self.view(address, length))

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        self.view(address, len(data))[:] = data

    def fill(self, address: int, length: int, value: int = 0) -> None:
        self.view(address, length)[:] = bytes([value]) * length

    def read_u8(self, address: int) -> int:
        return self.view(address, 1)[0]

    def write_u8(self, address: int, value: int) -> None:
        self.view(address, 1)[0] = value

    def read_le16(self, address: int) -> int:
        return _LE16.unpack_from(self.view(address, 2))[0]

    def read_le32(self, address: int) -> int:
        return _LE32.unpack_from(self.view(address, 4))[0]

    def read_le64(self, address: int) -> int:
        return _LE64.unpack_from(self.view(address, 8))[0]

    def write_le16(self, address: int, value: int) -> None:
        _LE16.pack_into(self.view(address, 2), 0, value)

    def write_le32(self, address: int, value: int) -> None:
        _LE32.pack_into(self.view(address, 4), 0, value)

    def write_le64(self, address: int, value: int) -> None:
        _LE64.pack_into(self.view(address, 8), 0, value)

    def discard(self, address: int, length: int) -> None:
        """Return the host pages behind a page-aligned range; the guest then reads zeroes."""
        region = self.find_region(address, length)
        if address % mmap.PAGESIZE or length % mmap.PAGESIZE:
            raise GuestMemoryError(
                f"discard at {address:#x} length {length:#x} is not page-aligned"
            )
        region.mapping.madvise(_MADV_DONTNEED, address - region.guest_base, length)

    def close(self) -> None:
        for region in self.regions:
            region.view.release()
            region.mapping.close()
        self.regions = []
