"""Support for hosts whose KVM runs guest supervisor code through an instruction emulator.

Why this exists
---------------
On hosts without VMX or SVM (for example KVM backed by the ``kvm_pvm`` module),
guest code at CPL0 and all real-mode code are carried out by the host kernel's
x86 instruction emulator. That emulator does not know every instruction. When
it meets one it cannot run, KVM_RUN returns KVM_EXIT_INTERNAL_ERROR with
suberror KVM_INTERNAL_ERROR_EMULATION, and the vCPU is left exactly at the
failing instruction. The VM is not lost: user space may carry the instruction
out itself, update the registers, and call KVM_RUN again.

Three measures keep a Linux guest going on such a host:

1. Kernel parameters (``EMULATING_HOST_BOOT_ARGS``) that keep the guest off the
   instructions the emulator cannot run. Hiding them through KVM_SET_CPUID2 is
   not enough there: the guest still sees the host's feature bits.
2. Completing, from user space, the two instructions that a 6.1 kernel cannot
   avoid: FWAIT (a no-op when no x87 exception is pending, which a guest that
   never unmasks x87 exceptions cannot have) and INT3, which the kernel uses
   in its boot self test and while patching its own text. INT3 must raise #BP.
   KVM_SET_VCPU_EVENTS, the usual way to inject an exception, is rejected with
   EINVAL on these hosts, so the monitor delivers #BP the way the CPU would:
   it reads the gate from the guest IDT, pushes the 64-bit interrupt frame on
   the guest stack (walking the guest page tables to find it), and points RIP
   at the handler.
3. Recognising the end of the road: guest user space cannot run on these
   hosts at all (the first SYSCALL of init faults), so when the guest kernel
   panics because init died, the monitor says why.

On hosts with hardware virtualisation none of this is active.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Protocol

from vmm.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

# Kernel parameters that keep a Linux 6.1 guest off instructions the host
# emulator cannot carry out (measured by booting a 6.1 guest on a kvm_pvm host).
# `noxsave` avoids XRSTOR in FPU set-up; the clearcpuid list hides the features
# whose instructions (CMPXCHG16B, POPCNT, CLAC/STAC, ...) the kernel would
# otherwise select at boot through its alternatives.
_HIDDEN_CPU_FEATURES = (
    "popcnt,cx16,smap,smep,umip,fsgsbase,rdrand,rdseed,bmi1,bmi2,movbe,avx,avx2,"
    "sse4_1,sse4_2,ssse3,aes,pclmulqdq,rdpid,invpcid,pcid,erms,fsrm,avx512f,sha_ni,"
    "vaes,gfni,xsaveopt,xsavec,xsaves,clflushopt,clwb,adx,f16c,fma,abm"
)
EMULATING_HOST_BOOT_ARGS = f"noxsave clearcpuid={_HIDDEN_CPU_FEATURES}"

# The guest kernel's panic message when init exits; on an emulating host that is
# init's first system call faulting.
INIT_DIED_MARKER = b"Attempted to kill init!"

# Kernel modules that implement /dev/kvm without hardware virtualisation.
_SOFTWARE_KVM_MODULES = ("kvm_pvm",)


class HostKind(enum.Enum):
    HARDWARE = "hardware virtualisation"
    EMULATING = "KVM emulating guest supervisor code"


def detect_host_kind(
    cpuinfo_path: str = "/proc/cpuinfo", sysfs_module_dir: str = "/sys/module"
) -> HostKind:
    """Tell whether this host's KVM runs guest supervisor code in hardware.

    A host is EMULATING when a software KVM module is loaded or the CPU flags
    list neither vmx nor svm.
    """
    for module in _SOFTWARE_KVM_MODULES:
        if os.path.isdir(os.path.join(sysfs_module_dir, module)):
            return HostKind.EMULATING
    try:
        with open(cpuinfo_path, encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    if "vmx" in flags or "svm" in flags:
                        return HostKind.HARDWARE
                    return HostKind.EMULATING
    except OSError as error:
        log.warning("cannot read %s (%s); assuming hardware virtualisation", cpuinfo_path, error)
    return HostKind.HARDWARE


# --- Guest page-table walk (Intel SDM vol. 3A, 4.5: 4-level paging) -----------------------

PTE_PRESENT = 1 << 0
PTE_PAGE_SIZE = 1 << 7
_PTE_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
CR0_PG = 1 << 31
CR4_LA57 = 1 << 12


class TranslationError(Exception):
    """A guest virtual address that the guest's own page tables do not map."""


def translate(memory: GuestMemory, cr3: int, virtual_address: int) -> int:
    """Walk 4-level guest page tables from CR3; return the guest physical address.

    Handles 1 GiB and 2 MiB pages. Raises TranslationError for a non-present
    entry or a table outside guest RAM.
    """
    table = cr3 & _PTE_ADDRESS_MASK
    # Levels PML4, PDPT, PD, PT: index bits 47:39, 38:30, 29:21, 20:12.
    for level, shift in enumerate((39, 30, 21, 12)):
        index = (virtual_address >> shift) & 0x1FF
        try:
            entry = memory.read_le64(table + index * 8)
        except GuestMemoryError as error:
            raise TranslationError(
                f"page table at {table:#x} for {virtual_address:#x} is outside guest RAM"
            ) from error
        if not entry & PTE_PRESENT:
            raise TranslationError(
                f"{virtual_address:#x} is not mapped (level {4 - level} entry {entry:#x})"
            )
        is_large = level in (1, 2) and entry & PTE_PAGE_SIZE
        if is_large:
            page_mask = (1 << shift) - 1
            return (entry & _PTE_ADDRESS_MASK & ~page_mask) | (virtual_address & page_mask)
        table = entry & _PTE_ADDRESS_MASK
    return table | (virtual_address & 0xFFF)


def read_virtual(memory: GuestMemory, cr3: int, address: int, length: int) -> bytes:
    """Read guest virtual memory, page by page, through the guest page tables."""
    data = bytearray()
    while length > 0:
        chunk = min(length, 0x1000 - (address & 0xFFF))
        data += memory.read(translate(memory, cr3, address), chunk)
        address += chunk
        length -= chunk
    return bytes(data)


def write_virtual(memory: GuestMemory, cr3: int, address: int, data: bytes) -> None:
    """Write guest virtual memory, page by page, through the guest page tables."""
    offset = 0
    while offset < len(data):
        chunk = min(len(data) - offset, 0x1000 - ((address + offset) & 0xFFF))
        physical = translate(memory, cr3, address + offset)
        memory.write(physical, data[offset : offset + chunk])
        offset += chunk


# --- Completing instructions -----------------------------------------------------------

OPCODE_FWAIT = 0x9B
OPCODE_INT3 = 0xCC
BREAKPOINT_VECTOR = 3

# 64-bit IDT gate descriptor (SDM vol. 3A, 6.14.1): 16 bytes.
IDT_GATE_SIZE = 16
GATE_TYPE_INTERRUPT = 0xE
GATE_TYPE_TRAP = 0xF
# RFLAGS bits cleared on interrupt delivery (SDM vol. 3A, 6.12.1).
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
# 64-bit TSS (SDM vol. 3A, 7.7): RSP0 at offset 4, IST1..IST7 from offset 0x24.
TSS_RSP0_OFFSET = 0x04
TSS_IST1_OFFSET = 0x24


class EmulationError(Exception):
    """An instruction the host could not emulate and this monitor cannot complete.

    The vCPU cannot go on; the caller stops the VM and reports this message,
    which names the instruction bytes and RIP.
    """


class RegisterAccess(Protocol):
    """The vCPU operations the fallback needs (vmm.kvm.system.Vcpu provides them)."""

    def get_regs(self) -> ctypes.Structure: ...

    def set_regs(self, regs: ctypes.Structure) -> None: ...

    def get_sregs(self) -> ctypes.Structure: ...


@dataclass
class FallbackCounters:
    """How many instructions of each kind user space completed."""

    fwait: int = 0
    int3: int = 0
    failed: int = 0
    by_opcode: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class IdtGate:
    offset: int
    selector: int
    ist: int
    gate_type: int
    present: bool

    @classmethod
    def decode(cls, raw: bytes) -> IdtGate:
        low, selector, ist, attributes, middle, high, _ = struct.unpack("<HHBBHII", raw)
        return cls(
            offset=low | (middle << 16) | (high << 32),
            selector=selector,
            ist=ist & 0x7,
            gate_type=attributes & 0xF,
            present=bool(attributes & 0x80),
        )


class InstructionFallback:
    """Complete the instructions a software-emulating host cannot run.

    One object per VM; `complete` runs on the vCPU thread that took the exit.
    """

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.counters = FallbackCounters()

    def complete(self, vcpu: RegisterAccess, exit_bytes: bytes | None) -> None:
        """Carry out the instruction at RIP, or raise EmulationError naming it.

        `exit_bytes` are the instruction bytes KVM reported with the exit, when
        it reported any; otherwise they are read from guest memory at RIP.
        """
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        code = exit_bytes or self._fetch(sregs.cr3, regs.rip)
        opcode = code[0] if code else None
        if opcode == OPCODE_FWAIT:
            regs.rip += 1
            vcpu.set_regs(regs)
            self.counters.fwait += 1
            return
        if opcode == OPCODE_INT3:
            self._deliver_breakpoint(vcpu, regs, sregs)
            self.counters.int3 += 1
            return
        self.counters.failed += 1
        raise EmulationError(
            f"the host could not emulate the instruction at RIP {regs.rip:#x} "
            f"(bytes {code.hex(' ') if code else 'unreadable'}) and this monitor "
            "cannot complete it"
        )

    def _fetch(self, cr3: int, rip: int) -> bytes:
        try:
            return read_virtual(self.memory, cr3, rip, 15)
        except (TranslationError, GuestMemoryError):
            # The instruction may end near an unmapped page; one byte decides the opcode.
            try:
                return read_virtual(self.memory, cr3, rip, 1)
            except (TranslationError, GuestMemoryError):
                return b""

    def _deliver_breakpoint(self, vcpu: RegisterAccess, regs: ctypes.Structure,
                            sregs: ctypes.Structure) -> None:
        """Raise #BP as a trap: the frame's RIP points past the INT3 (SDM vol. 3A, 6.5)."""
        gate = self._read_gate(sregs, BREAKPOINT_VECTOR)
        current_cpl = sregs.cs.selector & 3
        if gate.selector & ~3 != sregs.cs.selector & ~3:
            raise EmulationError(
                f"#BP gate selector {gate.selector:#x} differs from CS "
                f"{sregs.cs.selector:#x}; far delivery is not supported (RIP {regs.rip:#x})"
            )
        if current_cpl != 0:
            raise EmulationError(
                f"INT3 at CPL {current_cpl} (RIP {regs.rip:#x}); only CPL 0 is supported"
            )
        stack = regs.rsp
        if gate.ist:
            stack = self._read_tss_qword(sregs, TSS_IST1_OFFSET + (gate.ist - 1) * 8)
        stack &= ~0xF
        frame = struct.pack(
            "<5Q",
            regs.rip + 1,
            sregs.cs.selector,
            regs.rflags,
            regs.rsp,
            sregs.ss.selector,
        )
        stack -= len(frame)
        try:
            write_virtual(self.memory, sregs.cr3, stack, frame)
        except (TranslationError, GuestMemoryError) as error:
            raise EmulationError(
                f"cannot push the #BP frame at {stack:#x} (RIP {regs.rip:#x}): {error}"
            ) from error
        regs.rsp = stack
        regs.rip = gate.offset
        regs.rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF)
        if gate.gate_type == GATE_TYPE_INTERRUPT:
            regs.rflags &= ~RFLAGS_IF
        vcpu.set_regs(regs)

    def _read_gate(self, sregs: ctypes.Structure, vector: int) -> IdtGate:
        offset = vector * IDT_GATE_SIZE
        if offset + IDT_GATE_SIZE - 1 > sregs.idt.limit:
            raise EmulationError(
                f"IDT limit {sregs.idt.limit:#x} does not cover vector {vector}"
            )
        try:
            raw = read_virtual(self.memory, sregs.cr3, sregs.idt.base + offset, IDT_GATE_SIZE)
        except (TranslationError, GuestMemoryError) as error:
            raise EmulationError(f"cannot read IDT gate {vector}: {error}") from error
        gate = IdtGate.decode(raw)
        if not gate.present or gate.gate_type not in (GATE_TYPE_INTERRUPT, GATE_TYPE_TRAP):
            raise EmulationError(f"IDT gate {vector} is not a present interrupt or trap gate")
        return gate

    def _read_tss_qword(self, sregs: ctypes.Structure, offset: int) -> int:
        try:
            raw = read_virtual(self.memory, sregs.cr3, sregs.tr.base + offset, 8)
        except (TranslationError, GuestMemoryError) as error:
            raise EmulationError(f"cannot read the TSS at {sregs.tr.base:#x}: {error}") from error
        return int.from_bytes(raw, "little")
