"""`nemo3 recipes`: the recipes `--recipe` takes by name, one line each."""

from __future__ import annotations

import click


@click.command("recipes")
def command():
    """List nemo3's recipes, the short aliases of NVIDIA's, and NVIDIA's Nemotron 3 recipes shipped by ModelOpt."""
    from ..quant.recipes import recipe_catalog

    rows = recipe_catalog()
    width = max(len(name) for name, _, _ in rows)
    for name, source, description in rows:
        click.echo(f"{name:<{width}}  [{source}] {description}")
