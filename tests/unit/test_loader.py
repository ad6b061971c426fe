"""Tests for the ELF vmlinux, bzImage and initrd loaders, on images built here."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.loader import (
    KernelImage,
    KernelKind,
    KernelLoaderError,
    load_initrd,
    load_kernel,
)
from vmm.memory import GuestMemory

MEM_SIZE = 64 << 20
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
PT_LOAD = 1
PT_NOTE = 4


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest = GuestMemory(layout.guest_ram_ranges(MEM_SIZE))
    yield guest
    guest.close()


# ELF builder ---------------------------------------------------------------------


@dataclass
class Segment:
    p_type: int
    paddr: int
    data: bytes
    memsz: int | None = None


@dataclass
class ElfSpec:
    segments: list[Segment] = field(default_factory=list)
    entry: int = 0x1000000
    ei_class: int = 2
    ei_data: int = 1
    e_type: int = 2
    machine: int = 62
    phentsize: int = PROGRAM_HEADER.size


def build_elf(spec: ElfSpec) -> bytes:
    """Lay out an ELF-64 file: header, program headers, then each segment's bytes."""
    phoff = ELF_HEADER.size
    data_offset = phoff + PROGRAM_HEADER.size * len(spec.segments)
    headers = b""
    body = b""
    for segment in spec.segments:
        memsz = segment.memsz if segment.memsz is not None else len(segment.data)
        headers += PROGRAM_HEADER.pack(
            segment.p_type, 5, data_offset + len(body), 0xFFFFFFFF81000000,
            segment.paddr, len(segment.data), memsz, 0x1000,
        )
        body += segment.data
    ident = b"\x7fELF" + bytes([spec.ei_class, spec.ei_data, 1]) + bytes(9)
    header = ELF_HEADER.pack(
        ident, spec.e_type, spec.machine, 1, spec.entry, phoff, 0, 0,
        ELF_HEADER.size, spec.phentsize, len(spec.segments), 64, 0, 0,
    )
    return header + headers + body


def xen_note(note_type: int, desc: bytes) -> bytes:
    name = b"Xen\x00"
    return struct.pack("<III", len(name), len(desc), note_type) + name + desc


def write_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# bzImage builder -----------------------------------------------------------------


def build_bzimage(
    payload: bytes,
    *,
    version: int = 0x020F,
    setup_sects: int = 1,
    loadflags: int = 0x01,
    xloadflags: int = 0x01,
    relocatable: int = 1,
    pref_address: int = 0x1000000,
    init_size: int = 0x200000,
    boot_flag: int = 0xAA55,
    magic: bytes = b"HdrS",
) -> bytes:
    sects = setup_sects or 4
    setup = bytearray((sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB
    setup[0x201] = 0x6A  # short jump past the header: header ends at 0x26c
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


# ELF tests -----------------------------------------------------------------------


def test_elf_segments_loaded_and_bss_zeroed(memory: GuestMemory, tmp_path: Path) -> None:
    text = bytes(range(256)) * 16
    spec = ElfSpec(segments=[
        Segment(PT_LOAD, 0x1000000, text, memsz=len(text) + 0x800),
        Segment(PT_LOAD, 0x1200000, b"\x5a" * 100),
    ])
    memory.fill(0x1000000 + len(text), 0x800, 0xCC)

    image = load_kernel(memory, write_file(tmp_path, "vmlinux", build_elf(spec)))

    assert memory.read(0x1000000, len(text)) == text
    assert memory.read(0x1000000 + len(text), 0x800) == bytes(0x800)
    assert memory.read(0x1200000, 100) == b"\x5a" * 100
    assert image.kind is KernelKind.ELF
    assert image.entry == 0x1000000
    assert image.load_address == 0x1000000
    assert image.end == 0x1200000 + 100
    assert image.setup_header_bytes is None
    assert image.pvh_entry is None


@pytest.mark.parametrize("desc, expected", [
    (struct.pack("<Q", 0x1000123), 0x1000123),
    (struct.pack("<I", 0x1000456), 0x1000456),
])
def test_elf_pvh_note_reported(
    memory: GuestMemory, tmp_path: Path, desc: bytes, expected: int
) -> None:
    notes = xen_note(5, b"2.6\x00") + xen_note(18, desc)
    spec = ElfSpec(segments=[
        Segment(PT_LOAD, 0x1000000, b"\x90" * 64),
        Segment(PT_NOTE, 0, notes),
    ])
    image = load_kernel(memory, write_file(tmp_path, "vmlinux", build_elf(spec)))
    assert image.pvh_entry == expected


@pytest.mark.parametrize("spec, message", [
    (ElfSpec(ei_class=1), "ELF class 1 is not ELFCLASS64"),
    (ElfSpec(ei_data=2), "not little-endian"),
    (ElfSpec(machine=3), "ELF machine 3 is not EM_X86_64"),
    (ElfSpec(e_type=3), "ELF type 3 is not ET_EXEC"),
    (ElfSpec(segments=[Segment(PT_NOTE, 0, b"")]), "no PT_LOAD segment"),
    (ElfSpec(segments=[Segment(PT_LOAD, 0x1000000, b"ab", memsz=1)]),
     "p_filesz 0x2 > p_memsz 0x1"),
    (ElfSpec(segments=[Segment(PT_LOAD, MEM_SIZE - 0x10, b"x" * 0x20)]),
     "segment at 0x3fffff0 size 0x20 is outside guest RAM"),
    (ElfSpec(segments=[Segment(PT_LOAD, 0x7000, b"x")], entry=0x7000),
     "below 0x100000"),
    (ElfSpec(segments=[Segment(PT_LOAD, 0x1000000, b"x")], entry=0x2000000),
     "entry point 0x2000000 is in no PT_LOAD segment"),
])
def test_elf_invalid_image_rejected(
    memory: GuestMemory, tmp_path: Path, spec: ElfSpec, message: str
) -> None:
    path = write_file(tmp_path, "bad-vmlinux", build_elf(spec))
    with pytest.raises(KernelLoaderError, match=message) as caught:
        load_kernel(memory, path)
    assert str(path) in str(caught.value)


def test_elf_segment_past_file_end_rejected(memory: GuestMemory, tmp_path: Path) -> None:
    data = build_elf(ElfSpec(segments=[Segment(PT_LOAD, 0x1000000, b"x" * 64)]))
    path = write_file(tmp_path, "short", data[:-10])
    with pytest.raises(KernelLoaderError, match="past the .*-byte file"):
        load_kernel(memory, path)


def test_elf_truncated_header_rejected(memory: GuestMemory, tmp_path: Path) -> None:
    path = write_file(tmp_path, "stub", b"\x7fELF\x02\x01")
    with pytest.raises(KernelLoaderError, match="ELF file header truncated at 6 bytes"):
        load_kernel(memory, path)


def test_missing_file_names_path(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(KernelLoaderError, match="cannot read kernel image") as caught:
        load_kernel(memory, path)
    assert str(path) in str(caught.value)


# bzImage tests -------------------------------------------------------------------


def test_bzimage_loaded_at_pref_address(memory: GuestMemory, tmp_path: Path) -> None:
    payload = b"\xf4" * 0x300
    image = load_kernel(memory, write_file(tmp_path, "bzImage", build_bzimage(payload)))

    assert image.kind is KernelKind.BZIMAGE
    assert image.load_address == 0x1000000
    assert image.entry == 0x1000000 + 0x200
    assert image.end == 0x1000000 + 0x200000
    assert memory.read(0x1000000, len(payload)) == payload
    assert image.setup_header_bytes is not None
    assert len(image.setup_header_bytes) == 0x26C - 0x1F1
    assert image.setup_header_bytes[0x202 - 0x1F1 : 0x206 - 0x1F1] == b"HdrS"
    assert image.initrd_addr_max() == 0x7FFFFFFF


def test_bzimage_setup_sects_zero_means_four(memory: GuestMemory, tmp_path: Path) -> None:
    payload = b"\x11\x22\x33\x44"
    data = build_bzimage(payload, setup_sects=0)
    assert len(data) == 5 * 512 + len(payload)
    image = load_kernel(memory, write_file(tmp_path, "bzImage", data))
    assert memory.read(image.load_address, 4) == payload


def test_bzimage_not_relocatable_loads_at_1mib(memory: GuestMemory, tmp_path: Path) -> None:
    data = build_bzimage(b"\x90" * 16, relocatable=0)
    image = load_kernel(memory, write_file(tmp_path, "bzImage", data))
    assert image.load_address == 0x100000
    assert image.entry == 0x100200


@pytest.mark.parametrize("options, message", [
    ({"boot_flag": 0x1234}, "boot_flag 0x1234 at 0x1fe is not the bzImage magic"),
    ({"magic": b"NoHd"}, "setup header magic b'NoHd'"),
    ({"version": 0x020B}, "boot protocol 2.11 is too old; the 64-bit entry needs 2.12"),
    ({"loadflags": 0}, "lack LOADED_HIGH"),
    ({"xloadflags": 0}, "lack XLF_KERNEL_64"),
    ({"init_size": MEM_SIZE}, "outside guest RAM"),
])
def test_bzimage_invalid_header_rejected(
    memory: GuestMemory, tmp_path: Path, options: dict[str, object], message: str
) -> None:
    path = write_file(tmp_path, "bad-bzImage", build_bzimage(b"\x90" * 16, **options))
    with pytest.raises(KernelLoaderError, match=message) as caught:
        load_kernel(memory, path)
    assert str(path) in str(caught.value)


def test_bzimage_without_kernel_rejected(memory: GuestMemory, tmp_path: Path) -> None:
    path = write_file(tmp_path, "setup-only", build_bzimage(b""))
    with pytest.raises(KernelLoaderError, match="past the 1024-byte file"):
        load_kernel(memory, path)


def test_short_garbage_rejected(memory: GuestMemory, tmp_path: Path) -> None:
    path = write_file(tmp_path, "garbage", b"hello")
    with pytest.raises(KernelLoaderError, match="not an ELF file, and 5 bytes are too short"):
        load_kernel(memory, path)


# initrd tests --------------------------------------------------------------------


def kernel_ending_at(end: int) -> KernelImage:
    return KernelImage(0x1000000, 0x1000000, end, KernelKind.ELF, None)


def test_initrd_placed_high_and_page_aligned(memory: GuestMemory, tmp_path: Path) -> None:
    content = b"initrd" * 1000
    path = write_file(tmp_path, "initrd", content)

    address, size = load_initrd(memory, path, 0xFFFFFFFF, kernel_ending_at(0x2000000))

    assert size == len(content)
    assert address % layout.PAGE_SIZE == 0
    assert address + size <= MEM_SIZE
    assert MEM_SIZE - (address + size) < layout.PAGE_SIZE
    assert memory.read(address, size) == content


def test_initrd_respects_max_address(memory: GuestMemory, tmp_path: Path) -> None:
    path = write_file(tmp_path, "initrd", b"x" * 5000)
    address, size = load_initrd(memory, path, 0x2FFFFFF)
    assert address + size - 1 <= 0x2FFFFFF
    assert address == (0x3000000 - 5000) & ~0xFFF


def test_initrd_overlapping_kernel_rejected(memory: GuestMemory, tmp_path: Path) -> None:
    path = write_file(tmp_path, "initrd", b"x" * 0x100000)
    with pytest.raises(KernelLoaderError, match="does not fit between 0x3f80000") as caught:
        load_initrd(memory, path, 0xFFFFFFFF, kernel_ending_at(0x3F80000))
    assert str(path) in str(caught.value)


def test_initrd_empty_rejected(memory: GuestMemory, tmp_path: Path) -> None:
    path = write_file(tmp_path, "initrd", b"")
    with pytest.raises(KernelLoaderError, match="initrd is empty"):
        load_initrd(memory, path, 0xFFFFFFFF)
