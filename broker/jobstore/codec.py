"""How a job's fields are stored: one JSON text per top-level attribute, the same in every backend."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from broker.schema import Job

# json.dumps with these arguments builds a new encoder per call, and a job has ~25 fields
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
_encode_str: Any = getattr(json.encoder, "c_encode_basestring_ascii", None) or json.encoder.encode_basestring_ascii


def encode(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"), sort_keys=True)``; strings, None and ints (most of a
    job's fields) without going through the encoder object."""
    kind = type(value)
    if kind is str:
        return str(_encode_str(value))
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    return _ENCODER.encode(value)


def decode_job(raw: Mapping[Any, Any]) -> Job:
    """The job of a stored field → JSON text mapping (keys and values as str or bytes).

    Raises:
        pydantic.ValidationError: the fields are not a valid job.
        ValueError: a field is not JSON.
    """
    data = {
        (k.decode() if isinstance(k, bytes) else k): json.loads(v)
        for k, v in raw.items()
    }
    return Job.model_validate(data)
