"""vCPU state for entering a 64-bit Linux kernel: GDT, page tables, control and general registers.

Follows the 64-bit boot protocol of Linux (Documentation/arch/x86/boot.rst,
"64-bit Boot Protocol"): the CPU is in long mode with paging on, the loaded
range is identity-mapped, a GDT contains flat 4 GiB segments with __BOOT_CS
(0x10) execute/read and __BOOT_DS (0x18) read/write, CS is __BOOT_CS and
DS/ES/SS are __BOOT_DS, interrupts are off and RSI holds the physical address
of struct boot_params (the zero page).

Descriptor formats are from the Intel SDM Vol. 3A, section 3.4.5 (segment
descriptors) and 7.2.3 (TSS descriptor in 64-bit mode); page-table formats
from section 4.5 (4-level paging).
"""

from __future__ import annotations

from typing import Final

from vmm.arch.x86_64 import layout
from vmm.kvm import Vcpu
from vmm.kvm.structs import kvm_segment
from vmm.memory import GuestMemory

# GDT indices and selectors (selector = index * 8, TI = 0, RPL = 0).
GDT_NULL_INDEX: Final = 0
GDT_TSS_INDEX: Final = 1
GDT_CODE_INDEX: Final = 2
GDT_DATA_INDEX: Final = 3
GDT_ENTRY_COUNT: Final = 4
GDT_ENTRY_SIZE: Final = 8
BOOT_CS: Final = GDT_CODE_INDEX * GDT_ENTRY_SIZE  # __BOOT_CS = 0x10
BOOT_DS: Final = GDT_DATA_INDEX * GDT_ENTRY_SIZE  # __BOOT_DS = 0x18
BOOT_TSS: Final = GDT_TSS_INDEX * GDT_ENTRY_SIZE

# Segment descriptor type field (SDM 3.4.5.1, table 3-1 and 3-2).
SEGMENT_TYPE_DATA_READ_WRITE_ACCESSED: Final = 0x3
SEGMENT_TYPE_CODE_EXECUTE_READ_ACCESSED: Final = 0xB
SEGMENT_TYPE_TSS64_BUSY: Final = 0xB
# Access byte (descriptor bits 40-47) and flags nibble (bits 52-55).
DESC_S: Final = 1 << 4  # code or data, not a system descriptor
DESC_DPL_SHIFT: Final = 5
DESC_P: Final = 1 << 7
DESC_AVL: Final = 1 << 0
DESC_L: Final = 1 << 1  # 64-bit code segment
DESC_DB: Final = 1 << 2  # 32-bit default operand size (data: 32-bit stack)
DESC_G: Final = 1 << 3  # limit counts 4 KiB units
FLAT_LIMIT: Final = 0xFFFFF  # 4 GiB with DESC_G
# A 64-bit TSS is 104 bytes (SDM 8.7, figure 8-11); the limit is size - 1.
TSS_LIMIT: Final = 104 - 1

# Control registers and EFER (SDM 2.5 and 2.2.1).
X86_CR0_PE: Final = 1 << 0
X86_CR0_PG: Final = 1 << 31
X86_CR4_PAE: Final = 1 << 5
EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10

# RFLAGS bit 1 is reserved and always 1 (SDM 3.4.3); IF and every other flag are 0.
RFLAGS_RESERVED_ONE: Final = 1 << 1

# Paging entries (SDM 4.5, tables 4-15 to 4-18).
PTE_PRESENT: Final = 1 << 0
PTE_WRITABLE: Final = 1 << 1
PDE_PAGE_SIZE: Final = 1 << 7  # a PDE with PS maps a 2 MiB page
PAGE_TABLE_ENTRIES: Final = 512
HUGE_PAGE_SIZE: Final = 2 << 20
IDENTITY_MAP_SIZE: Final = PAGE_TABLE_ENTRIES * HUGE_PAGE_SIZE  # 1 GiB

# An IDT of one empty gate: any interrupt before the kernel loads its own IDT
# is a triple fault, which KVM reports as KVM_EXIT_SHUTDOWN.
IDT_LIMIT: Final = 8 - 1

# x87 and SSE control words after FNINIT and at reset (SDM Vol. 1, 8.1.5 and 10.2.3.1).
FPU_CONTROL_WORD_DEFAULT: Final = 0x37F
MXCSR_DEFAULT: Final = 0x1F80


def gdt_entry(access: int, flags: int, base: int, limit: int) -> int:
    """Encode an 8-byte segment descriptor (SDM 3.4.5, figure 3-8).

    `access` is descriptor bits 40-47 (type, S, DPL, P), `flags` bits 52-55
    (AVL, L, D/B, G), `limit` a 20-bit value and `base` a 32-bit address.
    """
    if not 0 <= limit <= 0xFFFFF:
        raise ValueError(f"segment limit {limit:#x} does not fit in 20 bits")
    if not 0 <= base <= 0xFFFF_FFFF:
        raise ValueError(f"segment base {base:#x} does not fit in 32 bits")
    return (
        (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | (access & 0xFF) << 40
        | (limit >> 16 & 0xF) << 48
        | (flags & 0xF) << 52
        | (base >> 24 & 0xFF) << 56
    )


def segment_from_gdt_entry(index: int, entry: int) -> kvm_segment:
    """Decode a descriptor into the kvm_segment KVM loads for selector index * 8."""
    access = entry >> 40 & 0xFF
    flags = entry >> 52 & 0xF
    limit = (entry & 0xFFFF) | (entry >> 48 & 0xF) << 16
    if flags & DESC_G:
        limit = limit << 12 | 0xFFF
    base = (entry >> 16 & 0xFF_FFFF) | (entry >> 56 & 0xFF) << 24
    present = 1 if access & DESC_P else 0
    return kvm_segment(
        base=base,
        limit=limit,
        selector=index * GDT_ENTRY_SIZE,
        type=access & 0xF,
        present=present,
        dpl=access >> DESC_DPL_SHIFT & 0x3,
        db=1 if flags & DESC_DB else 0,
        s=1 if access & DESC_S else 0,
        l=1 if flags & DESC_L else 0,
        g=1 if flags & DESC_G else 0,
        avl=1 if flags & DESC_AVL else 0,
        unusable=0 if present else 1,
    )


def boot_gdt() -> list[int]:
    """Return the four boot descriptors: null, TSS, __BOOT_CS (64-bit code), __BOOT_DS.

    NOTE: the TSS descriptor holds only the low 8 of the 16 bytes a 64-bit
    TSS descriptor has (SDM 7.2.3), because __BOOT_CS must sit at 0x10. TR
    is loaded from kvm_sregs, not from this entry, so this works; a guest
    that runs `ltr 0x08` on this GDT would fault. Linux loads its own GDT
    and TSS before it does that.
    """
    code_access = DESC_P | DESC_S | SEGMENT_TYPE_CODE_EXECUTE_READ_ACCESSED
    data_access = DESC_P | DESC_S | SEGMENT_TYPE_DATA_READ_WRITE_ACCESSED
    tss_access = DESC_P | SEGMENT_TYPE_TSS64_BUSY
    return [
        0,
        gdt_entry(tss_access, 0, 0, TSS_LIMIT),
        gdt_entry(code_access, DESC_G | DESC_L, 0, FLAT_LIMIT),
        gdt_entry(data_access, DESC_G | DESC_DB, 0, FLAT_LIMIT),
    ]


def write_gdt(memory: GuestMemory, entries: list[int]) -> None:
    """Write descriptors at layout.GDT_START and one empty IDT gate at layout.IDT_START."""
    if layout.GDT_START + len(entries) * GDT_ENTRY_SIZE > layout.IDT_START:
        raise ValueError(
            f"{len(entries)} GDT entries at {layout.GDT_START:#x} run into the IDT at "
            f"{layout.IDT_START:#x}"
        )
    for index, entry in enumerate(entries):
        memory.write_le64(layout.GDT_START + index * GDT_ENTRY_SIZE, entry)
    memory.write_le64(layout.IDT_START, 0)


def write_identity_page_tables(memory: GuestMemory) -> None:
    """Identity-map guest physical [0, 1 GiB) with 2 MiB pages, writable, supervisor only.

    One PML4 entry points to one PDPT entry, which points to a page directory
    of 512 PDEs with the PS bit set.
    """
    memory.fill(layout.PML4_START, layout.PAGE_SIZE)
    memory.fill(layout.PDPTE_START, layout.PAGE_SIZE)
    memory.write_le64(layout.PML4_START, layout.PDPTE_START | PTE_PRESENT | PTE_WRITABLE)
    memory.write_le64(layout.PDPTE_START, layout.PDE_START | PTE_PRESENT | PTE_WRITABLE)
    for index in range(PAGE_TABLE_ENTRIES):
        pde = index * HUGE_PAGE_SIZE | PTE_PRESENT | PTE_WRITABLE | PDE_PAGE_SIZE
        memory.write_le64(layout.PDE_START + index * 8, pde)


def setup_sregs(vcpu: Vcpu, memory: GuestMemory) -> None:
    """Write the boot GDT, IDT and page tables, then switch `vcpu` to 64-bit long mode."""
    gdt = boot_gdt()
    write_gdt(memory, gdt)
    write_identity_page_tables(memory)

    sregs = vcpu.get_sregs()
    sregs.gdt.base = layout.GDT_START
    sregs.gdt.limit = len(gdt) * GDT_ENTRY_SIZE - 1
    sregs.idt.base = layout.IDT_START
    sregs.idt.limit = IDT_LIMIT

    code = segment_from_gdt_entry(GDT_CODE_INDEX, gdt[GDT_CODE_INDEX])
    data = segment_from_gdt_entry(GDT_DATA_INDEX, gdt[GDT_DATA_INDEX])
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = segment_from_gdt_entry(GDT_TSS_INDEX, gdt[GDT_TSS_INDEX])

    sregs.cr3 = layout.PML4_START
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)


def setup_regs(vcpu: Vcpu, entry: int, zero_page: int) -> None:
    """Set RIP to the kernel entry, RSI to the zero page and the boot stack; zero the rest."""
    regs = vcpu.get_regs()
    for name, _ in regs._fields_:
        setattr(regs, name, 0)
    regs.rip = entry
    regs.rsp = layout.BOOT_STACK_POINTER
    regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = zero_page
    regs.rflags = RFLAGS_RESERVED_ONE
    vcpu.set_regs(regs)


def setup_fpu(vcpu: Vcpu) -> None:
    """Give the x87 and SSE units their power-on control words."""
    fpu = vcpu.get_fpu()
    fpu.fcw = FPU_CONTROL_WORD_DEFAULT
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)
