"""`prima flops`: FLOPs and parameter counts of the full-scale presets on the meta device. Thin: calls prima.model.flops."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="FLOPs per sample and parameter counts of the paper/glamm/lisa presets")
    p.add_argument("--images", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="numbers of images per sample")
    p.add_argument("--presets", nargs="+", default=None, help="presets to count (default: paper glamm lisa)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    p.set_defaults(func=_flops)


def _flops(args: argparse.Namespace) -> int:
    import json

    from prima.constants import MAX_IMAGES
    from prima.errors import PrimaError
    from prima.model.flops import PRESETS, flops_table, format_table

    bad = [n for n in args.images if not 1 <= n <= MAX_IMAGES]
    if bad:
        raise PrimaError(f"--images must be in 1..{MAX_IMAGES}, got {bad}")
    rows = flops_table(args.presets or PRESETS, args.images)
    print(json.dumps([r.as_dict() for r in rows], indent=2) if args.json else format_table(rows))
    return 0
