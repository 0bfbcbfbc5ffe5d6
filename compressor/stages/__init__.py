"""The stage-kind registry. A kind registers an instance of its StageKind subclass when its package is imported (see
compressor/stages/base.py). The first read of the registry imports every package under compressor/stages/ (a new
built-in kind is a new directory, no list to edit) and every plugin of the `compressor.stages` entry-point group.
Importing a kind must not import torch.

Who depends on the set of kinds (the pipeline schema: one YAML key per kind) subscribes with `on_change`; the
registry imports none of them."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points

from compressor.stages.base import StageKind

ENTRY_POINT_GROUP = "compressor.stages"
# The order of `compressor --help`, the docs and the schema's keys: a pipeline's usual order, then the rest by name.
USUAL_ORDER = ("prune", "distill", "quantize", "evaluate")

_kinds: dict[str, StageKind] = {}
_listeners: list[Callable[[dict[str, StageKind]], None]] = []
_loaded = False


def register(kind: StageKind) -> StageKind:
    """Add (or replace) a stage kind: it becomes a stage entry key of the pipeline schema and a CLI command."""
    if not isinstance(kind, StageKind):
        raise TypeError(f"register() takes a StageKind instance, not {kind!r}")
    missing = [a for a in ("name", "spec", "summary") if not hasattr(kind, a)]
    if missing:
        raise TypeError(f"stage kind {type(kind).__name__} does not set {', '.join(missing)}")
    _kinds[kind.name] = kind
    _changed()
    return kind


def unregister(name: str) -> None:
    _kinds.pop(name, None)
    _changed()


def on_change(listener: Callable[[dict[str, StageKind]], None]) -> None:
    """Call `listener(kinds)` now and whenever a kind is registered or removed."""
    _listeners.append(listener)
    listener(_ordered())


def _changed() -> None:
    for listener in _listeners:
        listener(_ordered())


def _ordered() -> dict[str, StageKind]:
    rank = {name: i for i, name in enumerate(USUAL_ORDER)}
    return dict(sorted(_kinds.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def builtin_names() -> list[str]:
    """The packages under compressor/stages/: the built-in kinds."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def kinds() -> dict[str, StageKind]:
    """Every registered kind (built-ins in USUAL_ORDER, then the others by name)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in builtin_names():
            importlib.import_module(f"{__name__}.{name}")
        for plugin in entry_points(group=ENTRY_POINT_GROUP):
            plugin.load()
    return _ordered()


def get(name: str) -> StageKind:
    known = kinds()
    if name not in known:
        raise KeyError(f"unknown stage kind {name!r} (known: {', '.join(known)})")
    return known[name]
