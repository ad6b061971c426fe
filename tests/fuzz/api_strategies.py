"""Hypothesis strategies for API requests, derived from spec/api.yaml.

For every operation of the spec this module draws a path (with valid and invalid ids)
and a request body: one that the operation's request schema accepts, or one that it
rejects, built by one mutation of a valid body (a field of the wrong type, an integer out
of range, an unknown field, a missing required field, or a body that is not an object).
A separate jsonschema validator, built here from the spec, checks each drawn body, so a
body labelled valid or invalid really is one.

Fields that name host paths get short relative names only, so a request the monitor
accepts creates files only inside its working directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from jsonschema import Draft202012Validator, validators
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from vmm.api.validation import load_spec

SPEC: dict[str, Any] = load_spec()
_SPEC_URI = "urn:fuzz:api-spec"
_REGISTRY = Registry().with_resource(
    _SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012)
)
_METHODS = ("get", "put", "patch")
_MAX_DEPTH = 4
_MAX_STRING = 24
# Property names whose value is a host path or socket path.
_PATH_FIELD = re.compile(r"(path|socket|uds_path|serial_out_path)")
_SAFE_PATH = st.from_regex(r"\Afuzz-[a-z0-9]{1,8}\Z")
_ID_PARAMS = ("drive_id", "iface_id", "id")


def _is_strict_integer(_checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# The monitor's rule, stated here independently: JSON integers exclude 1.0 and true.
_VALIDATOR_CLASS = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)


@dataclass(frozen=True)
class Operation:
    """One method on one path template of the spec."""

    method: str
    template: str
    spec: dict[str, Any]

    @property
    def body_pointer(self) -> str | None:
        body = self.spec.get("requestBody")
        if body is None:
            return None
        return body["content"]["application/json"]["schema"]["$ref"]

    @property
    def body_required(self) -> bool:
        return bool(self.spec.get("requestBody", {}).get("required", False))

    @property
    def status_codes(self) -> set[int]:
        """Statuses the spec allows; a `default` response stands for 400."""
        codes = {int(code) for code in self.spec["responses"] if code != "default"}
        if "default" in self.spec["responses"]:
            codes.add(400)
        return codes

    def response_pointer(self, status: int) -> str | None:
        response = self.spec["responses"].get(str(status)) or self.spec["responses"].get(
            "default")
        if response is None:
            return None
        response = resolve(response)
        content = response.get("content", {}).get("application/json")
        return None if content is None else content["schema"]["$ref"]

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow local `$ref`s until a node without one."""
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def operations() -> list[Operation]:
    """Every operation of the spec, in path order."""
    found = []
    for template, item in SPEC["paths"].items():
        for method in _METHODS:
            if method in item:
                found.append(Operation(method.upper(), template, item[method]))
    return found


def is_valid(pointer: str, instance: Any) -> bool:
    """Return True if `instance` matches the schema at `pointer` of the spec."""
    validator = _VALIDATOR_CLASS({"$ref": _SPEC_URI + pointer}, registry=_REGISTRY)
    return validator.is_valid(instance)


# Valid values ----------------------------------------------------------------------------

_JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=_MAX_STRING),
)
JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)


def valid_value(schema: dict[str, Any], name: str = "", depth: int = 0) -> st.SearchStrategy:
    """Draw values that `schema` accepts; `name` is the property the value is for."""
    schema = resolve(schema)
    if _PATH_FIELD.search(name) and resolve(schema).get("type") == "string":
        return _SAFE_PATH
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([valid_value(option, name, depth) for option in schema["oneOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([valid_value({**schema, "type": one}, name, depth) for one in kind])
    return _VALID_BY_TYPE.get(kind, _any_json)(schema, depth)


def _any_json(_schema: dict[str, Any], _depth: int) -> st.SearchStrategy:
    return JSON_VALUES


def _valid_string(schema: dict[str, Any], _depth: int) -> st.SearchStrategy:
    if "pattern" in schema:
        return st.from_regex(schema["pattern"])
    low = schema.get("minLength", 0)
    high = max(low, min(schema.get("maxLength", _MAX_STRING), _MAX_STRING))
    return st.text(min_size=low, max_size=high)


def _valid_integer(schema: dict[str, Any], _depth: int) -> st.SearchStrategy:
    low = schema.get("minimum", -(2**63))
    high = schema.get("maximum", 2**64)
    edges = st.sampled_from(sorted({low, high, min(low + 1, high)}))
    return st.one_of(edges, st.integers(low, high))


def _valid_number(schema: dict[str, Any], _depth: int) -> st.SearchStrategy:
    return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False,
                     allow_infinity=False)


def _valid_array(schema: dict[str, Any], depth: int) -> st.SearchStrategy:
    if depth >= _MAX_DEPTH:
        return st.just([]) if not schema.get("minItems") else st.nothing()
    items = valid_value(schema.get("items", {}), "", depth + 1)
    return st.lists(items, min_size=schema.get("minItems", 0),
                    max_size=max(schema.get("minItems", 0), 3))


def _valid_object(schema: dict[str, Any], depth: int) -> st.SearchStrategy:
    properties: dict[str, Any] = schema.get("properties", {})
    if not properties:
        return st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)
    required = set(schema.get("required", ()))
    if depth >= _MAX_DEPTH:
        properties = {key: value for key, value in properties.items() if key in required}
    return st.fixed_dictionaries(
        {key: valid_value(value, key, depth + 1) for key, value in properties.items()
         if key in required},
        optional={key: valid_value(value, key, depth + 1)
                  for key, value in properties.items() if key not in required},
    )


_VALID_BY_TYPE = {
    "string": _valid_string,
    "integer": _valid_integer,
    "number": _valid_number,
    "boolean": lambda _schema, _depth: st.booleans(),
    "null": lambda _schema, _depth: st.none(),
    "array": _valid_array,
    "object": _valid_object,
}


# Invalid values ---------------------------------------------------------------------------

_VALUES_BY_TYPE: dict[str, st.SearchStrategy] = {
    "string": st.text(max_size=8),
    "integer": st.integers(-(2**65), 2**65),
    "number": st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda value: not value.is_integer()),
    "boolean": st.booleans(),
    "null": st.none(),
    "array": st.lists(st.integers(), max_size=2),
    "object": st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
}


def wrong_type_value(schema: dict[str, Any]) -> st.SearchStrategy | None:
    """Draw a value of a JSON type the schema does not allow, or None if unsure."""
    schema = resolve(schema)
    kind = schema.get("type")
    if not isinstance(kind, str) or "oneOf" in schema:
        return None
    allowed = {kind, "integer"} if kind == "number" else {kind}
    others = [strategy for name, strategy in _VALUES_BY_TYPE.items() if name not in allowed]
    return st.one_of(others)


def _mutations(schema: dict[str, Any], body: dict[str, Any]) -> list[st.SearchStrategy]:
    """Strategies for one-step mutations of a valid object `body`."""
    properties: dict[str, Any] = schema.get("properties", {})
    found: list[st.SearchStrategy] = [
        st.tuples(st.just("not an object"), st.sampled_from([[], "text", 7, None, True])),
    ]
    if schema.get("additionalProperties") is False:
        unknown = st.text(min_size=1, max_size=12).filter(lambda key: key not in properties)
        found.append(st.tuples(st.just("unknown field"), unknown.map(
            lambda key: {**body, key: 1})))
    for key in schema.get("required", ()):
        found.append(st.just(("missing required", {k: v for k, v in body.items() if k != key})))
    for key, property_schema in properties.items():
        wrong = wrong_type_value(property_schema)
        if wrong is not None:
            found.append(st.tuples(st.just(f"wrong type: {key}"),
                                   wrong.map(lambda value, key=key: {**body, key: value})))
        resolved = resolve(property_schema)
        if resolved.get("type") == "integer":
            for bound, step in (("minimum", -1), ("maximum", 1)):
                if bound in resolved:
                    found.append(st.just((f"out of range: {key}",
                                          {**body, key: resolved[bound] + step})))
    return found


@st.composite
def invalid_body(draw: st.DrawFn, pointer: str) -> tuple[str, Any]:
    """Draw (mutation, body) where body breaks the schema at `pointer`."""
    schema = resolve({"$ref": pointer})
    body = draw(valid_value(schema))
    if not isinstance(body, dict):
        wrong = wrong_type_value(schema) or st.just({"unexpected": True})
        return "wrong type", draw(wrong)
    kind, mutated = draw(st.one_of(_mutations(schema, body)))
    return kind, mutated


# Paths ----------------------------------------------------------------------------------

VALID_IDS = st.from_regex(r"\A[A-Za-z0-9_]{1,16}\Z")
INVALID_IDS = st.one_of(
    st.just(""),
    st.text(alphabet="abc-.%~!$", min_size=1, max_size=8).filter(
        lambda text: not re.fullmatch(r"[A-Za-z0-9_]+", text)),
    st.text(alphabet="ab", min_size=65, max_size=80),
)


def path_ids(operation: Operation) -> st.SearchStrategy[dict[str, str]]:
    names = re.findall(r"{(\w+)}", operation.template)
    return st.fixed_dictionaries({name: st.one_of(VALID_IDS, INVALID_IDS) for name in names})


def fill_path(template: str, ids: dict[str, str]) -> str:
    """Put `ids` into `template`, percent-encoding what a request target cannot contain."""
    from urllib.parse import quote

    path = template
    for name, value in ids.items():
        path = path.replace("{" + name + "}", quote(value, safe=""))
    return path


@st.composite
def valid_request(draw: st.DrawFn, operation: Operation) -> tuple[str, bytes]:
    """Draw (path, body bytes) with a body the operation's schema accepts."""
    ids = draw(path_ids(operation))
    pointer = operation.body_pointer
    if pointer is None:
        return fill_path(operation.template, ids), b""
    body = draw(valid_value({"$ref": pointer}))
    if isinstance(body, dict):
        for name in _ID_PARAMS:
            if name in ids and name in body and draw(st.booleans()):
                body[name] = ids[name]
    return fill_path(operation.template, ids), json.dumps(body).encode()


@st.composite
def invalid_request(draw: st.DrawFn, operation: Operation) -> tuple[str, str, bytes]:
    """Draw (mutation, path, body bytes) with a body the schema rejects."""
    assert operation.body_pointer is not None
    ids = draw(path_ids(operation))
    kind, body = draw(invalid_body(operation.body_pointer))
    return kind, fill_path(operation.template, ids), json.dumps(body).encode()
