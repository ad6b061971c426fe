"""The ctypes mirrors and ioctl numbers match what gcc computes from the kernel headers.

A C program generated from the ctypes definitions prints sizeof and offsetof
of every mirrored struct and field, nested ones by their C path. It also prints
the value of every ioctl request and constant we name. Each must equal ours.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from enum import IntEnum
from pathlib import Path

import pytest

from vmm.kvm import structs as s
from vmm.kvm.ioctl import KvmError, KvmIoctl, _IOC, _IOC_NONE, _IOC_READ, _IOC_WRITE
from vmm.kvm.system import KvmCap

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists(),
    reason="needs gcc and /usr/include/linux/kvm.h (linux-libc-dev) to compute the C layout",
)

MIRRORED_STRUCTS: list[type[ctypes.Structure]] = [
    s.kvm_regs,
    s.kvm_segment,
    s.kvm_dtable,
    s.kvm_sregs,
    s.kvm_fpu,
    s.kvm_msr_entry,
    s.kvm_msrs,
    s.kvm_msr_list,
    s.kvm_cpuid_entry2,
    s.kvm_cpuid2,
    s.kvm_lapic_state,
    s.kvm_userspace_memory_region,
    s.kvm_pit_config,
    s.kvm_irqfd,
    s.kvm_ioeventfd,
    s.kvm_irq_level,
    s.kvm_vcpu_events,
    s.kvm_xsave,
    s.kvm_xcr,
    s.kvm_xcrs,
    s.kvm_clock_data,
    s.kvm_translation,
    s.kvm_mp_state,
    s.kvm_debug_exit_arch,
    s.kvm_sync_regs,
    s.kvm_run,
]

# Constants named after a linux/kvm.h or asm/kvm.h macro, compared with it.
HEADER_CONSTANTS: dict[str, int] = {
    name: getattr(s, name)
    for name in (
        "KVM_NR_INTERRUPTS",
        "KVM_APIC_REG_SIZE",
        "KVM_MAX_XCRS",
        "SYNC_REGS_SIZE_BYTES",
        "KVM_EXIT_IO_IN",
        "KVM_EXIT_IO_OUT",
        "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
        "KVM_MEM_LOG_DIRTY_PAGES",
        "KVM_MEM_READONLY",
        "KVM_PIT_SPEAKER_DUMMY",
        "KVM_IRQFD_FLAG_DEASSIGN",
        "KVM_IRQFD_FLAG_RESAMPLE",
        "KVM_IOEVENTFD_FLAG_DATAMATCH",
        "KVM_IOEVENTFD_FLAG_PIO",
        "KVM_IOEVENTFD_FLAG_DEASSIGN",
        "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES",
    )
}


def _enum_macros(enum: type[IntEnum], prefix: str) -> dict[str, int]:
    return {f"{prefix}{member.name}": member.value for member in enum if member.value >= 0}


def _cap_macros() -> dict[str, int]:
    return {
        f"KVM_CAP_{name}": value
        for name, value in vars(KvmCap).items()
        if name.isupper() and isinstance(value, int)
    }


def _field_rows(
    cls: type[ctypes.Structure | ctypes.Union], prefix: str, base: int
) -> list[tuple[str, int, int]]:
    """Return (C member path, offset, size) for every field, nested ones included."""
    rows = []
    anonymous = getattr(cls, "_anonymous_", ())
    for field in cls._fields_:
        name, ctype = field[0], field[1]
        offset = base + getattr(cls, name).offset
        path = prefix if name in anonymous else f"{prefix}{name}"
        if name not in anonymous:
            rows.append((path, offset, ctypes.sizeof(ctype)))
        if issubclass(ctype, (ctypes.Structure, ctypes.Union)):
            inner_prefix = path if name in anonymous else f"{path}."
            rows.extend(_field_rows(ctype, inner_prefix, offset))
    return rows


def _c_program() -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for cls in MIRRORED_STRUCTS:
        name = cls.__name__
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        for path, _, size in _field_rows(cls, "", 0):
            lines.append(
                f'printf("offsetof {name}.{path} %zu\\n", offsetof(struct {name}, {path}));'
            )
            if size:  # a flexible array member has no sizeof
                lines.append(
                    f'printf("sizeof {name}.{path} %zu\\n", '
                    f"sizeof(((struct {name} *)0)->{path}));"
                )
    for macro in _all_macros():
        lines.append(f'printf("value {macro} %llu\\n", (unsigned long long)({macro}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


def _all_macros() -> dict[str, int]:
    macros = {member.name: member.value for member in KvmIoctl}
    macros.update(HEADER_CONSTANTS)
    macros.update(_enum_macros(s.ExitReason, "KVM_EXIT_"))
    macros.update(_enum_macros(s.InternalErrorSuberror, "KVM_INTERNAL_ERROR_"))
    macros.update(_enum_macros(s.SystemEventType, "KVM_SYSTEM_EVENT_"))
    macros.update(_enum_macros(s.MpState, "KVM_MP_STATE_"))
    macros.update(_cap_macros())
    return macros


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Compile and run the generated program; return its printed values by key."""
    directory = tmp_path_factory.mktemp("kvm_layout")
    source = directory / "layout.c"
    binary = directory / "layout"
    source.write_text(_c_program())
    compiled = subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-Werror", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compiled.returncode == 0, f"gcc failed on {source}:\n{compiled.stderr[-4000:]}"
    output = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in output.splitlines():
        kind, key, value = line.split()
        values[f"{kind} {key}"] = int(value)
    return values


@pytest.mark.parametrize("cls", MIRRORED_STRUCTS, ids=lambda cls: cls.__name__)
def test_struct_layout_matches_header(
    cls: type[ctypes.Structure], c_values: dict[str, int]
) -> None:
    name = cls.__name__
    assert ctypes.sizeof(cls) == c_values[f"sizeof {name}"], f"sizeof struct {name}"
    for path, offset, size in _field_rows(cls, "", 0):
        assert offset == c_values[f"offsetof {name}.{path}"], f"offsetof {name}.{path}"
        if size:
            assert size == c_values[f"sizeof {name}.{path}"], f"sizeof {name}.{path}"


def test_ioctl_numbers_match_header(c_values: dict[str, int]) -> None:
    for member in KvmIoctl:
        assert member.value == c_values[f"value {member.name}"], member.name


def test_constants_and_enums_match_header(c_values: dict[str, int]) -> None:
    for macro, value in _all_macros().items():
        assert value == c_values[f"value {macro}"], macro


def test_kvm_run_mmio_data_offset_matches_header(c_values: dict[str, int]) -> None:
    assert s.KVM_RUN_MMIO_DATA_OFFSET == c_values["offsetof kvm_run.mmio.data"]


def test_variable_length_helpers_extend_header_layout() -> None:
    msrs = s.kvm_msrs_of(3)
    assert ctypes.sizeof(msrs) == ctypes.sizeof(s.kvm_msrs) + 3 * ctypes.sizeof(s.kvm_msr_entry)
    assert msrs.entries.offset == s.kvm_msrs.entries.offset
    cpuid = s.kvm_cpuid2_of(5)
    entry_size = ctypes.sizeof(s.kvm_cpuid_entry2)
    assert ctypes.sizeof(cpuid) == ctypes.sizeof(s.kvm_cpuid2) + 5 * entry_size
    msr_list = s.kvm_msr_list_of(7)
    assert ctypes.sizeof(msr_list) == ctypes.sizeof(s.kvm_msr_list) + 7 * 4


def test_ioc_encoding_places_fields() -> None:
    assert _IOC(_IOC_NONE, 0xAE, 0x80, 0) == 0xAE80
    assert _IOC(_IOC_WRITE, 0xAE, 0x46, 32) == 0x4020_AE46
    assert _IOC(_IOC_READ | _IOC_WRITE, 0xAE, 0x05, 8) == 0xC008_AE05
    with pytest.raises(ValueError, match="16384"):
        _IOC(_IOC_READ, 0xAE, 0x01, 1 << 14)


def test_unknown_exit_reason_keeps_its_value() -> None:
    reason = s.ExitReason(99)
    assert reason == 99
    assert reason.name == "UNKNOWN_99"
    assert s.ExitReason(2) is s.ExitReason.IO


def test_kvm_error_names_request_errno_and_detail() -> None:
    error = KvmError("KVM_SET_USER_MEMORY_REGION", 22, "slot 3, guest address 0x1000")
    assert error.errno == 22
    assert "KVM_SET_USER_MEMORY_REGION failed: EINVAL" in str(error)
    assert "slot 3, guest address 0x1000" in str(error)


def test_cpuid_entry_round_trips_through_struct() -> None:
    entry = s.CpuidEntry(0xB, 1, 1, 2, 3, 4, 5)
    assert s.CpuidEntry.from_struct(entry.to_struct()) == entry
