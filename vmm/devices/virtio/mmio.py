"""The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2).

One `MmioTransport` sits on the MMIO bus for each virtio device and owns the
registers the driver programs: feature negotiation, queue setup, the device
status state machine of section 3.1.1 and InterruptStatus. It activates the
device model at DRIVER_OK and forwards queue notifications to it.

Driver mistakes never stop the VM. A status or queue-setup write that breaks
a rule, or a queue that raises QueueError, sets DEVICE_NEEDS_RESET. After
DRIVER_OK it also raises a configuration-change interrupt (2.1.2). The device
then ignores notifications until the driver writes 0 to Status.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Final

from vmm.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice,
    VirtioInterrupt,
    feature_bit,
)
from vmm.devices.virtio.queue import Queue, QueueError
from vmm.memory import GuestMemory, GuestMemoryError

logger = logging.getLogger(__name__)

# 4.2.2 MMIO Device Register Layout (offsets from the device's base address).
MAGIC_VALUE_OFFSET: Final = 0x000
VERSION_OFFSET: Final = 0x004
DEVICE_ID_OFFSET: Final = 0x008
VENDOR_ID_OFFSET: Final = 0x00C
DEVICE_FEATURES_OFFSET: Final = 0x010
DEVICE_FEATURES_SEL_OFFSET: Final = 0x014
DRIVER_FEATURES_OFFSET: Final = 0x020
DRIVER_FEATURES_SEL_OFFSET: Final = 0x024
QUEUE_SEL_OFFSET: Final = 0x030
QUEUE_NUM_MAX_OFFSET: Final = 0x034
QUEUE_NUM_OFFSET: Final = 0x038
QUEUE_READY_OFFSET: Final = 0x044
QUEUE_NOTIFY_OFFSET: Final = 0x050
INTERRUPT_STATUS_OFFSET: Final = 0x060
INTERRUPT_ACK_OFFSET: Final = 0x064
STATUS_OFFSET: Final = 0x070
QUEUE_DESC_LOW_OFFSET: Final = 0x080
QUEUE_DESC_HIGH_OFFSET: Final = 0x084
QUEUE_DRIVER_LOW_OFFSET: Final = 0x090
QUEUE_DRIVER_HIGH_OFFSET: Final = 0x094
QUEUE_DEVICE_LOW_OFFSET: Final = 0x0A0
QUEUE_DEVICE_HIGH_OFFSET: Final = 0x0A4
SHM_SEL_OFFSET: Final = 0x0AC
SHM_LEN_LOW_OFFSET: Final = 0x0B0
SHM_LEN_HIGH_OFFSET: Final = 0x0B4
SHM_BASE_LOW_OFFSET: Final = 0x0B8
SHM_BASE_HIGH_OFFSET: Final = 0x0BC
CONFIG_GENERATION_OFFSET: Final = 0x0FC
CONFIG_SPACE_OFFSET: Final = 0x100

# 4.2.2: registers take 32-bit accesses only; configuration space takes any width.
REGISTER_WIDTH: Final = 4
# MagicValue is "virt" read as a little-endian 32-bit value.
MMIO_MAGIC_VALUE: Final = int.from_bytes(b"virt", "little")
MMIO_VERSION: Final = 2
# VendorID identifies the implementation to the driver only; Linux ignores it.
MMIO_VENDOR_ID: Final = 0
# 4.2.2: SHMLen reads all ones when the selected shared memory region does not exist.
SHM_ABSENT: Final = 0xFFFF_FFFF
_REGISTER_MASK: Final = 0xFFFF_FFFF
# 2.2 Feature Bits: bits 0 to 127 exist, so the feature select registers name 4 pages of 32.
FEATURE_PAGES: Final = 4

# 2.1 Device Status Field.
STATUS_ACKNOWLEDGE: Final = 1
STATUS_DRIVER: Final = 2
STATUS_DRIVER_OK: Final = 4
STATUS_FEATURES_OK: Final = 8
STATUS_DEVICE_NEEDS_RESET: Final = 64
STATUS_FAILED: Final = 128

# 3.1.1: the bits a driver sets, in order, each with the bit it needs first.
_STATUS_SEQUENCE: Final = (
    (STATUS_ACKNOWLEDGE, 0),
    (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
    (STATUS_FEATURES_OK, STATUS_DRIVER),
    (STATUS_DRIVER_OK, STATUS_FEATURES_OK),
)
_DRIVER_STATUS_BITS: Final = (
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED
)

# The needs-reset warning of one transport is logged at most once per this many seconds;
# repeats in between are counted and reported with the next message.
NEEDS_RESET_LOG_INTERVAL_S: Final = 10.0


class DriverRuleError(Exception):
    """The driver broke a rule of the virtio-mmio transport; the device needs reset."""


class MmioTransport:
    """virtio-mmio registers in front of one `VirtioDevice`, as a BusDevice.

    `irq_trigger` raises the device's interrupt line (an irqfd write). The event
    loop calls `notify` when the ioeventfd at QUEUE_NOTIFY_OFFSET fires; a
    QueueNotify write that reaches `write` calls it too.
    """

    def __init__(
        self, device: VirtioDevice, memory: GuestMemory, irq_trigger: Callable[[], None]
    ) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = VirtioInterrupt(irq_trigger)
        self.queues = [Queue(size) for size in device.queue_max_sizes]
        self.lock = device.lock
        self.invalid_access_count = 0
        self.ignored_notify_count = 0
        self.needs_reset_count = 0
        self._suppressed_logs = 0
        self._last_log_time: float | None = None
        self._reset_registers()

    def __repr__(self) -> str:
        return f"MmioTransport({self.device!r}, status={self.status:#x})"

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        for queue in self.queues:
            queue.reset()
        self.interrupt.clear()

    # Bus access ------------------------------------------------------------------

    def read(self, offset: int, data: bytearray) -> None:
        """Fill `data` with a register or configuration-space value."""
        with self.lock:
            if offset >= CONFIG_SPACE_OFFSET:
                self.device.read_config(offset - CONFIG_SPACE_OFFSET, data)
                return
            if len(data) != REGISTER_WIDTH or offset % REGISTER_WIDTH:
                self.invalid_access_count += 1
                data[:] = bytes(len(data))
                return
            value = self._read_register(offset) & _REGISTER_MASK
            data[:] = value.to_bytes(REGISTER_WIDTH, "little")

    def write(self, offset: int, data: bytes) -> None:
        """Apply a driver write to a register or to configuration space."""
        if offset == QUEUE_NOTIFY_OFFSET and len(data) == REGISTER_WIDTH:
            self.notify(int.from_bytes(data, "little"))
            return
        with self.lock:
            if offset >= CONFIG_SPACE_OFFSET:
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data)
                return
            if len(data) != REGISTER_WIDTH or offset % REGISTER_WIDTH:
                self.invalid_access_count += 1
                return
            try:
                self._write_register(offset, int.from_bytes(data, "little"))
            except DriverRuleError as error:
                self._mark_needs_reset(str(error))

    # Register reads --------------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        readers: dict[int, Callable[[], int]] = {
            MAGIC_VALUE_OFFSET: lambda: MMIO_MAGIC_VALUE,
            VERSION_OFFSET: lambda: MMIO_VERSION,
            DEVICE_ID_OFFSET: lambda: self.device.device_type,
            VENDOR_ID_OFFSET: lambda: MMIO_VENDOR_ID,
            DEVICE_FEATURES_OFFSET: self._read_device_features,
            QUEUE_NUM_MAX_OFFSET: self._read_queue_num_max,
            QUEUE_READY_OFFSET: self._read_queue_ready,
            INTERRUPT_STATUS_OFFSET: lambda: self.interrupt.status,
            STATUS_OFFSET: lambda: self.status,
            SHM_LEN_LOW_OFFSET: lambda: SHM_ABSENT,
            SHM_LEN_HIGH_OFFSET: lambda: SHM_ABSENT,
            SHM_BASE_LOW_OFFSET: lambda: SHM_ABSENT,
            SHM_BASE_HIGH_OFFSET: lambda: SHM_ABSENT,
            CONFIG_GENERATION_OFFSET: lambda: self.device.config_generation,
        }
        reader = readers.get(offset)
        if reader is None:
            # Write-only and reserved registers read as 0.
            self.invalid_access_count += 1
            return 0
        return reader()

    def _read_device_features(self) -> int:
        return self.device.avail_features >> (32 * self.device_features_sel)

    def _selected_queue(self) -> Queue | None:
        if self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        return None

    def _read_queue_num_max(self) -> int:
        queue = self._selected_queue()
        return 0 if queue is None else queue.max_size

    def _read_queue_ready(self) -> int:
        queue = self._selected_queue()
        return int(queue is not None and queue.ready)

    # Register writes -------------------------------------------------------------

    def _write_register(self, offset: int, value: int) -> None:
        writers: dict[int, Callable[[int], None]] = {
            DEVICE_FEATURES_SEL_OFFSET: self._write_device_features_sel,
            DRIVER_FEATURES_OFFSET: self._write_driver_features,
            DRIVER_FEATURES_SEL_OFFSET: self._write_driver_features_sel,
            QUEUE_SEL_OFFSET: self._write_queue_sel,
            QUEUE_NUM_OFFSET: self._write_queue_num,
            QUEUE_READY_OFFSET: self._write_queue_ready,
            INTERRUPT_ACK_OFFSET: self.interrupt.acknowledge,
            STATUS_OFFSET: self._write_status,
            QUEUE_DESC_LOW_OFFSET: lambda v: self._write_queue_address("desc", 0, v),
            QUEUE_DESC_HIGH_OFFSET: lambda v: self._write_queue_address("desc", 32, v),
            QUEUE_DRIVER_LOW_OFFSET: lambda v: self._write_queue_address("avail", 0, v),
            QUEUE_DRIVER_HIGH_OFFSET: lambda v: self._write_queue_address("avail", 32, v),
            QUEUE_DEVICE_LOW_OFFSET: lambda v: self._write_queue_address("used", 0, v),
            QUEUE_DEVICE_HIGH_OFFSET: lambda v: self._write_queue_address("used", 32, v),
            SHM_SEL_OFFSET: self._write_shm_sel,
        }
        writer = writers.get(offset)
        if writer is None:
            # Read-only and reserved registers ignore writes.
            self.invalid_access_count += 1
            return
        writer(value)

    def _write_device_features_sel(self, value: int) -> None:
        self.device_features_sel = value

    def _write_driver_features_sel(self, value: int) -> None:
        self.driver_features_sel = value

    def _write_queue_sel(self, value: int) -> None:
        self.queue_sel = value

    def _write_shm_sel(self, value: int) -> None:
        self.shm_sel = value

    def _write_driver_features(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK or not self.status & STATUS_DRIVER:
            raise DriverRuleError(
                f"DriverFeatures write with status {self.status:#x}: features are set "
                f"after DRIVER and before FEATURES_OK (3.1.1)"
            )
        if self.driver_features_sel >= FEATURE_PAGES:
            if value:
                raise DriverRuleError(
                    f"DriverFeatures write {value:#x} to page {self.driver_features_sel}: "
                    f"feature bits end at {32 * FEATURE_PAGES - 1} (2.2)"
                )
            return
        shift = 32 * self.driver_features_sel
        self.driver_features &= ~(_REGISTER_MASK << shift)
        self.driver_features |= value << shift

    def _queue_for_setup(self, register: str) -> Queue:
        if self.status & STATUS_DRIVER_OK or not self.status & STATUS_FEATURES_OK:
            raise DriverRuleError(
                f"{register} write with status {self.status:#x}: queues are set up after "
                f"FEATURES_OK and before DRIVER_OK (3.1.1)"
            )
        queue = self._selected_queue()
        if queue is None:
            raise DriverRuleError(
                f"{register} write for queue {self.queue_sel}, but the device has "
                f"{len(self.queues)} queues"
            )
        return queue

    def _write_queue_num(self, value: int) -> None:
        self._queue_for_setup("QueueNum").size = value

    def _write_queue_ready(self, value: int) -> None:
        if value == 0 and not self.status & STATUS_DRIVER_OK:
            # Linux clears QueueReady when it deletes queues, after a reset too.
            queue = self._selected_queue()
            if queue is not None:
                queue.ready = False
            return
        self._queue_for_setup("QueueReady").ready = value == 1

    def _write_queue_address(self, area: str, shift: int, value: int) -> None:
        queue = self._queue_for_setup(f"queue {area} address")
        attribute = {"desc": "desc_table_address", "avail": "avail_ring_address",
                     "used": "used_ring_address"}[area]
        address = getattr(queue, attribute) & ~(_REGISTER_MASK << shift)
        setattr(queue, attribute, address | (value << shift))

    # Device status state machine (3.1.1) -------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        requested = value & _DRIVER_STATUS_BITS
        cleared = self.status & _DRIVER_STATUS_BITS & ~requested
        if cleared:
            raise DriverRuleError(
                f"Status write {value:#x} clears bits {cleared:#x} of {self.status:#x}; "
                f"only a write of 0 resets the device (3.1.1)"
            )
        self.status |= requested & STATUS_FAILED
        for bit, prerequisite in _STATUS_SEQUENCE:
            if not requested & bit or self.status & bit:
                continue
            if prerequisite and not self.status & prerequisite:
                raise DriverRuleError(
                    f"Status write {value:#x} sets {bit:#x} before {prerequisite:#x} "
                    f"(3.1.1)"
                )
            if bit == STATUS_FEATURES_OK and not self._accept_features():
                return
            self.status |= bit
            if bit == STATUS_DRIVER_OK:
                self._activate()

    def _accept_features(self) -> bool:
        """Take the driver's features at FEATURES_OK, or leave the bit clear (3.1.1 step 5)."""
        unknown = self.driver_features & ~self.device.avail_features
        if unknown or not self.driver_features & feature_bit(VIRTIO_F_VERSION_1):
            logger.info(
                "%r: driver features %#x rejected: unoffered bits %#x or no VERSION_1",
                self, self.driver_features, unknown,
            )
            return False
        self.device.acked_features = self.driver_features
        return True

    def _activate(self) -> None:
        event_idx = self.device.has_feature(VIRTIO_RING_F_EVENT_IDX)
        indirect = self.device.has_feature(VIRTIO_RING_F_INDIRECT_DESC)
        try:
            for queue in self.queues:
                if queue.ready:
                    queue.activate(self.memory, event_idx, indirect)
        except QueueError as error:
            self._mark_needs_reset(str(error))
            return
        self.device.activate(self.memory, self.queues, self.interrupt)

    def reset(self) -> None:
        """Return the device and every register to their initial state (Status 0)."""
        with self.lock:
            if self.device.is_activated:
                self.device.reset()
            self.device.acked_features = 0
            self._reset_registers()

    # Notifications ---------------------------------------------------------------

    def notify(self, queue_index: int) -> None:
        """Process queue `queue_index` after the driver's notification (4.2.3.3).

        Notifications before DRIVER_OK, after DEVICE_NEEDS_RESET or for a queue
        that is not ready are counted and dropped.
        """
        with self.lock:
            ready = self.status & STATUS_DRIVER_OK and self.device.is_activated
            if not ready or self.status & STATUS_DEVICE_NEEDS_RESET:
                self.ignored_notify_count += 1
                return
            if queue_index >= len(self.queues) or not self.queues[queue_index].ready:
                self.ignored_notify_count += 1
                return
            try:
                self.device.process_queue(queue_index)
            except (QueueError, GuestMemoryError) as error:
                self._mark_needs_reset(f"queue {queue_index}: {error}")

    def _mark_needs_reset(self, reason: str) -> None:
        self.status |= STATUS_DEVICE_NEEDS_RESET
        self.needs_reset_count += 1
        self._log_needs_reset(reason)
        if self.status & STATUS_DRIVER_OK:
            self.interrupt.signal_config_change()

    def _log_needs_reset(self, reason: str) -> None:
        now = time.monotonic()
        last = self._last_log_time
        if last is not None and now - last < NEEDS_RESET_LOG_INTERVAL_S:
            self._suppressed_logs += 1
            return
        logger.warning(
            "%r needs reset: %s (%d similar messages suppressed)",
            self, reason, self._suppressed_logs,
        )
        self._last_log_time = now
        self._suppressed_logs = 0
