"""Help that reads at 80 columns, options declared once, usage errors as one line (issue 16.2)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.commands import options
from tests.helpers import error_line

cli._register()
COMMANDS = [
    [],
    ["segment"],
    ["refer"],
    ["evaluate"],
    ["tune"],
    ["train"],
    ["vectorize"],
    ["info"],
    ["check"],
    ["models", "list"],
]
PANELS = ["Input", "Classes", "Model", "DR-Seg", "Tiling & speed", "Outputs", "Batch"]


def help_text(*command: str, width: int = 80) -> str:
    result = CliRunner().invoke(cli.app, [*command, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def flat(text: str) -> str:
    """Help text without the panels' box drawing, whitespace collapsed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_fits_80_columns_with_whole_option_names(command):
    text = help_text(*command)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text  # rich cuts a column that does not fit with an ellipsis
    assert "<bool>" not in text  # flags take no value


def test_segment_help_groups_options_in_panels():
    text = help_text("segment")
    titles = re.findall(r"╭─ (.+?) ─", text)
    assert set(PANELS) <= set(titles), titles
    # At most two lines per option plus each panel's frame: the one-panel help of wave 1 took
    # 193 lines at 80 columns for 46 options (4.2 a option).
    command = typer.main.get_command(cli.app).commands["segment"]
    n_options = sum(1 for p in command.params if p.param_type_name == "option")
    assert len(text.splitlines()) <= 2 * n_options + 3 * len(titles) + 4, len(text.splitlines())


@pytest.mark.parametrize("command", ["segment", "evaluate", "train"])
def test_every_drseg_knob_shows_its_default(command):
    text = flat(help_text(command, width=100))
    for name, value in options.DRSEG_DEFAULTS.items():
        if command == "train" and name == "clip_baseline":
            continue  # training builds the default CLIP branch
        flag = "--" + name.replace("_", "-")
        row = re.search(rf"{re.escape(flag)} (.*?)(?= --|$)", text)
        assert row, flag
        assert f"[default: {value}]" in row.group(1), (flag, row.group(1))


def test_drseg_defaults_shown_are_the_models():
    from drseg_cli.model.drseg import DRSegOptions

    model = {f.name: f.default for f in dataclasses.fields(DRSegOptions)}
    assert {name: model[name] for name in options.DRSEG_DEFAULTS} == options.DRSEG_DEFAULTS


def test_format_lists_every_vector_format():
    from drseg_cli.pipeline.segment import VECTOR_SUFFIXES

    assert {f".{f}" for f in options.VECTOR_FORMATS} == set(VECTOR_SUFFIXES) - {".json"}
    assert "tif|gpkg|shp|geojson|parquet" in flat(help_text("segment"))


def test_shared_options_mean_the_same_in_every_command():
    group = typer.main.get_command(cli.app)
    params = {
        name: {p.name: p for p in group.commands[name].params}
        for name in ("segment", "evaluate", "tune", "train")
    }
    for name in set.union(*(set(p) for p in params.values())) - {"help"}:
        declared = {tuple(p[name].opts) for p in params.values() if name in p}
        assert len(declared) == 1, (name, declared)  # one spelling per option name
    # --steps is DR-Seg's PDGR steps everywhere; train's optimiser steps have their own name
    for command in ("segment", "evaluate", "train"):
        assert params[command]["steps"].help == params["segment"]["steps"].help
        assert "PDGR" in params[command]["steps"].help
    assert params["train"]["max_steps"].opts == ["--max-steps"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "x.tif", "-c", "a", "--bogus"], "No such option: --bogus"),
        (["segment", "-c", "a"], "Missing argument"),
        (["segment", "x.tif", "-c", "a", "--tile-size", "big"], "'--tile-size'"),
        (["nosuchcommand"], "No such command"),
        (["train", "-d", "x", "-o", "y", "--steps", "3", "--max-steps", "x"], "'--max-steps'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, message):
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert message in line and "--help" in line, line
    assert "╭" not in result.output


def test_reduce_and_keep_zero_label_exclude_each_other(tmp_path):
    result = CliRunner().invoke(
        cli.app,
        ["evaluate", "-d", str(tmp_path), "--reduce-zero-label", "--keep-zero-label"],
    )
    assert result.exit_code == 2, result.output
    assert "exclude each other" in error_line(result)


@pytest.mark.parametrize("command", ["segment", "evaluate", "tune", "train", "info"])
def test_every_option_with_a_value_shows_its_default(command):
    """Every option that takes a value and has a default prints it (None-valued options that
    fall back to the model's/layout's value print that fallback through ``shown``)."""
    params = typer.main.get_command(cli.app).commands[command].params
    rows: dict[str, str] = {}  # option name → its help row(s), box drawing removed
    current = None
    for line in help_text(command, width=100).splitlines():
        body = re.sub(r"[│╭╮╰╯─]", " ", line).strip().removeprefix("* ").strip()
        if body.startswith("--"):
            current = body.split()[0]
            rows[current] = body
        elif current and body:
            rows[current] += " " + body
        if line.startswith("╰"):
            current = None
    checked = 0
    for p in params:
        if not isinstance(p, typer.core.TyperOption) or p.is_flag or p.hidden or p.multiple:
            continue
        name = max(p.opts, key=len)
        assert name in rows, (command, name)
        if p.default is not None and not p.required:
            assert "[default: " in rows[name], (command, name, rows[name])
            checked += 1
    assert checked or command == "train"  # train: None = the saved run's value
