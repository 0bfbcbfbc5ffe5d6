"""The zoo's labelled task: given a standard-library function's documentation, name its module.

Items come from introspection of this Python's standard library (the label is the module the function is found
in), so the task is real, labelled and offline. Splits, by a seeded shuffle of all items:
- train:      the scarce hard labels (the teacher is fine-tuned on them; so is the hard-label student baseline);
- transfer:   unlabelled prompts the teacher answers (generate), the distillation data;
- validation: labelled, for choosing settings;
- test:       labelled, the held-out set the gates and the report judge on."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
from pathlib import Path

from compressor.models.reference import zoo_ref

LABELS = ("math", "os", "operator", "socket", "statistics", "shutil", "time", "random")
PER_LABEL = 50  # at most this many functions of one module, so os (about 190) does not swamp the rest
SPLITS = {"train": 0.15, "transfer": 0.55, "validation": 0.1, "test": 0.2}
DOC_CHARS = 160  # the first paragraph of a docstring, cut here: prompts stay within short model windows


def items() -> list[dict]:
    """{prompt, answer} for every documented public function of the LABELS modules, in a fixed order."""
    out, seen = [], set()
    for module_name in LABELS:
        module = importlib.import_module(module_name)
        found = []
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isroutine(obj):
                continue
            doc = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ").strip()
            prompt = f"{name}: {doc[:DOC_CHARS]}\nWhich module?"
            # statistics imports sqrt, exp, ... from math: the first module (LABELS order) that has it keeps it
            if len(doc) >= 12 and prompt not in seen:
                seen.add(prompt)
                found.append({"prompt": prompt, "answer": module_name})
        out.extend(found[:PER_LABEL])
    return out


def splits(seed: int = 0) -> dict[str, list[dict]]:
    rows = items()
    random.Random(seed).shuffle(rows)
    out, start = {}, 0
    for i, (name, share) in enumerate(SPLITS.items()):
        end = len(rows) if i == len(SPLITS) - 1 else start + round(share * len(rows))
        out[name], start = rows[start:end], end
    return out


def write_splits(directory: Path, seed: int = 0) -> Path:
    """train.jsonl, transfer.jsonl (prompts only), validation.jsonl, test.jsonl under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in splits(seed).items():
        with (directory / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({"prompt": row["prompt"]} if name == "transfer" else row) + "\n")
    return directory


ZOO_PREFIX = zoo_ref("modules/")  # `zoo:modules/<split>` names a split file wherever a data file is expected


def task_key() -> str:
    """The task's items depend on this Python's standard library and on how they are made (the key of its splits
    and of the models fine-tuned on them)."""
    identity = {"items": items(), "splits": SPLITS, "labels": LABELS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def split_file(split: str) -> Path:
    """The JSONL of one split, written once per task key under the zoo cache (a few seconds, no torch)."""
    from compressor.errors import UserError
    from compressor.models.zoo import home
    from compressor.models.zoo.once import build_once

    if split not in SPLITS:
        raise UserError(f"{ZOO_PREFIX}{split}: no such split of the stdlib-module task (splits: {', '.join(SPLITS)})")
    directory = build_once(home() / f"task-modules-{task_key()[:12]}", write_splits)
    return directory / f"{split}.jsonl"


def resolve(source: str) -> str:
    """`zoo:modules/<split>` -> the split file's absolute path; anything else unchanged."""
    return str(split_file(source[len(ZOO_PREFIX) :])) if source.startswith(ZOO_PREFIX) else source
