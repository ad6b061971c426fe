"""The one place that calls ioctl(2) on KVM file descriptors.

Request numbers are computed from the `_IOC` encoding of
include/uapi/asm-generic/ioctl.h (2 direction bits, 14 size bits, 8 type bits,
8 number bits, from the top down) and the sizes of the ctypes mirrors in
vmm.kvm.structs, never pasted as numbers.

The call goes through libc via ctypes, which releases the GIL for the
duration of the call. That matters for KVM_RUN, which blocks for as long as
the guest runs without an exit: other vCPU threads and the event loop keep
running meanwhile.

EINTR handling: a signal that arrives during an ioctl makes it fail with
EINTR. Every request except KVM_RUN is retried, because none of them has a
partial effect. KVM_RUN is not retried, because a signal (or immediate_exit) is
how another thread requests that a vCPU return to user space.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import os
from enum import IntEnum, unique
from typing import Final

from vmm.kvm import structs as s

# include/uapi/asm-generic/ioctl.h
_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2

# linux/kvm.h: the ioctl type byte of every KVM request.
KVMIO: Final = 0xAE


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, argument: type) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(argument))


def _IOW(type_: int, nr: int, argument: type) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(argument))


def _IOWR(type_: int, nr: int, argument: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(argument))


@unique
class KvmIoctl(IntEnum):
    """KVM ioctl requests used by the monitor, under their linux/kvm.h names."""

    # System ioctls, on the /dev/kvm fd.
    KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
    KVM_CREATE_VM = _IO(KVMIO, 0x01)
    KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, s.kvm_msr_list)
    KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
    KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
    KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, s.kvm_cpuid2)

    # VM ioctls, on a VM fd.
    KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
    KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
    KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
    KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
    KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
    KVM_IRQ_LINE = _IOW(KVMIO, 0x61, s.kvm_irq_level)
    KVM_IRQFD = _IOW(KVMIO, 0x76, s.kvm_irqfd)
    KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, s.kvm_pit_config)
    KVM_IOEVENTFD = _IOW(KVMIO, 0x79, s.kvm_ioeventfd)
    KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, s.kvm_clock_data)
    KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, s.kvm_clock_data)

    # vCPU ioctls, on a vCPU fd.
    KVM_RUN = _IO(KVMIO, 0x80)
    KVM_GET_REGS = _IOR(KVMIO, 0x81, s.kvm_regs)
    KVM_SET_REGS = _IOW(KVMIO, 0x82, s.kvm_regs)
    KVM_GET_SREGS = _IOR(KVMIO, 0x83, s.kvm_sregs)
    KVM_SET_SREGS = _IOW(KVMIO, 0x84, s.kvm_sregs)
    KVM_TRANSLATE = _IOWR(KVMIO, 0x85, s.kvm_translation)
    KVM_GET_MSRS = _IOWR(KVMIO, 0x88, s.kvm_msrs)
    KVM_SET_MSRS = _IOW(KVMIO, 0x89, s.kvm_msrs)
    KVM_GET_FPU = _IOR(KVMIO, 0x8C, s.kvm_fpu)
    KVM_SET_FPU = _IOW(KVMIO, 0x8D, s.kvm_fpu)
    KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, s.kvm_lapic_state)
    KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, s.kvm_lapic_state)
    KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, s.kvm_cpuid2)
    KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, s.kvm_cpuid2)
    KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, s.kvm_mp_state)
    KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, s.kvm_mp_state)
    KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, s.kvm_vcpu_events)
    KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, s.kvm_vcpu_events)
    KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, s.kvm_xsave)
    KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, s.kvm_xsave)
    KVM_GET_XCRS = _IOR(KVMIO, 0xA6, s.kvm_xcrs)
    KVM_SET_XCRS = _IOW(KVMIO, 0xA7, s.kvm_xcrs)


class KvmError(OSError):
    """A KVM ioctl that failed: names the request, the errno and the key arguments.

    `errno` is the kernel's error number. A failed setup ioctl means the VM
    cannot be built as configured; a failed KVM_RUN other than EINTR/EAGAIN
    means the vCPU cannot continue.
    """

    def __init__(self, request: str, error_number: int, detail: str = "") -> None:
        self.request = request
        self.detail = detail
        symbol = errno_codes.errorcode.get(error_number, str(error_number))
        message = f"{request} failed: {symbol} ({os.strerror(error_number)})"
        if detail:
            message += f"; {detail}"
        super().__init__(error_number, message)

    def __str__(self) -> str:
        return str(self.strerror)


_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int

# A ctypes object is passed by reference, so the kernel reads or fills it in place.
IoctlArgument = int | ctypes.Structure | ctypes.Array | ctypes.c_uint64


def ioctl(fd: int, request: KvmIoctl, arg: IoctlArgument = 0, detail: str = "") -> int:
    """Call ioctl(fd, request, arg) and return its non-negative result.

    `arg` is an integer passed by value, or a ctypes object passed by
    reference (the kernel reads and/or writes it in place). `detail` names
    the key arguments for the error message. Raises KvmError on failure;
    retries EINTR except for KVM_RUN.
    """
    pointer = arg if isinstance(arg, int) else ctypes.byref(arg)
    while True:
        result = _libc_ioctl(fd, request, pointer)
        if result >= 0:
            return result
        error_number = ctypes.get_errno()
        if error_number == errno_codes.EINTR and request != KvmIoctl.KVM_RUN:
            continue
        raise KvmError(request.name, error_number, detail)
