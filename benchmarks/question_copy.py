"""Does the LLM copy what the question says? Teacher-forced, on two answer words the question alone decides.

- **direction**: in the synthetic `spatial` and `spatial-compare` families the answer's first "left" / "right" is
  the question's ("What is to the left of the tree in image 1?" -> "The ... is to the left of the ...").
- **named image**: where the question names an image ("... in image 2?", "What is in image 1 but not in image
  3?"), the answer's first image tag is that image's.

For each it reports how often the LLM, given the reference answer up to that word, ranks the right word above
the wrong ones (direction: the other direction; named image: the other images of the sample) and the mean
probability it gives the right one; for the direction also how far P(left | left or right) moves when the
question's direction is swapped (answer unchanged): 0 for an LLM that does not read it, near 1 for one that copies
it; and the largest change of any answer logit with that swap, which shows whether the rest of the answer reads
it. Samples where a rule does not hold are counted and left out. It also prints the cosine similarity of the LLM's
input embeddings for the words it must tell apart: with tied input and output embeddings, words the answer uses in
the same places (left / right, the image tags, the digits of "image k") are pulled together by the output layer
(docs/MODEL.md, "Copying from the question").

    .venv/bin/python benchmarks/question_copy.py checkpoints/prima-tiny-synth --data data/synth/test/samples.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re

import torch

from prima.data.synth_shapes import COLOURS
from prima.model import PrimaModel
from prima.model.losses import IGNORE_INDEX
from prima.train.data import load_samples
from prima.train.run import TrainCollator

DIRECTION_FAMILIES = ("spatial", "spatial-compare")
_DIRECTION_RE = re.compile(r"\b(left|right)\b")
_NAMED_IMAGE_RE = re.compile(r"\b[Ii]mage (\d+)\b")


def swap_direction(question: str) -> str:
    return _DIRECTION_RE.sub(lambda m: "right" if m.group(1) == "left" else "left", question)


def mean_pairwise_cosine(rows: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(rows.float(), dim=-1)
    pairs = list(itertools.combinations(range(len(rows)), 2))
    return sum(float(unit[i] @ unit[j]) for i, j in pairs) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="data/synth/test/samples.jsonl")
    parser.add_argument("--samples", type=int, default=None, help="only the first N samples of the file")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = PrimaModel.from_pretrained(args.checkpoint).eval()
    tok, t = model.processor.tokenizer, model.config.tokens
    words = model.language.get_input_embeddings().weight.detach()
    left, right = tok.convert_tokens_to_ids("left"), tok.convert_tokens_to_ids("right")
    tags = torch.tensor(t.image_tag_ids)
    collate = TrainCollator(model, None)

    samples = []  # (sample, the right direction or None, the named image or None)
    skipped = 0
    for s in load_samples(args.data, limit=args.samples):
        direction = image = None
        if s.family in DIRECTION_FAMILIES:
            q, a = _DIRECTION_RE.search(s.question), _DIRECTION_RE.search(s.answer)
            if q and a and q.group(1) == a.group(1):
                direction = q.group(1)
            else:
                skipped += 1
        named = _NAMED_IMAGE_RE.search(s.question)
        if named and s.segments:
            if s.segments[0].image == int(named.group(1)):
                image = int(named.group(1))
            else:
                skipped += 1
        if direction or image:
            samples.append((s, direction, image))

    hits = {"direction": [], "image": []}  # (ranked right, probability of the right word)
    moved = []  # |change of P(left | left or right)| when the question's direction is swapped
    largest = 0.0  # the largest change of any answer logit with the swap: is the question read at all?
    with torch.no_grad():
        for i in range(0, len(samples), args.batch):
            chunk = samples[i : i + args.batch]
            batch = collate([s for s, _, _ in chunk])
            labels = batch["labels"][:, 1:]
            logits = model(batch).logits[:, :-1].float()
            probs = logits.softmax(-1)
            if any(direction for _, direction, _ in chunk):  # the same questions again, left and right swapped
                swapped = [dataclasses.replace(s, question=swap_direction(s.question)) for s, _, _ in chunk]
                logits_swapped = model(collate(swapped)).logits[:, :-1].float()
                probs_swapped = logits_swapped.softmax(-1)
            for row, (s, direction, image) in enumerate(chunk):
                answer = labels[row] != IGNORE_INDEX
                if direction:
                    pos = int((answer & ((labels[row] == left) | (labels[row] == right))).nonzero()[0])
                    want, other = (left, right) if direction == "left" else (right, left)
                    p = probs[row, pos]
                    hits["direction"].append((bool(p[want] > p[other]), float(p[want])))
                    q = probs_swapped[row, pos]
                    moved.append(abs(float(p[left] / (p[left] + p[right]) - q[left] / (q[left] + q[right]))))
                    largest = max(largest, float((logits[row] - logits_swapped[row])[answer].abs().max()))
                if image:
                    pos = int((answer & torch.isin(labels[row], tags)).nonzero()[0])
                    p = probs[row, pos, tags[: len(s.images)]]
                    hits["image"].append((int(p.argmax()) == image - 1, float(p[image - 1])))

    print(f"{args.checkpoint}: {len(samples)} samples of {args.data} ({skipped} where a rule did not hold, left out)")
    for name, what in (("direction", "left/right as the question says"), ("image", "first image tag = named image")):
        rows = hits[name]
        if rows:
            acc = sum(r for r, _ in rows) / len(rows)
            prob = sum(p for _, p in rows) / len(rows)
            extra = (
                f", P(left) moves {sum(moved) / len(moved):.3f} with the question swapped (any answer logit: at "
                f"most {largest:.2f})"
                if name == "direction"
                else ""
            )
            print(f"{what} ({len(rows)}): ranked first {acc:.3f}, mean probability {prob:.3f}{extra}")
    ids = {
        "left / right": [left, right],
        "image tags": t.image_tag_ids,
        "digits 1-5": tok.convert_tokens_to_ids([str(k) for k in range(1, 6)]),
        "colours": tok.convert_tokens_to_ids(list(COLOURS)),
    }
    print(
        "input embeddings, mean pairwise cosine: "
        + ", ".join(f"{name} {mean_pairwise_cosine(words[torch.tensor(v)]):.3f}" for name, v in ids.items())
    )


if __name__ == "__main__":
    main()
