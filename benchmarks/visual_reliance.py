"""Does a checkpoint read its images? Teacher-forced cross-entropy of the answer tokens with each sample's own
images vs with images taken from other samples (the image features permuted across the batch).

Reported separately for the tokens inside ``<p> ... </p>`` (the object and part names: only the images can tell
them) and for all answer tokens. A model that ignores its images scores the same with foreign images (gap ~0);
the larger the gap on phrase tokens, the more the names come from the pixels. Also the greedy accuracy of two
kinds of tokens only the images can tell: a phrase's colour word (in the synthetic data) and the image tags of
the answer, wherever the model's ``answer_order`` puts them. And, for a model with a visual-words head, whether
the colours are in the visual tokens at all: for each image, the share of its grounded phrases' colours among
the head's top |phrases| colour words.

    .venv/bin/python benchmarks/visual_reliance.py runs/tiny/final --data data/synth/val/samples.jsonl \
        --samples 128 --feature-cache .cache/features
"""

from __future__ import annotations

import math

import teacher_forced
import torch
import torch.nn.functional as F

from prima.data.synth_shapes import COLOURS
from prima.model import PrimaModel
from prima.model.losses import IGNORE_INDEX


def phrase_positions(ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """True at the tokens strictly inside a ``<p> ... </p>`` span, row by row."""
    opened = torch.cumsum((ids == start_id).long() - (ids == end_id).long(), dim=1) > 0
    return opened & (ids != start_id)


def token_losses(model: PrimaModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token next-token CE (B, L-1), whether the greedy prediction is right, and the labels."""
    out = model(batch)
    labels = batch["labels"][:, 1:]
    logits = out.logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return ce, logits.argmax(-1) == labels, labels


def main() -> None:
    parser = teacher_forced.options(__doc__, samples=128, batch=16, threads=1)
    parser.add_argument("--seed", type=int, default=0)
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    t = model.config.tokens
    samples = teacher_forced.samples(args)
    gen = torch.Generator().manual_seed(args.seed)
    sums = {k: 0.0 for k in ("own_phrase", "foreign_phrase", "own_all", "foreign_all")}
    counts = {"phrase": 0, "all": 0}
    hits = {k: 0 for k in ("own_colour", "foreign_colour", "own_tag", "foreign_tag")}
    slots = {"colour": 0, "tag": 0}
    visual_rows = []
    colour_ids = torch.tensor([model.processor.tokenizer.convert_tokens_to_ids(c) for c in COLOURS])
    colour_hits = colour_total = 0
    with torch.no_grad():
        for chunk, batch in teacher_forced.batches(samples, args.batch, collate):
            visual = teacher_forced.visual_tokens(model, batch)  # encodes the images if the cache did not
            ce_own, right_own, labels = token_losses(model, batch)
            visual_rows.append(visual)
            if model.visual_words is not None:
                hit, total = head_colour_recall(model, visual, chunk, colour_ids)
                colour_hits, colour_total = colour_hits + hit, colour_total + total
            n = batch["image_features"][0].shape[0]
            perm = torch.randperm(n, generator=gen)
            while n > 1 and bool((perm == torch.arange(n)).any()):  # every image replaced by another one
                perm = torch.randperm(n, generator=gen)
            foreign = dict(batch, image_features=[f[perm] for f in batch["image_features"]])
            ce_foreign, right_foreign, _ = token_losses(model, foreign)
            answer = labels != IGNORE_INDEX
            phrase = phrase_positions(batch["input_ids"][:, 1:], t.phrase_start_id, t.phrase_end_id) & answer
            colour = phrase & torch.isin(labels, colour_ids)  # a colour word inside a phrase (any answer_order)
            tag = answer & torch.isin(labels, torch.tensor(t.image_tag_ids))  # an image tag in the answer
            for name, where in (("colour", colour), ("tag", tag)):
                hits[f"own_{name}"] += int(right_own[where].sum())
                hits[f"foreign_{name}"] += int(right_foreign[where].sum())
                slots[name] += int(where.sum())
            for name, where in (("phrase", phrase), ("all", answer)):
                sums[f"own_{name}"] += float(ce_own[where].sum())
                sums[f"foreign_{name}"] += float(ce_foreign[where].sum())
                counts[name] += int(where.sum())
    print(f"{args.checkpoint}: {len(samples)} samples of {args.data}")
    visual = torch.cat(visual_rows)  # (images, tokens per image, width)
    words = model.language.get_input_embeddings().weight.detach()
    print(
        f"visual tokens: mean norm {float(visual.norm(dim=-1).mean()):.2f} (word embeddings "
        f"{float(words.norm(dim=-1).mean()):.2f}); per-dimension std across images {float(visual.std(0).mean()):.3f}, "
        f"mean |value| {float(visual.abs().mean()):.3f}"
    )
    for name in ("phrase", "all"):
        own, foreign = sums[f"own_{name}"] / counts[name], sums[f"foreign_{name}"] / counts[name]
        print(
            f"{name:>6} tokens ({counts[name]}): CE own images {own:.3f} (ppl {math.exp(own):.2f}), "
            f"foreign images {foreign:.3f} (ppl {math.exp(foreign):.2f}), gap {foreign - own:+.3f}"
        )
    for name, what in (("colour", "colour word in a phrase"), ("tag", "image tag in the answer")):
        n = max(slots[name], 1)
        print(
            f"greedy accuracy, {what} ({slots[name]}): own images {hits[f'own_{name}'] / n:.3f}, "
            f"foreign images {hits[f'foreign_{name}'] / n:.3f}"
        )
    if colour_total:
        print(
            f"visual-words head: {colour_hits / colour_total:.3f} of the grounded phrases' colours ({colour_total}) "
            "are among their image's top |phrases| colour words"
        )


def head_colour_recall(
    model: PrimaModel, visual: torch.Tensor, samples: list, colour_ids: torch.Tensor
) -> tuple[int, int]:
    """(hits, total): per image, the colours its grounded phrases start with vs the visual-words head's top colours."""
    scores = torch.logsumexp(model.visual_words(F.rms_norm(visual, visual.shape[-1:])), dim=1)[:, colour_ids]
    names = list(COLOURS)
    hits = total = offset = 0
    for sample in samples:
        for k in range(len(sample.images)):
            truth = {seg.phrase.split()[0] for seg in sample.segments if seg.image == k + 1} & set(names)
            if truth:
                top = {names[j] for j in scores[offset + k].topk(len(truth)).indices.tolist()}
                hits, total = hits + len(truth & top), total + len(truth)
        offset += len(sample.images)
    return hits, total


if __name__ == "__main__":
    main()
