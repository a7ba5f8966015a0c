"""`prima data ...`: synth, show, stats, m4seg, build. Thin: each handler calls one library function."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make, convert and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = dsub.add_parser("synth", help="generate M4Seg-Synth samples (deterministic by seed)")
    p.add_argument("--out", required=True, help="output folder (samples.jsonl + images/)")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.add_argument("--min-images", type=int, default=2)
    p.add_argument("--max-images", type=int, default=5)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=_synth)

    p = dsub.add_parser("show", help="draw one sample: images with labelled masks, question and answer")
    p.add_argument("dir", help="dataset folder or samples JSONL")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=_show)

    p = dsub.add_parser("stats", help="counts per category, number of images, class and segments")
    p.add_argument("dir", help="dataset folder or samples JSONL")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_stats)


def _synth(args: argparse.Namespace) -> int:
    from prima.data.synth import generate_dataset

    generate_dataset(
        args.out,
        num=args.num,
        seed=args.seed,
        split=args.split,
        min_images=args.min_images,
        max_images=args.max_images,
        size=args.size,
        workers=args.workers,
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from prima.data.show import render_sample

    render_sample(args.dir, index=args.index, out=args.out)
    print(args.out)
    return 0


def _stats(args: argparse.Namespace) -> int:
    import json

    from prima.data.stats import dataset_stats, format_stats

    stats = dataset_stats(args.dir)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
