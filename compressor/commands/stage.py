"""`compressor KIND --model IN --out OUT [--FIELD VALUE ...] [KEY=VALUE ...]`: any registered stage kind on its own.

The options are generated from the kind's spec (compressor/stages/<kind>/spec.py): one per field, with the field's
name, description and default, so the command and a pipeline YAML cannot disagree (docs/reference.md shows the same
defaults). A nested field takes its keys in one option (`--target hidden_size=3072,num_layers=24`); any field can
also be given as a `KEY=VALUE` override argument (`loss.hidden_mse=[[3,7]]`). A field named `calibration` or
`data` takes a text source here (a pipeline names one of its `data:` sources there). OUT is the model itself: a
checkpoint directory that transformers loads, with the stage's manifest.json beside the weights."""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path
from typing import Optional

import typer
from pydantic import BaseModel

from compressor.errors import UserError

DATA_FIELDS = ("calibration", "data")  # spec fields naming a data source
SOURCE_HELP = "Text/JSONL/parquet path or directory, hf:ORG/NAME[:CONFIG][@SPLIT] or zoo:NAME (default for zoo models: their corpus)."


def _models(spec) -> list[type[BaseModel]]:
    from compressor.docs_gen import spec_models

    return spec_models(spec)


def _nested_model(annotation) -> Optional[type[BaseModel]]:
    found = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
    return found[0] if found else None


def _scalar(annotation) -> Optional[type]:
    """The click-facing type of an annotation, or None for what only a KEY=VALUE override can give (maps, pairs)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin is typing.Union:
        return _scalar(args[0]) if len(args) == 1 else None
    if origin is list and args and args[0] in (int, str):
        return str  # comma-separated
    return annotation if annotation in (int, float, str, bool) else None


def _list_of(annotation) -> Optional[type]:
    """int or str for a list field given comma-separated, else None."""
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is list:
            return typing.get_args(a)[0]
    return None


def _choices(annotation) -> list:
    if typing.get_origin(annotation) is typing.Union:
        return [c for a in typing.get_args(annotation) for c in _choices(a)]
    return list(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Literal else []


def flag(path: tuple[str, ...]) -> str:
    return "--" + "-".join(path).replace("_", "-")


def _option_specs(kind) -> dict[tuple[str, ...], dict]:
    """One entry per CLI option of a kind: path -> {type, help, choices}. A union spec (quantize methods) merges its
    members' fields; a default that differs between members is shown per member."""
    from compressor.docs_gen import default_text

    options: dict[tuple[str, ...], dict] = {}
    for model in _models(kind.spec):
        member = getattr(model.model_fields.get("method"), "default", None)
        for name, field in model.model_fields.items():
            if name in DATA_FIELDS or (name == "teacher" and kind.needs_teacher):
                continue  # given as a source / a model below
            nested = _nested_model(field.annotation)
            click_type = str if nested else _scalar(field.annotation)
            if click_type is None:
                continue
            entry = options.setdefault(
                (name,),
                {
                    "type": click_type,
                    "help": field.description or "",
                    "choices": [],
                    "defaults": {},
                    "list_of": _list_of(field.annotation),
                    "model": nested,
                },
            )
            entry["choices"] += [c for c in _choices(field.annotation) if c not in entry["choices"]]
            entry["defaults"][member] = default_text(field).replace("`", "")
    return options


def _help(entry: dict) -> str:
    text = " ".join(entry["help"].split())
    if entry["model"] is not None:
        from compressor.docs_gen import default_text

        keys = ", ".join(f"{n}={default_text(f).replace('`', '')}" for n, f in entry["model"].model_fields.items())
        return text + f" KEY=VALUE,... (YAML values) of: {keys}."
    if entry["choices"]:
        text += f" One of: {', '.join(map(str, entry['choices']))}."
    defaults = set(entry["defaults"].values())
    if len(defaults) == 1:
        text += f" (default: {defaults.pop()})"
    else:
        text += " (default: " + ", ".join(f"{m}: {d}" for m, d in entry["defaults"].items()) + ")"
    return text


def _signature(kind, options: dict) -> inspect.Signature:
    P = inspect.Parameter
    fields = {f for m in _models(kind.spec) for f in m.model_fields}
    params = [
        P(
            "model",
            P.KEYWORD_ONLY,
            annotation=str,
            default=typer.Option(
                ...,
                "--model",
                *(("--student",) if kind.needs_teacher else ()),
                help="Input: a checkpoint directory (a previous `--out`), a pipeline stage directory, or zoo:NAME.",
            ),
        ),
        P(
            "out",
            P.KEYWORD_ONLY,
            annotation=str,
            default=typer.Option(
                ..., "--out", help="New directory for the output: a checkpoint transformers loads, with manifest.json."
            ),
        ),
    ]
    if kind.needs_teacher:
        params.append(
            P(
                "teacher",
                P.KEYWORD_ONLY,
                annotation=str,
                default=typer.Option(
                    ..., "--teacher", help="Teacher checkpoint directory, a pipeline stage directory, or zoo:NAME."
                ),
            )
        )
    for name in (n for n in DATA_FIELDS if n in fields):
        params.append(
            P(
                f"source_{name}",
                P.KEYWORD_ONLY,
                annotation=Optional[str],
                default=typer.Option(None, f"--{name}", help=SOURCE_HELP),
            )
        )
        params.append(
            P(
                "text_field",
                P.KEYWORD_ONLY,
                annotation=str,
                default=typer.Option("text", "--text-field", help="Text column of JSONL / parquet / hf data."),
            )
        )
    for path, entry in options.items():
        name = "opt__" + "__".join(path)
        decl = f"{flag(path)}/--no-{flag(path)[2:]}" if entry["type"] is bool else flag(path)
        params.append(
            P(
                name,
                P.KEYWORD_ONLY,
                annotation=Optional[entry["type"]],
                default=typer.Option(None, decl, help=_help(entry), show_default=False),
            )
        )
    if kind.runs_as == "driver":
        params.append(
            P(
                "address",
                P.KEYWORD_ONLY,
                annotation=Optional[str],
                default=typer.Option(
                    None, "--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)."
                ),
            )
        )
    params += [
        P(
            "seed",
            P.KEYWORD_ONLY,
            annotation=int,
            default=typer.Option(0, "--seed", help="Seeds data order and sampling."),
        ),
        P("quiet", P.KEYWORD_ONLY, annotation=bool, default=typer.Option(False, "--quiet", help="No progress bars.")),
        P(
            "trust_remote_code",
            P.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False,
                "--trust-remote-code",
                help="Run Python code the checkpoint ships (config.json auto_map); only for a source you trust.",
            ),
        ),
        P(
            "overrides",
            P.KEYWORD_ONLY,
            annotation=Optional[list[str]],
            default=typer.Argument(
                None, help="KEY=VALUE spec fields (YAML values), e.g. loss.hidden_mse=[[3,7]].", show_default=False
            ),
        ),
    ]
    return inspect.Signature(params)


def _spec_data(options: dict, given: dict, overrides: list[str]) -> dict:
    from compressor.config.load import apply_override

    data: dict = {}
    for path, entry in options.items():
        value = given.get("opt__" + "__".join(path))
        if value is None:
            continue
        if entry["model"] is not None:
            value = _mapping(flag(path), value, entry["model"])
        elif entry["choices"]:
            value = next((c for c in entry["choices"] if str(c) == value), value)  # Literal[0, 1, ...] -> int
        elif entry["list_of"] is not None:
            try:
                value = [entry["list_of"](x.strip()) for x in value.split(",") if x.strip()]
            except ValueError:
                raise UserError(f"{flag(path)}: {value!r} is not a comma-separated list of numbers") from None
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    for override in overrides:
        apply_override(data, override)
    return data


def _mapping(name: str, text: str, model: type[BaseModel]) -> dict:
    """`hidden_size=3072,keep_layers=[0,1]` (or a YAML flow mapping) -> a dict of the nested model's fields."""
    import yaml

    if text.strip().startswith("{"):
        items = yaml.safe_load(text)
    else:
        items = {}
        for item in filter(None, (p.strip() for p in re.split(r",(?![^\[]*\])", text))):
            key, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"{name}: {item!r} is not KEY=VALUE (keys: {', '.join(model.model_fields)})")
            items[key.strip()] = yaml.safe_load(value) if value.strip() else None
    unknown = [k for k in items if k not in model.model_fields]
    if unknown:
        raise UserError(f"{name}: unknown key {unknown[0]!r} (keys: {', '.join(model.model_fields)})")
    return items


def build_spec(kind, data: dict):
    """The kind's spec from CLI values, or a UserError naming the flag."""
    from pydantic import TypeAdapter, ValidationError

    from compressor.config.load import format_validation_error

    try:
        return TypeAdapter(kind.spec).validate_python(data)
    except ValidationError as exc:
        unknown = "not an option of this method" if "method" in data else "unknown field"
        raise UserError(
            format_validation_error(
                exc, f"compressor {kind.name}", data, name=lambda loc: flag(tuple(map(str, loc))), unknown=unknown
            )
        ) from None


def make_command(kind):
    options = _option_specs(kind)

    def command(**given) -> None:
        import os

        from compressor import remote_code
        from compressor.config.schema import DataSource
        from compressor.models import resolve_model
        from compressor.preflight import check_standalone
        from compressor.runner import run_standalone

        if given["trust_remote_code"]:
            remote_code.allow(given.get("teacher") or given["model"])
        data = _spec_data(options, given, given["overrides"] or [])
        names = [n for n in DATA_FIELDS if f"source_{n}" in given]
        spec = build_spec(kind, {**data, **{n: n for n in names}})  # its errors first: no model or data is read
        model_dir, zoo_name = resolve_model(given["model"])
        teacher_dir, teacher_zoo = resolve_model(given["teacher"]) if kind.needs_teacher else (None, None)
        sources, source, source_flag = {}, None, None
        for name in names:
            text, zoo = given[f"source_{name}"], teacher_zoo or zoo_name
            if text is None:
                if zoo is None:
                    raise UserError(
                        f"--{name}: required for a model outside the zoo (a text/JSONL/parquet file or "
                        "directory, or an hf: dataset)"
                    )
                text = f"zoo:{zoo}"
            source_flag = f"--{name}"
            source = DataSource(
                source=text,
                samples=getattr(spec, "samples", None),
                text_field=given["text_field"],
                **({"seq_len": spec.seq_len} if getattr(spec, "seq_len", None) else {}),
            )
            sources[name] = source
        if given.get("address"):
            os.environ["RAY_ADDRESS"] = given["address"]
        check_standalone(
            kind.name,
            spec,
            model_dir,
            given["out"],
            source,
            source_flag or "--data",
            getattr(spec, "samples", None) or 1,
            getattr(spec, "seq_len", None),
            teacher_dir=teacher_dir,
            model_flag="--model",
        )
        manifest = run_standalone(
            kind.name,
            spec,
            model_dir,
            given["out"],
            data=sources,
            teacher=teacher_dir,
            seed=given["seed"],
            quiet=given["quiet"],
        )
        typer.echo(f"{kind.result_line(manifest)}; wrote {Path(given['out']).expanduser().resolve()}")

    command.__signature__ = _signature(kind, options)
    command.__doc__ = kind.summary
    return command


def register(app: typer.Typer) -> None:
    """A command per registered stage kind not yet on `app` (kinds registered later are added by the next call)."""
    from compressor.stages import kinds

    have = {c.name for c in app.registered_commands}
    for kind in kinds().values():
        if kind.standalone and kind.name not in have:
            app.command(name=kind.name, help=kind.summary)(make_command(kind))
