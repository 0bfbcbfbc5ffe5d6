"""`compressor zoo list | build NAME`: the offline reference teachers."""

from __future__ import annotations

import typer


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Reference models built offline (small Llama teachers trained on CPython's docs).", no_args_is_help=True
    )
    app.add_typer(group, name="zoo")

    @group.command("list")
    def list_models() -> None:
        """Recipes, their shapes and whether they are built (and where)."""
        from rich.console import Console
        from rich.table import Table

        from compressor.models import zoo

        table = Table(title=f"zoo ({zoo.home()})", title_justify="left")
        for col in ("name", "params", "layers", "hidden", "heads/kv", "mlp", "vocab", "seq", "built", "description"):
            table.add_column(col)
        for name, r in zoo.RECIPES.items():
            info = zoo.build_info(name)
            built = f"yes ({info['build_seconds']:.0f} s)" if info else "no"
            table.add_row(
                name,
                f"{zoo.param_count(name) / 1e6:.2f}M",
                str(r.num_layers),
                str(r.hidden_size),
                f"{r.num_heads}/{r.num_kv_heads}",
                str(r.intermediate_size),
                str(r.vocab_size),
                str(r.seq_len),
                built,
                r.description,
            )
        console = Console()
        console.print(table)
        for name in zoo.RECIPES:
            if zoo.is_built(name):
                console.print(f"{name}: {zoo.model_path(name)}", soft_wrap=True)

    @group.command("build")
    def build(name: str = typer.Argument(..., help="Recipe name, see `compressor zoo list`.")) -> None:
        """Build (or find) a reference model; print its path, size, build time and held-out perplexity."""
        from rich.console import Console

        from compressor.models import zoo

        cached = zoo.is_built(name)
        path = zoo.ensure_model(name)
        info = zoo.build_info(name) or {}
        console = Console()
        console.print(f"path         {path}{' (cached)' if cached else ''}")
        console.print(f"params       {info.get('params', 0):,} ({_size(path) / 2**20:.1f} MiB on disk)")
        console.print(
            f"build time   {info.get('build_seconds', float('nan')):.1f} s ({info.get('threads', '?')} threads)"
        )
        console.print(
            f"held-out ppl {info.get('heldout_ppl', float('nan')):.2f} per token "
            f"(unigram baseline {info.get('unigram_ppl', float('nan')):.1f})"
        )
        console.print(f"tasks        {zoo.tasks_dir(name)} ({', '.join(zoo.TASK_NAMES)})")
