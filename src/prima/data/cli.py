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
    p.add_argument(
        "--families",
        default=None,
        help="comma-separated question families to draw from (default: the test mix); 'describe' is training-only",
    )
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

    _register_real_data(dsub)


def _synth(args: argparse.Namespace) -> int:
    from prima.data.synth import generate_dataset

    path = generate_dataset(
        args.out,
        num=args.num,
        seed=args.seed,
        split=args.split,
        min_images=args.min_images,
        max_images=args.max_images,
        size=args.size,
        workers=args.workers,
        families=args.families.split(",") if args.families is not None else None,
    )
    print(f"{path}: {args.num} samples ({args.split}, seed {args.seed}, {args.size} px)")
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


def _register_real_data(dsub: argparse._SubParsersAction) -> None:
    """`prima data m4seg` and `prima data build`: samples from real annotations (docs/DATA.md)."""
    p = dsub.add_parser("m4seg", help="convert raw M4Seg records (JSON list, JSONL or parquet) to samples")
    p.add_argument("--input", required=True, help="M4Seg records: .json list, .jsonl or .parquet")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME=ANNOTATIONS.json",
        help="COCO-format annotation file of source dataset NAME (its dataset_name in the records); repeat",
    )
    p.add_argument(
        "--image-root",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="folder that dataset NAME's file_names are relative to; repeat",
    )
    p.add_argument("--out", required=True, help="output folder (samples.jsonl + rejected.jsonl)")
    p.add_argument("--strict", action="store_true", help="stop with exit 2 at the first record that can't be converted")
    p.add_argument(
        "--check-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reject records whose image files don't exist (default: on)",
    )
    p.add_argument(
        "--relative-paths",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="write image paths relative to --out instead of absolute (default: absolute)",
    )
    p.add_argument("--id-prefix", default="m4seg", help="sample ids are PREFIX-INDEX (default: m4seg)")
    p.set_defaults(func=_m4seg)

    p = dsub.add_parser("build", help="M4Seg-style multi-image samples from COCO-format object (+ part) annotations")
    p.add_argument("--coco", required=True, help="COCO-format instance annotations (polygons or RLE)")
    p.add_argument("--images", required=True, help="folder that the annotation file_names are relative to")
    p.add_argument("--parts", help="PACO-style part annotations (categories 'object:part', obj_ann_id per part)")
    p.add_argument("--categories", help="category list with COCO-panoptic 'isthing' flags (stuff is not counted)")
    p.add_argument("--out", required=True, help="output folder (samples.jsonl)")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-images", type=int, default=2)
    p.add_argument("--max-images", type=int, default=5)
    p.add_argument(
        "--min-area",
        type=float,
        default=0.001,
        help="masks smaller than this share of their image are skipped as tiny (default: 0.001)",
    )
    p.add_argument("--max-segments", type=int, default=12, help="most [SEG] masks in one answer (default: 12)")
    p.add_argument(
        "--relative-paths",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="write image paths relative to --out instead of absolute (default: absolute)",
    )
    p.set_defaults(func=_build)


def _m4seg(args: argparse.Namespace) -> int:
    from prima.data.m4seg import convert_m4seg, load_sources, parse_named_paths

    sources = load_sources(
        parse_named_paths(args.source, "--source"), parse_named_paths(args.image_root, "--image-root")
    )
    report = convert_m4seg(
        args.input,
        sources=sources,
        out=args.out,
        strict=args.strict,
        check_images=args.check_images,
        relative_paths=args.relative_paths,
        id_prefix=args.id_prefix,
    )
    print(report.summary())
    return 0


def _build(args: argparse.Namespace) -> int:
    from prima.data.build import BuildOptions, build_dataset

    report = build_dataset(
        args.coco,
        images=args.images,
        parts=args.parts,
        categories=args.categories,
        out=args.out,
        options=BuildOptions(
            num=args.num,
            seed=args.seed,
            min_images=args.min_images,
            max_images=args.max_images,
            min_area=args.min_area,
            max_segments=args.max_segments,
            relative_paths=args.relative_paths,
        ),
    )
    print(report.summary())
    return 0
