"""Tiny 64-bit guests built from machine-code bytes, for tests that need /dev/kvm.

Each encoder returns the bytes of one instruction; encodings are from the
Intel SDM Vol. 2 instruction reference (opcode tables, ModRM table 2-2).
`TinyVm` builds a VM with 2 MiB of RAM, puts its vCPUs in 64-bit long mode
with vmm.arch.x86_64.regs and loads code at CODE_ADDRESS.
"""

from __future__ import annotations

import os
import struct
from types import TracebackType
from typing import Final

from vmm.arch.x86_64 import layout, regs
from vmm.kvm import ExitReason, Kvm, KvmError, MpState, Vcpu, Vm
from vmm.memory import GuestMemory

GUEST_RAM_SIZE: Final = 2 << 20
CODE_ADDRESS: Final = layout.HIMEM_START
# Guest physical addresses inside the identity map but outside RAM: MMIO exits.
UNMAPPED_ADDRESS: Final = 0x3000_0000


def kvm_unusable_reason() -> str | None:
    """Return why /dev/kvm cannot run a VM here, or None when it can."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    try:
        with Kvm() as kvm, kvm.create_vm():
            pass
    except (OSError, KvmError) as error:
        return f"/dev/kvm cannot create a VM: {error}"
    return None


def mov_al_imm8(value: int) -> bytes:
    """MOV AL, imm8: B0 ib."""
    return bytes([0xB0, value])


def mov_eax_imm32(value: int) -> bytes:
    """MOV EAX, imm32: B8 id (zero-extends into RAX)."""
    return b"\xb8" + struct.pack("<I", value)


def mov_ebx_imm32(value: int) -> bytes:
    """MOV EBX, imm32: BB id (zero-extends into RBX)."""
    return b"\xbb" + struct.pack("<I", value)


def mov_ecx_imm32(value: int) -> bytes:
    """MOV ECX, imm32: B9 id."""
    return b"\xb9" + struct.pack("<I", value)


def out_imm8_al(port: int) -> bytes:
    """OUT imm8, AL: E6 ib."""
    return bytes([0xE6, port])


def out_imm8_eax(port: int) -> bytes:
    """OUT imm8, EAX: E7 ib."""
    return bytes([0xE7, port])


def in_al_imm8(port: int) -> bytes:
    """IN AL, imm8: E4 ib."""
    return bytes([0xE4, port])


def mov_dword_ptr_rbx_imm32(value: int) -> bytes:
    """MOV DWORD PTR [RBX], imm32: C7 /0 id with ModRM 0x03 (mod 00, reg 0, rm RBX)."""
    return b"\xc7\x03" + struct.pack("<I", value)


def mov_eax_dword_ptr_rbx() -> bytes:
    """MOV EAX, DWORD PTR [RBX]: 8B /r with ModRM 0x03 (mod 00, reg EAX, rm RBX)."""
    return b"\x8b\x03"


def mov_edx_edi() -> bytes:
    """MOV EDX, EDI: 89 /r with ModRM 0xFA (mod 11, reg EDI, rm EDX)."""
    return b"\x89\xfa"


def mov_eax_edx() -> bytes:
    """MOV EAX, EDX: 89 /r with ModRM 0xD0 (mod 11, reg EDX, rm EAX)."""
    return b"\x89\xd0"


def loop_rel8(displacement: int) -> bytes:
    """LOOP rel8: E2 cb (decrement RCX, jump if not zero)."""
    return bytes([0xE2, displacement & 0xFF])


def hlt() -> bytes:
    """HLT: F4."""
    return b"\xf4"


def jmp_self() -> bytes:
    """JMP rel8 -2: EB FE, a jump to itself."""
    return b"\xeb\xfe"


class TinyVm:
    """A VM with 2 MiB of RAM and `vcpu_count` vCPUs in long mode at CODE_ADDRESS."""

    def __init__(self, code: bytes, vcpu_count: int = 1, irqchip: bool = False) -> None:
        self.kvm = Kvm()
        self.memory = GuestMemory([(0, GUEST_RAM_SIZE)])
        self.vm: Vm = self.kvm.create_vm()
        self.vm.set_user_memory_region(
            0, 0, GUEST_RAM_SIZE, self.memory.regions[0].host_address
        )
        if irqchip:
            self.vm.create_irqchip()
        self.memory.write(CODE_ADDRESS, code)
        self.vcpus: list[Vcpu] = []
        for index in range(vcpu_count):
            vcpu = self.vm.create_vcpu(index)
            regs.setup_sregs(vcpu, self.memory)
            regs.setup_regs(vcpu, CODE_ADDRESS, layout.ZERO_PAGE_START)
            regs.setup_fpu(vcpu)
            if irqchip:
                # The in-kernel LAPIC keeps every vCPU but the first waiting for INIT/SIPI.
                vcpu.set_mp_state(MpState.RUNNABLE)
            self.vcpus.append(vcpu)

    def run_until(self, vcpu: Vcpu, expected: ExitReason, limit: int = 16) -> ExitReason:
        """Run `vcpu` until an exit of kind `expected`, at most `limit` exits; return it."""
        seen = []
        for _ in range(limit):
            reason = vcpu.run()
            seen.append(reason)
            if reason == expected:
                return reason
        raise AssertionError(f"no {expected!r} exit within {limit} exits; saw {seen}")

    def close(self) -> None:
        self.vm.close()
        self.memory.close()
        self.kvm.close()

    def __enter__(self) -> TinyVm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
