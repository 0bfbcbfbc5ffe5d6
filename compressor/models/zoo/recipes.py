"""Recipes of the reference models, their cache keys and the config.json they produce, all without torch."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, replace
from functools import cache
from importlib import metadata
from typing import Optional

from compressor.errors import UserError

# Bump when the build procedure changes in a way that changes the produced corpus, tasks or weights.
BUILDER_VERSION = 1
# Special tokens are the first entries of the trained vocabulary (see tokenizer.py).
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


@dataclass(frozen=True)
class Recipe:
    description: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    seq_len: int  # training length, and max_position_embeddings (lm-eval windows at this length)
    steps: int
    batch_size: int  # sequences per optimizer step
    lr: float
    warmup_steps: int
    seed: int = 0
    heldout_percent: int = 10  # share of corpus documents kept out of training (by hash)
    # A task model: the zoo model `finetune_of`, fine-tuned (steps, batch_size, lr, warmup_steps above) on the
    # labelled train split of zoo task `task` (compressor/models/zoo/module_task.py), with the zoo chat template.
    finetune_of: Optional[str] = None
    task: Optional[str] = None

    def key_fields(self) -> dict:
        """The recipe as it enters keys: the task fields only where set (the keys of plain models predate them)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("finetune_of", "task")}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def train_tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(
        description="default pipeline teacher: Llama, GQA 8/2 heads, ~8M params, a few minutes on 2 CPU cores",
        hidden_size=256,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=768,
        vocab_size=4096,
        # Many small steps beat few large ones at this budget: at equal tokens (123k), batch 2 x 240 steps
        # reached held-out ppl 337 against 454 for batch 4 x 120 and 626 for batch 8 x 60.
        seq_len=256,
        steps=800,
        batch_size=2,
        lr=3e-3,
        warmup_steps=40,
    ),
    "tiny-test": Recipe(
        description="for tests: Llama, GQA 4/2 heads, ~1M params, under a minute on 2 CPU cores",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        vocab_size=1024,
        seq_len=128,
        steps=600,
        batch_size=8,
        lr=3e-3,
        warmup_steps=30,
    ),
}


def _task_model(base: str, description: str, steps: int, lr: float) -> Recipe:
    return replace(
        RECIPES[base], description=description, steps=steps, batch_size=16, lr=lr, warmup_steps=10,
        finetune_of=base, task="modules",
    )  # fmt: skip


RECIPES["tiny-modules"] = _task_model(
    "tiny", "task teacher: tiny fine-tuned to name a stdlib function's module from its docs", steps=300, lr=1e-3
)
RECIPES["tiny-test-modules"] = _task_model(
    "tiny-test", "for tests: tiny-test fine-tuned on the stdlib-module task", steps=100, lr=2e-3
)


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown zoo model {name!r}; known: {', '.join(sorted(RECIPES))} (see `compressor zoo list`)")
    return RECIPES[name]


def _minor(package: str) -> str:
    try:
        return ".".join(metadata.version(package).split(".")[:2])
    except metadata.PackageNotFoundError:
        return "absent"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def corpus_key(name: str) -> str:
    """The corpus and tasks depend on the CPython sources read, the split and the builder version."""
    from compressor.models.zoo import corpus

    return _digest(
        {
            "builder": BUILDER_VERSION,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "sources": corpus.source_digest(),
            "heldout_percent": recipe(name).heldout_percent,
        }
    )


@cache
def model_key(name: str) -> str:
    """Hash of the recipe, the corpus and the versions of the libraries that shape the trained weights."""
    r = recipe(name)
    task = {}
    if r.finetune_of:
        from compressor.models.zoo import module_task
        from compressor.models.zoo.chat import CHAT_TEMPLATE

        task = {"base": model_key(r.finetune_of), "task": module_task.task_key(), "chat_template": CHAT_TEMPLATE}
    return _digest(
        {
            "recipe": r.key_fields(),
            "corpus": corpus_key(name),
            "libraries": {p: _minor(p) for p in ("torch", "transformers", "tokenizers")},
            **task,
        }
    )


def model_config(name: str) -> dict:
    """The config.json the recipe produces (minus `transformers_version`), computed without building."""
    r = recipe(name)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "dtype": "float32",
        "head_dim": r.head_dim,  # explicit: pruning heads must not change how loaders derive it
        "hidden_act": "silu",
        "hidden_size": r.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": r.intermediate_size,
        "max_position_embeddings": r.seq_len,
        "mlp_bias": False,
        "num_attention_heads": r.num_heads,
        "num_hidden_layers": r.num_layers,
        "num_key_value_heads": r.num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,  # like Llama-3.1-8B: pruning and quantization see a separate lm_head
        "use_cache": True,
        "vocab_size": r.vocab_size,
    }


def param_count(name: str) -> int:
    """Parameters of the recipe's model (untied embeddings, RMSNorm weights, no biases)."""
    r = recipe(name)
    h, kv = r.hidden_size, r.num_kv_heads * r.head_dim
    attention = 2 * h * r.num_heads * r.head_dim + 2 * h * kv
    layer = attention + 3 * h * r.intermediate_size + 2 * h
    return r.num_layers * layer + 2 * r.vocab_size * h + h
