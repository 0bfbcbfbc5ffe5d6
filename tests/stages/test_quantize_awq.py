"""The quantize stage with `method: awq`: GPTQModel's AWQ on the test teacher, on CPU, into an AWQ GEMM checkpoint
that transformers and the lm_eval CLI load; compared with round-to-nearest on the same 4-bit groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_quantize import heldout, lm_eval_cli_ref_ppl, load_plain, rtn_fake_quant, run_quantize, teacher  # noqa: F401 (fixtures)

from compressor.models import checkpoint
from compressor.stages.quantize import footprint
from compressor.stages.quantize.spec import AWQSpec

GROUP_SIZE = 128
EVAL_BLOCKS = 64  # held-out sequences of 128 tokens scored per model


def test_check_refuses_or_shrinks_an_awq_group_that_does_not_divide_a_width():
    from test_quantize import LLAMA

    from compressor.errors import UserError
    from compressor.stages import quantize as quantize_stage

    config = {**LLAMA, "intermediate_size": 320}  # down_proj reads 320 channels: 64 divides it, 128 does not
    with pytest.raises(
        UserError, match=r"mlp\.down_proj.*in_features 320.*AWQ quantizes whole groups.*largest here: 64"
    ):
        quantize_stage.KIND.check(AWQSpec(group_size=128), config)
    result = quantize_stage.KIND.check(AWQSpec(group_size=128, on_misaligned="largest_divisor"), config)
    assert result.config["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "version": "gemm",
        "format": "gemm",
    }
    assert "using group_size 64" in result.warnings[0]


@pytest.fixture(scope="module")
def awq(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("awq") / "out"
    manifest = run_quantize(teacher, out, AWQSpec(group_size=GROUP_SIZE), "zoo:tiny-test", samples=16)
    return out, manifest


def rtn_zero_point_fake_quant(model, bits: int, group_size: int) -> None:
    """Round-to-nearest on AWQ's own grid (a scale and zero point per group spanning its min..max), in place,
    decoder linears only: AWQ without its activation-aware scale and clip search."""
    maxq = 2**bits - 1
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and footprint.is_linear(f"{name}.weight"):
                w = module.weight.float()
                groups = w.reshape(w.shape[0], -1, group_size)
                lo, hi = groups.amin(-1, keepdim=True).clamp(max=0), groups.amax(-1, keepdim=True).clamp(min=0)
                scale = ((hi - lo) / maxq).clamp(min=1e-8)
                zero = torch.round(-lo / scale)
                q = torch.clamp(torch.round(groups / scale) + zero, 0, maxq)
                module.weight.copy_(((q - zero) * scale).reshape_as(w).to(module.weight.dtype))


@torch.no_grad()
def log_probs(model, blocks: torch.Tensor) -> list[torch.Tensor]:
    return [
        torch.log_softmax(model(input_ids=blocks[i : i + 16]).logits.float(), -1) for i in range(0, len(blocks), 16)
    ]


def perplexity_and_kl(model, blocks: torch.Tensor, reference: list[torch.Tensor]) -> tuple[float, float]:
    """Held-out perplexity, and the mean per-token KL(float model || model): how far the quantized model's
    next-token distributions moved, which is what a quantizer should keep small."""
    nll, kl, tokens = 0.0, 0.0, 0
    for i, (ref, out) in enumerate(zip(reference, log_probs(model, blocks))):
        batch = blocks[i * 16 : (i + 1) * 16]
        nll -= out[:, :-1].gather(-1, batch[:, 1:, None]).sum().item()
        tokens += batch[:, 1:].numel()
        kl += (ref.exp() * (ref - out)).sum(-1).sum().item()
    return float(torch.tensor(nll / tokens).exp()), kl / (len(blocks) * blocks.shape[1])


def test_awq_keeps_perplexity_within_5_percent_and_moves_less_than_round_to_nearest(teacher, awq, heldout):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from compressor.models import load_model

    out, _ = awq
    blocks = heldout[:EVAL_BLOCKS]
    reference = log_probs(load_model(teacher), blocks)
    base, _ = perplexity_and_kl(load_model(teacher), blocks, reference)
    model = load_plain(out)  # transformers' AWQ path (GPTQModel's kernels underneath)
    assert isinstance(model.model.layers[0].mlp.down_proj, BaseQuantLinear)
    assert model.config.quantization_config.quant_method == "awq"
    ppl, kl = perplexity_and_kl(model, blocks, reference)
    rows = {"AWQ": (ppl, kl)}
    # round-to-nearest at the same bits and groups, in the dtype the AWQ model runs in: only the rounding differs
    for name, fake_quant in (("RTN zero point", rtn_zero_point_fake_quant), ("RTN symmetric", rtn_fake_quant)):
        rtn = load_model(teacher).to(model.dtype)
        fake_quant(rtn, bits=4, group_size=GROUP_SIZE)
        rows[name] = perplexity_and_kl(rtn, blocks, reference)
    print(
        f"\nheld-out ({EVAL_BLOCKS} x 128 tokens), 4-bit g{GROUP_SIZE}: float perplexity {base:.3f}; "
        + "; ".join(
            f"{name} {p:.3f} ({(p / base - 1) * 100:+.2f}%), KL {k * 1e3:.3f}e-3" for name, (p, k) in rows.items()
        )
    )
    assert ppl <= base * 1.05
    # Perplexity moves by hundredths of a percent at this size, less than the noise between calibrations; the KL
    # to the float model is what AWQ's search minimises, and it is where AWQ beats rounding (by ~15% here).
    assert kl < rows["RTN zero point"][1] and kl < rows["RTN symmetric"][1]


def test_awq_checkpoint_has_the_awq_gemm_layout_and_the_manifest_says_so(teacher, awq):
    out, manifest = awq
    saved = json.loads((out / "quantize_config.json").read_text())
    assert (saved["quant_method"], saved["format"], saved["bits"], saved["group_size"]) == (
        "awq",
        "gemm",
        4,
        GROUP_SIZE,
    )
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["version"], quant["zero_point"]) == ("awq", "gemm", True)
    d = manifest.details
    assert (d["method"], d["bits"], d["group_size"], d["zero_point"], d["format"]) == (
        "awq",
        4,
        GROUP_SIZE,
        True,
        "gemm",
    )
    assert d["linear_bytes_in"] / d["linear_bytes_out"] >= 3 and d["kernel_here"]
    assert "awq_loss_mean" in manifest.metrics
    # sizes and parameter counts the summary shows: AWQ packs 8 weights per int32 along the output dimension
    assert checkpoint.quantized_bits(out) == 4
    assert checkpoint.logical_num_params(out) == checkpoint.num_params(teacher)


def test_lm_eval_cli_evaluates_the_awq_checkpoint(awq, tmp_path):
    scores = lm_eval_cli_ref_ppl(awq[0], tmp_path / "results")
    assert 1 < scores["word_perplexity,none"] < 1e6


# ----------------------------------------------------------------------------- the tiny chain with method: awq
def run_with_quantize(tiny_runs, quantize: list[str], out: Path) -> tuple[Path, dict]:
    """The shipped tiny pipeline at test size with its quantize stage changed by `quantize` overrides, into the
    storage the session's tiny-pipeline runs filled (tests/pipeline_runs.py): prune and distill, the teacher's
    baseline and their evaluations come from the caches; only this quantize stage and its evaluation run."""
    from pipeline_runs import PIPELINE, compressor

    summary_path = out / "summary.json"
    result = compressor(
        "run",
        str(PIPELINE),
        f"storage={tiny_runs.storage}",
        *tiny_runs.overrides,
        *quantize,
        "--tracking-uri",
        f"sqlite:///{out / 'mlflow.db'}",
        "--summary-json",
        str(summary_path),
        timeout=900,
        env=tiny_runs.env,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "FAIL" not in result.stdout + result.stderr
    summary = json.loads(summary_path.read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [
        ("prune", "cached"),
        ("distill", "cached"),
        ("quantize", "ran"),
    ]
    return tiny_runs.storage / "tiny", summary


@pytest.mark.slow
def test_tiny_chain_with_awq_passes_its_gates(tiny_runs, tmp_path):
    from compressor.manifest import Manifest

    pipeline_dir, summary = run_with_quantize(tiny_runs, ["stages.quantize.method=awq"], tmp_path)
    stages = {s["name"]: s for s in summary["stages"]}
    manifest = Manifest.read(pipeline_dir / f"quantize-{stages['quantize']['key'][:12]}")
    assert (manifest.details["method"], manifest.details["group_size"]) == ("awq", 64)
    distilled, quantized = (stages[n]["scores"]["ref_ppl"]["bits_per_byte"] for n in ("distill", "quantize"))
    print(f"\nbits per byte: distilled {distilled:.4f}, AWQ {quantized:.4f}")
    assert quantized <= distilled + 0.05  # the pipeline's own gate (max_drop 0.05), checked here from the summary
    assert stages["quantize"]["bytes"] < stages["distill"]["bytes"] / 2.5
