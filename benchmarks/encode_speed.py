"""Frozen EfficientNet-Lite0 feature extraction speed (images/s) on this CPU: the tiny preset's encoder as built
(channels-last) against the same weights in the default contiguous layout, on the same preprocessed batch.

    .venv/bin/python benchmarks/encode_speed.py --images data/synth/val/images --num 128 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from prima.model import create_model, load_model_config


def images_per_second(encode, pixels: torch.Tensor, repeats: int) -> float:
    encode(pixels[:8])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encode(pixels)
        best = min(best, time.perf_counter() - start)
    return len(pixels) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="data/synth/val/images", help="a folder of PNG images")
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(load_model_config("tiny"), ["a b"]).eval()
    paths = sorted(Path(args.images).glob("*.png"))[: args.num]
    start = time.perf_counter()
    pixels = model.processor.preprocess_images(paths)
    prep = len(paths) / (time.perf_counter() - start)
    with torch.inference_mode():
        built = images_per_second(model.vision, pixels, args.repeats)
        vision = model.vision.to(memory_format=torch.contiguous_format)

        def contiguous_forward(x: torch.Tensor) -> torch.Tensor:  # the encoder's forward without the layout change
            x = vision.stem(x.contiguous())
            for block in vision.blocks:
                x = block(x)
            return x

        contiguous = images_per_second(contiguous_forward, pixels, args.repeats)
    print(
        f"{len(paths)} images at {pixels.shape[-1]} px, {args.threads} threads, load {os.getloadavg()[0]:.1f}: "
        f"preprocessing {prep:.0f} img/s; encoder channels-last {built:.0f} img/s, contiguous {contiguous:.0f} img/s"
    )


if __name__ == "__main__":
    main()
