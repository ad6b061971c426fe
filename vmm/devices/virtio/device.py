"""The contract between a virtio device model and its transport (virtio 1.2 sections 2-3).

A device model states its type, queue sizes and offered features, serves its
configuration space, and processes queues once the transport activates it.
The transport owns the registers, the status state machine and feature
negotiation; the device owns what travels through its queues.
"""

from __future__ import annotations

import threading
from typing import Callable, ClassVar, Final

from vmm.devices.virtio.queue import Queue
from vmm.memory import GuestMemory

# 6 Reserved Feature Bits.
VIRTIO_RING_F_INDIRECT_DESC: Final = 28
VIRTIO_RING_F_EVENT_IDX: Final = 29
VIRTIO_F_VERSION_1: Final = 32

# 4.2.2 MMIO Device Register Layout, InterruptStatus bits.
VIRTIO_MMIO_INT_VRING: Final = 1
VIRTIO_MMIO_INT_CONFIG: Final = 2


def feature_bit(bit: int) -> int:
    """Return the mask of feature `bit`."""
    return 1 << bit


class VirtioInterrupt:
    """The InterruptStatus bits of one device and the trigger that raises its IRQ.

    `trigger` is typically an irqfd write. The transport reads and acknowledges
    the bits; the device sets them through `signal_used_queue` and
    `signal_config_change`. Safe to call from any thread.
    """

    def __init__(self, trigger: Callable[[], None]) -> None:
        self._trigger = trigger
        self._lock = threading.Lock()
        self.status = 0
        self.trigger_count = 0

    def _raise(self, bit: int) -> None:
        with self._lock:
            self.status |= bit
            self.trigger_count += 1
        self._trigger()

    def signal_used_queue(self) -> None:
        """Set "used buffer notification" and raise the interrupt (2.3.2)."""
        self._raise(VIRTIO_MMIO_INT_VRING)

    def signal_config_change(self) -> None:
        """Set "configuration change notification" and raise the interrupt (2.3.2)."""
        self._raise(VIRTIO_MMIO_INT_CONFIG)

    def acknowledge(self, bits: int) -> None:
        """Clear the InterruptStatus bits the driver wrote to InterruptACK."""
        with self._lock:
            self.status &= ~bits

    def clear(self) -> None:
        with self._lock:
            self.status = 0


class VirtioDevice:
    """Base of every virtio device model.

    Subclasses set `device_type` (5 Device Types) and `queue_max_sizes`, add
    their feature bits to `avail_features`, keep their configuration space in
    `config_space` (or override `read_config`/`write_config`) and implement
    `process_queue`. `lock` guards the device state; the transport holds it
    around every register access and queue notification.
    """

    device_type: ClassVar[int] = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.avail_features = feature_bit(VIRTIO_F_VERSION_1)
        self.acked_features = 0
        self.config_space = bytearray()
        self.config_generation = 0
        self.memory: GuestMemory | None = None
        self.queues: list[Queue] = []
        self.interrupt: VirtioInterrupt | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(type={self.device_type})"

    @property
    def is_activated(self) -> bool:
        return self.interrupt is not None

    def has_feature(self, bit: int) -> bool:
        """Tell whether the driver accepted feature `bit`."""
        return bool(self.acked_features & feature_bit(bit))

    def read_config(self, offset: int, data: bytearray) -> None:
        """Fill `data` from configuration space at `offset`; bytes past its end read 0."""
        chunk = self.config_space[offset : offset + len(data)]
        data[:] = bytes(chunk) + bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: bytes) -> None:
        """Accept a driver write to configuration space; the base device has no writable field."""

    def activate(
        self, memory: GuestMemory, queues: list[Queue], interrupt: VirtioInterrupt
    ) -> None:
        """Start the device with the driver's queues; called once at DRIVER_OK."""
        self.memory = memory
        self.queues = queues
        self.interrupt = interrupt

    def process_queue(self, index: int) -> None:
        """Handle the chains the driver made available on queue `index`.

        Raises QueueError (or GuestMemoryError) when the driver broke a queue
        rule; the transport then marks the device as needing reset.
        """
        raise NotImplementedError(f"{self!r} does not process queue {index}")

    def reset(self) -> None:
        """Forget the driver's queues and features; the device waits for a new activation."""
        self.memory = None
        self.queues = []
        self.interrupt = None
        self.acked_features = 0

    def signal_used_queue(self, queue: Queue) -> None:
        """Raise a used-buffer interrupt if the driver of `queue` wants one (2.7.7, 2.7.10)."""
        if self.interrupt is not None and queue.needs_notification():
            self.interrupt.signal_used_queue()
