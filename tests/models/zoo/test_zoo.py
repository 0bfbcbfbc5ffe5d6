"""The offline reference teachers: recipes, keys, corpus split, the built checkpoint and its quality."""

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace

import pytest

from compressor.errors import UserError
from compressor.models import zoo
from compressor.models.zoo import corpus, eval_tasks
from compressor.models.zoo.once import build_once


def paragraphs(path):
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


@pytest.mark.parametrize("name", sorted(zoo.RECIPES))
def test_recipe_shapes_suit_pruning_and_gptq(name):
    r = zoo.RECIPES[name]
    assert r.num_kv_heads < r.num_heads and r.num_heads % r.num_kv_heads == 0  # GQA
    assert r.hidden_size % 128 == 0 and r.intermediate_size % 128 == 0  # GPTQ group size 128 divides
    assert r.head_dim % 32 == 0 and r.vocab_size % 32 == 0
    config = zoo.model_config(name)
    assert config["head_dim"] == r.head_dim and config["num_key_value_heads"] == r.num_kv_heads


def test_sizes():
    assert 0.7e6 < zoo.param_count("tiny-test") < 1.5e6
    assert 3e6 < zoo.param_count("tiny") < 10e6


def test_unknown_recipe_is_a_user_error():
    with pytest.raises(UserError, match="unknown zoo model 'huge'.*tiny-test"):
        zoo.ensure_model("huge")


def test_api_does_not_import_torch():
    code = (
        "import sys; from compressor import evaluation; from compressor.models import zoo; import compressor.commands.zoo, compressor.commands.evaluate\n"
        "zoo.model_config('tiny'); zoo.model_key('tiny'); zoo.param_count('tiny')\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "NO-TORCH"


def test_keys_are_deterministic_across_processes_and_follow_the_recipe(monkeypatch):
    code = "from compressor.models import zoo; print(zoo.model_key('tiny'), zoo.corpus_key('tiny'))"
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.split()
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1] == [zoo.model_key("tiny"), zoo.corpus_key("tiny")]
    assert zoo.model_key("tiny") != zoo.model_key("tiny-test")

    zoo.model_key.cache_clear()
    monkeypatch.setitem(zoo.RECIPES, "tiny", replace(zoo.RECIPES["tiny"], steps=zoo.RECIPES["tiny"].steps + 1))
    try:
        assert zoo.model_key("tiny") != outputs[0][0]
        assert zoo.corpus_key("tiny") == outputs[0][1]  # training options do not touch the corpus
    finally:
        zoo.model_key.cache_clear()


def test_corpus_split_is_deterministic_disjoint_and_english(tiny_corpus):
    train, heldout = paragraphs(tiny_corpus / "train.txt"), paragraphs(tiny_corpus / "heldout.txt")
    assert not set(train) & set(heldout)
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.2
    assert sum(map(len, train)) > 1_000_000  # the CPython docs give about 1.3 MB of prose
    # The split depends on each document's content only: recomputing it gives the files back.
    again_train, again_heldout = corpus.split(zoo.RECIPES["tiny-test"].heldout_percent)
    assert [p for d in again_heldout for p in d] == heldout
    assert [p for d in again_train for p in d] == train
    assert all(corpus.is_heldout(d, 10) for d in again_heldout[:50])
    words = Counter(w.lower() for p in train[:2000] for w in p.split())
    assert {"the", "is", "of", "a"} <= {w for w, _ in words.most_common(10)}


def test_built_config_is_the_predicted_one_with_gqa(tiny_teacher):
    built = json.loads((tiny_teacher / "config.json").read_text())
    expected = zoo.model_config("tiny-test")
    assert {k: built.get(k) for k in expected} == expected
    assert set(built) - set(expected) <= {"transformers_version"}
    assert built["num_key_value_heads"] < built["num_attention_heads"]
    assert zoo.build_info("tiny-test")["params"] == zoo.param_count("tiny-test")


def test_tokenizer_reloads_as_a_plain_fast_tokenizer(tiny_teacher):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    assert (
        json.loads((tiny_teacher / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    )
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == zoo.RECIPES["tiny-test"].vocab_size
    config = zoo.model_config("tiny-test")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        config["bos_token_id"],
        config["eos_token_id"],
        config["pad_token_id"],
    )
    text = "Return the *key* of a dict — naïve café, 3.14 ≠ π."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE: lossless, no unknown token
    assert len(ids) < len(text.encode()) / 1.5  # and it really merged bytes into words


def test_heldout_perplexity_far_below_a_unigram_model(tiny_teacher, tiny_corpus):
    from compressor.config.schema import DataSource
    from compressor.models import load_model, load_tokenizer, perplexity
    from compressor.models.zoo.train import unigram_perplexity
    from compressor.text_sources import token_blocks

    tok = load_tokenizer(tiny_teacher)
    seq_len = zoo.RECIPES["tiny-test"].seq_len
    heldout = token_blocks(DataSource(source="zoo:tiny-test", split="heldout", seq_len=seq_len), tok, samples=64)
    train = token_blocks(DataSource(source="zoo:tiny-test", seq_len=seq_len), tok)
    model_ppl = perplexity(load_model(tiny_teacher), heldout)
    unigram_ppl = unigram_perplexity(train, heldout, len(tok))
    assert model_ppl < unigram_ppl / 4, (model_ppl, unigram_ppl)


def test_task_yamls_point_at_existing_absolute_data(tiny_corpus):
    import yaml

    tasks = zoo.tasks_dir("tiny-test")
    assert tasks == tiny_corpus / "tasks"
    for name in zoo.TASK_NAMES:
        config = yaml.safe_load((tasks / f"{name}.yaml").read_text())
        assert config["task"] == name
        data = config["dataset_kwargs"]["data_files"]["test"]
        assert os.path.isabs(data) and os.path.isfile(data)
    items = [json.loads(line) for line in (tasks / "next.jsonl").read_text().splitlines()]
    assert len(items) >= 200
    labels = Counter(item["label"] for item in items)
    assert set(labels) == {0, 1, 2, 3} and max(labels.values()) < 0.4 * len(items)  # answer position is mixed
    for item in items:
        truth = item["choices"][item["label"]]
        assert len(set(item["choices"])) == 4
        assert all(sorted(c.split()) == sorted(truth.split()) for c in item["choices"])  # same words, other order


def test_next_sentence_items_are_deterministic_minimal_pairs():
    docs = [
        [
            f"Paragraph {d} opens with a fairly long first sentence about the topic number {d}. "
            f"Then a second sentence of document {d} follows it here."
        ]
        for d in range(8)
    ]
    items = eval_tasks.next_sentence_items(docs)
    assert items == eval_tasks.next_sentence_items(docs) and len(items) == 8
    for d, item in enumerate(sorted(items, key=lambda i: i["context"])):
        assert item["context"].startswith(f"Paragraph {d} opens")
        assert item["choices"][item["label"]] == f"Then a second sentence of document {d} follows it here."
        wrong = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
        assert len(set(wrong)) == 3 and all(c.split() != item["choices"][item["label"]].split() for c in wrong)


def test_concurrent_builders_build_once_and_failures_leave_nothing(tmp_path):
    final, calls = tmp_path / "entry", []

    def fill(work):
        calls.append(1)
        time.sleep(0.3)  # the other thread arrives while this one holds the lock
        (work / "done").write_text("x")

    threads = [threading.Thread(target=build_once, args=(final, fill)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (final / "done").is_file()

    def broken(work):
        (work / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "other", broken)
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".tmp-*"))


def test_cli_zoo_list_and_build(tiny_teacher):
    from typer.testing import CliRunner

    from compressor.cli import app

    wide = {"COLUMNS": "250"}  # rich wraps table cells at the terminal width
    listing = CliRunner().invoke(app, ["zoo", "list"], env=wide)
    assert listing.exit_code == 0 and "tiny-test" in listing.stdout and "4/2" in listing.stdout
    assert f"tiny-test: {tiny_teacher}" in listing.stdout
    built = CliRunner().invoke(app, ["zoo", "build", "tiny-test"], env=wide)
    assert built.exit_code == 0, built.output
    assert str(tiny_teacher) in built.stdout and "(cached)" in built.stdout and "held-out ppl" in built.stdout
