"""DR-Seg per-tile time of the default preset vs the CPU preset, in one run (not a test).

Full-size backbones with random weights (the cost does not depend on the weights), built
through ``build_model`` exactly as ``drseg segment`` builds them; one 448 px tile a forward,
K = 8 classes. The presets' forwards alternate (A, B, A, B, ...) so that a shared machine's
load hits both alike; the ratio of medians is the figure.

    python benchmarks/cpu_preset.py --repeats 3 [--presets vit-b16,vit-b16-cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from drseg_cli.model.factory import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="vit-b16,vit-b16-cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tile", type=int, default=448)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.presets.split(",")
    torch.manual_seed(0)
    models = {n: build_model(n, method="drseg", random_weights=True) for n in names}
    texts = {
        n: m.encode_text([[f"class {i}"] for i in range(args.classes)]) for n, m in models.items()
    }
    x = torch.rand(1, 3, args.tile, args.tile)
    times: dict[str, list[float]] = {n: [] for n in names}
    stages: dict[str, list[dict]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            models[n](x, texts[n])
        for _ in range(args.repeats):
            for n in names:
                timings: dict[str, float] = {}
                start = time.perf_counter()
                models[n].forward_details(x, texts[n], timings=timings)
                times[n].append(time.perf_counter() - start)
                stages[n].append(timings)
    out = {
        "threads": torch.get_num_threads(),
        "tile": args.tile,
        "repeats": args.repeats,
        "ms_per_tile": {n: round(1000 * statistics.median(t), 1) for n, t in times.items()},
        "stages_ms": {
            n: {k: round(1000 * statistics.median(s[k] for s in st), 1) for k in st[0]}
            for n, st in stages.items()
        },
    }
    base = out["ms_per_tile"][names[0]]
    out["speedup_over_" + names[0]] = {
        n: round(base / ms, 2) for n, ms in out["ms_per_tile"].items()
    }
    print(json.dumps(out, indent=2) if args.json else out)


if __name__ == "__main__":
    main()
