"""spec/api.yaml against the router: same routes, same boot phases, a valid OpenAPI 3.1."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate

from vmm.api.routes import ROUTES, BootPhase
from vmm.api.validation import SPEC_PATH
from vmm.controller import Controller
from vmm.resources import MAX_MEM_SIZE_MIB, MAX_VCPU_COUNT, MIN_MEM_SIZE_MIB, MIN_VCPU_COUNT

HTTP_METHODS = {"get", "put", "patch", "post", "delete"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    with open(SPEC_PATH, "rb") as spec_file:
        return yaml.safe_load(spec_file)


def spec_operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def test_spec_is_valid_openapi_31(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_every_route_in_spec_and_back(spec: dict[str, Any]) -> None:
    routed = {(route.method, route.template) for route in ROUTES}
    specified = set(spec_operations(spec))
    assert routed - specified == set()
    assert specified - routed == set()


def test_boot_phases_match(spec: dict[str, Any]) -> None:
    operations = spec_operations(spec)
    for route in ROUTES:
        assert operations[(route.method, route.template)]["x-boot-phase"] == route.phase, route


def test_every_route_has_a_handler() -> None:
    for route in ROUTES:
        assert callable(getattr(Controller, route.handler, None)), route.handler


def test_firecracker_paths_present(spec: dict[str, Any]) -> None:
    expected = {
        "/", "/actions", "/balloon", "/balloon/statistics", "/balloon/hinting/start",
        "/balloon/hinting/status", "/balloon/hinting/stop", "/boot-source", "/cpu-config",
        "/drives/{drive_id}", "/entropy", "/hotplug/memory", "/logger", "/machine-config",
        "/metrics", "/mmds", "/mmds/config", "/network-interfaces/{iface_id}", "/pmem/{id}",
        "/serial", "/snapshot/create", "/snapshot/load", "/version", "/vm", "/vm/config",
        "/vsock",
    }
    assert set(spec["paths"]) == expected


def test_request_schemas_reject_unknown_fields(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for (method, path), operation in spec_operations(spec).items():
        body = operation.get("requestBody")
        if body is None:
            continue
        name = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        expected = name != "MmdsContentsObject"
        assert (schemas[name].get("additionalProperties") is False) == expected, (method, path)


def test_error_schema_is_fault_message(spec: dict[str, Any]) -> None:
    error = spec["components"]["schemas"]["Error"]
    assert error["properties"] == {"fault_message": {
        "type": "string", "description": error["properties"]["fault_message"]["description"]}}
    for (method, path), operation in spec_operations(spec).items():
        default = operation["responses"]["default"]["$ref"]
        assert default == "#/components/responses/Error", (method, path)


def test_machine_limits_match_resources(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["VcpuCount"]["minimum"] == MIN_VCPU_COUNT
    assert schemas["VcpuCount"]["maximum"] == MAX_VCPU_COUNT
    assert schemas["MemSizeMib"]["minimum"] == MIN_MEM_SIZE_MIB
    assert schemas["MemSizeMib"]["maximum"] == MAX_MEM_SIZE_MIB


def test_phases_are_known_values(spec: dict[str, Any]) -> None:
    values = {operation["x-boot-phase"] for operation in spec_operations(spec).values()}
    assert values == {phase.value for phase in BootPhase}
