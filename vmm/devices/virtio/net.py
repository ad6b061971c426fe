"""virtio-net (virtio 1.2 section 5.1) over a host back end such as a tap interface.

Queues: receiveq1 (index 0) carries frames to the guest, transmitq1 (index 1)
frames from it (5.1.2). Every frame in either direction starts with the 12-byte
virtio-net header of 5.1.6 (flags, gso_type, hdr_len, gso_size, csum_start,
csum_offset, num_buffers). The tap back end uses the same header, so the
device copies header and frame through without looking at the offload fields.

Offloads matter here because each frame costs a fixed amount of Python work.
With CSUM and HOST_TSO4/6 the guest sends TCP segments of up to 64 KiB and
leaves the checksum to the host. With GUEST_CSUM and GUEST_TSO4/6 the tap
delivers the same in the other direction. One pass then moves 64 KiB instead
of 1.5 KiB, so throughput is not bounded by the per-frame cost of this code.
MRG_RXBUF lets such a large frame span several receive chains; num_buffers in
the first header says how many (5.1.6.4).

Transmit (5.1.6.2): each chain holds header and frame in device-readable
buffers. A chain shorter than the header or longer than MAX_FRAME_SIZE is
malformed: it is returned unused, counted, and the device carries on. A frame
for the MMDS address, from an interface with MMDS enabled, goes to the MMDS
stack instead of the back end.

Receive (5.1.6.3, 5.1.6.4): a frame waits in `_rx_frame` until the guest has
made enough buffer space available. MMDS replies go before frames from the
back end. While the guest has no buffers, the device stops reading the back
end (`on_rx_interest(False)`), so a busy tap cannot spin the event loop, and
asks again once the guest adds buffers.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import asdict, dataclass
from typing import Callable, Final, Protocol, Sequence

from vmm.devices.virtio.device import (
    VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice,
    VirtioInterrupt,
    feature_bit,
)
from vmm.devices.virtio.queue import DescriptorChain, Queue
from vmm.devices.virtio.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_UFO,
    VNET_HEADER_SIZE,
)
from vmm.memory import GuestMemory
from vmm.mmds.stack import MmdsStack
from vmm.rate_limiter import RateLimiter, TokenKind

logger = logging.getLogger(__name__)

# 5.1.1 Device ID.
VIRTIO_ID_NET: Final = 1
# 5.1.2 Virtqueues.
RX_QUEUE_INDEX: Final = 0
TX_QUEUE_INDEX: Final = 1
NET_QUEUE_SIZE: Final = 256

# 5.1.3 Feature bits.
VIRTIO_NET_F_CSUM: Final = 0
VIRTIO_NET_F_GUEST_CSUM: Final = 1
VIRTIO_NET_F_MTU: Final = 3
VIRTIO_NET_F_MAC: Final = 5
VIRTIO_NET_F_GUEST_TSO4: Final = 7
VIRTIO_NET_F_GUEST_TSO6: Final = 8
VIRTIO_NET_F_GUEST_UFO: Final = 10
VIRTIO_NET_F_HOST_TSO4: Final = 11
VIRTIO_NET_F_HOST_TSO6: Final = 12
VIRTIO_NET_F_HOST_UFO: Final = 14
VIRTIO_NET_F_MRG_RXBUF: Final = 15

OFFERED_NET_FEATURES: Final = (
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MRG_RXBUF,
)

# Guest receive features and the tap offload each one allows (linux/if_tun.h).
_GUEST_OFFLOADS: Final = (
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
)

# 5.1.4 Device configuration layout: u8 mac[6]; le16 status; le16 max_virtqueue_pairs;
# le16 mtu. Status and max_virtqueue_pairs exist only with features not offered here.
CONFIG_MAC_OFFSET: Final = 0
CONFIG_MAC_SIZE: Final = 6
CONFIG_MTU_OFFSET: Final = 10
CONFIG_SIZE_WITH_MTU: Final = 12

# 5.1.6 Device Operation: struct virtio_net_hdr.
NET_HEADER: Final = struct.Struct("<BBHHHHH")
NUM_BUFFERS_OFFSET: Final = 10
VIRTIO_NET_HDR_GSO_NONE: Final = 0
assert NET_HEADER.size == VNET_HEADER_SIZE

# 5.1.6.3.1: without MRG_RXBUF a driver that negotiated a GUEST_TSO or GUEST_UFO
# feature supplies receive buffers of at least 65562 bytes, header included. That is
# also the largest header plus frame the device sends or accepts.
MAX_FRAME_SIZE: Final = 65562


class NetBackend(Protocol):
    """The host side of the device; a `vmm.devices.virtio.tap.Tap` in the monitor."""

    def read_frame(self, buffer: memoryview) -> int:
        """Read a 12-byte header and one frame into `buffer`, or raise BlockingIOError."""

    def write_frame(self, parts: Sequence[bytes | memoryview]) -> int:
        """Send one header and frame gathered from `parts`, or raise OSError."""

    def set_offload(self, flags: int) -> None:
        """Allow the TUN_F_* offloads in frames `read_frame` returns."""


@dataclass
class NetMetrics:
    """Counters under Firecracker's "net" metric names."""

    activate_fails: int = 0
    cfg_fails: int = 0
    no_rx_avail_buffer: int = 0
    no_tx_avail_buffer: int = 0
    rx_queue_event_count: int = 0
    rx_tap_event_count: int = 0
    rx_bytes_count: int = 0
    rx_packets_count: int = 0
    rx_fails: int = 0
    rx_count: int = 0
    rx_rate_limiter_throttled: int = 0
    rx_event_rate_limiter_count: int = 0
    tap_read_fails: int = 0
    tap_write_fails: int = 0
    tx_bytes_count: int = 0
    tx_malformed_frames: int = 0
    tx_fails: int = 0
    tx_count: int = 0
    tx_packets_count: int = 0
    tx_queue_event_count: int = 0
    tx_rate_limiter_throttled: int = 0
    tx_rate_limiter_event_count: int = 0
    tx_spoofed_mac_count: int = 0
    mmds_frames_detoured: int = 0


def parse_mac(text: str) -> bytes:
    """Turn "AA:FC:00:00:00:01" into 6 bytes, or raise ValueError naming the text."""
    parts = text.split(":")
    if len(parts) != CONFIG_MAC_SIZE or not all(len(part) == 2 for part in parts):
        raise ValueError(f"MAC address {text!r} is not six colon-separated hex byte pairs")
    return bytes(int(part, 16) for part in parts)


def _no_interest_change(_wanted: bool) -> None:
    pass


class Net(VirtioDevice):
    """A virtio network device between the guest and a `NetBackend`.

    The device calls `on_rx_interest(True)` when it can take frames from the
    back end and `on_rx_interest(False)` when it cannot. The monitor then adds
    or removes the tap's file descriptor from its event loop. The rate limiters
    are optional, and the monitor calls `on_rate_limiter_timer` when one of
    their timers fires.
    """

    device_type = VIRTIO_ID_NET
    queue_max_sizes = (NET_QUEUE_SIZE, NET_QUEUE_SIZE)

    def __init__(
        self,
        iface_id: str,
        backend: NetBackend,
        guest_mac: bytes | None = None,
        mtu: int | None = None,
        mmds: MmdsStack | None = None,
        rx_rate_limiter: RateLimiter | None = None,
        tx_rate_limiter: RateLimiter | None = None,
        on_rx_interest: Callable[[bool], None] = _no_interest_change,
    ) -> None:
        super().__init__()
        self.iface_id = iface_id
        self.backend = backend
        self.guest_mac = guest_mac
        self.mmds = mmds
        self.rx_rate_limiter = rx_rate_limiter
        self.tx_rate_limiter = tx_rate_limiter
        self.on_rx_interest = on_rx_interest
        self.metrics = NetMetrics()
        self._rx_buffer = bytearray(MAX_FRAME_SIZE)
        self._rx_frame: memoryview | None = None
        # The back end is watched only while the device is active and has room.
        self._rx_interest = False
        self.avail_features |= feature_bit(VIRTIO_RING_F_EVENT_IDX)
        for bit in OFFERED_NET_FEATURES:
            self.avail_features |= feature_bit(bit)
        self._build_config(guest_mac, mtu)

    def __repr__(self) -> str:
        return f"Net(iface_id={self.iface_id!r})"

    def _build_config(self, guest_mac: bytes | None, mtu: int | None) -> None:
        config = bytearray(CONFIG_SIZE_WITH_MTU if mtu is not None else CONFIG_MAC_SIZE)
        if guest_mac is not None:
            if len(guest_mac) != CONFIG_MAC_SIZE:
                raise ValueError(f"guest MAC {guest_mac.hex(':')} is not {CONFIG_MAC_SIZE} bytes")
            config[CONFIG_MAC_OFFSET:CONFIG_MAC_SIZE] = guest_mac
            self.avail_features |= feature_bit(VIRTIO_NET_F_MAC)
        if mtu is not None:
            struct.pack_into("<H", config, CONFIG_MTU_OFFSET, mtu)
            self.avail_features |= feature_bit(VIRTIO_NET_F_MTU)
        self.config_space = config

    def write_config(self, offset: int, data: bytes) -> None:
        """Reject driver writes: with VERSION_1 the MAC is read-only (5.1.4.1)."""
        self.metrics.cfg_fails += 1

    # Activation ------------------------------------------------------------------------------

    def activate(
        self, memory: GuestMemory, queues: list[Queue], interrupt: VirtioInterrupt
    ) -> None:
        """Start the device and allow the tap the offloads the driver accepted."""
        offload = 0
        for feature, flag in _GUEST_OFFLOADS:
            if self.acked_features & feature_bit(feature):
                offload |= flag
        try:
            self.backend.set_offload(offload)
        except OSError as error:
            self.metrics.activate_fails += 1
            logger.error("%r: cannot set tap offloads %#x: %s", self, offload, error)
        super().activate(memory, queues, interrupt)
        self._set_rx_interest(True)

    def reset(self) -> None:
        super().reset()
        self._rx_frame = None
        self._set_rx_interest(False)

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise RuntimeError(f"{self!r} processes a queue before activation")
        return self.memory

    # Queue notifications -----------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        """Serve a notification: new receive buffers, or frames to transmit."""
        with self.lock:
            if index == RX_QUEUE_INDEX:
                self.metrics.rx_queue_event_count += 1
                self._process_rx()
            elif index == TX_QUEUE_INDEX:
                self.metrics.tx_queue_event_count += 1
                self._process_tx()

    def process_backend(self) -> None:
        """Serve a readable back end: move frames to the guest while it has buffers."""
        with self.lock:
            self.metrics.rx_tap_event_count += 1
            if self.is_activated:
                self._process_rx()

    def on_rate_limiter_timer(self, limiter: RateLimiter) -> None:
        """Resume the direction `limiter` throttled, after its timer fired."""
        with self.lock:
            if not limiter.on_timer() or not self.is_activated:
                return
            if limiter is self.rx_rate_limiter:
                self.metrics.rx_event_rate_limiter_count += 1
                self._process_rx()
            if limiter is self.tx_rate_limiter:
                self.metrics.tx_rate_limiter_event_count += 1
                self._process_tx()

    def process_mmds_timers(self) -> None:
        """Let the MMDS stack retransmit, then deliver what it sent."""
        with self.lock:
            if self.mmds is None or not self.is_activated:
                return
            self.mmds.retransmit_due()
            if self.mmds.has_output:
                self._process_rx()

    def update_rate_limiters(self, rx: dict | None, tx: dict | None) -> None:
        """Apply PATCH /network-interfaces bodies to the existing limiters."""
        with self.lock:
            for limiter, config in ((self.rx_rate_limiter, rx), (self.tx_rate_limiter, tx)):
                if limiter is not None and config is not None:
                    limiter.update(config)

    # Transmit ----------------------------------------------------------------------------

    def _process_tx(self) -> None:
        queue = self.queues[TX_QUEUE_INDEX]
        if not queue.ready:
            return
        served = False
        while True:
            next_avail = queue.next_avail
            chain = queue.pop()
            if chain is None:
                if not served:
                    self.metrics.no_tx_avail_buffer += 1
                break
            if not self._tx_allowed(chain):
                # Put the chain back: the rate limiter's timer restarts the queue.
                queue.next_avail = next_avail
                break
            self._transmit(chain)
            queue.add_used(chain.head_index, 0)
            served = True
        self.signal_used_queue(queue)
        if self.mmds is not None and self.mmds.has_output:
            self._process_rx()

    def _tx_allowed(self, chain: DescriptorChain) -> bool:
        limiter = self.tx_rate_limiter
        if limiter is None:
            return True
        size = sum(descriptor.length for descriptor in chain.readable)
        if not limiter.consume_request(size):
            self.metrics.tx_rate_limiter_throttled += 1
            return False
        return True

    def _transmit(self, chain: DescriptorChain) -> None:
        memory = self._memory()
        size = sum(descriptor.length for descriptor in chain.readable)
        if size < VNET_HEADER_SIZE or size > MAX_FRAME_SIZE:
            self.metrics.tx_malformed_frames += 1
            logger.debug("%r: dropped a transmit chain of %d bytes: header and frame must "
                         "be %d to %d bytes", self, size, VNET_HEADER_SIZE, MAX_FRAME_SIZE)
            return
        parts = [memory.view(d.address, d.length) for d in chain.readable if d.length]
        try:
            self._send_parts(parts, size)
        finally:
            for part in parts:
                part.release()

    def _send_parts(self, parts: list[memoryview], size: int) -> None:
        head = _gather_prefix(parts, VNET_HEADER_SIZE + 64)
        frame_head = head[VNET_HEADER_SIZE:]
        self._count_spoofed_mac(frame_head)
        if self.mmds is not None and self.mmds.is_for_mmds(frame_head):
            self.metrics.mmds_frames_detoured += 1
            self.mmds.receive_frame(b"".join(parts)[VNET_HEADER_SIZE:])
            return
        try:
            self.backend.write_frame(parts)
        except OSError as error:
            self.metrics.tap_write_fails += 1
            self.metrics.tx_fails += 1
            logger.debug("%r: tap write of %d bytes failed: %s", self, size, error)
            return
        self.metrics.tx_count += 1
        self.metrics.tx_packets_count += 1
        self.metrics.tx_bytes_count += size - VNET_HEADER_SIZE

    def _count_spoofed_mac(self, frame_head: bytes) -> None:
        source = frame_head[CONFIG_MAC_SIZE : 2 * CONFIG_MAC_SIZE]
        if self.guest_mac is not None and len(source) == CONFIG_MAC_SIZE:
            if source != self.guest_mac:
                self.metrics.tx_spoofed_mac_count += 1

    # Receive -------------------------------------------------------------------------------

    def _process_rx(self) -> None:
        queue = self.queues[RX_QUEUE_INDEX]
        if not queue.ready:
            return
        delivered = False
        while True:
            frame = self._next_rx_frame()
            if frame is None:
                self._set_rx_interest(True)
                break
            if not self._rx_allowed(len(frame)):
                self._set_rx_interest(False)
                break
            if not self._deliver(queue, frame):
                self.metrics.no_rx_avail_buffer += 1
                self._set_rx_interest(False)
                break
            self._rx_frame = None
            delivered = True
        if delivered:
            self.signal_used_queue(queue)

    def _next_rx_frame(self) -> memoryview | None:
        """Return the frame waiting for the guest, reading one if none waits."""
        if self._rx_frame is not None:
            return self._rx_frame
        if self.mmds is not None:
            reply = self.mmds.pop_frame()
            if reply is not None:
                header = NET_HEADER.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 0)
                self._rx_frame = memoryview(bytearray(header + reply))
                return self._rx_frame
        try:
            length = self.backend.read_frame(memoryview(self._rx_buffer))
        except BlockingIOError:
            return None
        except OSError as error:
            self.metrics.tap_read_fails += 1
            logger.debug("%r: tap read failed: %s", self, error)
            return None
        if length < VNET_HEADER_SIZE:
            self.metrics.rx_fails += 1
            return self._next_rx_frame()
        self._rx_frame = memoryview(self._rx_buffer)[:length]
        return self._rx_frame

    def _rx_allowed(self, size: int) -> bool:
        limiter = self.rx_rate_limiter
        if limiter is None:
            return True
        if not limiter.consume_request(size):
            self.metrics.rx_rate_limiter_throttled += 1
            return False
        return True

    def _deliver(self, queue: Queue, frame: memoryview) -> bool:
        """Write `frame` into as many receive chains as it needs; False when too few exist.

        When the available chains cannot hold the frame, none is used: the
        queue's next available index goes back, so the same chains are offered
        again once the driver adds more. Without MRG_RXBUF a frame must fit one
        chain; a frame larger than the chain is dropped and the chain kept.
        """
        mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        next_avail = queue.next_avail
        chains: list[DescriptorChain] = []
        capacity = 0
        while capacity < len(frame) and (mergeable or not chains):
            chain = queue.pop()
            if chain is None:
                break
            chains.append(chain)
            capacity += sum(d.length for d in chain.writable)
        if capacity < len(frame):
            queue.next_avail = next_avail
            if chains and not mergeable:
                self.metrics.rx_fails += 1
                self._drop_rx_frame(len(frame))
                return True
            self._refund_rx_tokens(len(frame))
            return False
        self._scatter(queue, chains, frame)
        return True

    def _drop_rx_frame(self, size: int) -> None:
        logger.debug("%r: dropped a %d-byte received frame: the receive chain is smaller "
                     "and MRG_RXBUF was not negotiated", self, size)

    def _refund_rx_tokens(self, size: int) -> None:
        limiter = self.rx_rate_limiter
        if limiter is not None:
            limiter.replenish(1, TokenKind.OPS)
            limiter.replenish(size, TokenKind.BYTES)

    def _scatter(self, queue: Queue, chains: list[DescriptorChain], frame: memoryview) -> None:
        """Copy `frame` into `chains` in order and return each with the bytes it holds."""
        memory = self._memory()
        struct.pack_into("<H", frame, NUM_BUFFERS_OFFSET, len(chains))
        position = 0
        for chain in chains:
            written = 0
            for descriptor in chain.writable:
                count = min(descriptor.length, len(frame) - position)
                if count <= 0:
                    break
                memory.write(descriptor.address, frame[position : position + count])
                position += count
                written += count
            queue.add_used(chain.head_index, written)
        self.metrics.rx_count += 1
        self.metrics.rx_packets_count += 1
        self.metrics.rx_bytes_count += len(frame) - VNET_HEADER_SIZE

    def _set_rx_interest(self, wanted: bool) -> None:
        if wanted != self._rx_interest:
            self._rx_interest = wanted
            self.on_rx_interest(wanted)

    def metrics_snapshot(self) -> dict[str, int | float]:
        return dict(asdict(self.metrics))


def _gather_prefix(parts: list[memoryview], size: int) -> bytes:
    """Return the first `size` bytes (or fewer) of the concatenation of `parts`."""
    prefix = bytearray()
    for part in parts:
        prefix += part[: size - len(prefix)]
        if len(prefix) >= size:
            break
    return bytes(prefix)
