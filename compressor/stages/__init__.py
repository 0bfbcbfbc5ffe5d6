"""The stage-kind registry. A kind registers itself when its package is imported (see compressor/stages/base.py);
the built-in kinds and any plugin under the `compressor.stages` entry-point group are imported the first time the
registry is read. Importing a kind must not import torch."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from compressor.stages.base import StageKind

BUILTIN = ("prune", "distill", "quantize", "evaluate", "generate")
ENTRY_POINT_GROUP = "compressor.stages"

_kinds: dict[str, StageKind] = {}
_loaded = False


def register(kind: StageKind) -> StageKind:
    """Add (or replace) a stage kind: it becomes a stage entry key of the pipeline schema and a CLI command."""
    _kinds[kind.name] = kind
    _sync_schema()
    return kind


def unregister(name: str) -> None:
    _kinds.pop(name, None)
    _sync_schema()


def _ordered() -> dict[str, StageKind]:
    """The built-ins in pipeline order, then the others as they registered (whatever order imports happened in)."""
    first = {name: _kinds[name] for name in BUILTIN if name in _kinds}
    return {**first, **{name: kind for name, kind in _kinds.items() if name not in first}}


def _sync_schema() -> None:
    from compressor.config import schema

    schema.set_stage_kinds({name: kind.spec for name, kind in _ordered().items()})


def kinds() -> dict[str, StageKind]:
    """Every registered kind, in registration order (the built-ins first)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN:
            importlib.import_module(f"compressor.stages.{name}")
        for plugin in entry_points(group=ENTRY_POINT_GROUP):
            plugin.load()
    return _ordered()


def get(name: str) -> StageKind:
    known = kinds()
    if name not in known:
        raise KeyError(f"unknown stage kind {name!r} (known: {', '.join(known)})")
    return known[name]
