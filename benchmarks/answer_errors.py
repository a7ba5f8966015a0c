"""Where do the masks go wrong: the image, the object or the mask? A breakdown of a prediction file.

For every GT segment of the synthetic data (phrases "<colour> <object>[’s part]"), the predicted segments on
the same image are sorted into: one with the very same phrase; one that names the same object or part with
another colour; only others. The best IoU with the GT mask is averaged per group. GT segments with no
predicted segment on their image count as "no mask on its image" (a wrong image tag, or a missing phrase).

    .venv/bin/python benchmarks/answer_errors.py data/synth/test/samples.jsonl runs/eval/v9m-test/predictions.jsonl
"""

from __future__ import annotations

import argparse

import numpy as np

from prima.data.schema import read_samples
from prima.errors import PrimaError
from prima.evaluation.metrics import iou_matrix
from prima.evaluation.scorer import read_predictions


def split_colour(phrase: str) -> tuple[str, str]:
    """("red", "chair's seat") for "red chair's seat"."""
    colour, _, rest = phrase.strip().partition(" ")
    return colour, rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="GT samples JSONL")
    parser.add_argument("predictions", help="predictions JSONL (prima eval / prima predict)")
    args = parser.parse_args()
    try:
        predictions = read_predictions(args.predictions)
        samples = read_samples(args.samples)
    except PrimaError as e:  # names the file and line; no traceback
        raise SystemExit(f"answer_errors: error: {e}") from None
    groups: dict[str, list[float]] = {
        "same phrase": [],
        "same object, other colour": [],
        "other objects only": [],
        "no mask on its image": [],
    }
    for sample in samples:
        gt = sample.segments
        if not gt:
            continue
        pred = predictions[sample.id].segments if sample.id in predictions else []
        iou = iou_matrix(pred, gt)  # (0, len(gt)) when nothing was predicted
        for j, g in enumerate(gt):
            here = [i for i, p in enumerate(pred) if p.image == g.image]
            same = [i for i in here if pred[i].phrase == g.phrase]
            recoloured = [
                i for i in here if i not in same and split_colour(pred[i].phrase)[1] == split_colour(g.phrase)[1]
            ]
            if not here:
                groups["no mask on its image"].append(0.0)
            elif same:
                groups["same phrase"].append(max(iou[i, j] for i in same))
            elif recoloured:
                groups["same object, other colour"].append(max(iou[i, j] for i in recoloured))
            else:
                groups["other objects only"].append(max(iou[i, j] for i in here))
    total = sum(len(v) for v in groups.values())
    print(f"{total} GT segments\n| predicted on the GT mask's image | GT segments | mean best IoU |\n|---|---:|---:|")
    for name, values in groups.items():
        print(f"| {name} | {len(values)} | {np.mean(values) if values else 0.0:.3f} |")


if __name__ == "__main__":
    main()
