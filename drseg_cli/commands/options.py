"""Options shared by ``segment``, ``evaluate``, ``tune`` and ``train``, each declared once
(as rasterio's ``rio/options.py`` does), so that a name means the same thing in every command.

Each factory returns a fresh ``typer.Option`` with its help panel set; commands use them as
parameter defaults: ``rho: float | None = options.rho()``. Flags carry no ``<bool>`` metavar
and no ``--no-x`` twin; every tunable shows its default (DR-Seg's from ``DRSEG_DEFAULTS``).
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand


class HelpFlag:
    """Mixin for a command or group whose ``--help`` is a flag like the others: no ``<bool>``
    metavar."""

    def get_help_option(self, ctx: typer.Context) -> Any:
        """click's help option, shown without a value type."""
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class DrsegCommand(HelpFlag, TyperCommand):
    """Every drseg command's class."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """click, once options whose value may be left out have one (``optional_values``)."""
        return super().parse_args(ctx, optional_values(args))


#: Options whose value may be left out: name → (test of the next word as their value,
#: the value they get without one).
OPTIONAL_VALUES: dict[str, tuple[Any, str]] = {}


def optional_values(args: list[str]) -> list[str]:
    """``--ray`` followed by a word that is not a value of it (an input, another option, the
    end) becomes ``--ray=local``; ``--ray HOST:PORT`` is left as it is. Typer cannot declare an
    option with an optional value, and without this ``--ray scenes/`` would eat the input."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        test, default = OPTIONAL_VALUES.get(arg, (None, ""))
        if test is not None and not (i + 1 < len(args) and test(args[i + 1])):
            arg += f"={default}"
        out.append(arg)
    return out


INPUT = "Input"
CLASSES = "Classes"
MODEL = "Model"
DRSEG = "DR-Seg"
TILING = "Tiling & speed"
OUTPUTS = "Outputs"
BATCH = "Batch"
DATA = "Dataset"
TRAINING = "Training"

#: ``DRSegOptions``' defaults, shown in help without importing torch (a test keeps them equal).
DRSEG_DEFAULTS: dict[str, object] = {
    "rho": 0.5,
    "k": 16,
    "window": 3,
    "tau": 0.1,
    "alpha": 0.8,
    "steps": 10,
    "gamma": 0.2,
    "clip_baseline": "clearclip",
}
#: Vector formats a batch (``--format``) or ``-o`` file may have, besides the ``tif`` mask.
VECTOR_FORMATS = ("gpkg", "shp", "geojson", "parquet")


def flag(*names: str, help: str, panel: str | None = None, default: bool | None = False) -> Any:
    """An on/off switch: no value, no ``<bool>`` metavar, no ``--no-`` twin."""
    return typer.Option(default, *names, help=help, rich_help_panel=panel, metavar="")


def shown_default(help: str, default: object) -> str:
    """Help text ending in ``[default: X]`` for an option whose value is None unless given
    (the model's, the layout's...): typer would print nothing, or ``(X)``."""
    from rich.markup import escape  # typer's help is rich markup: [x] would be a tag

    return f"{help} {escape(f'[default: {default}]')}"


def option(
    default: Any, *names: str, help: str, panel: str | None, shown: object = None, **kw: Any
) -> Any:
    """``typer.Option`` in a help panel; ``shown`` is the default printed for an option whose
    value is None unless given (then the model's, the layout's... applies)."""
    if default is None and shown is not None:
        help, kw["show_default"] = shown_default(help, shown), False
    return typer.Option(default, *names, help=help, rich_help_panel=panel, **kw)


def _drseg(name: str, help: str) -> Any:
    """A DR-Seg knob: None (the model's value) unless given; help shows that value."""
    return option(
        None, "--" + name.replace("_", "-"), help=help, panel=DRSEG, shown=DRSEG_DEFAULTS[name]
    )


# -- Classes ---------------------------------------------------------------------------------


def classes(required: bool = True) -> Any:
    """``--classes/-c``: class words with synonyms, or a class file."""
    if required:
        return option(
            ...,
            "--classes",
            "-c",
            help="'road,building:house|roof,water' or a class file.",
            panel=CLASSES,
        )
    return option(
        None,
        "--classes",
        "-c",
        help="Class file or 'a,b,c' (default: the dataset's).",
        panel=CLASSES,
    )


def threshold() -> Any:
    """``--threshold``: below it a pixel is ``--background``."""
    return option(
        0.0,
        "--threshold",
        help="Best class probability below this → --background (SegEarth-OV prob_thd).",
        panel=CLASSES,
    )


def background(help: str = "Class for pixels below --threshold; 'nodata': none.") -> Any:
    """``--background``: the class (new or listed) of pixels below ``--threshold``."""
    return option("background", "--background", help=help, panel=CLASSES)


# -- Model -----------------------------------------------------------------------------------


def model(default: str | None = "vit-b16") -> Any:
    """``--model/-m``: a preset name (``drseg models``)."""
    return option(
        default,
        "--model",
        "-m",
        help="Model preset (drseg models list).",
        panel=MODEL,
        shown="vit-b16",
    )


def method() -> Any:
    """``--method``: DR-Seg or one of the baselines it is compared with."""
    return option("drseg", "--method", help="drseg | clip | segearth | dglrsis.", panel=MODEL)


def dglrsis() -> Any:
    """``--dglrsis KEY=VALUE``: a DGL-RSIS setting (repeatable; docs/METHOD.md lists them)."""
    return option(
        None,
        "--dglrsis",
        help="DGL-RSIS option KEY=VALUE, repeatable (e.g. context_ratio=2, proposals=sam).",
        panel=MODEL,
        metavar="KEY=VALUE",
    )


def checkpoint() -> Any:
    """``--checkpoint``: a model trained by ``drseg train``."""
    return option(
        None,
        "--checkpoint",
        help="A trained model (drseg train: run/best.pt).",
        panel=MODEL,
    )


def clip_model() -> Any:
    """open_clip architecture in place of the preset's."""
    return option(None, "--clip-model", help="open_clip model name override.", panel=MODEL)


def clip_pretrained() -> Any:
    """open_clip weights (tag or local file) in place of the preset's."""
    return option(None, "--clip-pretrained", help="open_clip weights tag or file.", panel=MODEL)


def dino_model() -> Any:
    """timm DINO architecture in place of the preset's."""
    return option(None, "--dino-model", help="timm DINO model name override.", panel=MODEL)


def dino_checkpoint() -> Any:
    """Local DINO weights (no download)."""
    return option(None, "--dino-checkpoint", help="Local DINO checkpoint file.", panel=MODEL)


def device(default: str | None = "auto") -> Any:
    """Where the model runs; ``default=None`` where a saved run supplies it (train)."""
    return option(
        default,
        "--device",
        help="auto | cpu | cuda | cuda:N.",
        panel=TILING,
        shown="auto",
    )


def precision(default: str | None = "auto") -> Any:
    """Autocast dtype; ``default=None`` where a saved run supplies it (train)."""
    return option(
        default,
        "--precision",
        help="auto | fp32 | bf16 | fp16.",
        panel=TILING,
        shown="auto",
    )


# -- DR-Seg ----------------------------------------------------------------------------------


def rho() -> Any:
    """DR-Seg ρ: share of CLIP channels kept as semantic."""
    return _drseg("rho", "Semantic channel ratio ρ (1: CLIP baseline).")


def k() -> Any:
    """DR-Seg k: graph neighbours per DINO node."""
    return _drseg("k", "Graph sparsity: neighbours kept per DINO node.")


def alpha() -> Any:
    """DR-Seg α: PDGR propagation weight."""
    return _drseg("alpha", "PDGR propagation strength α.")


def steps() -> Any:
    """``--steps``: PDGR propagation steps (``train``'s optimiser steps are ``--max-steps``)."""
    return _drseg("steps", "PDGR propagation steps L.")


def gamma() -> Any:
    """DR-Seg γ: UGAF temperature."""
    return _drseg("gamma", "UGAF fusion temperature γ.")


def window() -> Any:
    """DR-Seg r: graph search radius."""
    return _drseg("window", "Graph search radius (DINO patches).")


def tau() -> Any:
    """DR-Seg τ: edge softmax temperature."""
    return _drseg("tau", "Graph edge softmax temperature τ.")


def clip_baseline() -> Any:
    """DR-Seg's CLIP branch."""
    return _drseg("clip_baseline", "CLIP branch: clearclip | segearth.")


def no_spsd() -> Any:
    """Ablation: no semantic/structural channel split."""
    return flag("--no-spsd", help="Ablate channel decoupling (SPSD).", panel=DRSEG)


def no_pdgr() -> Any:
    """Ablation: no graph rectification."""
    return flag("--no-pdgr", help="Ablate graph rectification (PDGR).", panel=DRSEG)


def no_ugaf() -> Any:
    """Ablation: no uncertainty-guided fusion."""
    return flag("--no-ugaf", help="Ablate uncertainty fusion (UGAF).", panel=DRSEG)


# -- Input -----------------------------------------------------------------------------------


def config() -> Any:
    """``--config``: a ``drseg tune`` result whose settings become the option defaults."""
    from drseg_cli.commands._config import config_callback

    return option(
        None,
        "--config",
        is_eager=True,
        callback=config_callback,
        help="Settings file from drseg tune (best.json); options given here win over it.",
        panel=INPUT,
    )


def bands() -> Any:
    """Which bands feed R, G, B."""
    return option(None, "--bands", help="Bands used as R,G,B, e.g. '3,2,1'.", panel=INPUT)


def percentiles(help: str = "Scene-wide stretch for non-8-bit data.") -> Any:
    """Contrast stretch of non-8-bit data."""
    return option("2,98", "--percentiles", help=help, panel=INPUT)


def aoi(panel: str | None = INPUT) -> Any:
    """``--aoi``: the area of interest (segment: tiles run and pixels kept; info: tiles)."""
    return option(
        None,
        "--aoi",
        help="Only this area: vector file, WKT or minx,miny,maxx,maxy.",
        panel=panel,
    )


def aoi_crs(panel: str | None = INPUT) -> Any:
    """``--aoi-crs``: the CRS of a WKT or box ``--aoi`` (a file has its own)."""
    return option(
        None,
        "--aoi-crs",
        help="CRS of a WKT/box --aoi, e.g. EPSG:4326.",
        panel=panel,
        shown="the scene's; a file's own",
    )


# -- Tiling & speed --------------------------------------------------------------------------


def tile_size() -> Any:
    """Model input tile edge; the model's when not given."""
    return option(
        None,
        "--tile-size",
        help="Tile edge in pixels.",
        panel=TILING,
        shown="model's",
    )


def overlap(shown: str = "0.25; segearth 0.5") -> Any:
    """Overlap of neighbouring tiles; the model's when not given."""
    return option(
        None,
        "--overlap",
        help="Tile overlap, a fraction of the tile.",
        panel=TILING,
        shown=shown,
    )


def blend() -> Any:
    """How overlapping tiles are blended; the model's when not given."""
    return option(
        None,
        "--blend",
        help="Blend of overlapping tiles: linear | flat.",
        panel=TILING,
        shown="linear; segearth flat",
    )


def batch_size(default: int | None, help: str, min: int | None = 1) -> Any:
    """Tiles per model call (defaults differ per command: given here)."""
    return option(default, "--batch-size", min=min, help=help, panel=TILING)


# -- Outputs ---------------------------------------------------------------------------------


def allow_no_crs() -> Any:
    """``--allow-no-crs``: outputs of a raster without georeferencing, on its pixel grid."""
    return flag("--allow-no-crs", help="Accept rasters without georeferencing.", panel=INPUT)


def resume() -> Any:
    """``--resume`` of a batch: the manifest says what is done (``pipeline/batch.py``)."""
    return flag("--resume", help="Skip scenes already done and valid.", panel=BATCH)


def fail_fast() -> Any:
    """``--fail-fast`` of a batch: otherwise a failed scene is recorded and the rest go on."""
    return flag("--fail-fast", help="Stop at the first failed scene.", panel=BATCH)


def overwrite(help: str = "Replace existing outputs.") -> Any:
    """Existing outputs are never replaced without it."""
    return flag("--overwrite", help=help, panel=OUTPUTS)


def quiet(help: str = "No progress or summary.") -> Any:
    """Nothing on stderr but errors and warnings."""
    return flag("--quiet", "-q", help=help, panel=OUTPUTS)


def json_(help: str = "Print a JSON summary on stdout.") -> Any:
    """A machine-readable summary on stdout for scripts."""
    return flag("--json", help=help, panel=OUTPUTS)


def more_inputs() -> Any:
    """``--input``: more scenes after the first (each a file, folder or quoted glob)."""
    return option(
        None,
        "--input",
        "-i",
        metavar="PATH",
        help="More input scenes (file, folder or quoted glob); repeatable: a batch.",
        panel=BATCH,
    )


def output_format() -> Any:
    """``--format``: the output type of each scene of a batch."""
    return option(
        "tif",
        "--format",
        help="Batch output type: " + "|".join(("tif", *VECTOR_FORMATS)) + ".",
        panel=BATCH,
    )


# -- Distributed (Ray) ----------------------------------------------------------------------


def is_ray_address(text: str) -> bool:
    """A Ray cluster address: ``auto``, ``local``, ``ray://host:port`` or ``host:port``."""
    import re

    return text in ("auto", "local") or bool(
        re.fullmatch(r"ray://\S+|[\w.-]+:\d+|\[[0-9A-Fa-f:]+\]:\d+", text)
    )


OPTIONAL_VALUES["--ray"] = (is_ray_address, "local")


def ray() -> Any:
    """``--ray [ADDRESS]``: scenes on Ray actors (pipeline/distributed.py, docs/SCALE.md)."""
    return typer.Option(
        None,
        "--ray",
        metavar="[ADDRESS]",
        show_default=False,
        help="Scenes on Ray workers: a local instance, or ADDRESS (host:port, auto).",
        rich_help_panel=BATCH,
    )


def workers() -> Any:
    """Ray actors, each holding one model."""
    return option(
        None, "--workers", metavar="N", help="Ray workers.", panel=BATCH, shown="cluster's"
    )


def gpus_per_worker() -> Any:
    """GPU share of each Ray actor; fractions pack several on one GPU."""
    return option(
        None,
        "--gpus-per-worker",
        metavar="X",
        help="GPUs per Ray worker (0.5: two a GPU).",
        panel=BATCH,
        shown="1 if any",
    )


def cpus_per_worker() -> Any:
    """CPU cores reserved for each Ray actor (its torch threads)."""
    return option(1.0, "--cpus-per-worker", metavar="X", help="CPUs per Ray worker.", panel=BATCH)


# -- Dataset (evaluate, tune, train) ---------------------------------------------------------


def data(help: str = "Labelled dataset folder (see --layout).") -> Any:
    """The labelled dataset folder."""
    return option(..., "--data", "-d", help=help, panel=DATA)


def layout(default: str | None = "auto", help: str = "Dataset layout (docs/EVALUATE.md).") -> Any:
    """How the dataset folder is organised; ``default=None`` where a saved run supplies it."""
    return option(default, "--layout", help=help, panel=DATA, shown="auto")


def split(help: str = "Split folder.") -> Any:
    """Which split folder of the dataset."""
    return option(None, "--split", help=help, panel=DATA, shown="the layout's")


def ignore_index(default: int | None = 255, help: str = "Label value not scored.") -> Any:
    """The label value left out of scores and losses."""
    return option(default, "--ignore-index", help=help, panel=DATA, shown=255)


def reduce_zero_label() -> Any:
    """``--reduce-zero-label``: 0 → ignore, v → v-1 (``zero_label`` reads it with the next)."""
    return flag("--reduce-zero-label", help="0 → ignore, v → v-1.", panel=DATA)


def keep_zero_label() -> Any:
    """``--keep-zero-label``: label value v is class v, whatever the layout says."""
    return flag(
        "--keep-zero-label",
        help=shown_default("Label value v = class v.", "as the layout says"),
        panel=DATA,
    )


def zero_label(reduce: bool, keep: bool) -> bool | None:
    """The two flags as one setting: True, False, or None (the layout's)."""
    if reduce and keep:
        from drseg_cli.errors import UsageError

        raise UsageError("--reduce-zero-label and --keep-zero-label exclude each other")
    return True if reduce else False if keep else None


def limit(help: str = "Only the first N images.") -> Any:
    """A quick run on the first N images."""
    return option(None, "--limit", min=1, help=help, panel=DATA)


def absent_classes() -> Any:
    """How a predicted class absent from the ground truth counts."""
    return option(
        "count",
        "--absent-classes",
        help="A predicted class absent from the ground truth: 'count' (IoU 0; mmseg) or "
        "'drop' (left out of mIoU; detectron2).",
        panel=DATA,
    )


# -- Recipes and seen/unseen classes (train, evaluate, segment) -----------------------------

RECIPE = "Recipe (soft-guided)"

#: ``SoftGuidedConfig``'s defaults, shown in help without importing torch (a test keeps
#: them equal).
SOFT_GUIDED_DEFAULTS: dict[str, object] = {
    "tune": "lora",
    "tune_blocks": 0,
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "seg_weight": 1.0,
    "feature_weight": 1.0,
    "cost_weight": 1.0,
    "output_weight": 1.0,
    "cost_scale": 50.0,
    "bias_hidden": 64,
    "encoder_lr_scale": 0.1,
}


def recipe() -> Any:
    """``--recipe``: what ``drseg train`` trains (docs/TRAIN.md)."""
    return option(
        None,
        "--recipe",
        help="drseg (DR-Seg's heads on frozen CLIP + DINO) | soft-guided (fine-tune CLIP).",
        panel=TRAINING,
        shown="drseg",
    )


def _soft(name: str, flag_name: str, help: str) -> Any:
    """A soft-guided setting: None (the saved run's, else the default) unless given."""
    return option(None, flag_name, help=help, panel=RECIPE, shown=SOFT_GUIDED_DEFAULTS[name])


def tune() -> Any:
    """``--tune``: which CLIP image-encoder parameters the soft-guided recipe trains."""
    return _soft("tune", "--tune", "full | last (the last --tune-blocks) | lora (peft).")


def tune_blocks() -> Any:
    return _soft("tune_blocks", "--tune-blocks", "Blocks tuned by last/lora (0: all).")


def lora_rank() -> Any:
    return _soft("lora_rank", "--lora-rank", "LoRA rank.")


def lora_alpha() -> Any:
    return _soft("lora_alpha", "--lora-alpha", "LoRA alpha (scale alpha/rank).")


def seg_weight() -> Any:
    return _soft("seg_weight", "--seg-weight", "Segmentation loss weight.")


def guide_feature_weight() -> Any:
    return _soft("feature_weight", "--guide-feature-weight", "Guidance: tuned vs frozen features.")


def guide_cost_weight() -> Any:
    return _soft("cost_weight", "--guide-cost-weight", "Guidance: KL of the cost maps.")


def guide_output_weight() -> Any:
    return _soft(
        "output_weight", "--guide-output-weight", "Guidance: KL of the final output (bias+decoder)."
    )


def guide_cost_scale() -> Any:
    return _soft("cost_scale", "--guide-cost-scale", "Logit scale of the cost maps in the KL.")


def scene_bias_hidden() -> Any:
    return _soft("bias_hidden", "--scene-bias-hidden", "Scene-bias MLP width.")


def encoder_lr_scale() -> Any:
    return _soft("encoder_lr_scale", "--encoder-lr-scale", "Encoder lr = --lr × this.")


def no_guidance() -> Any:
    return flag("--no-guidance", help="No frozen-guide losses (plain fine-tuning).", panel=RECIPE)


def no_scene_bias() -> Any:
    return flag("--no-scene-bias", help="No scene-bias terms.", panel=RECIPE)


def no_decoder() -> Any:
    return flag("--no-decoder", help="No upsampling decoder (cost map × scale).", panel=RECIPE)


def holdout_classes(help: str) -> Any:
    """``--holdout-classes a,b``: classes left out of training (the unseen ones)."""
    return option(None, "--holdout-classes", help=help, panel=CLASSES)


def class_split() -> Any:
    """``--class-split``: score the seen, the unseen or all classes. Not ``--split``: that
    already names the dataset's split folder in evaluate, tune and train."""
    return option(
        None,
        "--class-split",
        help="seen | unseen (only those classes predicted and scored) | all (all predicted; "
        "mIoU of seen, unseen, harmonic mean). Needs --holdout-classes or a checkpoint's.",
        panel=CLASSES,
        shown="all with held-out classes",
    )


def as_clip_branch() -> Any:
    """``--as-clip-branch``: a soft-guided checkpoint's tuned CLIP under training-free DR-Seg."""
    return flag(
        "--as-clip-branch",
        help="Soft-guided --checkpoint: run DR-Seg (SPSD, PDGR, UGAF) with its tuned CLIP "
        "as the CLIP branch.",
        panel=MODEL,
    )


# -- Referring expressions (refer) -----------------------------------------------------------

REFER = "Referring"


def refer_method() -> Any:
    """``--method`` of ``refer``: one of ``model.factory.REFER_METHODS``."""
    return option(
        "rsrefseg2", "--method", help="Referring method: rsrefseg2 | dglrsis.", panel=REFER
    )


def refer_model() -> Any:
    """``--model`` of ``refer``: the method's variant (its first one unless given)."""
    return option(
        None,
        "--model",
        "-m",
        help="Variant of the method (drseg models list).",
        panel=REFER,
        shown="siglip2-so400m-sam-vit-large",
    )


def refer_checkpoint() -> Any:
    """``--checkpoint`` of ``refer``: released name or file."""
    return option(
        None,
        "--checkpoint",
        help="Trained weights: a released name (rsrefseg2-rrsisd...) or a file.",
        panel=REFER,
    )


def expressions_file() -> Any:
    """``--expressions FILE``: one expression per line."""
    return option(
        None,
        "--expressions",
        help="File of expressions, one per line (one mask class / polygon set each).",
        panel=REFER,
    )


def top_k() -> Any:
    """Objects kept per expression."""
    return option(1, "--top-k", min=1, help="Objects kept per expression.", panel=REFER)


def min_score() -> Any:
    """Windows whose score is below it are not segmented."""
    return option(
        0.0, "--min-score", help="Window score (0-1) below which nothing is segmented.", panel=REFER
    )


def max_windows() -> Any:
    """Best windows per expression whose masks are merged."""
    return option(
        16, "--max-windows", min=1, help="Best windows segmented per expression.", panel=REFER
    )


def task() -> Any:
    """``--task`` of evaluate/train: class segmentation or referring expressions."""
    return option(
        "segment",
        "--task",
        help="segment (classes) | refer (referring expressions; docs/REFER.md).",
        panel=DATA,
    )


#: Methods whose model classifies mask proposals (``SegmentationModel.has_proposals``).
PROPOSAL_METHODS = ("dglrsis",)


def proposals() -> Any:
    """``--proposals FILE``: DGL-RSIS's classified proposals as polygons (class, score)."""
    return option(
        None,
        "--proposals",
        help="Also write each mask proposal as a polygon with its class and score "
        "(*." + "/.".join(VECTOR_FORMATS) + "; --method dglrsis; with several inputs a "
        "format, e.g. gpkg: OUTDIR/<scene>_proposals.gpkg).",
        panel=OUTPUTS,
        metavar="FILE",
    )


def check_proposals(proposals: Any, method: str, batch: bool = False) -> str | None:
    """Refuse ``--proposals`` for a method without proposals before any model loads (the
    pipeline checks the model itself too). With several scenes it names a format
    (``gpkg`` or ``.gpkg``), returned as a suffix for ``plan_outputs``; else None."""
    if proposals is None:
        return None
    from drseg_cli.errors import UsageError

    if method not in PROPOSAL_METHODS:
        raise UsageError(
            f"--proposals: --method {method} makes no mask proposals (use --method dglrsis)"
        )
    if not batch:
        return None
    fmt = str(proposals).lstrip(".").lower()
    if fmt not in VECTOR_FORMATS:
        raise UsageError(
            f"--proposals {proposals}: with several inputs give a format ("
            + ", ".join(VECTOR_FORMATS)
            + "); each scene's go to OUTDIR/<scene>_proposals.<format>"
        )
    return f".{fmt}"
