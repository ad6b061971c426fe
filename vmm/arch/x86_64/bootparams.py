"""The Linux x86 zero page (struct boot_params), e820 map, command line and setup_data.

Structures mirror Linux `arch/x86/include/uapi/asm/bootparam.h` field for field;
offsets follow `Documentation/x86/zero-page.rst` and `Documentation/x86/boot.rst`.
Nested structures declared in other headers (screen_info, apm_bios_info,
ist_info, edid_info, edd_info) are byte arrays of their sizes, because the monitor
leaves them zero.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.loader import KernelImage
from vmm.memory import GuestMemory

# setup_data types (bootparam.h).
SETUP_NONE: Final = 0
SETUP_E820_EXT: Final = 1
SETUP_DTB: Final = 2
SETUP_RNG_SEED: Final = 9
SETUP_INDIRECT: Final = 1 << 31
SETUP_TYPE_MAX: Final = SETUP_RNG_SEED | SETUP_INDIRECT

E820_MAX_ENTRIES_ZEROPAGE: Final = 128
# boot.rst, type_of_loader: 0xFF means "undefined" boot loader.
TYPE_OF_LOADER_UNDEFINED: Final = 0xFF
# boot.rst, vid_mode: 0xFFFF means "normal" (80x25 text) video mode.
VID_MODE_NORMAL: Final = 0xFFFF
BOOT_FLAG_MAGIC: Final = 0xAA55
# "HdrS" read as a little-endian u32.
HEADER_MAGIC: Final = int.from_bytes(b"HdrS", "little")
# setup_data nodes start 8-byte aligned, since the kernel reads their u64 `next`.
_SETUP_DATA_ALIGN: Final = 8
# The setup_data chain must end before the MP table, the next structure in low memory.
_SETUP_DATA_LIMIT: Final = layout.MPTABLE_START
_U32_MAX: Final = 0xFFFF_FFFF

_SCREEN_INFO_SIZE: Final = 0x40  # struct screen_info, linux/screen_info.h
_APM_BIOS_INFO_SIZE: Final = 0x14  # struct apm_bios_info, linux/apm_bios.h
_IST_INFO_SIZE: Final = 0x10  # struct ist_info, asm/ist.h
_EDID_INFO_SIZE: Final = 0x80  # struct edid_info, video/edid.h
_EDD_INFO_SIZE: Final = 82  # struct edd_info, linux/edd.h
_EDDMAXNR: Final = 6
_EDD_MBR_SIG_MAX: Final = 16


class E820Type(enum.IntEnum):
    """e820 region types (Linux arch/x86/include/asm/e820/types.h, ACPI "Address Range Types")."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5
    PMEM = 7


class BootParamsError(Exception):
    """A boot structure that breaks a boot protocol rule or does not fit its area.

    Raised while building the VM, before any vCPU runs; the caller fails the start.
    """


class setup_header(ctypes.LittleEndianStructure):  # noqa: N801 - kernel's name
    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),
        ("root_flags", ctypes.c_uint16),
        ("syssize", ctypes.c_uint32),
        ("ram_size", ctypes.c_uint16),
        ("vid_mode", ctypes.c_uint16),
        ("root_dev", ctypes.c_uint16),
        ("boot_flag", ctypes.c_uint16),
        ("jump", ctypes.c_uint16),
        ("header", ctypes.c_uint32),
        ("version", ctypes.c_uint16),
        ("realmode_swtch", ctypes.c_uint32),
        ("start_sys_seg", ctypes.c_uint16),
        ("kernel_version", ctypes.c_uint16),
        ("type_of_loader", ctypes.c_uint8),
        ("loadflags", ctypes.c_uint8),
        ("setup_move_size", ctypes.c_uint16),
        ("code32_start", ctypes.c_uint32),
        ("ramdisk_image", ctypes.c_uint32),
        ("ramdisk_size", ctypes.c_uint32),
        ("bootsect_kludge", ctypes.c_uint32),
        ("heap_end_ptr", ctypes.c_uint16),
        ("ext_loader_ver", ctypes.c_uint8),
        ("ext_loader_type", ctypes.c_uint8),
        ("cmd_line_ptr", ctypes.c_uint32),
        ("initrd_addr_max", ctypes.c_uint32),
        ("kernel_alignment", ctypes.c_uint32),
        ("relocatable_kernel", ctypes.c_uint8),
        ("min_alignment", ctypes.c_uint8),
        ("xloadflags", ctypes.c_uint16),
        ("cmdline_size", ctypes.c_uint32),
        ("hardware_subarch", ctypes.c_uint32),
        ("hardware_subarch_data", ctypes.c_uint64),
        ("payload_offset", ctypes.c_uint32),
        ("payload_length", ctypes.c_uint32),
        ("setup_data", ctypes.c_uint64),
        ("pref_address", ctypes.c_uint64),
        ("init_size", ctypes.c_uint32),
        ("handover_offset", ctypes.c_uint32),
        ("kernel_info_offset", ctypes.c_uint32),
    ]


class boot_e820_entry(ctypes.LittleEndianStructure):  # noqa: N801 - kernel's name
    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    ]


class sys_desc_table(ctypes.LittleEndianStructure):  # noqa: N801 - kernel's name
    _pack_ = 1
    _fields_ = [("length", ctypes.c_uint16), ("table", ctypes.c_uint8 * 14)]


class olpc_ofw_header(ctypes.LittleEndianStructure):  # noqa: N801 - kernel's name
    _pack_ = 1
    _fields_ = [
        ("ofw_magic", ctypes.c_uint32),
        ("ofw_version", ctypes.c_uint32),
        ("cif_handler", ctypes.c_uint32),
        ("irq_desc_table", ctypes.c_uint32),
    ]


class efi_info(ctypes.LittleEndianStructure):  # noqa: N801 - kernel's name
    _pack_ = 1
    _fields_ = [
        ("efi_loader_signature", ctypes.c_uint32),
        ("efi_systab", ctypes.c_uint32),
        ("efi_memdesc_size", ctypes.c_uint32),
        ("efi_memdesc_version", ctypes.c_uint32),
        ("efi_memmap", ctypes.c_uint32),
        ("efi_memmap_size", ctypes.c_uint32),
        ("efi_systab_hi", ctypes.c_uint32),
        ("efi_memmap_hi", ctypes.c_uint32),
    ]


class boot_params(ctypes.LittleEndianStructure):  # noqa: N801 - kernel's name
    _pack_ = 1
    _fields_ = [
        ("screen_info", ctypes.c_uint8 * _SCREEN_INFO_SIZE),  # 0x000
        ("apm_bios_info", ctypes.c_uint8 * _APM_BIOS_INFO_SIZE),  # 0x040
        ("_pad2", ctypes.c_uint8 * 4),  # 0x054
        ("tboot_addr", ctypes.c_uint64),  # 0x058
        ("ist_info", ctypes.c_uint8 * _IST_INFO_SIZE),  # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),  # 0x070
        ("_pad3", ctypes.c_uint8 * 8),  # 0x078
        ("hd0_info", ctypes.c_uint8 * 16),  # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),  # 0x090
        ("sys_desc_table", sys_desc_table),  # 0x0a0
        ("olpc_ofw_header", olpc_ofw_header),  # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),  # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),  # 0x0c8
        ("_pad4", ctypes.c_uint8 * 112),  # 0x0cc
        ("cc_blob_address", ctypes.c_uint32),  # 0x13c
        ("edid_info", ctypes.c_uint8 * _EDID_INFO_SIZE),  # 0x140
        ("efi_info", efi_info),  # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),  # 0x1e0
        ("scratch", ctypes.c_uint32),  # 0x1e4
        ("e820_entries", ctypes.c_uint8),  # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),  # 0x1e9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),  # 0x1ea
        ("kbd_status", ctypes.c_uint8),  # 0x1eb
        ("secure_boot", ctypes.c_uint8),  # 0x1ec
        ("_pad5", ctypes.c_uint8 * 2),  # 0x1ed
        ("sentinel", ctypes.c_uint8),  # 0x1ef
        ("_pad6", ctypes.c_uint8 * 1),  # 0x1f0
        ("hdr", setup_header),  # 0x1f1
        ("_pad7", ctypes.c_uint8 * (0x290 - 0x1F1 - ctypes.sizeof(setup_header))),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * _EDD_MBR_SIG_MAX),  # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", ctypes.c_uint8 * 48),  # 0xcd0
        ("eddbuf", ctypes.c_uint8 * (_EDD_INFO_SIZE * _EDDMAXNR)),  # 0xd00
        ("_pad9", ctypes.c_uint8 * 276),  # 0xeec
    ]


class setup_data(ctypes.LittleEndianStructure):  # noqa: N801 - kernel's name
    """Header of one node in the setup_data chain; `len` bytes of data follow it."""

    _pack_ = 1
    _fields_ = [
        ("next", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
    ]


E820Entry = tuple[int, int, int]


# e820 ----------------------------------------------------------------------------


def build_e820(mem_ranges: Sequence[tuple[int, int]]) -> list[E820Entry]:
    """Build the e820 map, as (addr, size, type) entries, for guest RAM `mem_ranges`.

    `mem_ranges` are the (guest_base, size) pairs of `layout.guest_ram_ranges`. The
    first must start at 0 and pass HIMEM_START. The map lists usable RAM in
    [0, EBDA_START), reserves [EBDA_START, HIMEM_START) for the MP and ACPI tables,
    then lists usable RAM from HIMEM_START to the end of low RAM and each higher range.
    """
    ranges = sorted(mem_ranges)
    if not ranges or ranges[0][0] != 0:
        raise BootParamsError(f"guest RAM ranges {ranges} do not start at address 0")
    low_base, low_size = ranges[0]
    if low_size <= layout.HIMEM_START:
        raise BootParamsError(
            f"guest RAM below the MMIO gap is {low_size:#x} bytes; the boot layout "
            f"needs more than {layout.HIMEM_START:#x}"
        )
    e820: list[E820Entry] = [
        (0, layout.EBDA_START, E820Type.RAM),
        (layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, E820Type.RESERVED),
        (layout.HIMEM_START, low_size - layout.HIMEM_START, E820Type.RAM),
    ]
    for base, size in ranges[1:]:
        e820.append((base, size, E820Type.RAM))
    return e820


# command line --------------------------------------------------------------------


def write_cmdline(
    memory: GuestMemory, text: str, address: int = layout.CMDLINE_START
) -> int:
    """Write `text` NUL-terminated at `address`; return its size with the NUL.

    Raises BootParamsError when the text is not ASCII, contains a NUL, or is longer
    than COMMAND_LINE_MAX - 1 bytes.
    """
    try:
        encoded = text.encode("ascii")
    except UnicodeEncodeError as error:
        raise BootParamsError(
            f"kernel command line has non-ASCII character {text[error.start]!r} "
            f"at position {error.start}"
        ) from error
    if b"\x00" in encoded:
        raise BootParamsError(
            f"kernel command line contains a NUL at position {encoded.index(0)}"
        )
    if len(encoded) > layout.COMMAND_LINE_MAX - 1:
        raise BootParamsError(
            f"kernel command line is {len(encoded)} bytes; the maximum is "
            f"{layout.COMMAND_LINE_MAX - 1} (COMMAND_LINE_SIZE {layout.COMMAND_LINE_MAX} "
            f"with the terminating NUL)"
        )
    memory.write(address, encoded + b"\x00")
    return len(encoded) + 1


# setup_data ----------------------------------------------------------------------


@dataclass(frozen=True)
class SetupDataEntry:
    """One setup_data node to write: its type (SETUP_*) and payload."""

    type: int
    data: bytes


def rng_seed_entry(seed: bytes) -> SetupDataEntry:
    """Return a SETUP_RNG_SEED node that seeds the guest's entropy pool at boot."""
    if not seed:
        raise BootParamsError("SETUP_RNG_SEED needs a non-empty seed")
    return SetupDataEntry(SETUP_RNG_SEED, bytes(seed))


def write_setup_data(
    memory: GuestMemory,
    entries: Sequence[SetupDataEntry],
    address: int = layout.SETUP_DATA_START,
) -> int | None:
    """Write `entries` as a linked setup_data chain from `address`.

    Returns the address of the first node, for hdr.setup_data, or None when
    `entries` is empty. Raises BootParamsError for an invalid type or when the
    chain would reach the MP table.
    """
    if not entries:
        return None
    addresses = _setup_data_addresses(entries, address)
    for index, entry in enumerate(entries):
        next_address = addresses[index + 1] if index + 1 < len(entries) else 0
        node = setup_data(next=next_address, type=entry.type, len=len(entry.data))
        memory.write(addresses[index], bytes(node) + entry.data)
    return address


def _setup_data_addresses(entries: Sequence[SetupDataEntry], start: int) -> list[int]:
    addresses = []
    cursor = start
    for entry in entries:
        if not SETUP_NONE < entry.type <= SETUP_TYPE_MAX:
            raise BootParamsError(
                f"setup_data type {entry.type:#x} is outside 1..{SETUP_TYPE_MAX:#x}"
            )
        if len(entry.data) > _U32_MAX:
            raise BootParamsError(
                f"setup_data payload of {len(entry.data)} bytes does not fit its u32 len"
            )
        addresses.append(cursor)
        cursor = _align_up(cursor + ctypes.sizeof(setup_data) + len(entry.data),
                           _SETUP_DATA_ALIGN)
    end = addresses[-1] + ctypes.sizeof(setup_data) + len(entries[-1].data)
    if end > _SETUP_DATA_LIMIT:
        raise BootParamsError(
            f"setup_data chain [{start:#x}, {end:#x}) passes {_SETUP_DATA_LIMIT:#x}, "
            f"where the MP table starts"
        )
    return addresses


# zero page -----------------------------------------------------------------------


def write_zero_page(
    memory: GuestMemory,
    kernel_image: KernelImage,
    cmdline_address: int,
    cmdline_size: int,
    initrd: tuple[int, int] | None,
    e820: Sequence[E820Entry],
    setup_data_address: int | None,
    *,
    acpi_rsdp_address: int | None = None,
    address: int = layout.ZERO_PAGE_START,
) -> boot_params:
    """Fill a struct boot_params and write it at `address`; return the structure.

    For a bzImage the setup header starts from the kernel's own header bytes, as
    the 64-bit boot protocol requires. `cmdline_size` counts the terminating NUL.
    Raises BootParamsError when the e820 map has more than 128 entries or the
    command line is longer than a bzImage's cmdline_size allows.
    """
    params = boot_params()
    if kernel_image.setup_header_bytes is not None:
        header = kernel_image.setup_header_bytes[: ctypes.sizeof(setup_header)]
        ctypes.memmove(ctypes.addressof(params.hdr), header, len(header))
        _check_cmdline_fits(params.hdr, cmdline_size)
        params.hdr.code32_start = kernel_image.load_address
    else:
        params.hdr.cmdline_size = cmdline_size - 1
    _fill_loader_fields(params.hdr)

    _split_u64(params, "cmd_line_ptr", cmdline_address)
    if initrd is not None:
        _split_u64(params, "ramdisk_image", initrd[0])
        _split_u64(params, "ramdisk_size", initrd[1])
    _fill_e820(params, e820)
    params.hdr.setup_data = setup_data_address or 0
    params.acpi_rsdp_addr = acpi_rsdp_address or 0
    memory.write(address, bytes(params))
    return params


def _fill_loader_fields(hdr: setup_header) -> None:
    """Set the fields boot.rst marks as written by the boot loader."""
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.vid_mode = VID_MODE_NORMAL
    hdr.boot_flag = BOOT_FLAG_MAGIC
    hdr.header = HEADER_MAGIC


def _check_cmdline_fits(hdr: setup_header, cmdline_size: int) -> None:
    # boot.rst, cmdline_size: the maximum length without the terminating NUL.
    if cmdline_size - 1 > hdr.cmdline_size:
        raise BootParamsError(
            f"kernel command line is {cmdline_size - 1} bytes; this kernel's "
            f"cmdline_size allows {hdr.cmdline_size}"
        )


def _split_u64(params: boot_params, field: str, value: int) -> None:
    """Store the low 32 bits in hdr.<field> and the high 32 bits in ext_<field>."""
    setattr(params.hdr, field, value & _U32_MAX)
    setattr(params, f"ext_{field}", value >> 32)


def _fill_e820(params: boot_params, e820: Sequence[E820Entry]) -> None:
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootParamsError(
            f"e820 map has {len(e820)} entries; the zero page holds "
            f"{E820_MAX_ENTRIES_ZEROPAGE}"
        )
    for index, (addr, size, kind) in enumerate(e820):
        params.e820_table[index] = boot_e820_entry(addr, size, int(kind))
    params.e820_entries = len(e820)


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
