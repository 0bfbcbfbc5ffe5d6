"""The zoo's labelled task: items by introspection of the standard library, seeded disjoint splits."""

from __future__ import annotations

import importlib
import json

import pytest

from compressor.config.schema import DataSource, TaskSpec
from compressor.errors import UserError
from compressor.models.zoo import module_task


def test_labels_are_the_modules_the_functions_live_in():
    items = module_task.items()
    assert len(items) > 200 and {i["answer"] for i in items} == set(module_task.LABELS)
    for item in items[::17]:
        name = item["prompt"].split(":", 1)[0]
        assert callable(getattr(importlib.import_module(item["answer"]), name))


def test_splits_are_seeded_and_disjoint(tmp_path):
    splits, again = module_task.splits(0), module_task.splits(0)
    assert splits == again and splits != module_task.splits(1)
    prompts = [{r["prompt"] for r in rows} for rows in splits.values()]
    assert sum(map(len, prompts)) == len(set().union(*prompts)) == len(module_task.items())
    module_task.write_splits(tmp_path)
    transfer = [json.loads(line) for line in (tmp_path / "transfer.jsonl").read_text().splitlines()]
    assert transfer and all(set(row) == {"prompt"} for row in transfer)  # unlabelled


def test_zoo_split_names_resolve_to_files():
    assert DataSource(source="zoo:modules/transfer").source.endswith("transfer.jsonl")
    assert TaskSpec(name="t", data="zoo:modules/test").data.endswith("test.jsonl")
    with pytest.raises(UserError, match="no such split"):
        module_task.resolve("zoo:modules/dev")
