"""Content keys of stages.

A stage's key hashes (kind, the spec fields that change its output, input model key, extra inputs, compressor
version). Its output lives at <storage>/<pipeline>/<stage>-<key12>/ and counts as done only when manifest.json is
there (see compressor.storage for publishing). Fields that only change how a run is operated (a spec class's
NOT_IN_KEY: checkpoint interval, retries, placement, waiting) and the gates are not in the key, so changing them
neither re-runs a finished stage nor restarts a distillation from zero."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from pydantic import BaseModel

from compressor import __version__


def canonical(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(canonical(p) for p in parts).encode()).hexdigest()


def key_fields(spec: BaseModel | dict) -> dict:
    """The spec as it enters the key: without the fields its class declares operational (NOT_IN_KEY)."""
    if isinstance(spec, dict):
        return spec
    return spec.model_dump(mode="json", exclude=set(getattr(type(spec), "NOT_IN_KEY", ())))


def stage_key(kind: str, spec: BaseModel | dict, input_key: str, extra: Optional[dict] = None) -> str:
    """Same output-relevant spec + same input + same compressor version -> same key. Anything else -> new key."""
    return digest(
        {"kind": kind, "spec": key_fields(spec), "input": input_key, "extra": extra or {}, "version": __version__}
    )
