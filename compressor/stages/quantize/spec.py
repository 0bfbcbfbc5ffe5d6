"""The quantize stage's options (torch-free: validating a pipeline imports this, never torch).

`quantize.method` picks one of three outputs, each for other servers (docs/quantization.md):
  gptq (the default when `method` is omitted): a GPTQ checkpoint for vLLM, TGI, transformers, GPTQModel;
  awq: an AWQ (GEMM) checkpoint for vLLM, TGI, transformers;
  gguf: one .gguf file for llama.cpp (and Ollama, LM Studio) with a llama.cpp quant type such as Q4_K_M.
Each method is its own class with only its own fields, so a field of another method is an unknown key."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, field_validator

from compressor.contract.spec import Strict, data_source

# Group sizes GPTQModel accepts, and the GPTQ kernels it can be told to load with (gptqmodel.utils.backend.BACKEND).
GPTQ_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
GPTQ_BACKENDS = (
    "auto",
    "gptq_torch",
    "gptq_torch_int8",
    "gptq_torch_aten",
    "gptq_torch_fused",
    "gptq_triton",
    "gptq_exllama_v2",
    "gptq_marlin",
    "gptq_machete",
    "gptq_bitblas",
)
# AWQ's GEMM layout: 4-bit only, and the group sizes every AWQ kernel (GPTQModel's CPU and CUDA ones, vLLM's)
# takes; AutoAWQ's checkpoints use 128.
AWQ_BITS = (4,)
AWQ_GROUP_SIZES = (32, 64, 128)
# llama.cpp's file types that compressor writes (llama-quantize's names). The K types mix per tensor as llama.cpp does.
GGUF_QUANT_TYPES = ("Q4_0", "Q8_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
METHODS = ("gptq", "awq", "gguf")

DTYPE_DESCRIPTION = (
    "Dtype of the non-quantized weights (embeddings, norms) and activations; auto = GPTQModel's "
    "choice (bfloat16 from a float32 source on CPU, else the source dtype)."
)


class CalibratedSpec(Strict):
    """Fields of the methods that run calibration text through the model (GPTQ, AWQ)."""

    batch_size: int = Field(1, gt=0, description="Calibration sequences per forward pass while quantizing.")
    calibration: Optional[str] = data_source(
        None, description="Name of a data source under `data:`; default: the only one defined."
    )
    samples: Optional[int] = Field(
        None, gt=0, description="Calibration sequences; default: the data source's `samples`, else 128."
    )
    seq_len: Optional[int] = Field(
        None,
        gt=0,
        description="Tokens per calibration sequence; default: the data source's "
        "`seq_len`, capped at the model's context.",
    )
    dtype: Literal["auto", "float16", "bfloat16"] = Field("auto", description=DTYPE_DESCRIPTION)


class GPTQSpec(CalibratedSpec):
    """GPTQ weight-only quantization through GPTQModel; writes a GPTQ-format checkpoint (quantize_config.json)."""

    method: Literal["gptq"] = Field("gptq", description="gptq (default), awq or gguf: see docs/quantization.md.")
    bits: Literal[4, 8] = Field(4, description="Bits per weight of every linear layer in the decoder blocks.")
    group_size: int = Field(
        128,
        description="Input channels sharing one scale/zero point; -1 = one per output channel. "
        f"One of {', '.join(map(str, GPTQ_GROUP_SIZES))}.",
    )
    desc_act: bool = Field(
        False,
        description="Quantize columns in order of decreasing activation (act-order); "
        "slightly better quality, slower kernels.",
    )
    sym: bool = Field(
        True,
        description="Symmetric grid around zero (vLLM's Marlin kernels need it); false fits a zero point per group.",
    )
    damp_percent: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, as a fraction of its mean diagonal.")
    on_misaligned: Literal["error", "largest_divisor", "int8_kernel"] = Field(
        "error",
        description="When group_size does not divide a layer's in_features: `error` (refused before any compute, "
        "naming the layers and an aligned prune target), `largest_divisor` (use the largest group size that divides "
        "every layer), or `int8_kernel` (keep group_size; the checkpoint loads with GPTQModel's CPU int8 kernel).",
    )
    backend: Optional[Literal[GPTQ_BACKENDS]] = Field(  # type: ignore[valid-type]
        None,
        description="GPTQModel kernel to load the output with, written into config.json so transformers and "
        "lm-eval use it too; default: chosen at load time for the device (on_misaligned=int8_kernel sets gptq_torch_int8).",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v not in GPTQ_GROUP_SIZES:
            raise ValueError(
                f"group_size {v} is not one of {', '.join(map(str, GPTQ_GROUP_SIZES))} (GPTQModel's choices)"
            )
        return v


class AWQSpec(CalibratedSpec):
    """AWQ (activation-aware weight quantization) through GPTQModel: per-channel scales searched on calibration
    activations, then 4-bit groups; writes an AWQ GEMM checkpoint (quant_method awq) for vLLM, TGI and transformers."""

    method: Literal["awq"] = Field("awq", description="awq: see docs/quantization.md.")
    bits: int = Field(4, description="Bits per weight: 4, the only width of AWQ's GEMM checkpoints and kernels.")
    group_size: int = Field(
        128,
        description=f"Input channels sharing one scale and zero point: one of {', '.join(map(str, AWQ_GROUP_SIZES))}.",
    )
    zero_point: bool = Field(True, description="Fit a zero point per group (AWQ's default); false = symmetric grid.")
    on_misaligned: Literal["error", "largest_divisor"] = Field(
        "error",
        description="When group_size does not divide a layer's in_features: `error` (refused before any "
        "compute, naming the layers and an aligned prune target) or `largest_divisor` (the largest of 128, 64, 32 "
        "that divides every layer).",
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in AWQ_BITS:
            raise ValueError(
                f"AWQ checkpoints are 4-bit (its GEMM layout and kernels have no {v}-bit form); use "
                "bits 4, or method gptq for 8 bits"
            )
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v not in AWQ_GROUP_SIZES:
            raise ValueError(
                f"group_size {v} is not one of {', '.join(map(str, AWQ_GROUP_SIZES))} (what AWQ's kernels take)"
            )
        return v


class GGUFSpec(Strict):
    """A single .gguf file for llama.cpp (llama architecture, its tokenizer inside), quantized the way llama-quantize
    does without an importance matrix: no calibration. Written beside config.json and the tokenizer files, so
    transformers (`gguf_file=`) and the pipeline's evaluation load it too (dequantized)."""

    method: Literal["gguf"] = Field("gguf", description="gguf: see docs/quantization.md.")
    quant_type: str = Field(
        "Q4_K_M",
        description=f"llama.cpp file type: one of {', '.join(GGUF_QUANT_TYPES)}. "
        "K types (Q*_K_*) mix per tensor as llama-quantize does (Q4_K_M: Q6_K for the output and "
        "for half of attn_v / ffn_down).",
    )
    on_misaligned: Literal["error", "fallback"] = Field(
        "error",
        description="When a tensor's input width is not a multiple of its type's block (256 for K types, 32 "
        "for Q4_0/Q8_0): `error` (refused before any compute, naming the layers and an aligned prune target) or "
        "`fallback` (llama-quantize's per-tensor fallback: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, else F16).",
    )

    @field_validator("quant_type", mode="before")
    @classmethod
    def _quant_type(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        name = v.strip().upper()
        if name not in GGUF_QUANT_TYPES:
            raise ValueError(f"{v!r} is not a quant type compressor writes: one of {', '.join(GGUF_QUANT_TYPES)}")
        return name


def method_of(value: Any) -> str:
    """The union's tag: `method` of a YAML mapping or a spec object, gptq when omitted."""
    method = value.get("method", "gptq") if isinstance(value, dict) else getattr(value, "method", "gptq")
    return method if isinstance(method, str) else repr(method)


QuantizeSpec = Annotated[
    Union[Annotated[GPTQSpec, Tag("gptq")], Annotated[AWQSpec, Tag("awq")], Annotated[GGUFSpec, Tag("gguf")]],
    Discriminator(
        method_of,
        custom_error_type="unknown_quantize_method",
        custom_error_message=f"method: not one of {', '.join(METHODS)}",
    ),
]
