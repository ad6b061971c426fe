"""VmResources rules: machine limits, drive ordering and root rule, files, vm_config()."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmm.errors import ConfigError
from vmm.resources import (
    CONFIG_KEYS,
    DEFAULT_BOOT_ARGS,
    MAX_MEM_SIZE_MIB,
    BootSource,
    Drive,
    MachineConfig,
    VmResources,
    merge_patch,
)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(512))
    return path


def drive_body(drive_id: str, path: Path, root: bool = False, **extra: object) -> dict:
    return {"drive_id": drive_id, "path_on_host": str(path), "is_root_device": root, **extra}


def test_defaults_match_firecracker() -> None:
    resources = VmResources()
    assert resources.machine_config == MachineConfig(vcpu_count=1, mem_size_mib=128)
    assert resources.boot_source is None
    assert resources.drives == []
    assert DEFAULT_BOOT_ARGS == "console=ttyS0 reboot=k panic=1 pci=off"


@pytest.mark.parametrize("body, fragment", [
    ({"vcpu_count": 3, "mem_size_mib": 128, "smt": True}, "vcpu_count: 3"),
    ({"vcpu_count": 1, "mem_size_mib": MAX_MEM_SIZE_MIB + 1}, str(MAX_MEM_SIZE_MIB)),
    ({"vcpu_count": 1, "mem_size_mib": 0}, "mem_size_mib: 0"),
    ({"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}, "multiple of 2"),
])
def test_machine_config_rules(body: dict, fragment: str) -> None:
    resources = VmResources()
    with pytest.raises(ConfigError, match=fragment):
        resources.set_machine_config(body)
    assert resources.machine_config == MachineConfig()


def test_smt_allows_one_and_even_vcpus() -> None:
    resources = VmResources()
    resources.set_machine_config({"vcpu_count": 1, "mem_size_mib": 64, "smt": True})
    resources.update_machine_config({"vcpu_count": 4})
    assert resources.machine_config.vcpu_count == 4
    assert resources.machine_config.smt is True


def test_cpu_template_none_string_clears() -> None:
    resources = VmResources()
    resources.set_machine_config({"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"})
    assert resources.machine_config.cpu_template == "T2"
    resources.update_machine_config({"cpu_template": "None"})
    assert resources.machine_config.cpu_template is None
    assert "cpu_template" not in resources.machine_config.to_dict()


def test_boot_source_files_checked(tmp_path: Path, disk: Path) -> None:
    resources = VmResources()
    missing = str(tmp_path / "initrd.missing")
    with pytest.raises(ConfigError, match="initrd_path.*initrd.missing"):
        resources.set_boot_source({"kernel_image_path": str(disk), "initrd_path": missing})
    with pytest.raises(ConfigError, match="not a regular file"):
        resources.set_boot_source({"kernel_image_path": str(tmp_path)})
    assert resources.boot_source is None
    resources.set_boot_source({"kernel_image_path": str(disk)})
    assert resources.boot_source == BootSource(kernel_image_path=str(disk))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without read permission")
def test_unreadable_kernel_rejected(disk: Path) -> None:
    disk.chmod(0)
    with pytest.raises(ConfigError, match="not readable"):
        VmResources().set_boot_source({"kernel_image_path": str(disk)})


def test_root_drive_first_then_insertion_order(disk: Path) -> None:
    resources = VmResources()
    resources.put_drive(drive_body("a", disk))
    resources.put_drive(drive_body("b", disk))
    resources.put_drive(drive_body("root", disk, root=True))
    resources.put_drive(drive_body("c", disk))
    assert [drive.drive_id for drive in resources.drives] == ["root", "a", "b", "c"]


def test_replacing_drive_keeps_position(disk: Path) -> None:
    resources = VmResources()
    for drive_id in ("a", "b", "c"):
        resources.put_drive(drive_body(drive_id, disk))
    resources.put_drive(drive_body("b", disk, is_read_only=True))
    assert [drive.drive_id for drive in resources.drives] == ["a", "b", "c"]
    assert resources.drives[1].is_read_only is True


def test_second_root_drive_rejected(disk: Path) -> None:
    resources = VmResources()
    resources.put_drive(drive_body("root1", disk, root=True))
    with pytest.raises(ConfigError, match="root block device already exists"):
        resources.put_drive(drive_body("root2", disk, root=True))
    resources.put_drive(drive_body("root1", disk, root=False))
    resources.put_drive(drive_body("root2", disk, root=True))
    assert [drive.is_root_device for drive in resources.drives] == [True, False]


def test_root_pmem_and_root_drive_conflict(disk: Path) -> None:
    resources = VmResources()
    resources.put_pmem({"id": "pm0", "path_on_host": str(disk), "root_device": True})
    with pytest.raises(ConfigError, match="pmem 'pm0'"):
        resources.put_drive(drive_body("rootfs", disk, root=True))


def test_drive_rejects_socket_and_missing_path(disk: Path) -> None:
    resources = VmResources()
    with pytest.raises(ConfigError, match="vhost-user"):
        resources.put_drive({"drive_id": "v", "is_root_device": False, "socket": "/s"})
    with pytest.raises(ConfigError, match='"path_on_host"'):
        resources.put_drive({"drive_id": "v", "is_root_device": False})
    assert resources.drives == []


def test_update_drive_checks_new_path(tmp_path: Path, disk: Path) -> None:
    resources = VmResources()
    resources.put_drive(drive_body("d", disk))
    with pytest.raises(ConfigError, match="gone.img"):
        resources.update_drive("d", str(tmp_path / "gone.img"), None)
    assert resources.drives[0].path_on_host == str(disk)
    with pytest.raises(ConfigError, match="'x'"):
        resources.update_drive("x", None, None)


def test_duplicate_tap_and_mac_rejected() -> None:
    resources = VmResources()
    resources.put_network_interface({"iface_id": "eth0", "host_dev_name": "tap0",
                                     "guest_mac": "06:00:00:00:00:01"})
    with pytest.raises(ConfigError, match="tap0"):
        resources.put_network_interface({"iface_id": "eth1", "host_dev_name": "tap0"})
    with pytest.raises(ConfigError, match="06:00:00:00:00:01"):
        resources.put_network_interface({"iface_id": "eth1", "host_dev_name": "tap1",
                                         "guest_mac": "06:00:00:00:00:01"})
    resources.put_network_interface({"iface_id": "eth0", "host_dev_name": "tap0"})
    assert len(resources.network_interfaces) == 1


@pytest.mark.parametrize("address", ["169.254.0.1", "10.0.0.1", "169.254.255.1", "nope"])
def test_mmds_address_must_be_link_local(address: str) -> None:
    resources = VmResources()
    resources.put_network_interface({"iface_id": "eth0", "host_dev_name": "tap0"})
    with pytest.raises(ConfigError, match="ipv4_address"):
        resources.set_mmds_config({"network_interfaces": ["eth0"], "ipv4_address": address})


def test_balloon_larger_than_memory_rejected() -> None:
    resources = VmResources()
    with pytest.raises(ConfigError, match="amount_mib: 200"):
        resources.set_balloon({"amount_mib": 200, "deflate_on_oom": False})
    resources.set_balloon({"amount_mib": 100, "deflate_on_oom": False})
    with pytest.raises(ConfigError, match="amount_mib: 100"):
        resources.set_machine_config({"vcpu_count": 1, "mem_size_mib": 64})


def test_memory_hotplug_sizes_must_divide() -> None:
    resources = VmResources()
    with pytest.raises(ConfigError, match="total_size_mib: 200"):
        resources.set_memory_hotplug({"total_size_mib": 200})
    with pytest.raises(ConfigError, match="power of 2"):
        resources.set_memory_hotplug({"total_size_mib": 256, "block_size_mib": 6})
    resources.set_memory_hotplug({"total_size_mib": 1024})
    assert resources.memory_hotplug == {"total_size_mib": 1024}


def test_merge_patch_follows_rfc7396() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}}
    patch = {"a": "z", "c": {"f": None}}
    assert merge_patch(target, patch) == {"a": "z", "c": {"d": "e"}}
    assert merge_patch({"a": [1]}, {"a": {"b": 1}}) == {"a": {"b": 1}}
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}}


def test_vm_config_shape(disk: Path) -> None:
    resources = VmResources()
    resources.set_boot_source({"kernel_image_path": str(disk), "boot_args": "quiet"})
    resources.put_drive(drive_body("rootfs", disk, root=True, partuuid="abcd-01"))
    config = resources.vm_config()
    assert tuple(config) == CONFIG_KEYS
    assert config["boot-source"] == {"kernel_image_path": str(disk), "boot_args": "quiet"}
    assert config["drives"] == [{
        "drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True,
        "is_read_only": False, "partuuid": "abcd-01", "cache_type": "Unsafe",
        "io_engine": "Sync"}]
    assert config["machine-config"] == MachineConfig().to_dict()
    assert config["balloon"] is None
    config["drives"].clear()
    assert len(resources.vm_config()["drives"]) == 1


def test_drive_dataclass_fields() -> None:
    drive = Drive("d", "/p", True)
    assert (drive.is_read_only, drive.partuuid, drive.cache_type, drive.io_engine,
            drive.rate_limiter) == (False, None, "Unsafe", "Sync", None)
