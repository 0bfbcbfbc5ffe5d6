"""Errors that the CLI turns into one clear paragraph and an exit code, never a traceback."""


class CompressorError(Exception):
    """Base class. `exit_code` is what the CLI returns."""

    exit_code = 2


class UserError(CompressorError):
    """Bad input or configuration: a field, a file, a target. Exit 2; nothing is written."""

    exit_code = 2


class GateFailed(CompressorError):
    """A stage missed its lm-eval bar with on_fail=stop. Exit 1."""

    exit_code = 1


class StageFailed(CompressorError):
    """A stage raised while running. Exit 3; the partial output was not published."""

    exit_code = 3
