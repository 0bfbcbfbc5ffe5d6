"""Stage registry. Modules are imported lazily: importing a stage must not import torch."""

from __future__ import annotations

import importlib
from types import ModuleType

KINDS = ("prune", "distill", "quantize", "evaluate")


def stage_module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise KeyError(kind)
    return importlib.import_module(f"compressor.stages.{kind}")
