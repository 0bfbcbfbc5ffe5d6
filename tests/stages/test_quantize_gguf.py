"""The quantize stage with `method: gguf`: a llama.cpp file read back by the gguf package and by transformers'
GGUF loader, llama-quantize's per-tensor types and fallbacks, the K-quant encoders, and what is refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_quantize import heldout, rtn_fake_quant, teacher  # noqa: F401 (fixtures)

from compressor.errors import UserError
from compressor.models import checkpoint
from compressor.runner import run_standalone
from compressor.stages.quantize import footprint, gguf_plan, kquants
from compressor.stages.quantize.spec import GGUFSpec

EVAL_BLOCKS = 64  # held-out sequences of 128 tokens scored per model


def export(model_dir, out, **spec) -> Manifest:  # noqa: F821
    return run_standalone("quantize", GGUFSpec(**spec), str(model_dir), str(out), quiet=True)


def read(out):
    from gguf import GGUFReader

    return GGUFReader(next(out.glob("*.gguf")))


def field(reader, key):
    return reader.fields[key].contents()


def load_gguf(out):
    """The stage output as the pipeline's evaluation loads it: the .gguf's weights, dequantized, with config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = json.loads((out / "config.json").read_text())["quantization_config"]["gguf_file"]
    config = AutoConfig.from_pretrained(str(out))
    del config.quantization_config  # named by gguf_file instead
    return AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, config=config, device_map="cpu").eval()


@pytest.fixture(scope="module")
def q4_0(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "out"
    return out, export(teacher, out, quant_type="Q4_0")


def test_gguf_file_reads_back_with_the_models_shapes_types_and_vocabulary(teacher, q4_0):
    out, manifest = q4_0
    config = json.loads((teacher / "config.json").read_text())
    reader = read(out)
    assert field(reader, "general.architecture") == "llama" and field(reader, "general.file_type") == 2  # Q4_0
    for key, value in {
        "block_count": 4,
        "embedding_length": 128,
        "feed_forward_length": 384,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": 32,
        "rope.dimension_count": 32,
    }.items():
        assert field(reader, f"llama.{key}") == value == config.get(key.split(".")[-1], value), key
    hf_shapes = checkpoint.tensor_shapes(teacher)
    written = {t.name: t for t in reader.tensors}
    assert list(written) == [name for name, _, _ in gguf_plan.llama_tensors(config)]
    for gguf_name, hf_name, _ in gguf_plan.llama_tensors(config):
        assert [int(d) for d in reversed(written[gguf_name].shape)] == hf_shapes[hf_name], (
            gguf_name
        )  # ggml: ne[0] = columns
    types = {name: t.tensor_type.name for name, t in written.items()}
    assert (
        types["blk.0.ffn_down.weight"] == types["token_embd.weight"] == "Q4_0"
        and types["blk.0.attn_norm.weight"] == "F32"
    )
    assert types["output.weight"] == "Q8_0"  # llama.cpp's Q6_K for the output, which needs rows of 256: Q8_0 here
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field(reader, "tokenizer.ggml.tokens")) == config["vocab_size"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    # what the summary shows: the teacher's parameters, 4 bits, the file's bytes
    assert checkpoint.logical_num_params(out) == checkpoint.num_params(teacher)
    assert checkpoint.quantized_bits(out) == 4
    assert checkpoint.weight_bytes(out) == next(out.glob("*.gguf")).stat().st_size == manifest.details["bytes_out"]
    assert manifest.details["tensor_types"] == {"Q4_0": 29, "F32": 9, "Q8_0": 1}


def test_gguf_through_transformers_is_close_to_float_and_as_good_as_rounding_to_its_blocks(teacher, q4_0, heldout):
    from compressor.models import load_model, perplexity

    blocks = heldout[:EVAL_BLOCKS]
    model, float_model = load_gguf(q4_0[0]), load_model(teacher)
    # Every decoder weight is the float weight up to Q4_0's rounding (16 levels per block of 32): a mistake in the
    # layout or in the rotary permutation of q/k would be off by the weights' own size, not by a few percent.
    for name, param in float_model.named_parameters():
        if footprint.is_linear(name):
            loaded = model.get_parameter(name).float()
            error = ((loaded - param).norm() / param.norm()).item()
            assert 0.01 < error < 0.15, (name, error)
    base, gguf = perplexity(float_model, blocks), perplexity(model, blocks)
    rtn = load_model(teacher)
    rtn_fake_quant(rtn, bits=4, group_size=32)
    rounded = perplexity(rtn, blocks)
    print(
        f"\nheld-out perplexity: float {base:.3f}, GGUF Q4_0 through transformers {gguf:.3f} "
        f"({(gguf / base - 1) * 100:+.2f}%), round-to-nearest 4-bit g32 (decoder linears) {rounded:.3f}"
    )
    # Q4_0 is round-to-nearest on blocks of 32 with 16 levels: it cannot do much better than torch's rounding with
    # the same blocks, and a broken file does far worse. The 1% covers what Q4_0 quantizes beyond the decoder
    # linears (embeddings in Q4_0, the output in Q8_0). Against float it is only "close": on a model this small
    # rounding noise can land a hair either side of float (CI once saw Q4_0 0.01% better), so the test bounds the
    # distance, not its sign; a wrong layout or rotary permutation costs tens of percent, not a few.
    assert gguf <= rounded * 1.01
    assert abs(gguf / base - 1) < 0.05, (gguf, base)


def test_k_quants_decode_with_the_gguf_package_and_beat_the_legacy_types_of_the_same_size():
    from gguf import GGMLQuantizationType, dequantize, quantize

    torch.manual_seed(0)
    weight = torch.randn(64, 1024) * 0.02
    weight[:, 5] *= 30  # an outlier input channel, as real layers have
    weight[3] = 0  # an all-zero row must stay zero
    errors = {}
    for qtype in ("Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0"):
        kind = GGMLQuantizationType[qtype]
        data = kquants.encode(weight, qtype) if qtype in kquants.BYTES_PER_BLOCK else quantize(weight.numpy(), kind)
        back = dequantize(data, kind)
        assert back.shape == weight.shape and not back[3].any()
        errors[qtype] = float(np.linalg.norm(back - weight.numpy()) / np.linalg.norm(weight.numpy()))
    print(f"\nrelative RMS error: {errors}")
    assert errors["Q4_K"] < errors["Q4_0"] and errors["Q5_K"] < errors["Q5_0"]  # 4.5 and 5.5 bits per weight each
    assert errors["Q6_K"] < errors["Q5_K"] < errors["Q4_K"] < 0.1


def _nearest_int(value: float) -> int:
    return int(np.rint(np.float32(value)))  # ggml's nearest_int: float32, half to even


def _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep):
    """ggml-quants.c's make_qkx2_quants, line for line (scalar, float64): (scale, the_min)."""
    lo, hi = min(min(x), 0.0), max(x)
    if hi == lo:
        return 0.0, -lo
    sum_w, sum_x = sum(weights), sum(w * v for w, v in zip(weights, x))
    scale = (hi - lo) / nmax
    best = sum(
        w * (scale * max(0, min(nmax, _nearest_int((v - lo) / scale))) + lo - v) ** 2 for w, v in zip(weights, x)
    )
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (hi - lo)  # `lo` is the best fit's min so far, as in ggml
        q = [max(0, min(nmax, _nearest_int(iscale * (v - lo)))) for v in x]
        sum_l = sum(w * l for w, l in zip(weights, q))
        sum_l2 = sum(w * l * l for w, l in zip(weights, q))
        sum_xl = sum(w * l * v for w, l, v in zip(weights, q, x))
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale, this_min = (sum_w * sum_xl - sum_x * sum_l) / det, (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min, this_scale = 0.0, sum_xl / sum_l2
            error = sum(w * (this_scale * l + this_min - v) ** 2 for w, l, v in zip(weights, q, x))
            if error < best:
                best, scale, lo = error, this_scale, this_min
    return scale, -lo


def _q4_k_reference(block):
    """ggml's quantize_row_q4_K_ref for one super-block of 256, returned decoded."""
    scales, mins = [], []
    for j in range(8):
        sub = block[32 * j : 32 * j + 32]
        av_x = math.sqrt(sum(v * v for v in sub) / 32)
        scale, the_min = _make_qkx2_quants(sub, [av_x + abs(v) for v in sub], 15, -1.0, 0.1, 20)
        scales.append(scale)
        mins.append(the_min)
    inv_scale = 63 / max(scales) if max(scales) > 0 else 0
    inv_min = 63 / max(mins) if max(mins) > 0 else 0
    d, dmin = float(np.float16(max(scales) / 63)), float(np.float16(max(mins) / 63))
    out = []
    for j in range(8):
        dj = d * min(63, _nearest_int(inv_scale * scales[j]))
        mj = dmin * min(63, _nearest_int(inv_min * mins[j]))
        out += [
            dj * max(0, min(15, _nearest_int((v + mj) / dj))) - mj if dj else -mj for v in block[32 * j : 32 * j + 32]
        ]
    return out


def test_q4_k_encoder_matches_ggmls_reference_algorithm():
    """The vectorised encoder against a line-for-line scalar port of ggml's reference, on 4 super-blocks."""
    from gguf import GGMLQuantizationType, dequantize

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((4, 256)) * 0.02).astype(np.float32)
    weight[:, 5] *= 25
    ours = dequantize(kquants.encode(torch.from_numpy(weight), "Q4_K"), GGMLQuantizationType.Q4_K)
    reference = np.array([_q4_k_reference([float(v) for v in row]) for row in weight], dtype=np.float32)
    assert np.allclose(ours, reference, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def aligned_model(tmp_path_factory, tiny_teacher):
    """A random 8-layer Llama whose widths (256, 512, 4 heads of 64) fit K-quant blocks, with the zoo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.models import load_tokenizer

    path = tmp_path_factory.mktemp("aligned")
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    load_tokenizer(tiny_teacher).save_pretrained(path)
    return path


def test_q4_k_m_mixes_types_like_llama_quantize_and_loads_close_to_float(aligned_model, tmp_path):
    from compressor.models import load_model

    out = tmp_path / "out"
    export(aligned_model, out, quant_type="Q4_K_M")
    types = {t.name: t.tensor_type.name for t in read(out).tensors}
    more_bits = {0, 3, 6, 7}  # llama.cpp's use_more_bits for 8 layers: first and last eighth, every third between
    for i in range(8):
        for kind in ("attn_v", "ffn_down"):
            assert types[f"blk.{i}.{kind}.weight"] == ("Q6_K" if i in more_bits else "Q4_K"), (i, kind)
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
    assert (types["output.weight"], types["token_embd.weight"]) == ("Q6_K", "Q4_K")
    # Through transformers' loader every weight is the float one up to its type's rounding (llama.cpp's reference
    # encoders on Gaussian weights: about 8% relative error for Q4_K, 2% for Q6_K, measured in the test above).
    model, float_model = load_gguf(out), load_model(aligned_model)
    bound = {"Q4_K": 0.1, "Q6_K": 0.03}
    hf_to_gguf = {
        hf: name for name, hf, _ in gguf_plan.llama_tensors(json.loads((aligned_model / "config.json").read_text()))
    }
    for name, param in float_model.named_parameters():
        if param.dim() == 2:
            error = ((model.get_parameter(name).float() - param).norm() / param.norm()).item()
            assert 0.005 < error < bound[types[hf_to_gguf[name]]], (name, error)


def test_k_quant_rows_that_blocks_do_not_divide_are_refused_or_fall_back(teacher, tmp_path):
    """The test teacher is 128 wide: no row holds a 256-weight K block."""
    with pytest.raises(
        UserError, match=r"Q4_K_M stores rows in blocks of 256 weights.*mlp\.down_proj.*in_features 384"
    ):
        export(teacher, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "fallback"
    manifest = export(teacher, out, quant_type="Q4_K_M", on_misaligned="fallback")
    types = {t.name: t.tensor_type.name for t in read(out).tensors}
    # 4 layers: use_more_bits picks layers 2 and 3 for Q6_K, which falls back to Q8_0; Q4_K falls back to Q5_0
    assert types["blk.0.ffn_down.weight"] == "Q5_0" and types["blk.3.ffn_down.weight"] == "Q8_0"
    assert "blk.1.attn_q.weight" in manifest.details["fallback_tensors"]


def test_llama3_rope_scaling_is_written_as_the_factors_transformers_applies():
    from gguf import GGUFWriter
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from compressor.stages.quantize.gguf import add_hparams

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        hidden_size=512, num_attention_heads=4, head_dim=128, max_position_embeddings=131072, rope_parameters=rope
    )
    factors = add_hparams(GGUFWriter(None, "llama"), config.to_dict())
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    assert np.allclose(factors, (plain / scaled).numpy(), rtol=1e-4)
    assert factors.min() == 1 and math.isclose(factors.max(), 8.0)


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from compressor.stages.quantize.gguf import pre_tokenizer

    sentencepiece_like = Tokenizer(models.BPE(vocab={"▁a": 0, "a": 1, "▁": 2}, merges=[("▁", "a")]))
    sentencepiece_like.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(UserError, match="pre-tokenizer Metaspace"):
        pre_tokenizer(PreTrainedTokenizerFast(tokenizer_object=sentencepiece_like))


# ----------------------------------------------------------------------------- the tiny chain with method: gguf
@pytest.mark.slow
def test_tiny_chain_with_gguf_passes_its_gates_and_the_file_has_the_pruned_shapes(tiny_runs, tmp_path):
    from test_quantize_awq import run_with_quantize

    from compressor.manifest import Manifest

    pipeline_dir, summary = run_with_quantize(
        tiny_runs, ["stages.2.quantize={method: gguf, quant_type: Q4_0}"], tmp_path
    )
    stages = {s["name"]: s for s in summary["stages"]}
    stage_dir = pipeline_dir / f"quantize-{stages['quantize']['key'][:12]}"
    assert Manifest.read(stage_dir).details["method"] == "gguf"
    distilled = pipeline_dir / f"distill-{stages['distill']['key'][:12]}" / "model"
    pruned = json.loads((distilled / "config.json").read_text())
    assert (pruned["intermediate_size"], pruned["num_attention_heads"]) == (192, 2)  # the test-size prune target
    reader = read(stage_dir / "model")
    assert field(reader, "llama.feed_forward_length") == 192 and field(reader, "llama.attention.head_count") == 2
    hf_shapes = checkpoint.tensor_shapes(distilled)
    for gguf_name, hf_name, _ in gguf_plan.llama_tensors(pruned):
        tensor = next(t for t in reader.tensors if t.name == gguf_name)
        assert [int(d) for d in reversed(tensor.shape)] == hf_shapes[hf_name], gguf_name
    # the gate judged the GGUF's own weights: its scores are the dequantized file's, not the distilled model's
    scores = {n: stages[n]["scores"]["ref_ppl"]["bits_per_byte"] for n in ("distill", "quantize")}
    print(f"\nbits per byte: distilled {scores['distill']:.4f}, GGUF Q4_0 {scores['quantize']:.4f}")
    assert scores["distill"] < scores["quantize"] <= scores["distill"] + 0.05
    assert stages["quantize"]["num_params"] == stages["distill"]["num_params"]


# ----------------------------------------------------------------------------- the standalone command
def test_gguf_runs_standalone_from_the_cli_without_calibration(tiny_teacher, tmp_path):
    """`compressor quantize --method gguf` needs no --calibration (GGUF has none; the option exists for gptq/awq),
    and refuses one that is given."""
    import os
    import subprocess
    import sys

    def quantize(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "compressor", "quantize", "--model", "zoo:tiny-test", "--quiet", *args]
        return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    out = tmp_path / "q"
    # tiny-test is 128 wide: K blocks of 256 fit no row, so the misaligned tensors take llama-quantize's fallback
    done = quantize("--out", str(out), "--method", "gguf", "--quant-type", "Q4_K_M", "--on-misaligned", "fallback")
    assert done.returncode == 0, done.stderr
    assert (out / "model-Q4_K_M.gguf").is_file() and (out / "manifest.json").is_file()
    assert "Q4_K_M" in done.stdout and str(out) in done.stdout
    refused = quantize("--out", str(tmp_path / "r"), "--method", "gguf", "--calibration", "zoo:tiny-test")
    assert refused.returncode == 2 and "--calibration: not an option of this method" in refused.stderr
    assert not (tmp_path / "r").exists()
