"""The prune stage: target checks, exactness of the surgery, importance ranking, export, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.config.schema import DataSource
from compressor.contract.context import MetricsSink, StageContext
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.stages import prune as prune_stage
from compressor.stages.prune.spec import PruneSpec

torch.set_num_threads(1)

FAMILIES = {
    # name: (config class, model class, extra config): Llama with every bias, Qwen2 with its q/k/v biases + tied embeddings
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}
TEXT = (
    "The interpreter reads a program, compiles it to bytecode and runs it one instruction at a time. "
    "Modules are imported once; their names live in a namespace that other modules may reach. "
    "A list keeps its items in order, a set keeps each item once, and a dict maps keys to values. "
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_model(family: str, **overrides):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=300,
        bos_token_id=0,
        eos_token_id=1,
    )
    config = getattr(transformers, config_cls)(**{**shape, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random init gives near-zero biases and unit norms; make every term matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> directory of a saved tiny checkpoint with tokenizer."""
    root, tokenizer, out = tmp_path_factory.mktemp("models"), tiny_tokenizer(), {}
    for family in FAMILIES:
        model = build_model(family)
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n\n".join(TEXT.split(". ") * 20))
    return path


class RecordingSink(MetricsSink):
    def __init__(self):
        self.metrics, self.artifacts = {}, []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path):
        self.artifacts.append(Path(path))


def run_stage(model_dir, tmp_path, target, calib, **spec):
    """Run the stage's `run` as the orchestrator would; `calib` is a path or a DataSource."""
    sink = RecordingSink()
    source = calib if isinstance(calib, DataSource) else DataSource(source=str(calib), seq_len=32)
    ctx = StageContext(work_dir=tmp_path, data={"calib": source}, sink=sink, quiet=True)
    spec = PruneSpec(target=target, calibration="calib", **{"samples": 8, "batch_size": 4, **spec})
    result = prune_stage.KIND.run(spec, ModelRef(path=str(model_dir), key="test"), ctx)
    return result, sink, tmp_path / "model"


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


IDS = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- checks (no torch compute)
def config_of(family="llama", **overrides):
    config = json.loads(build_model(family).config.to_json_string())
    return {**config, "architectures": [FAMILIES[family][1]], **overrides}


@pytest.mark.parametrize(
    "target, message",
    [
        ({"hidden_size": 128}, "prune.target.hidden_size: 128 is larger than the source's 64"),
        ({"num_layers": 5}, "prune.target.num_layers: 5 is larger than the source's 4"),
        ({"num_attention_heads": 3}, "num_attention_heads: 3 is not a multiple of num_key_value_heads 2"),
        ({"num_key_value_heads": 1}, "4 per KV group, but the source's groups have 2"),
        ({"intermediate_size": 100}, "prune.target.intermediate_size: 100 is not a multiple of align=32"),
        ({"keep_layers": [0, 4]}, "prune.target.keep_layers: [4] out of range"),
        ({"drop_layers": [0, 1, 2, 3]}, "drops every layer"),
    ],
)
def test_bad_targets_name_the_field(target, message):
    with pytest.raises(UserError, match=re.escape(message)):
        prune_stage.KIND.check(PruneSpec(target=target), config_of())


def test_llama_hidden_must_divide_by_heads_but_qwen2_need_not():
    spec = PruneSpec(target={"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4}, align=8)
    config = config_of(num_key_value_heads=4)
    prune_stage.KIND.check(spec, config)  # 32 / 4 heads is fine
    spec = PruneSpec(target={"hidden_size": 40}, align=8)
    with pytest.raises(UserError, match="LlamaConfig refuses"):
        prune_stage.KIND.check(
            spec, config_of(hidden_size=64, num_attention_heads=3, num_key_value_heads=3, head_dim=16)
        )
    assert prune_stage.KIND.check(spec, config_of("qwen2", num_attention_heads=3, num_key_value_heads=3, head_dim=16))


def test_unsupported_architecture_is_refused():
    with pytest.raises(UserError, match="architecture GPT2LMHeadModel is not supported"):
        prune_stage.KIND.check(PruneSpec(target={}), {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_check_predicts_config_and_warns_on_group_size():
    spec = PruneSpec(target={"hidden_size": 32, "num_attention_heads": 2, "drop_layers": [1]}, quantize_group_size=64)
    config = {
        **config_of("qwen2"),
        "layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"],
    }
    result = prune_stage.KIND.check(spec, config)
    assert (result.config["hidden_size"], result.config["num_attention_heads"], result.config["head_dim"]) == (
        32,
        2,
        16,
    )
    assert result.config["num_hidden_layers"] == 3
    assert result.config["layer_types"] == ["full_attention"] * 3
    assert any("hidden_size = 32 is not a multiple of the quantize group size 64" in w for w in result.warnings)
    assert any("num_attention_heads * head_dim = 32" in w for w in result.warnings)
    assert not any("intermediate_size" in w for w in result.warnings)


def test_heads_are_ranked_within_their_kv_group():
    from compressor.models.shapes import Shape
    from compressor.stages.prune.plan import select_heads

    src = Shape(64, 128, num_attention_heads=8, num_key_value_heads=2, num_layers=1, head_dim=8)
    scores = torch.tensor([9.0, 1, 2, 3, 8, 7, 6, 5])  # the global top 4 (heads 0, 4, 5, 6) would unbalance groups
    heads, groups = select_heads(scores, src, Shape(64, 128, 4, 2, 1, 8))
    assert heads.tolist() == [0, 3, 4, 5] and groups.tolist() == [0, 1]  # the top 2 of each group
    heads, groups = select_heads(scores, src, Shape(64, 128, 4, 1, 1, 8))
    assert heads.tolist() == [4, 5, 6, 7] and groups.tolist() == [1]  # group 1 sums to 26 > 15


def test_check_and_command_import_no_torch():
    code = (
        "import sys, compressor.stages.prune as p, compressor.commands.stage\n"
        "from compressor.stages.prune.spec import PruneSpec\n"
        "p.KIND.check(PruneSpec(target={'num_layers': 1}), {'architectures': ['LlamaForCausalLM'], 'hidden_size': 64, "
        "'intermediate_size': 128, 'num_attention_heads': 4, 'num_hidden_layers': 2})\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", FAMILIES)
def test_noop_prune_gives_identical_logits(family, saved, calib_file, tmp_path):
    result, _, out = run_stage(saved[family], tmp_path, {}, calib=calib_file)
    with torch.no_grad():
        torch.testing.assert_close(load(out)(IDS).logits, load(saved[family])(IDS).logits, atol=1e-5, rtol=0)
    assert result.details["params_before"] == result.details["params_after"]


# Per layer (4 layers, 4 query heads in 2 KV groups): kept query heads and kept KV heads.
HEAD_LAYOUTS = {
    "heads_within_groups": ([[1, 2], [0, 3], [1, 3], [0, 2]], [[0, 1]] * 4),
    "whole_kv_groups": ([[0, 1], [2, 3], [2, 3], [0, 1]], [[0], [1], [1], [0]]),
}


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_removing_heads_and_neurons_equals_masking_them(family, layout, tmp_path):
    from compressor.models.shapes import Shape
    from compressor.stages.prune.plan import PrunePlan
    from compressor.stages.prune.shapes import source_shape
    from compressor.stages.prune.surgery import apply_plan

    heads, kv = ([torch.tensor(x) for x in xs] for xs in HEAD_LAYOUTS[layout])
    neurons = [torch.randperm(128, generator=torch.Generator().manual_seed(i))[:64].sort().values for i in range(4)]

    masked = build_model(family)  # the reference: zero what reads the removed units' outputs
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            for h in set(range(4)) - set(heads[i].tolist()):
                layer.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
            layer.mlp.down_proj.weight[:, sorted(set(range(128)) - set(neurons[i].tolist()))] = 0
        expected = masked(IDS).logits

    pruned = build_model(family)
    src = source_shape(pruned.config.to_dict())
    target = Shape(
        **{**src.as_dict(), "num_attention_heads": 2, "num_key_value_heads": len(kv[0]), "intermediate_size": 64}
    )
    apply_plan(
        pruned, PrunePlan(source=src, target=target, layers=[0, 1, 2, 3], heads=heads, kv_heads=kv, neurons=neurons)
    )
    pruned.save_pretrained(tmp_path)
    reloaded = load(tmp_path)
    assert reloaded.model.layers[0].self_attn.k_proj.weight.shape[0] == 16 * len(kv[0])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    "target",
    [
        {"hidden_size": 32, "intermediate_size": 64, "num_layers": 3},  # head_dim 16, hidden / heads = 8
        {"num_attention_heads": 2, "num_key_value_heads": 1, "drop_layers": [1]},  # head_dim 16, hidden / heads = 32
    ],
    ids=["width+depth", "kv_groups"],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_loads_anywhere_and_generates(family, target, saved, calib_file, tmp_path):
    from transformers import AutoTokenizer

    _, _, out = run_stage(saved[family], tmp_path, target, calib=calib_file)
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == 16 and config["hidden_size"] // config["num_attention_heads"] != 16
    assert config["num_hidden_layers"] == 3
    model, tokenizer = load(out), AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer("The interpreter reads", return_tensors="pt")
    generated = model.generate(**prompt, min_new_tokens=6, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6
    assert len(model.model.layers) == 3 and model.model.layers[2].self_attn.layer_idx == 2
    if family == "qwen2":  # tied embeddings stay tied
        assert (
            config["tie_word_embeddings"]
            and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        )


# ----------------------------------------------------------------------------- importance
def zeroed_by_construction(path):
    """A Mistral (no biases) with dead units, saved with its tokenizer; returns the units that must go first."""
    model = build_model("mistral")
    g = torch.Generator().manual_seed(3)
    dead = {"hidden": torch.randperm(64, generator=g)[:32].sort().values, "neurons": [], "kv_group": [], "layer": 2}
    with torch.no_grad():
        for norm in [model.model.norm] + [
            n for l in model.model.layers for n in (l.input_layernorm, l.post_attention_layernorm)
        ]:
            norm.weight[dead["hidden"]] = 0  # channel is zero in every RMSNorm output
        for i, layer in enumerate(model.model.layers):
            neurons = torch.randperm(128, generator=g)[:64].sort().values
            layer.mlp.up_proj.weight[neurons] = 0  # down_proj input is silu(gate) * 0
            group = i % 2
            layer.self_attn.v_proj.weight[group * 16 : (group + 1) * 16] = 0  # both query heads of this group output 0
            dead["neurons"].append(neurons)
            dead["kv_group"].append(group)
        layer = model.model.layers[dead["layer"]]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()  # the layer is now the identity
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return dead


@pytest.mark.parametrize("depth_metric", ["bi", "loss"])
def test_units_zeroed_by_construction_are_pruned_first(depth_metric, calib_file, tmp_path):
    dead = zeroed_by_construction(tmp_path / "src")
    target = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_layers": 3,
    }
    run_stage(tmp_path / "src", tmp_path / "run", target, calib=calib_file, depth_metric=depth_metric)
    report = json.loads((tmp_path / "run" / "importance.json").read_text())
    plan = report["plan"]
    if depth_metric == "bi":
        assert plan["kept_layers"] == [0, 1, 3]
    else:  # the identity layer costs exactly nothing; on random weights another layer may even lower the loss
        increase = report["scores"]["loss_increase"]
        assert abs(increase[2]) < 1e-6 and min(abs(x) for j, x in enumerate(increase) if j != 2) > 1e-4
        dropped = min(range(4), key=increase.__getitem__)
        assert plan["kept_layers"] == [j for j in range(4) if j != dropped]
    assert set(plan["kept_hidden"]).isdisjoint(dead["hidden"].tolist())
    for i in plan["kept_layers"]:
        assert set(plan["kept_neurons"][i]).isdisjoint(dead["neurons"][i].tolist())
        assert plan["kept_kv_heads"][i] == [1 - dead["kv_group"][i]]


def test_importance_beats_random_channels_on_the_reference_teacher(tmp_path):
    """About 50% of the non-embedding parameters go; no distillation, so both lose quality, random more."""
    from compressor.models import load_model, load_tokenizer, perplexity, zoo
    from compressor.models.shapes import Shape
    from compressor.stages.prune.importance import Importance
    from compressor.stages.prune.plan import make_plan
    from compressor.stages.prune.shapes import source_shape
    from compressor.stages.prune.surgery import apply_plan
    from compressor.text_sources import token_blocks

    teacher = zoo.ensure_model("tiny-test")
    target = {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 2}  # from 128, 384, 4
    calib = DataSource(source="zoo:tiny-test", seq_len=128)
    result, sink, out = run_stage(teacher, tmp_path / "run", target, calib, samples=64, batch_size=8)
    kept = sink.metrics["non_embedding_params_after"] / sink.metrics["non_embedding_params_before"]
    assert 0.45 < kept < 0.55

    heldout = token_blocks(
        DataSource(source="zoo:tiny-test", split="heldout", seq_len=128), load_tokenizer(teacher), 64
    )
    ppl_importance = perplexity(load(out), heldout)
    shape = source_shape(json.loads((teacher / "config.json").read_text()))
    out_shape = Shape(**result.details["target_shape"])
    ppl_random = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        scores = Importance(
            hidden=torch.rand(128, generator=g),
            heads=torch.rand(4, 4, generator=g),
            neurons=torch.rand(4, 384, generator=g),
            block_importance=torch.rand(4, generator=g),
        )
        model = load_model(teacher)
        apply_plan(model, make_plan(scores, shape, out_shape, kept_layers=None))
        ppl_random.append(perplexity(model, heldout))
    assert ppl_importance < min(ppl_random), (ppl_importance, ppl_random)


def test_stage_reports_metrics_importance_artifact_and_progress(saved, calib_file, tmp_path):
    seen = []

    class Ctx(StageContext):
        def progress(self, items, total=None, desc=""):
            seen.append((desc, total))
            return iter(items)

    sink = RecordingSink()
    ctx = Ctx(work_dir=tmp_path, data={"c": DataSource(source=str(calib_file), seq_len=32)}, sink=sink, quiet=True)
    spec = PruneSpec(target={"intermediate_size": 64, "num_layers": 2}, samples=6, batch_size=4)
    result = prune_stage.KIND.run(spec, ModelRef(path=str(saved["llama"]), key="k"), ctx)
    assert seen == [("prune: calibration", 2)]  # 6 samples in batches of 4
    assert sink.metrics["params_after"] < sink.metrics["params_before"] == result.details["params_before"]
    assert sink.metrics["importance_seconds"] > 0 and sink.metrics["calibration_tokens"] == 6 * 32
    assert [p.name for p in sink.artifacts] == ["importance.json"]
    assert result.details["target_shape"]["num_layers"] == 2 and len(result.details["kept_layers"]) == 2
    scores = json.loads((tmp_path / "importance.json").read_text())["scores"]
    assert len(scores["neurons"]) == 4 and len(scores["neurons"][0]) == 128 and len(scores["hidden"]) == 64


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_calibration_reads_jsonl_and_parquet(suffix, saved, tmp_path):
    rows = [{"text": t} for t in TEXT.split(". ") * 20]
    path = tmp_path / f"calib{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    _, sink, _ = run_stage(saved["mistral"], tmp_path / "run", {"intermediate_size": 64}, path)
    assert sink.metrics["calibration_tokens"] == 8 * 32


# ----------------------------------------------------------------------------- CLI
def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "compressor", "prune", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_cli_prunes_and_publishes(saved, calib_file, tmp_path):
    out = tmp_path / "out"
    run = cli(
        "--model",
        str(saved["qwen2"]),
        "--out",
        str(out),
        "--target",
        "intermediate_size=64,num_layers=3",
        "--calibration",
        str(calib_file),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--quiet",
    )
    assert run.returncode == 0, run.stderr
    assert {"manifest.json", "importance.json", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 64  # OUT is the checkpoint


@pytest.mark.parametrize("case", ["too_wide", "unsupported", "bad_key"])
def test_cli_refuses_bad_input_with_exit_2_and_writes_nothing(case, saved, calib_file, tmp_path):
    model, target = saved["llama"], "hidden_size=128"
    expected = "prune.target.hidden_size: 128 is larger than the source's 64"
    if case == "unsupported":
        model, target = tmp_path / "gpt2", "hidden_size=32"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
        expected = "architecture GPT2LMHeadModel is not supported"
    if case == "bad_key":
        target, expected = "hidden=32", "--target: unknown key 'hidden'"
    run = cli(
        "--model", str(model), "--out", str(tmp_path / "out"), "--target", target, "--calibration", str(calib_file)
    )
    assert run.returncode == 2 and expected in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_cli_model_may_be_a_zoo_name_or_a_stage_output(saved, calib_file, tmp_path):
    from compressor.manifest import Manifest
    from compressor.models import resolve_model, zoo

    assert resolve_model("zoo:tiny-test") == (str(zoo.ensure_model("tiny-test")), "tiny-test")
    run_stage(saved["llama"], tmp_path / "stage", {"num_layers": 3}, calib_file)
    Manifest(stage="prune", kind="prune", key="k", model_uri="model").write(tmp_path / "stage")
    assert resolve_model(str(tmp_path / "stage")) == (str(tmp_path / "stage" / "model"), None)
