"""Choose `grounding.phrase_check_threshold` on validation data: the metrics at each threshold, from two runs.

`prima eval --phrase-check 0` (the check off) keeps every answer and records each segment's ``support``;
`prima eval --phrase-check 1` writes every grounded answer again without masks (and keeps the new one where the LLM
finds it as likely). A threshold T takes, per sample, the second run's answer when every segment of the first has support below T, else the first's:
exactly what the first rule of the check does at T (greedy decoding is deterministic), without a prediction run per
threshold. The second rule (answers without phrases replaced by grounded ones whose phrases are shown) is not
modelled: answers without phrases keep the first run's; run `prima eval` at the chosen threshold for it.

    .venv/bin/prima eval --checkpoint C --data data/synth/val/samples.jsonl --out runs/eval/pc0 --phrase-check 0
    .venv/bin/prima eval --checkpoint C --data data/synth/val/samples.jsonl --out runs/eval/pc1 --phrase-check 1
    .venv/bin/python benchmarks/phrase_check.py data/synth/val/samples.jsonl runs/eval/pc0 runs/eval/pc1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from prima.errors import PrimaError
from prima.evaluation.scorer import score_predictions

THRESHOLDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)


def read_rows(run: Path) -> dict[str, dict]:
    path = run / "predictions.jsonl"
    if not path.is_file():
        raise PrimaError(f"{path} not found: run prima eval into {run} first")
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def combine(kept: dict[str, dict], redone: dict[str, dict], threshold: float) -> list[dict]:
    """The predictions generation writes at ``threshold``; a KeyError names a sample missing from a run."""
    rows = []
    for sid, row in kept.items():
        supports = [s.get("support") for s in row["segments"]]
        if None in supports:
            raise PrimaError(f"sample {sid}: a segment has no support (was the checkpoint trained with phrase_check?)")
        unsupported = bool(supports) and all(s < threshold for s in supports)
        rows.append(redone[sid] if unsupported else row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="GT samples JSONL")
    parser.add_argument("kept", type=Path, help="prima eval --phrase-check 0 output folder")
    parser.add_argument("redone", type=Path, help="prima eval --phrase-check 1 output folder")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    args = parser.parse_args()
    try:
        kept, redone = read_rows(args.kept), read_rows(args.redone)
        if set(kept) != set(redone):
            raise PrimaError(f"{args.kept} and {args.redone} predict different samples")
        print("| threshold | answers replaced | mIoU | Recall | SS | no-mask acc | METEOR | gIoU |")
        print("|---:|---:|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for t in args.thresholds:
                rows = combine(kept, redone, t)
                path = Path(tmp) / f"{t}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                m = score_predictions(path, args.samples)
                n = sum("first_answer" in r for r in rows)
                cells = [m[k] for k in ("miou", "recall", "ss", "no_mask_acc", "meteor", "giou")]
                print(f"| {t:g} | {n} | " + " | ".join(f"{100 * v:.2f}" for v in cells) + " |")
    except PrimaError as e:
        raise SystemExit(f"phrase_check: error: {e}") from None


if __name__ == "__main__":
    main()
