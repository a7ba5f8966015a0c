"""`prima predict` and `prima demo [--web]`. Thin: parse, then call prima.inference library functions."""

from __future__ import annotations

import argparse

DEFAULT_PORT = 7860
THREADS_HELP = "CPU threads for torch (default: torch's choice; 1 is faster when other jobs share the cores)"
IMAGE_CHOICE_HELP = (
    "with a checkpoint that has the decoder's image choice: its weight beside the LLM's tag when picking each "
    "[SEG]'s image (default: the checkpoint's grounding.image_choice_weight; 0: the LLM alone)"
)
IMAGE_SUPPORT_HELP = (
    "with a checkpoint that has the image choice and the phrase check: the weight of the log of how surely the pixels "
    "under a [SEG]'s mask, drawn on each image, show its phrase, added to the choice of its image (default: the "
    "checkpoint's grounding.image_support_weight; 0: off; docs/MODEL.md)"
)
IMAGE_PRIOR_HELP = (
    "with a checkpoint that has the image prior (model.image_prior): its weight beside the LLM's when the answer names "
    'its first image ("In image k") before any phrase (default: the checkpoint\'s model.image_prior_weight; 0: the LLM '
    'alone; docs/MODEL.md, "Which image first")'
)
IMAGE_PRIOR_AFTER_PHRASE_HELP = (
    "with a checkpoint that has the image prior: its weight on the answer's first image tag when a phrase comes "
    "before it (the odd one out's), the word reader then reading the phrase's colour on the new image (default: the "
    'checkpoint\'s model.image_prior_after_phrase; 0: off; docs/MODEL.md, "The prior after a phrase")'
)
IMAGE_PRIOR_CELLS_HELP = (
    "with a checkpoint whose image prior has the answer's cells (model.image_prior_cells): the weight of the log of "
    "the share of their distribution under the first phrase's mask, when branches of that phrase compete (default: "
    "the checkpoint's model.image_prior_cells_weight; 0: off; docs/MODEL.md, \"Where in the image: the answer's cells\")"
)
IMAGE_PRIOR_CELLS_BELOW_HELP = (
    "with a checkpoint whose image prior has the answer's cells: an answer whose first mask holds less than this share "
    "of their distribution on its image has its first phrase written again from branches (default: the checkpoint's "
    'model.image_prior_cells_below; 0: never; docs/MODEL.md, "Where in the image: the answer\'s cells")'
)
IMAGE_PRIOR_CELLS_TEMPERATURE_HELP = (
    "with a checkpoint whose image prior has the answer's cells: their share under a mask is taken from their logits "
    "divided by T (below 1: sharper, the likeliest cells weigh more; default: the checkpoint's "
    'model.image_prior_cells_temperature; docs/MODEL.md, "The cells sharpened")'
)
IMAGE_PRIOR_CELLS_NOWHERE_HELP = (
    "with a checkpoint whose image prior has the answer's cells and NothingThere (model.image_prior_nowhere): how much "
    "NothingThere's distribution over each image's cells weighs in the cells' read-out, 0 to 1, the same for every image "
    "(0: the cells' alone; given, it replaces the weight a checkpoint with model.image_prior_cells_mix learnt image by "
    'image; default: the checkpoint\'s; docs/MODEL.md, "Nothing there, read as the cells")'
)
IMAGE_PRIOR_NOWHERE_HELP = (
    "with a checkpoint whose image prior says whether an answer grounds anything in an image "
    "(model.image_prior_nowhere): an answer whose first phrase the phrase check would turn down is first written "
    "again where the answer's cells are if its image is empty with a probability under P (default: the "
    'checkpoint\'s model.image_prior_nowhere_below; 0: off; docs/MODEL.md, "Nothing there")'
)
IMAGE_PRIOR_REWRITE_HELP = (
    "with a checkpoint whose image prior has the answer's cells and their rewrite on: where the prior finds the "
    "answer's first image with a probability of at least P and the answer's shown first phrase lies on another image, "
    "that phrase is written again from branches on the prior's image (default: the checkpoint's "
    'model.image_prior_rewrite_above; 0: off; docs/MODEL.md, "The image the prior is sure of")'
)
MASK_THRESHOLD_HELP = (
    "a pixel is in a mask when the decoder's probability reaches this (default: the checkpoint's "
    "grounding.mask_threshold)"
)
MASK_REGIONS_HELP = (
    "which pixels above the threshold make a mask: all, the largest connected region by probability, or the "
    "region in which the phrase check reads the phrase (supported; needs it) "
    "(default: the checkpoint's grounding.mask_regions)"
)
REPEAT_IMAGES_HELP = (
    "let a phrase the answer repeats be grounded again on an image it already names "
    "(default: the checkpoint's grounding.distinct_images, which forbids it; docs/MODEL.md)"
)

LLM_WORDS_HELP = (
    "with a checkpoint that reads each phrase's first word from its mask (grounding.word_readout): keep the LLM's "
    'word instead (docs/MODEL.md, "The first word read from the mask")'
)

PHRASE_CHECK_HELP = (
    "with a checkpoint that reads every phrase word again from its mask (grounding.phrase_check): the probability a "
    "phrase's words must reach to count as shown; an answer none of whose phrases is shown is written again without "
    "phrases, and one without phrases is replaced by one whose phrases are all shown, if the model writes one "
    "(default: the checkpoint's grounding.phrase_check_threshold; 0 turns the check off; docs/MODEL.md)"
)


EVERY_IMAGE_CHECK_HELP = (
    "with a checkpoint whose phrase check reads answers that say an object is in every image "
    "(grounding.every_image_check): check such an answer only as any other, not also whether the pixels show the "
    'object on at least half of its images (docs/MODEL.md, "In every image?")'
)


def add_readout_options(p: argparse.ArgumentParser) -> None:
    """The flags that change how a checkpoint's answers and masks are read out (`prima predict`, `prima eval`)."""
    from prima.data.masks import MASK_REGIONS

    p.add_argument("--image-choice-weight", type=float, default=None, help=IMAGE_CHOICE_HELP)
    p.add_argument("--image-support-weight", type=float, default=None, metavar="W", help=IMAGE_SUPPORT_HELP)
    p.add_argument("--image-prior-weight", type=float, default=None, metavar="W", help=IMAGE_PRIOR_HELP)
    p.add_argument(
        "--image-prior-after-phrase", type=float, default=None, metavar="W", help=IMAGE_PRIOR_AFTER_PHRASE_HELP
    )
    p.add_argument("--image-prior-cells-weight", type=float, default=None, metavar="W", help=IMAGE_PRIOR_CELLS_HELP)
    p.add_argument(
        "--image-prior-cells-below", type=float, default=None, metavar="P", help=IMAGE_PRIOR_CELLS_BELOW_HELP
    )
    p.add_argument(
        "--image-prior-cells-temperature",
        type=float,
        default=None,
        metavar="T",
        help=IMAGE_PRIOR_CELLS_TEMPERATURE_HELP,
    )
    p.add_argument(
        "--image-prior-cells-nowhere", type=float, default=None, metavar="W", help=IMAGE_PRIOR_CELLS_NOWHERE_HELP
    )
    p.add_argument("--image-prior-nowhere", type=float, default=None, metavar="P", help=IMAGE_PRIOR_NOWHERE_HELP)
    p.add_argument("--image-prior-rewrite", type=float, default=None, metavar="P", help=IMAGE_PRIOR_REWRITE_HELP)
    p.add_argument("--repeat-images", action="store_true", help=REPEAT_IMAGES_HELP)
    p.add_argument("--llm-words", action="store_true", help=LLM_WORDS_HELP)
    p.add_argument("--phrase-check", type=float, default=None, metavar="P", help=PHRASE_CHECK_HELP)
    p.add_argument("--no-every-image-check", action="store_true", help=EVERY_IMAGE_CHECK_HELP)
    p.add_argument("--mask-threshold", type=float, default=None, help=MASK_THRESHOLD_HELP)
    p.add_argument("--mask-regions", choices=MASK_REGIONS, default=None, help=MASK_REGIONS_HELP)


def readout_options(args: argparse.Namespace) -> dict:
    """`PrimaPredictor.from_pretrained` keyword arguments from `add_readout_options`' flags (None: the checkpoint's)."""
    return {
        "image_choice_weight": args.image_choice_weight,
        "image_support_weight": args.image_support_weight,
        "image_prior_weight": args.image_prior_weight,
        "image_prior_after_phrase": args.image_prior_after_phrase,
        "image_prior_cells_weight": args.image_prior_cells_weight,
        "image_prior_cells_below": args.image_prior_cells_below,
        "image_prior_cells_temperature": args.image_prior_cells_temperature,
        "image_prior_cells_nowhere": args.image_prior_cells_nowhere,
        "image_prior_nowhere_below": args.image_prior_nowhere,
        "image_prior_rewrite_above": args.image_prior_rewrite,
        "distinct_images": False if args.repeat_images else None,
        "word_readout": False if args.llm_words else None,
        "phrase_check": args.phrase_check,
        "every_image_check": False if args.no_every_image_check else None,
        "mask_threshold": args.mask_threshold,
        "mask_regions": args.mask_regions,
    }


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="answer a question about 1-5 images, with masks",
        description="Answer a question about images; write prediction.json and one overlay PNG per image.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="*", metavar="IMAGE", help="1 to 5 image files (one query)")
    what.add_argument("--jsonl", metavar="QUERIES", help="JSONL of {id, images, question}; images relative to it")
    p.add_argument("--question", help="the question (with --images)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: checkpoints/prima-tiny-synth)")
    p.add_argument("--out", default="out/predict", help="output folder (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16 or float16")
    p.add_argument("--overlays", action="store_true", help="with --jsonl: also write overlay PNGs per query")
    add_readout_options(p)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "demo",
        help="the bundled checkpoint on examples/ (or --web: a browser demo)",
        description="Answer the example scenes in examples/ with the bundled checkpoint, or start the web demo.",
    )
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: checkpoints/prima-tiny-synth)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--out", default="out/demo", help="output folder without --web (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--web", action="store_true", help="start the Gradio web demo instead")
    p.add_argument("--host", default="127.0.0.1", help="address to bind with --web (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port with --web (default: %(default)s)")
    p.add_argument(
        "--max-upload-mb", type=float, default=None, help="largest accepted upload per file with --web (default: 10)"
    )
    p.set_defaults(func=_demo)


def _set_threads(threads: int | None) -> None:
    """The user's --threads for this process (asked for on the command line, so not a library default)."""
    if threads is None:
        return
    from prima.errors import PrimaError

    if threads < 1:
        raise PrimaError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _predict(args: argparse.Namespace) -> int:
    from prima.errors import PrimaError

    _set_threads(args.threads)
    if args.jsonl is not None:
        if args.question is not None:
            raise PrimaError("--question goes with --images; with --jsonl each line carries its own question")
        return _predict_jsonl(args)
    if args.question is None:
        raise PrimaError("--question is required with --images")
    if args.overlays:
        raise PrimaError("--overlays goes with --jsonl; with --images overlays are always written")
    return _predict_one(args)


def _predict_one(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prima.constants import MAX_IMAGES
    from prima.inference.batch import prepare_out_dir, write_prediction
    from prima.inference.images import load_images
    from prima.inference.predictor import PrimaPredictor, check_question
    from prima.inference.render import format_summary, save_overlays

    # Check the cheap things before the model loads, so a typo fails in milliseconds.
    question = check_question(args.question)
    images = load_images(args.images, max_images=MAX_IMAGES)
    prepare_out_dir(args.out)
    predictor = PrimaPredictor.from_pretrained(
        args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        **readout_options(args),
    )
    prediction = predictor.predict_loaded(images, question)
    pictures = save_overlays(images, prediction, args.out)
    json_path = write_prediction(
        args.out, prediction, {"images": [str(Path(p)) for p in args.images], "question": question}
    )
    print(format_summary(prediction))
    print(f"wrote {json_path} and {len(pictures)} overlay(s): {', '.join(str(p) for p in pictures)}")
    return 0


def _predict_jsonl(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prima.inference.batch import predict_queries, prepare_out_dir, read_queries, write_predictions
    from prima.inference.predictor import PrimaPredictor

    queries = read_queries(args.jsonl)
    prepare_out_dir(args.out)
    predictor = PrimaPredictor.from_pretrained(
        args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        **readout_options(args),
    )
    out = Path(args.out)
    overlay_dir = out / "overlays" if args.overlays else None
    rows = predict_queries(
        predictor, queries, overlay_dir=overlay_dir, on_answer=lambda q, p: print(f"{q.id}: {p.text}")
    )
    n = write_predictions(out / "predictions.jsonl", rows)
    print(
        f"wrote {n} predictions to {out / 'predictions.jsonl'}"
        + (f", overlays in {overlay_dir}" if overlay_dir else "")
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    if args.web:
        from prima.inference.web import serve

        return serve(
            checkpoint=args.checkpoint,
            device=args.device,
            host=args.host,
            port=args.port,
            max_upload_mb=args.max_upload_mb,
        )
    from prima.inference.demo import run_demo

    return run_demo(args.checkpoint, out_dir=args.out, device=args.device)
