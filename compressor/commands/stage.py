"""`compressor KIND --model IN --out OUT [--FIELD VALUE ...] [KEY=VALUE ...]`: any registered stage kind on its own.

The options are generated from the kind's spec (compressor/stages/<kind>/spec.py): one per field, with the field's
name, description and default, so the command and a pipeline YAML cannot disagree (docs/reference.md shows the same
defaults). A nested field takes its keys in one option (`--target hidden_size=3072,num_layers=24`); any field can
also be given as a `KEY=VALUE` override argument (`loss.hidden_mse=[[3,7]]`). A field declared as a data
source (`data_source(...)`, e.g. `calibration`, `data`) takes a text source here (a pipeline names one of its
`data:` sources there). OUT is the model itself: a
checkpoint directory that transformers loads, with the stage's manifest.json beside the weights."""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path
from typing import Optional

import typer
from pydantic import BaseModel

from compressor import cli_help
from compressor.errors import UserError

SOURCE_HELP = "Text/JSONL/parquet path or directory, hf:ORG/NAME[:CONFIG][@SPLIT] or zoo:NAME."
# The KEY=VALUE example in each kind's help: one of its own fields.
OVERRIDE_EXAMPLES = {"prune": "target.num_layers=24", "distill": "loss.hidden_mse=[[3,7]]", "quantize": "bits=8"}


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


def _member(model: type[BaseModel]) -> str:
    """A union member's name: its `method` tag (gptq), else its class (GPTQSpec -> GPTQ)."""
    return str(getattr(model.model_fields.get("method"), "default", None) or model.__name__.removesuffix("Spec"))


def _panel(kind, members: list[str], data: bool = False) -> str:
    """The help section of an option: by the methods that have its field (quantize: "GPTQ and AWQ options"); what
    every method has is common, and so is a one-model kind's data source, beside --model and --out."""
    everyone = [_member(m) for m in _models(kind.spec)]
    if len(everyone) == 1:
        return cli_help.COMMON if data else f"{kind.name.capitalize()} options"
    if set(members) == set(everyone):
        return cli_help.COMMON
    return " and ".join(m.upper() for m in members) + " options"


def source_fields(kind) -> list[str]:
    """The spec fields (of any union member, not nested) declared as data sources: each is a `--FIELD SOURCE` option."""
    from compressor.contract.spec import source_marks

    return list(dict.fromkeys(name for model in _models(kind.spec) for name in source_marks(model)))


def _option_specs(kind) -> dict[tuple[str, ...], dict]:
    """One entry per CLI option of a kind: path -> {type, helps, choices, defaults, ...}. A union spec (quantize
    methods) merges its members' fields; what differs between members (description, default) is kept per member."""
    from compressor.docs_gen import default_text

    options: dict[tuple[str, ...], dict] = {}
    sources = source_fields(kind)
    for model in _models(kind.spec):
        member = _member(model)
        for name, field in model.model_fields.items():
            if name in sources or (name == "teacher" and kind.needs_teacher):
                continue  # given as a source / a model below
            nested = _nested_model(field.annotation)
            click_type = str if nested else _scalar(field.annotation)
            if click_type is None:
                continue
            entry = options.setdefault(
                (name,),
                {
                    "type": click_type,
                    "helps": {},
                    "choices": [],
                    "defaults": {},
                    "list_of": _list_of(field.annotation),
                    "model": nested,
                    "word": cli_help.word(field.annotation),
                    "bounds": _bounds(field),
                },
            )
            entry["helps"][member] = " ".join((field.description or "").split())
            entry["choices"] += [c for c in _choices(field.annotation) if c not in entry["choices"]]
            entry["defaults"][member] = default_text(field).replace("`", "")
    for path, entry in options.items():
        entry["panel"] = _panel(kind, list(entry["helps"]))
        entry["metavar"] = _metavar(path, entry)
    return options


def _bounds(field) -> str:
    """A pydantic field's bounds in words: Field(gt=0, lt=1) -> '>0 <1'."""
    found = {
        k: getattr(m, k) for m in field.metadata for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None
    }
    lo, hi = found.get("gt", found.get("ge")), found.get("lt", found.get("le"))
    return cli_help.span(lo, hi, "gt" in found, "lt" in found)


def _metavar(path: tuple[str, ...], entry: dict) -> Optional[str]:
    """INT, FLOAT >0, [a|b], KEY=VALUE,...; None for a flag. Choices too long for the name column go in the help."""
    if entry["type"] is bool:
        return None
    if entry["model"] is not None:
        return "KEY=VALUE,..."
    if entry["list_of"] is not None:
        return f"{entry['word']},..."
    choices = "[" + "|".join(map(str, entry["choices"])) + "]"
    if entry["choices"] and len(flag(path) + choices) < 60:
        return choices
    return " ".join(filter(None, (entry["word"], entry["bounds"])))


def _first(options: dict) -> str:
    """KEY=VALUE with a kind's first field, for a kind without an example of its own."""
    return ".".join(next(iter(options), ("FIELD",))) + "=VALUE"


def _completer(choices: list):
    """Tab completion of a field's choices (the option itself is text, checked by the spec)."""
    return lambda ctx, param, incomplete: [str(c) for c in choices if str(c).startswith(incomplete)]


def _help(path: tuple[str, ...], entry: dict) -> str:
    from compressor.docs_gen import default_text

    by_text: dict[str, list[str]] = {}
    for member, text in entry["helps"].items():
        by_text.setdefault(text, []).append(member)
    if path == ("method",) or len(by_text) == 1:  # the union's tag: the first (default) member says it all
        text = next(iter(by_text))
    else:  # e.g. bits: "GPTQ: ... AWQ: ..."
        text = " ".join(f"{'/'.join(m.upper() for m in members)}: {t}" for t, members in by_text.items())
    defaults = dict.fromkeys(entry["defaults"].values())
    if path == ("method",) or len(defaults) == 1:
        default = next(iter(defaults))
    else:
        default = ", ".join(f"{m}: {d}" for m, d in entry["defaults"].items())
    required = default == "**required**"
    if required or default in ("-", "see section", "[]", "{}"):  # none, or one the description gives in words
        text, default = cli_help.split_default(text)  # "...; default: the only one defined."
    if entry["model"] is not None:
        keys = []
        for n, f in entry["model"].model_fields.items():
            d = default_text(f).replace("`", "")
            keys.append(n if d in ("-", "see section", "**required**") else f"{n}={d}")
        text += f" Keys (YAML values): {', '.join(keys)}."
    elif entry["choices"] and not (entry["metavar"] or "").startswith("["):
        text += f" One of: {', '.join(map(str, entry['choices']))}."
    return text + cli_help.suffix(default, required)


def _signature(kind, options: dict) -> inspect.Signature:
    P = inspect.Parameter
    params = [
        P(
            "model",
            P.KEYWORD_ONLY,
            annotation=str,
            default=typer.Option(
                ...,
                "--model",
                *(("--student",) if kind.needs_teacher else ()),
                metavar="MODEL",
                rich_help_panel=cli_help.COMMON,
                help="Input: a checkpoint directory (a previous `--out`), a pipeline stage directory, or zoo:NAME.",
            ),
        ),
        P(
            "out",
            P.KEYWORD_ONLY,
            annotation=str,
            default=typer.Option(
                ...,
                "--out",
                metavar="DIR",
                help="New directory for the output: a checkpoint transformers loads, with manifest.json.",
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
                    ...,
                    "--teacher",
                    metavar="MODEL",
                    help="Teacher checkpoint directory, a pipeline stage directory, or zoo:NAME.",
                ),
            )
        )
    for name in source_fields(kind):
        panel = _panel(kind, [_member(m) for m in _models(kind.spec) if name in m.model_fields], data=True)
        params.append(
            P(
                f"source_{name}",
                P.KEYWORD_ONLY,
                annotation=Optional[str],
                default=typer.Option(
                    None,
                    f"--{name}",
                    metavar="SOURCE",
                    rich_help_panel=panel,
                    help=SOURCE_HELP,
                    show_default="a zoo model's own corpus",
                ),
            )
        )
        params.append(
            P(
                "text_field",
                P.KEYWORD_ONLY,
                annotation=str,
                default=typer.Option(
                    "text",
                    "--text-field",
                    metavar="COLUMN",
                    rich_help_panel=panel,
                    help="Text column of JSONL / parquet / hf data.",
                ),
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
                default=typer.Option(
                    None,
                    decl,
                    metavar=entry["metavar"],
                    rich_help_panel=entry["panel"],
                    help=_help(path, entry),
                    show_default=False,
                    shell_complete=_completer(entry["choices"]) if entry["choices"] else None,
                ),
            )
        )
    if kind.runs_as == "driver":
        params.append(
            P(
                "address",
                P.KEYWORD_ONLY,
                annotation=Optional[str],
                default=typer.Option(
                    None,
                    "--address",
                    rich_help_panel=cli_help.COMMON,
                    help="Ray cluster address.",
                    show_default="$RAY_ADDRESS, else a local Ray",
                ),
            )
        )
    params += [
        P(
            "seed",
            P.KEYWORD_ONLY,
            annotation=int,
            default=typer.Option(
                0,
                "--seed",
                min=0,
                max=2**32 - 1,
                rich_help_panel=cli_help.COMMON,
                help="Seeds data order and sampling.",
            ),
        ),
        P(
            "quiet",
            P.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--quiet", rich_help_panel=cli_help.COMMON, help="No progress bars."),
        ),
        P(
            "trust_remote_code",
            P.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False,
                "--trust-remote-code",
                rich_help_panel=cli_help.COMMON,
                help="Run Python code the checkpoint ships (config.json auto_map); only for a source you trust.",
            ),
        ),
        P(
            "overrides",
            P.KEYWORD_ONLY,
            annotation=Optional[list[str]],
            default=typer.Argument(
                None,
                metavar="KEY=VALUE",
                help=f"Spec fields (YAML values), e.g. {OVERRIDE_EXAMPLES.get(kind.name) or _first(options)}.",
                show_default=False,
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


def _member_fields(kind, data: dict) -> set[str]:
    """Fields of the spec model `data` selects: the kind's one model, or the union member its `method` names."""
    models = _models(kind.spec)
    method = data.get("method")
    chosen = next(
        (m for m in models if method and getattr(m.model_fields.get("method"), "default", None) == method), models[0]
    )
    return set(chosen.model_fields)


def build_spec(kind, data: dict):
    """The kind's spec from CLI values, or a UserError naming the flag."""
    from pydantic import TypeAdapter, ValidationError

    from compressor.config.load import format_validation_error

    try:
        return TypeAdapter(kind.spec).validate_python(data)
    except ValidationError as exc:
        unknown = "not an option of this method" if "method" in data else "unknown field"
        errors = format_validation_error(
            exc, f"compressor {kind.name}", data, name=lambda loc: flag(tuple(map(str, loc))), unknown=unknown
        )
        raise UserError("; ".join(errors)) from None


def spec_of(kind, options: dict, given: dict) -> tuple:
    """(the kind's spec, the data fields it reads) from a command's parameters; a UserError names the flag."""
    data = _spec_data(options, given, given["overrides"] or [])
    # `--calibration` exists for the union (gptq/awq have it); a method without the field gets it only if given
    member = _member_fields(kind, data)
    names = [n for n in source_fields(kind) if n in member or given[f"source_{n}"]]
    return build_spec(kind, {**data, **{n: n for n in names}}), names


def make_command(kind):
    options = _option_specs(kind)

    def command(**given) -> None:
        import os

        from compressor import remote_code
        from compressor.config.schema import DataSource
        from compressor.models import resolve_model, zoo_ref
        from compressor.preflight import check_standalone
        from compressor.runner import run_standalone

        if given["trust_remote_code"]:
            remote_code.allow(given.get("teacher") or given["model"])
        spec, names = spec_of(kind, options, given)  # its errors first: no model or data is read
        model_dir, zoo_name = resolve_model(given["model"])
        samples, seq_len = kind.calibration(spec)
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
                text = zoo_ref(zoo)
            source_flag = f"--{name}"
            source = DataSource(
                source=text,
                samples=samples,
                text_field=given["text_field"],
                **({"seq_len": seq_len} if seq_len else {}),
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
            samples or 1,
            seq_len,
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
    """A command per registered stage kind not yet on `app` (kinds registered later are added by the next call). A
    built-in kind with its own command module (compressor/commands/generate.py) has registered it already."""
    from compressor.contract import kinds

    have = {c.name for c in app.registered_commands}
    for kind in kinds().values():
        if kind.standalone and kind.name not in have:
            add_command(app, kind, kind.command() or make_command(kind))


def add_command(app: typer.Typer, kind, callback) -> None:
    example = cli_help.EXAMPLES.get(kind.name, f"compressor {kind.name} --model IN --out OUT")
    app.command(name=kind.name, help=kind.summary, cls=cli_help.Command, epilog=example)(callback)
