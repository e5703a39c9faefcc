"""The standing GPU suite: one command, one JSON (benchmarks/README.md; not a test).

For each backbone (ViT-B/16, ViT-L/14; random weights: the cost does not depend on them),
method (CLIP-only, DR-Seg) and precision (bf16, fp16, fp32):

- model_tiles_per_s: the bare model forward, batch already on the device;
- pipeline_tiles_per_s: ``segment_scene`` end to end on a synthetic scene (read, predict,
  stitch on the device, write COG); efficiency = pipeline / model;
- gflop_per_tile: FLOPs of one forward counted by ``torch.utils.flop_counter`` (matmuls,
  convolutions, attention; PDGR's sparse products are not counted), and pct_peak_bf16 =
  achieved FLOP/s of the bare model / the GPU's dense bf16 peak (``PEAK_BF16_TFLOPS``).

Then the SegEarth-OV protocol as its reference code runs it (mmseg slide inference: whole
image on the device, 224 crops, stride 112, batch 1, fp16, logits summed and divided by the
count) against our pipeline on the same scene (``--method segearth`` at the same tiling, and
the default CLIP-only pipeline), and bf16-vs-fp32 mask agreement on a real scene
(tests/data/RGB.byte.tif, Landsat RGB).

    python benchmarks/gpu_suite.py --out gpu_suite.json            # on a GPU (~minutes)
    python benchmarks/gpu_suite.py --quick --out quick.json        # CPU smoke run (1-2 min)

``--quick`` runs the same steps and writes the same JSON with test-tiny in place of both
backbones, a small scene and the precisions the device has (fp16 needs CUDA): it checks the
suite, not the figures. Targets (issue 17): efficiency >= 0.9, speedup >= 5, >= 40 % of
peak bf16 for CLIP-only, agreement >= 99.5 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import CLASSES, make_scene, model_only  # noqa: E402

from drseg_cli.model.factory import build_model  # noqa: E402
from drseg_cli.pipeline.runtime import TilePredictor, auto_batch_size  # noqa: E402
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene  # noqa: E402

REAL_SCENE = Path(__file__).resolve().parents[1] / "tests" / "data" / "RGB.byte.tif"
#: Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets; the
#: first name found in ``torch.cuda.get_device_name()`` wins (``--peak-tflops`` overrides).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
TARGETS = {
    "efficiency": 0.9,
    "speedup_over_segearth_protocol": 5.0,
    "pct_peak_bf16_clip": 40.0,
    "bf16_fp32_agreement_pct": 99.5,
}


def peak_bf16(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "cpu", override
    name = torch.cuda.get_device_name(device)
    if override:
        return name, override
    return name, next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def count_flops(net, text: torch.Tensor, tile: int, device: torch.device) -> float:
    """FLOPs of one tile's forward (fp32 on ``device``; the count does not depend on it)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, tile, tile, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x, text)
    return float(counter.get_total_flops())


def pipeline_rate(predictor, net, scene: Path, out: Path, batch: int, **config) -> float:
    cfg = SegmentConfig(batch_size=batch, overwrite=True, **config)
    start = time.perf_counter()
    result = segment_scene(
        scene, OutputPlan(out), predictor, CLASSES, cfg,
        tile_multiple=net.preprocess.multiple, default_tile_size=net.preprocess.tile_size,
    )  # fmt: skip
    _sync(predictor.device)
    return result.tiles_run / (time.perf_counter() - start)


def segearth_reference(net, text, scene: Path, device: torch.device, amp) -> float:
    """Seconds for SegEarth-OV's own slide inference of ``scene`` (mmseg ``slide_inference``
    as its ``forward_slide`` runs it): the whole image on the device, 224 crops, stride
    112, batch 1, autocast ``amp``, logits resized to the crop, summed, divided by counts."""
    crop, stride = 224, 112
    start = time.perf_counter()
    with rasterio.open(scene) as ds:
        img = torch.from_numpy(ds.read().astype(np.float32) / 255.0)[None].to(device)
    _, _, h, w = img.shape
    k = text.shape[0]
    preds = torch.zeros((1, k, h, w), device=device)
    count = torch.zeros((1, 1, h, w), device=device)
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    autocast = (
        torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        for r in range(rows):
            for c in range(cols):
                y1, x1 = r * stride, c * stride
                y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                logits = net(img[:, :, y1:y2, x1:x2], text).float()
                logits = F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear")
                preds[:, :, y1:y2, x1:x2] += logits
                count[:, :, y1:y2, x1:x2] += 1
    (preds / count).argmax(1).cpu()
    return time.perf_counter() - start


def agreement(net, device, scene: Path, work: Path, batch: int, low) -> dict:
    """Share of valid pixels whose class is the same under ``low`` autocast as in fp32."""
    masks = {}
    for name, amp in (("fp32", None), ("low", low)):
        predictor = TilePredictor(net, [c.prompt_names for c in CLASSES], device, amp)
        out = work / f"agree_{name}.tif"
        cfg = SegmentConfig(batch_size=batch, overwrite=True)
        segment_scene(
            scene, OutputPlan(out), predictor, CLASSES, cfg,
            tile_multiple=net.preprocess.multiple, default_tile_size=net.preprocess.tile_size,
        )  # fmt: skip
        with rasterio.open(out) as ds:
            masks[name] = ds.read(1)
    valid = masks["fp32"] != 255
    same = (masks["fp32"] == masks["low"]) & valid
    return {
        "scene": str(scene.name),
        "pixels": int(valid.sum()),
        "agreement_pct": round(100.0 * same.sum() / max(int(valid.sum()), 1), 3),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="test-tiny, small scene: CPU smoke run")
    p.add_argument("--device", default="auto")
    p.add_argument("--backbones", default="vit-b16,vit-l14")
    p.add_argument("--methods", default="clip,drseg")
    p.add_argument("--precisions", default="bf16,fp16,fp32")
    p.add_argument("--size", type=int, default=0, help="scene edge px (default 4096; quick 448)")
    p.add_argument("--batch-size", type=int, default=0, help="0: from device memory")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the peak table")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (and print it)")
    args = p.parse_args()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    size = args.size or (448 if args.quick else 4096)
    repeats = 1 if args.quick else args.repeats
    gpu_name, peak = peak_bf16(device, args.peak_tflops)
    report: dict = {
        "device": {
            "type": device.type, "name": gpu_name, "peak_bf16_tflops": peak,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
        "quick": args.quick, "scene_px": size, "weights": "random", "runs": [],
        "targets": TARGETS,
    }  # fmt: skip
    started = time.perf_counter()
    backbones = ["test-tiny"] if args.quick else args.backbones.split(",")
    with tempfile.TemporaryDirectory(prefix="drseg-gpu-suite-") as tmp:
        work = Path(tmp)
        scene = make_scene(work / "scene.tif", size)
        for backbone in backbones:
            for method in args.methods.split(","):
                net = build_model(backbone, method=method, device=str(device), random_weights=True)
                tile = net.preprocess.tile_size
                batch = args.batch_size or (4 if args.quick else auto_batch_size(device, tile))
                text = net.encode_text([c.prompt_names for c in CLASSES]).to(device)
                flops = count_flops(net, text, tile, device)
                for prec in args.precisions.split(","):
                    row = {"backbone": backbone, "method": method, "precision": prec,
                           "tile": tile, "batch_size": batch,
                           "gflop_per_tile": round(flops / 1e9, 3)}  # fmt: skip
                    if prec == "fp16" and device.type != "cuda":
                        report["runs"].append(row | {"skipped": "fp16 needs a CUDA device"})
                        continue
                    amp = PRECISIONS[prec]
                    pred = TilePredictor(net, [c.prompt_names for c in CLASSES], device, amp)
                    pipe = pipeline_rate(pred, net, scene, work / "mask.tif", batch)
                    model = model_only(pred, tile, batch, repeats)
                    achieved = flops * model / 1e12
                    row |= {
                        "model_tiles_per_s": round(model, 3),
                        "pipeline_tiles_per_s": round(pipe, 3),
                        "efficiency": round(pipe / model, 3),
                        "achieved_tflops": round(achieved, 3),
                        "pct_peak_bf16": round(100 * achieved / peak, 2) if peak else None,
                    }
                    report["runs"].append(row)
                    print(json.dumps(row), file=sys.stderr)
                del net
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        # SegEarth-OV's protocol vs ours, same model (segearth = its CLIP block and head)
        clip_backbone = backbones[0]
        net = build_model(clip_backbone, method="segearth", device=str(device), random_weights=True)
        text = net.encode_text([c.prompt_names for c in CLASSES]).to(device)
        ref_amp = torch.float16 if device.type == "cuda" else None  # fp16 needs CUDA
        segearth_reference(net, text, scene, device, ref_amp)  # warm-up
        reference_s = segearth_reference(net, text, scene, device, ref_amp)
        best = torch.bfloat16
        batch = args.batch_size or (4 if args.quick else auto_batch_size(device, 224))
        pred = TilePredictor(net, [c.prompt_names for c in CLASSES], device, best)
        t0 = time.perf_counter()
        pipeline_rate(pred, net, scene, work / "seg.tif", batch, overlap=0.5, blend="flat")
        ours_s = time.perf_counter() - t0
        clip_net = build_model(
            clip_backbone, method="clip", device=str(device), random_weights=True
        )
        pred = TilePredictor(clip_net, [c.prompt_names for c in CLASSES], device, best)
        clip_batch = args.batch_size or (
            4 if args.quick else auto_batch_size(device, clip_net.preprocess.tile_size)
        )
        t0 = time.perf_counter()
        pipeline_rate(pred, clip_net, scene, work / "clip.tif", clip_batch)
        clip_s = time.perf_counter() - t0
        report["segearth_protocol"] = {
            "backbone": clip_backbone,
            "reference": "224 crop, stride 112, batch 1, "
            + ("fp16" if ref_amp is not None else "fp32 (fp16 needs CUDA)")
            + ", uniform averaging, whole image on the device",
            "reference_s": round(reference_s, 3),
            "pipeline_segearth_s": round(ours_s, 3),
            "pipeline_clip_default_s": round(clip_s, 3),
            "speedup_same_tiling": round(reference_s / ours_s, 2),
            "speedup_clip_default": round(reference_s / clip_s, 2),
        }

        low = torch.bfloat16
        batch = args.batch_size or (4 if args.quick else auto_batch_size(device, 448))
        report["bf16_vs_fp32"] = {"backbone": clip_backbone, "method": "clip"} | agreement(
            clip_net, device, REAL_SCENE, work, batch, low
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    clip_rows = [r for r in report["runs"] if r["method"] == "clip" and r["precision"] == "bf16"]
    measured = [r for r in report["runs"] if "efficiency" in r]
    report["summary"] = {
        "min_efficiency": min((r["efficiency"] for r in measured), default=None),
        "speedup_over_segearth_protocol": report["segearth_protocol"]["speedup_same_tiling"],
        "max_pct_peak_bf16_clip": max(
            (r["pct_peak_bf16"] for r in clip_rows if r.get("pct_peak_bf16") is not None),
            default=None,
        ),
        "bf16_fp32_agreement_pct": report["bf16_vs_fp32"]["agreement_pct"],
    }
    text_out = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text_out + "\n")
    print(text_out)


if __name__ == "__main__":
    main()
