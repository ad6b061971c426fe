"""Build a bootable x86-64 machine from VmResources: KVM VM, memory, devices, boot state.

The order follows what KVM requires: the in-kernel irqchip exists before any
vCPU is created (KVM API documentation, KVM_CREATE_IRQCHIP), memory slots are
registered before the boot structures are written, and every vCPU gets its
CPUID before its MSRs and registers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.acpi import write_acpi_tables
from vmm.arch.x86_64.bootparams import (
    BootParamsError,
    build_e820,
    rng_seed_entry,
    write_cmdline,
    write_setup_data,
    write_zero_page,
)
from vmm.arch.x86_64.cpuid import normalize_cpuid
from vmm.arch.x86_64.emulation import InstructionFallback
from vmm.arch.x86_64.interrupts import setup_lapic
from vmm.arch.x86_64.loader import KernelLoaderError, load_initrd, load_kernel
from vmm.arch.x86_64.mptable import write_mptable
from vmm.arch.x86_64.msrs import setup_msrs
from vmm.arch.x86_64.regs import setup_fpu, setup_regs, setup_sregs
from vmm.console import Console
from vmm.devices.bus import Bus
from vmm.devices.legacy.boot_timer import BootTimer
from vmm.devices.legacy.i8042 import I8042
from vmm.devices.legacy.serial import Serial
from vmm.devices.virtio.balloon import Balloon
from vmm.devices.virtio.block import Block, FileBackend
from vmm.devices.virtio.device import VirtioDevice
from vmm.devices.virtio.mmio import QUEUE_NOTIFY_OFFSET, MmioTransport
from vmm.devices.virtio.net import Net, parse_mac
from vmm.devices.virtio.rng import Rng
from vmm.devices.virtio.tap import Tap
from vmm.devices.virtio.vsock import Vsock
from vmm.devices.virtio.vsock_unix import UnixVsockBackend
from vmm.errors import StartError
from vmm.eventloop import EventLoop
from vmm.kvm.ioctl import KvmError
from vmm.kvm.system import Kvm, KvmCap, Vm
from vmm.memory import GuestMemory, GuestMemoryError
from vmm.mmds.http import MmdsService, MmdsVersion
from vmm.mmds.stack import DEFAULT_IPV4_ADDRESS, MmdsStack
from vmm.rate_limiter import RateLimiter, TimerFd
from vmm.resources import Drive, VmResources
from vmm.vcpu import VcpuThread

if TYPE_CHECKING:
    from vmm.vm import MicroVm

log = logging.getLogger(__name__)

# Addresses KVM needs for its real-mode TSS and identity-map page on Intel hosts
# (KVM_SET_TSS_ADDR, KVM_SET_IDENTITY_MAP_ADDR): three pages plus one, just below
# the BIOS area at the top of the 32-bit space, inside the MMIO gap.
KVM_TSS_ADDRESS = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000
# KVM_CREATE_PIT2 flag: emulate the PC speaker port as a dummy (linux/kvm.h).
KVM_PIT_SPEAKER_DUMMY = 1
SECTOR_SIZE = 512
# How often the MMDS stacks look for unacknowledged TCP data to send again.
MMDS_TIMER_INTERVAL_S = 0.5


@dataclass
class VirtioSlot:
    transport: MmioTransport
    base: int
    irq: int
    irqfd: int
    ioeventfds: list[int] = field(default_factory=list)


@dataclass
class Machine:
    """Everything one running VM owns; `close()` releases it all."""

    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    event_loop: EventLoop
    console: Console
    serial: Serial
    i8042: I8042
    pio_bus: Bus
    mmio_bus: Bus
    fallback: InstructionFallback | None
    boot_timer: BootTimer | None = None
    vcpu_threads: list[VcpuThread] = field(default_factory=list)
    blocks: dict[str, Block] = field(default_factory=dict)
    virtio_slots: list[VirtioSlot] = field(default_factory=list)
    eventfds: list[int] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    cmdline: str = ""
    rng: Rng | None = None
    balloon: Balloon | None = None
    vsock: Vsock | None = None
    nets: dict[str, Net] = field(default_factory=dict)
    # Host resources of the entropy, balloon and vsock devices, closed after the event loop.
    closers: list[Callable[[], None]] = field(default_factory=list)

    def start(self) -> None:
        self.event_loop.start()
        for thread in self.vcpu_threads:
            thread.start()

    def replace_drive_file(self, drive_id: str, path_on_host: str) -> None:
        block = self.blocks.get(drive_id)
        if block is None:
            raise StartError(f"drive {drive_id!r} is not attached to the running microVM")
        fd = _open_drive_file(path_on_host, block.read_only)
        self.files.append(fd)
        block.backend = FileBackend(fd)
        block.update_capacity()
        for slot in self.virtio_slots:
            if slot.transport.device is block and block.is_activated:
                slot.transport.interrupt.signal_config_change()

    def update_drive_rate_limiter(self, drive_id: str, config: dict[str, Any]) -> None:
        """Apply the rate limiter of PATCH /drives to a running drive, creating it if absent."""
        block = self.blocks.get(drive_id)
        if block is None:
            raise StartError(f"drive {drive_id!r} is not attached to the running microVM")
        if block.update_rate_limiter(config):
            return
        transport = next(
            slot.transport for slot in self.virtio_slots if slot.transport.device is block
        )
        with block.lock:
            block.rate_limiter = _block_rate_limiter(self, block, transport, config)

    def update_net_rate_limiters(self, iface_id: str, body: dict[str, Any]) -> None:
        """Apply the rate limiters of PATCH /network-interfaces to a running interface."""
        net = self.nets.get(iface_id)
        if net is None:
            raise StartError(f"network interface {iface_id!r} is not attached to the running "
                             "microVM")
        with net.lock:
            for attribute in ("rx_rate_limiter", "tx_rate_limiter"):
                config = body.get(attribute)
                if config is None:
                    continue
                limiter = getattr(net, attribute)
                if limiter is not None:
                    limiter.update(config)
                else:
                    setattr(net, attribute, _net_rate_limiter(self, net, config))

    def close(self) -> None:
        self.event_loop.close()
        for close in self.closers:
            close()
        self.console.close()
        for thread in self.vcpu_threads:
            thread.vcpu.close()
        for fd in self.eventfds + self.files:
            try:
                os.close(fd)
            except OSError:
                pass
        self.vm.close()
        self.kvm.close()
        self.memory.close()


def build_machine(owner: MicroVm, resources: VmResources) -> Machine:
    """Create and wire the VM; raise StartError with the reason on any failure."""
    try:
        return _build(owner, resources)
    except (KvmError, GuestMemoryError, KernelLoaderError, BootParamsError, OSError,
            ValueError) as error:
        raise StartError(f"cannot build the microVM: {error}") from error


def _build(owner: MicroVm, resources: VmResources) -> Machine:
    machine = _create_machine(owner, resources)
    try:
        _attach_devices(machine, owner, resources)
        machine.cmdline = _compose_cmdline(
            owner.default_boot_args(resources), resources, machine
        )
        entry = _write_boot_structures(machine, resources)
        _create_vcpus(owner, machine, resources, entry)
        machine.console.attach(machine.serial, machine.event_loop)
    except BaseException:
        # A failed InstanceStart leaves no fd, socket file or mapping behind.
        machine.close()
        raise
    if machine.boot_timer is not None:
        machine.boot_timer.start_clock()
    log.info("kernel command line: %s", machine.cmdline)
    return machine


def _create_machine(owner: MicroVm, resources: VmResources) -> Machine:
    """Create the KVM VM, guest memory and the legacy devices every microVM has."""
    with contextlib.ExitStack() as cleanup:
        kvm = Kvm()
        cleanup.callback(kvm.close)
        vm = kvm.create_vm()
        cleanup.callback(vm.close)
        vm.set_tss_address(KVM_TSS_ADDRESS)
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        vm.create_irqchip()
        vm.create_pit2(KVM_PIT_SPEAKER_DUMMY)

        mem_size = resources.machine_config.mem_size_mib << 20
        try:
            memory = GuestMemory(layout.guest_ram_ranges(mem_size))
        except OSError as error:
            raise StartError(f"machine-config: mem_size_mib: cannot map "
                             f"{resources.machine_config.mem_size_mib} MiB of guest memory: "
                             f"{error.strerror}") from error
        cleanup.callback(memory.close)
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(
                slot, region.guest_base, region.size, region.host_address
            )

        event_loop = EventLoop(name="fc_vmm")
        cleanup.callback(event_loop.close)
        console = Console(owner.console_input, owner.console_output, owner.on_console_output)
        eventfds: list[int] = []
        cleanup.callback(_close_fds, eventfds)
        pio_bus, mmio_bus = Bus("pio"), Bus("mmio")
        serial = Serial(_irq_trigger(vm, eventfds, layout.SERIAL_COM1_IRQ), console.write_output)
        pio_bus.insert(serial, layout.SERIAL_COM1_PORT, layout.SERIAL_PORT_COUNT)
        i8042 = I8042(_irq_trigger(vm, eventfds, layout.I8042_IRQ), owner.on_guest_reset)
        pio_bus.insert(i8042, layout.I8042_DATA_PORT, 5)
        boot_timer = None
        if owner.boot_timer_enabled:
            boot_timer = BootTimer()
            mmio_bus.insert(boot_timer, layout.BOOT_TIMER_ADDRESS, layout.BOOT_TIMER_SIZE)

        machine = Machine(
            kvm=kvm,
            vm=vm,
            memory=memory,
            event_loop=event_loop,
            console=console,
            serial=serial,
            i8042=i8042,
            pio_bus=pio_bus,
            mmio_bus=mmio_bus,
            fallback=owner.fallback_for(memory),
            boot_timer=boot_timer,
            eventfds=eventfds,
        )
        cleanup.pop_all()
    return machine


def _attach_devices(machine: Machine, owner: MicroVm, resources: VmResources) -> None:
    def irq_trigger(gsi: int) -> Callable[[], None]:
        return _irq_trigger(machine.vm, machine.eventfds, gsi)

    for drive in resources.drives:
        _attach_drive(machine, drive, irq_trigger)
    _attach_entropy_balloon_vsock(machine, resources, irq_trigger)
    mmds_service = _mmds_service(resources)
    for iface in resources.network_interfaces:
        _attach_net(machine, iface, resources, mmds_service, irq_trigger)


def _irq_trigger(vm: Vm, eventfds: list[int], gsi: int) -> Callable[[], None]:
    """Return a callable that raises `gsi` in the guest through a new irqfd."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    eventfds.append(fd)
    vm.irqfd(fd, gsi)
    return lambda: os.eventfd_write(fd, 1)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _open_drive_file(path: str, read_only: bool) -> int:
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except OSError as error:
        raise StartError(f"cannot open drive file {path}: {error.strerror}") from error


def _attach_drive(machine: Machine, drive: Drive, irq_trigger) -> None:
    index = len(machine.virtio_slots)
    base, irq = layout.virtio_mmio_slot(index)
    fd = _open_drive_file(drive.path_on_host, drive.is_read_only)
    machine.files.append(fd)
    block = Block(drive.drive_id, FileBackend(fd), drive.is_read_only, drive.cache_type)
    trigger = irq_trigger(irq)
    transport = MmioTransport(block, machine.memory, trigger)
    block.rate_limiter = _block_rate_limiter(machine, block, transport, drive.rate_limiter)
    machine.mmio_bus.insert(transport, base, layout.VIRTIO_MMIO_SIZE)
    slot = VirtioSlot(transport, base, irq, machine.eventfds[-1])
    for queue_index in range(len(block.queue_max_sizes)):
        fd_notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        machine.eventfds.append(fd_notify)
        machine.vm.ioeventfd(fd_notify, base + QUEUE_NOTIFY_OFFSET, 4, queue_index)
        machine.event_loop.add_reader(
            fd_notify, _queue_notifier(fd_notify, transport, queue_index)
        )
        slot.ioeventfds.append(fd_notify)
    machine.virtio_slots.append(slot)
    machine.blocks[drive.drive_id] = block


def _block_rate_limiter(
    machine: Machine, block: Block, transport: MmioTransport, config: dict[str, Any] | None
) -> RateLimiter | None:
    """Build a drive's limiter whose timerfd restarts the request queue; None if unlimited."""
    limiter = RateLimiter.from_config(config)
    if limiter is None:
        return None
    machine.closers.append(limiter.close)

    def on_rate_limiter_timer() -> None:
        if block.on_rate_limiter_timer():
            transport.notify(0)

    machine.event_loop.add_reader(limiter.timer_fd, on_rate_limiter_timer)
    return limiter


def _queue_notifier(fd: int, transport: MmioTransport, queue_index: int):
    def notify() -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        transport.notify(queue_index)

    return notify


def _compose_cmdline(base_args: str, resources: VmResources, machine: Machine) -> str:
    """Append the root device and one virtio_mmio.device= entry per device.

    The entries serve kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and
    no ACPI; a kernel that also reads the DSDT finds the same devices there
    first, and its command-line duplicates then fail to claim the busy ranges.
    """
    parts = [base_args.strip()]
    root = next((drive for drive in resources.drives if drive.is_root_device), None)
    if root is not None and "root=" not in base_args:
        mode = "ro" if root.is_read_only else "rw"
        device = f"PARTUUID={root.partuuid}" if root.partuuid else "/dev/vda"
        parts.append(f"root={device} {mode}")
    for slot in machine.virtio_slots:
        parts.append(f"virtio_mmio.device=4K@{slot.base:#x}:{slot.irq}")
    return " ".join(part for part in parts if part)


def _write_boot_structures(machine: Machine, resources: VmResources) -> int:
    memory = machine.memory
    boot_source = resources.boot_source
    assert boot_source is not None
    kernel = load_kernel(memory, boot_source.kernel_image_path)
    initrd = None
    if boot_source.initrd_path:
        initrd = load_initrd(memory, boot_source.initrd_path, kernel.initrd_addr_max(), kernel)
    vcpu_count = resources.machine_config.vcpu_count
    devices = [(slot.base, layout.VIRTIO_MMIO_SIZE, slot.irq) for slot in machine.virtio_slots]
    write_mptable(memory, vcpu_count)
    rsdp_address = write_acpi_tables(memory, vcpu_count, devices)
    try:
        write_cmdline(memory, machine.cmdline)
    except BootParamsError as error:
        raise BootParamsError(f"boot-source: boot_args with the monitor's additions: {error}"
                              ) from error
    setup_data_address = write_setup_data(memory, [rng_seed_entry(os.urandom(32))])
    e820 = build_e820([(region.guest_base, region.size) for region in memory.regions])
    write_zero_page(
        memory,
        kernel,
        cmdline_address=layout.CMDLINE_START,
        cmdline_size=len(machine.cmdline) + 1,
        initrd=initrd,
        e820=e820,
        setup_data_address=setup_data_address,
        acpi_rsdp_address=rsdp_address,
    )
    return kernel.entry


def _create_vcpus(owner: MicroVm, machine: Machine, resources: VmResources, entry: int) -> None:
    config = resources.machine_config
    supported = machine.kvm.get_supported_cpuid()
    tsc_deadline = bool(machine.kvm.check_extension(KvmCap.TSC_DEADLINE_TIMER))
    for index in range(config.vcpu_count):
        vcpu = machine.vm.create_vcpu(index)
        cpuid = normalize_cpuid(
            supported, index, config.vcpu_count, config.smt, tsc_deadline=tsc_deadline
        )
        vcpu.set_cpuid2(cpuid)
        setup_msrs(vcpu)
        setup_regs(vcpu, entry, layout.ZERO_PAGE_START)
        setup_sregs(vcpu, machine.memory)
        setup_fpu(vcpu)
        setup_lapic(vcpu)
        machine.vcpu_threads.append(
            VcpuThread(
                index,
                vcpu,
                machine.pio_bus,
                machine.mmio_bus,
                machine.fallback,
                owner.on_vcpu_stop,
            )
        )


# Entropy, balloon and vsock devices ----------------------------------------------------------


def _attach_virtio_device(machine: Machine, device: VirtioDevice, irq_trigger) -> MmioTransport:
    """Place `device` in the next virtio-mmio slot with its irqfd and one ioeventfd per queue."""
    index = len(machine.virtio_slots)
    base, irq = layout.virtio_mmio_slot(index)
    transport = MmioTransport(device, machine.memory, irq_trigger(irq))
    machine.mmio_bus.insert(transport, base, layout.VIRTIO_MMIO_SIZE)
    slot = VirtioSlot(transport, base, irq, machine.eventfds[-1])
    for queue_index in range(len(device.queue_max_sizes)):
        fd_notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        machine.eventfds.append(fd_notify)
        machine.vm.ioeventfd(fd_notify, base + QUEUE_NOTIFY_OFFSET, 4, queue_index)
        machine.event_loop.add_reader(
            fd_notify, _queue_notifier(fd_notify, transport, queue_index)
        )
        slot.ioeventfds.append(fd_notify)
    machine.virtio_slots.append(slot)
    return transport


def _attach_entropy_balloon_vsock(machine: Machine, resources: VmResources, irq_trigger) -> None:
    if resources.entropy is not None:
        _attach_entropy(machine, resources.entropy, irq_trigger)
    if resources.balloon is not None:
        _attach_balloon(machine, resources.balloon, irq_trigger)
    if resources.vsock is not None:
        _attach_vsock(machine, resources.vsock, irq_trigger)


def _attach_entropy(machine: Machine, config: dict[str, Any], irq_trigger) -> None:
    limiter = RateLimiter.from_config(config.get("rate_limiter"))
    rng = Rng(rate_limiter=limiter)
    transport = _attach_virtio_device(machine, rng, irq_trigger)
    machine.rng = rng
    if limiter is None:
        return
    machine.closers.append(limiter.close)

    def on_rate_limiter_timer() -> None:
        if rng.on_rate_limiter_timer():
            transport.notify(0)

    machine.event_loop.add_reader(limiter.timer_fd, on_rate_limiter_timer)


def _attach_balloon(machine: Machine, config: dict[str, Any], irq_trigger) -> None:
    if config.get("free_page_hinting"):
        raise StartError(
            "balloon: free_page_hinting is not supported by this build; set it to false "
            "(free_page_reporting is supported)"
        )
    interval_s = int(config.get("stats_polling_interval_s", 0))
    timer = TimerFd() if interval_s > 0 else None
    balloon = Balloon(
        config["amount_mib"],
        bool(config["deflate_on_oom"]),
        interval_s,
        bool(config.get("free_page_reporting", False)),
        timer,
    )
    _attach_virtio_device(machine, balloon, irq_trigger)
    machine.balloon = balloon
    if timer is None:
        return
    machine.closers.append(timer.close)

    def on_stats_timer() -> None:
        if timer.read_expirations():
            balloon.on_stats_timer()

    machine.event_loop.add_reader(timer.fileno(), on_stats_timer)


def _attach_vsock(machine: Machine, config: dict[str, Any], irq_trigger) -> None:
    uds_path = config["uds_path"]
    try:
        backend = UnixVsockBackend(uds_path)
    except OSError as error:
        raise StartError(f"vsock: cannot listen on uds_path {uds_path}: {error}") from error
    vsock = Vsock(config["guest_cid"], backend)
    backend.attach(vsock)
    _attach_virtio_device(machine, vsock, irq_trigger)
    machine.vsock = vsock
    machine.closers.append(vsock.close)
    machine.closers.append(backend.close)
    machine.event_loop.add_reader(backend.fileno(), backend.handle_events)


# Network interfaces and MMDS ----------------------------------------------------------------


def _mmds_service(resources: VmResources) -> MmdsService | None:
    """Return the MMDS service when MMDS is configured; it reads the API's data store."""
    config = resources.mmds_config
    if config is None:
        return None
    return MmdsService(
        data_source=lambda: resources.mmds_data,
        version=MmdsVersion(config.get("version", MmdsVersion.V1)),
        imds_compat=bool(config.get("imds_compat", False)),
    )


def _attach_net(
    machine: Machine,
    iface: dict[str, Any],
    resources: VmResources,
    mmds_service: MmdsService | None,
    irq_trigger,
) -> None:
    """Open the interface's tap and attach a virtio-net device for it in the next slot."""
    iface_id = iface["iface_id"]
    tap = Tap(iface["host_dev_name"])
    machine.closers.append(tap.close)
    mmds = None
    config = resources.mmds_config
    if mmds_service is not None and config is not None:
        if iface_id in config["network_interfaces"]:
            address = config.get("ipv4_address") or DEFAULT_IPV4_ADDRESS
            mmds = MmdsStack(mmds_service, address)
    guest_mac = parse_mac(iface["guest_mac"]) if iface.get("guest_mac") else None
    net = Net(iface_id, tap, guest_mac, iface.get("mtu"), mmds)
    net.on_rx_interest = _tap_watcher(machine.event_loop, tap, net)
    net.rx_rate_limiter = _net_rate_limiter(machine, net, iface.get("rx_rate_limiter"))
    net.tx_rate_limiter = _net_rate_limiter(machine, net, iface.get("tx_rate_limiter"))
    if mmds is not None:
        machine.event_loop.add_periodic(MMDS_TIMER_INTERVAL_S, net.process_mmds_timers)
    _attach_virtio_device(machine, net, irq_trigger)
    machine.nets[iface_id] = net


def _tap_watcher(event_loop: EventLoop, tap: Tap, net: Net) -> Callable[[bool], None]:
    """Return the callable that adds the tap to the event loop for `net`, or removes it."""

    def set_interest(wanted: bool) -> None:
        if wanted:
            event_loop.add_reader(tap.fileno(), net.process_backend)
        else:
            event_loop.remove_reader(tap.fileno())

    return set_interest


def _net_rate_limiter(
    machine: Machine, net: Net, config: dict[str, Any] | None
) -> RateLimiter | None:
    limiter = RateLimiter.from_config(config)
    if limiter is None:
        return None
    machine.closers.append(limiter.close)
    machine.event_loop.add_reader(limiter.timer_fd, lambda: net.on_rate_limiter_timer(limiter))
    return limiter
