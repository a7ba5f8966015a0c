"""The `prima` command: builds the argument parser from each area's `cli` module and runs one command.

Each area (data, model, evaluation, train, inference) registers its own sub-commands in its
``cli.py``; handlers import heavy libraries lazily so `prima --help` stays fast. A PrimaError
becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

AREAS = ("prima.data.cli", "prima.model.cli", "prima.evaluation.cli", "prima.train.cli", "prima.inference.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from prima import __version__

    parser = argparse.ArgumentParser(prog="prima", description="Multi-image pixel-grounded reasoning segmentation.")
    parser.add_argument("--version", action="version", version=f"prima {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # an area not built yet registers nothing
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from prima.errors import PrimaError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PrimaError as e:
        print(f"prima {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prima {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
