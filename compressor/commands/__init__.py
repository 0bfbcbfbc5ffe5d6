"""CLI commands. Each module defines `register(app: typer.Typer)`; none imports torch at import time."""

MODULES = ("pipeline", "evaluate", "zoo", "generate", "stage", "submit", "report", "data", "recipes")
