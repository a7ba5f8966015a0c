"""`prima train` and `prima plot`: parse arguments and call `prima.train.run` / `prima.train.plot`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (1 CPU process, or under `accelerate launch` / `torchrun` for DDP and DeepSpeed)",
        description="Train PRIMA from a YAML preset. Also runs as `accelerate launch -m prima train ...`.",
    )
    p.add_argument("--config", default=None, help="YAML preset (path or name such as 'tiny'); optional with --resume")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--out", required=True, help="run folder: config.yaml, log.jsonl, checkpoints/, final/ model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument(
        "--stop-at-step", type=int, default=None, help="save and stop after this step (resume later with --resume)"
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("plot", help="draw a run's training curves (log.jsonl) to a PNG")
    p.add_argument("run_dir", help="a run folder written by `prima train --out`")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_plot)


def _train(args: argparse.Namespace) -> int:
    from prima.train.run import run_training

    run_training(args.config, args.overrides, args.out, resume=args.resume, stop_at_step=args.stop_at_step)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from prima.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
