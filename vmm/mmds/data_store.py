"""Reading the MMDS data store as the guest sees it: JSON pointers, JSON and IMDS text.

The store itself is the JSON object the API controller keeps (PUT and PATCH
/mmds write it, with the size limit of --mmds-size-limit); the guest reads it
through the paths of its HTTP requests, which are JSON pointers (RFC 6901).
A response is the referenced value as JSON, or in the EC2 IMDS text form: an
object lists its keys one per line, with a trailing "/" for keys whose value is
an object, and a string is returned as is. IMDS has no form for numbers,
booleans, null or arrays.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote


class ResourceNotFound(Exception):
    """The request path names no value in the data store (HTTP 404)."""


class UnsupportedImdsValue(Exception):
    """The value has no IMDS text form: only objects and strings have one (HTTP 501)."""


def split_pointer(path: str) -> list[str]:
    """Turn a request path into JSON pointer reference tokens (RFC 6901 section 3).

    Empty segments are dropped, so "/latest/" and "/latest" name the same value;
    "~1" decodes to "/" and "~0" to "~", after percent-decoding.
    """
    tokens = []
    for segment in path.split("/"):
        if not segment:
            continue
        tokens.append(unquote(segment).replace("~1", "/").replace("~0", "~"))
    return tokens


def resolve(data: Any, path: str) -> Any:
    """Return the value at `path` in `data`, or raise ResourceNotFound naming the path."""
    value = data
    for token in split_pointer(path):
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            raise ResourceNotFound(f"Resource not found: {path}.")
    return value


def render_json(value: Any) -> str:
    return json.dumps(value)


def render_imds(value: Any) -> str:
    """Return the IMDS text form of an object or string, or raise UnsupportedImdsValue."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        lines = [f"{key}/" if isinstance(item, dict) else key for key, item in value.items()]
        return "\n".join(lines)
    raise UnsupportedImdsValue(
        f"Cannot retrieve value. The value has an invalid type: {type(value).__name__} "
        "values have no IMDS form; request JSON with 'Accept: application/json'."
    )
