"""Hypothesis strategies and checks for fuzzing virtqueues and virtio devices without KVM.

The limits come from spec/devices.yaml: queue sizes, descriptor layout and
flags, register offsets and status bits. A fuzz case writes a driver's
queue image into guest RAM byte by byte (descriptor table, available ring,
indirect tables), notifies the device through its virtio-mmio transport, and
then checks the properties every device owes a misbehaving driver:

- no exception leaves the transport;
- the device writes guest RAM only inside device-writable buffers and the used ring;
- the used ring stays well formed (ids below the queue size, at most one entry per chain);
- a rule the driver broke marks DEVICE_NEEDS_RESET, and the device works again after reset;
- work per notification is bounded by the queue size.

Guest RAM has a hole between its two regions, so an address in the hole is
unmapped guest physical space, as it would be in a VM.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Sequence

import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.virtio_driver import Buffer, MmioDriver, VirtqueueDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.balloon import Balloon
from vmm.devices.virtio.block import Block, FileBackend
from vmm.devices.virtio.device import VirtioDevice
from vmm.devices.virtio.net import Net, parse_mac
from vmm.devices.virtio.queue import used_ring_size
from vmm.devices.virtio.rng import Rng
from vmm.devices.virtio.vsock import Vsock
from vmm.memory import GuestMemory

SPEC_PATH: Final = Path(__file__).resolve().parents[2] / "spec" / "devices.yaml"


def load_spec() -> dict[str, Any]:
    """Return spec/devices.yaml as a dict."""
    with SPEC_PATH.open() as file:
        loaded: dict[str, Any] = yaml.safe_load(file)
    return loaded


SPEC: Final = load_spec()
_VQ: Final = SPEC["virtqueue"]
DESCRIPTOR_SIZE: Final[int] = _VQ["descriptor"]["size"]
F_NEXT: Final[int] = _VQ["descriptor"]["flags"]["VIRTQ_DESC_F_NEXT"]
F_WRITE: Final[int] = _VQ["descriptor"]["flags"]["VIRTQ_DESC_F_WRITE"]
F_INDIRECT: Final[int] = _VQ["descriptor"]["flags"]["VIRTQ_DESC_F_INDIRECT"]
NO_INTERRUPT: Final[int] = _VQ["available_ring"]["flags"]["VIRTQ_AVAIL_F_NO_INTERRUPT"]
STATUS: Final[dict[str, int]] = SPEC["virtio"]["device_status"]
NEEDS_RESET: Final = STATUS["DEVICE_NEEDS_RESET"]
REGISTERS: Final[dict[str, dict[str, Any]]] = SPEC["virtio_mmio"]["registers"]
CONFIG_SPACE_OFFSET: Final[int] = SPEC["virtio_mmio"]["config_space_offset"]
MMIO_WINDOW: Final[int] = SPEC["virtio_mmio"]["window_size"]

# Guest RAM of a fuzz case: two 1 MiB regions with an unmapped 1 MiB hole between them.
LOW_RAM: Final = (0, 0x10_0000)
HIGH_RAM: Final = (0x20_0000, 0x10_0000)
HOLE: Final = (0x10_0000, 0x20_0000)
RAM_END: Final = HIGH_RAM[0] + HIGH_RAM[1]
# Where the fuzzed queue's rings and data lie, and where a second, healthy device lives.
FUZZ_RING_BASE: Final = 0x1000
FUZZ_DATA: Final = (0x4_0000, 0x10_0000)
INDIRECT_BASE: Final = 0x2_0000
HEALTHY_RING_BASE: Final = 0x20_1000
HEALTHY_DATA_BASE: Final = 0x24_0000
# Each popped descriptor costs the device a few guest RAM accesses; this bounds them all.
ACCESSES_PER_DESCRIPTOR: Final = 16
ACCESSES_PER_NOTIFY: Final = 64


def fuzz_settings(**overrides: Any) -> settings:
    """Return settings derived from the loaded profile (`quick` or `deep`), without deadline.

    The profile sets the example count; a device fuzz case opens sockets and
    files, so per-example timing varies and the deadline is off.
    """
    base = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])
    base.update(overrides)
    return settings(**base)


class CountingMemory(GuestMemory):
    """Guest RAM that counts accesses and records every request for unmapped space.

    Not a stand-in: it is GuestMemory, with two counters added to its one
    chokepoint (`view`). `outside` collects (address, length) of requests that
    GuestMemory rejected; a device must turn each into a QueueError or skip it.
    """

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        super().__init__(ranges)
        self.access_count = 0
        self.outside: list[tuple[int, int]] = []

    def view(self, address: int, length: int) -> memoryview:
        self.access_count += 1
        if not self.contains(address, length):
            self.outside.append((address, length))
        return super().view(address, length)

    def snapshot(self) -> bytes:
        """Return the bytes of both regions, low then high."""
        return self.read(*LOW_RAM) + self.read(*HIGH_RAM)


def new_memory() -> CountingMemory:
    return CountingMemory([LOW_RAM, HIGH_RAM])


# Descriptors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawDescriptor:
    """A descriptor exactly as a driver writes it, however wrong."""

    address: int
    length: int
    flags: int
    next_index: int

    def pack(self) -> bytes:
        return struct.pack("<QIHH", self.address, self.length, self.flags, self.next_index)


def addresses() -> st.SearchStrategy[int]:
    """Guest addresses: in the data area, at region edges, in the hole, past 2^64 when added."""
    return st.one_of(
        st.integers(FUZZ_DATA[0], FUZZ_DATA[1] - 1),
        st.sampled_from([0, LOW_RAM[1] - 1, LOW_RAM[1] - 16, HOLE[0], HIGH_RAM[0] - 8,
                         RAM_END - 1, RAM_END, 2**63, 2**64 - 1, 2**64 - 16]),
        st.integers(0, 2**64 - 1),
    )


def lengths() -> st.SearchStrategy[int]:
    """Buffer lengths: zero, small, unaligned, page-sized, region-sized and 2^32 - 1."""
    return st.one_of(
        st.integers(0, 600),
        st.sampled_from([0, 1, 15, 16, 17, 512, 4096, 0x10_0000, 0xFFFF_FFF0, 0xFFFF_FFFF]),
        st.integers(0, 2**32 - 1),
    )


def descriptors(table_size: int) -> st.SearchStrategy[RawDescriptor]:
    """One descriptor with any flag combination and a next index near or past the table."""
    return st.builds(
        RawDescriptor,
        address=addresses(),
        length=lengths(),
        flags=st.one_of(st.sampled_from([0, F_NEXT, F_WRITE, F_NEXT | F_WRITE, F_INDIRECT]),
                        st.integers(0, 0xFFFF)),
        next_index=st.one_of(st.integers(0, table_size + 1), st.integers(0, 0xFFFF)),
    )


@dataclass
class QueueImage:
    """What a (possibly malicious) driver placed in RAM for one queue before a notify."""

    size: int
    table: list[RawDescriptor]
    indirect: list[RawDescriptor]
    avail_ring: list[int]
    avail_idx: int
    avail_flags: int
    used_event: int


@st.composite
def queue_images(draw: st.DrawFn, size: int) -> QueueImage:
    """A descriptor table, an indirect table at INDIRECT_BASE and an available ring."""
    table = draw(st.lists(descriptors(size), min_size=size, max_size=size))
    indirect = draw(st.lists(descriptors(size), min_size=0, max_size=size + 2))
    if indirect and draw(st.booleans()):
        # Point one table entry at the indirect table with a consistent length.
        slot = draw(st.integers(0, size - 1))
        length = DESCRIPTOR_SIZE * len(indirect)
        table[slot] = RawDescriptor(INDIRECT_BASE, length, F_INDIRECT, 0)
    ring = draw(st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)),
                         min_size=size, max_size=size))
    avail_idx = draw(st.one_of(st.integers(0, size + 2), st.integers(0, 0xFFFF)))
    return QueueImage(
        size=size, table=table, indirect=indirect, avail_ring=ring, avail_idx=avail_idx,
        avail_flags=draw(st.sampled_from([0, NO_INTERRUPT, 0xFFFF])),
        used_event=draw(st.integers(0, 0xFFFF)),
    )


def queue_sizes(max_size: int) -> st.SearchStrategy[int]:
    """Powers of two from 1 up to `max_size` (the transport checks the rule)."""
    exponents = max_size.bit_length() - 1
    return st.integers(0, min(exponents, 5)).map(lambda e: 1 << e)


def write_image(memory: GuestMemory, driver: VirtqueueDriver, image: QueueImage) -> None:
    """Write `image` into the rings `driver` set up, and the indirect table at INDIRECT_BASE."""
    for index, descriptor in enumerate(image.table):
        memory.write(driver.desc_table + DESCRIPTOR_SIZE * index, descriptor.pack())
    for index, descriptor in enumerate(image.indirect):
        memory.write(INDIRECT_BASE + DESCRIPTOR_SIZE * index, descriptor.pack())
    for slot, head in enumerate(image.avail_ring):
        memory.write_le16(driver.avail_ring + 4 + 2 * slot, head)
    driver.set_avail_flags(image.avail_flags)
    driver.set_used_event(image.used_event)
    driver.set_avail_idx(image.avail_idx)


def writable_ranges(image: QueueImage, driver: VirtqueueDriver) -> list[tuple[int, int]]:
    """The ranges the device may write: writable buffers (direct and indirect) and used ring."""
    ranges = [(driver.used_ring, used_ring_size(image.size))]
    for descriptor in [*image.table, *image.indirect]:
        if descriptor.flags & F_WRITE and not descriptor.flags & F_INDIRECT:
            ranges.append((descriptor.address, descriptor.length))
    return ranges


def changed_outside(before: bytes, after: bytes, allowed: Sequence[tuple[int, int]]) -> list[int]:
    """Return guest addresses whose byte changed but lie in no allowed range."""
    bad: list[int] = []
    low_size = LOW_RAM[1]
    for position in _diff_positions(before, after):
        address = position if position < low_size else HIGH_RAM[0] + position - low_size
        if not any(start <= address < start + length for start, length in allowed):
            bad.append(address)
    return bad


def _diff_positions(before: bytes, after: bytes) -> Iterator[int]:
    block = 4096
    for offset in range(0, len(before), block):
        if before[offset : offset + block] != after[offset : offset + block]:
            for position in range(offset, min(offset + block, len(before))):
                if before[position] != after[position]:
                    yield position


# Devices -------------------------------------------------------------------------------------


@dataclass
class DeviceUnderTest:
    """A started virtio device: its transport, driver-side queues and irq counter."""

    name: str
    device: VirtioDevice
    transport: mmio.MmioTransport
    driver: MmioDriver
    queues: list[VirtqueueDriver]
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    irq_count: int = 0

    @property
    def status(self) -> int:
        return self.driver.read32(mmio.STATUS_OFFSET)

    def close(self) -> None:
        for cleanup in self.cleanups:
            cleanup()


class _Irq:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


class SeqpacketBackend:
    """A net back end keeping frame boundaries: the device's end of a SOCK_SEQPACKET pair."""

    def __init__(self) -> None:
        self.device_end, self.host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.device_end.setblocking(False)
        self.host_end.setblocking(False)

    def read_frame(self, buffer: memoryview) -> int:
        return self.device_end.recv_into(buffer)

    def write_frame(self, parts: Sequence[bytes | memoryview]) -> int:
        return self.device_end.sendmsg(parts)

    def set_offload(self, flags: int) -> None:
        """Accept any offload setting, as a tap does."""

    def close(self) -> None:
        self.device_end.close()
        self.host_end.close()


class NullVsockHost:
    """A vsock host side that refuses every guest connection and has nothing to send."""

    def connect(self, port: int) -> Any:
        raise ConnectionRefusedError(f"fuzz host: nothing listens on port {port}")


def make_block(_memory: GuestMemory) -> tuple[VirtioDevice, list[Callable[[], None]]]:
    fd = os.memfd_create("fuzz-disk")
    os.ftruncate(fd, 64 * 512)
    return Block("fuzz", FileBackend(fd), cache_type="Writeback"), [lambda: os.close(fd)]


def make_rng(_memory: GuestMemory) -> tuple[VirtioDevice, list[Callable[[], None]]]:
    return Rng(lambda length: bytes((i * 13 + 7) % 256 for i in range(length))), []


def make_net(_memory: GuestMemory) -> tuple[VirtioDevice, list[Callable[[], None]]]:
    backend = SeqpacketBackend()
    net = Net("eth0", backend, parse_mac("AA:FC:00:00:00:01"), mtu=1500)
    return net, [backend.close]


def make_balloon(_memory: GuestMemory) -> tuple[VirtioDevice, list[Callable[[], None]]]:
    return Balloon(0, deflate_on_oom=True, free_page_reporting=True), []


def make_vsock(_memory: GuestMemory) -> tuple[VirtioDevice, list[Callable[[], None]]]:
    return Vsock(3, NullVsockHost()), []  # type: ignore[arg-type]


DEVICE_FACTORIES: Final[dict[str, Callable[[GuestMemory],
                                          tuple[VirtioDevice, list[Callable[[], None]]]]]] = {
    "block": make_block,
    "net": make_net,
    "entropy": make_rng,
    "balloon": make_balloon,
    "vsock": make_vsock,
}


def start_device(
    name: str, memory: GuestMemory, size: int, ring_base: int = FUZZ_RING_BASE,
    data_base: int = FUZZ_DATA[0], features: int | None = None,
) -> DeviceUnderTest:
    """Build device `name`, program its queues of `size` entries over MMIO and set DRIVER_OK.

    Queue i's rings sit at ring_base + i * 0x4000 and its data at data_base + i * 0x8000.
    """
    device, cleanups = DEVICE_FACTORIES[name](memory)
    irq = _Irq()
    transport = mmio.MmioTransport(device, memory, irq)
    queues = [
        VirtqueueDriver(memory, size, ring_base=ring_base + 0x4000 * index,
                        data_base=data_base + 0x8000 * index)
        for index in range(len(device.queue_max_sizes))
    ]
    driver = MmioDriver(transport)
    driver.start(queues, features)
    dut = DeviceUnderTest(name, device, transport, driver, queues, cleanups)
    dut.irq_count = 0
    return dut


def ring_bytes(driver: VirtqueueDriver) -> int:
    """Bytes from the descriptor table to the end of the used ring."""
    return driver.used_ring + used_ring_size(driver.size) - driver.desc_table


def check_used_ring(driver: VirtqueueDriver, consumed_bound: int) -> list[tuple[int, int]]:
    """Assert the used ring is well formed and return its new entries.

    2.7.8: each used entry names a head below the queue size, and the device
    adds at most one entry per chain the driver made available.
    """
    entries = driver.used_entries()
    assert len(entries) <= consumed_bound, (entries, consumed_bound)
    for head, _length in entries:
        assert head < driver.size, f"used id {head} >= queue size {driver.size}"
    return entries


def healthy_rng_round_trip(memory: GuestMemory) -> DeviceUnderTest:
    """Start an rng in the high region, ask it for 32 bytes and assert it answered."""
    rng = start_device("entropy", memory, 8, ring_base=HEALTHY_RING_BASE,
                       data_base=HEALTHY_DATA_BASE)
    queue = rng.queues[0]
    buffer = queue.buffer(length=32, writable=True)
    queue.add_chain([buffer])
    rng.driver.notify(0)
    assert queue.used_entries() == [(0, 32)], "a healthy device stopped working"
    assert memory.read(buffer.address, 32) != bytes(32)
    return rng


__all__ = [
    "Buffer",
    "CountingMemory",
    "DeviceUnderTest",
    "QueueImage",
    "RawDescriptor",
    "check_used_ring",
    "fuzz_settings",
    "queue_images",
    "start_device",
    "write_image",
]
