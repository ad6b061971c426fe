"""Controller rules without a socket: boot phases, optional runtime features, config files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_api_support import FakeRuntime
from vmm.controller import NOT_SUPPORTED_POST_BOOT, NOT_SUPPORTED_PRE_BOOT, Controller, VmState
from vmm.errors import ConfigError
from vmm.resources import VmResources


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return path


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1024))
    return path


def call(controller: Controller, method: str, path: str,
         body: Any = None) -> tuple[int, dict | None]:
    raw = b"" if body is None else json.dumps(body).encode()
    return controller.handle(method, path, raw)


def booted(kernel: Path, runtime: FakeRuntime | None = None) -> Controller:
    controller = Controller(VmResources(), runtime or FakeRuntime())
    assert call(controller, "PUT", "/boot-source", {"kernel_image_path": str(kernel)})[0] == 204
    assert controller.start_instance() == (204, None)
    return controller


def fault(response: tuple[int, dict | None]) -> str:
    status, body = response
    assert status == 400, body
    assert body is not None
    return body["fault_message"]


def test_start_without_boot_source_rejected() -> None:
    runtime = FakeRuntime()
    controller = Controller(VmResources(), runtime)
    assert "without kernel configuration" in fault(controller.start_instance())
    assert runtime.calls == []
    assert controller.state == VmState.NOT_STARTED


def test_start_error_is_400_and_state_unchanged(kernel: Path) -> None:
    runtime = FakeRuntime(start_error="network interface eth0: not supported by this build")
    controller = Controller(VmResources(), runtime)
    call(controller, "PUT", "/boot-source", {"kernel_image_path": str(kernel)})
    assert "eth0" in fault(controller.start_instance())
    assert controller.state == VmState.NOT_STARTED


def test_runtime_exception_is_500(kernel: Path) -> None:
    class Broken(FakeRuntime):
        def start(self, resources: VmResources) -> None:
            raise RuntimeError("boom")

    controller = Controller(VmResources(), Broken())
    call(controller, "PUT", "/boot-source", {"kernel_image_path": str(kernel)})
    status, body = controller.start_instance()
    assert status == 500
    assert body is not None and "boom" in body["fault_message"]
    assert call(controller, "GET", "/")[0] == 200


def test_flush_metrics_only_after_boot(kernel: Path) -> None:
    controller = Controller(VmResources(), FakeRuntime())
    action = {"action_type": "FlushMetrics"}
    assert fault(call(controller, "PUT", "/actions", action)) == NOT_SUPPORTED_PRE_BOOT
    runtime = FakeRuntime()
    controller = booted(kernel, runtime)
    assert call(controller, "PUT", "/actions", action) == (204, None)
    assert ("flush_metrics", ()) in runtime.calls


@pytest.mark.parametrize("method, path, body", [
    ("PUT", "/boot-source", {"kernel_image_path": "/x"}),
    ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"}),
    ("PUT", "/entropy", {}),
    ("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False}),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
    ("PUT", "/logger", {"level": "Info"}),
    ("PUT", "/metrics", {"metrics_path": "/tmp/m"}),
    ("PATCH", "/machine-config", {"vcpu_count": 2}),
    ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"}),
])
def test_pre_boot_calls_rejected_after_boot(kernel: Path, method: str, path: str,
                                            body: dict) -> None:
    controller = booted(kernel)
    assert fault(call(controller, method, path, body)) == NOT_SUPPORTED_POST_BOOT


@pytest.mark.parametrize("method, path, body", [
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PATCH", "/balloon", {"amount_mib": 1}),
    ("GET", "/balloon/statistics", None),
    ("PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m"}),
    ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}),
    ("GET", "/hotplug/memory", None),
])
def test_post_boot_calls_rejected_before_boot(method: str, path: str, body: dict | None) -> None:
    controller = Controller(VmResources(), FakeRuntime())
    assert fault(call(controller, method, path, body)) == NOT_SUPPORTED_PRE_BOOT


def test_unbacked_devices_are_stored(tmp_path: Path) -> None:
    controller = Controller(VmResources(), FakeRuntime())
    requests = [
        ("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                      "guest_mac": "06:00:AC:10:00:02"}),
        ("/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}),
        ("/balloon", {"amount_mib": 16, "deflate_on_oom": True}),
        ("/entropy", {"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}),
        ("/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"}),
    ]
    for path, body in requests:
        assert call(controller, "PUT", path, body) == (204, None), path
    config = controller.resources.vm_config()
    assert config["network-interfaces"][0]["host_dev_name"] == "tap0"
    assert config["vsock"]["guest_cid"] == 3
    assert config["balloon"]["amount_mib"] == 16
    assert config["entropy"]["rate_limiter"]["bandwidth"]["size"] == 1000
    assert config["mmds-config"]["network_interfaces"] == ["eth0"]
    status, balloon = call(controller, "GET", "/balloon")
    assert status == 200
    assert balloon == {"amount_mib": 16, "deflate_on_oom": True}


def test_get_balloon_without_device_rejected() -> None:
    controller = Controller(VmResources(), FakeRuntime())
    assert "no balloon device" in fault(call(controller, "GET", "/balloon"))


def test_mmds_config_needs_known_interface() -> None:
    controller = Controller(VmResources(), FakeRuntime())
    message = fault(call(controller, "PUT", "/mmds/config", {"network_interfaces": ["eth9"]}))
    assert "'eth9'" in message


def test_mmds_put_patch_get() -> None:
    controller = Controller(VmResources(), FakeRuntime(), mmds_size_limit=200)
    assert call(controller, "PUT", "/mmds", {"a": {"b": 1, "c": 2}}) == (204, None)
    assert call(controller, "PATCH", "/mmds", {"a": {"b": None, "d": [1]}}) == (204, None)
    assert call(controller, "GET", "/mmds") == (200, {"a": {"c": 2, "d": [1]}})
    message = fault(call(controller, "PUT", "/mmds", {"big": "x" * 300}))
    assert "200 bytes" in message
    assert call(controller, "GET", "/mmds") == (200, {"a": {"c": 2, "d": [1]}})


def test_pause_without_runtime_support_rejected(kernel: Path) -> None:
    controller = booted(kernel)
    assert "pausing the microVM is not supported" in fault(
        call(controller, "PATCH", "/vm", {"state": "Paused"}))
    assert controller.state == VmState.RUNNING


def test_pause_and_resume_with_runtime_support(kernel: Path) -> None:
    class Pausable(FakeRuntime):
        def pause(self) -> None:
            self.calls.append(("pause", ()))

        def resume(self) -> None:
            self.calls.append(("resume", ()))

    runtime = Pausable()
    controller = booted(kernel, runtime)
    assert call(controller, "PATCH", "/vm", {"state": "Paused"}) == (204, None)
    assert call(controller, "GET", "/")[1]["state"] == "Paused"  # type: ignore[index]
    assert call(controller, "PATCH", "/vm", {"state": "Resumed"}) == (204, None)
    assert [name for name, _args in runtime.calls] == ["start", "pause", "resume"]


def test_snapshot_create_needs_paused_vm(kernel: Path) -> None:
    controller = booted(kernel)
    body = {"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}
    assert "must be paused" in fault(call(controller, "PUT", "/snapshot/create", body))


def test_snapshot_load_needs_unconfigured_vm(kernel: Path) -> None:
    controller = Controller(VmResources(), FakeRuntime())
    call(controller, "PATCH", "/machine-config", {"vcpu_count": 2})
    body = {"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}
    assert "logger and metrics" in fault(call(controller, "PUT", "/snapshot/load", body))


def test_metrics_path_set_once(tmp_path: Path) -> None:
    controller = Controller(VmResources(), FakeRuntime())
    body = {"metrics_path": str(tmp_path / "metrics.json")}
    assert call(controller, "PUT", "/metrics", body) == (204, None)
    assert "cannot be changed" in fault(call(controller, "PUT", "/metrics", body))
    from_cli = Controller(VmResources(), FakeRuntime(), metrics_path="/tmp/cli-metrics")
    assert "--metrics-path" in fault(call(from_cli, "PUT", "/metrics", body))


@pytest.mark.usefixtures("restore_vmm_logger")
def test_logger_put_writes_to_file(tmp_path: Path) -> None:
    log_path = tmp_path / "vmm.log"
    controller = Controller(VmResources(), FakeRuntime(), instance_id="log-test")
    body = {"log_path": str(log_path), "level": "debug", "show_level": True}
    assert call(controller, "PUT", "/logger", body) == (204, None)
    call(controller, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    text = log_path.read_text()
    assert "[log-test:" in text
    assert ":INFO] API request PUT /machine-config" in text
    assert "level: 'Loud'" in fault(call(controller, "PUT", "/logger", {"level": "Loud"}))


def test_patch_drive_rate_limiter_unsupported(kernel: Path, disk: Path) -> None:
    runtime = FakeRuntime()
    controller = Controller(VmResources(), runtime)
    call(controller, "PUT", "/drives/d1", {"drive_id": "d1", "path_on_host": str(disk),
                                           "is_root_device": False})
    call(controller, "PUT", "/boot-source", {"kernel_image_path": str(kernel)})
    controller.start_instance()
    body = {"drive_id": "d1", "rate_limiter": {"ops": {"size": 10, "refill_time": 10}}}
    assert "rate_limiter" in fault(call(controller, "PATCH", "/drives/d1", body))
    assert "'d9'" in fault(call(controller, "PATCH", "/drives/d9", {"drive_id": "d9"}))
    assert [name for name, _args in runtime.calls] == ["start"]


def test_apply_config_then_start(kernel: Path, disk: Path) -> None:
    runtime = FakeRuntime()
    controller = Controller(VmResources(), runtime)
    config = {
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"},
        "drives": [{"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "network-interfaces": [],
        "vsock": None,
    }
    controller.apply_config(config)
    assert controller.start_instance() == (204, None)
    assert runtime.started_with is not None
    assert runtime.started_with.machine_config.vcpu_count == 2
    assert runtime.started_with.drives[0].drive_id == "rootfs"


def test_vm_config_round_trips_as_config(kernel: Path, disk: Path) -> None:
    first = Controller(VmResources(), FakeRuntime())
    first.apply_config({
        "boot-source": {"kernel_image_path": str(kernel)},
        "drives": [{"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True,
                    "partuuid": "0eaa91a0-01"}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "T2"},
        "balloon": {"amount_mib": 8, "deflate_on_oom": True},
    })
    exported = first.resources.vm_config()
    second = Controller(VmResources(), FakeRuntime())
    second.apply_config(exported)
    assert second.resources.vm_config() == exported


@pytest.mark.parametrize("config, fragment", [
    ([], "JSON object"),
    ({"machine_config": {}}, "unknown key 'machine_config'"),
    ({"drives": {"drive_id": "x"}}, "drives: expected a list"),
    ({"drives": [{"path_on_host": "/x"}]}, 'drives[0]: expected an object with a string '
                                           '"drive_id"'),
    ({"machine-config": {"vcpu_count": 64, "mem_size_mib": 1}},
     "machine-config: machine-config: vcpu_count: 64 is greater than the maximum of 32"),
])
def test_apply_config_errors_name_key(config: Any, fragment: str) -> None:
    controller = Controller(VmResources(), FakeRuntime())
    with pytest.raises(ConfigError) as caught:
        controller.apply_config(config)
    assert fragment in str(caught.value)
