"""How much a checkpoint's visual tokens differ between images and within one: spread = norm of the per-dimension
std over the tokens / norm of their mean, over all visual tokens of the first 10 validation samples (near 0: the
LLM sees the same tokens for every image) and over the tokens of one image, averaged over images (near 0: an image's
tokens are copies of one vector; the Q-Former's queries collapsed). Prints the same for the vision encoder's own
tokens, for comparison, and with a Q-Former how many different cells the queries of one attention head look at
most in its first cross-attention layer (of ``qformer.num_queries``; averaged over images and heads) and how much
attention that most-attended cell gets, and how alike the queries' states of one image are (mean cosine between two
queries) where they enter the first layer, its cross-attention and the second layer.

    .venv/bin/python benchmarks/visual_token_spread.py runs/tiny/best --data data/synth/val/samples.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prima.data.schema import read_samples
from prima.model import PrimaModel
from prima.model.prima import visual_alikeness


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
    visual, encoder, picks = [], [], []
    states: dict[str, list[float]] = {}
    qformer = getattr(model.query, "qformer", None)
    if qformer is not None:
        layers = qformer.encoder.layer
        entries = {"layer 1": layers[0], "its cross-attention": layers[0].crossattention}
        if len(layers) > 1:
            entries["layer 2"] = layers[1]
        for name, module in entries.items():
            module.register_forward_pre_hook(
                lambda m, a, kw, name=name: states.setdefault(name, []).extend(
                    visual_alikeness((a[0] if a else kw["hidden_states"])[:, : model.query.num_queries]).tolist()
                ),
                with_kwargs=True,
            )
        qformer.set_attn_implementation("eager")  # the attention probabilities are returned by the eager path only

        def keep_attention(module, args, kwargs, output):
            picks.append(output.cross_attentions[0][:, :, : model.query.num_queries].float())

        qformer.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "output_attentions": True}), with_kwargs=True)
        qformer.register_forward_hook(keep_attention, with_kwargs=True)
    with torch.no_grad():
        for s in read_samples(args.data, validate=False)[: args.samples]:
            features = model.encode_images(proc.preprocess_images([root / p for p in s.images]))
            qids = torch.tensor([proc.encode_qformer_text(s.question)])
            v = model.visual_tokens(features, torch.zeros(len(s.images), dtype=torch.long), qids)
            visual.append(v.float())
            encoder.append(model.vision.tokens(features).float())
    for name, tokens in (("visual tokens", visual), ("vision-encoder tokens", encoder)):
        every = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])
        within = sum(spread(image) for t in tokens for image in t) / sum(len(t) for t in tokens)
        print(f"{name:>21}: spread {spread(every):.3f} over all, {within:.3f} within one image")
    if picks:
        attention = torch.cat(picks)  # (images, heads, queries, cells)
        cells = attention.argmax(-1).flatten(0, 1)
        distinct = sum(len(set(row.tolist())) for row in cells) / len(cells)
        print(
            f"Q-Former, first cross-attention layer: one head's {attention.shape[2]} queries look at "
            f"{distinct:.1f} different cells most (mean); the most-attended cell gets {attention.amax(-1).mean():.2f}"
        )
        print(
            "Q-Former, mean cosine between two queries of one image entering "
            + ", ".join(f"{name} {sum(v) / len(v):.3f}" for name, v in states.items())
        )


if __name__ == "__main__":
    main()
