"""Load a pipeline YAML (+ `key=value` overrides) into a PipelineSpec.

Every failure becomes a UserError of one paragraph naming the file, the field path and the YAML line."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from compressor.config.schema import PipelineSpec
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


def _stage_entry_keys() -> set[str]:
    from compressor.config.schema import STAGE_KINDS

    return {"name", "gate", "resources", *STAGE_KINDS}


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
            if not part.isdigit() and parts[i + 1] not in _stage_entry_keys():
                # `stages.distill.steps=20` reaches into the stage's own spec
                from compressor.config.schema import STAGE_KINDS

                kind = next((k for k in STAGE_KINDS if k in node), None)
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


def _input_loc(loc: tuple, data: Any) -> tuple:
    """The error's location in the input: without pydantic's own steps (a union member's tag, e.g. the `awq` in
    stages.2.quantize.awq.bits, or function-/model- validators), which name no key of the file."""
    kept, node = [], data
    for part in loc:
        if isinstance(part, str) and part.startswith(("function-", "model-")):
            continue
        if isinstance(node, dict) and isinstance(part, str) and part not in node and not _is_leaf(loc, part):
            continue  # a tag: the input has no such key here
        kept.append(part)
        node = (
            node.get(part)
            if isinstance(node, dict)
            else (node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
        )
    return tuple(kept)


def _is_leaf(loc: tuple, part: str) -> bool:
    return loc[-1] == part  # the last step may be a key that is missing from the input (a required field)


UNKNOWN_KEY = "unknown key (check its spelling and its place in the file)"


def dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def format_validation_error(
    exc: ValidationError,
    where: str,
    data: Any = None,
    root: Optional[yaml.Node] = None,
    name: Callable[[tuple], str] = dotted,
    unknown: str = UNKNOWN_KEY,
    limit: int = 3,
) -> str:
    """One paragraph for the pydantic errors of a pipeline file (`where` its path, `root` its YAML nodes for line
    numbers) or of a stage spec given on a command line (`name` turns a field path into its flag)."""
    errors = [_format(e, where, root, data, name, unknown) for e in exc.errors()]
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(errors[:limit]) + more


def _format(
    error: dict, path: str, root: Optional[yaml.Node], data: Any, name: Callable[[tuple], str], unknown: str
) -> str:
    loc = (
        _input_loc(tuple(error["loc"]), data)
        if data is not None
        else tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "model-"))))
    )
    message = error["msg"].removeprefix("Value error, ")
    named = re.match(r"(stages\.\d+[\w.\-]*): (.*)", message, re.DOTALL) if not loc else None
    if named:  # a check across fields names its own place, e.g. "stages.1.name: duplicate stage name 'x'"
        loc = tuple(int(p) if p.isdigit() else p for p in named.group(1).split("."))
        message = named.group(2)
    # "give only one of `steps` and `tokens`": the names as the user wrote them (on a command line: flags)
    message = re.sub(r"`(\w+)`", lambda m: f"`{name((m.group(1),))}`", message)
    line = _line_of(root, loc)
    where = f"{path}:{line}" if line else path
    if error["type"] == "extra_forbidden":
        message = unknown
    return f"{where}: {name(loc) if loc else '(top level)'}: {message}"


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
        raise UserError(
            f"{path}:{mark.line + 1}: tag {_tag_of(exc)} refused: pipeline files are read with YAML's safe "
            "loader, and no field constructs Python objects or runs code"
        ) from None
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
        raise UserError("invalid pipeline: " + format_validation_error(exc, str(path), data, root)) from None
    if spec.teacher.trust_remote_code:
        log.warning(
            "warning: teacher.trust_remote_code is on: the Python code shipped with %s (and with the models "
            "made from it) will run on every node that loads them. Only use it for a repository you trust.",
            spec.teacher.model,
        )
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
                    raise UserError(
                        f"{path}:{line}: key {key.value!r} appears twice in one mapping (first on line "
                        f"{seen[key.value]}); YAML would silently keep only the last one"
                    )
                seen[key.value] = line
            _refuse_duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path)
