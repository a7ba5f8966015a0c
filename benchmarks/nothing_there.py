"""Does the image prior's `NothingThere` (`model.image_prior_nowhere`) tell a `difference` answer "Nothing" from one
that names an object, and does it find that object?

"What is in image A but not in image B?": for each `difference` sample (A and B read from the question's words, here
only), on image A: `NothingThere`'s probability of "nowhere" for the samples whose answer has no [SEG] (negatives)
against those with one (positives), as medians and as the AUC (the chance a negative scores above a positive; also
for the odds of its likeliest cell against "nowhere", a negative scoring lower); how
often its likeliest cell, and the answer cells' (`AnswerCells`, where the prior has them), lies inside the answer's
first GT mask; and the mean weight its mixture over the other images gives image B. Teacher-forced on the question
and images alone (what generation reads before a word is written):

    .venv/bin/python benchmarks/nothing_there.py runs/X/final --data data/synth/val-odd/samples.jsonl --samples 600 \
        --feature-cache .cache/features
"""

from __future__ import annotations

import statistics

import teacher_forced
import torch
from difference_probe import QUESTION


def auc(high: list[float], low: list[float]) -> float:
    """The chance that a value of ``high`` exceeds one of ``low`` (ties count half)."""
    return sum((h > lo) + 0.5 * (h == lo) for h in high for lo in low) / (len(high) * len(low))


def main() -> None:
    parser = teacher_forced.options(__doc__, data="data/synth/val-odd/samples.jsonl", samples=600)
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    head = getattr(model.image_prior, "nowhere", None)
    if head is None:
        raise SystemExit(f"{args.checkpoint} has no NothingThere (model.image_prior_nowhere: false)")
    chosen = [s for s in teacher_forced.samples(args) if s.family == "difference"]
    grid = model.config.vision.image_size // model.config.vision.token_stride
    reference = {}
    head.reference.register_forward_hook(lambda _m, _i, out: reference.update(logits=out.squeeze(-1)))
    negatives, positives, found, found_cells, on_b = [], [], 0, 0, []
    odds: dict[bool, list[float]] = {True: [], False: []}  # log(likeliest cell / nowhere) on A, by "has a [SEG]"
    with torch.no_grad():
        for chunk, batch in teacher_forced.batches(chosen, args.batch, collate):
            reading = teacher_forced.prior_reading(model, batch)
            images = batch["num_images"]
            starts = (images.cumsum(0) - images).tolist()
            for s, start, n in zip(chunk, starts, images.tolist()):
                a, b = (int(k) - 1 for k in QUESTION.match(s.question).groups())
                weights = reference["logits"][start : start + n].float().clone()
                weights[a] = float("-inf")  # the mixture for image A runs over the other images
                on_b.append(float(weights.softmax(-1)[b]))
                nowhere = reading.nowhere[start + a]
                odds[bool(s.segments)].append(float(nowhere[:-1].max() - nowhere[-1]))
                if not s.segments:
                    negatives.append(float(nowhere[-1].exp()))
                    continue
                positives.append(float(nowhere[-1].exp()))
                inside = teacher_forced.pooled_mask(s.segments[0].mask, grid)
                found += float(inside[int(nowhere[:-1].argmax())]) > 0
                if reading.cells is not None:
                    found_cells += float(inside[int(reading.cells[start + a, :-1].argmax())]) > 0
    if not negatives or not positives:
        raise SystemExit(
            f"{args.data}: needs `difference` samples with and without a [SEG] in the first {args.samples}"
        )
    print(f"{args.checkpoint}, {len(positives)} positives and {len(negatives)} negatives of `difference`")
    print(
        "| nowhere on A, median: negatives | positives | AUC | AUC by odds | hit: NothingThere | answer cells | weight on B |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    cells = f"{found_cells / len(positives):.3f}" if reading.cells is not None else "-"
    print(
        f"| {statistics.median(negatives):.3f} | {statistics.median(positives):.3f} | {auc(negatives, positives):.3f} "
        f"| {auc(odds[True], odds[False]):.3f} | {found / len(positives):.3f} | {cells} | {statistics.mean(on_b):.3f} |"
    )


if __name__ == "__main__":
    main()
