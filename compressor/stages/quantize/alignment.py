"""Which group size and kernel a quantize spec really gets for a model, decided from config.json alone.

GPTQ groups run along a linear layer's input channels. A width that the group size does not divide
quantizes fine, but the int4 kernels refuse it at load or forward time (CPU: "_weight_int4pack_mm_cpu:
expect K divisible by qGroupSize"; vLLM likewise). So the decision is made here, torch-free, where
`compressor validate` and `plan` can report it before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from compressor.config.stages import QuantizeSpec
from compressor.errors import UserError

# Candidates for on_misaligned=largest_divisor, largest first. GPTQModel also accepts 16, but the CPU int4
# kernel (TorchAten, picked by default on CPU) refuses it, so it is never chosen automatically.
DIVISOR_CANDIDATES = (1024, 512, 256, 128, 64, 32)
INT8_BACKEND = "gptq_torch_int8"  # GPTQModel's CPU kernel that accepts a partial last group
INT8_MAX_GROUP = 128  # its largest supported group size


@dataclass(frozen=True)
class Linear:
    """One kind of linear layer in every decoder block, with the config field that sets its input width."""

    name: str  # e.g. "mlp.down_proj"
    in_features: int
    source: str  # e.g. "intermediate_size"


@dataclass
class Resolution:
    group_size: int  # what GPTQ runs with
    backend: Optional[str]  # kernel pinned into the checkpoint, or None for GPTQModel's automatic choice
    misaligned: list[Linear] = field(default_factory=list)  # layers the requested group size did not divide
    warnings: list[str] = field(default_factory=list)


def linear_layers(config: dict) -> Optional[list[Linear]]:
    """The decoder's linear layers (Llama-family names); None when config.json lacks the fields."""
    hidden, inter, heads = config.get("hidden_size"), config.get("intermediate_size"), config.get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, inter, heads)):
        return None
    head_dim = config.get("head_dim") or hidden // heads
    attn_out = heads * head_dim
    return [
        *(Linear(f"self_attn.{p}", hidden, "hidden_size") for p in ("q_proj", "k_proj", "v_proj")),
        Linear("self_attn.o_proj", attn_out, f"num_attention_heads*head_dim = {heads}*{head_dim}"),
        *(Linear(f"mlp.{p}", hidden, "hidden_size") for p in ("gate_proj", "up_proj")),
        Linear("mlp.down_proj", inter, "intermediate_size"),
    ]


def misaligned(layers: list[Linear], group_size: int) -> list[Linear]:
    return [] if group_size == -1 else [lin for lin in layers if lin.in_features % group_size]


def largest_divisor(layers: list[Linear], group_size: int) -> int:
    """The largest candidate group size <= the requested one that divides every layer; -1 (per channel) if none."""
    widths = {lin.in_features for lin in layers}
    for g in DIVISOR_CANDIDATES:
        if g <= group_size and all(w % g == 0 for w in widths):
            return g
    return -1


def prune_suggestion(config: dict, lin: Linear, group_size: int) -> str:
    """An aligned prune target for this layer's width, e.g. "intermediate_size=384"."""
    if lin.source in ("hidden_size", "intermediate_size"):
        aligned = max(group_size, lin.in_features // group_size * group_size)
        return f"{lin.source}={aligned}"
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = lin.in_features // heads
    # Fewer query heads, kept a multiple of the KV heads so that every KV group keeps the same size.
    for n in range(heads, 0, -1):
        if n % kv == 0 and (n * head_dim) % group_size == 0:
            return f"num_attention_heads={n}"
    return f"a head count whose heads*head_dim ({head_dim}) is a multiple of {group_size}"


def describe(lin: Linear, num_layers: Optional[int]) -> str:
    where = f"model.layers.*.{lin.name}" + (f" (all {num_layers} layers)" if num_layers else "")
    return f"{where}: in_features {lin.in_features} from {lin.source}"


def resolve(spec: QuantizeSpec, config: dict) -> Resolution:
    """Group size and kernel for this model; UserError for on_misaligned=error with a misaligned layer."""
    pinned = spec.backend if spec.backend not in (None, "auto") else None
    layers = linear_layers(config) if config else None
    if layers is None:
        note = [] if not config else [
            "quantize: config.json has no hidden_size/intermediate_size/num_attention_heads; group-size alignment "
            "is not checked before quantizing"
        ]
        return Resolution(spec.group_size, pinned, warnings=note)
    bad = misaligned(layers, spec.group_size)
    if not bad:
        note = [] if spec.group_size != 16 or pinned else [
            "quantize: group_size 16: GPTQModel's CPU int4 kernel refuses it at run time; on CPU load the output "
            "with backend gptq_torch or gptq_torch_int8 (GPU kernels accept it)"
        ]
        return Resolution(spec.group_size, pinned, warnings=note)
    g = spec.group_size
    listing = "; ".join(describe(lin, config.get("num_hidden_layers")) for lin in bad)
    if spec.on_misaligned == "error":
        targets = ", ".join(dict.fromkeys(prune_suggestion(config, lin, g) for lin in bad))
        fit = largest_divisor(layers, g)
        raise UserError(
            f"quantize.group_size: {g} does not divide the input width of {listing}. The int4 kernels "
            f"(CPU and vLLM) refuse such layers. Prune to {targets}, or choose a group size that divides "
            f"every width ({f'largest here: {fit}' if fit > 0 else 'here only -1, per channel'}), or set "
            f"quantize.on_misaligned to largest_divisor or int8_kernel."
        )
    if spec.on_misaligned == "largest_divisor":
        chosen = largest_divisor(layers, g)
        per = "per-channel (-1)" if chosen == -1 else str(chosen)
        return Resolution(chosen, pinned, bad, [
            f"quantize: group_size {g} does not divide {listing}; using group_size {per} for every layer "
            f"(on_misaligned=largest_divisor)"
        ])
    if g > INT8_MAX_GROUP:
        raise UserError(
            f"quantize.on_misaligned: int8_kernel needs group_size <= {INT8_MAX_GROUP} ({INT8_BACKEND} supports no "
            f"larger groups), but group_size is {g} and does not divide {listing}."
        )
    return Resolution(g, pinned or INT8_BACKEND, bad, [
        f"quantize: group_size {g} does not divide {listing}; keeping {g} and pinning the {INT8_BACKEND} kernel "
        f"(on_misaligned=int8_kernel). It runs on CPU only; vLLM and the GPU int4 kernels cannot load this checkpoint."
    ])


def output_config(config: dict, spec: QuantizeSpec, resolution: Resolution) -> dict:
    """config.json of the quantized checkpoint as far as known without running (the quantization_config part)."""
    quant = {
        "quant_method": "gptq", "bits": spec.bits, "group_size": resolution.group_size,
        "desc_act": spec.desc_act, "sym": spec.sym, "checkpoint_format": "gptq",
    }
    if resolution.backend:
        quant["backend"] = resolution.backend
    return {**config, "quantization_config": quant}
