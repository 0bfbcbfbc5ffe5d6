"""The prune stage's options (torch-free: validating a pipeline imports this, never torch)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from compressor.contract.spec import Strict, data_source, neutral

# A dimension of the target: a fixed value, or (with `params`, a budget) an inclusive [lo, hi] range to search in.
Dimension = Optional[Union[int, tuple[int, int]]]
RANGED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_layers")


class PruneTarget(Strict):
    """Target shape, or a parameter budget. Omitted dimensions keep the source's value (with `params`: they are
    searched); head_dim never changes."""

    params: Optional[float] = Field(
        None,
        gt=0,
        description="A budget instead of a shape: absolute parameters (> 1, e.g. 4.5e9, counted like "
        "`plan` does, embeddings included) or a fraction (<= 1) of the source's non-embedding parameters. The "
        "shape is then searched (see `search`); the other fields constrain it: an int fixes a dimension, a "
        "[lo, hi] range bounds it.",
    )
    hidden_size: Dimension = Field(None, description="Embedding channels to keep (Minitron width); > 0.")
    intermediate_size: Dimension = Field(None, description="MLP neurons to keep in every layer; > 0.")
    num_attention_heads: Dimension = Field(
        None, description="Query heads to keep in every layer, ranked within their KV group; > 0."
    )
    num_key_value_heads: Dimension = Field(
        None,
        description="KV heads to keep; fewer than the source drops whole KV groups (with their query heads). "
        "With `params` and no value given, the source's KV heads are kept (as ModelOpt does).",
    )
    num_layers: Dimension = Field(None, description="Keep this many layers, dropping the least important; > 0.")
    keep_layers: Optional[list[int]] = Field(None, description="Explicit layer indices to keep (0-based).")
    drop_layers: Optional[list[int]] = Field(None, description="Explicit layer indices to drop (0-based).")

    @model_serializer(mode="wrap")
    def _omit_no_budget(self, handler):
        # A fixed-shape target dumps (and so keys its stage) exactly as before budgets existed.
        data = handler(self)
        if self.params is None:
            data.pop("params", None)
        return data

    @field_validator(*RANGED)
    @classmethod
    def _positive(cls, value):
        values = value if isinstance(value, tuple) else () if value is None else (value,)
        if any(v <= 0 for v in values):
            raise ValueError(f"{list(value) if isinstance(value, tuple) else value}: give a positive number")
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"range [{value[0]}, {value[1]}] is empty; give [lo, hi] with lo <= hi")
        return value

    @model_validator(mode="after")
    def _one_depth_rule(self):
        given = [n for n in ("num_layers", "keep_layers", "drop_layers") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of num_layers, keep_layers, drop_layers (got {', '.join(given)})")
        ranged = [n for n in RANGED if isinstance(getattr(self, n), tuple)]
        if ranged and self.params is None:
            raise ValueError(
                f"{ranged[0]}: a [lo, hi] range bounds a search, which needs a budget: set `params` "
                "too, or give one value"
            )
        return self

    def fixed(self, name: str) -> Optional[int]:
        """A dimension's value when it is one number (None when it is searched or left to the source)."""
        value = getattr(self, name)
        return value if isinstance(value, int) else None


class StudentCandidate(PruneTarget):
    """One student to try (`candidates`): a shape (the source pruned to it), a budget (`params`: the shape a budget
    search would score best, without its short distillations) or a checkpoint (`model`) taken as it is."""

    model: Optional[str] = Field(
        None,
        description="A checkpoint directory or `zoo:NAME` taken as it is, not pruned; it must use the source's "
        "tokenizer. Give no other field with it.",
    )

    @model_validator(mode="after")
    def _model_alone(self):
        others = [n for n in self.model_fields_set if n != "model" and getattr(self, n) is not None]
        if self.model is not None and others:
            raise ValueError(f"model: a checkpoint is taken as it is; give no {others[0]} with it")
        return self

    def label(self) -> str:
        if self.model is not None:
            return f"model {self.model}"
        given = self.model_dump(exclude_none=True)
        return ", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in given.items()) or "the source"


class SelectionBar(Strict):
    """What a selected student must reach after the short distillation: held-out perplexity at most
    `max_perplexity_ratio` x the teacher's on the same sequences."""

    max_perplexity_ratio: float = Field(
        gt=0, description="Largest student / teacher held-out perplexity a candidate may have, e.g. 1.3."
    )
    evaluate: Literal["all", "until_pass"] = Field(
        "all",
        description="all: every candidate is distilled and measured (a full table to compare); until_pass: "
        "smallest first, stopping once the smallest candidate that passes is known (cheaper).",
    )


class SearchSpec(Strict):
    """How a budget (`target.params`) becomes a shape: every aligned shape within the budget's tolerance is
    enumerated (at most `max_candidates`, an even spread of them when there are more); each is scored by the LM
    loss of the source pruned to it (importance from the one calibration pass, no training); the `top_k` best get
    `steps` steps of distillation from the teacher (the distill stage's code, as parallel Ray Train runs as the
    cluster allows); the one with the lowest held-out LM loss after it is the output. The output is that shape
    pruned from the source, not the short-distilled copy: the distill stage that follows trains it."""

    tolerance: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="A shape meets the budget when its parameter count is within budget x (1 +/- tolerance).",
    )
    max_candidates: int = Field(
        24,
        gt=0,
        description="Shapes scored by their pruned loss: all that meet the budget, or an even spread of this many.",
    )
    top_k: int = Field(4, gt=0, description="Best-scoring shapes that get a short distillation.")
    steps: int = Field(
        50, ge=0, description="Distillation steps per short-distilled shape (0: pick by the pruned loss alone)."
    )
    score_samples: int = Field(
        64, gt=0, description="Calibration sequences each shape's pruned loss is measured on (the first of the set)."
    )
    data: Optional[str] = data_source(
        None,
        keyed=False,  # keyed by the kind, with the search (key_extra)
        description="Data source (under `data:`) of the short distillations; default: the calibration one.",
    )
    heldout: Optional[str] = data_source(
        None,
        keyed=False,
        description="Data source of the held-out loss that picks the winner; default: the `data` source's "
        "held-out split for `zoo:` sources, else the calibration source with another seed (the short "
        "distillations never train on it, unless it is also `data`). With `candidates`: default the "
        "`heldout_samples` sequences of `data` right after the ones the short distillations train on, and never "
        "the pipeline's evaluation data.",
    )
    heldout_samples: int = Field(64, gt=0, description="Held-out sequences the winner is picked on.")
    distill: dict[str, Any] = Field(
        default_factory=dict,
        description="DistillSpec fields of the short distillations (lr, global_batch, "
        "micro_batch, seq_len, loss, deepspeed, workers, gpus_per_worker, ...; not data, steps or tokens); "
        "default: the distill stage's defaults. Use the settings of the pipeline's distill stage, so the short "
        "runs predict the long one.",
    )

    @field_validator("distill")
    @classmethod
    def _distill_fields(cls, value: dict) -> dict:
        from pydantic import ValidationError

        from compressor.stages.distill.spec import DistillSpec

        taken = [k for k in ("data", "steps", "tokens", "teacher") if k in value]
        if taken:
            raise ValueError(
                f"{taken[0]}: set by the search itself (search.data, search.steps; the teacher is the "
                "pipeline's); leave it out of search.distill"
            )
        try:
            DistillSpec(data="search", steps=1, **value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None
        return value

    def distill_spec(self, data: str):
        """The DistillSpec of one short distillation of `data` (a source name); for steps > 0."""
        from compressor.stages.distill.spec import DistillSpec

        return DistillSpec(data=data, steps=self.steps, **self.distill)


class PruneSpec(Strict):
    """Minitron structured pruning: activation importance from one calibration pass, then slicing to `target`."""

    target: Optional[PruneTarget] = Field(
        None,
        description="The output shape, or a parameter budget (`params`) to search a shape for. Required unless "
        "`candidates` is given.",
    )
    candidates: Optional[list[StudentCandidate]] = neutral(
        None,
        description="Student selection instead of a target: every candidate gets the same short distillation "
        "(`search`: steps, data, heldout, distill) and the one with the fewest parameters that meets `bar` is the "
        "output (the source pruned to it, or the checkpoint), for the following distill stage to train fully.",
    )
    bar: Optional[SelectionBar] = neutral(None, description="The quality bar of `candidates` (required with them).")
    calibration: Optional[str] = data_source(
        None, description="Name of a data source under `data:`; default: the only one defined."
    )
    samples: Optional[int] = Field(
        None, gt=0, description="Overrides the data source's `samples` (default 1024, as in the Minitron paper)."
    )
    seq_len: Optional[int] = Field(None, gt=0, description="Overrides the data source's `seq_len`.")
    batch_size: int = Field(8, gt=0, description="Calibration sequences per forward pass.")
    depth_metric: Literal["bi", "loss"] = Field(
        "bi",
        description="Layer ranking for `num_layers`: block importance (1 - cosine of a layer's input and output, "
        "from the same pass) or the LM-loss increase when the layer is dropped (one more pass per layer).",
    )
    aggregation: Literal["l2_mean", "mean_mean", "l2_l2", "mean_l2"] = Field(
        "l2_mean",
        description="<batch>_<sequence> reduction of activations; Minitron's best is L2 over batch, mean over sequence.",
    )
    align: int = Field(
        32,
        gt=0,
        description="Every pruned width a later quantize stage groups must be a multiple of this: hidden_size, "
        "intermediate_size and num_attention_heads x head_dim (a width kept whole is exempt). Default: 32; "
        "for a budget search (`target.params`), the later quantize stage's group size.",
    )
    quantize_group_size: Optional[int] = Field(
        None, description="Warn when widths will not divide by it (set from a later quantize stage)."
    )
    # The later quantize stage's group size, which `plan` finds (prune's planned_spec). Private: not in the dump, so
    # the stage key stays what it was; a search's key takes the align it resolves to (prune key_extra).
    _later_group_size: Optional[int] = PrivateAttr(None)
    search: Optional[SearchSpec] = Field(
        None, description="How a budget (`target.params`) is searched; default: the SearchSpec defaults."
    )

    @model_serializer(mode="wrap")
    def _omit_no_search(self, handler):
        # A spec without a search or a selection dumps (and so keys its stage) exactly as before they existed.
        data = handler(self)
        for name in ("search", "candidates", "bar", "target"):
            if getattr(self, name) is None:
                data.pop(name, None)
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _target_or_candidates(cls, data, handler):
        # Named like pydantic's own "Field required" at `target`, the field most specs give.
        if isinstance(data, dict) and data.get("target") is None and data.get("candidates") is None:
            message = "Field required (or give `candidates` to select a student among)"
            raise ValidationError.from_exception_data(
                cls.__name__,
                [{"type": PydanticCustomError("missing", message), "loc": ("target",), "input": data}],
            )
        return handler(data)

    @model_validator(mode="after")
    def _search_needs_budget(self):
        if self.target is not None and self.candidates is not None:
            raise ValueError("give either target (one shape or budget) or candidates (a selection), not both")
        if self.candidates is not None and not self.candidates:
            raise ValueError("candidates: empty; list at least one shape, budget (params) or checkpoint (model)")
        if self.candidates is not None and self.bar is None:
            raise ValueError("bar: candidates need a bar to select by, e.g. {max_perplexity_ratio: 1.3}")
        if self.bar is not None and self.candidates is None:
            raise ValueError("bar: a bar selects among candidates; give candidates too, or drop the bar")
        if self.search is not None and self.target is not None and self.target.params is None:
            raise ValueError(
                "search: set target.params (a budget) to search; a fixed target shape has nothing to search"
            )
        return self

    @property
    def searching(self) -> bool:
        return self.target is not None and self.target.params is not None

    @property
    def selecting(self) -> bool:
        return self.candidates is not None

    @property
    def search_align(self) -> int:
        """The multiple a search's candidate widths keep to: `align` as given, else the later quantize group size
        (so a budget on a pipeline that quantizes needs no setting to produce shapes it can quantize)."""
        group = self.quantize_group_size or self._later_group_size
        if "align" in self.model_fields_set or not group or group <= 0:
            return self.align
        return group

    def search_settings(self) -> SearchSpec:
        return self.search or SearchSpec()
