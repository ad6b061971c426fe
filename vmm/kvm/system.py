"""KVM objects: the system (/dev/kvm), a VM and its vCPUs, each owning one fd.

`Kvm` opens /dev/kvm and runs capability queries; `Kvm.create_vm` returns
a `Vm`, which sets up memory, interrupt controllers and eventfds and creates
`Vcpu`s. Each object closes its fd in `close()` and works as a context
manager. A `Vm` closes the vCPUs it created.

Running a vCPU
--------------
`Vcpu.run()` calls KVM_RUN, which blocks (without the GIL) until the guest
needs user space. It returns the exit reason as an `ExitReason`; the exit's
data sits in the vCPU's kvm_run page, which the accessors below read. For
port reads and MMIO reads the caller writes the result into the memoryview
the accessor returns, and KVM hands it to the guest on the next KVM_RUN.

To stop a vCPU thread from another thread, set a stop flag, call
`request_immediate_exit()` and send the thread a signal whose handler does
nothing: a blocked KVM_RUN fails with EINTR, and with immediate_exit set a
KVM_RUN that is just about to start returns EINTR at once instead of entering
the guest, closing the race between checking the flag and entering KVM_RUN.
Both cases make `run()` return ExitReason.INTERRUPTED.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import mmap
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NamedTuple, Sequence

from vmm.kvm import structs as s
from vmm.kvm.ioctl import KvmError, KvmIoctl, ioctl
from vmm.kvm.structs import (
    CpuidEntry,
    ExitReason,
    InternalErrorSuberror,
    MpState,
    SystemEventType,
)

KVM_DEVICE: Final = "/dev/kvm"
# linux/kvm.h: KVM_API_VERSION, stable since Linux 2.6.22.
KVM_API_VERSION: Final = 12
# Upper bound on KVM_GET_SUPPORTED_CPUID entries; Linux 6.1 defines KVM_MAX_CPUID_ENTRIES 256.
MAX_CPUID_ENTRIES: Final = 256


class KvmCap:
    """KVM_CAP_* extension numbers from linux/kvm.h, for `check_extension`."""

    IRQCHIP: Final = 0
    HLT: Final = 1
    USER_MEMORY: Final = 3
    SET_TSS_ADDR: Final = 4
    NR_VCPUS: Final = 9
    NR_MEMSLOTS: Final = 10
    PIT: Final = 11
    IRQFD: Final = 32
    PIT2: Final = 33
    IOEVENTFD: Final = 36
    SET_IDENTITY_MAP_ADDR: Final = 37
    ADJUST_CLOCK: Final = 39
    INTERNAL_ERROR_DATA: Final = 40
    VCPU_EVENTS: Final = 41
    XSAVE: Final = 55
    XCRS: Final = 56
    MAX_VCPUS: Final = 66
    TSC_DEADLINE_TIMER: Final = 72
    IMMEDIATE_EXIT: Final = 136
    SPLIT_IRQCHIP: Final = 121


class MsrEntry(NamedTuple):
    """One model-specific register: its index and 64-bit value."""

    index: int
    value: int


@dataclass(frozen=True)
class IoExit:
    """A port I/O exit (kvm_run.io). `data` is size * count bytes inside kvm_run.

    For an OUT the guest's bytes are in `data`; for an IN the caller fills it.
    """

    direction: int
    size: int
    port: int
    count: int
    data: memoryview

    @property
    def is_write(self) -> bool:
        return self.direction == s.KVM_EXIT_IO_OUT


@dataclass(frozen=True)
class MmioExit:
    """An MMIO exit (kvm_run.mmio). `data` is `length` bytes inside kvm_run.

    For a write the guest's bytes are in `data`; for a read the caller fills it.
    """

    phys_addr: int
    data: memoryview
    length: int
    is_write: bool


@dataclass(frozen=True)
class InternalError:
    """A KVM_EXIT_INTERNAL_ERROR: the suberror and its `ndata` data words.

    For suberror EMULATION with the instruction-bytes flag, `instruction`
    contains the bytes of the instruction KVM could not emulate.
    """

    suberror: InternalErrorSuberror | int
    data: tuple[int, ...]
    instruction: bytes


def _suberror(value: int) -> InternalErrorSuberror | int:
    try:
        return InternalErrorSuberror(value)
    except ValueError:
        return value


class Kvm:
    """The KVM system fd (/dev/kvm): capability queries and VM creation."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        """Open `path` and check its API version; raise KvmError or OSError if unusable."""
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = ioctl(self.fd, KvmIoctl.KVM_GET_API_VERSION)
            if version != KVM_API_VERSION:
                raise KvmError(
                    "KVM_GET_API_VERSION",
                    errno_codes.EINVAL,
                    f"{path} reports API version {version}; this monitor needs {KVM_API_VERSION}",
                )
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, capability: int) -> int:
        """Return KVM_CHECK_EXTENSION for a KvmCap number: 0 if absent, else >= 1."""
        return ioctl(
            self.fd, KvmIoctl.KVM_CHECK_EXTENSION, capability, f"capability {capability}"
        )

    def get_vcpu_mmap_size(self) -> int:
        """Return the size in bytes of the kvm_run mapping of each vCPU fd."""
        return ioctl(self.fd, KvmIoctl.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """Return the CPUID leaves KVM can offer a guest on this host."""
        cpuid = s.kvm_cpuid2_of(MAX_CPUID_ENTRIES)()
        cpuid.nent = MAX_CPUID_ENTRIES
        ioctl(
            self.fd,
            KvmIoctl.KVM_GET_SUPPORTED_CPUID,
            cpuid,
            f"room for {MAX_CPUID_ENTRIES} entries",
        )
        return [CpuidEntry.from_struct(cpuid.entries[i]) for i in range(cpuid.nent)]

    def get_msr_index_list(self) -> list[int]:
        """Return the indices of the MSRs KVM saves and restores for a vCPU."""
        probe = s.kvm_msr_list()
        try:
            ioctl(self.fd, KvmIoctl.KVM_GET_MSR_INDEX_LIST, probe)
        except KvmError as error:
            # With nmsrs 0 the kernel fails with E2BIG and stores the count it needs.
            if error.errno != errno_codes.E2BIG:
                raise
        msr_list = s.kvm_msr_list_of(probe.nmsrs)()
        msr_list.nmsrs = probe.nmsrs
        ioctl(self.fd, KvmIoctl.KVM_GET_MSR_INDEX_LIST, msr_list, f"room for {probe.nmsrs}")
        return list(msr_list.indices[: msr_list.nmsrs])

    def create_vm(self) -> Vm:
        """Create a VM with the default machine type."""
        vm_fd = ioctl(self.fd, KvmIoctl.KVM_CREATE_VM, 0)
        return Vm(vm_fd, self.get_vcpu_mmap_size())

    def close(self) -> None:
        """Close /dev/kvm. VMs already created keep working."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Vm:
    """A VM fd: guest memory slots, in-kernel irqchip and PIT, eventfds, vCPUs."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self.vcpus: list[Vcpu] = []

    def check_extension(self, capability: int) -> int:
        """Return KVM_CHECK_EXTENSION on this VM (needs KVM_CAP_CHECK_EXTENSION_VM)."""
        return ioctl(
            self.fd, KvmIoctl.KVM_CHECK_EXTENSION, capability, f"capability {capability}"
        )

    def set_user_memory_region(
        self, slot: int, guest_base: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        """Map host [host_address, +size) at guest physical guest_base in `slot`.

        Size 0 deletes the slot. Flags are KVM_MEM_LOG_DIRTY_PAGES and KVM_MEM_READONLY.
        """
        region = s.kvm_userspace_memory_region(slot, flags, guest_base, size, host_address)
        ioctl(
            self.fd,
            KvmIoctl.KVM_SET_USER_MEMORY_REGION,
            region,
            f"slot {slot}, guest address {guest_base:#x}, size {size:#x}, "
            f"host address {host_address:#x}, flags {flags:#x}",
        )

    def set_tss_address(self, address: int) -> None:
        """Place the three pages KVM needs for real-mode emulation on Intel at `address`."""
        ioctl(self.fd, KvmIoctl.KVM_SET_TSS_ADDR, address, f"guest address {address:#x}")

    def set_identity_map_address(self, address: int) -> None:
        """Place the one-page EPT identity map KVM needs on Intel at `address`."""
        value = ctypes.c_uint64(address)
        ioctl(
            self.fd, KvmIoctl.KVM_SET_IDENTITY_MAP_ADDR, value, f"guest address {address:#x}"
        )

    def create_irqchip(self) -> None:
        """Create the in-kernel PIC pair, IOAPIC and a local APIC per vCPU created after."""
        ioctl(self.fd, KvmIoctl.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = s.KVM_PIT_SPEAKER_DUMMY) -> None:
        """Create the in-kernel i8254 PIT; the default flag also emulates port 0x61."""
        config = s.kvm_pit_config(flags=flags)
        ioctl(self.fd, KvmIoctl.KVM_CREATE_PIT2, config, f"flags {flags:#x}")

    def irqfd(self, eventfd_fd: int, gsi: int, deassign: bool = False) -> None:
        """Raise interrupt `gsi` in the guest whenever `eventfd_fd` is signalled."""
        flags = s.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        request = s.kvm_irqfd(fd=eventfd_fd, gsi=gsi, flags=flags)
        ioctl(
            self.fd,
            KvmIoctl.KVM_IRQFD,
            request,
            f"eventfd {eventfd_fd}, gsi {gsi}, deassign {deassign}",
        )

    def ioeventfd(
        self,
        eventfd_fd: int,
        address: int,
        length: int,
        datamatch: int | None,
        port_io: bool = False,
        deassign: bool = False,
    ) -> None:
        """Signal `eventfd_fd` on a guest write to `address` instead of exiting to user space.

        `length` is the access width (1, 2, 4 or 8; 0 matches any width). With
        `datamatch` set only writes of that value match. `port_io` selects the
        port I/O space instead of MMIO.
        """
        flags = 0
        if datamatch is not None:
            flags |= s.KVM_IOEVENTFD_FLAG_DATAMATCH
        if port_io:
            flags |= s.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= s.KVM_IOEVENTFD_FLAG_DEASSIGN
        request = s.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=address, len=length, fd=eventfd_fd, flags=flags
        )
        match = "any value" if datamatch is None else f"value {datamatch:#x}"
        ioctl(
            self.fd,
            KvmIoctl.KVM_IOEVENTFD,
            request,
            f"eventfd {eventfd_fd}, address {address:#x}, length {length}, {match}, "
            f"port I/O {port_io}, deassign {deassign}",
        )

    def irq_line(self, irq: int, level: int) -> None:
        """Set the level (0 or 1) of in-kernel irqchip input `irq`."""
        request = s.kvm_irq_level(irq=irq, level=level)
        ioctl(self.fd, KvmIoctl.KVM_IRQ_LINE, request, f"irq {irq}, level {level}")

    def get_clock(self) -> s.kvm_clock_data:
        """Return the kvmclock value (for snapshots)."""
        clock = s.kvm_clock_data()
        ioctl(self.fd, KvmIoctl.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock: s.kvm_clock_data) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_CLOCK, clock, f"clock {clock.clock}")

    def create_vcpu(self, index: int) -> Vcpu:
        """Create vCPU `index` (its initial APIC id) and map its kvm_run page."""
        vcpu_fd = ioctl(self.fd, KvmIoctl.KVM_CREATE_VCPU, index, f"vcpu {index}")
        try:
            vcpu = Vcpu(vcpu_fd, index, self.vcpu_mmap_size)
        except BaseException:
            os.close(vcpu_fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close every vCPU created here, then the VM fd."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Vcpu:
    """A vCPU fd with its kvm_run mapping: run it, read its exits, get and set its state."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        self._mapping = mmap.mmap(
            fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._view = memoryview(self._mapping)
        self.kvm_run = s.kvm_run.from_buffer(self._mapping)

    # Running.

    def run(self) -> ExitReason:
        """Run the guest until it needs user space; return why it stopped.

        Returns ExitReason.INTERRUPTED when KVM_RUN failed with EINTR or
        EAGAIN (a signal or immediate_exit); raises KvmError on other errors.
        """
        try:
            ioctl(self.fd, KvmIoctl.KVM_RUN)
        except KvmError as error:
            if error.errno in (errno_codes.EINTR, errno_codes.EAGAIN):
                return ExitReason.INTERRUPTED
            raise KvmError(error.request, error.errno, f"vcpu {self.index}") from None
        return ExitReason(self.kvm_run.exit_reason)

    def request_immediate_exit(self, enabled: bool = True) -> None:
        """Set or clear kvm_run.immediate_exit: while set, KVM_RUN returns EINTR at once."""
        self.kvm_run.immediate_exit = 1 if enabled else 0

    @property
    def exit_reason(self) -> ExitReason:
        return ExitReason(self.kvm_run.exit_reason)

    def io_exit(self) -> IoExit:
        """Return the port I/O exit data; valid after run() returned ExitReason.IO."""
        io = self.kvm_run.io
        start = io.data_offset
        end = start + io.size * io.count
        if end > len(self._view):
            raise KvmError(
                "KVM_RUN",
                errno_codes.EFAULT,
                f"vcpu {self.index}: io data [{start:#x}, {end:#x}) is outside kvm_run "
                f"of {len(self._view):#x} bytes",
            )
        return IoExit(io.direction, io.size, io.port, io.count, self._view[start:end])

    def mmio_exit(self) -> MmioExit:
        """Return the MMIO exit data; valid after run() returned ExitReason.MMIO."""
        mmio = self.kvm_run.mmio
        length = min(mmio.len, len(mmio.data))
        start = s.KVM_RUN_MMIO_DATA_OFFSET
        return MmioExit(
            mmio.phys_addr, self._view[start : start + length], length, bool(mmio.is_write)
        )

    def internal_error(self) -> InternalError:
        """Return the internal error data; valid after run() returned INTERNAL_ERROR."""
        internal = self.kvm_run.internal
        count = min(internal.ndata, s.KVM_INTERNAL_ERROR_MAX_DATA)
        data = tuple(internal.data[:count])
        instruction = b""
        failure = self.kvm_run.emulation_failure
        has_bytes = failure.flags & s.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        if internal.suberror == InternalErrorSuberror.EMULATION and count >= 2 and has_bytes:
            size = min(failure.insn_size, len(failure.insn_bytes))
            instruction = bytes(failure.insn_bytes[:size])
        return InternalError(_suberror(internal.suberror), data, instruction)

    def system_event(self) -> tuple[SystemEventType | int, tuple[int, ...]]:
        """Return (type, data words) of a KVM_EXIT_SYSTEM_EVENT."""
        event = self.kvm_run.system_event
        count = min(event.ndata, s.KVM_SYSTEM_EVENT_MAX_DATA)
        try:
            kind: SystemEventType | int = SystemEventType(event.type)
        except ValueError:
            kind = event.type
        return kind, tuple(event.data[:count])

    def fail_entry_reason(self) -> int:
        """Return the hardware entry failure reason of a KVM_EXIT_FAIL_ENTRY."""
        return self.kvm_run.fail_entry.hardware_entry_failure_reason

    # Register state.

    def get_regs(self) -> s.kvm_regs:
        regs = s.kvm_regs()
        ioctl(self.fd, KvmIoctl.KVM_GET_REGS, regs, f"vcpu {self.index}")
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_REGS, regs, f"vcpu {self.index}, rip {regs.rip:#x}")

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        ioctl(self.fd, KvmIoctl.KVM_GET_SREGS, sregs, f"vcpu {self.index}")
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        ioctl(
            self.fd,
            KvmIoctl.KVM_SET_SREGS,
            sregs,
            f"vcpu {self.index}, cr0 {sregs.cr0:#x}, cr3 {sregs.cr3:#x}, cr4 {sregs.cr4:#x}, "
            f"efer {sregs.efer:#x}",
        )

    def get_fpu(self) -> s.kvm_fpu:
        fpu = s.kvm_fpu()
        ioctl(self.fd, KvmIoctl.KVM_GET_FPU, fpu, f"vcpu {self.index}")
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_FPU, fpu, f"vcpu {self.index}")

    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]:
        """Read the given MSRs; raise KvmError naming the first MSR KVM did not return."""
        msrs = s.kvm_msrs_of(len(indices))()
        msrs.nmsrs = len(indices)
        for slot, index in enumerate(indices):
            msrs.entries[slot].index = index
        count = ioctl(self.fd, KvmIoctl.KVM_GET_MSRS, msrs, f"vcpu {self.index}")
        self._check_msr_count("KVM_GET_MSRS", count, indices)
        return [MsrEntry(entry.index, entry.data) for entry in msrs.entries[:count]]

    def set_msrs(self, entries: Sequence[MsrEntry]) -> None:
        """Write the given MSRs; raise KvmError naming the first MSR KVM rejected."""
        msrs = s.kvm_msrs_of(len(entries))()
        msrs.nmsrs = len(entries)
        for slot, entry in enumerate(entries):
            msrs.entries[slot].index = entry.index
            msrs.entries[slot].data = entry.value
        count = ioctl(self.fd, KvmIoctl.KVM_SET_MSRS, msrs, f"vcpu {self.index}")
        self._check_msr_count("KVM_SET_MSRS", count, [entry.index for entry in entries])

    def _check_msr_count(self, request: str, count: int, indices: Sequence[int]) -> None:
        # KVM_GET_MSRS and KVM_SET_MSRS stop at the first MSR they cannot handle
        # and return how many they processed.
        if count < len(indices):
            raise KvmError(
                request,
                errno_codes.EINVAL,
                f"vcpu {self.index}: processed {count} of {len(indices)} MSRs; "
                f"MSR {indices[count]:#x} is not supported",
            )

    def set_cpuid2(self, entries: Sequence[CpuidEntry]) -> None:
        """Set the CPUID results the guest reads (KVM_SET_CPUID2)."""
        cpuid = s.kvm_cpuid2_of(len(entries))()
        cpuid.nent = len(entries)
        for slot, entry in enumerate(entries):
            cpuid.entries[slot] = entry.to_struct()
        ioctl(
            self.fd,
            KvmIoctl.KVM_SET_CPUID2,
            cpuid,
            f"vcpu {self.index}, {len(entries)} entries",
        )

    def get_cpuid2(self) -> list[CpuidEntry]:
        """Return the CPUID entries set with set_cpuid2."""
        cpuid = s.kvm_cpuid2_of(MAX_CPUID_ENTRIES)()
        cpuid.nent = MAX_CPUID_ENTRIES
        ioctl(self.fd, KvmIoctl.KVM_GET_CPUID2, cpuid, f"vcpu {self.index}")
        return [CpuidEntry.from_struct(cpuid.entries[i]) for i in range(cpuid.nent)]

    def get_lapic(self) -> s.kvm_lapic_state:
        """Return the local APIC register page; needs the in-kernel irqchip."""
        lapic = s.kvm_lapic_state()
        ioctl(self.fd, KvmIoctl.KVM_GET_LAPIC, lapic, f"vcpu {self.index}")
        return lapic

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_LAPIC, lapic, f"vcpu {self.index}")

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        events = s.kvm_vcpu_events()
        ioctl(self.fd, KvmIoctl.KVM_GET_VCPU_EVENTS, events, f"vcpu {self.index}")
        return events

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        ioctl(
            self.fd,
            KvmIoctl.KVM_SET_VCPU_EVENTS,
            events,
            f"vcpu {self.index}, flags {events.flags:#x}",
        )

    def get_mp_state(self) -> MpState | int:
        state = s.kvm_mp_state()
        ioctl(self.fd, KvmIoctl.KVM_GET_MP_STATE, state, f"vcpu {self.index}")
        try:
            return MpState(state.mp_state)
        except ValueError:
            return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """Set the multiprocessing state, e.g. RUNNABLE for a vCPU that skips INIT/SIPI."""
        state = s.kvm_mp_state(mp_state)
        ioctl(
            self.fd,
            KvmIoctl.KVM_SET_MP_STATE,
            state,
            f"vcpu {self.index}, mp_state {mp_state}",
        )

    def get_xsave(self) -> s.kvm_xsave:
        xsave = s.kvm_xsave()
        ioctl(self.fd, KvmIoctl.KVM_GET_XSAVE, xsave, f"vcpu {self.index}")
        return xsave

    def set_xsave(self, xsave: s.kvm_xsave) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_XSAVE, xsave, f"vcpu {self.index}")

    def get_xcrs(self) -> s.kvm_xcrs:
        xcrs = s.kvm_xcrs()
        ioctl(self.fd, KvmIoctl.KVM_GET_XCRS, xcrs, f"vcpu {self.index}")
        return xcrs

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        ioctl(self.fd, KvmIoctl.KVM_SET_XCRS, xcrs, f"vcpu {self.index}")

    def translate(self, linear_address: int) -> s.kvm_translation:
        """Translate a guest virtual address through the vCPU's current page tables."""
        translation = s.kvm_translation(linear_address=linear_address)
        ioctl(
            self.fd,
            KvmIoctl.KVM_TRANSLATE,
            translation,
            f"vcpu {self.index}, linear address {linear_address:#x}",
        )
        return translation

    def close(self) -> None:
        """Unmap kvm_run and close the vCPU fd.

        Raises BufferError, after closing the fd, if a caller still keeps a
        memoryview from io_exit() or mmio_exit(). The mapping then stays until
        that view is released.
        """
        if self.fd < 0:
            return
        self.__dict__.pop("kvm_run", None)
        self._view.release()
        try:
            self._mapping.close()
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
