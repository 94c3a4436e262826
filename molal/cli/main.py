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
    """The console script: a setting molal cannot use (:class:`molal.config.SettingsError`) or an unusable
    database (:class:`molal.db.DatabaseError`) is one line on stderr, not a traceback (their messages name no
    secret, e.g. no part of a mistyped MOLAL_DATABASE_URL)."""
    from molal.config import SettingsError
    from molal.db import DatabaseError

    try:
        app()
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except DatabaseError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
