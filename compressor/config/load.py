"""Load a pipeline YAML (+ `key=value` overrides) into a PipelineSpec.

Every failure becomes a UserError of one paragraph naming the file, the field path and the YAML line."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
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


def _list_index(items: list, part: str, key: str, where: list) -> int:
    """An index, or (under `stages`, `evaluation.tasks`) the entry with that name or kind."""
    if part.isdigit():
        index = int(part)
        if index >= len(items):
            raise UserError(f"override {key}: index {index} is past the end of {'.'.join(where) or 'the list'}")
        return index
    for i, item in enumerate(items):
        if isinstance(item, dict) and (item.get("name") == part or part in item):
            return i
    what = "stage" if where == ["stages"] else "entry"
    raise UserError(f"override {key}: no {what} named {part!r} in {'.'.join(where)}")


def apply_override(data: dict, override: str) -> tuple:
    """`a.b.c=value` (value parsed as YAML). Under `stages`, an index or a stage name/kind picks the stage, and
    `stages.distill.steps` reaches into that stage's spec. Returns the location it set, as pydantic reports
    locations (indexes, the stage kind), so that a validation error there names the override."""
    if "=" not in override:
        raise UserError(f"override {override!r}: expected KEY=VALUE, e.g. stages.distill.steps=20")
    key, _, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        what = "no KEY before '='" if not key else f"an empty part in the key {key!r}"
        raise UserError(f"override {override!r}: {what}; expected KEY=VALUE, e.g. stages.distill.steps=20")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    from compressor.config.schema import STAGE_KINDS

    node: Any = data
    loc: list = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, key, parts[:i])
            loc.append(index)
            entry = node[index]
            by_name = not part.isdigit() and isinstance(entry, dict)
            kind = next((k for k in STAGE_KINDS if k in entry), None) if by_name else None
            if kind and (part == kind if last else parts[i + 1] not in _stage_entry_keys()):
                loc.append(kind)  # `stages.distill=...`, `stages.distill.steps=...`: the stage's own spec
                node, index = entry, kind
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            loc.append(part)
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise UserError(f"override {key}: {'.'.join(parts[:i])} is not a mapping")
    return tuple(loc)


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
    limit: Optional[int] = 3,
    overrides: Sequence[tuple[tuple, str]] = (),
) -> list[str]:
    """One line per pydantic error (the first `limit`, and how many more) of a pipeline file (`where` its path,
    `root` its YAML nodes for line numbers, `overrides` the (location, text) of each override applied) or of a
    stage spec given on a command line (`name` turns a field path into its flag)."""
    errors = [_format(e, where, root, data, name, unknown, overrides) for e in exc.errors()]
    if limit is not None and len(errors) > limit:
        errors = errors[:limit] + [f"(and {len(errors) - limit} more)"]
    return errors


# Where a mapping is expected, the one key a bare value most likely meant (`teacher: ORG/NAME`).
BARE_VALUE_KEYS = {("teacher",): "model", ("data", None): "source", ("evaluation", "tasks", None): "name"}
YAML_FLOAT_TEXT = re.compile(r"^[+-]?\d+(\.\d*)?[eE][+-]?\d+$")  # YAML 1.1 reads 1e3 as text (it wants 1.0e+3)


def _hint(error: dict, loc: tuple) -> str:
    value = error.get("input")
    if error["type"] in ("model_type", "dict_type") and isinstance(value, (str, int, float)):
        key = BARE_VALUE_KEYS.get(tuple(p if i == 0 or p == "tasks" else None for i, p in enumerate(loc)))
        if key:
            field = "- " if isinstance(loc[-1], int) else f"{loc[-1]}: "
            return f"; write `{field}{{{key}: {value}}}`"
    if error["type"] in ("int_parsing", "float_parsing") and isinstance(value, str) and YAML_FLOAT_TEXT.match(value):
        mantissa, exponent = f"{float(value):e}".split("e")
        mantissa = mantissa.rstrip("0") + ("0" if mantissa.rstrip("0").endswith(".") else "")
        return f" (YAML reads {value} as text: write {mantissa}e{exponent}, with a dot, or the digits)"
    return ""


def _format(
    error: dict,
    path: str,
    root: Optional[yaml.Node],
    data: Any,
    name: Callable[[tuple], str],
    unknown: str,
    overrides: Sequence[tuple[tuple, str]] = (),
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
    if error["type"] == "extra_forbidden":
        message = unknown
    message += _hint(error, loc)
    # A value set by an override is blamed on the override, not on the file line it replaced.
    override = next((text for at, text in reversed(overrides) if loc[: len(at)] == at), None) or next(
        (text for at, text in reversed(overrides) if loc and at[: len(loc)] == loc), None
    )
    line = _line_of(root, loc)
    where = f"override {override}" if override else f"{path}:{line}" if line else path
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
    applied = [(apply_override(data, override), override) for override in overrides]
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        errors = format_validation_error(exc, str(path), data, root, limit=None, overrides=applied)
        listed = errors[0] if len(errors) == 1 else f"{len(errors)} errors:\n" + "\n".join(f"  {e}" for e in errors)
        raise UserError("invalid pipeline: " + listed) from None
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
