"""Tests for the Intel MP Specification 1.4 table, parsed back from guest memory."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.mptable import (
    MAX_VCPUS,
    MpTableError,
    mpc_bus,
    mpc_cpu,
    mpc_intsrc,
    mpc_ioapic,
    mpc_lintsrc,
    mpc_table,
    mpf_intel,
    mptable_size,
    write_mptable,
)
from vmm.memory import GuestMemory

MEM_SIZE = 64 << 20
ENTRY_TYPES: dict[int, type[ctypes.Structure]] = {
    0: mpc_cpu, 1: mpc_bus, 2: mpc_ioapic, 3: mpc_intsrc, 4: mpc_lintsrc
}


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest = GuestMemory(layout.guest_ram_ranges(MEM_SIZE))
    yield guest
    guest.close()


def read_entries(memory: GuestMemory, table: mpc_table, address: int) -> list[ctypes.Structure]:
    """Parse the base entries after the header, in table order."""
    entries = []
    offset = address + ctypes.sizeof(mpc_table)
    for _ in range(table.oemcount):
        kind = ENTRY_TYPES[memory.read_u8(offset)]
        entries.append(kind.from_buffer_copy(memory.read(offset, ctypes.sizeof(kind))))
        offset += ctypes.sizeof(kind)
    assert offset == address + table.length
    return entries


def test_structure_sizes() -> None:
    assert ctypes.sizeof(mpf_intel) == 16
    assert ctypes.sizeof(mpc_table) == 44
    assert ctypes.sizeof(mpc_cpu) == 20
    for kind in (mpc_bus, mpc_ioapic, mpc_intsrc, mpc_lintsrc):
        assert ctypes.sizeof(kind) == 8


def test_floating_pointer(memory: GuestMemory) -> None:
    address = write_mptable(memory, 2)
    assert address == layout.MPTABLE_START
    raw = memory.read(address, 16)
    pointer = mpf_intel.from_buffer_copy(raw)
    assert pointer.signature == b"_MP_"
    assert pointer.specification == 4
    assert pointer.length == 1
    assert pointer.feature1 == 0
    assert sum(raw) % 256 == 0
    assert pointer.physptr == address + 16
    assert address % 16 == 0


def test_config_table_header(memory: GuestMemory) -> None:
    write_mptable(memory, 3)
    pointer = mpf_intel.from_buffer_copy(memory.read(layout.MPTABLE_START, 16))
    header = mpc_table.from_buffer_copy(memory.read(pointer.physptr, 44))
    assert header.signature == b"PCMP"
    assert header.spec == 4
    assert header.lapic == layout.LAPIC_ADDRESS
    assert header.length == mptable_size(3) - 16
    assert sum(memory.read(pointer.physptr, header.length)) % 256 == 0
    assert header.oem == b"PYVMM   "
    assert header.productid == b"MICROVM     "


def test_entries_for_four_vcpus(memory: GuestMemory) -> None:
    write_mptable(memory, 4)
    table_address = layout.MPTABLE_START + 16
    header = mpc_table.from_buffer_copy(memory.read(table_address, 44))
    entries = read_entries(memory, header, table_address)
    kinds = [entry.type for entry in entries]  # type: ignore[attr-defined]
    assert kinds == sorted(kinds), "entries must be in type order"

    cpus = [e for e in entries if isinstance(e, mpc_cpu)]
    assert [cpu.apicid for cpu in cpus] == [0, 1, 2, 3]
    assert [cpu.cpuflag for cpu in cpus] == [3, 1, 1, 1]

    buses = [e for e in entries if isinstance(e, mpc_bus)]
    assert [(bus.busid, bus.bustype) for bus in buses] == [(0, b"ISA   ")]

    ioapics = [e for e in entries if isinstance(e, mpc_ioapic)]
    assert len(ioapics) == 1
    assert ioapics[0].apicaddr == layout.IOAPIC_ADDRESS
    assert ioapics[0].apicid == 4
    assert ioapics[0].flags == 1


def test_io_interrupt_entries(memory: GuestMemory) -> None:
    write_mptable(memory, 1)
    table_address = layout.MPTABLE_START + 16
    header = mpc_table.from_buffer_copy(memory.read(table_address, 44))
    routes = {
        entry.srcbusirq: entry.dstirq
        for entry in read_entries(memory, header, table_address)
        if isinstance(entry, mpc_intsrc)
    }
    assert routes[0] == 2
    assert 2 not in routes
    for irq in [1, *range(3, layout.VIRTIO_IRQ_LAST + 1)]:
        assert routes[irq] == irq
    assert layout.SERIAL_COM1_IRQ in routes
    assert layout.VIRTIO_IRQ_LAST in routes


def test_local_interrupt_entries(memory: GuestMemory) -> None:
    write_mptable(memory, 1)
    table_address = layout.MPTABLE_START + 16
    header = mpc_table.from_buffer_copy(memory.read(table_address, 44))
    local = [
        (entry.irqtype, entry.destapic, entry.destapiclint)
        for entry in read_entries(memory, header, table_address)
        if isinstance(entry, mpc_lintsrc)
    ]
    assert local == [(3, 0xFF, 0), (1, 0xFF, 1)]


def test_maximum_vcpus_fit_below_acpi(memory: GuestMemory) -> None:
    write_mptable(memory, MAX_VCPUS)
    assert layout.MPTABLE_START + mptable_size(MAX_VCPUS) <= layout.ACPI_START


@pytest.mark.parametrize("count", [0, MAX_VCPUS + 1])
def test_bad_vcpu_count_rejected(memory: GuestMemory, count: int) -> None:
    with pytest.raises(MpTableError, match=f"vCPU count {count} is outside 1..254"):
        write_mptable(memory, count)
