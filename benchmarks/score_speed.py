"""Times `score_predictions` on synthetic M4Seg-sized data: N samples x 3 images x 4 segments at 256 px.

The clock covers everything a `prima score` user waits for after start-up: reading both JSONL
files, importing torch/transformers/nltk, loading the phrase model and WordNet, mask metrics on
RLEs, phrase embeddings, METEOR, metrics.json, report and plots. Data generation is not timed.

    .venv/bin/python benchmarks/score_speed.py --samples 10000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from prima.data.masks import encode_rle

COLOURS = "red blue green yellow black white orange purple brown grey pink teal".split()
OBJECTS = "chair mug car house lamp tree table bottle bicycle clock dog boat sofa cup bench kite".split()
PARTS = ["", "'s back", "'s seat", "'s handle", "'s wheels", "'s roof", "'s door", "'s legs", "'s base"]


def phrase_vocabulary(n: int, seed: int) -> list[str]:
    """``n`` distinct phrases like M4Seg's object and part names ("chair", "car's wheels", "red mug's handle")."""
    plain = [f"{o}{p}" for o in OBJECTS for p in PARTS]
    coloured = [f"{c} {x}" for c in COLOURS for x in plain]
    if n > len(plain) + len(coloured):
        raise SystemExit(f"--phrases can be at most {len(plain) + len(coloured)}")
    rnd = random.Random(seed)
    return plain[:n] if n <= len(plain) else plain + rnd.sample(coloured, n - len(plain))


def shape_pair(rng: np.random.Generator, size: int) -> tuple[dict, dict]:
    """A random rectangle or ellipse (GT) and a jittered copy of it (prediction), as RLEs."""
    yy, xx = np.ogrid[0:size, 0:size]
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    hy, hx = rng.uniform(0.05, 0.25, 2) * size
    jitter = rng.normal(0, 0.08 * size, 4)
    masks = []
    for j in (np.zeros(4), jitter):
        ay, ax, by, bx = cy + j[0], cx + j[1], max(hy + j[2], 2), max(hx + j[3], 2)
        if rng.random() < 0.5:
            m = (np.abs(yy - ay) <= by) & (np.abs(xx - ax) <= bx)
        else:
            m = ((yy - ay) / by) ** 2 + ((xx - ax) / bx) ** 2 <= 1
        masks.append(encode_rle(m))
    return masks[0], masks[1]


def make_data(
    folder: Path, samples: int, images: int, segments: int, size: int, phrases: int, seed: int
) -> tuple[Path, Path]:
    """Write gt.jsonl and pred.jsonl; predictions jitter masks and name a third of them differently."""
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    vocabulary = phrase_vocabulary(phrases, seed)
    pool = [shape_pair(rng, size) for _ in range(1000)]  # reused shapes: generation stays quick
    categories = ("functional", "spatial", "numerical", "open-ended")
    gt_path, pred_path = folder / "gt.jsonl", folder / "pred.jsonl"
    with gt_path.open("w") as gt_f, pred_path.open("w") as pred_f:
        for n in range(samples):
            gt_segs, pred_segs, gt_text, pred_text = [], [], [], []
            for _ in range(segments):
                image = rnd.randint(1, images)
                g, p = rnd.choice(pool)
                gp = rnd.choice(vocabulary)
                pp = gp if rnd.random() < 0.67 else rnd.choice(vocabulary)
                gt_segs.append({"phrase": gp, "image": image, "mask": g})
                pred_segs.append({"phrase": pp, "image": image, "score": 0.9, "mask": p})
                gt_text.append(f"the <p> {gp} </p> [SEG] (IMAGE{image})")
                pred_text.append(f"a <p> {pp} </p> [SEG] (IMAGE{image})")
            gt = {
                "id": f"bench-{n:06d}",
                "images": [f"images/{n:06d}_{k}.png" for k in range(1, images + 1)],
                "question": "Which objects could you use together, and where are they?",
                "answer": "You could use " + ", ".join(gt_text) + " together in these images.",
                "category": categories[n % 4],
                "segments": gt_segs,
            }
            pred = {"id": gt["id"], "answer": "I would use " + " and ".join(pred_text) + ".", "segments": pred_segs}
            gt_f.write(json.dumps(gt) + "\n")
            pred_f.write(json.dumps(pred) + "\n")
    return pred_path, gt_path


def breakdown(pred: Path, gt: Path, wordnet: str) -> None:
    """CPU seconds of each stage of scoring, done one after the other (what `score_predictions` does)."""
    stages: list[tuple[str, float]] = []
    clock = time.process_time()

    def stage(name: str) -> None:
        nonlocal clock
        now = time.process_time()
        stages.append((name, now - clock))
        clock = now

    import nltk.translate.meteor_score  # noqa: F401

    from prima.data.schema import read_samples
    from prima.evaluation.report import write_outputs
    from prima.evaluation.scorer import M4SegEvaluator, read_predictions
    from prima.evaluation.wordnet import load_wordnet

    stage("import prima.evaluation + nltk")
    preds = read_predictions(pred)
    gts = read_samples(gt, check_images=False)
    stage("read + check both JSONL files")
    resources = load_wordnet(wordnet)
    stage("load WordNet")
    from prima.evaluation.similarity import PhraseEmbedder

    embedder = PhraseEmbedder()
    embedder._load()
    stage("import torch/transformers + load the phrase model")
    evaluator = M4SegEvaluator(embedder, wordnet=resources)
    for sample in gts:
        evaluator.process(sample, preds.get(sample.id))
    stage("masks (IoU, I/U) + METEOR, per sample")
    result = evaluator.evaluate()
    stage(f"embed {len(embedder._cache)} distinct phrases + phrase metrics + aggregation")
    write_outputs(result, pred.parent / "out-breakdown")
    stage("metrics.json, report.md, plots")
    for name, seconds in stages:
        print(f"  {seconds:6.1f} s  {name}")
    print(f"  {sum(s for _, s in stages):6.1f} s  total CPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--phrases", type=int, default=500, help="distinct phrases the data draws from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wordnet", default="auto", help="auto, none or a folder (as prima score --wordnet)")
    parser.add_argument("--breakdown", action="store_true", help="CPU seconds per stage instead of one timing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="prima-score-bench-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        pred, gt = make_data(folder, args.samples, args.images, args.segments, args.size, args.phrases, args.seed)
        print(f"generated {args.samples} samples in {time.perf_counter() - t:.1f} s (not timed below)")
        assert "torch" not in sys.modules, "torch must load inside the timed call"
        if args.breakdown:
            breakdown(pred, gt, args.wordnet)
            return 0

        load_before = os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        from prima.evaluation.scorer import score_predictions

        result = score_predictions(pred, gt, folder / "out", wordnet=args.wordnet)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        load_after = os.getloadavg()[0]

    print(
        f"scored {result['num_samples']} samples x {args.images} images x {args.segments} segments at "
        f"{args.size} px in {seconds:.1f} s ({result['num_samples'] / seconds:.0f} samples/s), "
        "imports, phrase model and WordNet loading included"
    )
    # The machine is shared: CPU time says what the scorer costs, wall time what this run waited.
    print(
        f"process CPU time {cpu_seconds:.1f} s (all threads); 1-min load average {load_before:.1f} before, "
        f"{load_after:.1f} after, on {os.cpu_count()} cores"
    )
    print(f"distinct phrases: {args.phrases} in the vocabulary; phrase model: {result['phrase_model']}")
    print(f"METEOR: {result['meteor_resources']}")
    print("miou={miou:.4f} recall={recall:.4f} ss={ss:.4f} meteor={meteor:.4f} giou={giou:.4f}".format(**result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
