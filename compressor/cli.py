"""`compressor` command line. Errors become one paragraph and an exit code (0 ok, 1 gate failed, 2 bad input, 3 a
stage crashed or an unexpected error, whose traceback goes to a log file)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer

try:  # typer >= 0.20 carries its own copy of click
    from typer import Abort
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import Abort, ClickException, NoArgsIsHelpError, UsageError

from compressor import cli_help
from compressor.commands import MODULES
from compressor.errors import CompressorError

app = typer.Typer(
    name="compressor",
    help="Prune -> distill -> quantize LLMs, gated by lm-eval and tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion
    rich_markup_mode=None,  # click's plain layout, through compressor.cli_help (rich's cut names at 80 columns)
    cls=cli_help.Group,
    callback=cli_help.root,  # --version
    epilog=cli_help.EXAMPLES[""],
    context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it
)

for _name in MODULES:
    try:
        _module = importlib.import_module(f"compressor.commands.{_name}")
    except ModuleNotFoundError as exc:  # a command module not written yet
        if exc.name != f"compressor.commands.{_name}":
            raise
        continue
    _module.register(app)
cli_help.install(app)


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


def crash_log(exc: BaseException) -> str:
    """Write the traceback of an unexpected exception to a new timestamped file; returns where it is."""
    import os
    import tempfile
    import time
    import traceback

    from compressor.secrets import redact

    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = redact(f"compressor {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc)))
    cache = Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))
    for directory in (cache / "logs", Path(tempfile.gettempdir())):  # a read-only home still gets a log
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(text)
            return str(directory / name)
        except OSError:
            continue
    typer.echo(text, err=True)  # nowhere to write it: the traceback itself, rather than nothing
    return "the output above"


def unexpected(exc: Exception) -> None:
    """A bug or an environment problem nobody foresaw: one paragraph and the traceback in a file, exit 3."""
    from compressor.secrets import redact
    from compressor.storage import credentials_error

    known = credentials_error(exc)  # missing cloud credentials, met outside a `storage.credentials` block
    if known is not None:
        fail(known)
    message = " ".join(str(exc).split()) or "(no message)"
    typer.secho(
        f"error: unexpected {type(exc).__name__}: {redact(message)}; the traceback is in {crash_log(exc)}",
        fg=typer.colors.RED,
        err=True,
    )
    raise SystemExit(3)


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
    except Exception as exc:  # KeyboardInterrupt and SystemExit (exit 130, 75, ...) are not Exceptions: they pass
        unexpected(exc)
    raise SystemExit(code if isinstance(code, int) else 0)


def entry() -> None:
    """The `compressor` process: main(), then, where Ray and torch were loaded, the exit hooks (Ray's, MLflow's,
    logging's) run and the process ends without the interpreter's teardown of those libraries' native state, which
    took 2 s after every `compressor run` here (measured: the hooks took 0.01 s, the teardown after them 1.9 s). In
    process (tests, notebooks) call main()."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if "ray" not in sys.modules or sys.getprofile() is not None:  # a profiler writes its file after this returns
        raise SystemExit(code)
    if not isinstance(code, int):  # SystemExit("message"): Python prints it and exits 1
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    import atexit
    import os
    import threading

    for thread in threading.enumerate():  # what the interpreter does first: wait for non-daemon threads
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
