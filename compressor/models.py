"""Where a model is and what it is: its config.json read wherever it lives, a local directory for it on this node,
and the forms a command line accepts. The one place the rest of compressor reads a model's config from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from compressor import storage
from compressor.errors import UserError
from compressor.manifest import Manifest, ModelRef


def read_config(model: ModelRef, fetch: bool = False) -> dict:
    """config.json of a model, read where it lives: a local directory, a storage URI (one small read, no weights),
    a zoo model (computed from its recipe, nothing built). A hub id gives {} (checked once loaded) unless `fetch`:
    then its config comes through the Hugging Face cache, with the pipeline's trust_remote_code."""
    if model.path.startswith("zoo:"):
        from compressor import zoo

        return zoo.model_config(model.path[len("zoo:") :])
    if storage.is_remote(model.path):
        text = storage.read_text(storage.join(model.path, "config.json"))
        if text is None:
            raise UserError(f"model {model.path}: no config.json there; has the stage that makes it been published?")
        return json.loads(text)
    path = Path(model.path).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise UserError(f"model {model.path}: no config.json there; is it a Hugging Face checkpoint directory?")
        return json.loads(cfg.read_text())
    if path.exists() or model.path.startswith((".", "/", "~")):
        raise UserError(f"model {model.path}: not a checkpoint directory")
    if not fetch:
        return {}
    from transformers import AutoConfig

    from compressor import remote_code

    try:
        return AutoConfig.from_pretrained(
            model.path, revision=model.revision, trust_remote_code=remote_code.enabled()
        ).to_dict()
    except OSError as exc:
        raise UserError(f"model {model.path}: cannot read its config.json ({exc})") from None


def resolve_model(model: str) -> tuple[str, Optional[str]]:
    """(checkpoint dir, zoo name or None). Accepts a checkpoint dir, a stage output dir, or zoo:NAME."""
    if model.startswith("zoo:"):
        from compressor import zoo

        name = model[len("zoo:") :]
        return str(zoo.ensure_model(name)), name
    path = Path(model).expanduser()
    if not (path / "config.json").is_file() and (path / "manifest.json").is_file():
        manifest = Manifest.read(path)
        return (str(path / manifest.model_uri) if manifest.model_uri == "model" else manifest.model_uri), None
    return model, None


def materialize(ref: ModelRef) -> ModelRef:
    """A ModelRef whose path is a directory on this node. `zoo:NAME` is built (or found) here; a model on remote
    storage (`s3://.../<stage>-<key>/model`) is downloaded into this node's mirror (once per node, under a lock);
    a hub id not resolved by a pipeline is fetched through the Hugging Face cache."""
    if ref.path.startswith("zoo:"):
        from compressor import zoo

        return ref.model_copy(update={"path": str(zoo.ensure_model(ref.path[len("zoo:") :]))})
    if storage.is_remote(ref.path):
        stage_dir = storage.download_stage(storage.stage_dir_of(ref.path))
        return ref.model_copy(update={"path": str(stage_dir / Path(ref.path.rstrip("/")).name)})
    from compressor import hub

    if hub.is_hub_id(ref.path):
        commit = hub.resolve_commit(ref.path, ref.revision)
        return ref.model_copy(update={"path": str(hub._download(ref.path, commit)[0]), "revision": commit})
    return ref


# What a tokenizer is made of, beside `tokenizer*` files: enough for AutoTokenizer, and what shards key on.
TOKENIZER_FILES = (
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)


def is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in TOKENIZER_FILES or name.endswith(".tiktoken")


def tokenizer_dir(ref: ModelRef) -> str:
    """A directory on this node holding the tokenizer of `ref`. A model on object storage brings only its tokenizer
    files and config.json (kilobytes), not its weights: the distill driver needs the tokenizer to key and write the
    token shards, and 16 GB of teacher through the driver's disk would be read for nothing."""
    if not storage.is_remote(ref.path):
        return materialize(ref).path
    import hashlib
    import shutil
    import uuid

    fs, path = storage.filesystem(ref.path)
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        raise UserError(f"model {ref.path}: no such directory; has the stage that makes it been published?") from None
    wanted = [n for n in names if is_tokenizer_file(n) or n == "config.json"]
    target = storage.mirror_root() / "tokenizers" / hashlib.sha256(f"{ref.path}\0{ref.key}".encode()).hexdigest()[:24]
    if target.is_dir():
        return str(target)
    work = target.parent / f".{target.name}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        for name in wanted:
            fs.get_file(f"{path.rstrip('/')}/{name}", str(work / name))
        try:
            work.rename(target)  # all or nothing: a half-copied tokenizer is never taken for one
        except OSError:  # another process of this node got there first: theirs is as good
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(target)
