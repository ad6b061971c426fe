"""Model-specific registers a vCPU starts with, and `setup_msrs` to load them.

MSR numbers and bits are from the Intel SDM Vol. 4, chapter 2 ("Model-Specific
Registers"), and the AMD APM Vol. 2, appendix A, for the SYSCALL MSRs.
The SYSENTER and SYSCALL MSRs and KERNEL_GS_BASE start at 0, as after reset,
so that a vCPU reused after a reboot carries no stale values.
"""

from __future__ import annotations

from typing import Final

from vmm.kvm import MsrEntry, Vcpu

MSR_IA32_TSC: Final = 0x10
MSR_IA32_SYSENTER_CS: Final = 0x174
MSR_IA32_SYSENTER_ESP: Final = 0x175
MSR_IA32_SYSENTER_EIP: Final = 0x176
MSR_IA32_MISC_ENABLE: Final = 0x1A0
MSR_MTRR_DEF_TYPE: Final = 0x2FF
MSR_STAR: Final = 0xC000_0081
MSR_LSTAR: Final = 0xC000_0082
MSR_CSTAR: Final = 0xC000_0083
MSR_SYSCALL_MASK: Final = 0xC000_0084  # IA32_FMASK
MSR_KERNEL_GS_BASE: Final = 0xC000_0102

# IA32_MISC_ENABLE bit 0: fast-string operations for REP MOVS/STOS.
MISC_ENABLE_FAST_STRING: Final = 1 << 0
# IA32_MTRR_DEF_TYPE (SDM Vol. 3A, 12.11.2.1): bits 7:0 default memory type, bit 11 enable.
MTRR_DEF_TYPE_ENABLE: Final = 1 << 11
MTRR_MEMORY_TYPE_WRITE_BACK: Final = 6


def boot_msr_entries() -> list[MsrEntry]:
    """Return the MSR values a vCPU has when the kernel's entry point starts."""
    return [
        MsrEntry(MSR_IA32_SYSENTER_CS, 0),
        MsrEntry(MSR_IA32_SYSENTER_ESP, 0),
        MsrEntry(MSR_IA32_SYSENTER_EIP, 0),
        MsrEntry(MSR_STAR, 0),
        MsrEntry(MSR_CSTAR, 0),
        MsrEntry(MSR_KERNEL_GS_BASE, 0),
        MsrEntry(MSR_SYSCALL_MASK, 0),
        MsrEntry(MSR_LSTAR, 0),
        MsrEntry(MSR_IA32_TSC, 0),
        MsrEntry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        MsrEntry(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLE | MTRR_MEMORY_TYPE_WRITE_BACK),
    ]


def setup_msrs(vcpu: Vcpu) -> None:
    """Load the boot MSRs; raise KvmError naming the first MSR KVM rejects."""
    vcpu.set_msrs(boot_msr_entries())
