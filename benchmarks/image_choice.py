"""Which image does a [SEG] mean? Teacher-forced accuracy of the LLM's image tag, of the decoder's image choice
(``grounding.image_choice``) and of their sum at several weights, on validation samples; with the phrase check
(``grounding.phrase_check``) also of the pixels' support for the phrase on each image added to that sum
(``grounding.image_support_weight``), with every phrase word checked and without the first word.

Feeds each sample's ground-truth answer, so every [SEG] has its right phrase and state; the LLM's choice is its
most likely tag among the sample's images at the [SEG] (what generation picks), the decoder's the argmax of its
image-choice logits, the sum ``log p_LLM(tag) + w * log p_decoder(image)`` what generation picks with
``grounding.image_choice_weight = w``. Choose ``w`` on validation data, never on the test split.

    .venv/bin/python benchmarks/image_choice.py runs/tiny-masks/final --samples 200 --feature-cache .cache/features
"""

from __future__ import annotations

import teacher_forced
import torch

from prima.model import PrimaModel
from prima.model.prima import _candidates


def llm_first_words(
    model: PrimaModel, ids: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor, truth: torch.Tensor
) -> torch.Tensor:
    """The LLM's greedy first word (M,) of each [SEG]'s phrase at ``positions`` (2, M), teacher-forced: its most
    likely word (no markup) after the true answer up to the phrase's first word; -1 where the phrase has none."""
    banned = model._structure_token_ids()
    out = truth.clone()
    for q, (r, c) in enumerate(zip(positions[0].tolist(), positions[1].tolist())):
        start, end = model._phrase_span(ids[r].tolist(), c)
        if end > start:
            scores = logits[r, start - 1].float().clone()
            scores[banned] = float("-inf")
            out[q] = scores.argmax()
    return out


def main() -> None:
    parser = teacher_forced.options(__doc__)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument(
        "--llm-first-word",
        action="store_true",
        help="draw and check each phrase with the LLM's own first word (its greedy choice after the true prefix), "
        "as generation does, instead of the true one",
    )
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    if not model.config.grounding.image_choice:
        raise SystemExit(f"image_choice: {args.checkpoint} has no image-choice head (model.grounding.image_choice)")
    tags = torch.tensor(model.config.tokens.image_tag_ids)
    samples = teacher_forced.samples(args)
    check = model.config.grounding.phrase_check
    variants = {"every word": {"check_first": True}, "without the first word": {"check_first": False}}
    if model.config.grounding.word_readout:
        variants["first word read on each image"] = {"read_first": True}
    supports: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    llm, decoder, truth, images = [], [], [], []
    with torch.no_grad():
        for _, batch in teacher_forced.batches(samples, args.batch, collate):
            out = model(batch)
            if out.image_choice_logits is None:
                continue
            num = torch.bincount(batch["image_sample_index"], minlength=batch["input_ids"].shape[0])
            offsets = torch.cumsum(num, 0) - num
            is_seg = (batch["input_ids"] == model.config.tokens.seg_token_id) & (batch["labels"] != -100)
            rows, cols = is_seg.nonzero(as_tuple=True)
            k = out.image_choice_logits.shape[1]
            tag_logits = out.logits[rows, cols][:, tags[:k]].float()
            tag_logits[torch.isinf(out.image_choice_logits)] = float("-inf")
            llm.append(tag_logits.log_softmax(-1))
            decoder.append(out.image_choice_logits.float().log_softmax(-1))
            truth.append(out.seg_image_index - offsets[rows])
            images.append(num[rows])
            if check:  # the phrase's mask drawn on every image of its sample, its words read under each
                x = model._inputs(batch)
                positions, _ = model.seg_targets(x.input_ids, x.image_offsets, x.num_images, x.labels)
                prompts = model.seg_projector(model._read_answer(batch, x, positions).queries)
                words = model.phrase_words(x.input_ids, positions)
                if args.llm_first_word:
                    words[:, 0] = llm_first_words(model, x.input_ids, positions, out.logits, words[:, 0])
                candidates = _candidates(offsets[rows], num[rows])[:, :k]
                for name, kwargs in variants.items():
                    logs = model._image_support(prompts, words, candidates, x.features, **kwargs)
                    supports[name].append(logs.masked_fill(candidates < 0, float("-inf")))  # no such image
    width = max(x.shape[1] for x in llm)
    pad = lambda xs: torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]), value=float("-inf")) for x in xs])  # noqa: E731
    llm_lp, dec_lp, target, n = pad(llm), pad(decoder), torch.cat(truth), torch.cat(images)
    print(f"{args.checkpoint}: {len(samples)} samples of {args.data}, {len(target)} [SEG]s")
    print(f"chance (1 / images): {(1.0 / n.float()).mean():.3f}")
    print(f"LLM tag alone: {(llm_lp.argmax(-1) == target).float().mean():.3f}")
    print(f"decoder alone: {(dec_lp.argmax(-1) == target).float().mean():.3f}")
    for w in args.weights:
        print(f"LLM + {w:g} x decoder: {((llm_lp + w * dec_lp).argmax(-1) == target).float().mean():.3f}")
    for name, store in supports.items():
        if not store:
            continue
        support = pad(store)
        print(f"support alone, {name}: {(support.argmax(-1) == target).float().mean():.3f}")
        for v in args.weights:
            pick = (llm_lp + dec_lp + v * support).argmax(-1)  # the decoder at image_choice_weight 1
            print(f"LLM + decoder + {v:g} x support ({name}): {(pick == target).float().mean():.3f}")


if __name__ == "__main__":
    main()
