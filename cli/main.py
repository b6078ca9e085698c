"""`nemo3`: the tools around the build. Each module of this package (other than `main` and `build`)
defines one click command named `command`; they are discovered here so a new tool is one new file.
Command modules import heavy libraries inside the command function, so `nemo3 --help` stays fast."""

from __future__ import annotations

import importlib
import pkgutil

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nemo3")
def main():
    """nemo3: Nemotron 3 deployment tools (the build itself is `nemo3-build`)."""


def _register() -> None:
    from .. import cli

    for info in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
        if info.name in ("main", "build", "common"):
            continue
        module = importlib.import_module(f"{cli.__name__}.{info.name}")
        main.add_command(module.command)


_register()
