"""Pydantic bases shared by the pipeline spec and every stage kind's spec (compressor/stages/<kind>/spec.py).
Field docs feed docs/reference.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

NEUTRAL = "compressor_neutral_default"  # json_schema_extra marker read by compressor.cache
SOURCE = "compressor_data_source"  # json_schema_extra marker of a field that names a data source


def neutral(default: Any, **kwargs: Any) -> Any:
    """A field added to a spec after its keys were first written, whose `default` keeps the old behaviour: left at
    that default it stays out of the stage's cache key, so adding the field re-keys no finished stage."""
    extra = {**(kwargs.pop("json_schema_extra", None) or {}), NEUTRAL: True}
    return Field(default, json_schema_extra=extra, **kwargs)


def is_neutral_default(info: FieldInfo, value: Any) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(NEUTRAL)) and value == info.get_default(call_default_factory=True)


READS = ("text", "prompts", "chat")  # how a source is read: text to tokenize, prompt rows, prompt/answer rows


def data_source(
    default: Any = PydanticUndefined,
    *,
    keyed: bool = True,
    dataset: bool = False,
    reads: str = "text",
    **kwargs: Any,
) -> Any:
    """A spec field that names a data source: one of the pipeline's `data:` entries, or, where `dataset`, an earlier
    stage that made a dataset (generate's answers). From the mark, validate checks the name, preflight checks the
    source's first rows as what it `reads` (one of READS), and the standalone command gets a `--FIELD SOURCE` option.
    Where `keyed`, the source's content keys the stage (compressor.planning); not keyed: the kind's `key_extra` keys
    that source its own way."""
    if reads not in READS:
        raise ValueError(f"data_source(reads={reads!r}): one of {', '.join(READS)}")
    mark = {"keyed": keyed, "dataset": dataset, "reads": reads}
    return Field(default, json_schema_extra={**(kwargs.pop("json_schema_extra", None) or {}), SOURCE: mark}, **kwargs)


@dataclass(frozen=True)
class SourceRef:
    """One data source a spec names."""

    field: str  # its path in the spec: "calibration", "hard_labels.data", "search.heldout"
    name: str  # the source: a `data:` entry, or a dataset stage where `dataset`
    keyed: bool
    dataset: bool
    reads: str = "text"  # one of READS


def source_marks(model: type[BaseModel]) -> dict[str, dict]:
    """The fields of a spec class (not of its nested specs) marked by `data_source`: name -> {keyed, dataset}."""
    extras = {name: info.json_schema_extra for name, info in model.model_fields.items()}
    return {name: extra[SOURCE] for name, extra in extras.items() if isinstance(extra, dict) and SOURCE in extra}


def source_refs(spec: BaseModel, prefix: str = "") -> list[SourceRef]:
    """The data sources a spec names, those of its nested specs included, in field order; unset fields are left out."""
    refs, marks = [], source_marks(type(spec))
    for name in type(spec).model_fields:
        value = getattr(spec, name)
        if name in marks and isinstance(value, str):
            refs.append(SourceRef(prefix + name, value, **marks[name]))
        elif isinstance(value, BaseModel):
            refs.extend(source_refs(value, f"{prefix}{name}."))
    return refs


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
