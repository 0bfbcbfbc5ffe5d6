"""Source and target shapes, read from config.json alone (torch-free): the checks that run before any compute."""

from __future__ import annotations

import math
from typing import Optional

from compressor.errors import UserError
from compressor.models.shapes import Shape
from compressor.stages.prune.spec import PruneSpec

# architecture -> whether its transformers config refuses hidden_size % num_attention_heads != 0
# (LlamaConfig.validate_architecture does, even with an explicit head_dim; Mistral and Qwen2 do not).
SUPPORTED = {"LlamaForCausalLM": True, "MistralForCausalLM": False, "Qwen2ForCausalLM": False}


def architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    supported = [a for a in archs if a in SUPPORTED]
    if not supported:
        found = ", ".join(archs) or f"model_type {config.get('model_type', 'unknown')!r}"
        raise UserError(
            f"prune: architecture {found} is not supported; structured pruning handles "
            f"{', '.join(SUPPORTED)} (their weights are sliced by name, so another layout would be cut wrongly)"
        )
    return supported[0]


def source_shape(config: dict) -> Shape:
    return Shape.from_config(config)


def kept_layers_rule(spec: PruneSpec, n_layers: int) -> Optional[list[int]]:
    """The kept layer indices when the spec names them; None when they are chosen by importance."""
    t = spec.target
    for field, given in (("keep_layers", t.keep_layers), ("drop_layers", t.drop_layers)):
        if given is None:
            continue
        bad = [i for i in given if not 0 <= i < n_layers]
        if bad:
            raise UserError(f"prune.target.{field}: {bad} out of range; the source has layers 0..{n_layers - 1}")
        if len(set(given)) != len(given):
            raise UserError(f"prune.target.{field}: {given} lists a layer twice")
    if t.keep_layers is not None:
        if not t.keep_layers:
            raise UserError("prune.target.keep_layers: empty; keep at least one layer")
        return sorted(t.keep_layers)
    if t.drop_layers is not None:
        kept = [i for i in range(n_layers) if i not in set(t.drop_layers)]
        if not kept:
            raise UserError("prune.target.drop_layers: drops every layer; keep at least one")
        return kept
    if t.num_layers is None:
        return list(range(n_layers))
    return None


def target_shape(spec: PruneSpec, config: dict) -> Shape:
    """The output shape, or a UserError naming the first bad field."""
    src = source_shape(config)
    t = spec.target
    kept = kept_layers_rule(spec, src.num_layers)
    out = Shape(
        hidden_size=t.hidden_size or src.hidden_size,
        intermediate_size=t.intermediate_size or src.intermediate_size,
        num_attention_heads=t.num_attention_heads or src.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads or src.num_key_value_heads,
        num_layers=len(kept) if kept is not None else t.num_layers,
        head_dim=src.head_dim,
    )
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_layers"):
        new, old = getattr(out, field), getattr(src, field)
        if new > old:
            raise UserError(f"prune.target.{field}: {new} is larger than the source's {old}; pruning only removes")
    if out.num_attention_heads % out.num_key_value_heads:
        raise UserError(
            f"prune.target.num_attention_heads: {out.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {out.num_key_value_heads}; every KV head serves the same number of query heads"
        )
    if out.heads_per_group > src.heads_per_group:
        raise UserError(
            f"prune.target.num_attention_heads: {out.num_attention_heads} heads over {out.num_key_value_heads} KV heads "
            f"means {out.heads_per_group} per KV group, but the source's groups have {src.heads_per_group}; "
            f"keep more KV heads or fewer query heads"
        )
    for field in ("hidden_size", "intermediate_size"):
        new, old = getattr(out, field), getattr(src, field)
        if new != old and new % spec.align:
            raise UserError(
                f"prune.target.{field}: {new} is not a multiple of align={spec.align}; "
                f"round it (e.g. {max(spec.align, new // spec.align * spec.align)}){or_set_align(spec)}"
            )
    attention = out.num_attention_heads * out.head_dim  # o_proj's input width, which quantize groups too
    if out.num_attention_heads != src.num_attention_heads and attention % spec.align:
        raise UserError(
            f"prune.target.num_attention_heads: {out.num_attention_heads} heads x head_dim {out.head_dim} = "
            f"{attention} is not a multiple of align={spec.align}; use a multiple of "
            f"{spec.align // math.gcd(spec.align, out.head_dim)} heads{or_set_align(spec)}"
        )
    if SUPPORTED[architecture(config)] and out.hidden_size % out.num_attention_heads:
        raise UserError(
            f"prune.target.hidden_size: {out.hidden_size} is not a multiple of num_attention_heads "
            f"{out.num_attention_heads}; transformers' LlamaConfig refuses to load such a checkpoint"
        )
    return out


def or_set_align(spec: PruneSpec) -> str:
    """The hint to set prune.align, unless the user already set it (never suggest what is in place)."""
    return "" if "align" in spec.model_fields_set else " or set prune.align"


def group_size_warnings(shape: Shape, group_size: Optional[int]) -> list[str]:
    """GPTQ groups run along each linear layer's input: hidden (q/k/v/gate/up), heads*head_dim (o), MLP (down)."""
    if not group_size or group_size <= 0:
        return []
    inputs = {
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads * head_dim": shape.num_attention_heads * shape.head_dim,
    }
    return [
        f"prune.target: {name} = {width} is not a multiple of the quantize group size {group_size}; "
        f"GPTQ's CPU int4 kernel will refuse it (prune to a multiple, or let quantize pick a dividing group size)"
        for name, width in inputs.items()
        if width % group_size
    ]


def output_config(config: dict, shape: Shape, kept_layers: Optional[list[int]]) -> dict:
    """config.json of the pruned model: new widths, an explicit head_dim, per-layer lists cut to the kept layers."""
    out = dict(config)
    out.update(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        num_hidden_layers=shape.num_layers,
        head_dim=shape.head_dim,  # explicit: hidden / heads no longer gives it
    )
    if isinstance(config.get("layer_types"), list):
        # Layers chosen later by importance: predict the first ones (exact only when all types agree).
        kept = kept_layers if kept_layers is not None else range(shape.num_layers)
        out["layer_types"] = [config["layer_types"][i] for i in kept]
    return out
