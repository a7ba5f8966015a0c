"""Do the frozen encoder's features know an object's colour and category? Linear probes per feature scale.

For every object segment of the synthetic data (phrase "<colour> <category>"), the features of each EfficientNet
scale (strides 2..32) are averaged under the object's GT mask; a linear classifier (Adam, 300 full-batch steps)
is fit on the segments of the first ``--fit`` samples and scored on those of the next ``--test`` samples. A scale
that scores high carries what the language model needs to name the object; a low score there means no amount of
training downstream can recover it.

    .venv/bin/python benchmarks/feature_probe.py runs/tiny/final --feature-cache .cache/features
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prima.data.masks import decode_rle
from prima.model import PrimaModel
from prima.train.data import load_samples
from prima.train.run import make_feature_cache


def pooled(model, cache, samples) -> list[tuple[str, str, list[torch.Tensor]]]:
    """(colour, category, per-scale mask-averaged feature) for every object segment."""
    proc = model.processor

    def compute(paths: list[str]) -> list[list[torch.Tensor]]:
        with torch.no_grad():
            feats = model.encode_images(proc.preprocess_images(paths))
        return [[f[i] for f in feats] for i in range(len(paths))]

    out = []
    for s in samples:
        paths = list(s.images)
        features = cache.features(paths, compute) if cache else compute(paths)
        for g in s.segments:
            words = g.phrase.split()
            if g.kind != "object" or len(words) != 2:
                continue
            mask = torch.from_numpy(decode_rle(g.mask).astype(np.float32))[None, None]
            vec = []
            for f in features[g.image - 1]:
                m = F.adaptive_avg_pool2d(mask, f.shape[-2:])[0, 0]
                vec.append((f.float() * m).sum((-1, -2)) / m.sum().clamp(min=1e-3))
            out.append((words[0], words[1], vec))
    return out


def probe(train, test, task: int, scale: int) -> tuple[float, int]:
    names = sorted({r[task] for r in train})
    index = {n: i for i, n in enumerate(names)}
    x = torch.stack([r[2][scale] for r in train])
    y = torch.tensor([index[r[task]] for r in train])
    kept = [r for r in test if r[task] in index]
    xt = torch.stack([r[2][scale] for r in kept])
    yt = torch.tensor([index[r[task]] for r in kept])
    mean, std = x.mean(0), x.std(0) + 1e-4
    x, xt = (x - mean) / std, (xt - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], len(names))
    opt = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(linear(x), y).backward()
        opt.step()
    with torch.no_grad():
        return float((linear(xt).argmax(1) == yt).float().mean()), len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="any checkpoint of the preset (only its frozen encoder is used)")
    parser.add_argument("--data", default="data/synth/train/samples.jsonl")
    parser.add_argument("--fit", type=int, default=1500)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--feature-cache", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = PrimaModel.from_pretrained(args.checkpoint).eval()
    cache = make_feature_cache(model, args.feature_cache) if args.feature_cache else None
    samples = load_samples(args.data, limit=args.fit + args.test)
    train, test = pooled(model, cache, samples[: args.fit]), pooled(model, cache, samples[args.fit :])
    print(f"{Path(args.data)}: {len(train)} object segments to fit, {len(test)} to test")
    print("| stride | channels | colour accuracy | category accuracy |\n|---:|---:|---:|---:|")
    for scale, stride in enumerate(model.vision.strides):
        colour, nc = probe(train, test, 0, scale)
        category, nk = probe(train, test, 1, scale)
        print(f"| {stride} | {train[0][2][scale].shape[0]} | {colour:.3f} ({nc} colours) | {category:.3f} ({nk}) |")


if __name__ == "__main__":
    main()
