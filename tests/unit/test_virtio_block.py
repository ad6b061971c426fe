"""virtio-blk (virtio 1.2 section 5.2) over a temporary file, driven through virtio-mmio."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator

import pytest

from tests.virtio_driver import TEST_RAM_SIZE, Buffer, MmioDriver, VirtqueueDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.block import (
    CACHE_UNSAFE,
    CACHE_WRITEBACK,
    SECTOR_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
    FileBackend,
)
from vmm.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_RING_F_EVENT_IDX,
)
from vmm.memory import GuestMemory

DISK_SECTORS = 32


class Disk:
    """A block device on a temporary file, started by a driver over virtio-mmio."""

    def __init__(
        self, memory: GuestMemory, fd: int, read_only: bool = False,
        cache_type: str = CACHE_UNSAFE, drive_id: str = "rootfs",
    ) -> None:
        self.memory = memory
        self.fd = fd
        self.device = Block(drive_id, FileBackend(fd), read_only, cache_type)
        self.irq_count = 0
        self.transport = mmio.MmioTransport(self.device, memory, self.raise_irq)
        self.queue = VirtqueueDriver(memory, 16)
        MmioDriver(self.transport).start([self.queue])

    def raise_irq(self) -> None:
        self.irq_count += 1

    def header(self, request_type: int, sector: int = 0) -> Buffer:
        return self.queue.buffer(struct.pack("<IIQ", request_type, 0, sector))

    def submit(self, buffers: list[Buffer]) -> tuple[int, int]:
        """Add one chain, notify, and return its used (id, len)."""
        self.queue.add_chain(buffers)
        self.transport.notify(0)
        (entry,) = self.queue.used_entries()
        return entry

    def status_of(self, status_buffer: Buffer) -> int:
        return self.memory.read_u8(status_buffer.address + status_buffer.length - 1)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory([(0, TEST_RAM_SIZE)])
    yield ram
    ram.close()


@pytest.fixture
def disk_fd() -> Iterator[int]:
    with tempfile.TemporaryFile() as disk:
        disk.write(bytes(range(256)) * (DISK_SECTORS * SECTOR_SIZE // 256))
        disk.flush()
        yield disk.fileno()


@pytest.fixture
def disk(memory: GuestMemory, disk_fd: int) -> Disk:
    return Disk(memory, disk_fd)


def test_capacity_in_sectors(disk: Disk) -> None:
    data = bytearray(8)
    disk.device.read_config(0, data)
    assert int.from_bytes(data, "little") == DISK_SECTORS


def test_partial_last_sector_not_counted(memory: GuestMemory) -> None:
    with tempfile.TemporaryFile() as file:
        file.truncate(3 * SECTOR_SIZE + 100)
        device = Block("d", FileBackend(file.fileno()))
        assert device.capacity_sectors == 3


def test_capacity_change_interrupts_driver(disk: Disk) -> None:
    os.ftruncate(disk.fd, 2 * DISK_SECTORS * SECTOR_SIZE)
    disk.device.update_capacity()
    assert disk.device.capacity_sectors == 2 * DISK_SECTORS
    assert disk.irq_count == 1
    assert disk.transport.interrupt.status & VIRTIO_MMIO_INT_CONFIG


def test_features_follow_drive_options(memory: GuestMemory, disk_fd: int) -> None:
    plain = Block("a", FileBackend(disk_fd))
    assert plain.avail_features & (1 << VIRTIO_F_VERSION_1)
    assert plain.avail_features & (1 << VIRTIO_RING_F_EVENT_IDX)
    assert not plain.avail_features & (1 << VIRTIO_BLK_F_RO)
    assert not plain.avail_features & (1 << VIRTIO_BLK_F_FLUSH)
    special = Block("b", FileBackend(disk_fd), read_only=True, cache_type=CACHE_WRITEBACK)
    assert special.avail_features & (1 << VIRTIO_BLK_F_RO)
    assert special.avail_features & (1 << VIRTIO_BLK_F_FLUSH)


def test_unknown_cache_type_rejected(disk_fd: int) -> None:
    with pytest.raises(ValueError, match="'Fast' is not one of"):
        Block("a", FileBackend(disk_fd), cache_type="Fast")


def test_read_returns_file_contents(disk: Disk) -> None:
    data = disk.queue.buffer(length=2 * SECTOR_SIZE, writable=True)
    status = disk.queue.buffer(length=1, writable=True)
    head, length = disk.submit([disk.header(VIRTIO_BLK_T_IN, 3), data, status])
    assert length == 2 * SECTOR_SIZE + 1
    assert disk.status_of(status) == VIRTIO_BLK_S_OK
    expected = os.pread(disk.fd, 2 * SECTOR_SIZE, 3 * SECTOR_SIZE)
    assert disk.memory.read(data.address, data.length) == expected
    assert disk.device.metrics.read_count == 1
    assert disk.device.metrics.read_bytes == 2 * SECTOR_SIZE
    assert disk.irq_count == 1


def test_write_lands_in_file(disk: Disk) -> None:
    payload = b"\xab" * SECTOR_SIZE
    status = disk.queue.buffer(length=1, writable=True)
    _, length = disk.submit(
        [disk.header(VIRTIO_BLK_T_OUT, 5), disk.queue.buffer(payload), status]
    )
    assert length == 1
    assert disk.status_of(status) == VIRTIO_BLK_S_OK
    assert os.pread(disk.fd, SECTOR_SIZE, 5 * SECTOR_SIZE) == payload
    assert disk.device.metrics.write_count == 1
    assert disk.device.metrics.write_bytes == SECTOR_SIZE


def test_header_and_data_split_anywhere(disk: Disk) -> None:
    payload = b"\x5a" * SECTOR_SIZE
    request = struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 1) + payload
    parts = [disk.queue.buffer(request[:10]), disk.queue.buffer(request[10:300]),
             disk.queue.buffer(request[300:])]
    status = disk.queue.buffer(length=1, writable=True)
    disk.submit(parts + [status])
    assert disk.status_of(status) == VIRTIO_BLK_S_OK
    assert os.pread(disk.fd, SECTOR_SIZE, SECTOR_SIZE) == payload


def test_status_byte_shares_buffer_with_data(disk: Disk) -> None:
    data_and_status = disk.queue.buffer(length=SECTOR_SIZE + 1, writable=True)
    _, length = disk.submit([disk.header(VIRTIO_BLK_T_IN, 0), data_and_status])
    assert length == SECTOR_SIZE + 1
    assert disk.status_of(data_and_status) == VIRTIO_BLK_S_OK
    read_back = disk.memory.read(data_and_status.address, SECTOR_SIZE)
    assert read_back == os.pread(disk.fd, SECTOR_SIZE, 0)


def test_read_only_drive_rejects_writes(memory: GuestMemory, disk_fd: int) -> None:
    disk = Disk(memory, disk_fd, read_only=True)
    before = os.pread(disk_fd, SECTOR_SIZE, 0)
    status = disk.queue.buffer(length=1, writable=True)
    disk.submit([disk.header(VIRTIO_BLK_T_OUT, 0), disk.queue.buffer(b"\x01" * SECTOR_SIZE),
                 status])
    assert disk.status_of(status) == VIRTIO_BLK_S_IOERR
    assert os.pread(disk_fd, SECTOR_SIZE, 0) == before
    assert disk.device.metrics.io_errors == 1
    assert disk.device.metrics.write_count == 0


def test_flush_on_read_only_drive_succeeds(memory: GuestMemory, disk_fd: int) -> None:
    disk = Disk(memory, disk_fd, read_only=True, cache_type=CACHE_WRITEBACK)
    status = disk.queue.buffer(length=1, writable=True)
    disk.submit([disk.header(VIRTIO_BLK_T_FLUSH), status])
    assert disk.status_of(status) == VIRTIO_BLK_S_OK
    assert disk.device.metrics.flush_count == 1


def test_read_past_capacity_is_ioerr(disk: Disk) -> None:
    data = disk.queue.buffer(length=2 * SECTOR_SIZE, writable=True)
    status = disk.queue.buffer(length=1, writable=True)
    _, length = disk.submit([disk.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1), data, status])
    assert disk.status_of(status) == VIRTIO_BLK_S_IOERR
    assert length == 1


def test_huge_sector_is_ioerr(disk: Disk) -> None:
    status = disk.queue.buffer(length=1, writable=True)
    disk.submit([disk.header(VIRTIO_BLK_T_OUT, (1 << 64) - 1),
                 disk.queue.buffer(bytes(SECTOR_SIZE)), status])
    assert disk.status_of(status) == VIRTIO_BLK_S_IOERR


def test_data_not_multiple_of_sector_is_ioerr(disk: Disk) -> None:
    status = disk.queue.buffer(length=1, writable=True)
    disk.submit([disk.header(VIRTIO_BLK_T_OUT, 0), disk.queue.buffer(bytes(100)), status])
    assert disk.status_of(status) == VIRTIO_BLK_S_IOERR


def test_get_id_returns_padded_drive_id(disk: Disk) -> None:
    ident = disk.queue.buffer(length=20, writable=True)
    status = disk.queue.buffer(length=1, writable=True)
    _, length = disk.submit([disk.header(VIRTIO_BLK_T_GET_ID), ident, status])
    assert length == 21
    assert disk.status_of(status) == VIRTIO_BLK_S_OK
    assert disk.memory.read(ident.address, 20) == b"rootfs" + bytes(14)


def test_get_id_truncates_long_drive_id(memory: GuestMemory, disk_fd: int) -> None:
    disk = Disk(memory, disk_fd, drive_id="a" * 30)
    ident = disk.queue.buffer(length=20, writable=True)
    disk.submit([disk.header(VIRTIO_BLK_T_GET_ID), ident,
                 disk.queue.buffer(length=1, writable=True)])
    assert disk.memory.read(ident.address, 20) == b"a" * 20


def test_unknown_type_is_unsupp(disk: Disk) -> None:
    status = disk.queue.buffer(length=1, writable=True)
    disk.submit([disk.header(11), status])
    assert disk.status_of(status) == VIRTIO_BLK_S_UNSUPP
    assert disk.device.metrics.unsupported_requests == 1


def test_writeback_flush_calls_fsync(memory: GuestMemory, disk_fd: int) -> None:
    disk = Disk(memory, disk_fd, cache_type=CACHE_WRITEBACK)
    status = disk.queue.buffer(length=1, writable=True)
    disk.submit([disk.header(VIRTIO_BLK_T_FLUSH), status])
    assert disk.status_of(status) == VIRTIO_BLK_S_OK
    assert disk.device.metrics.flush_count == 1


def test_backend_failure_is_ioerr(memory: GuestMemory) -> None:
    with tempfile.TemporaryFile() as file:
        file.truncate(DISK_SECTORS * SECTOR_SIZE)
        disk = Disk(memory, file.fileno(), cache_type=CACHE_WRITEBACK)
    # The file is closed now, so the back end's fsync fails with EBADF.
    status = disk.queue.buffer(length=1, writable=True)
    disk.submit([disk.header(VIRTIO_BLK_T_FLUSH), status])
    assert disk.status_of(status) == VIRTIO_BLK_S_IOERR
    assert disk.device.metrics.io_errors == 1


def test_short_header_returns_zero_length(disk: Disk) -> None:
    status = disk.queue.buffer(length=1, writable=True)
    _, length = disk.submit([disk.queue.buffer(bytes(8)), status])
    assert length == 0
    assert disk.device.metrics.invalid_requests == 1


def test_missing_status_byte_returns_zero_length(disk: Disk) -> None:
    _, length = disk.submit([disk.header(VIRTIO_BLK_T_FLUSH)])
    assert length == 0
    assert disk.device.metrics.invalid_requests == 1


def test_batch_raises_one_interrupt(disk: Disk) -> None:
    for _ in range(3):
        disk.queue.add_chain([disk.header(VIRTIO_BLK_T_FLUSH),
                              disk.queue.buffer(length=1, writable=True)])
    disk.transport.notify(0)
    assert len(disk.queue.used_entries()) == 3
    assert disk.irq_count == 1
