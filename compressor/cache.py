"""Content keys of stages.

A stage's key hashes (kind, the spec fields that change its output, input model key, extra inputs, the kind's
output version). Its output lives at <storage>/<pipeline>/<stage>-<key12>/ and counts as done only when manifest.json
is there (see compressor.storage for publishing). Fields that only change how a run is operated (a spec class's
NOT_IN_KEY: checkpoint interval, retries, placement, waiting) and the gates are not in the key, so changing them
neither re-runs a finished stage nor restarts a distillation from zero.

**Keys survive releases.** A 3,756 GPU-hour distillation must not be re-keyed by a release that did not change what
it computes, nor lose its resume when compressor is upgraded mid-run. So the key holds no package version:
- each stage kind declares `output_version` (compressor.contract.kind.StageKind), bumped only when that kind's output
  for the same spec and input changes (and a changed default IS such a change);
- a field added to a spec later, whose default keeps the old behaviour, is declared with `neutral(default)`
  (compressor.contract.spec): at that default it stays out of the key, so adding it re-keys nothing.
tests/test_cache.py pins the tiny pipeline's keys, which catches a field added without `neutral`."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from pydantic import BaseModel

from compressor.contract.spec import is_neutral_default

# What every built-in kind's output_version started at: the release whose keys held the package version instead, so
# that the keys (and caches, and resumable distillations) written by it stay valid.
FIRST_OUTPUT_VERSION = "0.1.0"


def canonical(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(canonical(p) for p in parts).encode()).hexdigest()


def key_fields(spec: BaseModel | dict) -> dict:
    """The spec as it enters the key: without the fields its class declares operational (NOT_IN_KEY), and without
    fields declared `neutral` that are at their default (at any depth)."""
    if isinstance(spec, dict):
        return spec
    return _key_view(spec)


def _key_view(model: BaseModel) -> dict:
    skip = getattr(type(model), "NOT_IN_KEY", frozenset())
    fields = type(model).model_fields
    out = {}
    for name, dumped in model.model_dump(mode="json").items():  # what the spec serializes, as before neutral fields
        if name in skip:
            continue
        if name not in fields:
            out[name] = dumped
            continue
        value = getattr(model, name)
        if not is_neutral_default(fields[name], value):
            out[name] = _key_value(value, dumped)
    return out


def _key_value(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel):
        return _key_view(value)
    if isinstance(value, (list, tuple)) and isinstance(dumped, list):
        return [_key_value(v, d) for v, d in zip(value, dumped)]
    if isinstance(value, dict) and isinstance(dumped, dict) and len(value) == len(dumped):  # model_dump keeps order
        return {key: _key_value(v, d) for (key, d), v in zip(dumped.items(), value.values())}
    return dumped


def stage_key(
    kind: str,
    spec: BaseModel | dict,
    input_key: str,
    extra: Optional[dict] = None,
    output_version: str = FIRST_OUTPUT_VERSION,
) -> str:
    """Same output-relevant spec + same input + same kind output version -> same key. Anything else -> new key."""
    return digest(
        {"kind": kind, "spec": key_fields(spec), "input": input_key, "extra": extra or {}, "version": output_version}
    )
