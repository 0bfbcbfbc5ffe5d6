"""A parameter budget and the aligned shapes that meet it, from config.json alone (torch-free: `validate` and
`plan` enumerate the same candidates the stage will score).

One candidate per combination of hidden size, query heads, KV heads and depth: its MLP width is the aligned one
whose parameter count lands nearest the budget (parameters are linear in it), kept when within the tolerance.
So the space grows with the widths and depths allowed, not with MLP widths that differ by a few neurons."""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from compressor import estimate
from compressor.errors import UserError
from compressor.models.shapes import Shape
from compressor.stages.prune import shapes
from compressor.stages.prune.spec import PruneSpec

MAX_COMBINATIONS = 1_000_000  # shapes (before the MLP width) a search may enumerate; more: constrain the target


def non_embedding_params(config: dict) -> int:
    """Parameters outside the input embedding and the lm_head (counted once when tied), as the stage counts them."""
    s = estimate.shape(config)
    embeddings = s["vocab"] * s["hidden"] * (1 if config.get("tie_word_embeddings", False) else 2)
    return estimate.param_count(config) - embeddings


@dataclass(frozen=True)
class Budget:
    value: float  # parameters to aim for, in `measure`
    measure: str  # "params" (an absolute budget: every parameter) or "non_embedding_params" (a fraction)
    tolerance: float
    source: int  # the source model's count in the same measure

    @property
    def lo(self) -> float:
        return self.value * (1 - self.tolerance)

    @property
    def hi(self) -> float:
        return self.value * (1 + self.tolerance)

    def count(self, config: dict) -> int:
        return estimate.param_count(config) if self.measure == "params" else non_embedding_params(config)

    def meets(self, count: float) -> bool:
        return self.lo <= count <= self.hi

    def describe(self) -> str:
        what = "parameters" if self.measure == "params" else "non-embedding parameters"
        return (
            f"{self.value:,.0f} {what} ({self.value / self.source:.0%} of the source's {self.source:,}) "
            f"+/- {self.tolerance * 100:g}%, i.e. {math.ceil(self.lo):,}..{math.floor(self.hi):,}"
        )


@dataclass(frozen=True)
class Candidate:
    shape: Shape
    params: int
    non_embedding_params: int
    config: dict  # the pruned model's config.json (layer_types predicted as shapes.output_config does)

    def label(self) -> str:
        s = self.shape
        return (
            f"hidden {s.hidden_size}, mlp {s.intermediate_size}, heads {s.num_attention_heads}/"
            f"{s.num_key_value_heads} kv, layers {s.num_layers}"
        )

    def as_dict(self) -> dict:
        return {"shape": self.shape.as_dict(), "params": self.params, "non_embedding_params": self.non_embedding_params}


@dataclass
class Space:
    budget: Budget
    candidates: list[Candidate]  # the ones that will be scored (at most max_candidates, spread over all)
    total: int  # shapes that meet the budget, before the cap
    kept_layers: Optional[list[int]] = None  # the layers keep_layers / drop_layers name (None: chosen by importance)


def budget_of(spec: PruneSpec, config: dict) -> Budget:
    params, tolerance = spec.target.params, spec.search_settings().tolerance
    if params <= 1:
        source = non_embedding_params(config)
        return Budget(params * source, "non_embedding_params", tolerance, source)
    source = estimate.param_count(config)
    if params > source:
        raise UserError(
            f"prune.target.params: {params:,.0f} is more than the source's {source:,} parameters; "
            "pruning only removes (a fraction <= 1 counts the source's non-embedding parameters)"
        )
    return Budget(params, "params", tolerance, source)


def _allowed(spec: PruneSpec, field: str, source: int, default: list[int], align: int) -> list[int]:
    """Values a dimension may take: the fixed one, those of its range, or `default` (all within the source)."""
    value = getattr(spec.target, field)
    if isinstance(value, int):
        if value > source:
            raise UserError(f"prune.target.{field}: {value} is larger than the source's {source}; pruning only removes")
        return [value]
    if value is None:
        return default
    lo, hi = value
    inside = [v for v in default if lo <= v <= hi]
    if not inside:
        raise UserError(
            f"prune.target.{field}: no allowed value in [{lo}, {hi}] (the source has {source}; widths "
            f"must be multiples of align={align} or the source's own)"
        )
    return inside


def _widths(spec: PruneSpec, name: str, source: int, align: int) -> list[int]:
    """Multiples of `align` up to the source's width, and the source's own (kept whole, aligned or not)."""
    value = spec.target.fixed(name)
    if value is not None and value != source and value % align:
        raise UserError(
            f"prune.target.{name}: {value} is not a multiple of align={align}; round it "
            f"(e.g. {max(align, value // align * align)}){shapes.or_set_align(spec)}"
        )
    return _allowed(spec, name, source, sorted({*range(align, source + 1, align), source}), align)


def _heads(spec: PruneSpec, src, align: int) -> list[int]:
    """Query head counts whose attention width (heads x head_dim, o_proj's input, which quantize groups) is a
    multiple of `align`, and the source's own."""
    aligned = [h for h in range(1, src.num_attention_heads + 1) if h * src.head_dim % align == 0]
    value = spec.target.fixed("num_attention_heads")
    if value is not None and value != src.num_attention_heads and value * src.head_dim % align:
        raise UserError(
            f"prune.target.num_attention_heads: {value} heads x head_dim {src.head_dim} = "
            f"{value * src.head_dim} is not a multiple of align={align}; use a multiple of "
            f"{align // math.gcd(align, src.head_dim)} heads{shapes.or_set_align(spec)}"
        )
    return _allowed(
        spec, "num_attention_heads", src.num_attention_heads, sorted({*aligned, src.num_attention_heads}), align
    )


def _nearest_width(budget: Budget, count, widths: list[int]) -> Optional[int]:
    """The allowed MLP width (sorted `widths`) whose count, linear in it, is nearest the budget; None when even that
    one misses the tolerance."""
    base, slope = count(0), count(1) - count(0)
    i = bisect.bisect_left(widths, (budget.value - base) / slope if slope else 0)
    best = min(widths[max(0, i - 1) : i + 1], key=lambda w: abs(count(w) - budget.value))
    return best if budget.meets(count(best)) else None


@dataclass(frozen=True)
class _MlpWidth:
    """The shapes that differ from `base` only in their MLP width, and their counts in the budget's measure."""

    budget: Budget
    source: dict
    kept_layers: Optional[list[int]]
    base: Shape

    def shape(self, width: int) -> Shape:
        return dataclasses.replace(self.base, intermediate_size=width)

    def config(self, width: int) -> dict:
        return shapes.output_config(self.source, self.shape(width), self.kept_layers)

    def count(self, width: int) -> int:
        return self.budget.count(self.config(width))

    def point(self, width: int) -> tuple[int, Shape]:
        return self.count(width), self.shape(width)


def search_space(spec: PruneSpec, config: dict) -> Space:
    """The candidates a budget allows, or a UserError naming the numbers when there are none."""
    src = shapes.source_shape(config)
    llama_rule = shapes.SUPPORTED[shapes.architecture(config)]  # LlamaConfig wants hidden % heads == 0
    budget = budget_of(spec, config)
    align = spec.search_align
    explicit = spec.target.keep_layers is not None or spec.target.drop_layers is not None
    kept_layers = shapes.kept_layers_rule(spec, src.num_layers) if explicit else None
    depths = (
        [len(kept_layers)]
        if explicit
        else _allowed(spec, "num_layers", src.num_layers, list(range(1, src.num_layers + 1)), align)
    )
    hiddens = _widths(spec, "hidden_size", src.hidden_size, align)
    mlp_widths = _widths(spec, "intermediate_size", src.intermediate_size, align)
    kvs = _allowed(
        spec,
        "num_key_value_heads",
        src.num_key_value_heads,
        list(range(1, src.num_key_value_heads + 1))
        if spec.target.num_key_value_heads is not None
        else [src.num_key_value_heads],
        align,
    )
    heads = _heads(spec, src, align)
    combinations = len(hiddens) * len(kvs) * len(heads) * len(depths)
    if combinations > MAX_COMBINATIONS:
        raise UserError(
            f"prune.target: {combinations:,} shapes to enumerate (more than {MAX_COMBINATIONS:,}); fix "
            "or bound some dimensions (e.g. num_layers, or a [lo, hi] hidden_size range) or raise align"
        )

    found: list[Candidate] = []
    smallest = largest = None  # (count, shape) over every valid shape, to explain an empty result
    for kv in kvs:
        for h in heads:
            if h % kv or h // kv > src.heads_per_group:
                continue
            for hidden in hiddens:
                if llama_rule and hidden % h:
                    continue
                for layers in depths:
                    mlp = _MlpWidth(budget, config, kept_layers, Shape(hidden, 0, h, kv, layers, src.head_dim))
                    low, high = mlp.point(mlp_widths[0]), mlp.point(mlp_widths[-1])
                    smallest = low if smallest is None or low[0] < smallest[0] else smallest
                    largest = high if largest is None or high[0] > largest[0] else largest
                    width = _nearest_width(budget, mlp.count, mlp_widths)
                    if width is not None:
                        cfg = mlp.config(width)
                        found.append(
                            Candidate(mlp.shape(width), estimate.param_count(cfg), non_embedding_params(cfg), cfg)
                        )
    if not found:
        raise UserError(_no_shape(spec, budget, smallest, largest, align))
    found.sort(
        key=lambda c: (
            c.shape.num_layers,
            c.shape.hidden_size,
            c.shape.num_attention_heads,
            c.shape.num_key_value_heads,
            c.shape.intermediate_size,
        ),
        reverse=True,
    )
    return Space(budget, spread(found, spec.search_settings().max_candidates), len(found), kept_layers)


def spread(items: list, n: int) -> list:
    """At most n of `items`, evenly spaced over the list (the first and last included)."""
    if len(items) <= n:
        return list(items)
    if n == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _no_shape(spec: PruneSpec, budget: Budget, smallest, largest, align: int) -> str:
    fixed = [
        f"{name} {getattr(spec.target, name)}"
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "num_layers",
            "keep_layers",
            "drop_layers",
        )
        if getattr(spec.target, name) is not None
    ]
    given = f" with {', '.join(fixed)}" if fixed else ""
    if smallest is None:
        return (
            f"prune.target: no shape{given} is valid at all (query heads must be a multiple of the KV heads, at "
            f"most the source's heads per KV group, and divide hidden_size); loosen those constraints"
        )

    def show(point) -> str:
        return f"{point[0]:,} ({Candidate(point[1], 0, 0, {}).label()})"

    if budget.hi < smallest[0]:
        why = f"the smallest aligned shape{given} has {show(smallest)}: the budget is too small for it"
    elif budget.lo > largest[0]:
        why = f"the largest shape{given} has only {show(largest)}: the budget is too large for it"
    else:
        why = (
            f"the shapes{given} range from {show(smallest)} to {show(largest)}, but none lands in the band at "
            f"multiples of align={align}; raise search.tolerance or loosen the constraints"
        )
    return f"prune.target.params: no shape meets the budget of {budget.describe()}; {why}"


def check_group_size(space: Space, spec: PruneSpec) -> None:
    """A later quantize stage's group size must divide every candidate's widths (its int4 kernels refuse others),
    and only prune.align can see to that for shapes chosen at run time: refuse, naming both numbers and a fix that
    is not already in place."""
    group = spec.quantize_group_size or spec._later_group_size
    if not group or group <= 0:
        return
    odd = [c for c in space.candidates if shapes.group_size_warnings(c.shape, group)]
    if not odd:
        return
    align = spec.search_align
    fix = (
        f"set prune.align to {math.lcm(group, align)} so every shape the search may choose quantizes"
        if math.lcm(group, align) != align
        else "the misaligned width is one the source has and the search keeps whole; bound that dimension "
        "below it in prune.target (e.g. a [lo, hi] range) or give the quantize stage a group size that divides it"
    )
    raise UserError(
        f"prune.align: {len(odd)} of the {len(space.candidates)} candidate shapes have widths the later quantize "
        f"group size {group} does not divide (e.g. {odd[0].label()}, {_attention_width(odd[0])}); {fix}"
    )


def _attention_width(candidate: Candidate) -> str:
    s = candidate.shape
    return f"attention width {s.num_attention_heads} x {s.head_dim} = {s.num_attention_heads * s.head_dim}"


def cached_space(spec: PruneSpec, config: dict) -> Space:
    """search_space, computed once per (spec, config) in this process: check, flops, plan notes and the stage ask
    (quantize_group_size, which `plan` fills in, changes no candidate)."""
    # The JSON round trip drops the private later group size: carry what it resolves to as an explicit align.
    spec = spec.model_copy(update={"quantize_group_size": None, "align": spec.search_align})
    return _space(spec.model_dump_json(), json.dumps(config, sort_keys=True, default=str))


@lru_cache(maxsize=16)
def _space(spec_json: str, config_json: str) -> Space:
    return search_space(PruneSpec.model_validate_json(spec_json), json.loads(config_json))


def ranks_layers(spec: PruneSpec, config: dict) -> bool:
    """Whether some candidate drops layers chosen by importance (depth_metric=loss then adds a pass per layer)."""
    space, layers = cached_space(spec, config), shapes.source_shape(config).num_layers
    return space.kept_layers is None and any(c.shape.num_layers < layers for c in space.candidates)


def search_source(spec: PruneSpec, data: dict):
    """(name, DataSource) the short distillations read, from the pipeline's `data:` (None when it is not there)."""
    name = spec.search_settings().data or spec.calibration or (next(iter(data)) if len(data) == 1 else None)
    return name, data.get(name) if name else None


def search_flops(spec: PruneSpec, config: dict, pipeline, teacher_config: Optional[dict]) -> dict[str, float]:
    """Estimated FLOPs of the search: scoring every candidate (a forward over score_samples calibration sequences),
    the top_k short distillations (teacher forward + student forward and backward per token) and their held-out
    losses. Candidates are priced at their mean cost: which ones make the top_k is known only at run time."""
    settings = spec.search_settings()
    space = cached_space(spec, config)
    samples, seq_len = estimate.calibration_size(spec.calibration, spec.samples, spec.seq_len, pipeline, 1024)
    name, source = search_source(spec, pipeline.data)
    short = settings.distill_spec(name or "search") if settings.steps > 0 else None
    distill_seq = (short.seq_len if short else None) or (source.seq_len if source else seq_len)
    heldout = pipeline.data.get(settings.heldout) if settings.heldout else source
    heldout_seq = heldout.seq_len if heldout else seq_len

    def mean(fn) -> float:
        return sum(fn(c.config) for c in space.candidates) / len(space.candidates)

    scoring = (
        len(space.candidates)
        * min(settings.score_samples, samples)
        * seq_len
        * mean(lambda c: estimate.forward_flops_per_token(c, seq_len))
    )
    top = min(settings.top_k, len(space.candidates))
    distilled = top if settings.steps > 0 and top > 1 else 0
    teacher = teacher_config or config
    tokens = settings.steps * short.global_batch * distill_seq if short else 0
    distills = (
        distilled
        * tokens
        * (
            estimate.forward_flops_per_token(teacher, distill_seq)
            + 3 * mean(lambda c: estimate.forward_flops_per_token(c, distill_seq))
        )
    )
    heldout_passes = (
        2
        * distilled
        * settings.heldout_samples
        * heldout_seq
        * mean(lambda c: estimate.forward_flops_per_token(c, heldout_seq))
    )
    return {
        "scoring": scoring,
        "short_distills": distills + heldout_passes,
        "total": scoring + distills + heldout_passes,
    }
