"""ctypes mirrors of the KVM structures in linux/kvm.h and asm/kvm.h (x86-64).

Each Structure has the header's name and its fields in the header's order,
padding included, so `sizeof` and every `offsetof` match the C layout.
tests/unit/test_kvm_structs.py compiles the headers with gcc to check that.
Headers used: Linux 6.1 UAPI (`linux-libc-dev`).

Two deliberate deviations, both layout-neutral:
- `char` arrays (kvm_lapic_state.regs) are `c_uint8` arrays, because ctypes
  turns a `c_char` array field into `bytes` cut at the first NUL.
- Anonymous unions and structs of the header are ctypes `_anonymous_` fields
  named `u`, so their members are reached by the header's names.

Flexible array members (kvm_msrs.entries, kvm_cpuid2.entries,
kvm_msr_list.indices) have length 0 here, as in C; `kvm_msrs_of`,
`kvm_cpuid2_of` and `kvm_msr_list_of` build a Structure type with room for
a given count.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32
s64 = ctypes.c_int64

# asm/kvm.h
KVM_NR_INTERRUPTS: Final = 256
KVM_APIC_REG_SIZE: Final = 0x400
KVM_MAX_XCRS: Final = 16
KVM_XSAVE_REGION_WORDS: Final = 1024
# linux/kvm.h: the kvm_run exit union is padded to 256 bytes, the sync-regs union to 2048.
KVM_RUN_EXIT_UNION_SIZE: Final = 256
SYNC_REGS_SIZE_BYTES: Final = 2048
KVM_INTERNAL_ERROR_MAX_DATA: Final = 16
KVM_SYSTEM_EVENT_MAX_DATA: Final = 16


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = (
        [(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
        + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
        + [(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
        + [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]
    )


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("indices", u32 * 0)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * 0)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class _kvm_irq_level_u(ctypes.Union):
    _fields_ = [("irq", u32), ("status", s32)]


class kvm_irq_level(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("u", _kvm_irq_level_u), ("level", u32)]


class _kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class _kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _kvm_vcpu_events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _kvm_vcpu_events_exception),
        ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _kvm_vcpu_events_smi),
        ("triple_fault", _kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", u32 * KVM_XSAVE_REGION_WORDS)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class kvm_translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_sync_regs(ctypes.Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


# The members of struct kvm_run's exit union, each an anonymous struct in the header.


class _kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class _kvm_run_debug(ctypes.Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_hypercall(ctypes.Structure):
    _fields_ = [
        ("nr", u64),
        ("args", u64 * 6),
        ("ret", u64),
        ("longmode", u32),
        ("pad", u32),
    ]


class _kvm_run_tpr_access(ctypes.Structure):
    _fields_ = [("rip", u64), ("is_write", u32), ("pad", u32)]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("data", u64 * KVM_INTERNAL_ERROR_MAX_DATA),
    ]


class _kvm_run_emulation_failure(ctypes.Structure):
    # The header wraps insn_size and insn_bytes in an anonymous union of one
    # anonymous struct; flattening them keeps the offsets and the names.
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class _kvm_run_system_event_u(ctypes.Union):
    _fields_ = [("flags", u64), ("data", u64 * KVM_SYSTEM_EVENT_MAX_DATA)]


class _kvm_run_system_event(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", u32), ("ndata", u32), ("u", _kvm_run_system_event_u)]


class _kvm_run_msr(ctypes.Structure):
    _fields_ = [
        ("error", u8),
        ("pad", u8 * 7),
        ("reason", u32),
        ("index", u32),
        ("data", u64),
    ]


class _kvm_run_notify(ctypes.Structure):
    _fields_ = [("flags", u32)]


class _kvm_run_exit_u(ctypes.Union):
    _fields_ = [
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("debug", _kvm_run_debug),
        ("mmio", _kvm_run_mmio),
        ("hypercall", _kvm_run_hypercall),
        ("tpr_access", _kvm_run_tpr_access),
        ("internal", _kvm_run_internal),
        ("emulation_failure", _kvm_run_emulation_failure),
        ("system_event", _kvm_run_system_event),
        ("msr", _kvm_run_msr),
        ("notify", _kvm_run_notify),
        ("padding", ctypes.c_char * KVM_RUN_EXIT_UNION_SIZE),
    ]


class _kvm_run_s(ctypes.Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", ctypes.c_char * SYNC_REGS_SIZE_BYTES)]


class kvm_run(ctypes.Structure):
    """The vCPU's shared page: mapped from the vCPU fd, filled by KVM_RUN on each exit."""

    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", _kvm_run_exit_u),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", _kvm_run_s),
    ]


# Byte offsets into the kvm_run mapping of the exit data a device model reads or writes.
KVM_RUN_MMIO_DATA_OFFSET: Final = (
    kvm_run.u.offset + _kvm_run_exit_u.mmio.offset + _kvm_run_mmio.data.offset
)


@functools.lru_cache(maxsize=64)
def kvm_msrs_of(count: int) -> type[ctypes.Structure]:
    """Return a kvm_msrs layout with room for `count` entries."""
    return type(
        f"kvm_msrs_{count}",
        (ctypes.Structure,),
        {"_fields_": [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * count)]},
    )


@functools.lru_cache(maxsize=16)
def kvm_cpuid2_of(count: int) -> type[ctypes.Structure]:
    """Return a kvm_cpuid2 layout with room for `count` entries."""
    return type(
        f"kvm_cpuid2_{count}",
        (ctypes.Structure,),
        {"_fields_": [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * count)]},
    )


@functools.lru_cache(maxsize=4)
def kvm_msr_list_of(count: int) -> type[ctypes.Structure]:
    """Return a kvm_msr_list layout with room for `count` indices."""
    return type(
        f"kvm_msr_list_{count}",
        (ctypes.Structure,),
        {"_fields_": [("nmsrs", u32), ("indices", u32 * count)]},
    )


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf result, as in struct kvm_cpuid_entry2 without its padding."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def from_struct(cls, entry: kvm_cpuid_entry2) -> CpuidEntry:
        return cls(
            entry.function, entry.index, entry.flags, entry.eax, entry.ebx, entry.ecx, entry.edx
        )

    def to_struct(self) -> kvm_cpuid_entry2:
        return kvm_cpuid_entry2(
            self.function, self.index, self.flags, self.eax, self.ebx, self.ecx, self.edx
        )


# linux/kvm.h: kvm_run.io.direction
KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

# asm/kvm.h: kvm_cpuid_entry2.flags
KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Final = 1 << 0

# linux/kvm.h: kvm_userspace_memory_region.flags
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1

# linux/kvm.h: kvm_pit_config.flags
KVM_PIT_SPEAKER_DUMMY: Final = 1

# linux/kvm.h: kvm_irqfd.flags
KVM_IRQFD_FLAG_DEASSIGN: Final = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE: Final = 1 << 1

# linux/kvm.h: kvm_ioeventfd.flags (bit numbers from enum kvm_ioeventfd_flag_nr_*)
KVM_IOEVENTFD_FLAG_DATAMATCH: Final = 1 << 0
KVM_IOEVENTFD_FLAG_PIO: Final = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN: Final = 1 << 2

# linux/kvm.h: emulation_failure.flags
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: Final = 1 << 0


class ExitReason(IntEnum):
    """kvm_run.exit_reason: KVM_EXIT_<name> in linux/kvm.h (Linux 6.1).

    INTERRUPTED is the monitor's own value, never set by the kernel: KVM_RUN
    returned EINTR or EAGAIN (a signal, or immediate_exit), so the caller
    checks its stop flag and runs again. A value from a newer kernel that is
    not listed here becomes a pseudo-member named UNKNOWN_<value>.
    """

    INTERRUPTED = -1
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    S390_SIEIC = 13
    S390_RESET = 14
    DCR = 15
    NMI = 16
    INTERNAL_ERROR = 17
    OSI = 18
    PAPR_HCALL = 19
    S390_UCONTROL = 20
    WATCHDOG = 21
    S390_TSCH = 22
    EPR = 23
    SYSTEM_EVENT = 24
    S390_STSI = 25
    IOAPIC_EOI = 26
    HYPERV = 27
    ARM_NISV = 28
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    RISCV_SBI = 35
    RISCV_CSR = 36
    NOTIFY = 37

    @classmethod
    def _missing_(cls, value: object) -> ExitReason | None:
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member


class InternalErrorSuberror(IntEnum):
    """kvm_run.internal.suberror: KVM_INTERNAL_ERROR_<name> in linux/kvm.h."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class MpState(IntEnum):
    """kvm_mp_state.mp_state on x86: KVM_MP_STATE_<name> in linux/kvm.h.

    With the in-kernel irqchip, vCPUs other than 0 start UNINITIALIZED and
    wait in KVM_RUN for INIT and SIPI from another vCPU.
    """

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    AP_RESET_HOLD = 9
    SUSPENDED = 10


class SystemEventType(IntEnum):
    """kvm_run.system_event.type: KVM_SYSTEM_EVENT_<name> in linux/kvm.h."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6
