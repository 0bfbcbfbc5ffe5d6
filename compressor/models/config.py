"""A model's config.json: read where the model lives (`read_config`), or known without the network for validate and
plan (`offline_config`). The one place the rest of compressor reads a model's config from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from compressor import storage
from compressor.errors import UserError
from compressor.manifest import ModelRef
from compressor.models.reference import zoo_name

SHIPPED_CONFIGS = Path(__file__).parent.parent / "hub_configs"


def read_config(model: ModelRef, fetch: bool = False) -> dict:
    """config.json of a model, read where it lives: a local directory, a storage URI (one small read, no weights),
    a zoo model (computed from its recipe, nothing built). A hub id gives {} (checked once loaded) unless `fetch`:
    then its config comes through the Hugging Face cache, with the pipeline's trust_remote_code."""
    if (name := zoo_name(model.path)) is not None:
        from compressor.models import zoo

        return zoo.model_config(name)
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


def config_slug(hub_id: str) -> str:
    """File name stem of a shipped config: 'meta-llama/Llama-3.1-8B' -> 'meta-llama--Llama-3.1-8B'."""
    return hub_id.strip("/").replace("/", "--")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json"))


def _read_json(path: Path, field: str) -> dict:
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{field}: cannot read {path} as a model config.json ({exc})") from None


def offline_config(teacher_spec, base_dir: Optional[Path] = None) -> Optional[dict]:
    """The teacher's config.json without touching the network, or None when it cannot be known offline.

    Tried in order: `teacher.config` (a file or directory, relative to `base_dir` - the pipeline file's
    directory - or the name of a shipped config), `zoo:` reference models, a local checkpoint directory,
    a config shipped in compressor/hub_configs for the hub id, and the local Hugging Face cache."""
    base = Path(base_dir) if base_dir else Path.cwd()
    if teacher_spec.config:
        given = Path(teacher_spec.config).expanduser()
        for candidate in (given if given.is_absolute() else base / given, given):
            if candidate.exists():
                return _read_json(candidate, "teacher.config")
        shipped = SHIPPED_CONFIGS / f"{config_slug(teacher_spec.config).removesuffix('.json')}.json"
        if shipped.is_file():
            return _read_json(shipped, "teacher.config")
        raise UserError(
            f"teacher.config: {teacher_spec.config!r} is neither a file (looked in {base}) nor a shipped "
            f"config ({', '.join(shipped_configs())})"
        )
    model = teacher_spec.model
    if (name := zoo_name(model)) is not None:
        from compressor.models import zoo

        return zoo.model_config(name)
    local = Path(model).expanduser()
    for candidate in (local if local.is_absolute() else base / local, local):
        if (candidate / "config.json").is_file():
            return _read_json(candidate, "teacher.model")
    shipped = SHIPPED_CONFIGS / f"{config_slug(model)}.json"
    if shipped.is_file():
        return _read_json(shipped, "teacher.model")
    return _hf_cached_config(model, teacher_spec.revision)


def _hf_cached_config(repo_id: str, revision: Optional[str]) -> Optional[dict]:
    """config.json from the local HF cache, if the model was downloaded before (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an id that is not a valid repo id, or no huggingface_hub: not cached
        return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None
