"""lm-eval on a checkpoint directory, metric directions for gates, and the result cache helpers.

torch and lm-eval are imported inside `evaluate` only, so gates and `validate` stay light."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from compressor.cache import digest
from compressor.config.schema import TaskSpec
from compressor.errors import UserError
from compressor.models import is_zoo, zoo_name

# The headline metric of a task, in order of preference (acc_norm first: it corrects the length bias of acc).
PRIMARY_ORDER = (
    "acc_norm",
    "acc",
    "accuracy",
    "exact_match",
    "f1",
    "mcc",
    "word_perplexity",
    "perplexity",
    "byte_perplexity",
    "bits_per_byte",
)
NOT_METRICS = {"sample_len", "alias"}  # bookkeeping lm-eval puts beside the metrics
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "bpb", "loss", "error")
LOWER_IS_BETTER_EXACT = {"ter", "wer", "cer", "brier_score"}
STDERR_SUFFIX = "_stderr"  # "acc_stderr" is the standard error of "acc", kept beside it in the scores

# lm-eval reports standard errors only when bootstrap_iters > 0. Mean metrics (acc, acc_norm: MMLU, HellaSwag,
# Winogrande, ARC) get the analytic one whatever the number; median / f1 / mcc / perplexity / bleu aggregations
# are resampled this many times, in process (about 0.6 s for a 5k-doc perplexity, 8 s for a 1k-doc f1 on one
# core; lm-eval's default 100000 in a pool of every CPU takes minutes). The estimate's own relative error is
# about 1/sqrt(2 * 1000) = 2%. weighted_perplexity and bits_per_byte (ref_ppl, wikitext) get none at any setting.
BOOTSTRAP_ITERS = 1000


def include_dir(include: str) -> Path:
    """`zoo:NAME` -> the zoo model's task dir (materialized on first use); else a directory of task YAMLs."""
    if (name := zoo_name(include)) is not None:
        from compressor.models import zoo

        return zoo.tasks_dir(name)
    path = Path(include).expanduser()
    if not path.is_dir():
        raise UserError(f"evaluation include {include!r}: not a directory of lm-eval task YAMLs (or use zoo:NAME)")
    return path.resolve()


def task_dir(task: TaskSpec) -> Optional[Path]:
    """The directory of the task's YAML: its `include`, or the one generated from its held-out `data`."""
    if task.data is not None:
        from compressor.heldout import materialize

        return materialize(task)
    return include_dir(task.include) if task.include else None


def task_manager(tasks: list[TaskSpec]):
    """A TaskManager knowing every requested task. lm-eval's own registry is indexed (about 6 s) only when
    a task is not under the includes. Unknown task -> UserError, before any model is loaded."""
    from lm_eval.tasks import TaskManager

    includes = sorted({str(task_dir(t)) for t in tasks if t.include or t.data})
    names = [t.name for t in tasks]
    if includes:
        local = TaskManager(include_path=includes, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=includes or None, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f"neither under {', '.join(includes)} nor in" if includes else "in"
        raise UserError(
            f"unknown evaluation task {', '.join(map(repr, unknown))}: not found {where} lm-eval's registry. "
            "Check the name, or point `include` (--include) at the directory holding its YAML "
            "(zoo:tiny for ref_ppl / ref_next)."
        )
    return manager


def device_for(num_gpus: float) -> str:
    """The device an evaluation with these Ray resources runs on: Ray makes the reserved GPU(s) "cuda"."""
    return "cuda" if num_gpus > 0 else "cpu"


def _load(model_dir: Path, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise UserError(f"model {str(model_dir)!r}: no config.json there; expected a Hugging Face checkpoint directory")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"evaluation on {device!r}: torch {torch.__version__} sees no CUDA device here; "
                "reserve no GPU (evaluation.resources.num_gpus: 0) or install a CUDA build of torch"
            )
    # Straight onto the device, as a user would load it: a GPTQ or AWQ checkpoint (via its config) then gets
    # GPTQModel's kernel for that device, and an 8B model never sits whole in host memory first.
    # lm-eval's HFLM keeps a passed model where it is, so this is where the device is decided.
    from compressor import remote_code

    trust = remote_code.enabled()  # off unless the pipeline sets teacher.trust_remote_code
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, device_map=device, trust_remote_code=trust, **_gguf_weights(model_dir, trust)
    )
    return model.eval(), AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust)


def _gguf_weights(model_dir: Path, trust: bool) -> dict:
    """A GGUF stage output keeps its weights in the .gguf that config.json's quantization_config names; transformers
    reads them (dequantized: the gate judges the GGUF's weights) only when given the file. The checkpoint's own
    config goes with it: transformers' GGUF config mapping drops rope scaling (llama.cpp keeps it as a tensor)."""
    quant = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "gguf":
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust)
    del config.quantization_config  # the file is named by gguf_file; transformers warns when given both
    return {"gguf_file": quant["gguf_file"], "config": config}


def numeric_scores(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": 0.02, "f1_stderr,none": "N/A", "alias": ..., "sample_len": 9}
    -> {"acc": 0.5, "acc_stderr": 0.02}: numbers only, so a standard error lm-eval could not give is absent."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        clean = {}
        for key, value in metrics.items():
            name = key.split(",")[0]
            if name in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            clean[name] = float(value)
        out[task] = clean
    return out


def evaluate(
    model_dir: str | Path, tasks: list[TaskSpec], batch_size: int | str = 16, device: str = "cpu", dtype: str = "auto"
) -> dict[str, dict[str, float]]:
    """Run lm-eval's `simple_evaluate` on the checkpoint in `model_dir`, loaded onto `device` ("cpu", "cuda",
    "cuda:1"). Returns {task: {metric: value}}, with "<metric>_stderr" beside each metric lm-eval gives one for.

    `batch_size` is an int or "auto" (lm-eval finds the largest that fits, from 64 down).
    Tasks sharing (num_fewshot, limit) run in one call; the model is loaded once."""
    if not tasks:
        raise UserError("no evaluation tasks given")
    manager = task_manager(tasks)
    with _offline(all(t.data or (t.include and is_zoo(t.include)) for t in tasks)):
        return _run(Path(model_dir), tasks, manager, batch_size, device, dtype)


@contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Zoo tasks read local JSONL only: set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (unless the user set them)
    so that nothing waits on an unreachable hub. Other tasks keep the user's settings: they may need it."""
    added = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if enabled and k not in os.environ]
    os.environ.update({k: "1" for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextmanager
def _bootstrap_in_process() -> Iterator[None]:
    """lm-eval bootstraps in a pool of os.cpu_count() processes unless DISABLE_MULTIPROC is set: forking dozens
    of processes from the one holding the model, for one chunk of BOOTSTRAP_ITERS resamples, only costs."""
    previous = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = previous


def _run(model_dir: Path, tasks: list[TaskSpec], manager, batch_size: int | str, device: str, dtype: str):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = _load(model_dir, device, dtype)
    chat_tasks = [t.name for t in tasks if t.data is not None]
    templated = bool(getattr(tokenizer, "chat_template", None))
    if chat_tasks and not templated:  # e.g. a base model before it learned the task: prompted as lm-eval would be
        warnings.warn(
            f"evaluation task {chat_tasks[0]!r}: the tokenizer of {model_dir} has no chat template, so the model "
            "answers the plain prompts (lm_eval without --apply_chat_template)",
            stacklevel=1,
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    groups: dict[tuple, list[str]] = defaultdict(list)
    for t in tasks:
        limit = None if t.limit is None else (t.limit if t.limit < 1 else int(t.limit))
        groups[(t.num_fewshot, limit, t.data is not None)].append(t.name)
    results: dict[str, dict[str, float]] = {}
    for (num_fewshot, limit, chat), names in groups.items():
        with _bootstrap_in_process():
            out = simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
                apply_chat_template=chat and templated,  # `lm_eval --apply_chat_template`, for the same numbers
            )
        results.update(numeric_scores(out["results"]))
    return results


def _metric_name(metric: str) -> str:
    return metric.split(",")[0].rsplit(".", 1)[-1]


def higher_is_better(metric: str) -> bool:
    """Direction of a metric ('acc', 'ref_ppl.word_perplexity', 'acc,none' all work)."""
    name = _metric_name(metric)
    return not (name in LOWER_IS_BETTER_EXACT or any(part in name for part in LOWER_IS_BETTER))


def primary_metric(task: str, metrics: dict[str, float]) -> str:
    """The metric a gate on plain `task` checks: the first of PRIMARY_ORDER present, else the first by name."""
    names = [m for m in metrics if not m.endswith(STDERR_SUFFIX)]
    for preferred in PRIMARY_ORDER:
        if preferred in names:
            return preferred
    if not names:
        raise UserError(f"evaluation task {task!r} produced no metrics; name one explicitly as `{task}.METRIC`")
    return sorted(names)[0]


def _fingerprint(task: TaskSpec) -> Optional[str]:
    if task.data is not None:
        from compressor.heldout import task_key

        return task_key(task)
    return _include_fingerprint(task.include)


def _include_fingerprint(include: Optional[str]) -> Optional[str]:
    """What the task definitions depend on: a zoo corpus key, or the content of an include directory."""
    if include is None:
        return None
    if (name := zoo_name(include)) is not None:
        from compressor.models.zoo import corpus_key

        return corpus_key(name)
    path = Path(include).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return digest([[p.relative_to(path).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()] for p in files])


def eval_cache_key(model_key: str, tasks: list[TaskSpec], batch_size: int | str) -> str:
    """Same model + same task definitions and options + same batch size + same lm-eval and bootstrap setting
    (it decides which standard errors exist) -> same results."""
    return digest(
        {
            "model": model_key,
            "tasks": [{**t.model_dump(mode="json"), "fingerprint": _fingerprint(t)} for t in tasks],
            "batch_size": batch_size,
            "lm_eval": metadata.version("lm_eval"),
            "bootstrap_iters": BOOTSTRAP_ITERS,
        }
    )


def load_cached(uri: str) -> Optional[dict[str, dict[str, float]]]:
    """Scores cached under `uri` (a path or storage URI), or None: missing, torn or foreign files are cache misses."""
    from compressor.storage import read_text

    try:
        return json.loads(read_text(uri) or "null")["results"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def save_cached(uri: str, results: dict[str, dict[str, float]]) -> None:
    """Written whole (renamed into place locally, one PUT on object stores): readers never see half a file."""
    from compressor.storage import write_text

    write_text(uri, json.dumps({"results": results}, indent=2, sort_keys=True))
