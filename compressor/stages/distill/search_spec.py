"""The `search:` block of a distill stage (torch-free): which loss / optimizer fields its trials vary, how the trials
are drawn (a grid, or a seeded random sample), how long each is, what scores them and what follows.

A space maps a field of the stage, written as in the YAML (`lr`, `loss.temperature`), to a list of values (a grid
axis; in a random search, a uniform choice) or a range `{low, high, log}` (random searches only)."""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional, Union

from pydantic import Field, model_validator

from compressor.contract.spec import Strict, data_source

# Fields that change how well a student learns from the same teacher and data, not which student or data it is: the
# optimizer's and the loss's. The rest (data, budget, batch layout, workers) would make trials incomparable.
SEARCHABLE_TOP = ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip")
SEARCHABLE_LOSS = ("kind", "beta", "temperature", "alpha", "hidden_weight", "layer_map", "projector_lr")
SEARCHABLE = SEARCHABLE_TOP + tuple(f"loss.{name}" for name in SEARCHABLE_LOSS)


class Range(Strict):
    """A continuous interval of a float field, sampled by a random search (uniform, or log-uniform with `log`)."""

    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")
    log: bool = Field(False, description="Sample log-uniformly (learning rates), else uniformly.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.low >= self.high:
            raise ValueError(f"low {self.low:g} must be below high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: low {self.low:g} must be > 0 to sample log-uniformly")
        return self


class EarlyStopping(Strict):
    """ASHA (Ray Tune's ASHAScheduler): at rungs of grace_steps x reduction_factor^k steps, a trial whose running
    student CE on the batches it has not trained on yet (each batch is scored before its step: on the first pass
    over the data, unseen text) is not in the best 1/reduction_factor of the trials that reached that rung stops."""

    grace_steps: Optional[int] = Field(
        None, gt=0, description="Steps every trial runs before it can be stopped; default: a quarter of a trial."
    )
    reduction_factor: float = Field(2.0, gt=1, description="1/reduction_factor of the trials go on at each rung.")


class DistillSearch(Strict):
    """Short distillations ("trials") over loss / optimizer settings, run as Ray Tune trials, each a Ray Train run
    with the stage's workers and resources on `fraction` of the budget, scored by the student's LM loss on a
    validation split that neither the trials, nor the final run, nor the pipeline's evaluation read. The stage then
    trains with the best trial's settings on the full budget (`then: retrain`) or goes on from its student
    (`then: continue`). Each trial is a nested MLflow run of the stage's; the manifest's `search` lists them."""

    space: dict[str, Union[list[Any], Range]] = Field(
        description="Field -> values. Fields: " + ", ".join(SEARCHABLE) + ". A list is a grid axis (in a random "
        "search, a uniform choice among its values); a range {low, high, log} is for random searches. E.g. "
        "{lr: [3e-4, 1e-3], loss.temperature: [1, 2]} is a grid of 4 trials.",
    )
    samples: Optional[int] = Field(
        None,
        gt=0,
        description="A random search of this many trials (seeded by the pipeline's seed); unset: the grid, every "
        "combination of the lists.",
    )
    fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Share of the stage's steps each trial trains (at least one step), on the first sequences of "
        "its data.",
    )
    validation: Optional[str] = data_source(
        None,
        keyed=False,  # keyed by the kind, with the search (key_extra)
        description="Data source (under `data:`) of the validation split the trials are scored on; never the "
        "pipeline's evaluation data. Default: the `validation_samples` sequences of the distill data right after "
        "the ones the full run trains on (so no run trains on them).",
    )
    validation_samples: int = Field(64, gt=0, description="Validation sequences each trial is scored on.")
    early_stopping: Optional[EarlyStopping] = Field(
        None, description="Stop trials early with ASHA (unset: every trial runs its steps)."
    )
    then: Literal["retrain", "continue"] = Field(
        "retrain",
        description="retrain: the stage trains from its input with the best settings on its full budget; continue: "
        "it goes on from the best trial's student for the steps the trial did not train.",
    )

    @model_validator(mode="after")
    def _known_fields(self):
        if not self.space:
            raise ValueError("space: name at least one field to search, e.g. {lr: [3e-4, 1e-3]}")
        for name, values in self.space.items():
            if name not in SEARCHABLE:
                close = difflib.get_close_matches(name, SEARCHABLE, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(
                    f"space.{name}: not a field a search can vary{hint}; searchable: {', '.join(SEARCHABLE)}"
                )
            if isinstance(values, list) and not values:
                raise ValueError(f"space.{name}: give at least one value")
            if isinstance(values, Range) and self.samples is None:
                raise ValueError(
                    f"space.{name}: a range is sampled by a random search; set search.samples, or give a list"
                )
        return self

    def trials(self) -> int:
        if self.samples is not None:
            return self.samples
        count = 1
        for values in self.space.values():
            count *= len(values)
        return count


def with_settings(spec_dict: dict, settings: dict[str, Any]) -> dict:
    """A DistillSpec dump with `settings` ({"lr": 1e-3, "loss.temperature": 2}) applied."""
    out = {**spec_dict, "loss": dict(spec_dict.get("loss") or {})}
    for name, value in settings.items():
        if name.startswith("loss."):
            out["loss"][name[len("loss.") :]] = value
        else:
            out[name] = value
    return out


def validation_source(spec, plan) -> Optional[dict]:
    """The dump of the source `search.validation` names (None: the default split of the distill data), refused at
    plan time (exit 2) when it is unknown, the training data, or the text of the pipeline's evaluation tasks (the
    gate's held-out set, which a search must never read)."""
    from compressor.errors import UserError

    name, data = spec.search.validation, plan.pipeline.data
    where = f"stages.{plan.index}.distill.search.validation"
    if name is None:
        return None
    if name not in data:
        raise UserError(f"{where}: unknown data source {name!r} (known: {', '.join(sorted(data)) or 'none defined'})")
    source = data[name]
    if name == spec.data or (spec.data in data and data[spec.data] == source):
        raise UserError(f"{where}: {name!r} is the data the trials train on; name a source kept apart from it")
    tasks = plan.pipeline.evaluation.tasks
    if source.source in {t.data for t in tasks if t.data}:
        raise UserError(f"{where}: {name!r} is the held-out file of an evaluation task; a search must not read it")
    if source.split == "heldout" and source.source in {t.include for t in tasks if t.include}:
        raise UserError(
            f"{where}: {name!r} ({source.source}, split heldout) is the text of the pipeline's evaluation tasks, the "
            "gate's held-out set; a search must not pick its settings on it. Use another source"
        )
    return source.model_dump(mode="json")
