"""Every virtio device against a misbehaving driver's queue images (virtio 1.2 section 2.7).

Each example lays out a fuzzed descriptor table, indirect table and available
ring for one queue of one device, notifies it twice, and checks the device's
duties toward a driver that breaks the rules. Limits come from
spec/devices.yaml through tests/fuzz/strategies_virtio.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import strategies_virtio as sv
from vmm.devices.virtio import mmio

DEVICES = sorted(sv.DEVICE_FACTORIES)


@st.composite
def device_cases(draw: st.DrawFn, name: str) -> tuple[int, int, sv.QueueImage]:
    """A queue size, a queue index of device `name` and a queue image for it."""
    spec = sv.SPEC["virtio_devices"][name]
    max_size = min(queue["max_size"] for queue in spec["queues"])
    size = draw(sv.queue_sizes(max_size))
    # Taken modulo the queues the device set up (balloon's depend on its features).
    index = draw(st.integers(0, 7))
    return size, index, draw(sv.queue_images(size))


def _run_case(name: str, size: int, index: int, image: sv.QueueImage) -> None:
    memory = sv.new_memory()
    dut = sv.start_device(name, memory, size)
    healthy = None
    try:
        index %= len(dut.queues)
        driver = dut.queues[index]
        sv.write_image(memory, driver, image)
        before = memory.snapshot()
        memory.access_count = 0
        for _ in range(2):
            dut.driver.notify(index)
        after = memory.snapshot()
        bound = sv.ACCESSES_PER_NOTIFY + sv.ACCESSES_PER_DESCRIPTOR * 2 * size * (size + 1)
        assert memory.access_count <= bound, f"{memory.access_count} accesses for 2 notifies"
        if name != "balloon":
            bad = sv.changed_outside(before, after, sv.writable_ranges(image, driver))
            assert not bad, f"{name} wrote outside writable buffers at {bad[:4]}"
        sv.check_used_ring(driver, consumed_bound=size)
        if name != "balloon" and memory.outside:
            assert dut.status & sv.NEEDS_RESET, f"{name} touched {memory.outside[0]} silently"
        _check_reset_recovers(dut)
        healthy = sv.healthy_rng_round_trip(memory)
    finally:
        dut.close()
        if healthy is not None:
            healthy.close()
        memory.close()


def _check_reset_recovers(dut: sv.DeviceUnderTest) -> None:
    """After Status 0 and a fresh set-up the device is live again, whatever came before."""
    dut.driver.start(dut.queues)
    assert dut.status & mmio.STATUS_DRIVER_OK
    assert not dut.status & sv.NEEDS_RESET


@pytest.mark.parametrize("name", DEVICES)
@sv.fuzz_settings()
@given(data=st.data())
def test_2_7_split_virtqueue_device_survives_any_queue_image(
    name: str, data: st.DataObject
) -> None:
    """2.7.5.1, 2.7.4.1, 2.7.8.1: the device MUST NOT write to a device-readable buffer;
    "the device MUST set len prior to updating the used idx"; a broken chain marks the
    device DEVICE_NEEDS_RESET (2.1.1) and other devices keep running.

    Checked: no exception escapes the transport; bytes change only in device-writable
    buffers and the used ring (balloon discards pages, so only the first two hold for it);
    used ids stay below the queue size; work per notify is bounded; reset revives the
    device; a second device in the same RAM still answers.
    """
    size, index, image = data.draw(device_cases(name))
    _run_case(name, size, index, image)
