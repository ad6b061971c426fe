"""Kernel and initrd loaders for x86-64 guests: ELF vmlinux and bzImage.

Sources: glibc `<elf.h>` (Elf64_Ehdr, Elf64_Phdr, Elf64_Nhdr) for the ELF-64
file, program and note headers, Linux `include/xen/interface/elfnote.h` for the PVH entry note, and
Linux `Documentation/x86/boot.rst` (the "64-bit Boot Protocol") for bzImage.

Both loaders copy the image straight into guest RAM through `GuestMemory`, so
every segment is range-checked before a byte is written. Every rejected image
raises `KernelLoaderError` with the file path and the broken rule.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Final

from vmm.arch.x86_64 import layout
from vmm.memory import GuestMemory, GuestMemoryError

# Elf64_Ehdr.
_ELF_HEADER: Final = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF_MAGIC: Final = b"\x7fELF"
_EI_CLASS: Final = 4
_EI_DATA: Final = 5
_ELFCLASS64: Final = 2
_ELFDATA2LSB: Final = 1
_ET_EXEC: Final = 2
_EM_X86_64: Final = 62

# Elf64_Phdr: p_type, p_flags, p_offset,
# p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
_PROGRAM_HEADER: Final = struct.Struct("<IIQQQQQQ")
_PT_LOAD: Final = 1
_PT_NOTE: Final = 4

# Elf64_Nhdr: namesz, descsz, type. The name and the desc that follow are each
# padded to a 4-byte boundary.
_NOTE_HEADER: Final = struct.Struct("<III")
_NOTE_ALIGN: Final = 4
_XEN_NOTE_NAME: Final = b"Xen\x00"
# XEN_ELFNOTE_PHYS32_ENTRY: 32-bit physical entry point for PVH boot.
XEN_ELFNOTE_PHYS32_ENTRY: Final = 18

# bzImage setup header (boot.rst, "The Real-Mode Kernel Header").
SETUP_HEADER_OFFSET: Final = 0x1F1
SETUP_HEADER_SIZE: Final = 0x26C - SETUP_HEADER_OFFSET  # through kernel_info_offset
_SETUP_SECTS_OFFSET: Final = 0x1F1
_BOOT_FLAG_OFFSET: Final = 0x1FE
_JUMP_OFFSET: Final = 0x200
_HEADER_MAGIC_OFFSET: Final = 0x202
_VERSION_OFFSET: Final = 0x206
_LOADFLAGS_OFFSET: Final = 0x211
_INITRD_ADDR_MAX_OFFSET: Final = 0x22C
_RELOCATABLE_KERNEL_OFFSET: Final = 0x234
_XLOADFLAGS_OFFSET: Final = 0x236
_PREF_ADDRESS_OFFSET: Final = 0x258
_INIT_SIZE_OFFSET: Final = 0x260

BOOT_FLAG_MAGIC: Final = 0xAA55
HEADER_MAGIC: Final = b"HdrS"
# Protocol 2.12 added xloadflags, and XLF_KERNEL_64 in it is the only way a
# kernel states that it has the 64-bit entry point at load address + 0x200.
MIN_BOOT_PROTOCOL: Final = 0x020C
LOADED_HIGH: Final = 1 << 0
XLF_KERNEL_64: Final = 1 << 0
# A setup_sects of 0 means 4 sectors (boot.rst, note (1) under the header table).
_DEFAULT_SETUP_SECTS: Final = 4
_SECTOR_SIZE: Final = 512
# The 64-bit entry point is startup_64, 0x200 bytes into the protected-mode kernel.
BZIMAGE_64BIT_ENTRY_OFFSET: Final = 0x200


class KernelLoaderError(Exception):
    """A kernel or initrd image that cannot be loaded; the message names the file and rule.

    The caller reports it as a failed InstanceStart; nothing in guest RAM is usable after it.
    """


class KernelKind(enum.Enum):
    """Format of a loaded kernel image."""

    ELF = "elf"
    BZIMAGE = "bzimage"


@dataclass(frozen=True)
class KernelImage:
    """Placement of a loaded kernel in guest RAM and its entry points.

    `entry` is the guest physical address of the 64-bit entry point. `end` is the
    first byte past the kernel's memory footprint (for a bzImage this covers
    init_size, the space it decompresses into). `pvh_entry` is the 32-bit PVH entry
    point from an ELF note, or None when the image has none.
    """

    entry: int
    load_address: int
    end: int
    kind: KernelKind
    setup_header_bytes: bytes | None
    pvh_entry: int | None = None

    def initrd_addr_max(self) -> int:
        """Return the highest guest physical byte an initrd may occupy for this kernel.

        A bzImage states it in its setup header; a vmlinux has no header, so the
        limit is the last byte below the 32-bit MMIO gap.
        """
        if self.setup_header_bytes is None:
            return layout.MMIO_GAP_START - 1
        offset = _INITRD_ADDR_MAX_OFFSET - SETUP_HEADER_OFFSET
        return struct.unpack_from("<I", self.setup_header_bytes, offset)[0]


def load_kernel(memory: GuestMemory, path: str | os.PathLike[str]) -> KernelImage:
    """Load an ELF vmlinux or a bzImage from `path` into guest RAM.

    The format is chosen by the ELF magic; anything else must be a bzImage.
    Raises KernelLoaderError for an unreadable file or any rule the image breaks.
    """
    try:
        with open(path, "rb") as image:
            magic = image.read(len(_ELF_MAGIC))
            image.seek(0)
            if magic == _ELF_MAGIC:
                return _load_elf(memory, image, str(path))
            return _load_bzimage(memory, image, str(path))
    except OSError as error:
        raise KernelLoaderError(f"{path}: cannot read kernel image: {error}") from error


# ELF vmlinux ---------------------------------------------------------------------


@dataclass(frozen=True)
class _ProgramHeader:
    p_type: int
    p_offset: int
    p_paddr: int
    p_filesz: int
    p_memsz: int


def _load_elf(memory: GuestMemory, image: BinaryIO, path: str) -> KernelImage:
    file_size = os.fstat(image.fileno()).st_size
    entry, headers = _read_elf_headers(image, path, file_size)
    segments = [header for header in headers if header.p_type == _PT_LOAD]
    if not segments:
        raise KernelLoaderError(f"{path}: ELF file has no PT_LOAD segment")
    for segment in segments:
        _check_segment(memory, segment, path, file_size)
    if not any(s.p_paddr <= entry < s.p_paddr + s.p_memsz for s in segments):
        raise KernelLoaderError(f"{path}: ELF entry point {entry:#x} is in no PT_LOAD segment")

    for segment in segments:
        _copy_segment(memory, image, segment)
    notes = [header for header in headers if header.p_type == _PT_NOTE]
    return KernelImage(
        entry=entry,
        load_address=min(segment.p_paddr for segment in segments),
        end=max(segment.p_paddr + segment.p_memsz for segment in segments),
        kind=KernelKind.ELF,
        setup_header_bytes=None,
        pvh_entry=_find_pvh_entry(image, notes, path, file_size),
    )


def _read_elf_headers(
    image: BinaryIO, path: str, file_size: int
) -> tuple[int, list[_ProgramHeader]]:
    """Validate the ELF file header and return (e_entry, program headers)."""
    raw = image.read(_ELF_HEADER.size)
    if len(raw) < _ELF_HEADER.size:
        raise KernelLoaderError(f"{path}: ELF file header truncated at {len(raw)} bytes")
    fields = _ELF_HEADER.unpack(raw)
    ident, e_type, e_machine, entry, phoff, phentsize, phnum = (
        fields[0], fields[1], fields[2], fields[4], fields[5], fields[9], fields[10]
    )
    _check_elf_identity(ident, e_type, e_machine, path)
    if phentsize != _PROGRAM_HEADER.size:
        raise KernelLoaderError(
            f"{path}: ELF program header size {phentsize} is not {_PROGRAM_HEADER.size}"
        )
    if phoff + phnum * phentsize > file_size:
        raise KernelLoaderError(
            f"{path}: ELF program headers at {phoff:#x} ({phnum} entries) pass the end "
            f"of the {file_size}-byte file"
        )

    image.seek(phoff)
    table = image.read(phnum * phentsize)
    headers = []
    for (p_type, _flags, offset, _vaddr, paddr, filesz, memsz, _align) in (
        _PROGRAM_HEADER.iter_unpack(table)
    ):
        headers.append(_ProgramHeader(p_type, offset, paddr, filesz, memsz))
    return entry, headers


def _check_elf_identity(ident: bytes, e_type: int, e_machine: int, path: str) -> None:
    if ident[_EI_CLASS] != _ELFCLASS64:
        raise KernelLoaderError(f"{path}: ELF class {ident[_EI_CLASS]} is not ELFCLASS64 (2)")
    if ident[_EI_DATA] != _ELFDATA2LSB:
        raise KernelLoaderError(
            f"{path}: ELF data encoding {ident[_EI_DATA]} is not little-endian (1)"
        )
    if e_machine != _EM_X86_64:
        raise KernelLoaderError(f"{path}: ELF machine {e_machine} is not EM_X86_64 (62)")
    if e_type != _ET_EXEC:
        raise KernelLoaderError(f"{path}: ELF type {e_type} is not ET_EXEC (2)")


def _check_segment(
    memory: GuestMemory, segment: _ProgramHeader, path: str, file_size: int
) -> None:
    where = f"{path}: PT_LOAD segment at {segment.p_paddr:#x}"
    if segment.p_filesz > segment.p_memsz:
        raise KernelLoaderError(
            f"{where} has p_filesz {segment.p_filesz:#x} > p_memsz {segment.p_memsz:#x}"
        )
    if segment.p_offset + segment.p_filesz > file_size:
        raise KernelLoaderError(
            f"{where} reads file bytes [{segment.p_offset:#x}, "
            f"{segment.p_offset + segment.p_filesz:#x}) past the {file_size}-byte file"
        )
    if segment.p_paddr < layout.HIMEM_START:
        raise KernelLoaderError(
            f"{where} is below {layout.HIMEM_START:#x}, where the boot structures live"
        )
    if not memory.contains(segment.p_paddr, segment.p_memsz):
        raise KernelLoaderError(
            f"{where} size {segment.p_memsz:#x} is outside guest RAM"
        )


def _copy_segment(memory: GuestMemory, image: BinaryIO, segment: _ProgramHeader) -> None:
    """Copy p_filesz bytes from the file and zero the rest up to p_memsz (the bss)."""
    image.seek(segment.p_offset)
    _read_exactly(image, memory.view(segment.p_paddr, segment.p_filesz))
    bss_size = segment.p_memsz - segment.p_filesz
    if bss_size:
        memory.fill(segment.p_paddr + segment.p_filesz, bss_size, 0)


def _find_pvh_entry(
    image: BinaryIO, notes: list[_ProgramHeader], path: str, file_size: int
) -> int | None:
    """Return the XEN_ELFNOTE_PHYS32_ENTRY address from the PT_NOTE segments, if any."""
    for segment in notes:
        if segment.p_offset + segment.p_filesz > file_size:
            raise KernelLoaderError(
                f"{path}: PT_NOTE segment at file offset {segment.p_offset:#x} passes "
                f"the end of the {file_size}-byte file"
            )
        image.seek(segment.p_offset)
        data = image.read(segment.p_filesz)
        for name, note_type, desc in _iter_notes(data):
            if name == _XEN_NOTE_NAME and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return _decode_pvh_entry(desc, path)
    return None


def _iter_notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """Split a note segment into (name, type, desc); a truncated tail is ignored."""
    notes = []
    offset = 0
    while offset + _NOTE_HEADER.size <= len(data):
        namesz, descsz, note_type = _NOTE_HEADER.unpack_from(data, offset)
        name_start = offset + _NOTE_HEADER.size
        desc_start = name_start + _align_up(namesz, _NOTE_ALIGN)
        desc_end = desc_start + descsz
        if desc_end > len(data):
            break
        notes.append((data[name_start : name_start + namesz], note_type,
                      data[desc_start:desc_end]))
        offset = desc_start + _align_up(descsz, _NOTE_ALIGN)
    return notes


def _decode_pvh_entry(desc: bytes, path: str) -> int:
    # Linux emits the note with _ASM_PTR: 8 bytes on 64-bit builds, 4 on 32-bit.
    if len(desc) == 4:
        return struct.unpack("<I", desc)[0]
    if len(desc) == 8:
        return struct.unpack("<Q", desc)[0]
    raise KernelLoaderError(
        f"{path}: XEN_ELFNOTE_PHYS32_ENTRY note has {len(desc)} bytes, expected 4 or 8"
    )


# bzImage -------------------------------------------------------------------------


def _load_bzimage(memory: GuestMemory, image: BinaryIO, path: str) -> KernelImage:
    file_size = os.fstat(image.fileno()).st_size
    setup = image.read(SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE)
    if len(setup) < SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE:
        raise KernelLoaderError(
            f"{path}: not an ELF file, and {len(setup)} bytes are too short for a "
            f"bzImage setup header"
        )
    _check_setup_header(setup, path)

    setup_sects = setup[_SETUP_SECTS_OFFSET] or _DEFAULT_SETUP_SECTS
    kernel_offset = (setup_sects + 1) * _SECTOR_SIZE
    kernel_size = file_size - kernel_offset
    if kernel_size <= 0:
        raise KernelLoaderError(
            f"{path}: setup_sects {setup_sects} puts the protected-mode kernel at "
            f"{kernel_offset:#x}, past the {file_size}-byte file"
        )
    load_address = _bzimage_load_address(setup)
    init_size = _u32(setup, _INIT_SIZE_OFFSET)
    footprint = max(kernel_size, init_size)
    if not memory.contains(load_address, footprint):
        raise KernelLoaderError(
            f"{path}: kernel at {load_address:#x} needs {footprint:#x} bytes "
            f"(init_size {init_size:#x}), which is outside guest RAM"
        )

    image.seek(kernel_offset)
    _read_exactly(image, memory.view(load_address, kernel_size))
    header_end = min(_JUMP_OFFSET + 2 + setup[_JUMP_OFFSET + 1],
                     SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE)
    return KernelImage(
        entry=load_address + BZIMAGE_64BIT_ENTRY_OFFSET,
        load_address=load_address,
        end=load_address + footprint,
        kind=KernelKind.BZIMAGE,
        setup_header_bytes=setup[SETUP_HEADER_OFFSET:header_end],
    )


def _check_setup_header(setup: bytes, path: str) -> None:
    boot_flag = struct.unpack_from("<H", setup, _BOOT_FLAG_OFFSET)[0]
    if boot_flag != BOOT_FLAG_MAGIC:
        raise KernelLoaderError(
            f"{path}: not an ELF file, and boot_flag {boot_flag:#06x} at 0x1fe is not "
            f"the bzImage magic {BOOT_FLAG_MAGIC:#06x}"
        )
    magic = setup[_HEADER_MAGIC_OFFSET : _HEADER_MAGIC_OFFSET + len(HEADER_MAGIC)]
    if magic != HEADER_MAGIC:
        raise KernelLoaderError(
            f"{path}: setup header magic {magic!r} at 0x202 is not {HEADER_MAGIC!r}"
        )
    version = struct.unpack_from("<H", setup, _VERSION_OFFSET)[0]
    if version < MIN_BOOT_PROTOCOL:
        raise KernelLoaderError(
            f"{path}: bzImage boot protocol {version >> 8}.{version & 0xFF:02} is too old; "
            f"the 64-bit entry needs 2.12 or later"
        )
    if not setup[_LOADFLAGS_OFFSET] & LOADED_HIGH:
        raise KernelLoaderError(
            f"{path}: loadflags {setup[_LOADFLAGS_OFFSET]:#04x} lack LOADED_HIGH; "
            f"zImage kernels loaded at 0x10000 are not supported"
        )
    xloadflags = struct.unpack_from("<H", setup, _XLOADFLAGS_OFFSET)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise KernelLoaderError(
            f"{path}: xloadflags {xloadflags:#06x} lack XLF_KERNEL_64; "
            f"the kernel has no 64-bit entry point"
        )


def _bzimage_load_address(setup: bytes) -> int:
    """Return pref_address for a relocatable kernel, else the traditional 1 MiB."""
    if setup[_RELOCATABLE_KERNEL_OFFSET]:
        pref_address = struct.unpack_from("<Q", setup, _PREF_ADDRESS_OFFSET)[0]
        if pref_address:
            return pref_address
    return layout.HIMEM_START


# initrd --------------------------------------------------------------------------


def load_initrd(
    memory: GuestMemory,
    path: str | os.PathLike[str],
    max_address: int,
    kernel: KernelImage | None = None,
) -> tuple[int, int]:
    """Copy an initrd into guest RAM and return its (address, size).

    The initrd goes page-aligned as high as it fits with its last byte at or below
    `max_address` (inclusive, like the setup header's initrd_addr_max) and below the
    end of low RAM. It must start at or above HIMEM_START and, when `kernel` is
    given, at or above the kernel's end. Raises KernelLoaderError otherwise.
    """
    try:
        with open(path, "rb") as initrd:
            size = os.fstat(initrd.fileno()).st_size
            address = _place_initrd(memory, str(path), size, max_address, kernel)
            _read_exactly(initrd, memory.view(address, size))
    except OSError as error:
        raise KernelLoaderError(f"{path}: cannot read initrd: {error}") from error
    return address, size


def _place_initrd(
    memory: GuestMemory, path: str, size: int, max_address: int, kernel: KernelImage | None
) -> int:
    if size == 0:
        raise KernelLoaderError(f"{path}: initrd is empty")
    try:
        low_ram_end = memory.find_region(0, 1).guest_end
    except GuestMemoryError as error:
        raise KernelLoaderError(f"{path}: guest RAM has no region at address 0") from error
    limit = min(max_address + 1, low_ram_end)
    address = (limit - size) & ~(layout.PAGE_SIZE - 1)
    floor = max(layout.HIMEM_START, kernel.end if kernel else 0)
    if limit - size < floor or address < floor:
        raise KernelLoaderError(
            f"{path}: initrd of {size:#x} bytes does not fit between {floor:#x} "
            f"and {limit:#x}"
        )
    return address


# helpers -------------------------------------------------------------------------


def _read_exactly(source: BinaryIO, target: memoryview) -> None:
    """Fill `target` from `source`; a short read means the file shrank while loading."""
    done = 0
    while done < len(target):
        count = source.readinto(target[done:])  # type: ignore[attr-defined]
        if not count:
            raise OSError(f"file ended after {done} of {len(target)} bytes")
        done += count


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
