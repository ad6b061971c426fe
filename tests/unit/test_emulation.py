"""The emulating-host support: host detection, guest page-table walks, FWAIT and INT3."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmm.arch.x86_64.emulation import (
    EMULATING_HOST_BOOT_ARGS,
    EmulationError,
    HostKind,
    InstructionFallback,
    TranslationError,
    detect_host_kind,
    translate,
)
from vmm.kvm.structs import kvm_regs, kvm_sregs
from vmm.memory import GuestMemory

PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
KERNEL_VIRTUAL = 0xFFFF_FFFF_8100_0000
IDT_VIRTUAL = 0xFFFF_FFFF_8120_0000
STACK_VIRTUAL_TOP = 0xFFFF_FFFF_8130_0000
HANDLER = 0xFFFF_FFFF_8100_0ABC
KERNEL_CS = 0x10
KERNEL_SS = 0x18


class FakeVcpu:
    """Register state as KVM_GET_REGS/KVM_GET_SREGS would return it."""

    def __init__(self) -> None:
        self.regs = kvm_regs()
        self.sregs = kvm_sregs()

    def get_regs(self) -> kvm_regs:
        return kvm_regs.from_buffer_copy(bytes(self.regs))

    def set_regs(self, regs: kvm_regs) -> None:
        self.regs = kvm_regs.from_buffer_copy(bytes(regs))

    def get_sregs(self) -> kvm_sregs:
        return kvm_sregs.from_buffer_copy(bytes(self.sregs))


def map_kernel(memory: GuestMemory) -> None:
    """Map the top 2 GiB like Linux: 0xffffffff80000000 + x -> physical x, 2 MiB pages."""
    memory.write_le64(PML4 + 511 * 8, PDPT | 0x3)
    memory.write_le64(PDPT + 510 * 8, PD | 0x3)
    for index in range(16):
        memory.write_le64(PD + index * 8, (index << 21) | 0x83)


@pytest.fixture
def memory() -> GuestMemory:
    guest = GuestMemory([(0, 32 << 20)])
    map_kernel(guest)
    yield guest
    guest.close()


def write_gate(memory: GuestMemory, vector: int, handler: int, gate_type: int, ist: int = 0):
    physical = translate(memory, PML4, IDT_VIRTUAL) + vector * 16
    attributes = 0x80 | gate_type
    raw = struct.pack(
        "<HHBBHII", handler & 0xFFFF, KERNEL_CS, ist, attributes, (handler >> 16) & 0xFFFF,
        handler >> 32, 0,
    )
    memory.write(physical, raw)


def kernel_vcpu(rip: int) -> FakeVcpu:
    vcpu = FakeVcpu()
    vcpu.regs.rip = rip
    vcpu.regs.rsp = STACK_VIRTUAL_TOP - 0x18  # deliberately not 16-byte aligned
    vcpu.regs.rflags = 0x246  # IF set
    vcpu.sregs.cr3 = PML4
    vcpu.sregs.cs.selector = KERNEL_CS
    vcpu.sregs.ss.selector = KERNEL_SS
    vcpu.sregs.idt.base = IDT_VIRTUAL
    vcpu.sregs.idt.limit = 256 * 16 - 1
    return vcpu


def test_translate_large_page(memory: GuestMemory) -> None:
    assert translate(memory, PML4, KERNEL_VIRTUAL + 0x1234) == 0x100_1234


def test_translate_4k_page(memory: GuestMemory) -> None:
    memory.write_le64(PML4, PDPT | 0x3)
    memory.write_le64(PDPT, PD + 0x1000 | 0x3)
    memory.write_le64(PD + 0x1000, PT | 0x3)
    memory.write_le64(PT + 5 * 8, 0x7000 | 0x3)
    assert translate(memory, PML4, 5 * 0x1000 + 0x10) == 0x7010


def test_translate_unmapped_address_raises(memory: GuestMemory) -> None:
    with pytest.raises(TranslationError, match="not mapped"):
        translate(memory, PML4, 0x4000_0000)


def test_translate_table_outside_ram_raises(memory: GuestMemory) -> None:
    memory.write_le64(PML4 + 8, 0x7FFF_F000 | 0x3)
    with pytest.raises(TranslationError, match="outside guest RAM"):
        translate(memory, PML4, 1 << 39)


def test_fwait_is_skipped(memory: GuestMemory) -> None:
    vcpu = kernel_vcpu(KERNEL_VIRTUAL)
    memory.write(0x100_0000, b"\x9b\x90")
    fallback = InstructionFallback(memory)
    fallback.complete(vcpu, None)
    assert vcpu.regs.rip == KERNEL_VIRTUAL + 1
    assert fallback.counters.fwait == 1


def test_int3_pushes_trap_frame_and_enters_handler(memory: GuestMemory) -> None:
    write_gate(memory, 3, HANDLER, gate_type=0xE)
    rip = KERNEL_VIRTUAL + 0x40
    vcpu = kernel_vcpu(rip)
    original_rsp = vcpu.regs.rsp
    fallback = InstructionFallback(memory)
    fallback.complete(vcpu, b"\xcc")

    assert vcpu.regs.rip == HANDLER
    new_rsp = vcpu.regs.rsp
    assert new_rsp == ((original_rsp & ~0xF) - 40)
    frame = struct.unpack("<5Q", memory.read(translate(memory, PML4, new_rsp), 40))
    assert frame == (rip + 1, KERNEL_CS, 0x246, original_rsp, KERNEL_SS)
    assert not vcpu.regs.rflags & (1 << 9), "an interrupt gate clears IF"
    assert fallback.counters.int3 == 1


def test_int3_through_trap_gate_keeps_interrupts_enabled(memory: GuestMemory) -> None:
    write_gate(memory, 3, HANDLER, gate_type=0xF)
    vcpu = kernel_vcpu(KERNEL_VIRTUAL)
    InstructionFallback(memory).complete(vcpu, b"\xcc")
    assert vcpu.regs.rflags & (1 << 9)


def test_int3_with_missing_gate_raises(memory: GuestMemory) -> None:
    vcpu = kernel_vcpu(KERNEL_VIRTUAL)
    with pytest.raises(EmulationError, match="IDT gate 3"):
        InstructionFallback(memory).complete(vcpu, b"\xcc")


def test_unknown_instruction_names_bytes_and_rip(memory: GuestMemory) -> None:
    vcpu = kernel_vcpu(KERNEL_VIRTUAL + 0x10)
    fallback = InstructionFallback(memory)
    with pytest.raises(EmulationError) as raised:
        fallback.complete(vcpu, bytes.fromhex("f3480fb8c7"))
    assert "f3 48 0f b8 c7" in str(raised.value)
    assert f"{KERNEL_VIRTUAL + 0x10:#x}" in str(raised.value)
    assert fallback.counters.failed == 1


def test_instruction_bytes_read_from_guest_when_exit_has_none(memory: GuestMemory) -> None:
    memory.write(0x100_0000, b"\x0f\x0b")
    with pytest.raises(EmulationError, match="0f 0b"):
        InstructionFallback(memory).complete(kernel_vcpu(KERNEL_VIRTUAL), None)


def test_detect_host_kind_from_cpu_flags(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 svm lm\n")
    assert detect_host_kind(str(cpuinfo), str(modules)) is HostKind.HARDWARE
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 lm\n")
    assert detect_host_kind(str(cpuinfo), str(modules)) is HostKind.EMULATING


def test_detect_host_kind_from_software_kvm_module(tmp_path: Path) -> None:
    (tmp_path / "kvm_pvm").mkdir()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags : vmx\n")
    assert detect_host_kind(str(cpuinfo), str(tmp_path)) is HostKind.EMULATING


def test_emulating_host_boot_args_hide_problem_features() -> None:
    assert EMULATING_HOST_BOOT_ARGS.startswith("noxsave ")
    hidden = EMULATING_HOST_BOOT_ARGS.split("clearcpuid=")[1].split(",")
    for feature in ("popcnt", "cx16", "smap"):
        assert feature in hidden
