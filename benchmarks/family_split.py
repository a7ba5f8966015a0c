"""mIoU, Recall, SS and no-mask accuracy of scored runs over M4Seg-Synth's cross-image families and over the rest.

The families in `prima.data.synth.CROSS_IMAGE_FAMILIES` need a comparison of the images (docs/SYNTH.md); the others
can be answered image by image. The cross-image ablation (docs/RESULTS.md) asks whether a cross-image module helps
the first group. Each number pools the run's `by_family` groups exactly as the scorer pools samples: mIoU and SS
over the samples with masks, Recall over the ground-truth segments, no-mask accuracy over the samples without.
With `--draws`, runs whose folder names differ only by a `-seed<N>` suffix are draws of one configuration
(`SEED=N bash benchmarks/ablation.sh`), and each configuration gets the mean of its draws, lowest and highest.

    .venv/bin/python benchmarks/family_split.py runs/eval/ablation-square runs/eval/ablation-none
    .venv/bin/python benchmarks/family_split.py --draws runs/eval/ablation-square runs/eval/ablation-square-seed1
"""

from __future__ import annotations

import argparse
import re
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
SPLITS = (("cross-image", True), ("image by image", False))


def pooled(groups: list[dict]) -> dict[str, float | None]:
    """The metrics of the union of ``groups`` (each an `aggregate` result), and its sample count."""
    out: dict[str, float | None] = {"num_samples": sum(g["num_samples"] for g in groups)}
    for metric, count in WEIGHTS.items():
        total = sum(g[count] for g in groups if g.get(metric) is not None)
        out[metric] = sum(g[metric] * g[count] for g in groups if g.get(metric) is not None) / total if total else None
    return out


def split(families: dict[str, dict], cross_image: bool) -> dict[str, float | None]:
    """The pooled metrics of the cross-image families (``cross_image``) or of the others."""
    return pooled([m for name, m in families.items() if (name in CROSS_IMAGE_FAMILIES) == cross_image])


def spread(values: list[float | None]) -> str:
    """'mean (lowest-highest)' of the draws' values in percent; '–' if a draw has none."""
    if any(v is None for v in values):
        return "–"
    mean = sum(values) / len(values)
    return percent(mean) if len(values) == 1 else f"{percent(mean)} ({percent(min(values))}-{percent(max(values))})"


def print_draws(metrics: dict[str, dict]) -> None:
    """One row per configuration: overall mIoU / Recall / SS and the two splits' mIoU over its draws."""
    configs: dict[str, list[dict]] = {}
    for run, m in metrics.items():
        configs.setdefault(re.sub(r"-seed\d+$", "", Path(run).name), []).append(m)
    print("| configuration | draws | mIoU | Recall | SS | mIoU, cross-image | mIoU, image by image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, draws in configs.items():
        cells = [spread([m[k] for m in draws]) for k in ("miou", "recall", "ss")]
        cells += [spread([split(m["by_family"], keep)["miou"] for m in draws]) for _, keep in SPLITS]
        print(f"| {name} | {len(draws)} | {' | '.join(cells)} |")
    print("\neach cell: the mean over the draws (lowest-highest)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="folders holding a metrics.json with by_family (prima eval / score)")
    parser.add_argument("--draws", action="store_true", help="the mean over each configuration's -seed<N> draws")
    args = parser.parse_args()

    metrics = {}
    for run in args.runs:  # every run read before the first line, so a bad one prints no half table
        try:
            metrics[run] = load_run_metrics(run)
        except PrimaError as e:
            raise SystemExit(f"family_split.py: {e}") from None
        if not metrics[run].get("by_family"):
            raise SystemExit(f"family_split.py: {run}: metrics.json has no by_family (its samples carry no family)")

    if args.draws:
        print_draws(metrics)
        return
    print("| run | families | N | mIoU | Recall | SS | no-mask acc |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run, m in metrics.items():
        for label, keep in SPLITS:
            part = split(m["by_family"], keep)
            cells = " | ".join(percent(part[k]) for k in WEIGHTS)
            print(f"| {Path(run).name} | {label} | {part['num_samples']} | {cells} |")
    print(f"\ncross-image families: {', '.join(CROSS_IMAGE_FAMILIES)}")


if __name__ == "__main__":
    main()
