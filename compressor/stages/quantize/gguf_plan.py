"""Which ggml type each tensor of a Llama-family model gets in a GGUF file, from config.json alone (torch-free, so
`validate` and `plan` decide it before anything is loaded).

The rules are llama-quantize's (src/llama-quant.cpp, `llama_tensor_get_type_impl` and `tensor_type_fallback`,
for dense models without an importance matrix):
  - norms (1-D) stay F32;
  - the output projection (or the token embeddings when they are tied to it) gets Q6_K, or Q8_0 for Q8_0 files
    and when its row (hidden_size) is not a multiple of the base type's block;
  - Q4_K_M / Q5_K_M: attn_v and ffn_down get Q6_K in the first and last eighth of the layers and every third layer
    between (`use_more_bits`); Q4_K_S: attn_v in the first 4 layers and ffn_down in the first eighth get Q5_K;
    a 70B-class model (80 layers with grouped KV heads) keeps attn_v at Q5_K at least;
  - everything else gets the file type's base type (Q4_K for Q4_K_*, Q5_K for Q5_K_*, ...).
A row whose length is not a multiple of the chosen type's block (256 weights for K types, 32 for the others)
cannot be stored in it: llama-quantize then falls back to Q5_0 / Q5_1 / Q8_0 for Q4_K / Q5_K / Q6_K, and to F16
when even 32 does not divide the row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

BLOCK = {"F32": 1, "F16": 1, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
BASE = {
    "Q4_0": "Q4_0",
    "Q8_0": "Q8_0",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # same block of 32 for every legacy type
# Bits per weight of each type (block bytes * 8 / block weights), for sizes and the summary's bit width.
BITS_PER_WEIGHT = {
    "F32": 32.0,
    "F16": 16.0,
    "Q4_0": 4.5,
    "Q5_0": 5.5,
    "Q5_1": 6.0,
    "Q8_0": 8.5,
    "Q4_K": 4.5,
    "Q5_K": 5.5,
    "Q6_K": 6.5625,
}
NOMINAL_BITS = {"Q4_0": 4, "Q8_0": 8, "Q4_K_S": 4, "Q4_K_M": 4, "Q5_K_S": 5, "Q5_K_M": 5, "Q6_K": 6}
ARCHITECTURES = ("llama", "mistral")  # what llama.cpp's `llama` architecture (and this writer) covers

# HF name -> GGUF name of the per-layer tensors of llama.cpp's `llama` architecture (gguf.TensorNameMap's choice).
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


@dataclass(frozen=True)
class Tensor:
    gguf_name: str  # e.g. "blk.3.ffn_down.weight"
    hf_name: str  # e.g. "model.layers.3.mlp.down_proj.weight"
    shape: tuple[int, ...]  # torch order: (out_features, in_features) for matrices
    ggml_type: str  # what is written
    wanted: str  # what llama.cpp's mixture asks for, before a fallback

    @property
    def fell_back(self) -> bool:
        return self.ggml_type != self.wanted


def shapes(config: dict) -> Optional[dict]:
    """The dimensions the tensors need; None when config.json lacks them."""
    hidden, inter, heads = config.get("hidden_size"), config.get("intermediate_size"), config.get("num_attention_heads")
    layers, vocab = config.get("num_hidden_layers"), config.get("vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, inter, heads, layers, vocab)):
        return None
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "hidden": hidden,
        "inter": inter,
        "heads": heads,
        "kv": kv,
        "head_dim": head_dim,
        "layers": layers,
        "vocab": vocab,
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def llama_tensors(config: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(gguf name, HF name, shape) of every tensor, in the order they are written."""
    s = shapes(config)
    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    layer_shapes = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (s["inter"], h),
        "mlp.up_proj.weight": (s["inter"], h),
        "mlp.down_proj.weight": (h, s["inter"]),
    }
    out = [("token_embd.weight", "model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(s["layers"]):
        out += [(f"blk.{i}.{LAYER_TENSORS[n]}", f"model.layers.{i}.{n}", shape) for n, shape in layer_shapes.items()]
    out.append(("output_norm.weight", "model.norm.weight", (h,)))
    if not s["tied"]:
        out.append(("output.weight", "lm_head.weight", (s["vocab"], h)))
    return out


def file_name(quant_type: str) -> str:
    return f"model-{quant_type}.gguf"


def quantization_config(quant_type: str, tensors: list[Tensor]) -> dict:
    """config.json's `quantization_config` of a GGUF stage output: which file holds the weights (transformers loads
    it with `gguf_file=`), its type, the nominal bits and the parameter count (the file is not safetensors, so
    compressor.models.checkpoint reads the count here)."""
    return {
        "quant_method": "gguf",
        "gguf_file": file_name(quant_type),
        "quant_type": quant_type,
        "bits": NOMINAL_BITS[quant_type],
        "num_params": sum(_count(t.shape) for t in tensors),
    }


def use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mixture_type(gguf_name: str, shape: tuple[int, ...], quant_type: str, s: dict) -> str:
    """llama.cpp's choice for one tensor before any fallback."""
    base = BASE[quant_type]
    if len(shape) < 2:
        return "F32"
    if gguf_name == "output.weight" or (s["tied"] and gguf_name == "token_embd.weight"):
        if shape[-1] % BLOCK[base]:
            return "Q8_0"
        return "Q8_0" if base == "Q8_0" else "Q6_K"
    if gguf_name == "token_embd.weight":
        return base
    layer = int(gguf_name.split(".")[1])
    kind = gguf_name.split(".")[2]
    chosen = base
    if kind == "attn_v":
        if quant_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, s["layers"]):
            chosen = "Q6_K"
        elif quant_type == "Q4_K_S" and layer < 4:
            chosen = "Q5_K"
        if s["layers"] == 80 and s["kv"] != s["heads"] and chosen == "Q4_K":  # llama.cpp's LLM_TYPE_70B bump
            chosen = "Q5_K"
    elif kind == "ffn_down":
        if quant_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, s["layers"]):
            chosen = "Q6_K"
        elif quant_type == "Q4_K_S" and layer < s["layers"] // 8:
            chosen = "Q5_K"
    return chosen


def fallback(ggml_type: str, row: int) -> str:
    """llama-quantize's replacement for a type whose block does not divide the row length."""
    if row % BLOCK[ggml_type] == 0:
        return ggml_type
    legacy = FALLBACK.get(ggml_type)
    return legacy if legacy and row % BLOCK[legacy] == 0 else "F16"


def plan(config: dict, quant_type: str) -> list[Tensor]:
    """Every tensor with the type it is written in (fallbacks applied; see `misaligned` for which fell back)."""
    s = shapes(config)
    tensors = []
    for gguf_name, hf_name, shape in llama_tensors(config):
        wanted = mixture_type(gguf_name, shape, quant_type, s)
        tensors.append(Tensor(gguf_name, hf_name, shape, fallback(wanted, shape[-1]), wanted))
    return tensors


def misaligned(tensors: list[Tensor], quant_type: str) -> list[Tensor]:
    """Tensors that asked for the file's own base type and could not have it: what on_misaligned governs. (The
    output tensor's and the mixture's upgrades fall back to a type with as many bits or more, as llama.cpp does.)"""
    return [t for t in tensors if t.fell_back and t.wanted == BASE[quant_type]]


def bits_per_weight(tensors: list[Tensor]) -> float:
    """Average over all weights, embeddings and norms included (what `ls -l` of the file says, less the header)."""
    total = sum(_count(t.shape) for t in tensors)
    return sum(_count(t.shape) * BITS_PER_WEIGHT[t.ggml_type] for t in tensors) / total


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
