"""The ``molal`` command line. Each area registers its commands from its own module in this package
(annotate, molam, simulate, server, demo, models); heavy imports happen inside the commands, not here."""

from __future__ import annotations

import importlib

import typer

from molal import __version__

app = typer.Typer(
    name="molal",
    help="Mixture-of-LLMs-in-the-Loop active learning for Label Studio.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
    add_completion=False,
)

#: modules of molal.cli that define ``register(app)``; order = order in --help
COMMAND_MODULES = ["annotate", "molam", "simulate", "server", "demo", "models"]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"molal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
    log_level: str = typer.Option("WARNING", "--log-level", envvar="LOG_LEVEL", help="Logging level."),
) -> None:
    from molal.logging import setup_logging
    from molal.resources import offline_env

    offline_env()
    setup_logging(log_level.upper())


for _name in COMMAND_MODULES:
    importlib.import_module(f"molal.cli.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
