"""Request body validation generated from spec/api.yaml.

The spec is read once per process. Parsing YAML takes tens of milliseconds, so the parsed
spec is cached as JSON next to it (spec/__pycache__/api.<size>-<mtime>.json) and later
processes load that instead. Importing jsonschema takes about 0.1 s (measured on a 2-core
EPYC VM), so this module imports it only when the first request body needs checking.
The CLI calls warm_up_in_background() once the API socket is accepting.

Error messages name the resource, the field path and the broken rule, for example
`machine-config: vcpu_count: 0 is less than the minimum of 1` or
`machine-config: unknown field "vcpus"`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

SPEC_PATH = Path(__file__).resolve().parents[2] / "spec" / "api.yaml"
SPEC_URI = "urn:vmm:api-spec"

_lock = threading.Lock()
_spec: dict[str, Any] | None = None
_validator: SpecValidator | None = None


class RequestValidationError(ValueError):
    """A request body that breaks the spec; the message names the field and the rule."""


def _cache_path(spec_path: Path) -> Path:
    st = spec_path.stat()
    return spec_path.parent / "__pycache__" / f"{spec_path.stem}.{st.st_size}-{st.st_mtime_ns}.json"


def load_spec(spec_path: Path = SPEC_PATH) -> dict[str, Any]:
    """Return the parsed OpenAPI document, from the JSON cache when it is current."""
    cache = _cache_path(spec_path)
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    import yaml

    with open(spec_path, "rb") as spec_file:
        spec = yaml.load(spec_file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    _write_cache(cache, spec)
    return spec


def _write_cache(cache: Path, spec: dict[str, Any]) -> None:
    """Store the parsed spec; a read-only tree only costs the YAML parse next time."""
    try:
        cache.parent.mkdir(exist_ok=True)
        temporary = cache.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(spec))
        os.replace(temporary, cache)
    except OSError:
        pass


def _strict_validator_class() -> Any:
    """Draft 2020-12 with integers that exclude floats such as 1.0, like Firecracker's."""
    from jsonschema import Draft202012Validator, validators

    def is_integer(_checker: object, instance: object) -> bool:
        return isinstance(instance, int) and not isinstance(instance, bool)

    type_checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", is_integer)
    return validators.extend(Draft202012Validator, type_checker=type_checker)


class SpecValidator:
    """Validators for every request body and component schema of the spec."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.spec = spec
        resource = Resource.from_contents(spec, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(SPEC_URI, resource)
        self._validator_class = _strict_validator_class()
        self._cache: dict[str, Any] = {}

    def request_body(self, method: str, template: str) -> tuple[str, bool] | None:
        """Return (schema pointer, required) of an operation's JSON body, or None."""
        return request_body_of(self.spec, method, template)

    def validate_body(self, method: str, template: str, label: str, body: Any) -> None:
        """Raise RequestValidationError if `body` breaks the operation's request schema."""
        found = self.request_body(method, template)
        if found is None:
            return
        self.validate(found[0], label, body)

    def validate_schema(self, name: str, label: str, instance: Any) -> None:
        """Validate against components/schemas/`name`."""
        self.validate(f"#/components/schemas/{name}", label, instance)

    def validate(self, pointer: str, label: str, instance: Any) -> None:
        validator = self._cache.get(pointer)
        if validator is None:
            schema = {"$ref": SPEC_URI + pointer}
            validator = self._validator_class(schema, registry=self._registry)
            self._cache[pointer] = validator
        from jsonschema.exceptions import best_match

        error = best_match(validator.iter_errors(instance))
        if error is not None:
            raise RequestValidationError(f"{label}: {describe_error(error)}")


def describe_error(error: Any) -> str:
    """Turn a jsonschema ValidationError into `field: rule` wording."""
    field = _field_path(error.absolute_path)
    prefix = f"{field}: " if field else ""
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - known)
        names = ", ".join(f'"{name}"' for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        return f"{prefix}unknown field{plural} {names}; valid fields: {', '.join(sorted(known))}"
    if kind == "required" and isinstance(error.instance, dict):
        missing = [name for name in error.validator_value if name not in error.instance]
        return f'{prefix}missing required field "{missing[0]}"'
    if kind == "minProperties" and error.validator_value == 1:
        return f"{prefix}the body is empty; give at least one field"
    if kind == "oneOf" and "description" in error.schema:
        return prefix + error.schema["description"]
    value = _json_text(error.instance)
    if kind == "type":
        return f"{prefix}{value} is not of type {_json_text(error.validator_value)}"
    if kind == "enum":
        choices = ", ".join(_json_text(choice) for choice in error.validator_value)
        return f"{prefix}{value} is not one of {choices}"
    return prefix + error.message


def _json_text(value: Any) -> str:
    """Show a value as JSON (true, null, "text"), cut to 80 characters."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field_path(path: Any) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def request_body_of(spec: dict[str, Any], method: str, template: str) -> tuple[str, bool] | None:
    """Return (schema pointer, required) of an operation's JSON request body, or None."""
    operation = spec["paths"][template][method.lower()]
    body = operation.get("requestBody")
    if body is None:
        return None
    schema = body["content"]["application/json"]["schema"]
    return schema["$ref"], bool(body.get("required", False))


def get_spec() -> dict[str, Any]:
    """Return the process-wide parsed spec, loading it on first use (thread-safe)."""
    global _spec
    with _lock:
        if _spec is None:
            _spec = load_spec()
        return _spec


def get_validator() -> SpecValidator:
    """Return the process-wide validator, building it on first use (thread-safe)."""
    global _validator
    spec = get_spec()
    with _lock:
        if _validator is None:
            _validator = SpecValidator(spec)
        return _validator


def warm_up_in_background() -> threading.Thread:
    """Build the validator and compile the common schemas on a daemon thread."""

    def warm_up() -> None:
        validator = get_validator()
        for name in ("MachineConfiguration", "BootSource", "Drive", "InstanceActionInfo"):
            try:
                validator.validate_schema(name, name, {})
            except RequestValidationError:
                pass

    thread = threading.Thread(target=warm_up, name="api_validation_warm_up", daemon=True)
    thread.start()
    return thread
