"""The shape of a Llama / Mistral / Qwen2-style decoder, from its config.json alone (torch-free).

One module for what prune (its targets), quantize (group-size alignment of every linear layer) and plan
(parameter counts and FLOPs) need to know about a model's widths."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.errors import UserError


def _get(config: dict, key: str) -> int:
    if config.get(key) is None:
        raise UserError(
            f"model config has no {key!r}; compressor handles Llama, Mistral and Qwen2-style decoders "
            f"(model_type {config.get('model_type', 'unknown')!r})"
        )
    return int(config[key])


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_layers: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        """With Hugging Face's defaults filled in: as many KV heads as query heads, head_dim = hidden / heads."""
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        return cls(
            hidden_size=hidden,
            intermediate_size=_get(config, "intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            num_layers=_get(config, "num_hidden_layers"),
            head_dim=int(config.get("head_dim") or hidden // heads),
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def linears(self) -> list[tuple[str, int, int, str]]:
        """(name, in_features, out_features, what sets in_features) of the linear layers of ONE decoder layer."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        attn_in = f"num_attention_heads*head_dim = {self.num_attention_heads}*{self.head_dim}"
        return [
            ("self_attn.q_proj", h, q, "hidden_size"),
            ("self_attn.k_proj", h, kv, "hidden_size"),
            ("self_attn.v_proj", h, kv, "hidden_size"),
            ("self_attn.o_proj", q, h, attn_in),
            ("mlp.gate_proj", h, i, "hidden_size"),
            ("mlp.up_proj", h, i, "hidden_size"),
            ("mlp.down_proj", i, h, "intermediate_size"),
        ]


def vocab_size(config: dict) -> int:
    return _get(config, "vocab_size")
