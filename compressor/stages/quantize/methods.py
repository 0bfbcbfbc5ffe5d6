"""The quantize stage's methods: which module quantizes (`quantize`: gptq.py runs GPTQ and AWQ through GPTQModel,
gguf.py writes a llama.cpp file) and what it costs (`flops`, for `plan`).

Torch-free at import; each method's module is imported when it runs."""

from __future__ import annotations

from compressor.contract.context import StageContext
from compressor.contract.kind import StageResult
from compressor.manifest import ModelRef
from compressor.stages.quantize.spec import QuantizeSpec

# AWQ tries 20 scales per group of layers sharing an input (GPTQModel's n_grid), a forward of that group over the
# calibration tokens each: about 20 extra model forwards, beside the forward before and after each layer. Its
# clipping search (10 ratios per linear on 512 sampled tokens) is under 0.1% of that at any size, and left out.
AWQ_GRID = 20
# Float operations per weight of llama.cpp's reference encoders: Q4_K / Q5_K try 22 / 17 grid spacings per
# sub-block (about 12 operations per weight each), Q6_K 19 (about 8 each); the legacy types one pass.
GGUF_FLOPS_PER_WEIGHT = {"Q4_K": 22 * 12, "Q5_K": 17 * 12, "Q6_K": 19 * 8}
GGUF_FLOPS_LEGACY = 8


def quantize(spec: QuantizeSpec, model: ModelRef, ctx: StageContext) -> StageResult:
    if spec.method == "gguf":
        from compressor.stages.quantize import gguf

        return gguf.quantize(spec, model, ctx)
    from compressor.stages.quantize import gptq  # GPTQModel runs both GPTQ and AWQ

    return gptq.quantize(spec, model, ctx)


def flops(spec: QuantizeSpec, in_config: dict, samples: int, seq_len: int) -> float:
    """Estimated FLOPs of quantizing a model of `in_config` with `samples` x `seq_len` calibration tokens."""
    from compressor import estimate

    if spec.method == "gptq":
        return estimate.gptq_flops(in_config, samples, seq_len)
    if spec.method == "awq":
        return (2 + AWQ_GRID) * samples * seq_len * estimate.forward_flops_per_token(in_config, seq_len)
    from compressor.stages.quantize import gguf_plan

    total = 0.0
    for tensor in gguf_plan.plan(in_config, spec.quant_type):
        weights = 1
        for d in tensor.shape:
            weights *= d
        total += weights * GGUF_FLOPS_PER_WEIGHT.get(tensor.ggml_type, GGUF_FLOPS_LEGACY)
    return total
