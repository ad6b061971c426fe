"""One thread per vCPU: loop on KVM_RUN and hand port and MMIO exits to the buses.

Stopping a vCPU
---------------
KVM_RUN blocks for as long as the guest runs. To stop a vCPU thread the
monitor sets the thread's stop flag, sets ``immediate_exit`` in its kvm_run
page and sends the thread ``KICK_SIGNAL``. The signal makes a KVM_RUN in
progress return EINTR; ``immediate_exit`` covers the window in which the signal
arrives just before the thread enters KVM_RUN, since KVM then returns EINTR at
once instead of entering the guest (KVM API documentation, "immediate_exit").
The process installs a handler for the signal (Python's, which only sets a
flag), because the default action would end the process.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from vmm.arch.x86_64.emulation import EmulationError, InstructionFallback
from vmm.devices.bus import Bus
from vmm.kvm.structs import ExitReason, InternalErrorSuberror
from vmm.kvm.system import Vcpu

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1



class StopReason(enum.Enum):
    """The reason a vCPU thread ended, which the VM maps to the process exit code."""

    RESET = "guest reset"
    SHUTDOWN = "guest shutdown"
    HALT = "vcpu halted"
    REQUESTED = "stop requested"
    ERROR = "error"


@dataclass
class ExitCounters:
    """Exits per reason and accesses no device claimed, for metrics."""

    by_reason: dict[str, int] = field(default_factory=dict)
    unhandled_pio: int = 0
    unhandled_mmio: int = 0

    def count(self, reason: ExitReason) -> None:
        self.by_reason[reason.name] = self.by_reason.get(reason.name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


def install_kick_handler() -> None:
    """Install a no-op handler for KICK_SIGNAL; call once from the main thread."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, lambda _signum, _frame: None)


class VcpuThread:
    """Run one vCPU until the guest resets or shuts down, an error occurs, or stop()."""

    def __init__(
        self,
        index: int,
        vcpu: Vcpu,
        pio_bus: Bus,
        mmio_bus: Bus,
        fallback: InstructionFallback | None,
        on_stop: Callable[[int, StopReason, str], None],
    ) -> None:
        self.index = index
        self.vcpu = vcpu
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.fallback = fallback
        self.on_stop = on_stop
        self.counters = ExitCounters()
        self._stop_requested = False
        self._dump_requested = False
        self._thread = threading.Thread(target=self._run, name=f"fc_vcpu {index}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to leave KVM_RUN and end; returns without waiting."""
        self._stop_requested = True
        self.kick()

    def request_state_dump(self) -> None:
        """Log this vCPU's registers at its next exit; the guest then carries on."""
        self._dump_requested = True
        self.kick()

    def kick(self) -> None:
        """Make KVM_RUN return now, or at once if the thread is about to enter it.

        immediate_exit stays set, and the code that asked for the kick clears it before the
        guest may run again. State dumps and resume do so. A stopping vCPU never runs again.
        """
        self.vcpu.request_immediate_exit(True)
        ident = self._thread.ident
        if ident is None or not self._thread.is_alive():
            return
        if ident == threading.get_ident():
            return
        try:
            signal.pthread_kill(ident, KICK_SIGNAL)
        except ProcessLookupError:
            pass

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        reason, detail = StopReason.REQUESTED, ""
        try:
            reason, detail = self._loop()
        except EmulationError as error:
            reason, detail = StopReason.ERROR, str(error)
        except Exception as error:  # noqa: BLE001 - any failure must end the VM, not hang it
            log.exception("vcpu %d failed", self.index)
            reason, detail = StopReason.ERROR, f"vcpu {self.index} failed: {error}"
        self.on_stop(self.index, reason, detail)

    def _loop(self) -> tuple[StopReason, str]:
        while not self._stop_requested:
            exit_reason = self.vcpu.run()
            if self._dump_requested:
                self._dump_state()
            if exit_reason is ExitReason.INTERRUPTED:
                # KVM_RUN returned EINTR or EAGAIN: a kick, or a signal for the process.
                continue
            self.counters.count(exit_reason)
            outcome = self._handle_exit(exit_reason)
            if outcome is not None:
                return outcome
        return StopReason.REQUESTED, ""

    def _dump_state(self) -> None:
        self._dump_requested = False
        if not self._stop_requested:
            self.vcpu.request_immediate_exit(False)
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        log.warning(
            "vcpu %d state: rip=%#x rsp=%#x rflags=%#x rax=%#x rbx=%#x rcx=%#x rdx=%#x "
            "rsi=%#x rdi=%#x cr0=%#x cr3=%#x cr4=%#x efer=%#x cs=%#x; exits so far %s",
            self.index, regs.rip, regs.rsp, regs.rflags, regs.rax, regs.rbx, regs.rcx,
            regs.rdx, regs.rsi, regs.rdi, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer,
            sregs.cs.selector, self.counters.by_reason,
        )

    def _handle_exit(self, exit_reason: ExitReason) -> tuple[StopReason, str] | None:
        if exit_reason == ExitReason.IO:
            self._handle_io()
        elif exit_reason == ExitReason.MMIO:
            self._handle_mmio()
        elif exit_reason == ExitReason.INTERNAL_ERROR:
            return self._handle_internal_error()
        elif exit_reason == ExitReason.HLT:
            return StopReason.HALT, f"vcpu {self.index} halted with interrupts disabled"
        elif exit_reason == ExitReason.SHUTDOWN:
            return StopReason.SHUTDOWN, "triple fault or shutdown (KVM_EXIT_SHUTDOWN)"
        elif exit_reason == ExitReason.SYSTEM_EVENT:
            event_type, _ = self.vcpu.system_event()
            return StopReason.RESET, f"system event {event_type!r}"
        elif exit_reason == ExitReason.FAIL_ENTRY:
            return StopReason.ERROR, (
                f"vcpu {self.index}: KVM_EXIT_FAIL_ENTRY, hardware reason "
                f"{self.vcpu.fail_entry_reason():#x}"
            )
        else:
            return StopReason.ERROR, f"vcpu {self.index}: unexpected exit {exit_reason.name}"
        return None

    def _handle_io(self) -> None:
        io = self.vcpu.io_exit()
        data = io.data
        size = io.size
        for index in range(io.count):
            chunk = data[index * size : (index + 1) * size]
            if io.is_write:
                if not self.pio_bus.write(io.port, bytes(chunk)):
                    self.counters.unhandled_pio += 1
            else:
                buffer = bytearray(b"\xff" * size)
                if not self.pio_bus.read(io.port, buffer):
                    self.counters.unhandled_pio += 1
                chunk[:] = buffer

    def _handle_mmio(self) -> None:
        mmio = self.vcpu.mmio_exit()
        length = mmio.length
        if mmio.is_write:
            if not self.mmio_bus.write(mmio.phys_addr, bytes(mmio.data[:length])):
                self.counters.unhandled_mmio += 1
        else:
            buffer = bytearray(length)
            if not self.mmio_bus.read(mmio.phys_addr, buffer):
                self.counters.unhandled_mmio += 1
            mmio.data[:length] = buffer

    def _handle_internal_error(self) -> tuple[StopReason, str] | None:
        error = self.vcpu.internal_error()
        if error.suberror != InternalErrorSuberror.EMULATION or self.fallback is None:
            words = " ".join(f"{word:#x}" for word in error.data)
            return StopReason.ERROR, (
                f"vcpu {self.index}: KVM internal error, suberror {error.suberror!r}, "
                f"data [{words}]"
            )
        self.fallback.complete(self.vcpu, error.instruction or None)
        return None


def wait_all(threads: list[VcpuThread], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
