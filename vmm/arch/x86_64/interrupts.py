"""Local APIC setup: route LINT0 to the PIC (ExtINT) and LINT1 to NMI.

This is how the local vector table of a PC's boot processor is wired in
"virtual wire" mode, so interrupts from the in-kernel 8259 PIC reach the
vCPU before the guest programs its IOAPIC. Register offsets and fields are
from the Intel SDM Vol. 3A, section 11.4.1 (table 11-1, local APIC register
address map) and 11.5.1 (local vector table).
"""

from __future__ import annotations

import struct
from typing import Final

from vmm.kvm import Vcpu
from vmm.kvm.structs import kvm_lapic_state

APIC_LVT_LINT0_OFFSET: Final = 0x350
APIC_LVT_LINT1_OFFSET: Final = 0x360

# LVT entry bits 10:8: delivery mode.
APIC_LVT_DELIVERY_MODE_SHIFT: Final = 8
APIC_LVT_DELIVERY_MODE_MASK: Final = 0x7 << APIC_LVT_DELIVERY_MODE_SHIFT
APIC_DELIVERY_MODE_FIXED: Final = 0b000
APIC_DELIVERY_MODE_NMI: Final = 0b100
APIC_DELIVERY_MODE_EXTINT: Final = 0b111

_REGISTER = struct.Struct("<I")


def get_lapic_register(lapic: kvm_lapic_state, offset: int) -> int:
    """Read the 32-bit APIC register at `offset` of a KVM_GET_LAPIC page."""
    return _REGISTER.unpack_from(lapic.regs, offset)[0]


def set_lapic_register(lapic: kvm_lapic_state, offset: int, value: int) -> None:
    _REGISTER.pack_into(lapic.regs, offset, value)


def with_delivery_mode(lvt_entry: int, mode: int) -> int:
    """Return `lvt_entry` with its delivery-mode field replaced, other bits kept."""
    cleared = lvt_entry & ~APIC_LVT_DELIVERY_MODE_MASK
    return cleared | mode << APIC_LVT_DELIVERY_MODE_SHIFT


def setup_lapic(vcpu: Vcpu) -> None:
    """Set LINT0 to ExtINT and LINT1 to NMI; needs the in-kernel irqchip."""
    lapic = vcpu.get_lapic()
    lint0 = get_lapic_register(lapic, APIC_LVT_LINT0_OFFSET)
    lint1 = get_lapic_register(lapic, APIC_LVT_LINT1_OFFSET)
    set_lapic_register(
        lapic, APIC_LVT_LINT0_OFFSET, with_delivery_mode(lint0, APIC_DELIVERY_MODE_EXTINT)
    )
    set_lapic_register(
        lapic, APIC_LVT_LINT1_OFFSET, with_delivery_mode(lint1, APIC_DELIVERY_MODE_NMI)
    )
    vcpu.set_lapic(lapic)
