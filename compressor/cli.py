"""`compressor` command line. Errors become one paragraph and an exit code (0 ok, 1 gate failed, 2 bad input)."""

from __future__ import annotations

import importlib

import typer

from compressor.commands import MODULES
from compressor.errors import CompressorError

app = typer.Typer(
    name="compressor",
    help="Prune -> distill -> quantize LLMs, gated by lm-eval and tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _name in MODULES:
    try:
        _module = importlib.import_module(f"compressor.commands.{_name}")
    except ModuleNotFoundError as exc:  # a command module not written yet
        if exc.name != f"compressor.commands.{_name}":
            raise
        continue
    _module.register(app)


def fail(exc: CompressorError) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise SystemExit(exc.exit_code)


def main() -> None:
    try:
        app(standalone_mode=True)
    except CompressorError as exc:
        fail(exc)


if __name__ == "__main__":
    main()
