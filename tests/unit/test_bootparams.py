"""Tests for the zero page layout, e820 map, command line and setup_data chain."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.bootparams import (
    BootParamsError,
    E820Type,
    SetupDataEntry,
    boot_e820_entry,
    boot_params,
    build_e820,
    rng_seed_entry,
    setup_data,
    setup_header,
    write_cmdline,
    write_setup_data,
    write_zero_page,
)
from vmm.arch.x86_64.loader import KernelImage, KernelKind
from vmm.memory import GuestMemory

MEM_SIZE = 64 << 20
GIB = 1 << 30


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest = GuestMemory(layout.guest_ram_ranges(MEM_SIZE))
    yield guest
    guest.close()


def elf_image() -> KernelImage:
    return KernelImage(0x1000000, 0x1000000, 0x1800000, KernelKind.ELF, None)


def bzimage_header(cmdline_size: int = 2047) -> bytes:
    header = bytearray(0x26C - 0x1F1)
    struct.pack_into("<H", header, 0x206 - 0x1F1, 0x020F)
    header[0x211 - 0x1F1] = 0x01
    struct.pack_into("<I", header, 0x238 - 0x1F1, cmdline_size)
    struct.pack_into("<I", header, 0x260 - 0x1F1, 0x123000)
    return bytes(header)


# structure layout (zero-page.rst, boot.rst) --------------------------------------


@pytest.mark.parametrize("name, offset", [
    ("acpi_rsdp_addr", 0x070),
    ("ext_ramdisk_image", 0x0C0),
    ("ext_ramdisk_size", 0x0C4),
    ("ext_cmd_line_ptr", 0x0C8),
    ("cc_blob_address", 0x13C),
    ("efi_info", 0x1C0),
    ("e820_entries", 0x1E8),
    ("sentinel", 0x1EF),
    ("hdr", 0x1F1),
    ("edd_mbr_sig_buffer", 0x290),
    ("e820_table", 0x2D0),
    ("eddbuf", 0xD00),
])
def test_boot_params_offsets(name: str, offset: int) -> None:
    assert getattr(boot_params, name).offset == offset


@pytest.mark.parametrize("name, offset", [
    ("boot_flag", 0x1FE),
    ("header", 0x202),
    ("version", 0x206),
    ("type_of_loader", 0x210),
    ("loadflags", 0x211),
    ("ramdisk_image", 0x218),
    ("cmd_line_ptr", 0x228),
    ("initrd_addr_max", 0x22C),
    ("xloadflags", 0x236),
    ("cmdline_size", 0x238),
    ("setup_data", 0x250),
    ("pref_address", 0x258),
    ("init_size", 0x260),
    ("kernel_info_offset", 0x268),
])
def test_setup_header_offsets(name: str, offset: int) -> None:
    assert 0x1F1 + getattr(setup_header, name).offset == offset


def test_structure_sizes() -> None:
    assert ctypes.sizeof(boot_params) == 4096
    assert ctypes.sizeof(setup_header) == 0x26C - 0x1F1
    assert ctypes.sizeof(boot_e820_entry) == 20
    assert ctypes.sizeof(setup_data) == 16


# e820 ----------------------------------------------------------------------------


def test_e820_small_guest() -> None:
    e820 = build_e820(layout.guest_ram_ranges(MEM_SIZE))
    assert e820 == [
        (0, layout.EBDA_START, E820Type.RAM),
        (layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, E820Type.RESERVED),
        (layout.HIMEM_START, MEM_SIZE - layout.HIMEM_START, E820Type.RAM),
    ]


def test_e820_ebda_not_listed_as_ram() -> None:
    for addr, size, kind in build_e820(layout.guest_ram_ranges(MEM_SIZE)):
        if kind == E820Type.RAM:
            assert addr + size <= layout.EBDA_START or addr >= layout.HIMEM_START


def test_e820_guest_above_4gib() -> None:
    e820 = build_e820(layout.guest_ram_ranges(4 * GIB))
    assert e820[2] == (layout.HIMEM_START, layout.MMIO_GAP_START - layout.HIMEM_START,
                       E820Type.RAM)
    assert e820[3] == (layout.MMIO_GAP_END, 4 * GIB - layout.MMIO_GAP_START, E820Type.RAM)
    assert len(e820) == 4


def test_e820_tiny_guest_rejected() -> None:
    with pytest.raises(BootParamsError, match="0x80000 bytes"):
        build_e820([(0, 0x80000)])


# command line --------------------------------------------------------------------


def test_cmdline_written_nul_terminated(memory: GuestMemory) -> None:
    memory.fill(layout.CMDLINE_START, 64, 0xFF)
    size = write_cmdline(memory, "console=ttyS0 reboot=k")
    assert size == 23
    assert memory.read(layout.CMDLINE_START, 23) == b"console=ttyS0 reboot=k\x00"


def test_cmdline_max_length_accepted(memory: GuestMemory) -> None:
    size = write_cmdline(memory, "a" * (layout.COMMAND_LINE_MAX - 1))
    assert size == layout.COMMAND_LINE_MAX


def test_cmdline_too_long_rejected(memory: GuestMemory) -> None:
    with pytest.raises(BootParamsError, match="is 2048 bytes; the maximum is 2047"):
        write_cmdline(memory, "a" * layout.COMMAND_LINE_MAX)


@pytest.mark.parametrize("text, message", [
    ("root=/dev/vda\x00x", "NUL at position 13"),
    ("quiet é", "non-ASCII character 'é' at position 6"),
])
def test_cmdline_bad_characters_rejected(memory: GuestMemory, text: str, message: str) -> None:
    with pytest.raises(BootParamsError, match=message):
        write_cmdline(memory, text)


# setup_data ----------------------------------------------------------------------


def test_setup_data_chain_linked(memory: GuestMemory) -> None:
    seed = bytes(range(32))
    entries = [rng_seed_entry(seed), SetupDataEntry(2, b"dtb-bytes")]

    head = write_setup_data(memory, entries)

    assert head == layout.SETUP_DATA_START
    first = setup_data.from_buffer_copy(memory.read(head, 16))
    assert first.type == 9
    assert first.len == 32
    assert memory.read(head + 16, 32) == seed
    assert first.next == head + 48
    second = setup_data.from_buffer_copy(memory.read(first.next, 16))
    assert second.type == 2
    assert second.len == 9
    assert second.next == 0
    assert memory.read(first.next + 16, 9) == b"dtb-bytes"


def test_setup_data_nodes_8_byte_aligned(memory: GuestMemory) -> None:
    entries = [SetupDataEntry(9, b"abc"), SetupDataEntry(9, b"de")]
    head = write_setup_data(memory, entries)
    assert head is not None
    first = setup_data.from_buffer_copy(memory.read(head, 16))
    assert first.next == head + 24


def test_setup_data_empty_returns_none(memory: GuestMemory) -> None:
    assert write_setup_data(memory, []) is None


def test_setup_data_invalid_type_rejected(memory: GuestMemory) -> None:
    with pytest.raises(BootParamsError, match="type 0x0 is outside"):
        write_setup_data(memory, [SetupDataEntry(0, b"x")])


def test_setup_data_overflowing_area_rejected(memory: GuestMemory) -> None:
    big = SetupDataEntry(9, bytes(layout.MPTABLE_START - layout.SETUP_DATA_START))
    with pytest.raises(BootParamsError, match="where the MP table starts"):
        write_setup_data(memory, [big])


def test_rng_seed_empty_rejected() -> None:
    with pytest.raises(BootParamsError, match="non-empty seed"):
        rng_seed_entry(b"")


# zero page -----------------------------------------------------------------------


def read_zero_page(memory: GuestMemory) -> boot_params:
    return boot_params.from_buffer_copy(memory.read(layout.ZERO_PAGE_START, 4096))


def test_zero_page_for_elf(memory: GuestMemory) -> None:
    e820 = build_e820(layout.guest_ram_ranges(MEM_SIZE))
    write_zero_page(memory, elf_image(), layout.CMDLINE_START, 23, (0x3F00000, 0x5000),
                    e820, layout.SETUP_DATA_START, acpi_rsdp_address=layout.ACPI_START)

    params = read_zero_page(memory)
    assert params.hdr.type_of_loader == 0xFF
    assert params.hdr.vid_mode == 0xFFFF
    assert params.hdr.boot_flag == 0xAA55
    assert params.hdr.header == 0x53726448
    assert params.hdr.cmd_line_ptr == layout.CMDLINE_START
    assert params.ext_cmd_line_ptr == 0
    assert params.hdr.cmdline_size == 22
    assert params.hdr.ramdisk_image == 0x3F00000
    assert params.hdr.ramdisk_size == 0x5000
    assert params.hdr.setup_data == layout.SETUP_DATA_START
    assert params.acpi_rsdp_addr == layout.ACPI_START
    assert params.e820_entries == 3
    table = [(e.addr, e.size, e.type) for e in params.e820_table[:3]]
    assert table == e820


def test_zero_page_for_bzimage_keeps_header(memory: GuestMemory) -> None:
    image = KernelImage(0x1000200, 0x1000000, 0x1200000, KernelKind.BZIMAGE,
                        bzimage_header())
    write_zero_page(memory, image, layout.CMDLINE_START, 10, None, [], None)

    params = read_zero_page(memory)
    assert params.hdr.version == 0x020F
    assert params.hdr.init_size == 0x123000
    assert params.hdr.cmdline_size == 2047
    assert params.hdr.loadflags == 0x01
    assert params.hdr.code32_start == 0x1000000
    assert params.hdr.type_of_loader == 0xFF
    assert params.hdr.ramdisk_image == 0
    assert params.hdr.ramdisk_size == 0
    assert params.hdr.setup_data == 0


def test_zero_page_high_initrd_split(memory: GuestMemory) -> None:
    initrd = (0x1_2345_6000, 0x1_0000_0000)
    write_zero_page(memory, elf_image(), 0x1_0000_0000, 2, initrd, [], None)
    params = read_zero_page(memory)
    assert params.hdr.ramdisk_image == 0x2345_6000
    assert params.ext_ramdisk_image == 1
    assert params.hdr.ramdisk_size == 0
    assert params.ext_ramdisk_size == 1
    assert params.hdr.cmd_line_ptr == 0
    assert params.ext_cmd_line_ptr == 1


def test_zero_page_cmdline_over_kernel_limit_rejected(memory: GuestMemory) -> None:
    image = KernelImage(0x1000200, 0x1000000, 0x1200000, KernelKind.BZIMAGE,
                        bzimage_header(cmdline_size=255))
    with pytest.raises(BootParamsError, match="is 300 bytes; this kernel's cmdline_size allows"):
        write_zero_page(memory, image, layout.CMDLINE_START, 301, None, [], None)


def test_zero_page_too_many_e820_entries_rejected(memory: GuestMemory) -> None:
    e820 = [(i * 0x1000, 0x1000, 1) for i in range(129)]
    with pytest.raises(BootParamsError, match="129 entries; the zero page holds 128"):
        write_zero_page(memory, elf_image(), layout.CMDLINE_START, 1, None, e820, None)
