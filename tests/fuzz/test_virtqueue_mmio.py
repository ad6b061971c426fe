"""The virtio-mmio transport under random register accesses (virtio 1.2 sections 3.1, 4.2.2).

Register offsets, widths and status bits come from spec/devices.yaml. A
random sequence of reads and writes, of any width and value, at any offset
of the 4 KiB window, before and after DRIVER_OK, must leave the transport
consistent and the device able to start again after a reset.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import strategies_virtio as sv
from vmm.devices.virtio import mmio

_KNOWN_STATUS_BITS = sum(sv.STATUS.values())
# A single register access is a few dictionary look-ups; one taking this long is a hang.
_ACCESS_TIME_LIMIT_S = 0.5


def _register_offsets() -> list[int]:
    return sorted(register["offset"] for register in sv.REGISTERS.values())


def _values() -> st.SearchStrategy[int]:
    """Register values: status bit sets, queue sizes (powers of two or not), selectors, any."""
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 7, 11, 15, 0x4F, 0x80, 0xFF, 3, 100, 255, 256, 257,
                         300, 0x8000, 0xFFFF, 0x1000_0000, 0xFFFF_FFFF]),
        st.integers(0, 2**32 - 1),
    )


@st.composite
def accesses(draw: st.DrawFn) -> tuple[str, int, int, int]:
    """One access: ("r" or "w", offset in the window, width, value)."""
    offset = draw(st.one_of(
        st.sampled_from(_register_offsets()),
        st.integers(0, sv.MMIO_WINDOW - 1),
        st.integers(sv.CONFIG_SPACE_OFFSET, sv.CONFIG_SPACE_OFFSET + 64),
    ))
    width = draw(st.sampled_from([4, 4, 4, 1, 2, 8]))
    kind = draw(st.sampled_from(["r", "w", "w"]))
    return kind, offset, width, draw(_values()) & ((1 << (8 * width)) - 1)


def _apply(dut: sv.DeviceUnderTest, kind: str, offset: int, width: int, value: int) -> None:
    started = time.monotonic()
    if kind == "r":
        data = bytearray(width)
        dut.transport.read(offset, data)
        assert len(data) == width
    else:
        dut.transport.write(offset, value.to_bytes(width, "little"))
    elapsed = time.monotonic() - started
    assert elapsed < _ACCESS_TIME_LIMIT_S, f"{kind} {offset:#x}={value:#x} took {elapsed:.2f} s"


def _check_invariants(dut: sv.DeviceUnderTest) -> None:
    status = dut.transport.status
    assert status & ~_KNOWN_STATUS_BITS == 0, f"status {status:#x} has unknown bits"
    if status & mmio.STATUS_DRIVER_OK and not status & sv.NEEDS_RESET:
        assert status & mmio.STATUS_FEATURES_OK, f"DRIVER_OK without FEATURES_OK: {status:#x}"
        assert dut.device.is_activated
    assert dut.transport.driver_features.bit_length() <= 32 * mmio.FEATURE_PAGES


@pytest.mark.parametrize("name", sorted(sv.DEVICE_FACTORIES))
@sv.fuzz_settings()
@given(sequence=st.lists(accesses(), max_size=40), start_first=st.booleans())
def test_4_2_2_register_accesses_in_any_order(
    name: str, sequence: list[tuple[str, int, int, int]], start_first: bool
) -> None:
    """4.2.2.1: "The device MUST return 0x74726976 in MagicValue" and, 3.1.1, the driver
    MUST follow the initialization sequence; a driver that does not gets
    DEVICE_NEEDS_RESET or an ignored access, never an exception or a hang.

    Checked after every access: no exception escapes, each access returns quickly, the
    status holds only spec bits and DRIVER_OK implies FEATURES_OK and an activated
    device. At the end a correct driver resets and starts the device again.
    """
    memory = sv.new_memory()
    dut = sv.start_device(name, memory, 8) if start_first else _unstarted(name, memory)
    try:
        for access in sequence:
            _apply(dut, *access)
            _check_invariants(dut)
        assert dut.driver.read32(mmio.MAGIC_VALUE_OFFSET) == sv.SPEC["virtio_mmio"]["magic_value"]
        dut.driver.start(dut.queues)
        assert dut.status & mmio.STATUS_DRIVER_OK
        assert not dut.status & sv.NEEDS_RESET
    finally:
        dut.close()
        memory.close()


def _unstarted(name: str, memory: sv.CountingMemory) -> sv.DeviceUnderTest:
    dut = sv.start_device(name, memory, 8)
    dut.driver.write32(mmio.STATUS_OFFSET, 0)
    return dut


@sv.fuzz_settings()
@given(size=st.integers(0, 0x1_0000).filter(lambda n: n & (n - 1) != 0 or n > 256 or n == 0))
def test_4_2_2_queue_num_not_a_power_of_two(size: int) -> None:
    """2.7: "Queue Size value is always a power of 2" and 4.2.2.2: the driver "MUST write a
    value to QueueNum which is less than or equal to QueueNumMax". A bad size is caught at
    DRIVER_OK: the device is marked DEVICE_NEEDS_RESET and not activated.
    """
    memory = sv.new_memory()
    dut = sv.start_device("entropy", memory, 8)
    try:
        dut.driver.negotiate()
        dut.driver.setup_queue(0, dut.queues[0])
        dut.driver.write32(mmio.QUEUE_NUM_OFFSET, size)
        dut.driver.set_status(mmio.STATUS_DRIVER_OK)
        assert dut.status & sv.NEEDS_RESET
        assert not dut.device.is_activated
        dut.driver.notify(0)
        assert dut.transport.ignored_notify_count == 1
    finally:
        dut.close()
        memory.close()


# Regression cases found by the fuzzing above -------------------------------------------------


def test_regression_driver_features_sel_huge_page() -> None:
    """Found: DriverFeaturesSel 0x10000000 made a DriverFeatures write shift a mask by
    2^33 bits: 13 s of CPU and a 1 GiB integer. 2.2: feature bits end at 127, so pages
    past 3 take only zero, and a non-zero value is a driver error (DEVICE_NEEDS_RESET).
    """
    memory = sv.new_memory()
    dut = sv.start_device("entropy", memory, 8)
    try:
        dut.driver.write32(mmio.STATUS_OFFSET, 0)
        dut.driver.set_status(mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        dut.driver.write32(mmio.DRIVER_FEATURES_SEL_OFFSET, 0x1000_0000)
        _apply(dut, "w", mmio.DRIVER_FEATURES_OFFSET, 4, 0)
        assert not dut.status & sv.NEEDS_RESET
        _apply(dut, "w", mmio.DRIVER_FEATURES_OFFSET, 4, 1)
        assert dut.status & sv.NEEDS_RESET
        assert dut.transport.driver_features.bit_length() <= 128
    finally:
        dut.close()
        memory.close()
