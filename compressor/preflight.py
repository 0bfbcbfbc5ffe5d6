"""Checks of the inputs a run will touch, before any heavy work: no torch, no model loaded, nothing written.

Each check raises a UserError of one paragraph naming the flag or field and the file. Used by `compressor
validate` (and `run`) for pipelines, and by the standalone `prune | distill | quantize` commands for their
--model / --calibration / --data / --out arguments."""

from __future__ import annotations

import codecs
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Optional

from compressor.contract import get as stage_kind
from compressor.errors import UserError
from compressor.models import is_zoo, zoo_name

SNIFF_BYTES = 1 << 16  # how much of each data file is read to tell text from binary junk
JSONL_LINES = 20  # JSONL lines read to check the text field
SNIFF_FILES = 8  # files of a directory source sniffed: a directory of thousands of shards is not read at every check
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# ----------------------------------------------------------------------------- checkpoints
def check_checkpoint(model_dir: str | Path, flag: str, tokenizer: bool = True) -> dict:
    """A local Hugging Face checkpoint that will load: config.json is JSON with dividing head counts, code it ships
    is allowed (compressor.remote_code), every safetensors file is whole, and a tokenizer is there when asked
    for. Returns the config. Hub ids and zoo names are left to the stage (they are fetched or built first)."""
    from compressor import remote_code
    from compressor.models import checkpoint

    path = Path(model_dir).expanduser()
    cfg_path = path / "config.json"
    if str(model_dir).startswith(("/", ".", "~")) and not path.is_dir():
        raise UserError(f"{flag} {model_dir}: no such directory")
    if not cfg_path.is_file():
        return {}  # not a local checkpoint (hub id) or reported by the stage's own check with its wording
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{flag} {path}: config.json is not a JSON object")
    check_heads(config, f"{flag} {path}")
    remote_code.check_config(config, f"{flag} {path}")
    weights = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{flag} {index}: not a valid safetensors index (no weight_map)") from None
        missing = sorted(f for f in listed if not (path / f).is_file())
        if missing:
            raise UserError(f"{flag} {path}: weight files listed in {index.name} are missing: {', '.join(missing)}")
    if not weights and not any(path.glob("*.bin")):
        raise UserError(f"{flag} {path}: no weights (*.safetensors or *.bin) in this checkpoint directory")
    for file in weights:
        if (problem := checkpoint.safetensors_problem(file)) is not None:
            raise UserError(f"{flag} {file}: {problem}")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{flag} {path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "with the model (tokenizer.save_pretrained(dir))"
        )
    return config


def check_heads(config: dict, where: str) -> None:
    """Attention shapes a model can have: KV heads divide query heads, and a head width without head_dim divides."""
    heads, kv = (
        config.get("num_attention_heads"),
        config.get("num_key_value_heads") or config.get("num_attention_heads"),
    )
    hidden = config.get("hidden_size")
    if not all(isinstance(v, int) and v > 0 for v in (heads, kv, hidden)):
        return  # another architecture's config: the stage checks its own fields
    if heads % kv:
        raise UserError(
            f"{where}: config.json has num_attention_heads {heads}, which num_key_value_heads {kv} does not "
            "divide (every KV head serves the same number of query heads)"
        )
    if not config.get("head_dim") and hidden % heads:
        raise UserError(
            f"{where}: config.json has hidden_size {hidden}, which num_attention_heads {heads} does not "
            "divide, and no head_dim"
        )


def output_bytes(config: dict, bytes_per_param: float) -> int:
    """A lower bound of the bytes a model with this config takes on disk (0 when its shape is unknown)."""
    from compressor import estimate

    try:
        return int(estimate.param_count(config) * bytes_per_param)
    except (UserError, TypeError, KeyError, ZeroDivisionError):
        return 0


def bytes_per_param(config: dict, dtype: str = "auto") -> float:
    return DTYPE_BYTES.get(dtype) or DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 2)


# ----------------------------------------------------------------------------- output locations
def check_space(directory: Path, need: int, what: str) -> None:
    """Refuse when the filesystem of `directory` (or its deepest existing ancestor) has less than `need` bytes free."""
    probe = Path(directory).expanduser().resolve()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need and free < need:
        raise UserError(
            f"{what}: {_size(free)} free on {probe}, but this needs at least {_size(need)} (the model "
            "outputs alone); free space or choose another location"
        )


def check_out(out: str, flag: str, need: int = 0) -> None:
    """--out of a standalone command: a new or empty directory whose parent can be created and written, with room."""
    from compressor.planning import check_storage

    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {out}: a file is there; give a new directory")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"{flag} {out}: directory exists and is not empty; choose a new one")
    try:
        check_storage(path)
    except UserError as exc:
        raise UserError(f"{flag} {str(exc).removeprefix('storage: ')}") from None
    check_space(path, need, f"{flag} {out}")


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


# ----------------------------------------------------------------------------- data
def check_data(source, flag: str, tokenizer_dir: Optional[str | Path] = None, need_tokens: int = 0) -> None:
    """A local data source (a DataSource) that holds text: files exist, are not empty, are text (not binary), JSONL
    rows have the text field; and, given the model's tokenizer.json, at least `need_tokens` tokens. hf: and zoo:
    sources are not read here (the hub is remote; zoo corpora are compressor's own)."""
    from compressor import storage, text_sources

    if source.source.startswith("hf:") or is_zoo(source.source) or storage.is_remote(source.source):
        return
    path = Path(source.source).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {source.source}: no such file or directory")
    try:
        _, infos = text_sources._files(str(path.resolve()))
        for info in infos[:SNIFF_FILES]:
            _check_data_file(Path(info["name"]), source.text_field)
        if not infos:
            raise UserError(f"{source.source}: an empty directory")
        if need_tokens and tokenizer_dir is not None:
            _check_token_count(source, Path(tokenizer_dir), need_tokens)
    except UserError as exc:
        text = str(exc)
        raise UserError(text if text.startswith(flag) else f"{flag}: {text}") from None


def _check_data_file(file: Path, text_field: str) -> None:
    size = file.stat().st_size
    if size == 0:
        raise UserError(f"{file}: the file is empty")
    with open(file, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        if file.suffix.lower() == ".parquet":
            fh.seek(-4, 2)
            if not (head.startswith(b"PAR1") and fh.read(4) == b"PAR1"):
                raise UserError(f"{file}: not a parquet file (no PAR1 magic at its start and end)")
            return
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        if b"\x00" in head:
            raise ValueError
    except ValueError:
        raise UserError(f"{file}: not UTF-8 text (binary data?); give .txt/.jsonl text or .parquet") from None
    if file.suffix.lower() in (".jsonl", ".json"):
        lines = [line for line in head.decode("utf-8", errors="replace").splitlines()[:JSONL_LINES] if line.strip()]
        complete = lines if len(head) < SNIFF_BYTES else lines[:-1]  # the last line may be cut by the sniff
        for n, line in enumerate(complete, 1):
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{file}:{n}: not valid JSON lines ({exc})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise UserError(
                    f"{file}:{n}: no field {text_field!r} (set `text_field` on the data source, "
                    "--text-field on the command line)"
                )
            from compressor.text_sources import as_text

            as_text(row[text_field], f"{file}:{n}", text_field)  # chat turns are not text


def _check_token_count(source, tokenizer_dir: Path, need: int) -> None:
    """Count tokens (as text_sources.token_blocks would: each document plus EOS) until `need`, with the fast tokenizer's
    Rust backend alone (no transformers, no torch)."""
    file = tokenizer_dir / "tokenizer.json"
    if not file.is_file():
        return
    from tokenizers import Tokenizer

    from compressor import text_sources

    tokenizer = Tokenizer.from_file(str(file))
    have = 0
    for batch in text_sources.batched(text_sources.documents(source), text_sources.ENCODE_BATCH):
        have += sum(len(e.ids) + 1 for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False))
        if have >= need:
            return
    raise UserError(
        f"{source.source}: holds about {have:,} tokens, fewer than the {need:,} asked for; lower "
        "--samples or --seq-len, or use a larger source"
    )


# ----------------------------------------------------------------------------- standalone commands
def check_standalone(
    kind: str,
    spec,
    model_dir: str,
    out: str,
    source=None,
    data_flag: str = "",
    samples: Optional[int] = None,
    seq_len: Optional[int] = None,
    teacher_dir: Optional[str] = None,
    model_flag: str = "--model",
) -> None:
    """Everything `compressor prune | distill | quantize` can check before loading a model: the checkpoint(s), the
    stage's own shape checks, the data (enough tokens for `samples` sequences of `seq_len`), and --out with room
    for the output."""
    from compressor.models import checkpoint

    try:  # what the stage refuses in the config alone (an architecture, a shape) is said before file problems
        early = json.loads(Path(model_dir, "config.json").read_text())
    except (OSError, ValueError):
        early = None
    if isinstance(early, dict):
        stage_kind(kind).check(spec, early)
    config = check_checkpoint(model_dir, model_flag, tokenizer=teacher_dir is None)
    tokenizer_dir = model_dir
    if teacher_dir is not None:
        check_checkpoint(teacher_dir, "--teacher")
        tokenizer_dir = teacher_dir  # distill trains on the teacher's tokens and saves its tokenizer
    out_config = stage_kind(kind).check(spec, config).config if config else {}
    need = 0
    if out_config and Path(model_dir, "config.json").is_file():
        stored = checkpoint.num_params(model_dir)
        bits = stage_kind(kind).bits(spec)  # a quantizing kind's output width
        width = bits / 8 if bits else checkpoint.weight_bytes(model_dir) / max(stored, 1)
        need = output_bytes(out_config, width)
    if source is not None:
        seq_len = min(seq_len or source.seq_len, config.get("max_position_embeddings") or 1 << 30)
        check_data(source, data_flag, tokenizer_dir, (samples or 1) * seq_len)
    check_out(out, "--out", need)


# ----------------------------------------------------------------------------- pipelines
def check_pipeline(spec, path: Optional[Path] = None, storage: Optional[str] = None, plan=None) -> None:
    """What `validate` (and `run`, before Ray or MLflow start) can know without running: storage writable with room
    for the outputs, local data sources readable text, gate metrics the tasks produce."""
    from compressor import storage as storage_mod
    from compressor.planning import check_storage, make_plan

    plan = plan or make_plan(spec, storage)
    check_offline_teacher(spec.teacher, published=plan.teacher.path != spec.teacher.model)
    if storage_mod.is_remote(plan.storage_uri):
        _check_filesystem_driver(plan.storage_uri)
    else:
        check_storage(plan.storage_root)
        dtype = spec.teacher.dtype
        need = sum(
            output_bytes(
                s.out_config,
                bits / 8 if (bits := s.kind_of.bits(s.entry.spec)) else bytes_per_param(s.out_config, dtype),
            )
            for s in plan.stages
            if s.produces_model and not s.cached and s.out_config
        )
        check_space(plan.storage_root, need, f"storage {plan.storage_uri}")
    reads = source_reads(spec)
    for name, source in spec.data.items():
        if "prompts" in reads.get(name, ()):  # rows to answer
            check_prompts(source, f"data.{name}.source")
        elif "chat" in reads.get(name, ()):
            check_chat_rows(source, f"data.{name}.source")
        else:
            check_data(source, f"data.{name}.source")
    check_gate_metrics(spec, path)
    for i, entry in enumerate(spec.stages):
        stage_kind(entry.kind).preflight(entry.spec, spec, i)


def has_chat_template(model: str) -> Optional[bool]:
    """Whether the tokenizer of a zoo name or local checkpoint has a chat template; None: not knowable offline."""
    if (name := zoo_name(model)) is not None:
        from compressor.models.zoo import recipe

        return recipe(name).finetune_of is not None  # task models ship the zoo chat template
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        return None  # a hub id: checked by the stage, once the tokenizer is there
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return bool(config.get("chat_template")) or (path / "chat_template.jinja").is_file()


def source_reads(spec) -> dict[str, set[str]]:
    """How the stages read each data source they name: "text", "prompts" or "chat" (StageKind.data_sources)."""
    reads: dict[str, set[str]] = {}
    for entry in spec.stages:
        for ref in stage_kind(entry.kind).data_sources(entry.spec):
            reads.setdefault(ref.name, set()).add(ref.reads)
    return reads


def check_chat_rows(source, flag: str, rows: int = 100) -> None:
    """The first rows of a chat source parse (`messages` or `prompt`, and an answer); the stage reads the rest."""
    import itertools

    from compressor import storage
    from compressor.chat_data import rows as chat_rows

    if source.source.startswith("hf:") or is_zoo(source.source) or storage.is_remote(source.source):
        return
    if not Path(source.source).expanduser().exists():
        raise UserError(f"{flag} {source.source}: no such file or directory")
    try:
        if not list(itertools.islice(chat_rows(source.source), rows)):
            raise UserError(f"{source.source}: no rows")
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None


def check_prompts(source, flag: str) -> None:
    """A generate stage's prompts: the first batch is read and validated (the stage validates every row before it
    sends one)."""
    from compressor.prompt_rows import scan
    from compressor.text_sources import normalized

    try:
        next(scan(normalized(source), 64))
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None


def check_offline_teacher(teacher, published: bool = False) -> None:
    """With HF_HUB_OFFLINE set, a hub teacher must be in the local Hugging Face cache, weights included (`run`
    resolves and fetches it from there), unless its snapshot is already published on the storage."""
    from compressor.models import hub, is_hub_id

    if not hub.offline() or not is_hub_id(teacher.model):
        return
    commit = hub.resolve_commit(teacher.model, teacher.revision)  # offline: the cache's config.json, else UserError
    if published:
        return
    snapshot = Path(hub._cache_dir(), f"models--{teacher.model.replace('/', '--')}", "snapshots", commit)
    if not any(snapshot.glob("*.safetensors")) and not any(snapshot.glob("*.bin")):
        raise UserError(
            f"teacher.model {teacher.model!r}: the local Hugging Face cache ({hub._cache_dir()}) has its config "
            "but not its weights, and HF_HUB_OFFLINE=1 forbids downloading them; run once with network access"
        )


def _check_filesystem_driver(uri: str) -> None:
    """For an fsspec URI only the driver is checked: reaching the bucket needs credentials and the network."""
    import fsspec

    protocol = fsspec.utils.get_protocol(uri)
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        hint = f"; install it with `pip install 'compressor[{extra}]'`" if extra else ""
        raise UserError(f"storage {uri}: no filesystem driver for {protocol}:// ({exc}){hint}") from None


def task_metrics(include: str, task: str) -> Optional[set[str]]:
    """The metric names a local lm-eval task declares (its YAML's metric_list), or None when that is not knowable
    here (a registry task, a task without metric_list, a file that needs lm-eval's own YAML tags)."""
    import yaml

    if is_zoo(include):
        files = [Path(str(resources.files("compressor.models.zoo") / "tasks" / f"{task}.yaml"))]
    else:
        files = sorted(Path(include).expanduser().rglob("*.yaml"))
    for file in files:
        try:
            doc = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError):  # `!function` tags and the like: lm-eval's loader reads those
            continue
        if isinstance(doc, dict) and doc.get("task") == task:
            listed = doc.get("metric_list")
            if not isinstance(listed, list):
                return None
            return {m["metric"] for m in listed if isinstance(m, dict) and isinstance(m.get("metric"), str)} or None
    return None


def check_gate_metrics(spec, path: Optional[Path] = None) -> None:
    """A gate on `task.metric` where the local task's YAML lists its metrics and `metric` is not one of them."""
    from compressor.evaluation import STDERR_SUFFIX

    includes = {t.name: t.include for t in spec.evaluation.tasks if t.include}
    heldout = {t.name: {"exact_match", "accuracy", "f1"} for t in spec.evaluation.tasks if t.data}
    for i, entry in enumerate(spec.stages):
        for key in entry.gate.metrics if entry.gate else {}:
            task, _, metric = key.partition(".")
            if not metric or task not in includes | heldout:
                continue
            known = heldout.get(task) or task_metrics(includes[task], task)
            if known is not None and metric.removesuffix(STDERR_SUFFIX) not in known:
                where = _gate_line(path, i, key)
                raise UserError(
                    f"{where}stages.{i}.gate.{key}: task {task!r} produces no metric {metric!r} "
                    f"(its metrics: {', '.join(sorted(known))})"
                )


def _gate_line(path: Optional[Path], index: int, key: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    import yaml

    from compressor.config.load import _line_of

    root = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    line = max(
        _line_of(root, ("stages", index, "gate", key)) or 0,
        _line_of(root, ("stages", index, "gate", "metrics", key)) or 0,
    )
    return f"{path}:{line}: " if line else f"{path}: "
