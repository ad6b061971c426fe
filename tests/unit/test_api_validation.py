"""Request validation generated from spec/api.yaml: wording of the errors and the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vmm.api import validation
from vmm.api.validation import RequestValidationError, SpecValidator, get_validator


def error_for(method: str, template: str, body: object) -> str:
    with pytest.raises(RequestValidationError) as caught:
        get_validator().validate_body(method, template, "label", body)
    return str(caught.value)


@pytest.mark.parametrize("body, expected", [
    ({"vcpu_count": 0, "mem_size_mib": 1}, "label: vcpu_count: 0 is less than the minimum of 1"),
    ({"vcpus": 1, "vcpu_count": 1, "mem_size_mib": 1}, 'label: unknown field "vcpus"'),
    ({"mem_size_mib": 1}, 'label: missing required field "vcpu_count"'),
    ({"vcpu_count": 1.0, "mem_size_mib": 1}, 'label: vcpu_count: 1.0 is not of type "integer"'),
    ({"vcpu_count": True, "mem_size_mib": 1}, 'label: vcpu_count: true is not of type "integer"'),
    ({"vcpu_count": 1, "mem_size_mib": 1, "huge_pages": "1G"},
     'label: huge_pages: "1G" is not one of "None", "Transparent", "2M"'),
    ([1, 2], 'label: [1, 2] is not of type "object"'),
])
def test_machine_config_messages(body: object, expected: str) -> None:
    assert error_for("PUT", "/machine-config", body).startswith(expected)


def test_unknown_field_lists_valid_fields() -> None:
    message = error_for("PUT", "/boot-source", {"kernel_image_path": "/k", "kernel": "/k"})
    assert 'unknown field "kernel"' in message
    assert "valid fields: boot_args, initrd_path, kernel_image_path" in message


def test_nested_field_path_named() -> None:
    body = {"drive_id": "d", "is_root_device": False,
            "rate_limiter": {"bandwidth": {"size": -1, "refill_time": 5}}}
    assert error_for("PUT", "/drives/{drive_id}", body) == (
        "label: rate_limiter.bandwidth.size: -1 is less than the minimum of 0")


def test_array_index_named() -> None:
    body = {"network_interfaces": ["eth0", 5]}
    assert error_for("PUT", "/mmds/config", body) == (
        'label: network_interfaces[1]: 5 is not of type "string"')


def test_empty_patch_rejected() -> None:
    assert "at least one field" in error_for("PATCH", "/machine-config", {})


def test_snapshot_load_needs_one_memory_source() -> None:
    both = {"snapshot_path": "/s", "mem_file_path": "/m",
            "mem_backend": {"backend_type": "File", "backend_path": "/m"}}
    assert "Exactly one of mem_file_path and mem_backend" in error_for(
        "PUT", "/snapshot/load", both)
    assert "Exactly one of" in error_for("PUT", "/snapshot/load", {"snapshot_path": "/s"})


def test_valid_bodies_pass() -> None:
    validator = get_validator()
    validator.validate_body("PUT", "/machine-config", "m",
                            {"vcpu_count": 2, "mem_size_mib": 128, "smt": True,
                             "cpu_template": "None", "huge_pages": "2M"})
    validator.validate_body("PUT", "/mmds", "mmds", {"any": {"nested": [1, None]}})
    validator.validate_body("PUT", "/network-interfaces/{iface_id}", "n",
                            {"iface_id": "eth0", "host_dev_name": "tap0",
                             "guest_mac": "06:00:ac:10:00:02", "mtu": 1500})


def test_operation_without_body_ignores_body() -> None:
    get_validator().validate_body("GET", "/", "root", {"anything": 1})


def test_spec_cache_written_and_used(tmp_path: Path) -> None:
    spec_copy = tmp_path / "api.yaml"
    shutil.copy(validation.SPEC_PATH, spec_copy)
    first = validation.load_spec(spec_copy)
    caches = list((tmp_path / "__pycache__").glob("api.*.json"))
    assert len(caches) == 1
    assert json.loads(caches[0].read_text()) == first
    caches[0].write_text(json.dumps({"marker": True}))
    assert validation.load_spec(spec_copy) == {"marker": True}


def test_validator_from_loaded_spec_matches_global() -> None:
    fresh = SpecValidator(validation.load_spec())
    with pytest.raises(RequestValidationError, match="vcpu_count"):
        fresh.validate_schema("MachineConfiguration", "m", {"vcpu_count": 99,
                                                            "mem_size_mib": 1})
