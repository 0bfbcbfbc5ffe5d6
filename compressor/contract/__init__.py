"""The stage contract, what the rest of compressor knows of a stage kind, and the registry of kinds.

- spec:    the pydantic bases of every spec (the pipeline's and each kind's): `Strict`, `Resources`, `neutral`, and
           `data_source`, the mark of a field that names a data source;
- kind:    `StageKind`, the class a kind subclasses: what it reads, outputs, checks, runs and costs;
- context: `StageContext`, all a running stage may know of the outside world (it rides into Ray tasks);
- here:    the registry. A kind registers an instance of its StageKind subclass when its package is imported. The
           first read of the registry imports every package under compressor/stages/ (a new built-in kind is a new
           directory, no list to edit) and every plugin of the `compressor.stages` entry-point group. Importing a
           kind must not import torch.

This package sits below the pipeline schema and every core module, and imports no kind: the kinds are found by
name, as plugins are. Who depends on the set of kinds (the pipeline schema: one YAML key per kind) subscribes with
`on_change`; the registry imports none of them."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Optional

from compressor.contract.kind import EstimateInput, StageKind

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


BUILTIN_PACKAGE = "compressor.stages"  # one subpackage per built-in kind


def builtin_names() -> list[str]:
    """The packages under compressor/stages/: the built-in kinds."""
    package = importlib.import_module(BUILTIN_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.ispkg)


def kinds() -> dict[str, StageKind]:
    """Every registered kind (built-ins in USUAL_ORDER, then the others by name)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in builtin_names():
            importlib.import_module(f"{BUILTIN_PACKAGE}.{name}")
        for plugin in entry_points(group=ENTRY_POINT_GROUP):
            plugin.load()
    return _ordered()


def get(name: str) -> StageKind:
    known = kinds()
    if name not in known:
        raise KeyError(f"unknown stage kind {name!r} (known: {', '.join(known)})")
    return known[name]


def stage_flops(
    kind: str,
    spec,
    in_config: dict,
    out_config: dict,
    pipeline,
    teacher_cfg: Optional[dict] = None,
    derived: Optional[dict] = None,
) -> float:
    """Estimated FLOPs of one stage, by its kind's own `flops`. `in_config`/`out_config` are the model before and
    after it (from the stages' `check`); `teacher_cfg` is the pipeline teacher's (default: resolved from the
    pipeline, else `in_config` when it cannot be found offline); `derived` its planned figures (PlannedStage.derived;
    default: derived here, for a spec outside a plan)."""
    stage_kind = get(kind)
    if derived is None:
        derived = stage_kind.derived(spec, pipeline.data)
    return stage_kind.flops(spec, EstimateInput(in_config, out_config, pipeline, teacher_cfg, derived))
