"""Slice a Llama-family model to a PrunePlan, in place, and write a checkpoint that loads anywhere.

In place, because each sliced weight replaces its source tensor at once: peak memory stays near one model,
not two. Every weight is cut by module role (see `_slice_layer`); afterwards the shapes are compared with a
model built from the new config on the meta device, so a parameter this file does not know about fails
loudly instead of being written with the wrong shape."""

from __future__ import annotations

import torch
from torch import nn

from compressor.stages.prune.plan import PrunePlan


def _take(param: nn.Parameter | None, dim: int, index: torch.Tensor) -> None:
    if param is not None:
        param.data = param.data.index_select(dim, index.to(param.device)).contiguous()


def _rows(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep output features `index` (weight rows and bias)."""
    _take(linear.weight, 0, index)
    _take(linear.bias, 0, index)
    linear.out_features = len(index)


def _cols(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep input features `index` (weight columns; the bias belongs to outputs and stays)."""
    _take(linear.weight, 1, index)
    linear.in_features = len(index)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight rows of the given heads in a q/k/v projection (heads are contiguous blocks of head_dim rows)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _slice_layer(layer: nn.Module, plan: PrunePlan, i: int) -> None:
    attn, mlp, d = layer.self_attn, layer.mlp, plan.source.head_dim
    if plan.heads is not None:
        q_rows, kv_rows = head_rows(plan.heads[i], d), head_rows(plan.kv_heads[i], d)
        _rows(attn.q_proj, q_rows)
        _rows(attn.k_proj, kv_rows)
        _rows(attn.v_proj, kv_rows)
        _cols(attn.o_proj, q_rows)
        attn.num_key_value_groups = plan.target.heads_per_group
    if plan.neurons is not None:
        _rows(mlp.gate_proj, plan.neurons[i])
        _rows(mlp.up_proj, plan.neurons[i])
        _cols(mlp.down_proj, plan.neurons[i])
    if plan.hidden is not None:
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _cols(reader, plan.hidden)
        for writer in (attn.o_proj, mlp.down_proj):
            _rows(writer, plan.hidden)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _take(norm.weight, 0, plan.hidden)


def _update_config(config, plan: PrunePlan) -> None:
    t = plan.target
    config.hidden_size = t.hidden_size
    config.intermediate_size = t.intermediate_size
    config.num_attention_heads = t.num_attention_heads
    config.num_key_value_heads = t.num_key_value_heads
    config.num_hidden_layers = t.num_layers
    config.head_dim = t.head_dim  # explicit: hidden / heads no longer gives it
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in plan.layers]


def _verify_shapes(model) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(model.config)
    want = {name: tuple(p.shape) for name, p in reference.state_dict().items()}
    have = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    wrong = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
    if wrong:
        details = "; ".join(f"{n}: have {have.get(n)}, config wants {want.get(n)}" for n in wrong[:5])
        raise RuntimeError(f"pruned weights do not match the pruned config ({len(wrong)} tensors): {details}")


@torch.no_grad()
def apply_plan(model, plan: PrunePlan) -> None:
    """Prune `model` (a Llama/Mistral/Qwen2 *ForCausalLM) to `plan`, in place; its config follows."""
    decoder = model.base_model
    if len(plan.layers) != len(decoder.layers):
        decoder.layers = nn.ModuleList(decoder.layers[i] for i in plan.layers)
        for new_index, layer in enumerate(decoder.layers):
            layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position
    for i, layer in zip(plan.layers, decoder.layers):
        _slice_layer(layer, plan, i)
    if plan.hidden is not None:
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        _take(embed.weight, 1, plan.hidden)
        embed.embedding_dim = len(plan.hidden)
        if head.weight is not embed.weight:  # tied embeddings share one Parameter: slice it once
            _take(head.weight, 1, plan.hidden)
        head.in_features = len(plan.hidden)
        _take(decoder.norm.weight, 0, plan.hidden)
    _update_config(model.config, plan)
    _verify_shapes(model)
