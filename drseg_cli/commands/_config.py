"""``--config FILE`` of ``segment`` and ``evaluate``: a configuration ``drseg tune`` wrote.

The file is JSON: ``{"drseg-config": 1, "method": "drseg", "rho": 0.7, ...}`` with any of the
keys in ``CONFIG_KEYS`` (the command-line options of the same name; ``spsd``/``pdgr``/``ugaf``
false = ``--no-spsd``...) and an optional ``tune`` record (what the search found; not read).
Its values become the command's defaults, so options given on the command line win.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from drseg_cli.commands._common import err_console
from drseg_cli.errors import DrsegError, InputError, UsageError

CONFIG_FORMAT = "drseg-config"
CONFIG_VERSION = 1
#: Keys of a configuration file and their types (the options of the same name).
CONFIG_KEYS: dict[str, type] = {
    "method": str,
    "model": str,
    "clip_baseline": str,
    "rho": float,
    "k": int,
    "window": int,
    "tau": float,
    "alpha": float,
    "steps": int,
    "gamma": float,
    "spsd": bool,
    "pdgr": bool,
    "ugaf": bool,
    "threshold": float,
    "background": str,
    "tile_size": int,
    "overlap": float,
    "blend": str,
}
_SWITCHES = {"spsd": "no_spsd", "pdgr": "no_pdgr", "ugaf": "no_ugaf"}


def _type_ok(value: object, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


def read_config(path: Path) -> dict:
    """The settings of a configuration file, checked: a one-line error naming the file for an
    unreadable file, a missing or newer version, an unknown key or a value of the wrong type."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read configuration ({exc})") from None
    except json.JSONDecodeError as exc:
        msg = f"{path}: not a JSON configuration (line {exc.lineno}: {exc.msg})"
        raise UsageError(msg) from None
    if not isinstance(data, dict) or CONFIG_FORMAT not in data:
        raise UsageError(f"{path}: not a drseg configuration (no {CONFIG_FORMAT!r} key)")
    if data[CONFIG_FORMAT] != CONFIG_VERSION:
        raise UsageError(
            f"{path}: {CONFIG_FORMAT} version {data[CONFIG_FORMAT]!r} is not supported "
            f"(this drseg reads version {CONFIG_VERSION})"
        )
    settings = {k: v for k, v in data.items() if k not in (CONFIG_FORMAT, "tune")}
    unknown = sorted(set(settings) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}"
        )
    for key, value in settings.items():
        kind = CONFIG_KEYS[key]
        if not _type_ok(value, kind):
            raise UsageError(f"{path}: {key} must be a {kind.__name__}, got {value!r}")
    return settings


def option_defaults(settings: dict) -> dict:
    """Configuration settings → command-line parameter names and values."""
    out = {}
    for key, value in settings.items():
        if key in _SWITCHES:
            out[_SWITCHES[key]] = not value
        else:
            out[key] = float(value) if CONFIG_KEYS[key] is float else value
    return out


def config_callback(ctx: typer.Context, param: typer.CallbackParam, value: Path | None):
    """Eager ``--config``: the file's settings become the defaults of the other options
    (click's ``default_map``), so options on the command line win."""
    if value is None or ctx.resilient_parsing:
        return value
    try:
        settings = read_config(value)
    except DrsegError as exc:  # raised while parsing, before report_errors can see it
        err_console.print(f"drseg: error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    ctx.default_map = {**(ctx.default_map or {}), **option_defaults(settings)}
    return value


def write_config(path: Path, settings: dict, tune: dict | None = None) -> None:
    """Atomically write a configuration file that ``read_config`` accepts."""
    from drseg_cli.atomic import atomic_output

    unknown = set(settings) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"not configuration keys: {sorted(unknown)}")
    payload = {CONFIG_FORMAT: CONFIG_VERSION, **settings}
    if tune is not None:
        payload["tune"] = tune
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
