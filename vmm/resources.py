"""The VM configuration model: machine, boot source, drives and the other devices.

Both the API (through vmm.controller) and the config file fill a VmResources. Request
bodies reach these methods after schema validation (vmm.api.validation), so the methods
here check only what a schema cannot: rules across fields, across devices, and against the
host file system. Each rule that fails raises ConfigError and leaves the stored state as
it was.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from vmm.errors import ConfigError

# Our own default kernel command line: serial console, reboot through the keyboard
# controller (the i8042 reset line), reboot one second after a panic, no PCI probing.
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"

MIN_VCPU_COUNT = 1
MAX_VCPU_COUNT = 32
MIN_MEM_SIZE_MIB = 1
# RAM above the 32-bit MMIO gap starts at 4 GiB, so the highest guest physical address is
# mem_size + 1 GiB. 511 GiB keeps it below 2^39 bytes, the narrowest physical address width
# that current x86-64 CPUs report (CPUID leaf 0x80000008). spec/api.yaml states the same.
MAX_MEM_SIZE_MIB = 511 * 1024

CPU_TEMPLATES = ("C3", "T2", "T2S", "T2CL", "T2A", "V1N1")
HUGE_PAGES_2M = "2M"

# Keys of the config-file format and of GET /vm/config, in the order vm_config() returns.
CONFIG_KEYS = (
    "balloon",
    "drives",
    "boot-source",
    "cpu-config",
    "logger",
    "machine-config",
    "metrics",
    "memory-hotplug",
    "mmds-config",
    "network-interfaces",
    "pmem",
    "vsock",
    "entropy",
)

_MMDS_LINK_LOCAL = "169.254.0.0/16"


@dataclass
class MachineConfig:
    """vCPUs, memory and CPU options of the guest."""

    vcpu_count: int = 1
    mem_size_mib: int = 128
    smt: bool = False
    track_dirty_pages: bool = False
    cpu_template: str | None = None
    huge_pages: str = "None"

    def to_dict(self) -> dict[str, Any]:
        """Return the API form; cpu_template is left out when no template is set."""
        body: dict[str, Any] = {
            "vcpu_count": self.vcpu_count,
            "mem_size_mib": self.mem_size_mib,
            "smt": self.smt,
            "track_dirty_pages": self.track_dirty_pages,
            "huge_pages": self.huge_pages,
        }
        if self.cpu_template is not None:
            body["cpu_template"] = self.cpu_template
        return body


@dataclass
class BootSource:
    """Kernel image, optional initrd and kernel command line (None: DEFAULT_BOOT_ARGS)."""

    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _without_none(
            {
                "kernel_image_path": self.kernel_image_path,
                "initrd_path": self.initrd_path,
                "boot_args": self.boot_args,
            }
        )


@dataclass
class Drive:
    """A virtio block device backed by a host file or block device."""

    drive_id: str
    path_on_host: str
    is_root_device: bool
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: str = "Unsafe"
    io_engine: str = "Sync"
    rate_limiter: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return _without_none(
            {
                "drive_id": self.drive_id,
                "path_on_host": self.path_on_host,
                "is_root_device": self.is_root_device,
                "is_read_only": self.is_read_only,
                "partuuid": self.partuuid,
                "cache_type": self.cache_type,
                "io_engine": self.io_engine,
                "rate_limiter": self.rate_limiter,
            }
        )


def _without_none(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if value is not None}


def check_readable_file(label: str, path: str) -> None:
    """Raise ConfigError unless `path` is an existing, readable file or block device."""
    _check_host_file(label, path, os.R_OK)


def _check_host_file(label: str, path: str, mode: int) -> None:
    try:
        st = os.stat(path)
    except OSError as error:
        raise ConfigError(f"{label}: cannot open {path!r}: {error.strerror}") from None
    except ValueError:
        raise ConfigError(f"{label}: {path!r} contains a NUL byte; host paths cannot") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError(f"{label}: {path!r} is not a regular file or block device")
    if not os.access(path, mode):
        wanted = "readable and writable" if mode & os.W_OK else "readable"
        raise ConfigError(f"{label}: {path!r} is not {wanted} by this process")


def check_machine_config(config: MachineConfig) -> None:
    """Raise ConfigError if the fields break a rule that spans fields or a limit."""
    if not MIN_VCPU_COUNT <= config.vcpu_count <= MAX_VCPU_COUNT:
        raise ConfigError(
            f"machine-config: vcpu_count: {config.vcpu_count} is outside "
            f"[{MIN_VCPU_COUNT}, {MAX_VCPU_COUNT}]"
        )
    if config.smt and config.vcpu_count > 1 and config.vcpu_count % 2 != 0:
        raise ConfigError(
            f"machine-config: vcpu_count: {config.vcpu_count} is invalid with smt enabled; "
            "it must be 1 or an even number"
        )
    if not MIN_MEM_SIZE_MIB <= config.mem_size_mib <= MAX_MEM_SIZE_MIB:
        raise ConfigError(
            f"machine-config: mem_size_mib: {config.mem_size_mib} is outside "
            f"[{MIN_MEM_SIZE_MIB}, {MAX_MEM_SIZE_MIB}]"
        )
    if config.huge_pages == HUGE_PAGES_2M and config.mem_size_mib % 2 != 0:
        raise ConfigError(
            f"machine-config: mem_size_mib: {config.mem_size_mib} must be a multiple of 2 "
            'with huge_pages "2M"'
        )
    if config.cpu_template is not None and config.cpu_template not in CPU_TEMPLATES:
        raise ConfigError(
            f"machine-config: cpu_template: {config.cpu_template!r} is not one of "
            f"{', '.join(CPU_TEMPLATES)} or None"
        )


def _machine_config_from_body(base: MachineConfig, body: dict[str, Any]) -> MachineConfig:
    config = copy.copy(base)
    for name, value in body.items():
        if name == "cpu_template":
            value = None if value == "None" else value
        setattr(config, name, value)
    return config


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply a JSON merge patch (RFC 7396) to `target` and return the result."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class VmResources:
    """Everything InstanceStart needs, as configured through the API or a config file.

    Devices this build has no model for yet are kept as the validated request bodies
    (dicts), so GET /vm/config returns them and the runtime can name them.
    """

    machine_config: MachineConfig = field(default_factory=MachineConfig)
    boot_source: BootSource | None = None
    # Root drive first, then the others in the order they were first added.
    drives: list[Drive] = field(default_factory=list)
    network_interfaces: list[dict] = field(default_factory=list)
    vsock: dict | None = None
    balloon: dict | None = None
    entropy: dict | None = None
    logger: dict | None = None
    metrics: dict | None = None
    mmds_config: dict | None = None
    mmds_data: dict = field(default_factory=dict)
    cpu_config: dict | None = None
    serial: dict | None = None
    pmem: list[dict] = field(default_factory=list)
    memory_hotplug: dict | None = None

    # Machine configuration -----------------------------------------------------------

    def set_machine_config(self, body: dict[str, Any]) -> None:
        """Replace the machine configuration; optional fields left out get defaults."""
        config = _machine_config_from_body(MachineConfig(), body)
        check_machine_config(config)
        self._check_balloon_fits(self.balloon, config.mem_size_mib)
        self.machine_config = config

    def update_machine_config(self, body: dict[str, Any]) -> None:
        """Change only the given fields of the machine configuration."""
        config = _machine_config_from_body(self.machine_config, body)
        check_machine_config(config)
        self._check_balloon_fits(self.balloon, config.mem_size_mib)
        self.machine_config = config

    # Boot source and drives -------------------------------------------------------------

    def set_boot_source(self, body: dict[str, Any]) -> None:
        """Replace the boot source after checking the kernel and initrd can be read."""
        source = BootSource(
            kernel_image_path=body["kernel_image_path"],
            boot_args=body.get("boot_args"),
            initrd_path=body.get("initrd_path"),
        )
        check_readable_file("boot-source: kernel_image_path", source.kernel_image_path)
        if source.initrd_path is not None:
            check_readable_file("boot-source: initrd_path", source.initrd_path)
        self.boot_source = source

    def put_drive(self, body: dict[str, Any]) -> None:
        """Add a drive, or replace the one with the same drive_id."""
        drive = self._drive_from_body(body)
        if drive.is_root_device:
            self._check_no_other_root(drive.drive_id, "drives")
        index = self._drive_index(drive.drive_id)
        if index is None:
            self.drives.append(drive)
        else:
            self.drives[index] = drive
        self._put_root_drive_first()

    def update_drive(
        self, drive_id: str, path_on_host: str | None, rate_limiter: dict | None
    ) -> Drive:
        """Change the backing file or rate limiter of an existing drive; return it."""
        index = self._drive_index(drive_id)
        if index is None:
            raise ConfigError(f"drives: no drive with drive_id {drive_id!r} is configured")
        drive = copy.copy(self.drives[index])
        if path_on_host is not None:
            _check_host_file(f"drives: {drive_id}: path_on_host", path_on_host,
                             _drive_access_mode(drive.is_read_only))
            drive.path_on_host = path_on_host
        if rate_limiter is not None:
            drive.rate_limiter = rate_limiter
        self.drives[index] = drive
        return drive

    def drive(self, drive_id: str) -> Drive | None:
        """Return the drive with this id, or None."""
        index = self._drive_index(drive_id)
        return None if index is None else self.drives[index]

    def _drive_from_body(self, body: dict[str, Any]) -> Drive:
        drive_id = body["drive_id"]
        if "socket" in body:
            raise ConfigError(
                f"drives: {drive_id}: socket: vhost-user block devices are not supported "
                "by this build; give path_on_host instead"
            )
        if "path_on_host" not in body:
            raise ConfigError(f'drives: {drive_id}: missing required field "path_on_host"')
        read_only = body.get("is_read_only", False)
        _check_host_file(f"drives: {drive_id}: path_on_host", body["path_on_host"],
                         _drive_access_mode(read_only))
        return Drive(
            drive_id=drive_id,
            path_on_host=body["path_on_host"],
            is_root_device=body["is_root_device"],
            is_read_only=read_only,
            partuuid=body.get("partuuid"),
            cache_type=body.get("cache_type", "Unsafe"),
            io_engine=body.get("io_engine", "Sync"),
            rate_limiter=body.get("rate_limiter"),
        )

    def _drive_index(self, drive_id: str) -> int | None:
        for index, drive in enumerate(self.drives):
            if drive.drive_id == drive_id:
                return index
        return None

    def _check_no_other_root(self, device_id: str, label: str) -> None:
        for drive in self.drives:
            if drive.is_root_device and drive.drive_id != device_id:
                raise ConfigError(
                    f"{label}: {device_id}: a root block device already exists "
                    f"(drive {drive.drive_id!r}); only one device can be the root device"
                )
        for pmem in self.pmem:
            if pmem.get("root_device") and pmem["id"] != device_id:
                raise ConfigError(
                    f"{label}: {device_id}: a root device already exists "
                    f"(pmem {pmem['id']!r}); only one device can be the root device"
                )

    def _put_root_drive_first(self) -> None:
        # sort() is stable, so the other drives keep their insertion order.
        self.drives.sort(key=lambda drive: not drive.is_root_device)

    # Devices stored as request bodies ---------------------------------------------------

    def put_network_interface(self, body: dict[str, Any]) -> None:
        """Add a network interface, or replace the one with the same iface_id."""
        iface_id = body["iface_id"]
        others = [iface for iface in self.network_interfaces if iface["iface_id"] != iface_id]
        for other in others:
            if other["host_dev_name"] == body["host_dev_name"]:
                raise ConfigError(
                    f"network-interfaces: {iface_id}: host_dev_name {body['host_dev_name']!r} "
                    f"is already used by interface {other['iface_id']!r}"
                )
            mac = body.get("guest_mac")
            if mac is not None and other.get("guest_mac", "").lower() == mac.lower():
                raise ConfigError(
                    f"network-interfaces: {iface_id}: guest_mac {mac!r} is already used by "
                    f"interface {other['iface_id']!r}"
                )
        _replace_or_append(self.network_interfaces, "iface_id", dict(body))

    def network_interface(self, iface_id: str) -> dict | None:
        """Return the stored network interface body with this id, or None."""
        return _find(self.network_interfaces, "iface_id", iface_id)

    def put_pmem(self, body: dict[str, Any]) -> None:
        """Add a pmem device, or replace the one with the same id."""
        pmem_id = body["id"]
        if body.get("root_device"):
            self._check_no_other_root(pmem_id, "pmem")
        mode = _drive_access_mode(body.get("read_only", False))
        _check_host_file(f"pmem: {pmem_id}: path_on_host", body["path_on_host"], mode)
        _replace_or_append(self.pmem, "id", dict(body))

    def set_vsock(self, body: dict[str, Any]) -> None:
        """Replace the vsock device; raise ConfigError if uds_path contains a NUL byte."""
        if "\0" in body["uds_path"]:
            raise ConfigError(f"vsock: uds_path: {body['uds_path']!r} contains a NUL byte; "
                              "host paths cannot")
        self.vsock = dict(body)

    def set_balloon(self, body: dict[str, Any]) -> None:
        """Replace the balloon device; its target must fit in guest memory."""
        self._check_balloon_fits(body, self.machine_config.mem_size_mib)
        self.balloon = dict(body)

    def _check_balloon_fits(self, balloon: dict | None, mem_size_mib: int) -> None:
        if balloon is not None and balloon["amount_mib"] > mem_size_mib:
            raise ConfigError(
                f"balloon: amount_mib: {balloon['amount_mib']} is larger than the guest "
                f"memory of {mem_size_mib} MiB"
            )

    def set_entropy(self, body: dict[str, Any]) -> None:
        """Replace the entropy device."""
        self.entropy = dict(body)

    def set_cpu_config(self, body: dict[str, Any]) -> None:
        """Replace the custom CPU template."""
        self.cpu_config = copy.deepcopy(body)

    def set_serial(self, body: dict[str, Any]) -> None:
        """Replace the serial console output settings."""
        self.serial = dict(body)

    def set_memory_hotplug(self, body: dict[str, Any]) -> None:
        """Replace the hotpluggable memory settings; sizes must divide evenly."""
        block = body.get("block_size_mib", 2)
        slot = body.get("slot_size_mib", 128)
        total = body.get("total_size_mib", 0)
        if block & (block - 1):
            raise ConfigError(f"memory-hotplug: block_size_mib: {block} is not a power of 2")
        if slot % block:
            raise ConfigError(
                f"memory-hotplug: slot_size_mib: {slot} is not a multiple of "
                f"block_size_mib {block}"
            )
        if total % slot:
            raise ConfigError(
                f"memory-hotplug: total_size_mib: {total} is not a multiple of "
                f"slot_size_mib {slot}"
            )
        self.memory_hotplug = dict(body)

    def set_logger(self, body: dict[str, Any]) -> None:
        """Store the logger settings (the caller applies them)."""
        self.logger = dict(body)

    def set_metrics(self, body: dict[str, Any]) -> None:
        """Store the metrics output path; it can be set once."""
        if self.metrics is not None:
            raise ConfigError(
                "metrics: the metrics output is already set to "
                f"{self.metrics['metrics_path']!r}; it cannot be changed"
            )
        parent = os.path.dirname(os.path.abspath(body["metrics_path"]))
        if not os.path.isdir(parent):
            raise ConfigError(
                f"metrics: metrics_path: directory {parent!r} of "
                f"{body['metrics_path']!r} does not exist"
            )
        self.metrics = dict(body)

    # MMDS -------------------------------------------------------------------------------

    def set_mmds_config(self, body: dict[str, Any]) -> None:
        """Replace the MMDS settings; its interfaces must already be configured."""
        for iface_id in body["network_interfaces"]:
            if self.network_interface(iface_id) is None:
                raise ConfigError(
                    f"mmds-config: network_interfaces: {iface_id!r} is not a configured "
                    "network interface; add it with PUT /network-interfaces first"
                )
        address = body.get("ipv4_address")
        if address is not None:
            _check_mmds_address(address)
        self.mmds_config = dict(body)

    def put_mmds(self, data: dict[str, Any], size_limit: int) -> None:
        """Replace the MMDS data store."""
        _check_mmds_size(data, size_limit)
        self.mmds_data = copy.deepcopy(data)

    def patch_mmds(self, patch: dict[str, Any], size_limit: int) -> None:
        """Merge a JSON merge patch into the MMDS data store."""
        data = merge_patch(self.mmds_data, patch)
        _check_mmds_size(data, size_limit)
        self.mmds_data = data

    # Export -----------------------------------------------------------------------------

    def has_boot_specific_config(self) -> bool:
        """Return True if anything other than the logger and metrics is configured."""
        return (
            self.machine_config != MachineConfig()
            or self.boot_source is not None
            or bool(self.drives or self.network_interfaces or self.pmem)
            or any(
                item is not None
                for item in (self.vsock, self.balloon, self.entropy, self.mmds_config,
                             self.cpu_config, self.memory_hotplug)
            )
        )

    def vm_config(self) -> dict[str, Any]:
        """Return GET /vm/config: the config-file form, null for unconfigured devices."""
        config = {
            "balloon": self.balloon,
            "drives": [drive.to_dict() for drive in self.drives],
            "boot-source": None if self.boot_source is None else self.boot_source.to_dict(),
            "cpu-config": self.cpu_config,
            "logger": self.logger,
            "machine-config": self.machine_config.to_dict(),
            "metrics": self.metrics,
            "memory-hotplug": self.memory_hotplug,
            "mmds-config": self.mmds_config,
            "network-interfaces": self.network_interfaces,
            "pmem": self.pmem,
            "vsock": self.vsock,
            "entropy": self.entropy,
        }
        return copy.deepcopy(config)


def _drive_access_mode(read_only: bool) -> int:
    return os.R_OK if read_only else os.R_OK | os.W_OK


def _find(items: list[dict], key: str, value: str) -> dict | None:
    for item in items:
        if item[key] == value:
            return item
    return None


def _replace_or_append(items: list[dict], key: str, new: dict) -> None:
    for index, item in enumerate(items):
        if item[key] == new[key]:
            items[index] = new
            return
    items.append(new)


def _check_mmds_address(address: str) -> None:
    import ipaddress

    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError:
        raise ConfigError(
            f"mmds-config: ipv4_address: {address!r} is not an IPv4 address"
        ) from None
    third_octet = parsed.packed[2]
    if parsed not in ipaddress.ip_network(_MMDS_LINK_LOCAL) or third_octet in (0, 255):
        raise ConfigError(
            f"mmds-config: ipv4_address: {address} is not a link-local address in "
            "169.254.1.0 - 169.254.254.255"
        )


def _check_mmds_size(data: dict[str, Any], size_limit: int) -> None:
    size = len(json.dumps(data, separators=(",", ":")).encode())
    if size > size_limit:
        raise ConfigError(
            f"mmds: the data store would be {size} bytes, more than the limit of "
            f"{size_limit} bytes (--mmds-size-limit)"
        )
