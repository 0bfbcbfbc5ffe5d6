"""From importance scores and a target shape to the exact indices that survive (all kept in source order)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from compressor.models.shapes import Shape
from compressor.stages.prune.importance import Importance


@dataclass
class PrunePlan:
    """What to keep. `None` means "everything" (that dimension is left untouched, bit for bit).
    Per-layer lists are indexed by the *source* layer number."""

    source: Shape
    target: Shape
    layers: list[int]
    hidden: Optional[torch.Tensor] = None
    heads: Optional[list[torch.Tensor]] = None  # query heads kept per layer
    kv_heads: Optional[list[torch.Tensor]] = None  # KV heads kept per layer
    neurons: Optional[list[torch.Tensor]] = None

    def summary(self) -> dict:
        def listed(xs):
            return None if xs is None else [x.tolist() for x in xs]

        return {
            "kept_layers": self.layers,
            "kept_hidden": None if self.hidden is None else self.hidden.tolist(),
            "kept_heads": listed(self.heads),
            "kept_kv_heads": listed(self.kv_heads),
            "kept_neurons": listed(self.neurons),
        }


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (ties go to the lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def select_heads(scores: torch.Tensor, src: Shape, out: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Query heads are ranked within their KV group; with fewer KV heads, whole groups go first (by summed score)."""
    groups = scores.view(src.num_key_value_heads, src.heads_per_group)
    kept_groups = top(groups.sum(1), out.num_key_value_heads)
    heads = [g * src.heads_per_group + top(groups[g], out.heads_per_group) for g in kept_groups.tolist()]
    return torch.cat(heads), kept_groups


def layer_ranking(importance: Importance, depth_metric: str) -> torch.Tensor:
    if depth_metric == "loss":
        if importance.loss_increase is None:
            raise ValueError("depth_metric='loss' needs importance.loss_increase")
        return importance.loss_increase
    return importance.block_importance


def make_plan(
    importance: Importance, src: Shape, out: Shape, kept_layers: Optional[list[int]], depth_metric: str = "bi"
) -> PrunePlan:
    """kept_layers: explicit indices, or None to keep the out.num_layers most important ones."""
    if kept_layers is None:
        kept_layers = top(layer_ranking(importance, depth_metric), out.num_layers).tolist()
    plan = PrunePlan(source=src, target=out, layers=list(kept_layers))
    if out.hidden_size != src.hidden_size:
        plan.hidden = top(importance.hidden, out.hidden_size)
    if out.intermediate_size != src.intermediate_size:
        plan.neurons = [top(importance.neurons[i], out.intermediate_size) for i in range(src.num_layers)]
    if (out.num_attention_heads, out.num_key_value_heads) != (src.num_attention_heads, src.num_key_value_heads):
        chosen = [select_heads(importance.heads[i], src, out) for i in range(src.num_layers)]
        plan.heads = [h for h, _ in chosen]
        plan.kv_heads = [g for _, g in chosen]
    return plan
