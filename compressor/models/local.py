"""A model as a directory on this node: built (zoo), downloaded (storage, hub) or found (a stage output directory),
and the tokenizer files alone when the weights are not needed here."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from compressor import storage
from compressor.errors import UserError
from compressor.manifest import Manifest, ModelRef
from compressor.models.reference import is_hub_id, zoo_name


def resolve_model(model: str) -> tuple[str, Optional[str]]:
    """(checkpoint dir, zoo name or None). Accepts a checkpoint dir, a stage output dir, or zoo:NAME."""
    if (name := zoo_name(model)) is not None:
        from compressor.models import zoo

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
    if (name := zoo_name(ref.path)) is not None:
        from compressor.models import zoo

        return ref.model_copy(update={"path": str(zoo.ensure_model(name))})
    if storage.is_remote(ref.path):
        stage_dir = storage.download_stage(storage.stage_dir_of(ref.path))
        return ref.model_copy(update={"path": str(stage_dir / Path(ref.path.rstrip("/")).name)})
    from compressor.models import hub

    if is_hub_id(ref.path):
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
