"""Per-device request fuzzing: well-formed chains carrying arbitrary requests.

The chains obey every virtqueue rule, so the device must answer each one
(virtio 1.2 section 2.7.8: every chain comes back in the used ring) and stay
out of DEVICE_NEEDS_RESET; the request contents (block types and sectors,
net frames, vsock headers, balloon page numbers, entropy sizes) are random.
Field layouts and codes come from spec/devices.yaml.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import strategies_virtio as sv
from tests.virtio_driver import Buffer, VirtqueueDriver

_BLOCK = sv.SPEC["virtio_devices"]["block"]
_BLOCK_TYPES = sorted(_BLOCK["request_types"].values())
_BLOCK_STATUSES = set(_BLOCK["status"].values())
_QUEUE_SIZE = 16
_DISK_SECTORS = 64
# Balloon pages start above the rings and data areas of every queue (see start_device).
_FIRST_FREE_PFN = 0x60
# With free page reporting and no statistics: inflateq, deflateq, reporting_vq (5.5.2).
_REPORTING_QUEUE = 2


def _serve(dut: sv.DeviceUnderTest, index: int, chains: list[list[Buffer]]) -> list[tuple[int, int]]:
    """Offer `chains` on queue `index`, notify, and return the used entries."""
    queue = dut.queues[index]
    heads = [queue.add_chain(chain) for chain in chains]
    dut.driver.notify(index)
    entries = sv.check_used_ring(queue, consumed_bound=len(chains))
    assert not dut.status & sv.NEEDS_RESET, "well-formed chains marked the device broken"
    assert [head for head, _ in entries] == heads[: len(entries)]
    for (head, length), chain in zip(entries, chains):
        writable = sum(buffer.length for buffer in chain if buffer.writable)
        assert length <= writable, f"used len {length} > writable bytes {writable}"
    return entries


@st.composite
def block_requests(draw: st.DrawFn) -> tuple[int, int, int, list[int]]:
    """(type, sector, data length, writable split): types include undefined ones."""
    request_type = draw(st.one_of(st.sampled_from(_BLOCK_TYPES), st.integers(0, 2**32 - 1)))
    sector = draw(st.one_of(st.integers(0, _DISK_SECTORS + 2),
                            st.sampled_from([2**63, 2**64 - 1, 2**55]),
                            st.integers(0, 2**64 - 1)))
    data_length = draw(st.sampled_from([0, 1, 511, 512, 1024, 4096]))
    return request_type, sector, data_length, []


@sv.fuzz_settings()
# At most three descriptors per request, so the chains fit the table at once.
@given(requests=st.lists(block_requests(), min_size=1, max_size=_QUEUE_SIZE // 3),
       status_length=st.sampled_from([1, 1, 4]))
def test_5_2_6_block_requests_of_every_type_and_sector(
    requests: list[tuple[int, int, int, list[int]]], status_length: int
) -> None:
    """5.2.6.1: "A driver MUST NOT submit a request which would cause a read or write beyond
    capacity" and 5.2.6.2 the device answers such requests: "The device MUST set the status
    byte to VIRTIO_BLK_S_IOERR for a write request if the VIRTIO_BLK_F_RO feature if offered",
    VIRTIO_BLK_S_UNSUPP for unknown types. Every request comes back with a status from the
    spec, and the disk past its capacity is never written.
    """
    memory = sv.new_memory()
    dut = sv.start_device("block", memory, _QUEUE_SIZE)
    try:
        queue = dut.queues[0]
        chains = []
        for request_type, sector, data_length, _ in requests:
            chain = [queue.buffer(struct.pack("<IIQ", request_type, 0, sector))]
            if data_length:
                chain.append(queue.buffer(length=data_length, writable=request_type == 0))
            chain.append(queue.buffer(length=status_length, writable=True))
            chains.append(chain)
        entries = _serve(dut, 0, chains)
        assert len(entries) == len(chains)
        for chain in chains:
            status = memory.read_u8(chain[-1].address + chain[-1].length - 1)
            assert status in _BLOCK_STATUSES
        device = dut.device
        assert device.backend.size == _DISK_SECTORS * 512  # type: ignore[attr-defined]
    finally:
        dut.close()
        memory.close()


@sv.fuzz_settings()
@given(frames=st.lists(st.binary(min_size=0, max_size=1600), min_size=1, max_size=6),
       split=st.integers(0, 20))
def test_5_1_6_net_transmits_any_frame(frames: list[bytes], split: int) -> None:
    """5.1.6.2: "The driver MUST set num_buffers to zero" and may send any frame; the device
    returns every transmit chain whatever its header and length, and never drops into
    DEVICE_NEEDS_RESET for a malformed frame (the frame is dropped and counted).
    """
    memory = sv.new_memory()
    dut = sv.start_device("net", memory, _QUEUE_SIZE)
    try:
        tx = dut.queues[1]
        chains = []
        for frame in frames:
            if 0 < split < len(frame):
                chains.append([tx.buffer(frame[:split]), tx.buffer(frame[split:])])
            else:
                chains.append([tx.buffer(frame or b"\0")])
        entries = _serve(dut, 1, chains)
        assert len(entries) == len(chains)
    finally:
        dut.close()
        memory.close()


@st.composite
def vsock_packets(draw: st.DrawFn) -> bytes:
    """A virtio_vsock_hdr with random fields (op, type, ports, len) and a short payload."""
    op = draw(st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)))
    header = struct.pack(
        "<QQIIIHHIII", draw(st.sampled_from([3, 2, 0, 2**64 - 1])),
        draw(st.sampled_from([2, 3, 1, 2**64 - 1])), draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
        draw(st.sampled_from([1, 2, 0, 0xFFFF])), op, draw(st.integers(0, 3)),
        draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
    )
    return header + draw(st.binary(max_size=64))


@sv.fuzz_settings()
@given(packets=st.lists(vsock_packets(), min_size=1, max_size=6), cut=st.integers(0, 44))
def test_5_10_6_vsock_accepts_any_packet(packets: list[bytes], cut: int) -> None:
    """5.10.6.1: "The device MUST NOT" process a packet with an unknown type as a stream:
    VIRTIO_VSOCK_OP_RST answers it. Any header (any op, type, CIDs, len past the payload, a
    truncated header) comes back on the tx queue; the device stays usable.
    """
    memory = sv.new_memory()
    dut = sv.start_device("vsock", memory, _QUEUE_SIZE)
    try:
        rx = dut.queues[0]
        for _ in range(4):
            rx.add_chain([rx.buffer(length=44 + 256, writable=True)])
        dut.driver.notify(0)
        tx = dut.queues[1]
        chains = [[tx.buffer(packet[:cut] if cut and index == 0 else packet)]
                  for index, packet in enumerate(packets)]
        entries = _serve(dut, 1, chains)
        assert len(entries) == len(chains)
        sv.check_used_ring(rx, consumed_bound=4)
    finally:
        dut.close()
        memory.close()


@sv.fuzz_settings()
@given(pfns=st.lists(st.one_of(st.integers(_FIRST_FREE_PFN, 0x400),
                               st.integers(_FIRST_FREE_PFN, 2**32 - 1)),
                     min_size=1, max_size=64),
       queue_index=st.sampled_from([0, 1, _REPORTING_QUEUE]))
def test_5_5_6_balloon_page_numbers(pfns: list[int], queue_index: int) -> None:
    """5.5.6.1: the driver "MUST use an inflate or deflate request" of page frame numbers; a
    page outside guest RAM is the driver's mistake and is skipped, never an error that
    stops the VM. (Pages holding the rings are left out: a driver that gives those away
    breaks its own queues, and DEVICE_NEEDS_RESET is then the right answer.)
    """
    memory = sv.new_memory()
    dut = sv.start_device("balloon", memory, _QUEUE_SIZE)
    try:
        queue = dut.queues[queue_index]
        if queue_index == _REPORTING_QUEUE:
            chain = [Buffer(pfns[0] << 12, 4096, writable=True)]
        else:
            chain = [queue.buffer(struct.pack(f"<{len(pfns)}I", *pfns))]
        if queue_index == _REPORTING_QUEUE and not memory.contains(pfns[0] << 12, 4096):
            # A reported page outside RAM breaks the queue rules (2.7.5): needs reset.
            queue.add_chain(chain)
            dut.driver.notify(queue_index)
            assert dut.status & sv.NEEDS_RESET
            return
        entries = _serve(dut, queue_index, [chain])
        assert len(entries) == 1
        assert memory.outside == []
    finally:
        dut.close()
        memory.close()


@sv.fuzz_settings()
@given(sizes=st.lists(st.lists(st.sampled_from([0, 1, 7, 64, 4096, 0x1_0000, 0x2_0000]),
                               min_size=1, max_size=3), min_size=1, max_size=5))
def test_5_4_6_entropy_of_any_size(sizes: list[list[int]]) -> None:
    """5.4.6.1: "The device MUST place one or more random bytes into the buffer"; used len
    never exceeds the writable bytes and the request cap, zero-length chains come back
    with len 0.
    """
    memory = sv.new_memory()
    dut = sv.start_device("entropy", memory, _QUEUE_SIZE)
    try:
        queue: VirtqueueDriver = dut.queues[0]
        chains = [[Buffer(sv.FUZZ_DATA[0], size, True) for size in sizes_] for sizes_ in sizes]
        entries = _serve(dut, 0, chains)
        assert len(entries) == len(chains)
        for (_head, length), chain in zip(entries, chains):
            total = sum(buffer.length for buffer in chain)
            assert length == min(total, 64 * 1024)
        assert queue.size == _QUEUE_SIZE
    finally:
        dut.close()
        memory.close()
