"""Per-vCPU CPUID: topology, the hypervisor bit and features a microVM does not offer.

`normalize_cpuid` takes the entries of KVM_GET_SUPPORTED_CPUID and returns the
entries one vCPU should see. It is a pure function of its arguments. Each
change cites the leaf it comes from in the Intel SDM Vol. 2A (CPUID
instruction reference, tables 3-8 and 3-17) or the AMD APM Vol. 3
(appendix E, "Obtaining Processor Information Via the CPUID Instruction").

Topology model: `vcpu_count` vCPUs in one package, `threads_per_core`
(2 with SMT, else 1) threads per core. The initial APIC id of a vCPU is its
index, so the low `smt_bits` of an APIC id select the thread and the
remaining bits the core.
"""

from __future__ import annotations

import dataclasses
from typing import Final, Sequence

from vmm.kvm.structs import CpuidEntry

# The APIC id is 8 bits in leaf 1 EBX[31:24], and 0xFF is the broadcast id.
MAX_VCPUS: Final = 254

# Leaf 1 (SDM table 3-8 and 3-10/3-11).
LEAF_FEATURES: Final = 0x1
LEAF1_EBX_LOGICAL_COUNT_SHIFT: Final = 16  # EBX[23:16]: addressable logical processor ids
LEAF1_EBX_LOGICAL_COUNT_MAX: Final = 0xFF
LEAF1_EBX_APIC_ID_SHIFT: Final = 24  # EBX[31:24]: initial APIC id
LEAF1_ECX_MONITOR: Final = 1 << 3  # MONITOR/MWAIT
LEAF1_ECX_VMX: Final = 1 << 5  # no nested virtualisation
LEAF1_ECX_TSC_DEADLINE: Final = 1 << 24
LEAF1_ECX_HYPERVISOR: Final = 1 << 31  # "not used, always 0" on hardware; set by hypervisors
LEAF1_EDX_HTT: Final = 1 << 28  # EBX[23:16] is valid

# Leaf 4: deterministic cache parameters (Intel). EAX[4:0] cache type, 0 = no more caches.
LEAF_CACHE_PARAMETERS: Final = 0x4
LEAF4_EAX_CACHE_TYPE_MASK: Final = 0x1F
LEAF4_EAX_CACHE_LEVEL_SHIFT: Final = 5
LEAF4_EAX_SHARING_SHIFT: Final = 14  # EAX[25:14]: logical processors sharing the cache - 1
LEAF4_EAX_SHARING_MASK: Final = 0xFFF << LEAF4_EAX_SHARING_SHIFT
LEAF4_EAX_CORES_SHIFT: Final = 26  # EAX[31:26]: cores per package - 1
LEAF4_EAX_CORES_MASK: Final = 0x3F << LEAF4_EAX_CORES_SHIFT

# Leaf 6: thermal and power management. A vCPU has no sensors or P-state control.
LEAF_POWER_MANAGEMENT: Final = 0x6
# Leaf 0xA: architectural performance monitoring. The monitor offers no vPMU.
LEAF_PERFORMANCE_MONITORING: Final = 0xA

# Leaves 0xB and 0x1F: extended topology (SDM table 3-8, "Extended Topology Enumeration").
LEAF_EXTENDED_TOPOLOGY: Final = 0xB
LEAF_V2_EXTENDED_TOPOLOGY: Final = 0x1F
TOPOLOGY_LEVEL_INVALID: Final = 0
TOPOLOGY_LEVEL_SMT: Final = 1
TOPOLOGY_LEVEL_CORE: Final = 2
TOPOLOGY_ECX_LEVEL_TYPE_SHIFT: Final = 8

# AMD: Fn8000_0008 ECX (size identifiers) and Fn8000_001E (extended APIC id, APM E.4.25).
LEAF_AMD_SIZE_IDENTIFIERS: Final = 0x8000_0008
AMD_8_ECX_NC_MASK: Final = 0xFF  # ECX[7:0]: number of threads in the package - 1
AMD_8_ECX_APIC_ID_SIZE_SHIFT: Final = 12  # ECX[15:12]: APIC id bits that select the thread
AMD_8_ECX_APIC_ID_SIZE_MASK: Final = 0xF << AMD_8_ECX_APIC_ID_SIZE_SHIFT
LEAF_AMD_EXTENDED_APIC_ID: Final = 0x8000_001E
AMD_1E_EBX_THREADS_PER_CORE_SHIFT: Final = 8  # EBX[15:8]: threads per compute unit - 1


class CpuidError(ValueError):
    """A vCPU topology that CPUID cannot describe."""


def normalize_cpuid(
    entries: Sequence[CpuidEntry],
    vcpu_index: int,
    vcpu_count: int,
    smt: bool,
    *,
    tsc_deadline: bool = False,
) -> list[CpuidEntry]:
    """Return the CPUID entries for vCPU `vcpu_index` of `vcpu_count`.

    `tsc_deadline` keeps the TSC-deadline timer bit; pass the result of
    KVM_CHECK_EXTENSION(KVM_CAP_TSC_DEADLINE_TIMER) with an in-kernel irqchip.
    Leaves not named in this module pass through unchanged.
    """
    _check_topology(vcpu_index, vcpu_count, smt)
    topology = _Topology(vcpu_index, vcpu_count, 2 if smt else 1)
    result = []
    for entry in entries:
        if entry.function in (LEAF_POWER_MANAGEMENT, LEAF_PERFORMANCE_MONITORING):
            entry = dataclasses.replace(entry, eax=0, ebx=0, ecx=0, edx=0)
        elif entry.function == LEAF_FEATURES:
            entry = _leaf1(entry, topology, tsc_deadline)
        elif entry.function == LEAF_CACHE_PARAMETERS:
            entry = _leaf4(entry, topology)
        elif entry.function in (LEAF_EXTENDED_TOPOLOGY, LEAF_V2_EXTENDED_TOPOLOGY):
            entry = _extended_topology(entry, topology)
        elif entry.function == LEAF_AMD_SIZE_IDENTIFIERS:
            entry = _amd_size_identifiers(entry, topology)
        elif entry.function == LEAF_AMD_EXTENDED_APIC_ID:
            entry = _amd_extended_apic_id(entry, topology)
        result.append(entry)
    return result


def _check_topology(vcpu_index: int, vcpu_count: int, smt: bool) -> None:
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise CpuidError(f"vCPU count {vcpu_count} is outside 1..{MAX_VCPUS}")
    if not 0 <= vcpu_index < vcpu_count:
        raise CpuidError(f"vCPU index {vcpu_index} is outside 0..{vcpu_count - 1}")
    if smt and vcpu_count > 1 and vcpu_count % 2:
        raise CpuidError(f"vCPU count {vcpu_count} with SMT must be 1 or even")


@dataclasses.dataclass(frozen=True)
class _Topology:
    apic_id: int
    vcpu_count: int
    threads_per_core: int

    @property
    def smt_bits(self) -> int:
        """Bits of the APIC id that select the thread within a core."""
        return (self.threads_per_core - 1).bit_length()

    @property
    def package_bits(self) -> int:
        """Bits of the APIC id that select the thread within the package."""
        return max((self.vcpu_count - 1).bit_length(), self.smt_bits)

    @property
    def core_count(self) -> int:
        return -(-self.vcpu_count // self.threads_per_core)


def _leaf1(entry: CpuidEntry, topology: _Topology, tsc_deadline: bool) -> CpuidEntry:
    ebx = entry.ebx & 0xFFFF  # keep brand index and CLFLUSH line size
    ebx |= topology.apic_id << LEAF1_EBX_APIC_ID_SHIFT
    # 129 or more vCPUs need 256 ids, which the 8-bit field cannot hold; it saturates.
    logical_count = min(1 << topology.package_bits, LEAF1_EBX_LOGICAL_COUNT_MAX)
    ebx |= logical_count << LEAF1_EBX_LOGICAL_COUNT_SHIFT
    ecx = entry.ecx & ~(LEAF1_ECX_MONITOR | LEAF1_ECX_VMX) | LEAF1_ECX_HYPERVISOR
    if not tsc_deadline:
        ecx &= ~LEAF1_ECX_TSC_DEADLINE
    edx = entry.edx & ~LEAF1_EDX_HTT
    if topology.vcpu_count > 1:
        edx |= LEAF1_EDX_HTT
    return dataclasses.replace(entry, ebx=ebx, ecx=ecx, edx=edx)


def _leaf4(entry: CpuidEntry, topology: _Topology) -> CpuidEntry:
    if entry.eax & LEAF4_EAX_CACHE_TYPE_MASK == 0:
        return entry
    level = entry.eax >> LEAF4_EAX_CACHE_LEVEL_SHIFT & 0x7
    # L1 and L2 belong to one core; L3 and beyond are shared by the package.
    sharing = topology.threads_per_core if level <= 2 else 1 << topology.package_bits
    eax = entry.eax & ~(LEAF4_EAX_SHARING_MASK | LEAF4_EAX_CORES_MASK)
    eax |= (sharing - 1) << LEAF4_EAX_SHARING_SHIFT
    cores_field = (1 << (topology.package_bits - topology.smt_bits)) - 1
    eax |= (cores_field & 0x3F) << LEAF4_EAX_CORES_SHIFT
    return dataclasses.replace(entry, eax=eax)


def _extended_topology(entry: CpuidEntry, topology: _Topology) -> CpuidEntry:
    # Subleaf 0 describes the SMT level and subleaf 1 the core level. Each
    # gives the APIC-id shift to the next level up (EAX[4:0]), the logical
    # processors at that level (EBX[15:0]), the level number and type (ECX)
    # and the x2APIC id (EDX).
    subleaf = entry.index
    if subleaf == 0:
        eax, ebx, level = topology.smt_bits, topology.threads_per_core, TOPOLOGY_LEVEL_SMT
    elif subleaf == 1:
        eax, ebx, level = topology.package_bits, topology.vcpu_count, TOPOLOGY_LEVEL_CORE
    else:
        eax, ebx, level = 0, 0, TOPOLOGY_LEVEL_INVALID
    ecx = (subleaf & 0xFF) | level << TOPOLOGY_ECX_LEVEL_TYPE_SHIFT
    return dataclasses.replace(entry, eax=eax, ebx=ebx, ecx=ecx, edx=topology.apic_id)


def _amd_size_identifiers(entry: CpuidEntry, topology: _Topology) -> CpuidEntry:
    ecx = entry.ecx & ~(AMD_8_ECX_NC_MASK | AMD_8_ECX_APIC_ID_SIZE_MASK)
    ecx |= topology.vcpu_count - 1
    ecx |= topology.package_bits << AMD_8_ECX_APIC_ID_SIZE_SHIFT
    return dataclasses.replace(entry, ecx=ecx)


def _amd_extended_apic_id(entry: CpuidEntry, topology: _Topology) -> CpuidEntry:
    # EAX: extended APIC id. EBX[7:0]: compute unit (core) id. ECX: one node,
    # node id 0 (ECX[10:8] nodes per processor - 1, ECX[7:0] node id).
    core_id = topology.apic_id >> topology.smt_bits
    ebx = (entry.ebx & ~0xFFFF) | core_id & 0xFF
    ebx |= (topology.threads_per_core - 1) << AMD_1E_EBX_THREADS_PER_CORE_SHIFT
    return dataclasses.replace(entry, eax=topology.apic_id, ebx=ebx, ecx=0)
