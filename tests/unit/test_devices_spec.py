"""spec/devices.yaml and the device code state the same constants."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmm.arch.x86_64 import layout
from vmm.devices.legacy import boot_timer, i8042, serial
from vmm.devices.virtio import block, device, mmio, queue
from vmm.memory import GuestMemory

SPEC_PATH = Path(__file__).resolve().parents[2] / "spec" / "devices.yaml"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    with SPEC_PATH.open() as file:
        loaded: dict[str, Any] = yaml.safe_load(file)
    return loaded


def _mmio_constant_name(register: str) -> str:
    """Turn a virtio spec register name (QueueDescLow, SHMLenLow) into QUEUE_DESC_LOW_OFFSET."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", register)
    return f"{words.upper()}_OFFSET"


def test_virtio_feature_bits(spec: dict[str, Any]) -> None:
    bits = spec["virtio"]["feature_bits"]
    assert bits["VIRTIO_F_VERSION_1"] == device.VIRTIO_F_VERSION_1
    assert bits["VIRTIO_RING_F_EVENT_IDX"] == device.VIRTIO_RING_F_EVENT_IDX
    assert bits["VIRTIO_RING_F_INDIRECT_DESC"] == device.VIRTIO_RING_F_INDIRECT_DESC


def test_device_status_bits(spec: dict[str, Any]) -> None:
    for name, value in spec["virtio"]["device_status"].items():
        assert getattr(mmio, f"STATUS_{name}") == value, name


def test_interrupt_status_bits(spec: dict[str, Any]) -> None:
    bits = spec["virtio"]["interrupt_status"]
    assert bits["USED_BUFFER"] == device.VIRTIO_MMIO_INT_VRING
    assert bits["CONFIGURATION_CHANGE"] == device.VIRTIO_MMIO_INT_CONFIG


def test_virtqueue_layout(spec: dict[str, Any]) -> None:
    vq = spec["virtqueue"]
    assert vq["max_size_limit"] == queue.QUEUE_SIZE_LIMIT
    assert vq["descriptor"]["size"] == queue.DESCRIPTOR_SIZE
    offsets = {field["name"]: field["offset"] for field in vq["descriptor"]["fields"]}
    assert offsets == {"addr": queue.DESC_ADDR_OFFSET, "len": queue.DESC_LEN_OFFSET,
                       "flags": queue.DESC_FLAGS_OFFSET, "next": queue.DESC_NEXT_OFFSET}
    for name, value in vq["descriptor"]["flags"].items():
        assert getattr(queue, name) == value, name
    assert vq["alignment"]["descriptor_table"] == queue.DESCRIPTOR_TABLE_ALIGNMENT
    assert vq["alignment"]["available_ring"] == queue.AVAIL_RING_ALIGNMENT
    assert vq["alignment"]["used_ring"] == queue.USED_RING_ALIGNMENT
    assert vq["available_ring"]["header_size"] == queue.AVAIL_RING_OFFSET
    assert vq["available_ring"]["entry_size"] == queue.AVAIL_ENTRY_SIZE
    assert vq["used_ring"]["header_size"] == queue.USED_RING_OFFSET
    assert vq["used_ring"]["entry_size"] == queue.USED_ENTRY_SIZE
    assert vq["available_ring"]["flags"]["VIRTQ_AVAIL_F_NO_INTERRUPT"] == (
        queue.VIRTQ_AVAIL_F_NO_INTERRUPT
    )
    assert vq["used_ring"]["flags"]["VIRTQ_USED_F_NO_NOTIFY"] == queue.VIRTQ_USED_F_NO_NOTIFY


def test_mmio_identification(spec: dict[str, Any]) -> None:
    transport = spec["virtio_mmio"]
    assert transport["magic_value"] == mmio.MMIO_MAGIC_VALUE
    assert transport["version"] == mmio.MMIO_VERSION
    assert transport["vendor_id"] == mmio.MMIO_VENDOR_ID
    assert transport["register_width"] == mmio.REGISTER_WIDTH
    assert transport["config_space_offset"] == mmio.CONFIG_SPACE_OFFSET


def test_mmio_register_offsets(spec: dict[str, Any]) -> None:
    registers = spec["virtio_mmio"]["registers"]
    for register, entry in registers.items():
        name = _mmio_constant_name(register)
        assert getattr(mmio, name) == entry["offset"], (register, name)
    code_offsets = {value for key, value in vars(mmio).items()
                    if key.endswith("_OFFSET") and key != "CONFIG_SPACE_OFFSET"}
    assert code_offsets == {entry["offset"] for entry in registers.values()}


def test_mmio_register_access(spec: dict[str, Any]) -> None:
    memory = GuestMemory([(0, 0x10000)])
    with tempfile.TemporaryFile() as disk:
        disk.truncate(512)
        transport = mmio.MmioTransport(
            block.Block("d", block.FileBackend(disk.fileno())), memory, lambda: None
        )
        for register, entry in spec["virtio_mmio"]["registers"].items():
            before = transport.invalid_access_count
            transport.read(entry["offset"], bytearray(4))
            read_rejected = transport.invalid_access_count - before
            assert read_rejected == ("R" not in entry["access"]), register
            before = transport.invalid_access_count
            transport.write(entry["offset"], bytes(4))
            write_rejected = transport.invalid_access_count - before
            assert write_rejected == ("W" not in entry["access"]), register
    memory.close()


def test_mmio_placement(spec: dict[str, Any]) -> None:
    transport = spec["virtio_mmio"]
    assert transport["window_size"] == layout.VIRTIO_MMIO_SIZE
    assert transport["first_address"] == layout.VIRTIO_MMIO_START
    assert transport["first_irq"] == layout.VIRTIO_IRQ_FIRST
    assert transport["last_irq"] == layout.VIRTIO_IRQ_LAST


def test_block_device(spec: dict[str, Any]) -> None:
    blk = spec["virtio_devices"]["block"]
    assert blk["device_id"] == block.Block.device_type == block.VIRTIO_ID_BLOCK
    assert [q["max_size"] for q in blk["queues"]] == list(block.Block.queue_max_sizes)
    for name, value in blk["feature_bits"].items():
        assert getattr(block, name) == value, name
    for name, value in {**blk["request_types"], **blk["status"]}.items():
        assert getattr(block, name) == value, name
    assert blk["config_space"] == [
        {"name": "capacity", "offset": block.CONFIG_CAPACITY_OFFSET,
         "size": block.CONFIG_CAPACITY_SIZE, "unit": "512-byte sectors"}
    ]
    assert blk["sector_size"] == block.SECTOR_SIZE
    assert blk["request_header"]["size"] == block.REQUEST_HEADER.size
    assert blk["id_bytes"] == block.VIRTIO_BLK_ID_BYTES


def _feature_mask(spec: dict[str, Any], names: list[str]) -> int:
    bits = {**spec["virtio"]["feature_bits"], **spec["virtio_devices"]["block"]["feature_bits"]}
    mask = 0
    for name in names:
        mask |= 1 << bits[name]
    return mask


@pytest.mark.parametrize(
    ("read_only", "cache_type"),
    [(False, block.CACHE_UNSAFE), (True, block.CACHE_UNSAFE), (False, block.CACHE_WRITEBACK)],
)
def test_block_offered_features(
    spec: dict[str, Any], tmp_path: Path, read_only: bool, cache_type: str
) -> None:
    offered = spec["virtio_devices"]["block"]["offered_features"]
    names = list(offered["always"])
    if read_only:
        names += offered["read_only"]
    if cache_type == block.CACHE_WRITEBACK:
        names += offered["cache_type_writeback"]
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(512))
    with disk.open("rb") as file:
        device_model = block.Block("d", block.FileBackend(file.fileno()), read_only, cache_type)
    assert device_model.avail_features == _feature_mask(spec, names)


def test_serial(spec: dict[str, Any]) -> None:
    uart = spec["legacy"]["serial"]
    assert uart["port"] == layout.SERIAL_COM1_PORT
    assert uart["length"] == layout.SERIAL_PORT_COUNT == serial.REGISTER_COUNT
    assert uart["irq"] == layout.SERIAL_COM1_IRQ
    assert uart["input_fifo_size"] == serial.INPUT_FIFO_SIZE
    registers = uart["registers"]
    assert registers["RBR_THR_DLL"] == serial.DATA_OFFSET
    assert registers["IER_DLM"] == serial.IER_OFFSET
    assert registers["IIR_FCR"] == serial.IIR_FCR_OFFSET
    for name in ("LCR", "MCR", "LSR", "MSR", "SCR"):
        assert registers[name] == getattr(serial, f"{name}_OFFSET"), name


def test_i8042(spec: dict[str, Any]) -> None:
    controller = spec["legacy"]["i8042"]
    assert controller["port"] == layout.I8042_DATA_PORT
    assert controller["length"] == i8042.PORT_COUNT
    assert controller["irq"] == layout.I8042_IRQ
    assert controller["registers"]["data"] == i8042.DATA_OFFSET
    assert controller["registers"]["status_command"] == i8042.COMMAND_OFFSET
    commands = controller["commands"]
    assert commands["read_config"] == i8042.CMD_READ_CONFIG
    assert commands["write_config"] == i8042.CMD_WRITE_CONFIG
    assert commands["self_test"] == i8042.CMD_SELF_TEST
    assert commands["interface_test"] == i8042.CMD_KEYBOARD_TEST
    assert commands["disable_keyboard"] == i8042.CMD_DISABLE_KEYBOARD
    assert commands["enable_keyboard"] == i8042.CMD_ENABLE_KEYBOARD
    assert commands["read_output_port"] == i8042.CMD_READ_OUTPUT_PORT
    assert commands["pulse_reset"] & i8042.PULSE_RESET_LINE == 0
    assert commands["pulse_reset"] >= i8042.CMD_PULSE_OUTPUT_FIRST


def test_boot_timer(spec: dict[str, Any]) -> None:
    timer = spec["legacy"]["boot_timer"]
    assert timer["address"] == boot_timer.DEVICE_ADDRESS == layout.BOOT_TIMER_ADDRESS
    assert timer["length"] == boot_timer.DEVICE_SIZE
    assert timer["offset"] == boot_timer.BOOT_COMPLETE_OFFSET
    assert timer["magic"] == boot_timer.BOOT_COMPLETE_MAGIC


def _net_feature_mask(spec: dict[str, Any], names: list[str]) -> int:
    bits = {**spec["virtio"]["feature_bits"], **spec["virtio_devices"]["net"]["feature_bits"]}
    mask = 0
    for name in names:
        mask |= 1 << bits[name]
    return mask


def test_net_device(spec: dict[str, Any]) -> None:
    from vmm.devices.virtio import net

    entry = spec["virtio_devices"]["net"]
    assert entry["device_id"] == net.Net.device_type == net.VIRTIO_ID_NET
    assert [q["max_size"] for q in entry["queues"]] == list(net.Net.queue_max_sizes)
    assert [q["name"] for q in entry["queues"]].index("receiveq1") == net.RX_QUEUE_INDEX
    assert [q["name"] for q in entry["queues"]].index("transmitq1") == net.TX_QUEUE_INDEX
    for name, value in entry["feature_bits"].items():
        assert getattr(net, name) == value, name
    assert entry["config_space"] == [
        {"name": "mac", "offset": net.CONFIG_MAC_OFFSET, "size": net.CONFIG_MAC_SIZE},
        {"name": "mtu", "offset": net.CONFIG_MTU_OFFSET, "size": 2},
    ]
    assert entry["header"]["size"] == net.NET_HEADER.size == net.VNET_HEADER_SIZE
    assert entry["header"]["num_buffers_offset"] == net.NUM_BUFFERS_OFFSET
    assert entry["max_frame_size"] == net.MAX_FRAME_SIZE


@pytest.mark.parametrize(("guest_mac", "mtu"), [(None, None), (b"\xaa" * 6, None),
                                                (b"\xaa" * 6, 1500)])
def test_net_offered_features(spec: dict[str, Any], guest_mac: bytes | None,
                              mtu: int | None) -> None:
    from vmm.devices.virtio import net

    offered = spec["virtio_devices"]["net"]["offered_features"]
    names = list(offered["always"])
    if guest_mac is not None:
        names += offered["guest_mac"]
    if mtu is not None:
        names += offered["mtu"]

    class NoBackend:
        def read_frame(self, buffer: memoryview) -> int:
            raise BlockingIOError

        def write_frame(self, parts: object) -> int:
            return 0

        def set_offload(self, flags: int) -> None:
            pass

    device_model = net.Net("eth0", NoBackend(), guest_mac, mtu)
    assert device_model.avail_features == _net_feature_mask(spec, names)


def _virtio_feature_mask(spec: dict[str, Any], device: str, names: list[str]) -> int:
    entry = spec["virtio_devices"][device]
    bits = {**spec["virtio"]["feature_bits"], **entry.get("feature_bits", {})}
    mask = 0
    for name in names:
        mask |= 1 << bits[name]
    return mask


def test_entropy_device(spec: dict[str, Any]) -> None:
    from vmm.devices.virtio import rng

    entry = spec["virtio_devices"]["entropy"]
    assert entry["device_id"] == rng.Rng.device_type == rng.VIRTIO_ID_ENTROPY
    assert [q["max_size"] for q in entry["queues"]] == list(rng.Rng.queue_max_sizes)
    assert entry["max_request_bytes"] == rng.MAX_REQUEST_BYTES
    names = entry["offered_features"]["always"]
    assert rng.Rng().avail_features == _virtio_feature_mask(spec, "entropy", names)


@pytest.mark.parametrize(
    ("deflate_on_oom", "stats_interval_s", "reporting"),
    [(False, 0, False), (True, 0, False), (False, 5, False), (True, 1, True)],
)
def test_balloon_device(
    spec: dict[str, Any], deflate_on_oom: bool, stats_interval_s: int, reporting: bool
) -> None:
    from vmm.devices.virtio import balloon
    from vmm.rate_limiter import TimerFd

    entry = spec["virtio_devices"]["balloon"]
    for name, value in entry["feature_bits"].items():
        assert getattr(balloon, name) == value, name
    offered = entry["offered_features"]
    names = list(offered["always"])
    if deflate_on_oom:
        names += offered["deflate_on_oom"]
    if stats_interval_s:
        names += offered["stats_polling_interval_s_above_0"]
    if reporting:
        names += offered["free_page_reporting"]
    timer = TimerFd()
    try:
        device_model = balloon.Balloon(
            1, deflate_on_oom, stats_interval_s, reporting, timer if stats_interval_s else None
        )
    finally:
        timer.close()
    assert entry["device_id"] == device_model.device_type == balloon.VIRTIO_ID_BALLOON
    assert device_model.avail_features == _virtio_feature_mask(spec, "balloon", names)
    enabled = set(names)
    expected_queues = [q["max_size"] for q in entry["queues"]
                       if q.get("feature") is None or q["feature"] in enabled]
    assert list(device_model.queue_max_sizes) == expected_queues
    fields = {item["name"]: item for item in entry["config_space"]}
    assert fields["num_pages"]["offset"] == balloon.CONFIG_NUM_PAGES_OFFSET
    assert fields["actual"]["offset"] == balloon.CONFIG_ACTUAL_OFFSET
    assert entry["pfn_shift"] == balloon.VIRTIO_BALLOON_PFN_SHIFT
    assert entry["stat_entry_size"] == balloon.STAT_ENTRY.size
    assert {name: tag for tag, name in balloon.STAT_NAMES.items()} == entry["stat_tags"]


def test_vsock_device(spec: dict[str, Any]) -> None:
    from vmm.devices.virtio import vsock

    class NoHost:
        def connect(self, port: int) -> vsock.HostStream:
            raise ConnectionRefusedError(port)

    entry = spec["virtio_devices"]["vsock"]
    device_model = vsock.Vsock(3, NoHost())
    assert entry["device_id"] == device_model.device_type == vsock.VIRTIO_ID_VSOCK
    assert [q["max_size"] for q in entry["queues"]] == list(device_model.queue_max_sizes)
    names = entry["offered_features"]["always"]
    assert device_model.avail_features == _virtio_feature_mask(spec, "vsock", names)
    assert entry["config_space"] == [
        {"name": "guest_cid", "offset": vsock.CONFIG_GUEST_CID_OFFSET,
         "size": vsock.CONFIG_GUEST_CID_SIZE}
    ]
    assert entry["host_cid"] == vsock.VMADDR_CID_HOST
    header = entry["packet_header"]
    assert header["size"] == vsock.PACKET_HEADER.size
    assert sum(field["size"] for field in header["fields"]) == vsock.PACKET_HEADER.size
    packed = vsock.PacketHeader(*range(1, 11)).pack()
    for position, field in enumerate(header["fields"], start=1):
        raw = packed[field["offset"] : field["offset"] + field["size"]]
        assert int.from_bytes(raw, "little") == position, field["name"]
    assert entry["types"]["VIRTIO_VSOCK_TYPE_STREAM"] == vsock.VIRTIO_VSOCK_TYPE_STREAM
    assert entry["ops"] == {op.name: op.value for op in vsock.Op}
    for name, value in entry["shutdown_flags"].items():
        assert getattr(vsock, name) == value, name
    assert entry["max_packet_payload"] == vsock.MAX_PACKET_PAYLOAD
