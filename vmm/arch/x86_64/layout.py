"""Guest physical memory map for x86-64 microVMs.

Low memory (below 1 MiB) holds the boot structures the monitor writes before
the first KVM_RUN. RAM runs from 0 up to the 32-bit MMIO gap and resumes at
4 GiB when the guest has more memory than fits below the gap.

    0x0000_0500  GDT (4 entries)              0x0000_0520  IDT (empty)
    0x0000_7000  zero page (struct boot_params, 4 KiB)
    0x0000_8ff0  initial stack pointer
    0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB, 2 MiB pages)
    0x0002_0000  kernel command line (COMMAND_LINE_MAX bytes)
    0x0002_1000  setup_data chain (RNG seed)
    0x0009_fc00  MP table (in the EBDA, where the Intel MP spec says to look)
    0x000e_0000  ACPI RSDP and tables (the BIOS read-only area the kernel scans)
    0x0010_0000  HIMEM_START: first byte of e820 usable RAM above 1 MiB
    0xc000_0000  MMIO gap: boot timer, then one 4 KiB page per virtio-mmio device
    0xfec0_0000  IOAPIC          0xfee0_0000  local APIC
    0x1_0000_0000  RAM beyond the gap
"""

from typing import Final

PAGE_SIZE: Final = 0x1000

GDT_START: Final = 0x500
IDT_START: Final = 0x520
ZERO_PAGE_START: Final = 0x7000
BOOT_STACK_POINTER: Final = 0x8FF0
PML4_START: Final = 0x9000
PDPTE_START: Final = 0xA000
PDE_START: Final = 0xB000
CMDLINE_START: Final = 0x20000
# Linux x86 COMMAND_LINE_SIZE (arch/x86/include/uapi/asm/setup.h), terminating NUL included.
COMMAND_LINE_MAX: Final = 2048
SETUP_DATA_START: Final = 0x21000
MPTABLE_START: Final = 0x9FC00
# Low memory ends where the EBDA starts; [EBDA_START, HIMEM_START) is reserved in e820.
EBDA_START: Final = 0x9FC00
ACPI_START: Final = 0xE0000
ACPI_END: Final = 0x100000
HIMEM_START: Final = 0x100000

# 32-bit MMIO gap: [MMIO_GAP_START, 4 GiB) is never RAM.
MMIO_GAP_START: Final = 0xC000_0000
MMIO_GAP_END: Final = 0x1_0000_0000
BOOT_TIMER_ADDRESS: Final = 0xC000_0000
BOOT_TIMER_SIZE: Final = 0x1000
VIRTIO_MMIO_START: Final = 0xC000_1000
VIRTIO_MMIO_SIZE: Final = 0x1000
IOAPIC_ADDRESS: Final = 0xFEC0_0000
LAPIC_ADDRESS: Final = 0xFEE0_0000

# Legacy devices: port ranges and their ISA IRQs.
SERIAL_COM1_PORT: Final = 0x3F8
SERIAL_PORT_COUNT: Final = 8
SERIAL_COM1_IRQ: Final = 4
I8042_DATA_PORT: Final = 0x60
I8042_COMMAND_PORT: Final = 0x64
I8042_IRQ: Final = 1
# virtio-mmio devices take IRQs from VIRTIO_IRQ_FIRST upwards, one each.
VIRTIO_IRQ_FIRST: Final = 5
VIRTIO_IRQ_LAST: Final = 23


def guest_ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Split `mem_size` bytes of RAM around the MMIO gap into (guest_base, size) pairs."""
    below_gap = min(mem_size, MMIO_GAP_START)
    ranges = [(0, below_gap)]
    if mem_size > below_gap:
        ranges.append((MMIO_GAP_END, mem_size - below_gap))
    return ranges


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """Return (MMIO base, IRQ) of the index-th virtio-mmio device."""
    irq = VIRTIO_IRQ_FIRST + index
    if irq > VIRTIO_IRQ_LAST:
        raise ValueError(
            f"virtio device {index} needs IRQ {irq}; IRQs end at {VIRTIO_IRQ_LAST}"
        )
    return VIRTIO_MMIO_START + index * VIRTIO_MMIO_SIZE, irq
