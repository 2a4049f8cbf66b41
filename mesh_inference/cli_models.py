"""``mesh-inference models list|download|rm``."""

from __future__ import annotations

from pathlib import Path

import click
import psutil
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from .download import DownloadProgress, download_model, remove_model
from .models import ModelError, default_models_dir, list_local_models, load_catalog, model_fits

_dir_option = click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Models directory (default: $MESH_INFERENCE_MODELS or ./local-models).",
)


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


@click.group()
def models() -> None:
    """List, download and remove models."""


@models.command("list")
@_dir_option
def list_cmd(models_dir: Path | None) -> None:
    """The catalog and the models on this machine."""
    from .models import resolve_model

    models_dir = models_dir or default_models_dir()
    avail = int(psutil.virtual_memory().available)
    table = Table(title="catalog", header_style="bold")
    for col in ("name", "size", "quant", "params", "here", "fits this machine"):
        table.add_column(col)
    for e in load_catalog():
        here = resolve_model(e.name, models_dir).path is not None
        table.add_row(
            e.name,
            ("≈" if e.size_approx else "") + _gb(e.size_bytes),
            e.quant,
            e.params,
            "yes" if here else "-",
            "yes" if model_fits(e.size_bytes, avail) else "no (needs a mesh)",
        )
    console = Console()
    console.print(table)
    local = list_local_models(models_dir)
    if local:
        lt = Table(title=f"local models in {models_dir}", header_style="bold")
        lt.add_column("name")
        lt.add_column("size")
        for m in local:
            lt.add_row(m.name, _gb(m.size_bytes))
        console.print(lt)


@models.command()
@click.argument("ref")
@_dir_option
def download(ref: str, models_dir: Path | None) -> None:
    """Download REF (a catalog name or hf://owner/repo/file.gguf) with a progress bar."""
    path = download_with_progress(ref, models_dir or default_models_dir())
    click.echo(f"downloaded {path}")


def download_with_progress(ref: str, models_dir: Path) -> Path:
    """Download with a rich progress bar on stderr; errors become ClickException."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
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
    """Delete a downloaded model (all parts)."""
    try:
        removed = remove_model(name, models_dir or default_models_dir())
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    for p in removed:
        click.echo(f"removed {p}")
