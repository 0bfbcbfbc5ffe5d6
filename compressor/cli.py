"""`compressor` command line. Errors become one paragraph and an exit code (0 ok, 1 gate failed, 2 bad input)."""

from __future__ import annotations

import importlib

import typer

try:  # typer >= 0.20 carries its own copy of click
    from typer import Abort
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import Abort, ClickException, NoArgsIsHelpError, UsageError

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


def application() -> typer.Typer:
    """The app, with a command for every stage kind registered so far (a plugin's or a test's too)."""
    from compressor.commands import stage

    stage.register(app)
    return app


def fail(exc: CompressorError) -> None:
    from compressor.secrets import redact

    typer.secho(f"error: {redact(exc)}", fg=typer.colors.RED, err=True)  # messages quote URIs and user input
    raise SystemExit(exc.exit_code)


def usage_error(exc: ClickException) -> None:
    """A bad flag or argument: one paragraph naming it (click's own is a multi-line box), exit 2."""
    from compressor.secrets import redact

    if isinstance(exc, NoArgsIsHelpError) or not isinstance(exc, UsageError):  # help text, or a file error
        exc.show()
        raise SystemExit(exc.exit_code)
    command = exc.ctx.command_path if exc.ctx else "compressor"
    typer.secho(
        f"error: {command}: {redact(exc.format_message()).rstrip('.')} (see `{command} --help`)",
        fg=typer.colors.RED,
        err=True,
    )
    raise SystemExit(exc.exit_code)


def main() -> None:
    try:
        code = application()(standalone_mode=False)  # click's errors come here, to be told in one paragraph
    except CompressorError as exc:
        fail(exc)
    except ClickException as exc:
        usage_error(exc)
    except Abort:  # end of input at a prompt: as click does it (Ctrl-C is exit 130, from typer)
        typer.echo("Aborted!", err=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
