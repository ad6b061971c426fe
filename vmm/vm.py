"""The microVM runtime: builds a VM from its resources, boots it, and reports how it ended.

`MicroVm` is what the API controller calls on InstanceStart. It creates the KVM
VM, guest memory, legacy and virtio devices with their ioeventfds and irqfds,
writes the boot structures, and starts the event-loop thread and one thread per
vCPU. `wait()` returns the process exit code:

    0  the guest reset (i8042 pulse, reboot, panic with reboot=k) or shut down
    1  the VM could not be built, or a vCPU stopped on an error
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.emulation import (
    EMULATING_HOST_BOOT_ARGS,
    INIT_DIED_MARKER,
    HostKind,
    InstructionFallback,
    detect_host_kind,
)
from vmm.console import Console
from vmm.devices.bus import Bus
from vmm.errors import StartError
from vmm.eventloop import EventLoop
from vmm.metrics import FLUSH_INTERVAL_S, Metrics
from vmm.resources import DEFAULT_BOOT_ARGS, VmResources
from vmm.vcpu import KICK_SIGNAL, StopReason, VcpuThread, install_kick_handler, wait_all

if TYPE_CHECKING:
    from vmm.builder import Machine
    from vmm.kvm.structs import ExitReason
    from vmm.kvm.system import Vcpu
    from vmm.devices.virtio.balloon import Balloon
    from vmm.metrics import Provider

log = logging.getLogger(__name__)

# `kill -USR2 PID` logs every vCPU's registers; the guest keeps running.
STATE_DUMP_SIGNAL = signal.SIGUSR2

EXIT_OK = 0
EXIT_ERROR = 1

# Devices this build can create; any other configured device fails InstanceStart.
_UNSUPPORTED_DEVICE_FIELDS: dict[str, str] = {}


@dataclass
class BootFigures:
    """Timestamps of one boot, for the log, metrics and budget tests."""

    instance_start_monotonic: float = 0.0
    instance_start_cpu: float = 0.0
    build_ms: float = 0.0


# How long pause() waits for every vCPU thread to leave KVM_RUN and park.
PAUSE_TIMEOUT_S = 5.0


class PauseGate:
    """Holds vCPU threads between two KVM_RUN calls while the microVM is paused.

    Pausing and resuming
    --------------------
    Each vCPU thread calls `hold()` before every KVM_RUN (through `_GatedVcpu`). To pause,
    the monitor closes the gate, then sets ``immediate_exit`` and sends each vCPU thread
    KICK_SIGNAL, as stopping does (see vmm.vcpu): a KVM_RUN in progress returns EINTR, the
    thread loops back to `hold()` and waits there, outside the guest. `pause()` returns
    once every thread is parked, so no guest instruction runs after it returns. Resuming
    clears ``immediate_exit`` and opens the gate. `release()` opens it for good when the
    VM stops, so a paused VM can still shut down.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._paused = False
        self._released = False
        self._parked = 0

    def hold(self) -> None:
        """Wait while the gate is closed; return at once when it is open."""
        with self._condition:
            if not self._paused or self._released:
                return
            self._parked += 1
            self._condition.notify_all()
            while self._paused and not self._released:
                self._condition.wait()
            self._parked -= 1

    def close(self) -> None:
        """Make threads that reach hold() wait there."""
        with self._condition:
            self._paused = True

    def open(self) -> None:
        """Let parked threads run again."""
        with self._condition:
            self._paused = False
            self._condition.notify_all()

    def release(self) -> None:
        """Open the gate and never close it again (the VM is stopping)."""
        with self._condition:
            self._released = True
            self._condition.notify_all()

    def wait_parked(self, count: int, timeout_s: float) -> bool:
        """Wait until `count` threads wait in hold(); return False on timeout or release."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while self._parked < count and not self._released:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return not self._released


class _GatedVcpu:
    """A Vcpu whose run() first passes the pause gate; every other attribute is the Vcpu's."""

    def __init__(self, vcpu: Vcpu, gate: PauseGate) -> None:
        self._vcpu = vcpu
        self._gate = gate

    def run(self) -> ExitReason:
        self._gate.hold()
        return self._vcpu.run()

    def __getattr__(self, name: str) -> object:
        return getattr(self._vcpu, name)


@dataclass
class _StopState:
    event: threading.Event = field(default_factory=threading.Event)
    exit_code: int = EXIT_OK
    reason: StopReason | None = None
    detail: str = ""


class MicroVm:
    """The runtime the API controller drives; one VM per process, as in Firecracker."""

    def __init__(
        self,
        instance_id: str = "anonymous-instance",
        boot_timer: bool = False,
        metrics_path: str | None = None,
        console_input: BinaryIO | None = None,
        console_output: BinaryIO | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.boot_timer_enabled = boot_timer
        self.metrics = Metrics()
        if metrics_path:
            self.metrics.open(metrics_path)
        self.console_input = console_input if console_input is not None else sys.stdin.buffer
        self.console_output = console_output if console_output is not None else sys.stdout.buffer
        self.host_kind = detect_host_kind()
        self.figures = BootFigures()
        self._stop = _StopState()
        self._machine: Machine | None = None
        self._init_death_reported = False
        self._pause_gate = PauseGate()
        self.pause_latencies_us: dict[str, int] = {}
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()
            signal.signal(STATE_DUMP_SIGNAL, self._on_state_dump_signal)

    # --- Runtime interface used by vmm.controller ------------------------------------------

    def start(self, resources: VmResources) -> None:
        """Build the VM and start its vCPUs; raise StartError naming what failed."""
        self._check_supported(resources)
        self.figures.instance_start_monotonic = time.monotonic()
        self.figures.instance_start_cpu = time.process_time()
        if self.host_kind is HostKind.EMULATING:
            log.warning(
                "this host's KVM runs guest supervisor code in a software emulator (no "
                "VMX/SVM): adding kernel parameters that avoid instructions it cannot run, "
                "completing FWAIT and INT3 in the monitor, and guest user space cannot run"
            )
        from vmm.builder import build_machine  # deferred: keeps API start-up light

        self._machine = build_machine(self, resources)
        self.figures.build_ms = (time.monotonic() - self.figures.instance_start_monotonic) * 1e3
        self._register_metrics(self._machine)
        for thread in self._machine.vcpu_threads:
            thread.vcpu = _GatedVcpu(thread.vcpu, self._pause_gate)  # type: ignore[assignment]
        # Everything that touches the machine comes before its start: a guest that resets at
        # once lets the main thread close the machine while this thread is still here.
        self.metrics.flush()
        self._machine.event_loop.add_periodic(FLUSH_INTERVAL_S, self.metrics.flush)
        self._machine.start()
        log.info("microVM started in %.1f ms", self.figures.build_ms)

    def send_ctrl_alt_del(self) -> None:
        if self._machine is None:
            raise StartError("the microVM is not running")
        self._machine.i8042.trigger_ctrl_alt_del()

    def update_drive(self, drive_id: str, path_on_host: str | None) -> None:
        if self._machine is None or path_on_host is None:
            return
        self._machine.replace_drive_file(drive_id, path_on_host)

    def update_drive_rate_limiter(self, drive_id: str, config: dict) -> None:
        """Apply PATCH /drives `rate_limiter` to a running drive.

        Before boot there is nothing to do: InstanceStart builds the stored limiter.
        """
        if self._machine is None:
            return
        self._machine.update_drive_rate_limiter(drive_id, config)

    def flush_metrics(self) -> None:
        self.metrics.flush()

    def configure_metrics(self, path: str) -> None:
        """Direct metrics lines to `path` (PUT /metrics); raise ValueError if it cannot open."""
        self.metrics.open(path)

    def pause(self) -> None:
        """Stop every vCPU outside KVM_RUN; raise StartError if one does not stop in time."""
        machine = self._running_machine()
        began = time.monotonic()
        self._pause_gate.close()
        for thread in machine.vcpu_threads:
            thread.kick()
        if not self._pause_gate.wait_parked(len(machine.vcpu_threads), PAUSE_TIMEOUT_S):
            self._resume_threads(machine)
            raise StartError(
                f"pausing failed: not every vCPU left KVM_RUN within {PAUSE_TIMEOUT_S} s, "
                "or the microVM is stopping; the microVM keeps running"
            )
        self.pause_latencies_us["vmm_pause_vm"] = int((time.monotonic() - began) * 1e6)
        log.info("paused %d vCPUs", len(machine.vcpu_threads))

    def resume(self) -> None:
        """Let the vCPUs held by pause() enter KVM_RUN again."""
        machine = self._running_machine()
        began = time.monotonic()
        self._resume_threads(machine)
        self.pause_latencies_us["vmm_resume_vm"] = int((time.monotonic() - began) * 1e6)
        log.info("resumed %d vCPUs", len(machine.vcpu_threads))

    def _resume_threads(self, machine: Machine) -> None:
        if not self._stop.event.is_set():
            for thread in machine.vcpu_threads:
                thread.vcpu.request_immediate_exit(False)
        self._pause_gate.open()

    def _running_machine(self) -> Machine:
        if self._machine is None or self._stop.event.is_set():
            raise StartError("the microVM is not running")
        return self._machine

    def _running_balloon(self) -> Balloon:
        if self._machine is None or self._machine.balloon is None:
            raise StartError("no balloon device is running in the microVM")
        return self._machine.balloon

    def update_balloon(self, amount_mib: int) -> None:
        """Set a new balloon target; before boot the controller's stored value is enough."""
        if self._machine is None:
            return
        self._running_balloon().update_target(amount_mib)

    def balloon_statistics(self) -> dict[str, int]:
        return self._running_balloon().statistics()

    def update_balloon_statistics(self, interval_s: int) -> None:
        if self._machine is None:
            return
        try:
            self._running_balloon().update_statistics_interval(interval_s)
        except ValueError as error:
            raise StartError(str(error)) from error

    def update_network_interface(self, iface_id: str, body: dict) -> None:
        """Apply PATCH /network-interfaces (rx and tx rate limiters) to a running interface."""
        if self._machine is None:
            return
        self._machine.update_net_rate_limiters(iface_id, body)

    def wait(self) -> int:
        self._stop.event.wait()
        self._teardown()
        return self._stop.exit_code

    def shutdown(self, exit_code: int) -> None:
        self._request_stop(StopReason.REQUESTED, "shutdown requested", exit_code)

    # --- Internals -------------------------------------------------------------------------

    def default_boot_args(self, resources: VmResources) -> str:
        boot_source = resources.boot_source
        args = boot_source.boot_args if boot_source and boot_source.boot_args else DEFAULT_BOOT_ARGS
        if self.host_kind is HostKind.EMULATING:
            args = f"{args} {EMULATING_HOST_BOOT_ARGS}"
        return args

    def fallback_for(self, memory: object) -> InstructionFallback | None:
        if self.host_kind is HostKind.EMULATING:
            return InstructionFallback(memory)  # type: ignore[arg-type]
        return None

    def on_console_output(self, data: bytes, tail: bytes) -> None:
        if self._init_death_reported or self.host_kind is not HostKind.EMULATING:
            return
        if INIT_DIED_MARKER in tail:
            self._init_death_reported = True
            log.error(
                "the guest's init died: on this host (KVM emulating guest supervisor code, "
                "no VMX/SVM) guest user space cannot run, so the first system call of "
                "init faults; the guest kernel booted up to the hand-over to init"
            )

    def on_guest_reset(self) -> None:
        self._request_stop(StopReason.RESET, "the guest reset the machine (i8042)", EXIT_OK)

    def on_vcpu_stop(self, index: int, reason: StopReason, detail: str) -> None:
        code = EXIT_ERROR if reason is StopReason.ERROR else EXIT_OK
        if reason is StopReason.ERROR:
            log.error("vcpu %d stopped: %s", index, detail)
        self._request_stop(reason, detail, code)

    def _on_state_dump_signal(self, _signum: int, _frame: object) -> None:
        machine = self._machine
        if machine is not None:
            for thread in machine.vcpu_threads:
                thread.request_state_dump()

    def _request_stop(self, reason: StopReason, detail: str, exit_code: int) -> None:
        if self._stop.event.is_set():
            return
        self._stop.reason, self._stop.detail, self._stop.exit_code = reason, detail, exit_code
        log.info("microVM stopping: %s (%s), exit code %d", reason.value, detail, exit_code)
        if self._machine is not None:
            for thread in self._machine.vcpu_threads:
                thread.stop()
        self._pause_gate.release()
        self._stop.event.set()

    def _check_supported(self, resources: VmResources) -> None:
        if resources.boot_source is None:
            raise StartError("Cannot start microvm without kernel configuration.")
        for attribute, device in _UNSUPPORTED_DEVICE_FIELDS.items():
            if getattr(resources, attribute, None):
                raise StartError(
                    f"a {device} is configured, but this build of the monitor cannot create "
                    "it yet; remove it from the configuration"
                )

    def _register_metrics(self, machine: Machine) -> None:
        def vcpu_metrics() -> dict[str, int | float]:
            totals: dict[str, int | float] = {}
            for thread in machine.vcpu_threads:
                for name, value in thread.counters.by_reason.items():
                    key = f"exit_{name.lower()}"
                    totals[key] = totals.get(key, 0) + value
            return totals

        self.metrics.register("vcpu", vcpu_metrics)
        if machine.fallback is not None:
            fallback = machine.fallback
            self.metrics.register(
                "emulation",
                lambda: {
                    "fwait_completed": fallback.counters.fwait,
                    "int3_delivered": fallback.counters.int3,
                    "failed": fallback.counters.failed,
                },
            )
        self.metrics.register("uart", machine.console.metrics)
        self.metrics.register("i8042", lambda: {"reset_count": machine.i8042.reset_count})
        self.metrics.register("latencies_us", lambda: dict(self.pause_latencies_us))
        self._register_device_metrics(machine)

    def _register_device_metrics(self, machine: Machine) -> None:
        for group, device in (
            ("entropy", machine.rng), ("balloon", machine.balloon), ("vsock", machine.vsock)
        ):
            if device is not None:
                self.metrics.register(group, _counters_of(device))
        for drive_id, block in machine.blocks.items():
            self.metrics.register("block", _block_counters(block))
            self.metrics.register(f"block_{drive_id}", _block_counters(block))
        for iface_id, net in machine.nets.items():
            self.metrics.register("net", net.metrics_snapshot)
            self.metrics.register(f"net_{iface_id}", net.metrics_snapshot)
            if net.mmds is not None:
                self.metrics.register("mmds", net.mmds.metrics_snapshot)

    def _teardown(self) -> None:
        machine = self._machine
        if machine is None:
            return
        wait_all(machine.vcpu_threads, timeout_s=5.0)
        self.metrics.flush()
        self._log_summary(machine)
        machine.close()
        self.metrics.close()
        self._machine = None

    def _log_summary(self, machine: Machine) -> None:
        exits: dict[str, int] = {}
        for thread in machine.vcpu_threads:
            for name, value in thread.counters.by_reason.items():
                exits[name] = exits.get(name, 0) + value
        fallback = machine.fallback
        fallbacks = (
            f"fwait={fallback.counters.fwait} int3={fallback.counters.int3}"
            if fallback is not None
            else "none (hardware virtualisation)"
        )
        uptime_s = time.monotonic() - self.figures.instance_start_monotonic
        log.info(
            "microVM ran %.1f s; vcpu exits: %s (total %d); emulation fallbacks: %s",
            uptime_s,
            " ".join(f"{name}={count}" for name, count in sorted(exits.items())),
            sum(exits.values()),
            fallbacks,
        )



def _block_counters(block: object) -> Provider:
    """Return a provider mapping a block device's counters to Firecracker's field names."""

    def provider() -> dict[str, int | float]:
        counters = block.metrics  # type: ignore[attr-defined]
        return {
            "read_bytes": counters.read_bytes,
            "read_count": counters.read_count,
            "write_bytes": counters.write_bytes,
            "write_count": counters.write_count,
            "flush_count": counters.flush_count,
            "execute_fails": counters.io_errors,
            "invalid_reqs_count": counters.invalid_requests + counters.unsupported_requests,
            "rate_limiter_throttled_events": counters.rate_limiter_throttled_events,
            "rate_limiter_event_count": counters.rate_limiter_event_count,
        }

    return provider


def _counters_of(device: object) -> Provider:
    """Return a metrics provider reading the dataclass `device.metrics` as a dict."""

    def provider() -> dict[str, int | float]:
        return asdict(device.metrics)  # type: ignore[attr-defined]

    return provider
