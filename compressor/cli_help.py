"""`--help` that reads at 80 columns. Click's plain two-column layout instead of rich's tables: rich squeezed the
text column to ~20 characters and cut long option names, and parsed `[@SPLIT]` in help text as markup. On top of it:
placeholders in words (INT, PATH, FLOAT 0.01–1.0, [a|b], none for a flag), one default style (`[default: X]`),
options in sections (each option's `rich_help_panel`, e.g. quantize's "GPTQ options") and an example per command."""

from __future__ import annotations

import re
import types
import typing

import typer
from typer.core import TyperCommand, TyperGroup

from compressor import __version__

COMMON = "Common options"
WORDS = {int: "INT", float: "FLOAT", bool: "BOOL"}
NAME_COLUMN = 30  # widest option name beside its help; at 80 columns the help keeps 44
# One example per command, by command path ("" is `compressor` itself); stage kinds without one get a generic line.
EXAMPLES = {
    "": "compressor plan llama8b_to_4b       # `compressor recipes` lists the pipelines",
    "run": "compressor run tiny stages.distill.steps=20 storage=/tmp/artifacts",
    "validate": "compressor validate my_pipeline.yaml stages.quantize.bits=8",
    "plan": "compressor plan llama8b_to_4b --gpu H100 --mfu 0.4",
    "eval": "compressor eval --model zoo:tiny --tasks ref_ppl,ref_next --limit 50",
    "prune": "compressor prune --model zoo:tiny --out pruned --target intermediate_size=384",
    "distill": "compressor distill --student pruned --teacher zoo:tiny --out kd --steps 200",
    "quantize": "compressor quantize --model distilled --out q4 --method awq --group-size 64",
    "generate": "compressor generate --teacher zoo:tiny --prompts prompts.jsonl --out answers",
    "submit": "compressor submit llama8b_to_4b --address http://HEAD:8265 --wait",
    "jobs": "compressor jobs logs raysubmit_XXXX --follow --address http://HEAD:8265",
    "jobs status": "compressor jobs status raysubmit_XXXX --address http://HEAD:8265",
    "jobs logs": "compressor jobs logs raysubmit_XXXX --follow --address http://HEAD:8265",
    "jobs stop": "compressor jobs stop raysubmit_XXXX --address http://HEAD:8265",
    "jobs list": "compressor jobs list --address http://HEAD:8265",
    "report": "compressor report                  # the latest finished pipeline run",
    "compare": "compressor compare RUN_A RUN_B --out reports/a-vs-b",
    "runs": "compressor runs --limit 5",
    "zoo": "compressor zoo build tiny",
    "zoo list": "compressor zoo list",
    "zoo build": "compressor zoo build tiny",
    "data": "compressor data prepare llama8b_to_4b storage=/mnt/shared/compressor",
    "data prepare": "compressor data prepare llama8b_to_4b storage=/mnt/shared/compressor",
    "recipes": "compressor recipes copy smollm2_135m my_pipeline.yaml",
    "recipes list": "compressor recipes list",
    "recipes copy": "compressor recipes copy smollm2_135m my_pipeline.yaml",
}


def span(lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> str:
    """Bounds in words: '0.01–1.0', '>0', '>=1', '>0 <1'."""
    if lo is not None and hi is not None and not (lo_open or hi_open):
        return f"{lo}–{hi}"
    parts = [
        f"{'>' if lo_open else '>='}{lo}" if lo is not None else "",
        f"{'<' if hi_open else '<='}{hi}" if hi is not None else "",
    ]
    return " ".join(p for p in parts if p)


def word(annotation) -> str:
    """INT / FLOAT / BOOL / TEXT for an annotation (Optional and list stripped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        return word(args[0])
    return WORDS.get(annotation, "TEXT")


def suffix(default=None, required: bool = False) -> str:
    """The one default style, appended to an option's help."""
    return " [required]" if required else f" [default: {default}]" if default not in (None, "") else ""


# "...; default: X." / "... (default X)." / "... Default: X." at the end of a help text
SAID_DEFAULT = re.compile(r"(?:[;,.]|\s(\())\s*[Dd]efault:?\s+(.+?)\.?$")


def split_default(text: str) -> tuple[str, str | None]:
    """A default the help text states in words, moved into the one style: ('Run id; default: the latest.') ->
    ('Run id.', 'the latest')."""
    found = SAID_DEFAULT.search(text)
    if not found:
        return text, None
    value = found.group(2)[:-1] if found.group(1) and found.group(2).endswith(")") else found.group(2)
    return text[: found.start()].rstrip(" ;,.") + ".", value


def _placeholder(param) -> str:
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    if param.metavar:
        return param.metavar
    desc = param.type_descriptor
    if desc.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices) + "]"
    bounds = span(getattr(param, "min", None), getattr(param, "max", None))
    return "PATH" if desc.is_path else " ".join(filter(None, (word(desc.annotation), bounds)))


def _default(param, ctx):
    if getattr(param, "show_default", True) is False:
        return None
    if isinstance(param.show_default, str):
        return param.show_default
    value = param.get_default(ctx, call=False)
    if getattr(param, "is_flag", False):  # a lone flag is off unless given; a --x / --no-x pair says which
        return str(bool(value)).lower() if param.secondary_opts else None
    if value is None or value in ((), []) or callable(value):
        return None
    return getattr(value, "value", value)  # an Enum's value


def _record(param, ctx) -> tuple[str, str]:
    if param.param_type_name == "argument":
        name = _usage(param).strip("[]").replace("]...", "...")
    else:
        name = ", ".join(sorted(param.opts, key=lambda o: o.startswith("--")))  # -v, --verbose
        name += "".join(f" / {o}" for o in param.secondary_opts)
        name += f" {_placeholder(param)}".rstrip()
    help_text, default = " ".join((param.help or "").split()), _default(param, ctx)
    if default is None and help_text:
        help_text, default = split_default(help_text)
    return name, (help_text + suffix(default, param.required)).strip()


def _usage(param) -> str:
    name = param.metavar or param.name.upper()
    if param.nargs == -1:
        return f"{name}..." if param.required else f"[{name}]..."
    return name if param.required else f"[{name}]"


def format_params(command, ctx, formatter) -> None:
    """Arguments, then the options by section in order of first appearance (those without one join the first), the
    help of every section in one column."""
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    first = next((p.rich_help_panel for p in params if getattr(p, "rich_help_panel", None)), None) or "Options"
    sections: dict[str, list] = {"Arguments": []}
    for param in params:
        title = "Arguments" if param.param_type_name == "argument" else getattr(param, "rich_help_panel", None)
        sections.setdefault(title or first, []).append(_record(param, ctx))
    width = max((len(name) for rows in sections.values() for name, _ in rows if len(name) <= NAME_COLUMN), default=0)
    for title, rows in sections.items():
        if rows:
            with formatter.section(title):  # a longer name puts its help on the next line
                formatter.write_dl([(name.ljust(width), text) for name, text in rows], col_max=width)


def format_example(command, formatter) -> None:
    if command.epilog:  # verbatim: click would re-wrap an epilog
        with formatter.section("Example"):
            for line in command.epilog.splitlines():
                formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


class Command(TyperCommand):
    def collect_usage_pieces(self, ctx) -> list[str]:  # typer's: `{job_id}`, `[overrides]...`
        arguments = [_usage(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [*filter(None, [self.options_metavar]), *arguments]

    def format_options(self, ctx, formatter) -> None:
        format_params(self, ctx, formatter)

    def format_epilog(self, ctx, formatter) -> None:
        format_example(self, formatter)


class Group(TyperGroup):
    def format_options(self, ctx, formatter) -> None:
        format_params(self, ctx, formatter)
        self.format_commands(ctx, formatter)

    def format_epilog(self, ctx, formatter) -> None:
        format_example(self, formatter)


def install(app: typer.Typer, path: tuple[str, ...] = ()) -> None:
    """These help classes and the examples on every command and group under `app` (their modules name neither)."""
    for info in app.registered_commands:
        name = " ".join((*path, info.name or info.callback.__name__.replace("_", "-")))
        info.cls = Command if info.cls in (None, TyperCommand) else info.cls  # typer's default, not a choice
        info.epilog = info.epilog or EXAMPLES.get(name)
    for info in app.registered_groups:
        name = info.name if isinstance(info.name, str) else info.typer_instance.info.name
        info.cls, info.epilog = Group, EXAMPLES.get(" ".join((*path, name)))
        install(info.typer_instance, (*path, name))


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"compressor {__version__}")
        raise typer.Exit()


def root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    # No docstring: the app's own help stays the help of `compressor`.
    pass
