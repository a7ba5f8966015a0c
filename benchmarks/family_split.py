"""mIoU, Recall, SS and no-mask accuracy of scored runs over M4Seg-Synth's cross-image families and over the rest.

The families in `prima.data.synth.CROSS_IMAGE_FAMILIES` need a comparison of the images (docs/SYNTH.md); the others
can be answered image by image. The cross-image ablation (docs/RESULTS.md) asks whether a cross-image module helps
the first group. Each number pools the run's `by_family` groups exactly as the scorer pools samples: mIoU and SS
over the samples with masks, Recall over the ground-truth segments, no-mask accuracy over the samples without.

    .venv/bin/python benchmarks/family_split.py runs/eval/ablation-square runs/eval/ablation-none
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prima.data.synth import CROSS_IMAGE_FAMILIES
from prima.errors import PrimaError
from prima.evaluation.report import load_run_metrics, percent

# metric -> the count it is averaged over (metrics.aggregate)
WEIGHTS = {
    "miou": "num_with_masks",
    "recall": "num_gt_segments",
    "ss": "num_with_masks",
    "no_mask_acc": "num_without_masks",
}


def pooled(groups: list[dict]) -> dict[str, float | None]:
    """The metrics of the union of ``groups`` (each an `aggregate` result), and its sample count."""
    out: dict[str, float | None] = {"num_samples": sum(g["num_samples"] for g in groups)}
    for metric, count in WEIGHTS.items():
        total = sum(g[count] for g in groups if g.get(metric) is not None)
        out[metric] = sum(g[metric] * g[count] for g in groups if g.get(metric) is not None) / total if total else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="folders holding a metrics.json with by_family (prima eval / score)")
    args = parser.parse_args()

    by_run = {}
    for run in args.runs:  # every run read before the first line, so a bad one prints no half table
        try:
            by_run[run] = load_run_metrics(run).get("by_family")
        except PrimaError as e:
            raise SystemExit(f"family_split.py: {e}") from None
        if not by_run[run]:
            raise SystemExit(f"family_split.py: {run}: metrics.json has no by_family (its samples carry no family)")

    print("| run | families | N | mIoU | Recall | SS | no-mask acc |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run, families in by_run.items():
        for label, keep in (("cross-image", True), ("image by image", False)):
            split = pooled([m for name, m in families.items() if (name in CROSS_IMAGE_FAMILIES) == keep])
            cells = " | ".join(percent(split[k]) for k in WEIGHTS)
            print(f"| {Path(run).name} | {label} | {split['num_samples']} | {cells} |")
    print(f"\ncross-image families: {', '.join(CROSS_IMAGE_FAMILIES)}")


if __name__ == "__main__":
    main()
