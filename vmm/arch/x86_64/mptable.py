"""The Intel MultiProcessor Specification 1.4 table, for guest kernels without ACPI.

Layout (MP spec 1.4, chapter 4): a 16-byte floating pointer structure sits at
layout.MPTABLE_START, the start of the EBDA, where Linux scans for it. The
configuration table follows it: a "PCMP" header, then the base entries in the
order the spec requires (processors, buses, I/O APICs, I/O interrupts, local
interrupts). Structure and field names follow Linux `asm/mpspec_def.h`.
"""

from __future__ import annotations

import ctypes
from typing import Final

from vmm.arch.x86_64 import layout
from vmm.memory import GuestMemory

FLOATING_POINTER_SIGNATURE: Final = b"_MP_"
CONFIG_TABLE_SIGNATURE: Final = b"PCMP"
# Specification revision byte: 4 means version 1.4.
SPEC_REVISION: Final = 4
# Floating pointer length in 16-byte paragraphs.
FLOATING_POINTER_PARAGRAPHS: Final = 1
OEM_ID: Final = b"PYVMM   "
PRODUCT_ID: Final = b"MICROVM     "

# Base entry types (MP spec 1.4, section 4.3; Linux asm/mpspec_def.h MP_*).
ENTRY_PROCESSOR: Final = 0
ENTRY_BUS: Final = 1
ENTRY_IOAPIC: Final = 2
ENTRY_IO_INTERRUPT: Final = 3
ENTRY_LOCAL_INTERRUPT: Final = 4

CPU_ENABLED: Final = 1 << 0
CPU_BOOTSTRAP: Final = 1 << 1
IOAPIC_ENABLED: Final = 1 << 0
# Local APIC version 0x14 and I/O APIC version 0x11 are what KVM's in-kernel
# irqchip reports in its version registers.
LAPIC_VERSION: Final = 0x14
IOAPIC_VERSION: Final = 0x11
# CPU signature family 6 and feature flags FPU (bit 0) and APIC (bit 9), in the
# CPUID leaf 1 format. Linux reads the real values from CPUID, so these are
# informational.
CPU_SIGNATURE: Final = 0x600
CPU_FEATURE_FLAGS: Final = 1 << 0 | 1 << 9

INTERRUPT_INT: Final = 0
INTERRUPT_NMI: Final = 1
INTERRUPT_EXTINT: Final = 3
# Polarity and trigger "conform to the bus" (edge, active high for ISA).
INTERRUPT_FLAGS_CONFORM: Final = 0
ISA_BUS_ID: Final = 0
ISA_BUS_TYPE: Final = b"ISA   "
ALL_LOCAL_APICS: Final = 0xFF
LINT0: Final = 0
LINT1: Final = 1
# ISA IRQ 2 is the cascade from the slave 8259, and ISA IRQ 0 takes its IOAPIC pin.
ISA_CASCADE_IRQ: Final = 2
PIT_ISA_IRQ: Final = 0
PIT_IOAPIC_PIN: Final = 2
# xAPIC IDs are 8 bits with 0xFF as broadcast; the IOAPIC takes ID vcpu_count.
MAX_VCPUS: Final = 254
# The table must end before the ACPI tables, the next structure in low memory.
_MPTABLE_LIMIT: Final = layout.ACPI_START


class MpTableError(Exception):
    """An MP table that cannot be built: a vCPU count out of range or no room below 1 MiB.

    Raised before the VM starts; the caller rejects the machine configuration.
    """


class mpf_intel(ctypes.LittleEndianStructure):  # noqa: N801 - Linux's name
    """MP floating pointer structure (MP spec 1.4, section 4.1)."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("physptr", ctypes.c_uint32),
        ("length", ctypes.c_uint8),
        ("specification", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("feature1", ctypes.c_uint8),
        ("feature2", ctypes.c_uint8),
        ("feature3", ctypes.c_uint8),
        ("feature4", ctypes.c_uint8),
        ("feature5", ctypes.c_uint8),
    ]


class mpc_table(ctypes.LittleEndianStructure):  # noqa: N801 - Linux's name
    """MP configuration table header (MP spec 1.4, section 4.2)."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint16),
        ("spec", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem", ctypes.c_char * 8),
        ("productid", ctypes.c_char * 12),
        ("oemptr", ctypes.c_uint32),
        ("oemsize", ctypes.c_uint16),
        ("oemcount", ctypes.c_uint16),
        ("lapic", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class mpc_cpu(ctypes.LittleEndianStructure):  # noqa: N801 - Linux's name
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("cpuflag", ctypes.c_uint8),
        ("cpufeature", ctypes.c_uint32),
        ("featureflag", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 2),
    ]


class mpc_bus(ctypes.LittleEndianStructure):  # noqa: N801 - Linux's name
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("busid", ctypes.c_uint8),
        ("bustype", ctypes.c_char * 6),
    ]


class mpc_ioapic(ctypes.LittleEndianStructure):  # noqa: N801 - Linux's name
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("apicaddr", ctypes.c_uint32),
    ]


class mpc_intsrc(ctypes.LittleEndianStructure):  # noqa: N801 - Linux's name
    """I/O interrupt assignment entry (type 3)."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("irqtype", ctypes.c_uint8),
        ("irqflag", ctypes.c_uint16),
        ("srcbus", ctypes.c_uint8),
        ("srcbusirq", ctypes.c_uint8),
        ("dstapic", ctypes.c_uint8),
        ("dstirq", ctypes.c_uint8),
    ]


class mpc_lintsrc(ctypes.LittleEndianStructure):  # noqa: N801 - Linux's name
    """Local interrupt assignment entry (type 4)."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("irqtype", ctypes.c_uint8),
        ("irqflag", ctypes.c_uint16),
        ("srcbusid", ctypes.c_uint8),
        ("srcbusirq", ctypes.c_uint8),
        ("destapic", ctypes.c_uint8),
        ("destapiclint", ctypes.c_uint8),
    ]


def checksum(data: bytes) -> int:
    """Return the byte that makes `data` plus that byte sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def mptable_size(vcpu_count: int) -> int:
    """Return the bytes the floating pointer and configuration table take for `vcpu_count`."""
    return (
        ctypes.sizeof(mpf_intel)
        + ctypes.sizeof(mpc_table)
        + vcpu_count * ctypes.sizeof(mpc_cpu)
        + ctypes.sizeof(mpc_bus)
        + ctypes.sizeof(mpc_ioapic)
        + len(_io_interrupt_irqs()) * ctypes.sizeof(mpc_intsrc)
        + 2 * ctypes.sizeof(mpc_lintsrc)
    )


def write_mptable(memory: GuestMemory, vcpu_count: int) -> int:
    """Write the MP floating pointer and configuration table; return the pointer's address.

    Raises MpTableError when `vcpu_count` is outside 1..254 or the table would
    reach the ACPI area.
    """
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise MpTableError(
            f"vCPU count {vcpu_count} is outside 1..{MAX_VCPUS}, the range with distinct "
            f"8-bit APIC IDs below the IOAPIC's"
        )
    end = layout.MPTABLE_START + mptable_size(vcpu_count)
    if end > _MPTABLE_LIMIT:
        raise MpTableError(
            f"MP table for {vcpu_count} vCPUs needs [{layout.MPTABLE_START:#x}, {end:#x}), "
            f"past {_MPTABLE_LIMIT:#x} where the ACPI tables start"
        )

    table_address = layout.MPTABLE_START + ctypes.sizeof(mpf_intel)
    memory.write(layout.MPTABLE_START, _floating_pointer(table_address))
    memory.write(table_address, _config_table(vcpu_count))
    return layout.MPTABLE_START


def _floating_pointer(table_address: int) -> bytes:
    # feature1 = 0: a configuration table is present. feature2 bit 7 (IMCRP) = 0:
    # the system uses virtual wire mode, with no IMCR to switch.
    pointer = mpf_intel(
        signature=FLOATING_POINTER_SIGNATURE,
        physptr=table_address,
        length=FLOATING_POINTER_PARAGRAPHS,
        specification=SPEC_REVISION,
    )
    pointer.checksum = checksum(bytes(pointer))
    return bytes(pointer)


def _config_table(vcpu_count: int) -> bytes:
    ioapic_id = vcpu_count
    entries: list[ctypes.Structure] = [_cpu_entry(cpu) for cpu in range(vcpu_count)]
    entries.append(mpc_bus(ENTRY_BUS, ISA_BUS_ID, ISA_BUS_TYPE))
    entries.append(mpc_ioapic(ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED,
                              layout.IOAPIC_ADDRESS))
    entries += [_io_interrupt(irq, ioapic_id) for irq in _io_interrupt_irqs()]
    entries.append(mpc_lintsrc(ENTRY_LOCAL_INTERRUPT, INTERRUPT_EXTINT,
                               INTERRUPT_FLAGS_CONFORM, ISA_BUS_ID, 0, ALL_LOCAL_APICS, LINT0))
    entries.append(mpc_lintsrc(ENTRY_LOCAL_INTERRUPT, INTERRUPT_NMI,
                               INTERRUPT_FLAGS_CONFORM, ISA_BUS_ID, 0, ALL_LOCAL_APICS, LINT1))

    body = b"".join(bytes(entry) for entry in entries)
    header = mpc_table(
        signature=CONFIG_TABLE_SIGNATURE,
        length=ctypes.sizeof(mpc_table) + len(body),
        spec=SPEC_REVISION,
        oem=OEM_ID,
        productid=PRODUCT_ID,
        oemcount=len(entries),
        lapic=layout.LAPIC_ADDRESS,
    )
    header.checksum = checksum(bytes(header) + body)
    return bytes(header) + body


def _cpu_entry(cpu: int) -> mpc_cpu:
    flags = CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0)
    return mpc_cpu(ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags, CPU_SIGNATURE,
                   CPU_FEATURE_FLAGS)


def _io_interrupt_irqs() -> list[int]:
    """Return the ISA bus IRQs with an I/O interrupt entry: 0-15 and the virtio IRQs."""
    return [irq for irq in range(layout.VIRTIO_IRQ_LAST + 1) if irq != ISA_CASCADE_IRQ]


def _io_interrupt(irq: int, ioapic_id: int) -> mpc_intsrc:
    # NOTE: IRQ 0 goes to pin 2 as on PC hardware, matching the MADT override.
    # KVM's default GSI routing sends GSI 0 to pin 0, so the PIT reaches pin 2
    # only if the VM installs a GSI 0 -> pin 2 route.
    pin = PIT_IOAPIC_PIN if irq == PIT_ISA_IRQ else irq
    return mpc_intsrc(ENTRY_IO_INTERRUPT, INTERRUPT_INT, INTERRUPT_FLAGS_CONFORM,
                      ISA_BUS_ID, irq, ioapic_id, pin)
