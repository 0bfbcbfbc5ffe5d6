"""The quantize stage: alignment decisions before compute, GPTQ quality against round-to-nearest, bytes,
reloading through GPTQModel / transformers / the lm-eval CLI, and each on_misaligned behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compressor.config.schema import DataSource
from compressor.errors import UserError
from compressor.manifest import Manifest
from compressor.stages import quantize as quantize_stage
from compressor.stages.quantize import footprint
from compressor.stages.quantize.spec import GPTQSpec as QuantizeSpec

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# GPTQModel's native packer JIT-compiles for ~30 s on a fresh machine; its torch fallback is as fast at test sizes.
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")

LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 4,
    "max_position_embeddings": 128,
}


# ----------------------------------------------------------------------------- check(): torch-free decisions
def test_check_aligned_predicts_the_gptq_config():
    result = quantize_stage.KIND.check(QuantizeSpec(bits=4, group_size=128), LLAMA)
    assert result.warnings == []
    assert result.config["quantization_config"] == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 128,
        "desc_act": False,
        "sym": True,
        "checkpoint_format": "gptq",
    }


def test_check_error_names_the_layers_and_an_aligned_prune_target():
    with pytest.raises(UserError) as err:
        quantize_stage.KIND.check(QuantizeSpec(group_size=128), {**LLAMA, "intermediate_size": 320})
    message = str(err.value)
    assert "model.layers.*.mlp.down_proj" in message and "in_features 320" in message
    assert "intermediate_size=256" in message and "largest here: 64" in message
    assert "q_proj" not in message  # hidden_size 128 is aligned


def test_check_error_for_attention_output_suggests_a_head_count():
    config = {**LLAMA, "num_attention_heads": 6, "num_key_value_heads": 2}  # o_proj reads 6 * 32 = 192 channels
    with pytest.raises(UserError, match=r"self_attn\.o_proj.*in_features 192.*num_attention_heads=4"):
        quantize_stage.KIND.check(QuantizeSpec(group_size=128), config)


def test_check_largest_divisor_warns_which_group_size_is_used():
    result = quantize_stage.KIND.check(
        QuantizeSpec(group_size=128, on_misaligned="largest_divisor"), {**LLAMA, "intermediate_size": 224}
    )
    assert result.config["quantization_config"]["group_size"] == 32
    assert len(result.warnings) == 1 and "using group_size 32" in result.warnings[0]


def test_check_int8_kernel_pins_the_backend_and_limits_the_group_size():
    config = {**LLAMA, "intermediate_size": 224}
    result = quantize_stage.KIND.check(QuantizeSpec(group_size=64, on_misaligned="int8_kernel"), config)
    assert result.config["quantization_config"]["backend"] == "gptq_torch_int8"
    assert result.config["quantization_config"]["group_size"] == 64
    assert "vLLM" in result.warnings[0]
    with pytest.raises(UserError, match="group_size <= 128"):
        quantize_stage.KIND.check(QuantizeSpec(group_size=256, on_misaligned="int8_kernel"), config)


def test_spec_rejects_group_sizes_gptqmodel_does_not_have():
    with pytest.raises(ValueError, match="group_size 100"):
        QuantizeSpec(group_size=100)


def test_importing_the_stage_and_checking_needs_no_torch():
    code = (
        "import sys; from compressor.stages import quantize as q; from compressor.stages.quantize.spec import GPTQSpec as QuantizeSpec; "
        f"q.KIND.check(QuantizeSpec(), {LLAMA!r}); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_validate_refuses_a_prune_target_the_group_size_does_not_divide(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        textwrap.dedent("""\
        name: misaligned
        teacher: {model: "zoo:tiny-test"}
        data: {calib: {source: "zoo:tiny-test", samples: 8, seq_len: 64}}
        stages:
          - prune: {target: {intermediate_size: 320}, calibration: calib}
          - quantize: {bits: 4, group_size: 128, calibration: calib}
        """)
    )
    result = subprocess.run(
        [sys.executable, "-m", "compressor", "validate", str(pipeline)], capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert "stages.1.quantize" in result.stderr and "mlp.down_proj" in result.stderr
    assert "intermediate_size=256" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("given, cores, expected", [("1", 16, "2"), (None, 2, "2"), (None, 16, None), ("8", 2, "8")])
def test_gptqmodel_cpu_workers_never_below_two(monkeypatch, given, cores, expected):
    """Below 2, GPTQModel fails to load: "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"."""
    from compressor.stages.quantize import gptq

    monkeypatch.delenv("GPTQMODEL_CPU_WORKERS", raising=False)
    if given:
        monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", given)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    gptq.prepare_environment()
    assert os.environ.get("GPTQMODEL_CPU_WORKERS") == expected


# ----------------------------------------------------------------------------- helpers
def rtn_fake_quant(model, bits: int, group_size: int) -> None:
    """Round-to-nearest with GPTQ's symmetric grid (zero point 2^(bits-1)), in place, decoder linears only."""
    maxq = 2**bits - 1
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and footprint.is_linear(f"{name}.weight"):
                w = module.weight.float()
                groups = w.reshape(w.shape[0], -1, group_size)
                scale = (groups.abs().amax(-1, keepdim=True) * 2 / maxq).clamp(min=1e-8)
                zero = (maxq + 1) / 2
                q = torch.clamp(torch.round(groups / scale) + zero, 0, maxq)
                module.weight.copy_(((q - zero) * scale).reshape_as(w).to(module.weight.dtype))


def run_quantize(model_dir, out, spec: QuantizeSpec, source: str, samples=64, seq_len=128) -> Manifest:
    from compressor.runner import run_standalone

    data = {"calib": DataSource(source=source, samples=samples, seq_len=seq_len)}
    return run_standalone(
        "quantize", spec.model_copy(update={"calibration": "calib"}), str(model_dir), str(out), data=data, quiet=True
    )


def load_plain(path):
    """The quantized checkpoint through plain transformers (optimum + gptqmodel underneath)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu").eval()


# ----------------------------------------------------------------------------- the reference teacher, quantized
@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher


@pytest.fixture(scope="module")
def quantized(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "out"
    manifest = run_quantize(teacher, out, QuantizeSpec(bits=4, group_size=128), "zoo:tiny-test", samples=128)
    return out, manifest


@pytest.fixture(scope="module")
def heldout(teacher):
    from compressor.models import load_tokenizer
    from compressor.text_sources import token_blocks

    return token_blocks(
        DataSource(source="zoo:tiny-test", split="heldout", seq_len=128), load_tokenizer(teacher), None, 128
    )


def test_gptq_keeps_perplexity_within_5_percent_and_beats_round_to_nearest(teacher, quantized, heldout):
    from compressor.models import load_model, perplexity

    out, manifest = quantized
    base = perplexity(load_model(teacher), heldout)
    gptq_model = load_plain(out)
    gptq = perplexity(gptq_model, heldout)
    rtn_model = load_model(teacher).to(gptq_model.dtype)  # same dtype as the GPTQ model runs in: only rounding differs
    rtn_fake_quant(rtn_model, bits=4, group_size=128)
    rtn = perplexity(rtn_model, heldout)
    print(
        f"\nheld-out perplexity: teacher {base:.3f}, GPTQ 4-bit g128 {gptq:.3f} "
        f"({(gptq / base - 1) * 100:+.2f}%), RTN 4-bit g128 {rtn:.3f} ({(rtn / base - 1) * 100:+.2f}%)"
    )
    assert gptq <= base * 1.05
    assert gptq < rtn


def test_linear_weight_bytes_drop_at_least_3x_and_the_manifest_says_so(teacher, quantized):
    out, manifest = quantized
    linear_in, linear_out = footprint.linear_bytes(teacher), footprint.linear_bytes(out)
    assert linear_in / linear_out >= 3
    d = manifest.details
    assert (d["bits"], d["group_size"], d["backend"]) == (4, 128, "auto")
    assert (d["linear_bytes_in"], d["linear_bytes_out"]) == (linear_in, linear_out)
    assert d["linear_compression"] == pytest.approx(linear_in / linear_out, rel=1e-3)
    assert d["compression"] > 1 and d["kernel_here"]
    assert d["bytes_out"] == footprint.total_bytes(out) and manifest.metrics["linear_compression"] >= 3
    saved = json.loads((out / "quantize_config.json").read_text())
    assert (saved["bits"], saved["group_size"], saved["quant_method"], saved["format"]) == (4, 128, "gptq", "gptq")
    assert Manifest.read(out).details == d


def test_checkpoint_reloads_through_gptqmodel_and_transformers_and_generates(quantized):
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from compressor.models import load_tokenizer

    out = quantized[0]  # OUT is the checkpoint
    tokenizer = load_tokenizer(out)
    prompt = tokenizer("The list is", return_tensors="pt")["input_ids"]
    for model in (GPTQModel.load(str(out), device="cpu").model, load_plain(out)):
        assert isinstance(model.model.layers[0].mlp.down_proj, BaseQuantLinear)
        # min_new_tokens masks EOS: a tiny model may otherwise end early, and the test would depend on when.
        generated = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert generated.shape[1] == prompt.shape[1] + 8
        assert torch.isfinite(model(generated).logits).all()


def lm_eval_cli_ref_ppl(model_dir: Path, output: Path) -> dict:
    """The `lm_eval` command on a checkpoint directory, as a user runs it: ref_ppl's scores."""
    from compressor.models import zoo

    lm_eval = Path(sys.executable).with_name("lm_eval")
    args = ["--model", "hf", "--model_args", f"pretrained={model_dir}", "--device", "cpu", "--tasks", "ref_ppl"]
    args += ["--include_path", str(zoo.tasks_dir("tiny-test")), "--limit", "20", "--batch_size", "8"]
    result = subprocess.run(
        [str(lm_eval), *args, "--output_path", str(output)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(output.rglob("results_*.json")).read_text())["results"]["ref_ppl"]


def test_lm_eval_cli_evaluates_the_quantized_checkpoint(quantized, tmp_path):
    scores = lm_eval_cli_ref_ppl(quantized[0], tmp_path / "results")  # OUT is the checkpoint
    assert 1 < scores["word_perplexity,none"] < 1e6


# ----------------------------------------------------------------------------- misaligned widths, end to end
@pytest.fixture(scope="module")
def misaligned_model(tmp_path_factory, tiny_teacher):
    """A random Llama whose MLP width (224) the group size 64 does not divide, with the zoo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.models import load_tokenizer

    path = tmp_path_factory.mktemp("misaligned")
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=224,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    load_tokenizer(tiny_teacher).save_pretrained(path)
    return path


def test_misaligned_error_stops_before_anything_is_written(misaligned_model, tmp_path):
    with pytest.raises(UserError, match=r"mlp\.down_proj.*intermediate_size=192"):
        run_quantize(misaligned_model, tmp_path / "out", QuantizeSpec(group_size=64), "zoo:tiny-test")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "mode, group_size, kernel", [("largest_divisor", 32, None), ("int8_kernel", 64, "gptq_torch_int8")]
)
def test_misaligned_quantizes_to_a_checkpoint_that_runs(misaligned_model, tmp_path, mode, group_size, kernel):
    out = tmp_path / "out"
    manifest = run_quantize(
        misaligned_model, out, QuantizeSpec(group_size=64, on_misaligned=mode), "zoo:tiny-test", samples=16, seq_len=64
    )
    assert manifest.details["group_size"] == group_size and manifest.details["misaligned_layers"] == ["mlp.down_proj"]
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["group_size"] == group_size and quant.get("backend") == kernel
    from gptqmodel import GPTQModel

    tokens = torch.arange(16).view(1, 16)
    model = load_plain(out)  # transformers honours the pinned kernel; the CPU int4 kernel would refuse K=224, g=64
    assert torch.isfinite(model(input_ids=tokens).logits).all()
    model = GPTQModel.load(str(out), device="cpu", backend=manifest.details["backend"]).model
    assert torch.isfinite(model(input_ids=tokens).logits).all()


# ----------------------------------------------------------------------------- CLI
def test_cli_quantizes_and_reports(misaligned_model, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the interpreter compiles source to bytecode." for i in range(200)))
    out = tmp_path / "q"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "compressor",
            "quantize",
            "--model",
            str(misaligned_model),
            "--out",
            str(out),
            "--bits",
            "8",
            "--group-size",
            "32",
            "--calibration",
            str(calib),
            "--samples",
            "8",
            "--seq-len",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quantized with gptq to 8-bit, group size 32" in result.stdout
    assert Manifest.read(out).details["bits"] == 8


def test_cli_rejects_bad_options_in_one_line(misaligned_model, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "compressor",
            "quantize",
            "--model",
            str(misaligned_model),
            "--out",
            str(tmp_path / "q"),
            "--group-size",
            "64",
            "--calibration",
            "zoo:tiny-test",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "mlp.down_proj" in result.stderr and not (tmp_path / "q").exists()
