"""Tests for the AML encoder and the ACPI tables, checked by hand and with `iasl -d`."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.arch.x86_64 import acpi, aml, layout
from vmm.arch.x86_64.acpi import (
    AcpiError,
    acpi_table_fadt,
    acpi_table_header,
    acpi_table_rsdp,
    write_acpi_tables,
)
from vmm.memory import GuestMemory

MEM_SIZE = 64 << 20
DEVICES = [(0xC000_1000, 0x1000, 5), (0xC000_2000, 0x1000, 6), (0xC000_3000, 0x1000, 7)]
IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(
    IASL is None, reason="iasl not installed (Debian package acpica-tools)"
)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest = GuestMemory(layout.guest_ram_ranges(MEM_SIZE))
    yield guest
    guest.close()


# AML encoder ---------------------------------------------------------------------


@pytest.mark.parametrize("value, encoded", [
    (0, "00"),
    (1, "01"),
    (2, "0a02"),
    (0xFF, "0aff"),
    (0x100, "0b0001"),
    (0xFFFF, "0bffff"),
    (0x10000, "0c00000100"),
    (0xFFFF_FFFF, "0cffffffff"),
    (0x1_0000_0000, "0e0000000001000000"),
])
def test_aml_integer_shortest_encoding(value: int, encoded: str) -> None:
    assert aml.integer(value).hex() == encoded


def test_aml_integer_out_of_range_rejected() -> None:
    with pytest.raises(aml.AmlError, match="-1 is outside"):
        aml.integer(-1)
    with pytest.raises(aml.AmlError, match="is outside"):
        aml.integer(1 << 64)


@pytest.mark.parametrize("body_length, encoded", [
    (0, "01"),
    (61, "3e"),  # total 62, the largest that fits the lead byte alone
    (62, "4004"),  # total 64 = 0x40: one follow byte
    (4093, "4fff"),  # total 4095 is the largest with one follow byte
    (4094, "810001"),  # total 4097 needs two follow bytes
    (0x100000, "c4000001"),  # total 0x100004 needs three follow bytes
])
def test_aml_pkg_length(body_length: int, encoded: str) -> None:
    assert aml.pkg_length(body_length).hex() == encoded


@given(st.integers(min_value=0, max_value=(1 << 28) - 5))
def test_aml_pkg_length_counts_itself(body_length: int) -> None:
    """ACPI 6.3 section 20.2.4: PkgLength includes its own bytes, and bits 7-6 of
    the lead byte give the number of follow bytes."""
    encoded = aml.pkg_length(body_length)
    follow = encoded[0] >> 6
    assert len(encoded) == follow + 1
    if follow == 0:
        total = encoded[0] & 0x3F
    else:
        assert encoded[0] & 0x30 == 0
        total = encoded[0] & 0x0F | int.from_bytes(encoded[1:], "little") << 4
    assert total == body_length + len(encoded)


def test_aml_pkg_length_too_large_rejected() -> None:
    with pytest.raises(aml.AmlError, match="PkgLength limit"):
        aml.pkg_length(1 << 28)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_aml_integer_decodes_back(value: int) -> None:
    encoded = aml.integer(value)
    sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    if encoded[0] in (aml.ZERO_OP, aml.ONE_OP):
        assert len(encoded) == 1
        assert encoded[0] == value
        return
    size = sizes[encoded[0]]
    assert len(encoded) == 1 + size
    assert int.from_bytes(encoded[1:], "little") == value
    assert value > 1
    assert size == 1 or value >= 1 << (8 * size // 2), "not the shortest encoding"


@pytest.mark.parametrize("path, encoded", [
    ("_HID", b"_HID"),
    ("PS2", b"PS2_"),
    ("\\_SB_.COM1", b"\\\x2e_SB_COM1"),
    ("^^ABCD", b"^^ABCD"),
    ("\\A.B.C", b"\\\x2f\x03A___B___C___"),
    ("\\", b"\\\x00"),
])
def test_aml_name_string(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["TOOLONG", "1ABC", "ab", ""])
def test_aml_bad_name_seg_rejected(bad: str) -> None:
    with pytest.raises(aml.AmlError, match="NameSeg"):
        aml.name_seg(bad)


def test_aml_eisa_id() -> None:
    assert aml.eisa_id("PNP0501") == bytes([0x0C, 0x41, 0xD0, 0x05, 0x01])
    assert aml.eisa_id("PNP0303") == bytes([0x0C, 0x41, 0xD0, 0x03, 0x03])
    with pytest.raises(aml.AmlError, match="three letters"):
        aml.eisa_id("pnp0501")


def test_aml_string_and_buffer() -> None:
    assert aml.string_literal("AB") == b"\x0dAB\x00"
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    with pytest.raises(aml.AmlError, match="ASCII without NUL"):
        aml.string_literal("a\x00b")


def test_aml_package_and_method() -> None:
    assert aml.package([aml.integer(0), aml.integer(5)]) == b"\x12\x05\x02\x00\x0a\x05"
    method = aml.method("_STA", 0, [aml.return_value(aml.integer(0x0F))])
    assert method == b"\x14\x09_STA\x00\xa4\x0a\x0f"


def test_aml_resource_template_end_tag_checksum() -> None:
    template = aml.resource_template([aml.irq_no_flags([4])])
    data = template[4:]  # after BufferOp, PkgLength, BytePrefix and the size byte
    assert template[:4] == b"\x11\x08\x0a\x05"
    assert data[-2] == 0x79
    assert sum(data) % 256 == 0


def test_aml_resource_descriptors() -> None:
    assert aml.io_port(0x3F8, 0x3F8, 8, 8) == bytes.fromhex("4701f803f8030808")
    assert aml.irq_no_flags([1, 4]) == bytes.fromhex("221200")
    memory32 = aml.memory32_fixed(0xC0001000, 0x1000)
    assert memory32 == bytes.fromhex("86090001" "001000c0" "00100000")
    interrupt = aml.extended_interrupt([5], aml.INTERRUPT_CONSUMER | aml.INTERRUPT_EDGE)
    assert interrupt == bytes.fromhex("89060003" "01" "05000000")
    with pytest.raises(aml.AmlError, match="IRQ 16 is outside ISA IRQs"):
        aml.irq_no_flags([16])


# tables --------------------------------------------------------------------------


def read_table(memory: GuestMemory, address: int) -> bytes:
    header = acpi_table_header.from_buffer_copy(memory.read(address, 36))
    return memory.read(address, header.length)


def table_addresses(memory: GuestMemory) -> dict[bytes, int]:
    """Follow RSDP -> XSDT -> FADT -> DSDT and return each table's address by signature."""
    rsdp = acpi_table_rsdp.from_buffer_copy(memory.read(layout.ACPI_START, 36))
    xsdt = read_table(memory, rsdp.xsdt_physical_address)
    addresses = {b"XSDT": rsdp.xsdt_physical_address}
    for offset in range(36, len(xsdt), 8):
        address = int.from_bytes(xsdt[offset : offset + 8], "little")
        addresses[memory.read(address, 4)] = address
    fadt = acpi_table_fadt.from_buffer_copy(read_table(memory, addresses[b"FACP"]))
    addresses[b"DSDT"] = fadt.Xdsdt
    return addresses


def test_rsdp_checksums_and_fields(memory: GuestMemory) -> None:
    address = write_acpi_tables(memory, 2, DEVICES)
    assert address == layout.ACPI_START
    raw = memory.read(address, ctypes.sizeof(acpi_table_rsdp))
    rsdp = acpi_table_rsdp.from_buffer_copy(raw)
    assert rsdp.signature == b"RSD PTR "
    assert rsdp.revision == 2
    assert rsdp.length == 36
    assert rsdp.oem_id == b"PYVMM "
    assert sum(raw[:20]) % 256 == 0
    assert sum(raw) % 256 == 0


def test_every_table_checksum_and_length(memory: GuestMemory) -> None:
    write_acpi_tables(memory, 4, DEVICES)
    addresses = table_addresses(memory)
    assert set(addresses) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    for signature, address in addresses.items():
        table = read_table(memory, address)
        header = acpi_table_header.from_buffer_copy(table)
        assert header.signature == signature
        assert header.length == len(table)
        assert sum(table) % 256 == 0, f"{signature!r} checksum"
        assert header.oem_id == b"PYVMM "
        assert header.oem_table_id == b"MICROVM "
        assert address % 16 == 0
        assert layout.ACPI_START <= address
        assert address + header.length <= layout.ACPI_END


def test_fadt_flags_and_dsdt_pointers(memory: GuestMemory) -> None:
    write_acpi_tables(memory, 1, [])
    addresses = table_addresses(memory)
    fadt = acpi_table_fadt.from_buffer_copy(read_table(memory, addresses[b"FACP"]))
    assert ctypes.sizeof(acpi_table_fadt) == 276
    assert fadt.header.length == 276
    assert fadt.flags & acpi.FADT_HW_REDUCED_ACPI
    assert fadt.boot_flags == acpi.FADT_BOOT_8042 | acpi.FADT_BOOT_NO_VGA
    assert fadt.dsdt == fadt.Xdsdt
    assert memory.read(fadt.Xdsdt, 4) == b"DSDT"


def test_madt_entries(memory: GuestMemory) -> None:
    madt = acpi.build_madt(3)
    entries = []
    offset = 44
    while offset < len(madt):
        entries.append(madt[offset : offset + madt[offset + 1]])
        offset += madt[offset + 1]
    local_apics = [entry for entry in entries if entry[0] == 0]
    assert [(entry[2], entry[3], entry[4]) for entry in local_apics] == [
        (0, 0, 1), (1, 1, 1), (2, 2, 1)
    ]
    ioapic = acpi.acpi_madt_io_apic.from_buffer_copy([e for e in entries if e[0] == 1][0])
    assert ioapic.address == layout.IOAPIC_ADDRESS
    assert ioapic.global_irq_base == 0
    assert ioapic.id == 3
    override = acpi.acpi_madt_interrupt_override.from_buffer_copy(
        [e for e in entries if e[0] == 2][0]
    )
    assert (override.bus, override.source_irq, override.global_irq) == (0, 0, 2)
    nmi = acpi.acpi_madt_local_apic_nmi.from_buffer_copy([e for e in entries if e[0] == 4][0])
    assert nmi.lint == 1
    assert nmi.processor_id == 0xFF


@pytest.mark.parametrize("count", [0, 255])
def test_madt_bad_vcpu_count_rejected(memory: GuestMemory, count: int) -> None:
    with pytest.raises(AcpiError, match=f"vCPU count {count} is outside 1..254"):
        write_acpi_tables(memory, count, [])


def test_tables_overflowing_area_rejected(memory: GuestMemory) -> None:
    many = [(0xC000_1000 + i * 0x1000, 0x1000, 5) for i in range(4000)]
    with pytest.raises(AcpiError, match="but the area ends at 0x100000"):
        write_acpi_tables(memory, 1, many)


def test_dsdt_lists_virtio_devices() -> None:
    dsdt = acpi.build_dsdt(DEVICES)
    assert dsdt.count(b"LNRO0005\x00") == 3
    for name in (b"V000", b"V001", b"V002", b"COM1", b"PS2_"):
        assert name in dsdt


# iasl disassembly ----------------------------------------------------------------


def disassemble(tmp_path: Path, name: str, table: bytes) -> str:
    """Run `iasl -d` on `table` and return the .dsl text, failing on any reported problem.

    The disassembler exits 0 even for broken tables: it writes its complaints
    ("**** Incorrect checksum", "Invalid zero length subtable") into the .dsl.
    """
    assert IASL is not None
    binary = tmp_path / f"{name}.dat"
    binary.write_bytes(table)
    result = subprocess.run(
        [IASL, "-d", str(binary)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Error" not in output, output
    text = (tmp_path / f"{name}.dsl").read_text()
    assert "****" not in text, text
    assert "Invalid" not in text, text
    return text


@needs_iasl
def test_iasl_dsdt_devices_and_resources(tmp_path: Path) -> None:
    text = disassemble(tmp_path, "dsdt", acpi.build_dsdt(DEVICES))
    assert text.count("ResourceTemplate ()") == 2 + len(DEVICES)
    assert 'EisaId ("PNP0501")' in text
    assert 'EisaId ("PNP0303")' in text
    assert text.count('Name (_HID, "LNRO0005")') == 3
    assert "0x03F8" in text
    assert "IRQNoFlags ()\n                    {4}" in text
    assert "IRQNoFlags ()\n                    {1}" in text
    assert "0x0060" in text
    assert "0x0064" in text
    for base, _size, irq in DEVICES:
        assert f"0x{base:08X},         // Address Base" in text
        assert f"0x{irq:08X}," in text
    assert text.count("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive") == 3


@needs_iasl
def test_iasl_method_round_trip(tmp_path: Path) -> None:
    body = aml.scope("\\_SB_", [aml.device("DEV0", [
        aml.name("_HID", aml.string_literal("ABCD0001")),
        aml.name("PKG0", aml.package([aml.integer(1), aml.integer(0x1234)])),
        aml.method("_STA", 0, [aml.return_value(aml.integer(0x0F))]),
    ])])
    table = acpi._finish_table(b"DSDT", acpi.DSDT_REVISION, body)
    text = disassemble(tmp_path, "method", table)
    assert "Method (_STA, 0, NotSerialized)" in text
    assert "Return (0x0F)" in text
    assert "0x1234" in text


@needs_iasl
def test_iasl_madt_fields(tmp_path: Path) -> None:
    text = disassemble(tmp_path, "apic", acpi.build_madt(2))
    assert text.count("[Processor Local APIC]") == 2
    assert "Local Apic Address : FEE00000" in text
    assert "Address : FEC00000" in text
    assert "[Interrupt Source Override]" in text
    assert "Interrupt Input LINT : 01" in text


@needs_iasl
def test_iasl_fadt_fields(tmp_path: Path) -> None:
    text = disassemble(tmp_path, "facp", acpi.build_fadt(0xE0200))
    assert "Hardware Reduced (V5) : 1" in text
    assert "8042 Present on ports 60/64 (V2) : 1" in text
    assert "VGA Not Present (V4) : 1" in text
    assert text.count("DSDT Address : ") == 2
    assert "DSDT Address : 00000000000E0200" in text
