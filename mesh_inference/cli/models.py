"""``mesh-inference models list|download|rm``.

Public API: ``models`` (the click group; the main CLI does
``cli.add_command(models)``) and ``download_with_progress(ref, models_dir) -> Path``
(a download with a rich progress bar on stderr; errors become
``click.ClickException``).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from mesh_inference.models.download import DownloadProgress, download_model, remove_model
from mesh_inference.models.refs import (
    ModelError,
    default_models_dir,
    list_local_models,
    load_catalog,
    model_fits,
    resolve_model,
)

_dir_option = click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Models directory (default: $MESH_INFERENCE_MODELS or ./local-models).",
)


def _gb(n: int | None, approx: bool = False) -> str:
    return "-" if n is None else f"{'≈' if approx else ''}{n / 1e9:.2f} GB"


@click.group()
def models() -> None:
    """List, download and remove models."""


@models.command("list")
@_dir_option
def list_cmd(models_dir: Path | None) -> None:
    """The catalog and the models on this machine."""
    from mesh_inference.machine.resources import detect_memory

    models_dir = models_dir or default_models_dir()
    try:
        catalog = load_catalog()
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    offer = detect_memory(None, client=False)

    def fits(size: int | None) -> str:
        if size is None:
            return "?"
        return "yes" if model_fits(size, offer.bytes) else "no (needs a mesh)"

    table = Table(title="catalog", header_style="bold")
    for col in ("name", "params", "quant", "size", "local", "fits this machine"):
        table.add_column(col)
    for e in catalog:
        try:
            local = "yes" if resolve_model(e.name, models_dir).path is not None else "no"
        except ModelError:
            local = "broken file"
        table.add_row(
            e.name, e.params, e.quant, _gb(e.size_bytes, e.size_approx), local, fits(e.size_bytes)
        )
    console = Console()
    console.print(table)
    console.print(f"this machine offers {offer.bytes / 1e9:.2f} GB ({offer.detail})")
    local_models = list_local_models(models_dir)
    if local_models:
        lt = Table(title=f"files in {models_dir}", header_style="bold")
        for col in ("name", "size", "fits this machine"):
            lt.add_column(col)
        for m in local_models:
            lt.add_row(m.name, _gb(m.size_bytes), fits(m.size_bytes))
        console.print(lt)
    else:
        console.print(f"no models in {models_dir} yet")


@models.command()
@click.argument("ref")
@_dir_option
def download(ref: str, models_dir: Path | None) -> None:
    """Download REF (a catalog name or hf://owner/repo/file.gguf) with a progress bar.

    An interrupted download continues where it stopped when run again.
    """
    models_dir = models_dir or default_models_dir()
    try:
        resolved = resolve_model(ref, models_dir)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    if resolved.path is not None:
        click.echo(f"{ref} is already on this machine: {resolved.path}")
        return
    path = download_with_progress(ref, models_dir)
    click.echo(f"downloaded {path}")


def download_with_progress(ref: str, models_dir: Path) -> Path:
    """Download with a rich progress bar on stderr; errors become ClickException."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(ref, total=None)

        def on_progress(p: DownloadProgress) -> None:
            bar.update(task, completed=p.downloaded_bytes, total=p.total_bytes)

        try:
            return download_model(ref, models_dir, progress=on_progress)
        except ModelError as exc:
            raise click.ClickException(str(exc)) from None


@models.command()
@click.argument("name")
@_dir_option
def rm(name: str, models_dir: Path | None) -> None:
    """Delete a downloaded model (every part, and partial downloads)."""
    try:
        removed = remove_model(name, models_dir or default_models_dir())
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    for p in removed:
        click.echo(f"removed {p}")
