"""The search of ``drseg tune``: DR-Seg's cheap parameters scored by mIoU from cached features.

A configuration is one value per searched parameter (``SPACE``, or the user's values). The
scorer runs DR-Seg's own head (``DRSegModel.forward_from_features``) on each image's cached
features for every configuration still in the race, one image in memory at a time, and adds
the predictions to one confusion matrix per configuration; the pixels are classified exactly
as ``drseg evaluate`` classifies them (resampled to the tile, ``finalize_logits``).

``halving`` (default): successive halving over ``budget`` configurations drawn at random from
the grid (the defaults always among them): all are scored on the first images, the better
half goes on to twice as many images, and so on until the whole set; the defaults are always
carried to the end, so the best configuration scored on every image is at least as good as
them. ``grid``: every configuration (at most ``budget``, drawn at random) on every image.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from drseg_cli.errors import UsageError
from drseg_cli.evaluate.metrics import ConfusionMatrix, SegMetrics
from drseg_cli.model.drseg import DRSegModel, DRSegOptions, resize
from drseg_cli.raster.stitch import ClassRule, finalize_logits
from drseg_cli.tune.features import FeatureCache

SEARCHES = ("halving", "grid")

#: The default search space: DR-Seg's defaults (docs/METHOD.md) and values around them.
#: ``threshold`` is searched only when the background class is one of the dataset's classes.
SPACE: dict[str, tuple] = {
    "rho": (0.3, 0.5, 0.7, 0.9),
    "k": (8, 16, 32),
    "window": (2, 3, 4),
    "tau": (0.05, 0.1, 0.2),
    "alpha": (0.5, 0.8, 0.95),
    "steps": (5, 10, 20),
    "gamma": (0.1, 0.2, 0.5),
    "clip_baseline": ("clearclip", "segearth"),
    "threshold": (0.0, 0.3, 0.5),
}
_TYPES = {"k": int, "window": int, "steps": int, "clip_baseline": str}


def parse_param(text: str) -> tuple[str, tuple]:
    """``NAME=V1,V2,...`` (``--param``) → the values searched for NAME."""
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in SPACE:
        raise UsageError(
            f"--param {text!r}: expected NAME=V1,V2,... with NAME one of {', '.join(SPACE)}"
        )
    kind = _TYPES.get(name, float)
    try:
        parsed = tuple(kind(v.strip()) for v in values.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--param {text!r}: values must be {kind.__name__}s") from None
    if not parsed:
        raise UsageError(f"--param {text!r}: give at least one value")
    return name, tuple(dict.fromkeys(parsed))


@dataclass
class Trial:
    """One configuration and how far it went: its mIoU on the first ``images`` images."""

    params: dict
    is_default: bool = False
    images: int = 0
    rung: int = 0
    miou: float = float("nan")
    macc: float = float("nan")
    first_miou: float = float("nan")  # on the first rung's images (all trials alike)
    confusion: ConfusionMatrix | None = field(default=None, repr=False)

    def row(self) -> dict:
        """The trial as a flat record (``trials.csv``/``--json``)."""
        return {
            **self.params,
            "miou": round(self.miou, 4),
            "macc": round(self.macc, 4),
            "first_rung_miou": round(self.first_miou, 4),
            "images": self.images,
            "rung": self.rung,
            "default": self.is_default,
        }


def default_params(space: dict[str, tuple], base: DRSegOptions, threshold: float) -> dict:
    """The configuration of today's defaults (``base`` options, ``threshold``)."""
    values = base.as_dict() | {"threshold": threshold}
    return {name: values[name] for name in space}


def sample_configurations(
    space: dict[str, tuple], budget: int, defaults: dict, seed: int
) -> list[dict]:
    """``budget`` distinct configurations of the grid, drawn at random; the defaults first."""
    names = list(space)
    size = math.prod(len(v) for v in space.values())
    rng = random.Random(seed)
    chosen = [defaults]
    seen = {tuple(defaults[n] for n in names)}
    if size <= 4 * budget:  # small grid: shuffle it whole
        grid = list(itertools.product(*space.values()))
        rng.shuffle(grid)
        candidates = iter(grid)
    else:
        candidates = (tuple(rng.choice(space[n]) for n in names) for _ in itertools.count())
    for combo in candidates:
        if len(chosen) >= budget or len(seen) >= size:
            break
        if combo not in seen:
            seen.add(combo)
            chosen.append(dict(zip(names, combo, strict=True)))
    return chosen


class Scorer:
    """Scores configurations from cached features, exactly as ``evaluate`` classifies pixels.

    ``models`` by CLIP baseline (their options are the base the configurations override);
    ``texts`` the class embeddings of each; ``background`` the class index of pixels below a
    configuration's threshold.
    """

    def __init__(
        self,
        cache: FeatureCache,
        models: dict[str, DRSegModel],
        texts: dict[str, torch.Tensor],
        base: DRSegOptions,
        *,
        background: int | None,
        device: torch.device,
    ) -> None:
        self.cache, self.models, self.texts, self.base = cache, models, texts, base
        self.background, self.device = background, device
        self.k = next(iter(texts.values())).shape[0]

    def options(self, params: dict) -> DRSegOptions:
        """The DR-Seg options of a configuration (a bad value: one-line UsageError)."""
        return replace(self.base, **{k: v for k, v in params.items() if k != "threshold"})

    def rule(self, params: dict) -> ClassRule:
        threshold = float(params.get("threshold", 0.0))
        if not threshold or self.background is None:
            return ClassRule()
        return ClassRule(threshold, self.background)

    def score(self, trials: Sequence[Trial], start: int, stop: int) -> None:
        """Add images ``[start, stop)`` to each trial's confusion matrix."""
        samples = self.cache.dataset.samples[start:stop]
        opts = [self.options(t.params) for t in trials]
        baselines = sorted({o.clip_baseline for o in opts})
        ignore = self.cache.dataset.ignore_index
        for t in trials:
            if t.confusion is None:
                t.confusion = ConfusionMatrix(self.k, ignore)
        size = self.cache.tile_size
        for sample in samples:
            feats = self.cache.load(sample, baselines)
            guide = torch.from_numpy(feats.dino).to(self.device)
            units = {b: torch.from_numpy(feats.clip[b]).to(self.device) for b in baselines}
            for trial, opt in zip(trials, opts, strict=True):
                model = self.models[opt.clip_baseline]
                with torch.inference_mode():
                    out = model.forward_from_features(
                        units[opt.clip_baseline],
                        guide,
                        self.texts[opt.clip_baseline],
                        (size, size),
                        options=opt,
                    )
                    logits = resize(out.logits.float(), (size, size)).cpu().numpy()
                rule = self.rule(trial.params)
                for t, (y0, x0, y1, x1) in enumerate(feats.windows):
                    valid = feats.valid[t, y0:y1, x0:x1]
                    pred, _ = finalize_logits(logits[t][:, y0:y1, x0:x1], valid, rule)
                    trial.confusion.update(feats.gt[t, y0:y1, x0:x1], pred, valid)
            for trial in trials:
                trial.images += 1

    def finish(self, trials: Sequence[Trial], names: Sequence[str], absent: str) -> None:
        for t in trials:
            m = SegMetrics.from_confusion(t.confusion, names, absent)
            t.miou, t.macc = _num(m.miou), _num(m.macc)


def _num(v: float) -> float:
    return float("nan") if v is None or math.isnan(v) else float(v)


def run_search(
    scorer: Scorer,
    configurations: list[dict],
    class_names: Sequence[str],
    *,
    method: str = "halving",
    absent_classes: str = "count",
    progress: Callable[[int, int], None] | None = None,
) -> list[Trial]:
    """Score ``configurations`` (the first is the defaults) by ``method`` (module docstring).

    Returns every trial, best first (most images scored, then mIoU).
    """
    if method not in SEARCHES:
        raise UsageError(f"--search {method!r}: choose one of {', '.join(SEARCHES)}")
    trials = [Trial(p, is_default=(i == 0)) for i, p in enumerate(configurations)]
    for t in trials:
        scorer.options(t.params)  # a bad value fails before any scoring
    n_images = len(scorer.cache.dataset.samples)
    if method == "grid" or len(trials) == 1 or n_images == 1:
        rungs = 1
    else:
        rungs = max(1, min(math.ceil(math.log2(len(trials))), int(math.log2(n_images))) + 1)
    plan = [math.ceil(n_images / 2 ** (rungs - 1 - r)) for r in range(rungs)]
    total = sum(
        (stop - start) * math.ceil(len(trials) / 2**r)
        for r, (start, stop) in enumerate(zip([0, *plan], plan, strict=False))
    )
    alive, done = trials, 0
    start = 0
    for r, stop in enumerate(plan):
        for t in alive:
            t.rung = r
        for i in range(start, stop):  # one image at a time, for the progress bar
            scorer.score(alive, i, i + 1)
            done += len(alive)
            if progress:
                progress(len(alive), total)
        scorer.finish(alive, class_names, absent_classes)
        if r == 0:
            for t in alive:
                t.first_miou = t.miou
        start = stop
        if r < len(plan) - 1:
            ranked = sorted(alive, key=_rank)
            keep = ranked[: math.ceil(len(alive) / 2)]
            alive = keep + [t for t in ranked[len(keep) :] if t.is_default]
    for t in trials:
        t.confusion = None
    return sorted(trials, key=lambda t: (-t.images, _rank(t)))


def _rank(t: Trial) -> tuple:
    return (-t.miou if not math.isnan(t.miou) else math.inf,)


def influence(trials: Sequence[Trial], names: Sequence[str]) -> list[tuple[str, float]]:
    """Parameters by influence: the spread (max − min) of the mean first-rung mIoU over each
    parameter's values (every trial is scored on those images); the most influential first."""
    scored = [t for t in trials if not math.isnan(t.first_miou)]
    out = []
    for name in names:
        by_value: dict = {}
        for t in scored:
            by_value.setdefault(t.params[name], []).append(t.first_miou)
        means = [float(np.mean(v)) for v in by_value.values()]
        out.append((name, max(means) - min(means) if len(means) > 1 else 0.0))
    return sorted(out, key=lambda x: -x[1])
