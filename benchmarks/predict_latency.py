"""Inference latency: cold start to first answer, and warm latency per query (3 images at 256 px by default).

Cold start is the wall time of a fresh ``python -m prima predict`` process (imports, checkpoint load, image
loading, one answer, overlays and JSON written), measured from outside. Warm latency is `PrimaPredictor.predict`
on an already loaded model, repeated; the answer length is reported with it because generation time grows with
the number of tokens (an untrained model rarely stops before ``max_new_tokens``, a trained one does).

    .venv/bin/python benchmarks/predict_latency.py                      # the bundled checkpoint
    .venv/bin/python benchmarks/predict_latency.py --random-tiny        # a random model of configs/tiny.yaml
    .venv/bin/python benchmarks/predict_latency.py --checkpoint DIR --repeats 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "common"  # three 256 px scenes
QUESTION = "Which object appears in every image?"


def build_random_tiny(folder: Path) -> Path:
    """A randomly initialised model of configs/tiny.yaml, saved like a real checkpoint."""
    import torch

    from prima.model import create_model, load_model_config

    torch.manual_seed(0)
    texts = [f"{QUESTION} A <p> chair </p> [SEG] (IMAGE1) appears in every image."]
    create_model(load_model_config("tiny"), texts).save_pretrained(folder)
    return folder


def scene_images(count: int, size: int) -> list[Path]:
    """``count`` example images at ``size`` px (the example scenes, resized and cycled when needed)."""
    from PIL import Image

    sources = sorted(EXAMPLE.glob("image*.png"))
    out_dir = Path(tempfile.mkdtemp(prefix="prima-bench-"))
    paths = []
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as im:
            p = out_dir / f"image{i + 1}.png"
            im.convert("RGB").resize((size, size)).save(p)
            paths.append(p)
    return paths


def cold_start(checkpoint: Path, images: list[Path], device: str, threads: int | None) -> float:
    out = Path(tempfile.mkdtemp(prefix="prima-bench-out-"))
    cmd = [sys.executable, "-m", "prima", "predict", "--images", *map(str, images), "--question", QUESTION]
    cmd += ["--checkpoint", str(checkpoint), "--out", str(out), "--device", device]
    cmd += ["--threads", str(threads)] if threads else []
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"cold-start run failed:\n{done.stderr}")
    return seconds


def warm_latency(checkpoint: Path, images: list[Path], device: str, repeats: int) -> dict:
    from prima.inference.predictor import PrimaPredictor

    start = time.perf_counter()
    predictor = PrimaPredictor.from_pretrained(checkpoint, device=device)
    load_s = time.perf_counter() - start
    generated = []  # the model's raw outputs, to report how many tokens each answer took
    generate = predictor.model.generate
    predictor.model.generate = lambda *a, **k: generated.append(generate(*a, **k)) or generated[-1]
    loaded = predictor.load(images)
    predictor.predict_loaded(loaded, QUESTION)  # warm-up: first-call allocations and kernel selection
    times, tokens = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = predictor.predict_loaded(loaded, QUESTION)
        times.append(time.perf_counter() - t0)
        tokens.append(len(getattr(generated[-1], "token_ids", []) or []))
    return {
        "load_s": load_s,
        "warm_median_s": statistics.median(times),
        "warm_mean_s": statistics.fmean(times),
        "warm_min_s": min(times),
        "warm_max_s": max(times),
        "answer_tokens": tokens,
        "segments": len(out.segments),
        "answer": out.answer[:200],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, default=None, help="default: checkpoints/prima-tiny-synth")
    which.add_argument("--random-tiny", action="store_true", help="benchmark a random model of configs/tiny.yaml")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--skip-cold", action="store_true", help="only the warm latency")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    if args.random_tiny:
        checkpoint, label = build_random_tiny(Path(tempfile.mkdtemp(prefix="prima-random-tiny-"))), "random tiny"
    else:
        checkpoint = args.checkpoint or REPO / "checkpoints" / "prima-tiny-synth"
        label = str(checkpoint)
        if not checkpoint.is_dir():
            sys.exit(f"no checkpoint at {checkpoint}; pass --checkpoint DIR or --random-tiny")
    images = scene_images(args.images, args.size)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    result = {
        "checkpoint": label,
        "images": args.images,
        "size": args.size,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
    }
    if not args.skip_cold:
        result["cold_start_s"] = cold_start(checkpoint, images, args.device, args.threads)
    result.update(warm_latency(checkpoint, images, args.device, args.repeats))
    result["load_average_1min_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
