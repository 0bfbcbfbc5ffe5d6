"""Minitron activation importance from one calibration pass.

Forward hooks reduce every activation to a per-channel running sum as soon as it is produced, so nothing
bigger than one batch's activation of one module is ever alive:
  heads    - norm of each head's output (the o_proj input, split into heads)
  neurons  - |activation| at the down_proj input
  channels - |RMSNorm output|, summed over every norm of every layer and the final norm
  layers   - block importance, 1 - cos(layer input, layer output), averaged over tokens
The pass runs the decoder only (no lm_head): no logits are needed, so it costs less than a plain forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from compressor.models.loss import lm_loss

Progress = Callable[..., Iterable]


class Accumulator:
    """Running `<batch>_<sequence>` reduction (e.g. l2_mean) of [batch, seq, channels] magnitudes into [channels]."""

    def __init__(self, aggregation: str):
        self.batch_op, self.seq_op = aggregation.split("_")
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        per_sample = x.mean(1) if self.seq_op == "mean" else x.pow(2).sum(1).sqrt()
        contribution = per_sample.pow(2).sum(0) if self.batch_op == "l2" else per_sample.sum(0)
        self.total = contribution if self.total is None else self.total + contribution
        self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.total.sqrt() if self.batch_op == "l2" else self.total / self.count


@dataclass
class Importance:
    hidden: torch.Tensor  # [hidden_size]
    heads: torch.Tensor  # [layers, num_attention_heads]
    neurons: torch.Tensor  # [layers, intermediate_size]
    block_importance: torch.Tensor  # [layers]
    loss_increase: Optional[torch.Tensor] = None  # [layers], LM loss without the layer minus the full model's
    base_loss: Optional[float] = None

    def to_json(self) -> dict:
        out = {
            "hidden": self.hidden.tolist(),
            "heads": self.heads.tolist(),
            "neurons": self.neurons.tolist(),
            "block_importance": self.block_importance.tolist(),
        }
        if self.loss_increase is not None:
            out.update(loss_increase=self.loss_increase.tolist(), base_loss=self.base_loss)
        return out


class _Collector:
    """Registers the hooks on a Llama-family decoder and turns the running sums into an Importance."""

    def __init__(self, decoder: nn.Module, head_dim: int, aggregation: str):
        self.decoder, self.head_dim, self.aggregation = decoder, head_dim, aggregation
        n = len(decoder.layers)
        self.heads = [Accumulator(aggregation) for _ in range(n)]
        self.neurons = [Accumulator(aggregation) for _ in range(n)]
        self.norms: list[Accumulator] = []
        self.cos_sum: list = [0.0] * n  # per layer, a float64 tensor on the model's device once data flowed
        self.tokens = 0
        self.handles: list = []

    def _hook(self, module: nn.Module, fn, pre: bool = False, with_kwargs: bool = False) -> None:
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self.handles.append(register(fn, with_kwargs=with_kwargs))

    def __enter__(self) -> _Collector:
        for i, layer in enumerate(self.decoder.layers):
            self._hook(
                layer.self_attn.o_proj, lambda m, a, acc=self.heads[i]: acc.add(self._head_norms(a[0])), pre=True
            )
            self._hook(layer.mlp.down_proj, lambda m, a, acc=self.neurons[i]: acc.add(a[0].abs()), pre=True)
            self._hook(
                layer,
                lambda m, a, kw, out, i=i: self._block(i, a[0] if a else kw["hidden_states"], out),
                with_kwargs=True,
            )
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                self._watch_norm(norm)
        self._watch_norm(self.decoder.norm)
        return self

    def _head_norms(self, o_proj_input: torch.Tensor) -> torch.Tensor:
        """[batch, seq, heads * head_dim] -> [batch, seq, heads]: the norm of each head's output."""
        return torch.linalg.vector_norm(o_proj_input.unflatten(-1, (-1, self.head_dim)), dim=-1, dtype=torch.float32)

    def _watch_norm(self, norm: nn.Module) -> None:
        acc = Accumulator(self.aggregation)
        self.norms.append(acc)
        self._hook(norm, lambda m, a, out: acc.add(out.abs()))

    def _block(self, i: int, x_in: torch.Tensor, x_out) -> None:
        x_out = x_out[0] if isinstance(x_out, tuple) else x_out
        x_in, x_out = x_in.float(), x_out.float()
        # cosine_similarity's own kernel takes ~3x longer than these three last-dim reductions.
        norms = torch.linalg.vector_norm(x_in, dim=-1) * torch.linalg.vector_norm(x_out, dim=-1)
        cos = torch.linalg.vecdot(x_in, x_out) / norms.clamp_min(1e-8)  # [batch, seq]
        self.cos_sum[i] = self.cos_sum[i] + cos.sum(dtype=torch.float64)
        if i == 0:
            self.tokens += cos.numel()

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def result(self) -> Importance:
        return Importance(
            hidden=torch.stack([acc.value() for acc in self.norms]).sum(0).cpu(),
            heads=torch.stack([acc.value() for acc in self.heads]).cpu(),
            neurons=torch.stack([acc.value() for acc in self.neurons]).cpu(),
            block_importance=(1 - torch.stack(self.cos_sum).cpu() / self.tokens).float(),
        )


def _batches(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(blocks.split(batch_size))


def _no_progress(items, **_):
    return items


@torch.no_grad()
def estimate(
    model,
    blocks: torch.Tensor,
    head_dim: int,
    batch_size: int = 8,
    aggregation: str = "l2_mean",
    progress: Progress = _no_progress,
) -> Importance:
    """Activation importance of `model` (a *ForCausalLM) over [n, seq_len] calibration token blocks."""
    decoder, device = model.base_model, model.device
    batches = _batches(blocks, batch_size)
    with _Collector(decoder, head_dim, aggregation) as collector:
        for batch in progress(batches, total=len(batches), desc="prune: calibration"):
            decoder(input_ids=batch.to(device), use_cache=False)
    return collector.result()


class _SkipLayer(nn.Module):
    """Stands in for a decoder layer: passes the residual stream through untouched."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def loss_increase(
    model, blocks: torch.Tensor, batch_size: int = 8, progress: Progress = _no_progress
) -> tuple[float, torch.Tensor]:
    """LM loss with each layer dropped in turn, minus the full model's loss (one pass per layer)."""
    base = lm_loss(model, blocks, batch_size)
    layers = model.base_model.layers
    increases = []
    for i in progress(range(len(layers)), total=len(layers), desc="prune: layer-drop loss"):
        original, layers[i] = layers[i], _SkipLayer()
        try:
            increases.append(lm_loss(model, blocks, batch_size) - base)
        finally:
            layers[i] = original
    return base, torch.tensor(increases)
