"""Pydantic bases shared by the pipeline spec and every stage kind's spec (compressor/stages/<kind>/spec.py).
Field docs feed docs/reference.md."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

NEUTRAL = "compressor_neutral_default"  # json_schema_extra marker read by compressor.cache


def neutral(default: Any, **kwargs: Any) -> Any:
    """A field added to a spec after its keys were first written, whose `default` keeps the old behaviour: left at
    that default it stays out of the stage's cache key, so adding the field re-keys no finished stage."""
    extra = {**(kwargs.pop("json_schema_extra", None) or {}), NEUTRAL: True}
    return Field(default, json_schema_extra=extra, **kwargs)


def is_neutral_default(info: FieldInfo, value: Any) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(NEUTRAL)) and value == info.get_default(call_default_factory=True)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Fields that change how a stage is operated, not what it outputs: left out of its cache key (compressor.cache).
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset()


class Resources(Strict):
    """What one Ray task (or, for distill, one Ray Train worker) of this stage asks for."""

    num_cpus: float = Field(1, ge=0, description="CPUs per task/worker.")
    num_gpus: float = Field(0, ge=0, description="GPUs per task/worker.")
    memory_gb: Optional[float] = Field(None, gt=0, description="Memory reservation in GiB (Ray `memory`).")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources, e.g. {node_type_a100: 1} to place a stage on the nodes that advertise them.",
    )
