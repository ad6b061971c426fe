"""Boot GDT, page tables and APIC LVT helpers, checked in guest memory without KVM."""

from __future__ import annotations

import pytest

from vmm.arch.x86_64 import layout, regs
from vmm.arch.x86_64.interrupts import (
    APIC_DELIVERY_MODE_EXTINT,
    APIC_DELIVERY_MODE_NMI,
    APIC_LVT_LINT0_OFFSET,
    get_lapic_register,
    set_lapic_register,
    with_delivery_mode,
)
from vmm.arch.x86_64.msrs import (
    MSR_IA32_MISC_ENABLE,
    MSR_MTRR_DEF_TYPE,
    boot_msr_entries,
)
from vmm.kvm.structs import kvm_lapic_state
from vmm.memory import GuestMemory


@pytest.fixture
def memory() -> GuestMemory:
    guest = GuestMemory([(0, 2 << 20)])
    yield guest
    guest.close()


def test_boot_gdt_matches_flat_descriptors() -> None:
    gdt = regs.boot_gdt()
    assert len(gdt) == regs.GDT_ENTRY_COUNT
    assert gdt[0] == 0
    # Flat 4 GiB: base 0, limit 0xFFFFF in 4 KiB units (SDM 3.4.5, figure 3-8).
    assert gdt[regs.GDT_CODE_INDEX] == 0x00AF_9B00_0000_FFFF
    assert gdt[regs.GDT_DATA_INDEX] == 0x00CF_9300_0000_FFFF


def test_boot_selectors_follow_boot_protocol() -> None:
    assert regs.BOOT_CS == 0x10
    assert regs.BOOT_DS == 0x18


def test_code_segment_decodes_as_64bit_flat() -> None:
    gdt = regs.boot_gdt()
    code = regs.segment_from_gdt_entry(regs.GDT_CODE_INDEX, gdt[regs.GDT_CODE_INDEX])
    assert code.selector == regs.BOOT_CS
    assert code.base == 0
    assert code.limit == 0xFFFF_FFFF
    assert code.type == regs.SEGMENT_TYPE_CODE_EXECUTE_READ_ACCESSED
    assert (code.present, code.s, code.l, code.db, code.g, code.dpl) == (1, 1, 1, 0, 1, 0)
    assert code.unusable == 0


def test_data_segment_decodes_as_32bit_flat() -> None:
    gdt = regs.boot_gdt()
    data = regs.segment_from_gdt_entry(regs.GDT_DATA_INDEX, gdt[regs.GDT_DATA_INDEX])
    assert data.selector == regs.BOOT_DS
    assert data.limit == 0xFFFF_FFFF
    assert data.type == regs.SEGMENT_TYPE_DATA_READ_WRITE_ACCESSED
    assert (data.present, data.s, data.l, data.db, data.g) == (1, 1, 0, 1, 1)


def test_tss_segment_is_busy_system_descriptor() -> None:
    gdt = regs.boot_gdt()
    tss = regs.segment_from_gdt_entry(regs.GDT_TSS_INDEX, gdt[regs.GDT_TSS_INDEX])
    assert tss.type == regs.SEGMENT_TYPE_TSS64_BUSY
    assert tss.s == 0
    assert tss.present == 1
    assert tss.limit == regs.TSS_LIMIT
    assert tss.g == 0


@pytest.mark.parametrize(
    ("base", "limit", "flags"),
    [(0, 0, 0), (0x1234_5678, 0xABCDE, regs.DESC_DB), (0xFFFF_FFFF, 0xFFFFF, regs.DESC_AVL)],
)
def test_gdt_entry_round_trips_base_and_limit(base: int, limit: int, flags: int) -> None:
    entry = regs.gdt_entry(regs.DESC_P | regs.DESC_S | 0x3, flags, base, limit)
    segment = regs.segment_from_gdt_entry(5, entry)
    assert segment.base == base
    assert segment.limit == limit
    assert segment.selector == 5 * 8
    assert segment.avl == (1 if flags & regs.DESC_AVL else 0)


def test_gdt_entry_rejects_wide_limit() -> None:
    with pytest.raises(ValueError, match="20 bits"):
        regs.gdt_entry(0, 0, 0, 0x10_0000)


def test_not_present_segment_is_unusable() -> None:
    segment = regs.segment_from_gdt_entry(1, regs.gdt_entry(regs.DESC_S | 0x3, 0, 0, 0))
    assert segment.present == 0
    assert segment.unusable == 1


def test_write_gdt_places_entries_and_empty_idt(memory: GuestMemory) -> None:
    memory.write_le64(layout.IDT_START, 0xFFFF_FFFF)
    regs.write_gdt(memory, regs.boot_gdt())
    for index, entry in enumerate(regs.boot_gdt()):
        assert memory.read_le64(layout.GDT_START + index * 8) == entry
    assert memory.read_le64(layout.IDT_START) == 0


def test_write_gdt_rejects_overlap_with_idt(memory: GuestMemory) -> None:
    with pytest.raises(ValueError, match="run into the IDT"):
        regs.write_gdt(memory, [0] * (regs.GDT_ENTRY_COUNT + 1))


def test_page_tables_identity_map_first_gib(memory: GuestMemory) -> None:
    memory.write_le64(layout.PML4_START + 8, 0xDEAD)  # stale entry must be cleared
    regs.write_identity_page_tables(memory)
    pml4 = memory.read_le64(layout.PML4_START)
    assert pml4 & ~0xFFF == layout.PDPTE_START
    assert pml4 & regs.PTE_PRESENT
    assert memory.read_le64(layout.PML4_START + 8) == 0
    pdpte = memory.read_le64(layout.PDPTE_START)
    assert pdpte & ~0xFFF == layout.PDE_START
    for index in (0, 1, 255, 511):
        pde = memory.read_le64(layout.PDE_START + index * 8)
        assert pde & ~0xFFF == index * regs.HUGE_PAGE_SIZE
        assert pde & regs.PDE_PAGE_SIZE
        assert pde & regs.PTE_WRITABLE


def _translate(memory: GuestMemory, address: int) -> int:
    """Walk the 4-level tables like the MMU (SDM 4.5) for a 2 MiB page mapping."""
    pml4e = memory.read_le64(layout.PML4_START + (address >> 39 & 0x1FF) * 8)
    pdpte = memory.read_le64((pml4e & ~0xFFF) + (address >> 30 & 0x1FF) * 8)
    pde = memory.read_le64((pdpte & ~0xFFF) + (address >> 21 & 0x1FF) * 8)
    assert pde & regs.PDE_PAGE_SIZE
    return (pde & ~0x1F_FFFF & ((1 << 52) - 1)) | (address & 0x1F_FFFF)


@pytest.mark.parametrize("address", [0, 0x7000, 0x100000, 0x1234_5678, 0x3FFF_FFFF])
def test_page_tables_translate_to_same_address(memory: GuestMemory, address: int) -> None:
    regs.write_identity_page_tables(memory)
    assert _translate(memory, address) == address


def test_identity_map_covers_one_gib() -> None:
    assert regs.IDENTITY_MAP_SIZE == 1 << 30


def test_lvt_delivery_mode_keeps_other_bits() -> None:
    masked_fixed_vector = (1 << 16) | 0x30
    entry = with_delivery_mode(masked_fixed_vector, APIC_DELIVERY_MODE_NMI)
    assert entry == (1 << 16) | (0b100 << 8) | 0x30
    assert with_delivery_mode(entry, APIC_DELIVERY_MODE_EXTINT) == (1 << 16) | (0b111 << 8) | 0x30


def test_lapic_register_access_is_little_endian() -> None:
    lapic = kvm_lapic_state()
    set_lapic_register(lapic, APIC_LVT_LINT0_OFFSET, 0x0001_0700)
    assert bytes(lapic.regs[0x350:0x354]) == b"\x00\x07\x01\x00"
    assert get_lapic_register(lapic, APIC_LVT_LINT0_OFFSET) == 0x0001_0700


def test_boot_msrs_enable_fast_strings_and_write_back() -> None:
    values = dict(boot_msr_entries())
    assert values[MSR_IA32_MISC_ENABLE] == 1
    assert values[MSR_MTRR_DEF_TYPE] == (1 << 11) | 6
    assert len(values) == len(boot_msr_entries())
