"""ACPI tables for an x86-64 microVM: RSDP, XSDT, FADT, MADT and DSDT.

The guest is a hardware-reduced ACPI platform (ACPI 6.3, "Hardware-Reduced
ACPI"), with no PM timer, no SCI and no fixed-feature registers. So the FADT
carries little beyond boot flags and the DSDT pointer. The MADT describes the
local APICs and the one IOAPIC. The DSDT lists COM1, the i8042 and each
virtio-mmio device, so Linux finds them without command-line hints. Structures mirror Linux
`include/acpi/actbl.h` and `actbl2.h` under the same field names.

All tables go into [layout.ACPI_START, layout.ACPI_END), the BIOS read-only
area where Linux scans for the RSDP on 16-byte boundaries.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Final

from vmm.arch.x86_64 import aml, layout
from vmm.memory import GuestMemory

OEM_ID: Final = b"PYVMM "
OEM_TABLE_ID: Final = b"MICROVM "
OEM_REVISION: Final = 1
CREATOR_ID: Final = b"PYVM"
CREATOR_REVISION: Final = 1

RSDP_SIGNATURE: Final = b"RSD PTR "
# RSDP revision 2 means ACPI 2.0 or later, with the XSDT address and extended checksum.
RSDP_REVISION: Final = 2
# The ACPI 1.0 checksum covers the first 20 bytes of the RSDP.
RSDP_V1_LENGTH: Final = 20
# Revisions of the tables as defined in ACPI 6.3.
XSDT_REVISION: Final = 1
FADT_REVISION: Final = 6
FADT_MINOR_REVISION: Final = 3
MADT_REVISION: Final = 5
# DSDT revision 2 or later makes AML integers 64 bits wide.
DSDT_REVISION: Final = 2

# FADT IA-PC Boot Architecture Flags (ACPI 6.3, FADT).
FADT_BOOT_8042: Final = 1 << 1
FADT_BOOT_NO_VGA: Final = 1 << 2
# FADT Fixed Feature Flags (ACPI 6.3, FADT).
FADT_HW_REDUCED_ACPI: Final = 1 << 20

# MADT (ACPI 6.3, "Multiple APIC Description Table").
MADT_PCAT_COMPAT: Final = 1 << 0
MADT_TYPE_LOCAL_APIC: Final = 0
MADT_TYPE_IO_APIC: Final = 1
MADT_TYPE_INTERRUPT_OVERRIDE: Final = 2
MADT_TYPE_LOCAL_APIC_NMI: Final = 4
MADT_LAPIC_ENABLED: Final = 1 << 0
# An NMI entry with processor UID 0xFF applies to every processor.
MADT_ALL_PROCESSORS: Final = 0xFF
# MPS INTI flags 0: polarity and trigger mode conform to the bus.
MADT_INTI_CONFORMS: Final = 0
ISA_BUS: Final = 0
# ISA IRQ 0 (the PIT) is wired to IOAPIC pin 2, as on PC hardware.
# NOTE: KVM's default GSI routing sends GSI 0 to IOAPIC pin 0, so this override
# holds only if the VM installs a GSI 0 -> pin 2 route. Linux in hardware-reduced
# ACPI mode sets up no PIT timer interrupt, which keeps the mismatch harmless there.
PIT_ISA_IRQ: Final = 0
PIT_GSI: Final = 2
LINT1: Final = 1

# xAPIC IDs are 8 bits and 0xFF is the broadcast ID; the IOAPIC takes ID
# vcpu_count, so at most 254 vCPUs have distinct IDs below it.
MAX_VCPUS: Final = 254
# Tables start 16-byte aligned, as the RSDP scan requires for the first.
_TABLE_ALIGN: Final = 16
_VIRTIO_INTERRUPT_FLAGS: Final = aml.INTERRUPT_CONSUMER | aml.INTERRUPT_EDGE


class AcpiError(Exception):
    """An ACPI table set that cannot be built, such as too many vCPUs or devices.

    Raised before the VM starts; the caller rejects the machine configuration.
    """


class acpi_table_header(ctypes.LittleEndianStructure):  # noqa: N801 - ACPICA's name
    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint32),
        ("revision", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem_id", ctypes.c_char * 6),
        ("oem_table_id", ctypes.c_char * 8),
        ("oem_revision", ctypes.c_uint32),
        ("asl_compiler_id", ctypes.c_char * 4),
        ("asl_compiler_revision", ctypes.c_uint32),
    ]


class acpi_table_rsdp(ctypes.LittleEndianStructure):  # noqa: N801 - ACPICA's name
    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 8),
        ("checksum", ctypes.c_uint8),
        ("oem_id", ctypes.c_char * 6),
        ("revision", ctypes.c_uint8),
        ("rsdt_physical_address", ctypes.c_uint32),
        ("length", ctypes.c_uint32),
        ("xsdt_physical_address", ctypes.c_uint64),
        ("extended_checksum", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
    ]


class acpi_generic_address(ctypes.LittleEndianStructure):  # noqa: N801 - ACPICA's name
    _pack_ = 1
    _fields_ = [
        ("space_id", ctypes.c_uint8),
        ("bit_width", ctypes.c_uint8),
        ("bit_offset", ctypes.c_uint8),
        ("access_width", ctypes.c_uint8),
        ("address", ctypes.c_uint64),
    ]


class acpi_table_fadt(ctypes.LittleEndianStructure):  # noqa: N801 - ACPICA's name
    _pack_ = 1
    _fields_ = [
        ("header", acpi_table_header),
        ("facs", ctypes.c_uint32),
        ("dsdt", ctypes.c_uint32),
        ("model", ctypes.c_uint8),
        ("preferred_profile", ctypes.c_uint8),
        ("sci_interrupt", ctypes.c_uint16),
        ("smi_command", ctypes.c_uint32),
        ("acpi_enable", ctypes.c_uint8),
        ("acpi_disable", ctypes.c_uint8),
        ("s4_bios_request", ctypes.c_uint8),
        ("pstate_control", ctypes.c_uint8),
        ("pm1a_event_block", ctypes.c_uint32),
        ("pm1b_event_block", ctypes.c_uint32),
        ("pm1a_control_block", ctypes.c_uint32),
        ("pm1b_control_block", ctypes.c_uint32),
        ("pm2_control_block", ctypes.c_uint32),
        ("pm_timer_block", ctypes.c_uint32),
        ("gpe0_block", ctypes.c_uint32),
        ("gpe1_block", ctypes.c_uint32),
        ("pm1_event_length", ctypes.c_uint8),
        ("pm1_control_length", ctypes.c_uint8),
        ("pm2_control_length", ctypes.c_uint8),
        ("pm_timer_length", ctypes.c_uint8),
        ("gpe0_block_length", ctypes.c_uint8),
        ("gpe1_block_length", ctypes.c_uint8),
        ("gpe1_base", ctypes.c_uint8),
        ("cst_control", ctypes.c_uint8),
        ("c2_latency", ctypes.c_uint16),
        ("c3_latency", ctypes.c_uint16),
        ("flush_size", ctypes.c_uint16),
        ("flush_stride", ctypes.c_uint16),
        ("duty_offset", ctypes.c_uint8),
        ("duty_width", ctypes.c_uint8),
        ("day_alarm", ctypes.c_uint8),
        ("month_alarm", ctypes.c_uint8),
        ("century", ctypes.c_uint8),
        ("boot_flags", ctypes.c_uint16),
        ("reserved", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
        ("reset_register", acpi_generic_address),
        ("reset_value", ctypes.c_uint8),
        ("arm_boot_flags", ctypes.c_uint16),
        ("minor_revision", ctypes.c_uint8),
        ("Xfacs", ctypes.c_uint64),
        ("Xdsdt", ctypes.c_uint64),
        ("xpm1a_event_block", acpi_generic_address),
        ("xpm1b_event_block", acpi_generic_address),
        ("xpm1a_control_block", acpi_generic_address),
        ("xpm1b_control_block", acpi_generic_address),
        ("xpm2_control_block", acpi_generic_address),
        ("xpm_timer_block", acpi_generic_address),
        ("xgpe0_block", acpi_generic_address),
        ("xgpe1_block", acpi_generic_address),
        ("sleep_control", acpi_generic_address),
        ("sleep_status", acpi_generic_address),
        ("hypervisor_id", ctypes.c_uint64),
    ]


class acpi_table_madt(ctypes.LittleEndianStructure):  # noqa: N801 - ACPICA's name
    _pack_ = 1
    _fields_ = [
        ("header", acpi_table_header),
        ("address", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class acpi_madt_local_apic(ctypes.LittleEndianStructure):  # noqa: N801 - ACPICA's name
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("processor_id", ctypes.c_uint8),
        ("id", ctypes.c_uint8),
        ("lapic_flags", ctypes.c_uint32),
    ]


class acpi_madt_io_apic(ctypes.LittleEndianStructure):  # noqa: N801 - ACPICA's name
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("id", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
        ("address", ctypes.c_uint32),
        ("global_irq_base", ctypes.c_uint32),
    ]


class acpi_madt_interrupt_override(ctypes.LittleEndianStructure):  # noqa: N801
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("bus", ctypes.c_uint8),
        ("source_irq", ctypes.c_uint8),
        ("global_irq", ctypes.c_uint32),
        ("inti_flags", ctypes.c_uint16),
    ]


class acpi_madt_local_apic_nmi(ctypes.LittleEndianStructure):  # noqa: N801
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("processor_id", ctypes.c_uint8),
        ("inti_flags", ctypes.c_uint16),
        ("lint", ctypes.c_uint8),
    ]


# checksums and headers -----------------------------------------------------------


def checksum(data: bytes) -> int:
    """Return the byte that makes `data` plus that byte sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def _finish_table(
    signature: bytes, revision: int, body: bytes, oem_table_id: bytes = OEM_TABLE_ID
) -> bytes:
    """Prefix `body` with a table header and set the length and checksum."""
    header = acpi_table_header(
        signature=signature,
        length=ctypes.sizeof(acpi_table_header) + len(body),
        revision=revision,
        oem_id=OEM_ID,
        oem_table_id=oem_table_id,
        oem_revision=OEM_REVISION,
        asl_compiler_id=CREATOR_ID,
        asl_compiler_revision=CREATOR_REVISION,
    )
    table = bytearray(bytes(header) + body)
    table[acpi_table_header.checksum.offset] = checksum(bytes(table))
    return bytes(table)


def _without_header(structure: ctypes.Structure) -> bytes:
    return bytes(structure)[ctypes.sizeof(acpi_table_header):]


# tables --------------------------------------------------------------------------


def build_rsdp(xsdt_address: int) -> bytes:
    """Build an ACPI 2.0+ RSDP that points at the XSDT and has no RSDT."""
    rsdp = acpi_table_rsdp(
        signature=RSDP_SIGNATURE,
        oem_id=OEM_ID,
        revision=RSDP_REVISION,
        length=ctypes.sizeof(acpi_table_rsdp),
        xsdt_physical_address=xsdt_address,
    )
    rsdp.checksum = checksum(bytes(rsdp)[:RSDP_V1_LENGTH])
    rsdp.extended_checksum = checksum(bytes(rsdp))
    return bytes(rsdp)


def build_xsdt(table_addresses: Sequence[int]) -> bytes:
    body = b"".join(address.to_bytes(8, "little") for address in table_addresses)
    return _finish_table(b"XSDT", XSDT_REVISION, body)


def build_fadt(dsdt_address: int) -> bytes:
    """Build a hardware-reduced FADT pointing at the DSDT through DSDT and X_DSDT."""
    fadt = acpi_table_fadt(
        dsdt=dsdt_address,
        Xdsdt=dsdt_address,
        boot_flags=FADT_BOOT_8042 | FADT_BOOT_NO_VGA,
        flags=FADT_HW_REDUCED_ACPI,
        minor_revision=FADT_MINOR_REVISION,
    )
    return _finish_table(b"FACP", FADT_REVISION, _without_header(fadt))


def build_madt(vcpu_count: int) -> bytes:
    """Build a MADT: one enabled local APIC per vCPU (APIC ID = index), the IOAPIC
    at GSI base 0, the IRQ0 -> GSI 2 override and an NMI on LINT1 of every CPU."""
    _check_vcpu_count(vcpu_count)
    entries = [
        acpi_madt_local_apic(MADT_TYPE_LOCAL_APIC, ctypes.sizeof(acpi_madt_local_apic),
                             cpu, cpu, MADT_LAPIC_ENABLED)
        for cpu in range(vcpu_count)
    ]
    entries.append(acpi_madt_io_apic(
        MADT_TYPE_IO_APIC, ctypes.sizeof(acpi_madt_io_apic), vcpu_count, 0,
        layout.IOAPIC_ADDRESS, 0,
    ))
    entries.append(acpi_madt_interrupt_override(
        MADT_TYPE_INTERRUPT_OVERRIDE, ctypes.sizeof(acpi_madt_interrupt_override),
        ISA_BUS, PIT_ISA_IRQ, PIT_GSI, MADT_INTI_CONFORMS,
    ))
    entries.append(acpi_madt_local_apic_nmi(
        MADT_TYPE_LOCAL_APIC_NMI, ctypes.sizeof(acpi_madt_local_apic_nmi),
        MADT_ALL_PROCESSORS, MADT_INTI_CONFORMS, LINT1,
    ))
    # KVM's in-kernel irqchip includes the dual 8259 PICs, so PCAT_COMPAT is true.
    madt = acpi_table_madt(address=layout.LAPIC_ADDRESS, flags=MADT_PCAT_COMPAT)
    body = _without_header(madt) + b"".join(bytes(entry) for entry in entries)
    return _finish_table(b"APIC", MADT_REVISION, body)


def _check_vcpu_count(vcpu_count: int) -> None:
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise AcpiError(
            f"vCPU count {vcpu_count} is outside 1..{MAX_VCPUS}, the range with distinct "
            f"8-bit APIC IDs below the IOAPIC's"
        )


# DSDT ----------------------------------------------------------------------------


def build_dsdt(devices: Sequence[tuple[int, int, int]]) -> bytes:
    """Build a DSDT listing COM1, the i8042 and each (mmio_base, size, irq) device."""
    terms = [_com1_device(), _i8042_device()]
    terms += [_virtio_device(index, *device) for index, device in enumerate(devices)]
    return _finish_table(b"DSDT", DSDT_REVISION, aml.scope("\\_SB_", terms))


def _com1_device() -> bytes:
    resources = aml.resource_template([
        aml.io_port(layout.SERIAL_COM1_PORT, layout.SERIAL_COM1_PORT,
                    layout.SERIAL_PORT_COUNT, layout.SERIAL_PORT_COUNT),
        aml.irq_no_flags([layout.SERIAL_COM1_IRQ]),
    ])
    return aml.device("COM1", [
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", resources),
    ])


def _i8042_device() -> bytes:
    resources = aml.resource_template([
        aml.io_port(layout.I8042_DATA_PORT, layout.I8042_DATA_PORT, 1, 1),
        aml.io_port(layout.I8042_COMMAND_PORT, layout.I8042_COMMAND_PORT, 1, 1),
        aml.irq_no_flags([layout.I8042_IRQ]),
    ])
    return aml.device("PS2_", [
        aml.name("_HID", aml.eisa_id("PNP0303")),
        aml.name("_CRS", resources),
    ])


def _virtio_device(index: int, mmio_base: int, size: int, irq: int) -> bytes:
    """Describe one virtio-mmio device as LNRO0005, the ID Linux's virtio_mmio matches."""
    if index > 0xFFF:
        raise AcpiError(f"virtio device {index} has no 4-hex-digit ACPI name VXXX")
    resources = aml.resource_template([
        aml.memory32_fixed(mmio_base, size),
        aml.extended_interrupt([irq], _VIRTIO_INTERRUPT_FLAGS),
    ])
    return aml.device(f"V{index:03X}", [
        aml.name("_HID", aml.string_literal("LNRO0005")),
        aml.name("_UID", aml.integer(index)),
        aml.name("_CRS", resources),
    ])


# placement -----------------------------------------------------------------------


def write_acpi_tables(
    memory: GuestMemory, vcpu_count: int, devices: Sequence[tuple[int, int, int]]
) -> int:
    """Write RSDP, XSDT, FADT, MADT and DSDT from layout.ACPI_START; return the RSDP address.

    `devices` are the virtio-mmio devices as (mmio_base, size, irq). Raises
    AcpiError when the tables do not fit below layout.ACPI_END or the vCPU count
    is out of range.
    """
    dsdt = build_dsdt(devices)
    madt = build_madt(vcpu_count)
    rsdp_address = layout.ACPI_START
    xsdt_address = _align(rsdp_address + ctypes.sizeof(acpi_table_rsdp))
    xsdt_size = ctypes.sizeof(acpi_table_header) + 2 * 8
    fadt_address = _align(xsdt_address + xsdt_size)
    madt_address = _align(fadt_address + ctypes.sizeof(acpi_table_fadt))
    dsdt_address = _align(madt_address + len(madt))
    end = dsdt_address + len(dsdt)
    if end > layout.ACPI_END:
        raise AcpiError(
            f"ACPI tables need [{layout.ACPI_START:#x}, {end:#x}) but the area ends at "
            f"{layout.ACPI_END:#x}; use fewer vCPUs or devices"
        )

    memory.write(rsdp_address, build_rsdp(xsdt_address))
    memory.write(xsdt_address, build_xsdt([fadt_address, madt_address]))
    memory.write(fadt_address, build_fadt(dsdt_address))
    memory.write(madt_address, madt)
    memory.write(dsdt_address, dsdt)
    return rsdp_address


def _align(address: int) -> int:
    return (address + _TABLE_ALIGN - 1) & ~(_TABLE_ALIGN - 1)
