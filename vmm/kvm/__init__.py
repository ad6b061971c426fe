"""The only package that calls ioctl on /dev/kvm: structures, requests, errors, objects."""

from vmm.kvm.ioctl import KvmError, KvmIoctl, ioctl
from vmm.kvm.structs import CpuidEntry, ExitReason, InternalErrorSuberror, MpState, SystemEventType
from vmm.kvm.system import (
    InternalError,
    IoExit,
    Kvm,
    KvmCap,
    MmioExit,
    MsrEntry,
    Vcpu,
    Vm,
)

__all__ = [
    "CpuidEntry",
    "ExitReason",
    "InternalError",
    "InternalErrorSuberror",
    "IoExit",
    "Kvm",
    "KvmCap",
    "KvmError",
    "KvmIoctl",
    "MmioExit",
    "MpState",
    "MsrEntry",
    "SystemEventType",
    "Vcpu",
    "Vm",
    "ioctl",
]
