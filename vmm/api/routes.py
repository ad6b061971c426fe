"""The API's routes: method, path template, controller handler and boot phase.

spec/api.yaml lists the same routes with the same phases (`x-boot-phase`);
tests/unit/test_spec_api.py checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BootPhase(StrEnum):
    """When a route is accepted: before InstanceStart, after it, or in both phases."""

    PRE_BOOT = "pre-boot"
    POST_BOOT = "post-boot"
    ANY = "any"


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    handler: str
    phase: BootPhase

    @property
    def resource(self) -> str:
        """Name used in error messages: the path without its id, e.g. "drives"."""
        parts = [part for part in self.template.split("/") if part and part[0] != "{"]
        return "/".join(parts) or "/"


_PRE = BootPhase.PRE_BOOT
_POST = BootPhase.POST_BOOT
_ANY = BootPhase.ANY

ROUTES: tuple[Route, ...] = (
    Route("GET", "/", "get_instance_info", _ANY),
    # The controller checks the phase of each action type.
    Route("PUT", "/actions", "put_action", _ANY),
    Route("GET", "/balloon", "get_balloon", _ANY),
    Route("PUT", "/balloon", "put_balloon", _PRE),
    Route("PATCH", "/balloon", "patch_balloon", _POST),
    Route("GET", "/balloon/statistics", "get_balloon_statistics", _POST),
    Route("PATCH", "/balloon/statistics", "patch_balloon_statistics", _POST),
    Route("PATCH", "/balloon/hinting/start", "patch_balloon_hinting_start", _POST),
    Route("GET", "/balloon/hinting/status", "get_balloon_hinting_status", _POST),
    Route("PATCH", "/balloon/hinting/stop", "patch_balloon_hinting_stop", _POST),
    Route("PUT", "/boot-source", "put_boot_source", _PRE),
    Route("PUT", "/cpu-config", "put_cpu_config", _PRE),
    Route("PUT", "/drives/{drive_id}", "put_drive", _PRE),
    Route("PATCH", "/drives/{drive_id}", "patch_drive", _POST),
    Route("PUT", "/entropy", "put_entropy", _PRE),
    Route("GET", "/hotplug/memory", "get_memory_hotplug", _POST),
    Route("PUT", "/hotplug/memory", "put_memory_hotplug", _PRE),
    Route("PATCH", "/hotplug/memory", "patch_memory_hotplug", _POST),
    Route("PUT", "/logger", "put_logger", _PRE),
    Route("GET", "/machine-config", "get_machine_config", _ANY),
    Route("PUT", "/machine-config", "put_machine_config", _PRE),
    Route("PATCH", "/machine-config", "patch_machine_config", _PRE),
    Route("PUT", "/metrics", "put_metrics", _PRE),
    Route("GET", "/mmds", "get_mmds", _ANY),
    Route("PUT", "/mmds", "put_mmds", _ANY),
    Route("PATCH", "/mmds", "patch_mmds", _ANY),
    Route("PUT", "/mmds/config", "put_mmds_config", _PRE),
    Route("PUT", "/network-interfaces/{iface_id}", "put_network_interface", _PRE),
    Route("PATCH", "/network-interfaces/{iface_id}", "patch_network_interface", _POST),
    Route("PUT", "/pmem/{id}", "put_pmem", _PRE),
    Route("PATCH", "/pmem/{id}", "patch_pmem", _POST),
    Route("PUT", "/serial", "put_serial", _PRE),
    Route("PUT", "/snapshot/create", "put_snapshot_create", _POST),
    Route("PUT", "/snapshot/load", "put_snapshot_load", _PRE),
    Route("GET", "/version", "get_version", _ANY),
    Route("PATCH", "/vm", "patch_vm", _POST),
    Route("GET", "/vm/config", "get_vm_config", _ANY),
    Route("PUT", "/vsock", "put_vsock", _PRE),
)


class RouteError(Exception):
    """No route has this method and path; the API returns 400 with this message."""


def _split(path: str) -> list[str]:
    return path.split("/")[1:] if path != "/" else []


_TEMPLATES: list[tuple[list[str], Route]] = [(_split(r.template), r) for r in ROUTES]


def match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """Find the route for `method` and `path` (query string removed); return it and its ids.

    A path parameter matches one segment, which may be empty: the controller rejects empty
    and malformed ids with their own messages.
    """
    path = path.split("?", 1)[0]
    segments = _split(path)
    for template_segments, route in _TEMPLATES:
        if route.method != method or len(template_segments) != len(segments):
            continue
        params = _match_segments(template_segments, segments)
        if params is not None:
            return route, params
    raise RouteError(f"Invalid request method and/or path: {method} {path}.")


def _match_segments(template: list[str], segments: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for expected, actual in zip(template, segments):
        if expected.startswith("{"):
            params[expected[1:-1]] = actual
        elif expected != actual:
            return None
    return params
