"""Boot-timer device: the guest's magic write records and logs the boot time once."""

from __future__ import annotations

import logging
import time

import pytest

from vmm.devices.legacy.boot_timer import BOOT_COMPLETE_MAGIC, BootTimer


def test_magic_write_records_elapsed_time(caplog: pytest.LogCaptureFixture) -> None:
    timer = BootTimer(start_wall=time.monotonic() - 0.25, start_cpu=time.process_time())
    with caplog.at_level(logging.INFO):
        timer.write(0, bytes([BOOT_COMPLETE_MAGIC]))
    assert timer.boot_wall_us is not None
    assert 250_000 <= timer.boot_wall_us < 5_000_000
    assert timer.boot_cpu_us is not None
    assert 0 <= timer.boot_cpu_us < 5_000_000
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith(f"Guest-boot-time = {timer.boot_wall_us} us ")
    assert f"{timer.boot_wall_us // 1000} ms, {timer.boot_cpu_us} CPU us" in messages[0]


def test_second_magic_write_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    timer = BootTimer()
    with caplog.at_level(logging.INFO):
        timer.write(0, bytes([BOOT_COMPLETE_MAGIC]))
        first = timer.boot_wall_us
        time.sleep(0.01)
        timer.write(0, bytes([BOOT_COMPLETE_MAGIC]))
    assert timer.boot_wall_us == first
    assert len(caplog.records) == 1


@pytest.mark.parametrize(
    ("offset", "data"),
    [(0, bytes([BOOT_COMPLETE_MAGIC - 1])), (1, bytes([BOOT_COMPLETE_MAGIC])),
     (0, bytes([BOOT_COMPLETE_MAGIC, 0, 0, 0]))],
)
def test_other_writes_are_ignored(offset: int, data: bytes) -> None:
    timer = BootTimer()
    timer.write(offset, data)
    assert timer.boot_wall_us is None
    assert timer.boot_cpu_us is None


def test_start_clock_rearms_measurement() -> None:
    timer = BootTimer(start_wall=time.monotonic() - 10)
    timer.write(0, bytes([BOOT_COMPLETE_MAGIC]))
    assert timer.boot_wall_us is not None
    assert timer.boot_wall_us >= 10_000_000
    timer.start_clock()
    assert timer.boot_wall_us is None
    timer.write(0, bytes([BOOT_COMPLETE_MAGIC]))
    assert timer.boot_wall_us is not None
    assert timer.boot_wall_us < 10_000_000


def test_reads_return_zero() -> None:
    data = bytearray(b"\xff" * 4)
    BootTimer().read(0, data)
    assert data == bytearray(4)
