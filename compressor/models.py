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
        return ref.model_copy(update={"path": str(hub._download(ref.path, commit)), "revision": commit})
    return ref
