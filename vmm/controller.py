"""The API controller: routes requests, enforces the boot phases and updates VmResources.

Requests are handled one at a time (a lock serialises them, as Firecracker's single VMM
thread does). Each request goes through the same steps: find the route, parse and
validate the JSON body against spec/api.yaml, check the ids in the path, check that the
operation is allowed in the current state, then run the handler. Every failure becomes
(400, {"fault_message": ...}); an unexpected exception becomes 500 and is logged, so bad
input never stops the monitor.

Some operations need a runtime feature beyond the Runtime protocol below (pause, snapshot,
balloon, hotplug). They call an optional runtime method for it when the runtime has one.
Otherwise they fail with 400 and a message that this build does not support them.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from typing import Any, Callable, Protocol

import vmm
from vmm import logger as vmm_logger
from vmm.api import routes
from vmm.api.routes import BootPhase, Route
from vmm.errors import ConfigError, StartError
from vmm.metrics import Metrics
from vmm.resources import VmResources

log = logging.getLogger(__name__)

APP_NAME = "vmm"
# The Firecracker API version whose paths, bodies and status codes this monitor implements;
# GET /version returns it so that clients that gate features on it work.
FIRECRACKER_API_VERSION = "1.12.1"
DEFAULT_INSTANCE_ID = "anonymous-instance"
DEFAULT_MMDS_SIZE_LIMIT = 51200
# Deepest nesting of arrays and objects in a request body: serde_json's default recursion
# limit, which Firecracker's API parser uses. Deeper bodies would overflow Python's stack.
MAX_JSON_DEPTH = 128

# Firecracker's wording for the phase errors; clients match these strings.
NOT_SUPPORTED_PRE_BOOT = "The requested operation is not supported before starting the microVM."
NOT_SUPPORTED_POST_BOOT = "The requested operation is not supported after starting the microVM."

Response = tuple[int, dict | None]
NO_CONTENT: Response = (204, None)


class Runtime(Protocol):
    """Interface of the VM runtime (vmm.vm.MicroVm) that the controller drives."""

    def start(self, resources: VmResources) -> None:
        """Build and boot the VM; raise StartError with a message for the API client."""

    def send_ctrl_alt_del(self) -> None: ...

    def update_drive(self, drive_id: str, path_on_host: str | None) -> None:
        """Re-open a drive's backing file after boot (None: keep the path, re-read size)."""

    def flush_metrics(self) -> None: ...

    def wait(self) -> int:
        """Block until the VM has ended; return the process exit code."""

    def shutdown(self, exit_code: int) -> None: ...


class VmState(enum.StrEnum):
    """Boot state as GET / reports it."""

    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"


class ApiError(Exception):
    """A request that fails with `status` and this message as fault_message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# Config-file keys, the order they are applied in, and the request each becomes. The
# network interfaces come before mmds-config, which names them; the path id of a list
# entry is its id field.
_CONFIG_REQUESTS: tuple[tuple[str, str, str | None], ...] = (
    ("logger", "/logger", None),
    ("metrics", "/metrics", None),
    ("machine-config", "/machine-config", None),
    ("cpu-config", "/cpu-config", None),
    ("boot-source", "/boot-source", None),
    ("drives", "/drives/{drive_id}", "drive_id"),
    ("pmem", "/pmem/{id}", "id"),
    ("network-interfaces", "/network-interfaces/{iface_id}", "iface_id"),
    ("vsock", "/vsock", None),
    ("balloon", "/balloon", None),
    ("entropy", "/entropy", None),
    ("memory-hotplug", "/hotplug/memory", None),
    ("mmds-config", "/mmds/config", None),
)

_MAX_ID_LENGTH = 64

# Firecracker's API request counters: (method, path template) -> (metrics group, field
# prefix). A request adds 1 to `<prefix>_count`, and a failed PUT or PATCH also adds 1 to
# `<prefix>_fails`. Requests Firecracker does not count (balloon, entropy, snapshots,
# PATCH /vm) are not counted here either.
_REQUEST_COUNTERS: dict[tuple[str, str], tuple[str, str]] = {
    ("GET", "/"): ("get_api_requests", "instance_info"),
    ("GET", "/machine-config"): ("get_api_requests", "machine_cfg"),
    ("GET", "/mmds"): ("get_api_requests", "mmds"),
    ("GET", "/version"): ("get_api_requests", "vmm_version"),
    ("GET", "/hotplug/memory"): ("get_api_requests", "hotplug_memory"),
    ("PUT", "/actions"): ("put_api_requests", "actions"),
    ("PUT", "/boot-source"): ("put_api_requests", "boot_source"),
    ("PUT", "/drives/{drive_id}"): ("put_api_requests", "drive"),
    ("PUT", "/logger"): ("put_api_requests", "logger"),
    ("PUT", "/machine-config"): ("put_api_requests", "machine_cfg"),
    ("PUT", "/cpu-config"): ("put_api_requests", "cpu_cfg"),
    ("PUT", "/metrics"): ("put_api_requests", "metrics"),
    ("PUT", "/network-interfaces/{iface_id}"): ("put_api_requests", "network"),
    ("PUT", "/mmds"): ("put_api_requests", "mmds"),
    ("PUT", "/vsock"): ("put_api_requests", "vsock"),
    ("PUT", "/pmem/{id}"): ("put_api_requests", "pmem"),
    ("PUT", "/serial"): ("put_api_requests", "serial"),
    ("PUT", "/hotplug/memory"): ("put_api_requests", "hotplug_memory"),
    ("PATCH", "/drives/{drive_id}"): ("patch_api_requests", "drive"),
    ("PATCH", "/network-interfaces/{iface_id}"): ("patch_api_requests", "network"),
    ("PATCH", "/machine-config"): ("patch_api_requests", "machine_cfg"),
    ("PATCH", "/mmds"): ("patch_api_requests", "mmds"),
    ("PATCH", "/hotplug/memory"): ("patch_api_requests", "hotplug_memory"),
}


class RequestCounters:
    """Per-group API request counters, read by the metrics writer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.groups: dict[str, dict[str, int]] = {
            "get_api_requests": {}, "put_api_requests": {}, "patch_api_requests": {},
        }
        self.latencies_us: dict[str, int] = {}

    def count(self, method: str, template: str, failed: bool) -> None:
        """Count one request to a route; failures of GET requests have no counter."""
        found = _REQUEST_COUNTERS.get((method, template))
        if found is None:
            return
        group, prefix = found
        with self._lock:
            counters = self.groups[group]
            counters[f"{prefix}_count"] = counters.get(f"{prefix}_count", 0) + 1
            if failed and method != "GET":
                counters[f"{prefix}_fails"] = counters.get(f"{prefix}_fails", 0) + 1

    def provider(self, group: str) -> Callable[[], dict[str, int]]:
        """Return a metrics provider for one of the request groups or latencies_us."""

        def read() -> dict[str, int]:
            with self._lock:
                source = self.latencies_us if group == "latencies_us" else self.groups[group]
                return dict(source)

        return read

    def register_with(self, metrics: Metrics) -> None:
        """Register the request groups and latencies_us with `metrics`."""
        for group in (*self.groups, "latencies_us"):
            metrics.register(group, self.provider(group))


def check_resource_id(name: str, value: str) -> None:
    """Raise ApiError unless a path id is non-empty, short, and letters, digits or `_`."""
    if not value:
        raise ApiError(f"Empty ID in path: {name} must not be empty.")
    if len(value) > _MAX_ID_LENGTH:
        raise ApiError(f"{name}: {value[:16]!r}... is longer than {_MAX_ID_LENGTH} characters")
    if not all(char == "_" or char.isalnum() for char in value):
        raise ApiError(
            f"{name}: {value!r} is invalid; API resource IDs can only contain alphanumeric "
            "characters and underscores"
        )


class Controller:
    """Applies API requests to a VmResources and drives the runtime through boot states."""

    def __init__(
        self,
        resources: VmResources,
        runtime: Runtime,
        *,
        instance_id: str = DEFAULT_INSTANCE_ID,
        mmds_size_limit: int = DEFAULT_MMDS_SIZE_LIMIT,
        metrics_path: str | None = None,
    ) -> None:
        self.resources = resources
        self.runtime = runtime
        self.instance_id = instance_id
        self.mmds_size_limit = mmds_size_limit
        # --metrics-path on the command line sets the metrics output once and for all.
        self.cli_metrics_path = metrics_path
        self.state = VmState.NOT_STARTED
        self.request_counters = RequestCounters()
        runtime_metrics = getattr(runtime, "metrics", None)
        if isinstance(runtime_metrics, Metrics):
            self.request_counters.register_with(runtime_metrics)
        self._lock = threading.Lock()

    # Entry points -----------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes) -> Response:
        """Run one API request; return (HTTP status, JSON body or None).

        Every Exception becomes a 400 or 500 response; only BaseException such as
        KeyboardInterrupt propagates.
        """
        try:
            with self._lock:
                return self._dispatch(method, path, body)
        except (ApiError, ConfigError, StartError, routes.RouteError) as error:
            status = getattr(error, "status", 400)
            log.info("API request %s %s failed (%d): %s", method, path, status, error)
            return status, {"fault_message": str(error)}
        except Exception as error:
            log.exception("API request %s %s failed with an internal error", method, path)
            return 500, {"fault_message": f"internal error in {method} {path}: {error!r}"}

    def apply_config(self, config: Any) -> None:
        """Apply a config file's contents as the equivalent PUT requests.

        Raises ConfigError naming the key (and list index) and the problem. Does not
        start the VM.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"config file: the top level must be a JSON object, not "
                              f"{type(config).__name__}")
        known = {key for key, _path, _id in _CONFIG_REQUESTS}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"config file: unknown key {unknown[0]!r}; valid keys: "
                              f"{', '.join(sorted(known))}")
        for key, template, id_field in _CONFIG_REQUESTS:
            value = config.get(key)
            if value is None:
                continue
            if id_field is None:
                self._apply_config_request(key, template, value)
                continue
            if not isinstance(value, list):
                raise ConfigError(f"config file: {key}: expected a list, not "
                                  f"{type(value).__name__}")
            for index, item in enumerate(value):
                self._apply_config_list_item(f"{key}[{index}]", template, id_field, item)

    def start_instance(self) -> Response:
        """Send InstanceStart as the API would."""
        return self.handle("PUT", "/actions", b'{"action_type": "InstanceStart"}')

    def _apply_config_list_item(self, label: str, template: str, id_field: str,
                                item: Any) -> None:
        if not isinstance(item, dict) or not isinstance(item.get(id_field), str):
            raise ConfigError(f'config file: {label}: expected an object with a string '
                              f'"{id_field}" field')
        path = template.replace("{" + id_field + "}", item[id_field])
        self._apply_config_request(label, path, item)

    def _apply_config_request(self, label: str, path: str, value: Any) -> None:
        status, body = self.handle("PUT", path, json.dumps(value).encode())
        if status >= 300:
            message = body["fault_message"] if body else f"status {status}"
            raise ConfigError(f"config file: {label}: {message}")

    # Dispatch ---------------------------------------------------------------------------

    def _dispatch(self, method: str, path: str, raw_body: bytes) -> Response:
        route, params = routes.match(method, path)
        failed = True
        try:
            body = self._parse_body(route, raw_body)
            for name, value in params.items():
                check_resource_id(name, value)
            self._check_phase(route.phase)
            handler: Callable[[dict[str, str], Any], Response] = getattr(self, route.handler)
            if method != "GET":
                log.info("API request %s %s", method, path)
            response = handler(params, body)
            failed = response[0] >= 300
            return response
        finally:
            self.request_counters.count(method, route.template, failed)

    def _parse_body(self, route: Route, raw_body: bytes) -> Any:
        from vmm.api import validation

        found = validation.request_body_of(validation.get_spec(), route.method, route.template)
        if found is None:
            return None
        if not raw_body.strip():
            if found[1]:
                raise ApiError(f"{route.resource}: the request body is missing; "
                               "send a JSON object")
            return {}
        body = _decode_json(route.resource, raw_body)
        try:
            validation.get_validator().validate(found[0], route.resource, body)
        except validation.RequestValidationError as error:
            raise ApiError(str(error)) from None
        return body

    def _check_phase(self, phase: BootPhase) -> None:
        started = self.state != VmState.NOT_STARTED
        if phase == BootPhase.PRE_BOOT and started:
            raise ApiError(NOT_SUPPORTED_POST_BOOT)
        if phase == BootPhase.POST_BOOT and not started:
            raise ApiError(NOT_SUPPORTED_PRE_BOOT)

    def _optional_runtime_call(self, name: str, what: str, *args: Any) -> Any:
        function = getattr(self.runtime, name, None)
        if function is None:
            raise ApiError(f"{what} is not supported by this build")
        return function(*args)

    # Instance ---------------------------------------------------------------------------

    def get_instance_info(self, _params: dict[str, str], _body: None) -> Response:
        return 200, {
            "app_name": APP_NAME,
            "id": self.instance_id,
            "state": str(self.state),
            "vmm_version": vmm.__version__,
        }

    def get_version(self, _params: dict[str, str], _body: None) -> Response:
        return 200, {"firecracker_version": FIRECRACKER_API_VERSION}

    def get_vm_config(self, _params: dict[str, str], _body: None) -> Response:
        return 200, self.resources.vm_config()

    def put_action(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        action = body["action_type"]
        if action == "InstanceStart":
            self._check_phase(BootPhase.PRE_BOOT)
            return self._start()
        self._check_phase(BootPhase.POST_BOOT)
        if action == "SendCtrlAltDel":
            self.runtime.send_ctrl_alt_del()
        else:
            self.runtime.flush_metrics()
        return NO_CONTENT

    def _start(self) -> Response:
        if self.resources.boot_source is None:
            raise ApiError("Cannot start microvm without kernel configuration: "
                           "PUT /boot-source first.")
        self.runtime.start(self.resources)
        self.state = VmState.RUNNING
        log.info("microVM %s started", self.instance_id)
        return NO_CONTENT

    def patch_vm(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        """Pause or resume the vCPUs; asking for the current state again succeeds."""
        began = time.monotonic()
        if body["state"] == "Paused":
            if self.state != VmState.PAUSED:
                self._optional_runtime_call("pause", "pausing the microVM")
            self.state = VmState.PAUSED
            latency = "pause_vm"
        else:
            if self.state != VmState.RUNNING:
                self._optional_runtime_call("resume", "resuming the microVM")
            self.state = VmState.RUNNING
            latency = "resume_vm"
        self.request_counters.latencies_us[latency] = int((time.monotonic() - began) * 1e6)
        log.info("microVM %s %s", self.instance_id, self.state.value.lower())
        return NO_CONTENT

    # Machine and boot source ------------------------------------------------------------

    def get_machine_config(self, _params: dict[str, str], _body: None) -> Response:
        return 200, self.resources.machine_config.to_dict()

    def put_machine_config(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.set_machine_config(body)
        return NO_CONTENT

    def patch_machine_config(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.update_machine_config(body)
        return NO_CONTENT

    def put_boot_source(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.set_boot_source(body)
        return NO_CONTENT

    def put_cpu_config(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.set_cpu_config(body)
        return NO_CONTENT

    # Block and pmem devices -------------------------------------------------------------

    def put_drive(self, params: dict[str, str], body: dict[str, Any]) -> Response:
        _check_ids_match("drives", params["drive_id"], body["drive_id"])
        self.resources.put_drive(body)
        return NO_CONTENT

    def patch_drive(self, params: dict[str, str], body: dict[str, Any]) -> Response:
        drive_id = params["drive_id"]
        _check_ids_match("drives", drive_id, body["drive_id"])
        if self.resources.drive(drive_id) is None:
            raise ApiError(f"drives: no drive with drive_id {drive_id!r} is configured")
        path_on_host = body.get("path_on_host")
        rate_limiter = body.get("rate_limiter")
        if rate_limiter is not None and not hasattr(self.runtime, "update_drive_rate_limiter"):
            raise ApiError("drives: changing rate_limiter after boot is not supported by "
                           "this build")
        self.resources.update_drive(drive_id, path_on_host, rate_limiter)
        if path_on_host is not None:
            self.runtime.update_drive(drive_id, path_on_host)
        if rate_limiter is not None:
            self.runtime.update_drive_rate_limiter(drive_id, rate_limiter)  # type: ignore[attr-defined]
        return NO_CONTENT

    def put_pmem(self, params: dict[str, str], body: dict[str, Any]) -> Response:
        _check_ids_match("pmem", params["id"], body["id"])
        self.resources.put_pmem(body)
        return NO_CONTENT

    def patch_pmem(self, params: dict[str, str], body: dict[str, Any]) -> Response:
        _check_ids_match("pmem", params["id"], body["id"])
        if not any(pmem["id"] == params["id"] for pmem in self.resources.pmem):
            raise ApiError(f"pmem: no pmem device with id {params['id']!r} is configured")
        self._optional_runtime_call("update_pmem", "changing a pmem device after boot",
                                    params["id"], body)
        return NO_CONTENT

    # Network, vsock, entropy, serial ----------------------------------------------------

    def put_network_interface(self, params: dict[str, str], body: dict[str, Any]) -> Response:
        _check_ids_match("network-interfaces", params["iface_id"], body["iface_id"])
        self.resources.put_network_interface(body)
        return NO_CONTENT

    def patch_network_interface(self, params: dict[str, str],
                                body: dict[str, Any]) -> Response:
        iface_id = params["iface_id"]
        _check_ids_match("network-interfaces", iface_id, body["iface_id"])
        if self.resources.network_interface(iface_id) is None:
            raise ApiError(f"network-interfaces: no interface with iface_id {iface_id!r} "
                           "is configured")
        self._optional_runtime_call("update_network_interface",
                                    "changing network rate limiters", iface_id, body)
        return NO_CONTENT

    def put_vsock(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.set_vsock(body)
        return NO_CONTENT

    def put_entropy(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.set_entropy(body)
        return NO_CONTENT

    def put_serial(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.set_serial(body)
        return NO_CONTENT

    # Balloon ----------------------------------------------------------------------------

    def _balloon(self) -> dict[str, Any]:
        if self.resources.balloon is None:
            raise ApiError("balloon: no balloon device is configured; PUT /balloon first")
        return self.resources.balloon

    def get_balloon(self, _params: dict[str, str], _body: None) -> Response:
        return 200, dict(self._balloon())

    def put_balloon(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.set_balloon(body)
        return NO_CONTENT

    def patch_balloon(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self._balloon()
        if body["amount_mib"] > self.resources.machine_config.mem_size_mib:
            raise ApiError(f"balloon: amount_mib: {body['amount_mib']} is larger than the "
                           f"guest memory of {self.resources.machine_config.mem_size_mib} MiB")
        self._optional_runtime_call("update_balloon", "resizing the balloon",
                                    body["amount_mib"])
        self.resources.balloon = {**self._balloon(), "amount_mib": body["amount_mib"]}
        return NO_CONTENT

    def _check_balloon_statistics_enabled(self) -> None:
        if not self._balloon().get("stats_polling_interval_s"):
            raise ApiError("balloon: statistics are not enabled; set "
                           "stats_polling_interval_s above 0 in PUT /balloon before boot")

    def get_balloon_statistics(self, _params: dict[str, str], _body: None) -> Response:
        self._check_balloon_statistics_enabled()
        return 200, self._optional_runtime_call("balloon_statistics", "balloon statistics")

    def patch_balloon_statistics(self, _params: dict[str, str],
                                 body: dict[str, Any]) -> Response:
        self._check_balloon_statistics_enabled()
        interval = body["stats_polling_interval_s"]
        if interval == 0:
            raise ApiError("balloon/statistics: stats_polling_interval_s: 0 would disable "
                           "statistics, which cannot be turned off after boot")
        self._optional_runtime_call("update_balloon_statistics",
                                    "changing the balloon statistics interval", interval)
        self.resources.balloon = {**self._balloon(), "stats_polling_interval_s": interval}
        return NO_CONTENT

    def _check_hinting_enabled(self) -> None:
        if not self._balloon().get("free_page_hinting"):
            raise ApiError("balloon: free page hinting is not enabled; set "
                           "free_page_hinting in PUT /balloon before boot")

    def patch_balloon_hinting_start(self, _params: dict[str, str],
                                    body: dict[str, Any]) -> Response:
        self._check_hinting_enabled()
        self._optional_runtime_call("start_balloon_hinting", "free page hinting",
                                    bool(body.get("acknowledge_on_stop", False)))
        return NO_CONTENT

    def patch_balloon_hinting_stop(self, _params: dict[str, str], _body: None) -> Response:
        self._check_hinting_enabled()
        self._optional_runtime_call("stop_balloon_hinting", "free page hinting")
        return NO_CONTENT

    def get_balloon_hinting_status(self, _params: dict[str, str], _body: None) -> Response:
        self._check_hinting_enabled()
        return 200, self._optional_runtime_call("balloon_hinting_status", "free page hinting")

    # Memory hotplug ---------------------------------------------------------------------

    def put_memory_hotplug(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.set_memory_hotplug(body)
        return NO_CONTENT

    def _check_memory_hotplug(self) -> None:
        if self.resources.memory_hotplug is None:
            raise ApiError("hotplug/memory: no hotpluggable memory is configured; "
                           "PUT /hotplug/memory before boot")

    def patch_memory_hotplug(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self._check_memory_hotplug()
        self._optional_runtime_call("update_memory_hotplug", "memory hotplug", body)
        return NO_CONTENT

    def get_memory_hotplug(self, _params: dict[str, str], _body: None) -> Response:
        self._check_memory_hotplug()
        return 200, self._optional_runtime_call("memory_hotplug_status", "memory hotplug")

    # Logger and metrics -----------------------------------------------------------------

    def put_logger(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        try:
            vmm_logger.configure(
                self.instance_id,
                level=body.get("level", vmm_logger.DEFAULT_LEVEL),
                log_path=body.get("log_path"),
                show_level=body.get("show_level", False),
                show_log_origin=body.get("show_log_origin", False),
                module=body.get("module"),
            )
        except ValueError as error:
            raise ApiError(f"logger: {error}") from None
        self.resources.set_logger(body)
        return NO_CONTENT

    def put_metrics(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        if self.cli_metrics_path is not None:
            raise ApiError("metrics: the metrics output is already set to "
                           f"{self.cli_metrics_path!r} by --metrics-path; it cannot be changed")
        self.resources.set_metrics(body)
        configure = getattr(self.runtime, "configure_metrics", None)
        if configure is not None:
            try:
                configure(body["metrics_path"])
            except ValueError as error:
                self.resources.metrics = None
                raise ApiError(f"metrics: {error}") from None
        return NO_CONTENT

    # MMDS -------------------------------------------------------------------------------

    def get_mmds(self, _params: dict[str, str], _body: None) -> Response:
        return 200, json.loads(json.dumps(self.resources.mmds_data))

    def put_mmds(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.put_mmds(body, self.mmds_size_limit)
        return NO_CONTENT

    def patch_mmds(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.patch_mmds(body, self.mmds_size_limit)
        return NO_CONTENT

    def put_mmds_config(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        self.resources.set_mmds_config(body)
        return NO_CONTENT

    # Snapshots --------------------------------------------------------------------------

    def put_snapshot_create(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        if self.state != VmState.PAUSED:
            raise ApiError('snapshot/create: the microVM must be paused first: PATCH /vm '
                           'with {"state": "Paused"}')
        self._optional_runtime_call("create_snapshot", "creating snapshots", body)
        return NO_CONTENT

    def put_snapshot_load(self, _params: dict[str, str], body: dict[str, Any]) -> Response:
        if self.resources.has_boot_specific_config():
            raise ApiError("snapshot/load: loading a snapshot is allowed only before any "
                           "resource other than the logger and metrics is configured")
        self._optional_runtime_call("load_snapshot", "loading snapshots", body)
        self.state = VmState.RUNNING if body.get("resume_vm") else VmState.PAUSED
        return NO_CONTENT


def _decode_json(resource: str, raw_body: bytes) -> Any:
    try:
        text = raw_body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(f"{resource}: the request body is not UTF-8: {error}") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise ApiError(f"{resource}: the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(f"{resource}: the request body nests JSON arrays or objects deeper "
                       "than the parser's recursion limit") from None
    depth = _nesting_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(f"{resource}: the request body nests JSON arrays or objects {depth} "
                       f"levels deep; the limit is {MAX_JSON_DEPTH}")
    return value


def _nesting_depth(value: Any) -> int:
    """Return how many arrays and objects enclose the innermost value (0 for a scalar)."""
    deepest = 0
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            pending.extend((child, depth + 1) for child in item)
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _check_ids_match(resource: str, path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise ApiError(f"{resource}: the id from the path ({path_id!r}) does not match the "
                       f"id from the body ({body_id!r})")
