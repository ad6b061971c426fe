"""normalize_cpuid: per-vCPU topology, hypervisor bit and hidden features, without KVM."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.arch.x86_64 import cpuid as c
from vmm.kvm.structs import CpuidEntry

ALL_ONES = 0xFFFF_FFFF

# A host-like leaf set: leaf 4 with L1d, L2, L3 and the terminating null subleaf.
HOST_ENTRIES = [
    CpuidEntry(0x0, 0, 0, 0x1F, 0x756E_6547, 0x6C65_746E, 0x4965_6E69),
    CpuidEntry(0x1, 0, 0, 0x000A_0F11, 0x0010_0800 | 0x0A << 24, ALL_ONES, ALL_ONES),
    CpuidEntry(0x4, 0, 1, 0x1C00_4121, 0x01C0_003F, 0x3F, 0),
    CpuidEntry(0x4, 1, 1, 0x1C00_4143, 0x01C0_003F, 0x3FF, 0),
    CpuidEntry(0x4, 2, 1, 0x1C03_C163, 0x03C0_003F, 0x3FFF, 0),
    CpuidEntry(0x4, 3, 1, 0, 0, 0, 0),
    CpuidEntry(0x6, 0, 0, 0x77, 0x2, 0x9, 0),
    CpuidEntry(0xA, 0, 0, 0x0730_0805, 0, 0, 0x603),
    CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 7),
    CpuidEntry(0xB, 1, 1, 4, 16, 0x201, 7),
    CpuidEntry(0xB, 2, 1, 0, 0, 2, 7),
    CpuidEntry(0x1F, 0, 1, 1, 2, 0x100, 7),
    CpuidEntry(0x1F, 1, 1, 4, 16, 0x201, 7),
    CpuidEntry(0x8000_0000, 0, 0, 0x8000_001E, 0, 0, 0),
    CpuidEntry(0x8000_0008, 0, 0, 0x3030, 0, 0x700F, 0),
    CpuidEntry(0x8000_001E, 0, 0, 9, 0x0104, 0x0302, 0),
]


def _leaf(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    matches = [e for e in entries if e.function == function and e.index == index]
    assert len(matches) == 1, f"leaf {function:#x}.{index} appears {len(matches)} times"
    return matches[0]


def test_leaf1_carries_apic_id_and_hypervisor_bit() -> None:
    result = c.normalize_cpuid(HOST_ENTRIES, 3, 4, smt=False)
    leaf1 = _leaf(result, 0x1)
    assert leaf1.ebx >> 24 == 3
    assert leaf1.ebx >> 16 & 0xFF == 4
    assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH size and brand index kept
    assert leaf1.ecx & c.LEAF1_ECX_HYPERVISOR
    assert leaf1.edx & c.LEAF1_EDX_HTT


def test_leaf1_hides_monitor_vmx_and_tsc_deadline() -> None:
    leaf1 = _leaf(c.normalize_cpuid(HOST_ENTRIES, 0, 1, smt=False), 0x1)
    assert not leaf1.ecx & c.LEAF1_ECX_MONITOR
    assert not leaf1.ecx & c.LEAF1_ECX_VMX
    assert not leaf1.ecx & c.LEAF1_ECX_TSC_DEADLINE
    assert not leaf1.edx & c.LEAF1_EDX_HTT


def test_leaf1_keeps_tsc_deadline_when_supported() -> None:
    result = c.normalize_cpuid(HOST_ENTRIES, 0, 1, smt=False, tsc_deadline=True)
    assert _leaf(result, 0x1).ecx & c.LEAF1_ECX_TSC_DEADLINE


def test_logical_count_rounds_up_to_power_of_two() -> None:
    leaf1 = _leaf(c.normalize_cpuid(HOST_ENTRIES, 0, 6, smt=True), 0x1)
    assert leaf1.ebx >> 16 & 0xFF == 8


def test_logical_count_saturates_above_128_vcpus() -> None:
    leaf1 = _leaf(c.normalize_cpuid(HOST_ENTRIES, 200, 254, smt=False), 0x1)
    assert leaf1.ebx >> 16 & 0xFF == 0xFF
    assert leaf1.ebx >> 24 == 200


def test_power_management_and_pmu_leaves_are_zeroed() -> None:
    result = c.normalize_cpuid(HOST_ENTRIES, 0, 2, smt=False)
    for function in (c.LEAF_POWER_MANAGEMENT, c.LEAF_PERFORMANCE_MONITORING):
        leaf = _leaf(result, function)
        assert (leaf.eax, leaf.ebx, leaf.ecx, leaf.edx) == (0, 0, 0, 0)


@pytest.mark.parametrize("function", [c.LEAF_EXTENDED_TOPOLOGY, c.LEAF_V2_EXTENDED_TOPOLOGY])
def test_extended_topology_with_smt(function: int) -> None:
    result = c.normalize_cpuid(HOST_ENTRIES, 5, 8, smt=True)
    smt_level = _leaf(result, function, 0)
    assert smt_level.eax == 1  # one APIC-id bit selects the thread
    assert smt_level.ebx == 2
    assert smt_level.ecx == c.TOPOLOGY_LEVEL_SMT << 8
    assert smt_level.edx == 5
    core_level = _leaf(result, function, 1)
    assert core_level.eax == 3  # eight vCPUs need three bits
    assert core_level.ebx == 8
    assert core_level.ecx == 1 | c.TOPOLOGY_LEVEL_CORE << 8
    assert core_level.edx == 5


def test_extended_topology_without_smt_and_invalid_level() -> None:
    result = c.normalize_cpuid(HOST_ENTRIES, 1, 3, smt=False)
    smt_level = _leaf(result, c.LEAF_EXTENDED_TOPOLOGY, 0)
    assert (smt_level.eax, smt_level.ebx) == (0, 1)
    core_level = _leaf(result, c.LEAF_EXTENDED_TOPOLOGY, 1)
    assert (core_level.eax, core_level.ebx) == (2, 3)
    invalid = _leaf(result, c.LEAF_EXTENDED_TOPOLOGY, 2)
    assert (invalid.eax, invalid.ebx, invalid.ecx) == (0, 0, 2)
    assert invalid.edx == 1


def test_leaf4_sharing_follows_cache_level() -> None:
    result = c.normalize_cpuid(HOST_ENTRIES, 0, 4, smt=True)
    l1 = _leaf(result, c.LEAF_CACHE_PARAMETERS, 0)
    l3 = _leaf(result, c.LEAF_CACHE_PARAMETERS, 2)
    assert l1.eax >> 14 & 0xFFF == 1  # two threads share a core's L1
    assert l3.eax >> 14 & 0xFFF == 3  # four threads share the L3
    assert l1.eax >> 26 == 1  # two cores - 1
    assert l1.eax & 0x3FFF == 0x0121  # type, level and flags kept
    assert _leaf(result, c.LEAF_CACHE_PARAMETERS, 3).eax == 0


def test_amd_leaves_carry_topology() -> None:
    result = c.normalize_cpuid(HOST_ENTRIES, 3, 4, smt=True)
    size = _leaf(result, c.LEAF_AMD_SIZE_IDENTIFIERS)
    assert size.ecx & 0xFF == 3
    assert size.ecx >> 12 & 0xF == 2
    extended = _leaf(result, c.LEAF_AMD_EXTENDED_APIC_ID)
    assert extended.eax == 3
    assert extended.ebx & 0xFF == 1  # APIC ids 2 and 3 belong to core 1
    assert extended.ebx >> 8 & 0xFF == 1  # two threads per core
    assert extended.ecx == 0


def test_leaves_not_named_pass_through() -> None:
    result = c.normalize_cpuid(HOST_ENTRIES, 0, 1, smt=False)
    assert _leaf(result, 0x0) == HOST_ENTRIES[0]
    assert _leaf(result, 0x8000_0000) == HOST_ENTRIES[13]
    assert len(result) == len(HOST_ENTRIES)


def test_input_entries_are_not_modified() -> None:
    before = list(HOST_ENTRIES)
    c.normalize_cpuid(HOST_ENTRIES, 1, 2, smt=False)
    assert HOST_ENTRIES == before


@pytest.mark.parametrize(
    ("index", "count", "smt", "message"),
    [
        (0, 0, False, "vCPU count 0"),
        (0, 255, False, "vCPU count 255"),
        (2, 2, False, "vCPU index 2"),
        (-1, 2, False, "vCPU index -1"),
        (0, 3, True, "must be 1 or even"),
    ],
)
def test_invalid_topology_is_rejected(index: int, count: int, smt: bool, message: str) -> None:
    with pytest.raises(c.CpuidError, match=message):
        c.normalize_cpuid(HOST_ENTRIES, index, count, smt)


@given(count=st.integers(1, c.MAX_VCPUS), data=st.data())
def test_topology_fields_fit_their_registers(count: int, data: st.DataObject) -> None:
    smt = data.draw(st.booleans()) and count % 2 == 0
    index = data.draw(st.integers(0, count - 1))
    result = c.normalize_cpuid(HOST_ENTRIES, index, count, smt)
    for entry in result:
        for value in (entry.eax, entry.ebx, entry.ecx, entry.edx):
            assert 0 <= value <= ALL_ONES
    leaf1 = _leaf(result, 0x1)
    assert leaf1.ebx >> 24 == index
    assert min(count, 0xFF) <= leaf1.ebx >> 16 & 0xFF
    core_level = _leaf(result, c.LEAF_EXTENDED_TOPOLOGY, 1)
    assert count <= 1 << core_level.eax
