"""Weight quantization through GPTQModel (GPTQ, AWQ) or to a llama.cpp GGUF file; see spec.py for the methods.

Torch-free at import: `check` reads only config.json (see alignment.py); `run` imports the method's engine lazily."""

from __future__ import annotations

from typing import Optional

from compressor.contract import register
from compressor.contract.context import StageContext
from compressor.contract.kind import CheckResult, EstimateInput, StageKind, StageResult
from compressor.manifest import ModelRef
from compressor.stages.quantize.spec import QuantizeSpec

DEFAULT_SAMPLES = 128  # the GPTQ paper's calibration set


class Quantize(StageKind):
    name = "quantize"
    spec = QuantizeSpec
    summary = "Weight quantization through GPTQModel (GPTQ, AWQ) or to a GGUF file."

    def check(self, spec: QuantizeSpec, config: dict) -> CheckResult:
        """Refuse a group size that misaligns with the layer widths (on_misaligned=error) and predict the output config."""
        from compressor.stages.quantize import alignment

        resolution = alignment.resolve(spec, config)
        if not config:  # a hub id not fetched yet: the same decision is taken again when the stage starts
            return CheckResult(
                config={}, warnings=["quantize: input config.json not available; alignment is checked at run time"]
            )
        return CheckResult(config=alignment.output_config(config, spec, resolution), warnings=resolution.warnings)

    def run(self, spec: QuantizeSpec, model: ModelRef, ctx: StageContext) -> StageResult:
        from compressor.stages.quantize.methods import quantize

        return quantize(spec, model, ctx)

    def calibration(self, spec: QuantizeSpec) -> tuple[Optional[int], Optional[int]]:
        return getattr(spec, "samples", None), getattr(spec, "seq_len", None)  # GGUF has no calibration

    def bits(self, spec: QuantizeSpec):
        """GPTQ and AWQ set the linear weights' width; a GGUF's varies by tensor (its plan reports bits per weight)."""
        return getattr(spec, "bits", None)

    def group_size(self, spec: QuantizeSpec):
        return getattr(spec, "group_size", None)

    def flops(self, spec: QuantizeSpec, given: EstimateInput) -> float:
        from compressor import estimate
        from compressor.stages.quantize import methods

        calibrated = hasattr(spec, "samples")  # GGUF rounds without calibration data
        samples, seq_len = (
            estimate.calibration_size(spec.calibration, spec.samples, spec.seq_len, given.pipeline, DEFAULT_SAMPLES)
            if calibrated
            else (0, 0)
        )
        return methods.flops(spec, given.in_config, samples, seq_len)

    def result_line(self, manifest) -> str:
        d = manifest.details
        if d.get("method") == "gguf":
            return f"quantized to GGUF {d.get('quant_type', '?')} ({d.get('bits_per_weight', '?')} bits per weight)"
        return (
            f"quantized with {d.get('method', 'gptq')} to {d.get('bits', '?')}-bit, group size {d.get('group_size', '-')}: "
            f"linear weights {d.get('linear_bytes_in') or '?'} -> {d.get('linear_bytes_out', '?')} bytes "
            f"({d.get('linear_compression') or '?'}x), kernel here {d.get('kernel_here', '-')}"
        )


KIND = register(Quantize())
