"""Do the visual tokens say which image is the odd one? A parameter-free read-out for the families whose answer is
the one image that differs from the others (`odd-one-out`: the object's colour; `odd-part`: one part's colour;
`spatial-compare`: the pair's left-right order).

Each image of a sample is one vector, its tokens RMS-normalised and averaged; the image farthest from the mean of
the sample's other images is taken as the odd one, and a sample counts as right when that is its answer image
(the first segment's; chance: the mean of 1 / images). Done for the visual tokens V_i the LLM gets
(question-conditioned, as in training) and for the encoder's grid cells. Nothing is fitted, so it reads what the
tokens already hold, not what a probe could learn:

    prima data synth --out data/synth/val-odd --num 300 --seed 12 --split val --families odd-one-out,odd-part \
        --min-images 3
    .venv/bin/python benchmarks/odd_image.py checkpoints/prima-tiny-synth --data data/synth/val-odd/samples.jsonl \
        --feature-cache .cache/features
"""

from __future__ import annotations

import teacher_forced
import torch
import torch.nn.functional as F

FAMILIES = ("odd-one-out", "odd-part", "spatial-compare")


def farthest(vectors: torch.Tensor) -> int:
    """The row farthest from the mean of the other rows."""
    n = vectors.shape[0]
    others = (vectors.sum(0, keepdim=True) - vectors) / (n - 1)
    return int((vectors - others).norm(dim=-1).argmax())


def main() -> None:
    parser = teacher_forced.options(__doc__, data="data/synth/val-odd/samples.jsonl", samples=100000, batch=16)
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    samples = [s for s in teacher_forced.samples(args) if s.family in FAMILIES and len(s.images) > 1]
    if not samples:
        raise SystemExit(f"odd_image: {args.data} has no samples of {', '.join(FAMILIES)} (see the docstring)")
    found: dict[tuple[str, str], list[float]] = {}  # (family, tokens) -> [right, samples, chance]
    with torch.no_grad():
        for chunk, collated in teacher_forced.batches(samples, args.batch, collate):
            grid = teacher_forced.image_features(model, collated)[model.vision.token_index]
            kinds = {
                "V_i": teacher_forced.visual_tokens(model, collated).float(),
                "encoder cells": grid.float().flatten(2).transpose(1, 2),
            }
            start = 0
            for s in chunk:
                n = len(s.images)
                for kind, tokens in kinds.items():
                    vectors = F.rms_norm(tokens[start : start + n], tokens.shape[-1:]).mean(1)
                    row = found.setdefault((s.family, kind), [0.0, 0.0, 0.0])
                    row[0] += float(farthest(vectors) == s.segments[0].image - 1)
                    row[1] += 1
                    row[2] += 1 / n
                start += n
    print(f"{'family':16} {'tokens':>13}  odd image found  (chance)  samples")
    for (family, kind), (right, n, chance) in sorted(found.items()):
        print(f"{family:16} {kind:>13}  {right / n:15.3f}  ({chance / n:.3f})  {int(n):7d}")


if __name__ == "__main__":
    main()
