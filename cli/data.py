"""`cryowae data verify|fetch`: public datasets listed in a manifest."""

from __future__ import annotations

from pathlib import Path

import typer

data_app = typer.Typer(
    name="data",
    help="Public tomograms listed in a manifest (data_manifests/*.yaml): check local "
    "copies, download them.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@data_app.command("verify")
def verify_cmd(
    manifest: Path = typer.Argument(..., help="Manifest YAML file.", show_default=False),
    directory: Path = typer.Argument(..., help="Directory holding the files.",
                                     show_default=False),
) -> None:
    """Check each entry's file in DIRECTORY: present, size, SHA-256. Exit 1 if any fails."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cryowae.data.manifest import load_manifest
    from cryowae.data.verify import verify

    m = load_manifest(manifest)
    results = verify(m, directory)
    t = Table(title=escape(f"{manifest} in {directory}"))
    t.add_column("entry", overflow="fold")
    t.add_column("file", overflow="fold")
    for col in ("status", "size", "sha256"):
        t.add_column(col, no_wrap=True)
    t.add_column("detail", overflow="fold")
    style = {"ok": "green", "missing": "red", "size mismatch": "red", "hash mismatch": "red"}
    for r in results:
        status = r.status.upper() if r.ok else r.status
        t.add_row(r.name, r.path.name, f"[{style[r.status]}]{status}[/]", r.size_check,
                  r.hash_check, escape(r.detail))
    console = Console()
    console.print(t)
    failed = [r for r in results if not r.ok]
    console.print(f"{len(results) - len(failed)} ok, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


@data_app.command("fetch")
def fetch_cmd(
    manifest: Path = typer.Argument(..., help="Manifest YAML file.", show_default=False),
    directory: Path = typer.Argument(..., help="Directory to download into (created).",
                                     show_default=False),
    only: list[str] | None = typer.Option(None, "--only", help="Entry name to fetch "
                                          "(repeatable); default: all entries."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for a "
                                  "connection or for data before giving up."),
) -> None:
    """Download the manifest's files into DIRECTORY, checked against size and SHA-256."""
    from cryowae.cli.progress import RichProgress
    from cryowae.data.fetch import fetch
    from cryowae.data.manifest import load_manifest
    from cryowae.errors import CryowaeInputError

    if not timeout > 0:
        raise CryowaeInputError(f"--timeout must be positive, got {timeout:g}")

    class _Progress(RichProgress):
        def log(self, message: str) -> None:  # messages hold brackets: no rich markup
            from rich.markup import escape

            super().log(escape(message))

    m = load_manifest(manifest)
    progress = _Progress()
    results = fetch(m, directory, only=only, progress=progress, timeout=timeout)
    for r in results:
        typer.echo(f"{r.name}: {r.action} {r.path} ({r.size_bytes} bytes)")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
