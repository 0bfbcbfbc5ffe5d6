"""GGUF export: the model as one .gguf file that llama.cpp loads, quantized the way llama-quantize does.

GPTQModel's `gguf` method keeps its own safetensors layout; it does not write a .gguf. So this writes one with the
`gguf` package (GGUFWriter), laid out as llama.cpp's convert_hf_to_gguf.py lays out a Llama: `llama` architecture
metadata, Q and K projections permuted to ggml's rotary layout, the byte-level BPE vocabulary with merges and
special tokens, then every tensor in the type gguf_plan.py picks (K types from kquants.py, the others from
gguf.quants). Tensors are read from safetensors, encoded and written one at a time, so memory holds one tensor
(an 8B model's 1.5 GB embedding at most), never the model.

The stage output directory keeps config.json (with a `quantization_config` naming the file) and the tokenizer
beside the .gguf, so transformers loads it with `from_pretrained(dir, gguf_file=...)` (dequantized) and the
pipeline's evaluation scores exactly these weights."""

from __future__ import annotations

import json
import math
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np

from compressor.contract.context import StageContext
from compressor.contract.kind import StageResult
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.models import read_config
from compressor.stages.quantize import alignment, gguf_plan
from compressor.stages.quantize.gptq import source_dir
from compressor.stages.quantize.spec import GGUFSpec

# gguf.LlamaFileType: what `general.file_type` says the file is (llama.cpp prints it as the model's type).
FILE_TYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}
# llama.cpp's names for byte-level BPE pre-tokenizers (tokenizer.ggml.pre), told apart by tokenizer.json's
# pre_tokenizer steps as llama.cpp's own regexes define them (src/llama-vocab.cpp).
GPT2_STEP = {"type": "ByteLevel", "use_regex": True}
CL100K_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "gpt-2": [GPT2_STEP],
    "smollm": [{"type": "Digits", "individual_digits": True}, GPT2_STEP],
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": CL100K_REGEX}}, {"type": "ByteLevel", "use_regex": False}],
}


def quantize(spec: GGUFSpec, model: ModelRef, ctx: StageContext) -> StageResult:
    from compressor.models import load_tokenizer, save_tokenizer

    config = read_config(model, fetch=True)
    resolution = alignment.resolve(spec, config)
    for warning in resolution.warnings:
        ctx.info(f"warning: {warning}")
    src = source_dir(model)
    if src is None:
        raise UserError(f"quantize (gguf): the input model {model.path!r} is not on local disk")
    tokenizer = load_tokenizer(model.path, revision=model.revision)
    pre = pre_tokenizer(tokenizer)  # refuses a tokenizer llama.cpp would split differently, before any work

    out = ctx.model_dir
    save_tokenizer(tokenizer, out)
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    (out / "config.json").write_text(json.dumps(alignment.output_config(config, spec, resolution), indent=2))
    path = out / gguf_plan.file_name(spec.quant_type)
    tensors = resolution.tensors
    write(path, config, spec.quant_type, tensors, Weights(src), tokenizer, pre, name=ctx.run_name or src.name, ctx=ctx)

    types: dict[str, int] = {}
    for t in tensors:
        types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
    linear_in = sum(_linear_bytes_in(src).values())
    linear_out = sum(_nbytes(t) for t in tensors if _is_linear(t))
    details = {
        "method": "gguf",
        "quant_type": spec.quant_type,
        "format": "gguf",
        "file": path.name,
        "bits": gguf_plan.NOMINAL_BITS[spec.quant_type],
        "bits_per_weight": round(gguf_plan.bits_per_weight(tensors), 3),
        "tensor_types": types,
        "on_misaligned": spec.on_misaligned,
        "fallback_tensors": [t.gguf_name for t in tensors if t.fell_back],
        "tokenizer_pre": pre,
        "linear_bytes_in": linear_in or None,
        "linear_bytes_out": linear_out,
        "bytes_out": path.stat().st_size,
        "gguf_version": metadata.version("gguf"),
        "linear_compression": round(linear_in / linear_out, 3) if linear_in else None,
    }
    metrics = {"bits_per_weight": details["bits_per_weight"], "bytes_out": float(details["bytes_out"])}
    if details["linear_compression"]:
        metrics["linear_compression"] = details["linear_compression"]
    ctx.log_metrics(metrics)
    ctx.info(
        f"quantize: gguf {spec.quant_type} ({details['bits_per_weight']} bits per weight), {path.name}: "
        f"{details['bytes_out']} bytes, tensor types {types}"
    )
    return StageResult(metrics=metrics, details=details)


def write(
    path: Path,
    config: dict,
    quant_type: str,
    tensors: list[gguf_plan.Tensor],
    weights: Weights,
    tokenizer,
    pre: str,
    name: str,
    ctx: StageContext,
) -> None:
    """Header, metadata and tensor table first, then each tensor's bytes as it is encoded."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(FILE_TYPES[quant_type])
    rope_freqs = add_hparams(writer, config)
    add_vocab(writer, tokenizer, pre, config["vocab_size"])
    if rope_freqs is not None:
        writer.add_tensor_info(
            "rope_freqs.weight",
            rope_freqs.shape,
            np.float32,
            rope_freqs.nbytes,
            raw_dtype=gguf.GGMLQuantizationType.F32,
        )
    for t in tensors:
        writer.add_tensor_info(
            t.gguf_name, t.shape, np.float32, _nbytes(t), raw_dtype=gguf.GGMLQuantizationType[t.ggml_type]
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if rope_freqs is not None:
        writer.write_tensor_data(rope_freqs)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    for t in ctx.progress(tensors, total=len(tensors), desc="GGUF tensors"):
        weight = weights.get(t.hf_name)
        if tuple(weight.shape) != t.shape:
            raise UserError(
                f"quantize (gguf): tensor {t.hf_name} has shape {tuple(weight.shape)}, but config.json "
                f"implies {t.shape}"
            )
        if t.hf_name.endswith("q_proj.weight"):
            weight = rotary_permute(weight, heads)
        elif t.hf_name.endswith("k_proj.weight"):
            weight = rotary_permute(weight, kv)
        writer.write_tensor_data(encode(weight, t.ggml_type))
    writer.close()


def rotary_permute(weight, heads: int):
    """HF rotates the two halves of each head (rotate_half); ggml's `llama` rope rotates adjacent pairs. Reorder
    each head's rows from [first half, second half] to interleaved, as convert_hf_to_gguf.py does."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def encode(weight, ggml_type: str) -> np.ndarray:
    """A torch tensor -> the bytes (or floats) of `ggml_type`, shaped [rows, bytes per row] for quantized types."""
    import gguf

    from compressor.stages.quantize import kquants

    if ggml_type in kquants.BYTES_PER_BLOCK:
        return kquants.encode(weight, ggml_type)
    data = weight.float().numpy()
    if ggml_type == "F32":
        return data
    if ggml_type == "F16":
        return data.astype(np.float16)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[ggml_type])


def _nbytes(t: gguf_plan.Tensor) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.ggml_type]]
    return math.prod(t.shape) // block * size


def _is_linear(t: gguf_plan.Tensor) -> bool:
    return t.gguf_name.startswith("blk.") and len(t.shape) == 2


def _linear_bytes_in(src: Path) -> dict[str, int]:
    from compressor.stages.quantize import footprint

    return {n: b for n, b in footprint.tensor_bytes(src).items() if footprint.is_linear(n)}


def add_hparams(writer, config: dict):
    """llama.cpp's `llama.*` keys (convert_hf_to_gguf.py's LlamaModel); returns the rope_freqs tensor of Llama 3.1's
    rope scaling, which llama.cpp takes as a tensor rather than as keys."""
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = alignment.rope_settings(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_key_length(head_dim)  # pruned heads keep their width: never derived from hidden_size / heads
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if rope["rope_type"] != "llama3":
        return None
    # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: a per-frequency divisor
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer; UserError for one llama.cpp would not reproduce."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model", {}).get("type"), spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for name, expected in PRE_TOKENIZERS.items():
        if (
            model == "BPE"
            and len(steps) == len(expected)
            and all(all(step.get(k) == v for k, v in want.items()) for step, want in zip(steps, expected))
        ):
            return name
    kinds = " + ".join(str(s.get("type")) for s in steps) or "none"
    raise UserError(
        f"quantize.method gguf: this model's tokenizer ({model} with pre-tokenizer {kinds}) is not one whose "
        "llama.cpp pre-tokenizer compressor can name; it writes byte-level BPE vocabularies split like GPT-2, "
        "SmolLM or Llama 3. Use method gptq or awq, or convert the quantize stage's input with llama.cpp's "
        "convert_hf_to_gguf.py and llama-quantize."
    )


def add_vocab(writer, tokenizer, pre: str, vocab_size: int) -> None:
    """The `gpt2` (byte-level BPE) vocabulary as convert_hf_to_gguf.py's get_vocab_base writes it: tokens in id
    order (unused ids padded), their types, merges, special token ids and whether BOS/EOS are added."""
    import gguf

    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # "a b" per merge; a space inside a part is written as U+0120 + 256, as gguf.SpecialVocab does
    writer.add_token_merges(
        [
            pair if isinstance(pair, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in pair)
            for pair in spec["model"]["merges"]
        ]
    )
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]  # what the HF tokenizer really adds, whatever its config says
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


class Weights:
    """Tensors of a safetensors checkpoint, read one at a time."""

    def __init__(self, model_dir: Path):
        from compressor.models.checkpoint import safetensors_header

        self.files: dict[str, Path] = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            self.files.update({name: file for name in safetensors_header(file) if name != "__metadata__"})

    def get(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise UserError(f"quantize (gguf): the input checkpoint has no tensor {name}")
        with safe_open(str(self.files[name]), framework="pt") as fh:
            return fh.get_tensor(name)
