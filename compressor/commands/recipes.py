"""`compressor recipes [list] | copy NAME [DEST]`: the pipelines shipped in the package (compressor/pipelines/).
`run`, `validate`, `plan`, `submit` and `data prepare` take such a name where they take a pipeline file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

import typer

from compressor.errors import UserError


def shipped() -> dict[str, Path]:
    """name -> file, for every pipeline shipped with compressor."""
    folder = Path(str(resources.files("compressor") / "pipelines"))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def describe(path: Path) -> str:
    """A recipe's one-line description: the first line of its header comment."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def find(name: str, what: str = "no pipeline shipped with compressor has that name") -> Path:
    recipes = shipped()
    if name not in recipes:
        raise UserError(f"{name!r}: {what} (shipped: {', '.join(recipes)}; see `compressor recipes`)")
    return recipes[name]


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Pipelines shipped with compressor: list them, or copy one out to edit. Commands that take a "
        "pipeline file also take one of these names (`compressor plan llama8b_to_4b`).",
        invoke_without_command=True,
    )
    app.add_typer(group, name="recipes")

    @group.callback()
    def recipes(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:  # `compressor recipes` alone lists them
            list_recipes()

    @group.command("list")
    def list_recipes() -> None:
        """Each shipped pipeline with its one-line description."""
        recipes = shipped()
        width = max(map(len, recipes))
        for name, path in recipes.items():
            typer.echo(f"{name:<{width}}  {describe(path)}")

    @group.command("copy")
    def copy(
        name: str = typer.Argument(
            ...,
            help="A shipped pipeline, see `compressor recipes`.",
            shell_complete=lambda ctx, param, incomplete: [n for n in shipped() if n.startswith(incomplete)],
        ),
        dest: Optional[Path] = typer.Argument(
            None,
            help="File or directory to write it to; an existing file is never overwritten.",
            show_default="./NAME.yaml",
        ),
    ) -> None:
        """Copy a shipped pipeline out, to edit it and run it as a file."""
        source = find(name)
        target = dest or Path(source.name)
        if target.is_dir():
            target = target / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(target, "x") as out:  # "x": never replace the user's edits
                out.write(source.read_text())
        except FileExistsError:
            raise UserError(f"{target}: already exists; not overwritten (remove it, or give another DEST)") from None
        typer.echo(f"wrote {target}; run it with: compressor run {target}")
