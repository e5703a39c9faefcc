"""``drseg models``: list, download and verify backbone weights; show the cache dir.

Kept free of torch/open_clip imports so that ``list`` and ``path`` answer at once.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import err_console, print_json, report_errors
from drseg_cli.errors import UsageError
from drseg_cli.model import weights
from drseg_cli.model.factory import get_preset, list_presets

app = typer.Typer(
    help="List, download and verify model weights (cache: $DRSEG_CACHE or ~/.cache/drseg).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CACHE_OPT = typer.Option(None, "--cache-dir", help="Weights cache (default: $DRSEG_CACHE).")


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "-"


def _size(mb: float | None) -> str:
    if mb is None:
        return "?"
    return f"{mb / 1000:.2f} GB" if mb >= 1000 else f"{mb:.0f} MB"


def _expand(names: list[str]) -> list[str]:
    """Weight names, with preset names replaced by the weights they use (order kept)."""
    presets = {p.name for p in list_presets()}
    out: list[str] = []
    for name in names:
        if name in presets:
            p = get_preset(name)
            if p.random_weights:
                raise UsageError(f"preset {name!r} has random weights: nothing to download")
            used = [f"{p.clip_model}/{p.clip_pretrained}", p.dino_model]
        else:
            spec = weights.get_spec(name)
            used = [spec.name, *spec.requires]
        out.extend(n for n in used if n not in out)
    return out


@app.command("list", cls=opt.DrsegCommand)
@report_errors
def list_command(
    json_: bool = opt.flag("--json", help="Print JSON on stdout."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Known weights files (and whether they are cached), then the model presets."""
    rows = weights.list_weights(cache_dir)
    presets = [p.as_dict() for p in list_presets()]
    root = weights.cache_dir(cache_dir)
    if json_:
        print_json({"cache_dir": str(root), "weights": rows, "presets": presets})
        return
    table = Table(title=f"weights (cache: {root})", title_justify="left")
    for col in ("name", "kind", "file", "size", "sha256", "cached"):
        table.add_column(col, no_wrap=col in ("name", "file"))
    for r in rows:
        name = r["name"] + (" *" if r["default"] else "")
        cached = "[green]yes[/]" if r["cached"] else "no"
        table.add_row(name, r["kind"], r["file"], _size(r["size_mb"]), _short(r["sha256"]), cached)
    out = Console(highlight=False, width=None if Console().is_terminal else 160)
    out.print(table)
    out.print("* default.  presets (--model):")
    for p in presets:
        what = f"{p['clip_model']}/{p['clip_pretrained'] or 'random'} + {p['dino_model']}"
        out.print(f"  {p['name']:<10} {what}, tile {p['tile_size']}: {p['description']}")


@app.command("download", cls=opt.DrsegCommand)
@report_errors
def download_command(
    names: list[str] = typer.Argument(..., help="Weight names or presets (e.g. vit-b16)."),
    force: bool = opt.flag("--force", help="Download again even if cached."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Fetch weights into the cache dir (checksums verified where known)."""
    for name in _expand(names):
        spec = weights.get_spec(name)
        present = weights.cached_file(spec, cache_dir)
        if present is not None and not force:
            err_console.print(f"{spec.name}: already cached at {present}", markup=False)
            continue
        path = weights.download(spec, cache=cache_dir, force=force)
        err_console.print(f"{spec.name}: {path}", markup=False)


@app.command("verify", cls=opt.DrsegCommand)
@report_errors
def verify_command(
    names: list[str] | None = typer.Argument(None, help="Weights to check (default: all)."),
    json_: bool = opt.flag("--json", help="Print JSON on stdout."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Check cached files: sha256 where known, structure always.

    Exit 1 if a file is corrupt, or if a file named on the command line is missing.
    """
    wanted = _expand(names) if names else None
    results = weights.verify(wanted, cache=cache_dir)
    failed = [r for r in results if r.status == "corrupt" or (wanted and r.status == "missing")]
    if json_:
        print_json(
            {
                "cache_dir": str(weights.cache_dir(cache_dir)),
                "results": [r.__dict__ for r in results],
                "ok": not failed,
            }
        )
    else:
        for r in results:
            where = r.path or "-"
            err_console.print(f"{r.name}: {r.status} ({r.detail}) {where}", markup=False)
    if failed:
        raise typer.Exit(1)


@app.command("path", cls=opt.DrsegCommand)
@report_errors
def path_command(
    name: str | None = typer.Argument(None, help="A weight name: print its file path."),
    cache_dir: Path | None = CACHE_OPT,
) -> None:
    """Print the cache dir, or where NAME's file is (or would be) in it."""
    if name is None:
        typer.echo(str(weights.cache_dir(cache_dir)))
        return
    spec = weights.get_spec(name)
    found = weights.cached_file(spec, cache_dir)
    typer.echo(str(found or weights.target_path(spec, cache_dir)))
