"""Run tiny 64-bit guests on /dev/kvm and check their exits and register state.

On hosts where KVM keeps HLT inside the kernel when the in-kernel irqchip
exists, a guest with the irqchip signals its end with a port write to
DONE_PORT instead of relying on KVM_EXIT_HLT.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

import pytest

from tests.kvm.guests import (
    CODE_ADDRESS,
    UNMAPPED_ADDRESS,
    TinyVm,
    hlt,
    in_al_imm8,
    jmp_self,
    kvm_unusable_reason,
    loop_rel8,
    mov_al_imm8,
    mov_eax_dword_ptr_rbx,
    mov_ebx_imm32,
    mov_ecx_imm32,
    mov_dword_ptr_rbx_imm32,
    mov_eax_edx,
    mov_edx_edi,
    out_imm8_al,
    out_imm8_eax,
)
from vmm.arch.x86_64 import cpuid, interrupts, layout, msrs, regs
from vmm.kvm import ExitReason, InternalErrorSuberror, Kvm, KvmError, MsrEntry, Vcpu
from vmm.kvm.structs import KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT

_UNUSABLE = kvm_unusable_reason()
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(_UNUSABLE is not None, reason=f"needs a usable /dev/kvm: {_UNUSABLE}"),
]

DATA_PORT = 0xE9
DONE_PORT = 0xF4
OUTPUT_BYTE = 0x42
MMIO_VALUE = 0x1234_5678
THREAD_TIMEOUT_SECONDS = 60.0

# out 0xE9, 0x42; mov dword [0x3000_0000], 0x12345678; out 0xF4, al; hlt
BASIC_CODE = (
    mov_al_imm8(OUTPUT_BYTE)
    + out_imm8_al(DATA_PORT)
    + mov_ebx_imm32(UNMAPPED_ADDRESS)
    + mov_dword_ptr_rbx_imm32(MMIO_VALUE)
    + out_imm8_al(DONE_PORT)
    + hlt()
)


def _check_port_write(vcpu: Vcpu, port: int, data: bytes) -> None:
    io = vcpu.io_exit()
    assert io.direction == KVM_EXIT_IO_OUT
    assert io.port == port
    assert io.size == len(data)
    assert io.count == 1
    assert bytes(io.data) == data


@pytest.mark.parametrize("irqchip", [False, True], ids=["no-irqchip", "irqchip"])
def test_guest_port_mmio_and_halt_exits(irqchip: bool) -> None:
    with TinyVm(BASIC_CODE, irqchip=irqchip) as guest:
        vcpu = guest.vcpus[0]

        assert vcpu.run() == ExitReason.IO
        _check_port_write(vcpu, DATA_PORT, bytes([OUTPUT_BYTE]))

        assert vcpu.run() == ExitReason.MMIO
        mmio = vcpu.mmio_exit()
        assert mmio.phys_addr == UNMAPPED_ADDRESS
        assert mmio.is_write
        assert mmio.length == 4
        assert bytes(mmio.data) == MMIO_VALUE.to_bytes(4, "little")
        del mmio

        assert vcpu.run() == ExitReason.IO
        _check_port_write(vcpu, DONE_PORT, bytes([OUTPUT_BYTE]))

        if not irqchip:
            assert vcpu.run() == ExitReason.HLT
        state = vcpu.get_regs()
        assert state.rax & 0xFF == OUTPUT_BYTE
        assert state.rbx == UNMAPPED_ADDRESS
        assert state.rsp == layout.BOOT_STACK_POINTER
        assert state.rsi == layout.ZERO_PAGE_START
        expected_rip = CODE_ADDRESS + len(BASIC_CODE)
        if irqchip:
            expected_rip -= len(hlt())  # the guest has not run its HLT yet
        assert state.rip == expected_rip


def test_guest_reads_port_and_mmio_values() -> None:
    code = (
        in_al_imm8(DATA_PORT)
        + out_imm8_al(DONE_PORT)
        + mov_ebx_imm32(UNMAPPED_ADDRESS)
        + mov_eax_dword_ptr_rbx()
        + out_imm8_eax(DONE_PORT)
        + hlt()
    )
    with TinyVm(code) as guest:
        vcpu = guest.vcpus[0]

        assert vcpu.run() == ExitReason.IO
        io = vcpu.io_exit()
        assert io.direction == KVM_EXIT_IO_IN
        assert io.port == DATA_PORT
        io.data[:] = b"\x5a"
        del io
        assert vcpu.run() == ExitReason.IO
        _check_port_write(vcpu, DONE_PORT, b"\x5a")

        assert vcpu.run() == ExitReason.MMIO
        mmio = vcpu.mmio_exit()
        assert not mmio.is_write
        assert mmio.phys_addr == UNMAPPED_ADDRESS
        mmio.data[:] = (0xCAFE_F00D).to_bytes(4, "little")
        del mmio
        assert vcpu.run() == ExitReason.IO
        _check_port_write(vcpu, DONE_PORT, (0xCAFE_F00D).to_bytes(4, "little"))


def test_guest_runs_in_long_mode() -> None:
    with TinyVm(hlt()) as guest:
        sregs = guest.vcpus[0].get_sregs()
    assert sregs.efer & regs.EFER_LMA
    assert sregs.cr0 & regs.X86_CR0_PG
    assert sregs.cr3 == layout.PML4_START
    assert sregs.cs.selector == regs.BOOT_CS
    assert sregs.cs.l == 1
    assert sregs.ss.selector == regs.BOOT_DS
    assert sregs.gdt.base == layout.GDT_START


def test_immediate_exit_returns_interrupted() -> None:
    with TinyVm(BASIC_CODE) as guest:
        vcpu = guest.vcpus[0]
        vcpu.request_immediate_exit()
        assert vcpu.run() == ExitReason.INTERRUPTED
        assert vcpu.get_regs().rip == CODE_ADDRESS
        vcpu.request_immediate_exit(False)
        assert vcpu.run() == ExitReason.IO


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    pass


def _join_or_interrupt(threads: list[threading.Thread], vcpus: list[Vcpu]) -> None:
    """Wait for the vCPU threads; after THREAD_TIMEOUT_SECONDS, kick them out of KVM_RUN.

    The signal has a Python handler that does nothing, so a blocked KVM_RUN
    fails with EINTR; immediate_exit covers a thread that is about to enter it.
    """
    deadline = time.monotonic() + THREAD_TIMEOUT_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    previous = signal.signal(signal.SIGUSR1, _ignore_signal)
    try:
        while any(thread.is_alive() for thread in threads):
            for thread, vcpu in zip(threads, vcpus):
                vcpu.request_immediate_exit()
                if thread.is_alive() and thread.ident is not None:
                    signal.pthread_kill(thread.ident, signal.SIGUSR1)
            for thread in threads:
                thread.join(0.05)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_signal_interrupts_running_guest() -> None:
    results: list[ExitReason] = []
    with TinyVm(jmp_self()) as guest:
        vcpu = guest.vcpus[0]
        thread = threading.Thread(target=lambda: results.append(vcpu.run()))
        thread.start()
        began = time.monotonic()
        thread.join(0.2)
        assert thread.is_alive(), f"a guest spinning in `jmp $` exited: {results}"
        previous = signal.signal(signal.SIGUSR1, _ignore_signal)
        try:
            signal.pthread_kill(thread.ident or 0, signal.SIGUSR1)
            thread.join(THREAD_TIMEOUT_SECONDS)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        waited = time.monotonic() - began
        if thread.is_alive():
            _join_or_interrupt([thread], [vcpu])
            pytest.fail(f"KVM_RUN ignored a signal for {waited:.1f} s")
    assert results == [ExitReason.INTERRUPTED]


def _vcpu_loop(vcpu: Vcpu, outputs: list[int], errors: list[BaseException]) -> None:
    try:
        while True:
            reason = vcpu.run()
            if reason != ExitReason.IO:
                raise AssertionError(f"vcpu {vcpu.index}: unexpected exit {reason!r}")
            io = vcpu.io_exit()
            if io.port == DONE_PORT:
                return
            outputs.append(int.from_bytes(io.data, "little"))
            del io
    except BaseException as error:
        errors.append(error)


@pytest.mark.parametrize("irqchip", [False, True], ids=["no-irqchip", "irqchip"])
def test_two_vcpus_on_two_threads(irqchip: bool) -> None:
    rounds = 3
    # Each vCPU writes its RDI (set to its index + 1) to DATA_PORT `rounds` times.
    body = mov_edx_edi() + mov_eax_edx() + out_imm8_eax(DATA_PORT)
    code = mov_ecx_imm32(rounds) + body + loop_rel8(-(len(body) + 2))
    code += out_imm8_al(DONE_PORT) + hlt()
    with TinyVm(code, vcpu_count=2, irqchip=irqchip) as guest:
        outputs: list[list[int]] = [[], []]
        errors: list[BaseException] = []
        for vcpu in guest.vcpus:
            state = vcpu.get_regs()
            state.rdi = vcpu.index + 1
            vcpu.set_regs(state)
        threads = [
            threading.Thread(target=_vcpu_loop, args=(vcpu, outputs[vcpu.index], errors))
            for vcpu in guest.vcpus
        ]
        for thread in threads:
            thread.start()
        _join_or_interrupt(threads, guest.vcpus)
        assert errors == []
    assert outputs[0] == [1] * rounds
    assert outputs[1] == [2] * rounds


def test_boot_msrs_are_loaded() -> None:
    with TinyVm(hlt()) as guest:
        vcpu = guest.vcpus[0]
        msrs.setup_msrs(vcpu)
        indices = [entry.index for entry in msrs.boot_msr_entries()]
        loaded = dict(vcpu.get_msrs([i for i in indices if i != msrs.MSR_IA32_TSC]))
    assert loaded[msrs.MSR_IA32_MISC_ENABLE] & msrs.MISC_ENABLE_FAST_STRING
    assert loaded[msrs.MSR_MTRR_DEF_TYPE] == msrs.MTRR_DEF_TYPE_ENABLE | 6
    assert loaded[msrs.MSR_LSTAR] == 0


def test_unsupported_msr_is_named_in_error() -> None:
    with TinyVm(hlt()) as guest:
        with pytest.raises(KvmError, match="MSR 0xdeadbeef is not supported"):
            guest.vcpus[0].set_msrs([MsrEntry(0xDEAD_BEEF, 1)])


def test_lapic_lint_pins_are_routed() -> None:
    with TinyVm(hlt(), irqchip=True) as guest:
        vcpu = guest.vcpus[0]
        interrupts.setup_lapic(vcpu)
        lapic = vcpu.get_lapic()
    lint0 = interrupts.get_lapic_register(lapic, interrupts.APIC_LVT_LINT0_OFFSET)
    lint1 = interrupts.get_lapic_register(lapic, interrupts.APIC_LVT_LINT1_OFFSET)
    assert lint0 >> 8 & 0x7 == interrupts.APIC_DELIVERY_MODE_EXTINT
    assert lint1 >> 8 & 0x7 == interrupts.APIC_DELIVERY_MODE_NMI


def test_normalized_cpuid_is_accepted_by_kvm() -> None:
    with Kvm() as kvm:
        supported = kvm.get_supported_cpuid()
    assert any(entry.function == cpuid.LEAF_FEATURES for entry in supported)
    entries = cpuid.normalize_cpuid(supported, 1, 2, smt=False)
    with TinyVm(hlt(), vcpu_count=2) as guest:
        vcpu = guest.vcpus[1]
        vcpu.set_cpuid2(entries)
        stored = vcpu.get_cpuid2()
    leaf1 = next(entry for entry in stored if entry.function == cpuid.LEAF_FEATURES)
    assert leaf1.ebx >> 24 == 1
    assert leaf1.ecx & cpuid.LEAF1_ECX_HYPERVISOR


def test_ioeventfd_absorbs_port_write() -> None:
    # out 0xE9, al is handled by the eventfd; only the write to DONE_PORT exits.
    code = mov_al_imm8(OUTPUT_BYTE) + out_imm8_al(DATA_PORT) + out_imm8_al(DONE_PORT) + hlt()
    with TinyVm(code) as guest:
        event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            guest.vm.ioeventfd(event, DATA_PORT, 1, None, port_io=True)
            vcpu = guest.vcpus[0]
            assert vcpu.run() == ExitReason.IO
            assert vcpu.io_exit().port == DONE_PORT
            assert os.eventfd_read(event) == 1
        finally:
            os.close(event)


def test_irqfd_needs_irqchip_and_names_gsi() -> None:
    event = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with TinyVm(hlt(), irqchip=True) as guest:
            guest.vm.irqfd(event, 4)
            guest.vm.irqfd(event, 4, deassign=True)
            guest.vm.irq_line(4, 1)
            guest.vm.irq_line(4, 0)
        with TinyVm(hlt()) as guest, pytest.raises(KvmError, match="KVM_IRQFD.*gsi 4"):
            guest.vm.irqfd(event, 4)
    finally:
        os.close(event)


def test_memory_region_error_names_slot_and_address() -> None:
    with TinyVm(hlt()) as guest:
        with pytest.raises(KvmError, match="slot 1, guest address 0x1001"):
            guest.vm.set_user_memory_region(1, 0x1001, 0x1000, 0)


def test_emulation_failure_reports_instruction() -> None:
    """Accepts both outcomes: hardware runs FWAIT, an emulating host reports its bytes."""
    fwait = b"\x9b"
    with TinyVm(fwait + out_imm8_al(DONE_PORT) + hlt()) as guest:
        vcpu = guest.vcpus[0]
        reason = vcpu.run()
        if reason == ExitReason.INTERNAL_ERROR:
            error = vcpu.internal_error()
            assert error.suberror == InternalErrorSuberror.EMULATION
            assert error.instruction.startswith(fwait)
            state = vcpu.get_regs()
            assert state.rip == CODE_ADDRESS
            state.rip += len(fwait)
            vcpu.set_regs(state)
            reason = vcpu.run()
        assert reason == ExitReason.IO
        assert vcpu.io_exit().port == DONE_PORT


def test_vcpu_close_with_held_view_closes_fd() -> None:
    with TinyVm(BASIC_CODE) as guest:
        vcpu = guest.vcpus[0]
        assert vcpu.run() == ExitReason.IO
        held = vcpu.io_exit().data
        with pytest.raises(BufferError):
            vcpu.close()
        assert vcpu.fd == -1
        assert bytes(held) == bytes([OUTPUT_BYTE])
        held.release()
        vcpu.close()  # a second close is a no-op
