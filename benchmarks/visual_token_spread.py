"""How much a checkpoint's visual tokens differ between images: spread = norm of the per-dimension std over all
visual tokens / norm of their mean, for the first 10 validation samples (near 0: the LLM sees the same tokens
for every image). Prints the same for the vision encoder's own tokens, for comparison.

    .venv/bin/python benchmarks/visual_token_spread.py runs/tiny/best --data data/synth/val/samples.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prima.data.schema import read_samples
from prima.model import PrimaModel


def spread(rows: torch.Tensor) -> float:
    return float(rows.std(0).norm() / rows.mean(0).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="data/synth/val/samples.jsonl")
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = PrimaModel.from_pretrained(args.checkpoint)
    proc, root = model.processor, Path(args.data).parent
    visual, encoder = [], []
    with torch.no_grad():
        for s in read_samples(args.data, validate=False)[: args.samples]:
            features = model.encode_images(proc.preprocess_images([root / p for p in s.images]))
            qids = torch.tensor([proc.encode_qformer_text(s.question)])
            v = model.visual_tokens(features, torch.zeros(len(s.images), dtype=torch.long), qids)
            visual.append(v.reshape(-1, v.shape[-1]))
            tokens = model.vision.tokens(features)
            encoder.append(tokens.reshape(-1, tokens.shape[-1]))
    print(
        f"visual tokens spread {spread(torch.cat(visual)):.3f}; vision-encoder tokens spread "
        f"{spread(torch.cat(encoder)):.3f}"
    )


if __name__ == "__main__":
    main()
