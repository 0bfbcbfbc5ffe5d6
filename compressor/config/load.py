"""Load a pipeline YAML (+ `key=value` overrides) into a PipelineSpec.

Every failure becomes a UserError of one paragraph naming the file, the field path and the YAML line."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from compressor.config.schema import PipelineSpec
from compressor.config.stages import STAGE_SPECS
from compressor.errors import UserError

log = logging.getLogger("compressor")


def _line_of(node: Optional[yaml.Node], loc: tuple) -> Optional[int]:
    """1-based line of the deepest YAML node along `loc` (a pydantic error location)."""
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


STAGE_ENTRY_KEYS = {"name", "gate", "resources", *STAGE_SPECS}


def _stage_index(stages: list, name: str) -> int:
    for i, stage in enumerate(stages):
        if isinstance(stage, dict) and (stage.get("name") == name or name in stage):
            return i
    raise UserError(f"override stages.{name}: no stage named {name!r}")


def apply_override(data: dict, override: str) -> None:
    """`a.b.c=value` (value parsed as YAML). Under `stages`, an index or a stage name/kind picks the stage."""
    if "=" not in override:
        raise UserError(f"override {override!r}: expected KEY=VALUE, e.g. stages.distill.steps=20")
    key, _, raw = override.partition("=")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            index = int(part) if part.isdigit() else _stage_index(node, part)
            if index >= len(node):
                raise UserError(f"override {key}: index {index} is past the end of {'.'.join(parts[:i]) or 'the list'}")
            node = node[index]
            if not part.isdigit() and parts[i + 1] not in STAGE_ENTRY_KEYS:
                # `stages.distill.steps=20` reaches into the stage's own spec
                kind = next((k for k in STAGE_SPECS if k in node), None)
                node = node[kind] if kind else node
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise UserError(f"override {key}: {'.'.join(parts[:i])} is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"override {key}: {'.'.join(parts[:-1])} is not a mapping")


def _format(error: dict, path: str, root: Optional[yaml.Node]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "model-"))))
    message = error["msg"].removeprefix("Value error, ")
    named = re.match(r"(stages\.\d+[\w.\-]*): (.*)", message, re.DOTALL) if not loc else None
    if named:  # a check across fields names its own place, e.g. "stages.1.name: duplicate stage name 'x'"
        loc = tuple(int(p) if p.isdigit() else p for p in named.group(1).split("."))
        message = named.group(2)
    field = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_of(root, loc)
    where = f"{path}:{line}" if line else path
    if error["type"] == "extra_forbidden":
        message = "unknown key (check its spelling and its place in the file)"
    return f"{where}: {field}: {message}"


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"pipeline file {path}: no such file") from None
    except OSError as exc:
        raise UserError(f"pipeline file {path}: cannot read it ({exc.strerror})") from None
    try:  # the safe loader: a tag that would construct a Python object (!!python/object, ...) is an error
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise UserError(f"{path}:{mark.line + 1}: tag {_tag_of(exc)} refused: pipeline files are read with YAML's safe "
                        "loader, and no field constructs Python objects or runs code") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a pipeline file must be a mapping with name, teacher, stages, ...")
    _refuse_duplicate_keys(root, str(path))
    for override in overrides:
        apply_override(data, override)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        errors = [_format(e, str(path), root) for e in exc.errors()]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise UserError("invalid pipeline: " + "; ".join(errors[:3]) + more) from None
    if spec.teacher.trust_remote_code:
        log.warning("warning: teacher.trust_remote_code is on: the Python code shipped with %s (and with the models "
                    "made from it) will run on every node that loads them. Only use it for a repository you trust.",
                    spec.teacher.model)
    return spec


def _tag_of(exc: yaml.constructor.ConstructorError) -> str:
    problem = exc.problem or ""
    return problem.split("tag ", 1)[1].strip() if "tag " in problem else "(unknown)"


def _refuse_duplicate_keys(node: Optional[yaml.Node], path: str) -> None:
    """YAML lets a later key silently replace an earlier one in the same mapping; a pipeline refuses it."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise UserError(f"{path}:{line}: key {key.value!r} appears twice in one mapping (first on line "
                                    f"{seen[key.value]}); YAML would silently keep only the last one")
                seen[key.value] = line
            _refuse_duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path)


def pipeline_dir(path: str | Path) -> Path:
    return Path(path).resolve().parent
