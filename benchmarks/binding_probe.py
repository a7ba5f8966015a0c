"""Do a checkpoint's visual tokens bind each object's colour to its category? An attention probe on V_i.

For every grounded object phrase "<colour> <category>" of the synthetic data, the probe sees the visual tokens
V_i (T, H) that the LLM gets for the phrase's image (question-conditioned, as in training) and must name the
colour. Two probes, each one attention read-out over the T tokens and a linear classifier, fit with Adam on the
phrases of the first ``--fit`` samples and scored on those of the next ``--test`` samples:

- ``category-keyed``: the read-out's query is a learned embedding of the phrase's category, i.e. "what colour
  is the chair in this image?" This is what the LLM has to do when it writes the colour of a named object;
- ``unkeyed``: one learned query for every phrase, i.e. the image's dominant colour, whatever the object.

Keyed well above unkeyed: V_i holds each object's colour with its category (the LLM could read it). Both at
the same level: the tokens hold a bag of colours, not which object has which, and no LLM can name the colour
of "the chair" from them.

    .venv/bin/python benchmarks/binding_probe.py checkpoints/prima-tiny-synth --feature-cache .cache/features
"""

from __future__ import annotations

import argparse

import teacher_forced
import torch
import torch.nn.functional as F

from prima.model import PrimaModel
from prima.train.data import load_samples
from prima.train.run import TrainCollator, make_feature_cache


def phrase_tokens(model: PrimaModel, samples, cache, encoder: bool = False, batch_size: int = 16):
    """(V_i (T, H), colour word, category word) for every two-word object phrase of ``samples``; with
    ``encoder`` the frozen encoder's query-module input (the ``vision.token_stride`` map's cells) instead of V_i."""
    collate = TrainCollator(model, cache)
    rows = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            batch = collate(chunk)
            if encoder:
                grid = teacher_forced.image_features(model, batch)[model.vision.token_index]
                visual = grid.float().flatten(2).transpose(1, 2)  # (N, cells, channels)
                visual = (visual - visual.mean((0, 1))) / (visual.std((0, 1)) + 1e-4)
            else:
                visual = teacher_forced.visual_tokens(model, batch)
                visual = F.rms_norm(visual, visual.shape[-1:])  # as the LLM's first layer reads it
            offsets = torch.cumsum(torch.tensor([0] + [len(s.images) for s in chunk]), 0).tolist()
            for s, offset in zip(chunk, offsets):
                for g in s.segments:
                    words = g.phrase.split()
                    if g.kind == "object" and len(words) == 2:
                        rows.append((visual[offset + g.image - 1], words[0], words[1]))
    return rows


class ReadOut(torch.nn.Module):
    def __init__(self, width: int, keys: int, classes: int):
        super().__init__()
        self.query = torch.nn.Embedding(keys, width)
        self.key = torch.nn.Linear(width, width, bias=False)
        self.value = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        q = self.query(key)  # (B, H)
        attn = torch.einsum("bh,bth->bt", q, self.key(tokens)).softmax(-1)
        return self.head(F.gelu(torch.einsum("bt,bth->bh", attn, self.value(tokens))))


def probe(train, test, keyed: bool, steps: int) -> float:
    colours = sorted({r[1] for r in train})
    categories = sorted({r[2] for r in train})

    def tensors(rows):
        rows = [r for r in rows if r[1] in colours and r[2] in categories]
        x = torch.stack([r[0] for r in rows]).float()
        y = torch.tensor([colours.index(r[1]) for r in rows])
        k = torch.tensor([categories.index(r[2]) if keyed else 0 for r in rows])
        return x, y, k

    x, y, k = tensors(train)
    xt, yt, kt = tensors(test)
    torch.manual_seed(0)
    model = ReadOut(x.shape[-1], len(categories), len(colours))
    opt = torch.optim.Adam(model.parameters(), 3e-3, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x, k), y).backward()
        opt.step()
    with torch.no_grad():
        return float((model(xt, kt).argmax(1) == yt).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="data/synth/train/samples.jsonl")
    parser.add_argument("--fit", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--encoder", action="store_true", help="probe the encoder's grid cells, not V_i")
    parser.add_argument("--feature-cache", default=None, help="the training run's data.feature_cache folder")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = PrimaModel.from_pretrained(args.checkpoint).eval()
    cache = make_feature_cache(model, args.feature_cache) if args.feature_cache else None
    samples = load_samples(args.data, limit=args.fit + args.test)
    train = phrase_tokens(model, samples[: args.fit], cache, args.encoder)
    test = phrase_tokens(model, samples[args.fit :], cache, args.encoder)
    print(f"{args.checkpoint}: {len(train)} object phrases to fit, {len(test)} to test; T = {train[0][0].shape[0]}")
    for keyed in (True, False):
        name = "category-keyed" if keyed else "unkeyed"
        print(f"{name:>15} colour accuracy: {probe(train, test, keyed, args.steps):.3f}")


if __name__ == "__main__":
    main()
