"""How often does the image prior (`model.image_prior`) pick the image an answer starts in, by question family?

For every sample with a [SEG], the image of its first [SEG] (the prior's training target) against the prior's
likeliest image, before any word of the answer is written; with ``--predictions`` (a `prima eval` run's
predictions.jsonl on the same samples) beside the image of the answer's first segment (no segment: wrong), which is
what the LLM and the read-out chose; with the prior's answer cells (`model.image_prior_cells`) also how often their
likeliest cell on that image lies inside the first segment's GT mask (pooled to the cells), their mean probability
of "nowhere" there, and on the images of samples without a [SEG]; with `NothingThere` (`model.image_prior_nowhere`)
also how often the likeliest cell of the distribution the read-out reads (`PrimaModel._answer_cells`: `NothingThere`'s
mixed in, by the learnt `WhichCells` weight or the fixed one) lies inside, and that weight on the first image, its
mean. Teacher-forced on the questions alone, so no
generation runs:

    .venv/bin/python benchmarks/image_prior.py runs/prior/final --data data/synth/val/samples.jsonl \
        --samples 200 --feature-cache .cache/features --predictions runs/eval/prior-val/predictions.jsonl

A training split shows whether the prior fits the families at all (``--data data/synth/train/samples.jsonl``).
"""

from __future__ import annotations

import collections
import json

import teacher_forced
import torch


def pct(x: float, d: float) -> str:
    return f"{100 * x / d:.1f}" if d else "-"


def main() -> None:
    parser = teacher_forced.options(__doc__)
    parser.add_argument("--predictions", default=None, help="predictions.jsonl of the same samples (prima eval)")
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    if model.image_prior is None:
        raise SystemExit(f"{args.checkpoint} has no image prior (model.image_prior: false)")
    answered = {}
    if args.predictions:
        with open(args.predictions) as f:
            for line in f:
                p = json.loads(line)
                answered[p["id"]] = p["segments"][0]["image"] if p.get("segments") else None
    has_cells = model.image_prior.cells is not None
    mixed = has_cells and model.image_prior.nowhere is not None
    learnt = model.config.image_prior_cells_mix and model.image_prior.mix is not None  # else the fixed weight
    grid = model.config.vision.image_size // model.config.vision.token_stride
    # per family: samples with a [SEG], prior right, answer right, cells' likeliest inside the mask, their "nowhere"
    # on the first image summed; samples without one, their "nowhere" (mean over their images) summed; the read-out's
    # likeliest inside the mask and its weight on `NothingThere` there, summed
    counts: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0, 0, 0.0, 0, 0.0, 0, 0.0])
    with torch.no_grad():
        for chunk, batch in teacher_forced.batches(teacher_forced.samples(args), args.batch, collate):
            reading = teacher_forced.prior_reading(model, batch)
            read = model._answer_cells(reading) if mixed else None
            images = batch["num_images"]
            starts = (images.cumsum(0) - images).tolist()
            for s, row, start, n in zip(chunk, reading.logits, starts, images.tolist()):
                c = counts[s.family or "-"]
                if not s.segments:
                    c[5] += 1
                    if has_cells:
                        c[6] += float(reading.cells[start : start + n, -1].exp().mean())
                    continue
                first = s.segments[0].image  # segments are in answer order
                c[0] += 1
                c[1] += int(row.argmax()) + 1 == first
                c[2] += answered.get(s.id) == first
                if has_cells:
                    cells = reading.cells[start + first - 1]
                    inside = teacher_forced.pooled_mask(s.segments[0].mask, grid)
                    c[3] += float(inside[int(cells[:-1].argmax())]) > 0
                    c[4] += float(cells[-1].exp())
                if read is not None:
                    c[7] += float(inside[int(read[start + first - 1, :-1].argmax())]) > 0
                    c[8] += float(reading.mix[start + first - 1]) if learnt else model.config.image_prior_cells_nowhere
    rows = sorted(counts.items())
    rows.append(("all", [sum(c[i] for _, c in rows) for i in range(9)]))
    cells_head = " cells | nowhere, grounded | without [SEG] | nowhere there |" if has_cells else ""
    cells_head += " read-out's cells | weight on NothingThere |" if mixed else ""
    print(f"| family | samples | prior |{' answer |' if answered else ''}{cells_head}")
    rule = ("---:|" if answered else "") + ("---:|" * 4 if has_cells else "") + ("---:|" * 2 if mixed else "")
    print(f"|---|---:|---:|{rule}")
    for family, (n, prior, answer, cells, nowhere, negatives, nowhere_neg, read, weight) in rows:
        extra = f" {pct(answer, n)} |" if answered else ""
        if has_cells:
            extra += f" {pct(cells, n)} | {pct(nowhere, n)} | {negatives} | {pct(nowhere_neg, negatives)} |"
        if mixed:
            extra += f" {pct(read, n)} | {weight / n if n else 0:.2f} |"
        print(f"| {family} | {n} | {pct(prior, n)} |{extra}")


if __name__ == "__main__":
    main()
