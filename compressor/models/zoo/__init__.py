"""Reference models built offline: small Llama teachers (GQA) trained on CPython's own documentation.

    from compressor.models import zoo
    zoo.ensure_model("tiny")      # HF checkpoint dir, built and cached on first use (a few minutes)
    zoo.corpus_dir("tiny")        # train.txt, heldout.txt (blank-line separated paragraphs)
    zoo.tasks_dir("tiny")         # lm-eval task YAMLs `ref_ppl` and `ref_next` (absolute data paths)
    zoo.model_config("tiny")      # its config.json, without torch and without building

Cache: $COMPRESSOR_HOME/zoo (default ~/.cache/compressor/zoo): `<name>-<key12>/` per model and
`corpus-<key12>/` per corpus (shared by recipes with the same split). Keys hash the recipe, the
CPython sources the corpus is made of, and the torch/transformers/tokenizers minor versions.
Importing this package does not import torch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from compressor.models.zoo import build as _build
from compressor.models.zoo.eval_tasks import TASK_NAMES
from compressor.models.zoo.recipes import RECIPES, Recipe, corpus_key, model_config, model_key, param_count, recipe

__all__ = [
    "RECIPES",
    "Recipe",
    "TASK_NAMES",
    "build_info",
    "corpus_dir",
    "corpus_key",
    "ensure_corpus",
    "ensure_model",
    "home",
    "is_built",
    "model_config",
    "model_key",
    "model_path",
    "param_count",
    "recipe",
    "tasks_dir",
]

home = _build.home


def model_path(name: str) -> Path:
    """Where the model of recipe `name` lives once built (it may not exist yet)."""
    return home() / f"{name}-{model_key(name)[:12]}"


def corpus_path(name: str) -> Path:
    return home() / f"corpus-{corpus_key(name)[:12]}"


def is_built(name: str) -> bool:
    return model_path(name).is_dir()


def ensure_corpus(name: str) -> Path:
    """Build (a few seconds) or find the corpus and task data of recipe `name`; returns its directory."""
    recipe(name)  # unknown name -> UserError
    return _build.build_corpus(name, corpus_path(name))


def corpus_dir(name: str) -> Path:
    """Directory with train.txt and heldout.txt."""
    return ensure_corpus(name)


def tasks_dir(name: str) -> Path:
    """Directory of lm-eval task YAMLs (`ref_ppl`, `ref_next`) for TaskManager(include_path=...)."""
    from compressor.models.zoo.eval_tasks import materialize

    tasks = ensure_corpus(name) / "tasks"
    return materialize(data_dir=tasks, out_dir=tasks)  # no-op unless the cache was moved


def ensure_model(name: str, log: Optional[Callable[[str], None]] = None) -> Path:
    """The HF checkpoint dir of recipe `name` (safetensors, config.json, tokenizer), built on first use."""
    recipe(name)
    ensure_corpus(name)
    return _build.build_model(name, model_path(name), log or _build.stderr_log)


def build_info(name: str) -> Optional[dict]:
    """What the build measured (params, seconds, held-out and unigram perplexity), or None if not built."""
    path = model_path(name) / _build.BUILD_INFO
    return json.loads(path.read_text()) if path.is_file() else None
