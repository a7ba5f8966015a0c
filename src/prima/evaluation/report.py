"""Writes a scoring run's metrics.json, report.md and bar-chart PNGs, and compares several runs in one table."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from prima.errors import PrimaError
from prima.evaluation.metrics import METRIC_KEYS, PER_SAMPLE_KEY, SampleScore, giou_of

METRIC_LABELS = {
    "miou": "mIoU",
    "recall": "Recall",
    "ss": "SS",
    "siou": "SIoU",
    "i_ss": "I-SS",
    "i_siou": "I-SIoU",
    "meteor": "METEOR",
    "giou": "gIoU",
    "ciou": "cIoU",
    "no_mask_acc": "no-mask acc",
}
PLOTTED_KEYS = ("miou", "recall", "ss", "siou", "giou", "no_mask_acc")
GROUPINGS = (("by_category", "category"), ("by_num_images", "number of images"), ("by_family", "question family"))
MAX_LISTED_IDS = 20  # the report lists this many missing ids; missing_predictions.txt has them all

DEVIATIONS = """\
- Phrase similarity (Recall's 0.5 test, SS, I-SS) uses {phrase_model} with mean pooling; GLaMM's Recall
  used bert-base-uncased. Pass `--phrase-model PATH` to use another local model.
- METEOR is nltk's re-implementation ({meteor}), not the Java METEOR 1.5 of pycocoevalcap.
- SS / SIoU are computed over mIoU's mask-based pairs; I-SS / I-SIoU compare per-image phrase sets. The
  paper does not spell out these pairings; docs/EVALUATION.md lists every choice.
- gIoU / cIoU treat a sample's images as one canvas (per image: all predicted masks merged vs all GT masks
  merged); a sample with no mask on either side scores gIoU 1, as LISA's code does."""


SCORES_FILE = "scores.jsonl"
SCORE_FIELDS = tuple(f.name for f in fields(SampleScore))  # a scores.jsonl row's keys
CHANGE_FLOOR = 1e-4  # `changed_samples`: smaller differences (under 0.01 percentage points) are float noise


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def percent(value: Any) -> str:
    """A metric in [0, 1] as a percentage with two decimals, as the paper reports; '–' when undefined."""
    return "–" if value is None else f"{100 * value:.2f}"


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """metrics.json, scores.jsonl (one line per sample, when ``result`` has them), report.md,
    missing_predictions.txt (if any) and the PNG plots; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.get(PER_SAMPLE_KEY)
    result = {k: v for k, v in result.items() if k != PER_SAMPLE_KEY}
    written = [out / "metrics.json"]
    _write_atomic(written[0], json.dumps(result, indent=2) + "\n")
    if rows is not None:
        written.append(out / SCORES_FILE)
        _write_atomic(written[-1], "".join(json.dumps(r) + "\n" for r in rows))
    if result.get("missing_prediction_ids"):
        path = out / "missing_predictions.txt"
        path.write_text("\n".join(result["missing_prediction_ids"]) + "\n", encoding="utf-8")
        written.append(path)
    plots = write_plots(result, out)
    report = out / "report.md"
    per_sample = SCORES_FILE if rows is not None else None
    report.write_text(markdown_report(result, [p.name for p in plots], per_sample), encoding="utf-8")
    return [*written, report, *plots]


def markdown_report(result: dict[str, Any], plot_names: Sequence[str] = (), per_sample: str | None = None) -> str:
    """The human-readable report: provenance, overall table, one table per grouping, plots, deviations; with
    ``per_sample`` (a file name) it says where each sample's own numbers are."""
    lines = ["# M4Seg evaluation", ""]
    if "checkpoint" in result:
        lines.append(f"- Checkpoint: `{result['checkpoint']}`")
    lines += [
        f"- Predictions: `{result.get('predictions', '?')}`",
        f"- Ground truth: `{result.get('ground_truth', '?')}`",
        f"- Samples: {result['num_samples']} ({result['num_with_masks']} with GT masks, "
        f"{result['num_without_masks']} without); GT segments: {result['num_gt_segments']}; "
        f"predicted segments: {result['num_pred_segments']}",
        f"- Phrase-similarity model: {result.get('phrase_model', '?')}",
        f"- METEOR: {result.get('meteor_resources', '?')}",
    ]
    missing = result.get("missing_prediction_ids") or []
    if missing:
        shown = ", ".join(f"`{i}`" for i in missing[:MAX_LISTED_IDS])
        more = (
            f" and {len(missing) - MAX_LISTED_IDS} more (all in missing_predictions.txt)"
            if len(missing) > MAX_LISTED_IDS
            else ""
        )
        lines.append(f"- **{len(missing)} GT sample(s) had no prediction** and were scored as empty: {shown}{more}")
    else:
        lines.append("- Every GT sample had a prediction.")
    if per_sample:
        lines.append(f"- Each sample's own numbers: `{per_sample}` (one JSON line per GT sample).")
    lines += ["", "All numbers are percentages; – means no sample in the group qualifies for that metric.", ""]
    lines += ["## Overall", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {METRIC_LABELS[k]} | {percent(result.get(k))} |" for k in METRIC_KEYS]
    for key, title in GROUPINGS:
        groups = result.get(key)
        if not groups:
            continue
        lines += ["", f"## By {title}", "", group_table(groups, title)]
    if plot_names:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plot_names]
    lines += [
        "",
        "## Deviations from the paper",
        "",
        DEVIATIONS.format(phrase_model=result.get("phrase_model", "?"), meteor=result.get("meteor_resources", "?")),
        "",
    ]
    return "\n".join(lines)


def group_table(groups: dict[str, dict[str, Any]], title: str) -> str:
    header = f"| {title} | N | " + " | ".join(METRIC_LABELS[k] for k in METRIC_KEYS) + " |"
    rule = "|---|---:|" + "---:|" * len(METRIC_KEYS)
    rows = [
        f"| {name} | {m['num_samples']} | " + " | ".join(percent(m.get(k)) for k in METRIC_KEYS) + " |"
        for name, m in groups.items()
    ]
    return "\n".join([header, rule, *rows])


def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """One grouped bar chart per grouping (by_category.png, ...); undefined values are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for key, title in GROUPINGS:
        groups = result.get(key)
        if not groups:
            continue
        names = list(groups)
        fig = Figure(figsize=(max(6.0, 1.2 * len(names) + 3), 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        width = 0.8 / len(PLOTTED_KEYS)
        for n, metric in enumerate(PLOTTED_KEYS):
            xs = [i + (n - (len(PLOTTED_KEYS) - 1) / 2) * width for i in range(len(names))]
            ys = [groups[g].get(metric) for g in names]
            bars = ax.bar(
                [x for x, y in zip(xs, ys) if y is not None],
                [100 * y for y in ys if y is not None],
                width,
                label=METRIC_LABELS[metric],
            )
            ax.bar_label(bars, fmt="%.0f", fontsize=6)  # tells a real 0 from an undefined (absent) bar
        ax.set_xticks(range(len(names)), [f"{g}\n(N={groups[g]['num_samples']})" for g in names])
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.set_title(f"Metrics by {title}")
        ax.legend(ncol=len(PLOTTED_KEYS), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        written.append(path)
    return written


def load_run_metrics(run: str | os.PathLike) -> dict[str, Any]:
    """metrics.json of a run folder (or the file itself); a PrimaError naming the path if absent or broken."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise PrimaError(f"no metrics.json in {run}; run `prima score` or `prima eval` with --out {run} first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PrimaError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def compare_runs(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    by: str | None = None,
    metric: str = "miou",
) -> str:
    """One Markdown table of several runs (run name = folder name); written to ``out`` if given.

    Without ``by``: a row per run, a column per metric. With ``by`` ("family", "category" or "num_images"): a row
    per group of that grouping (the union over the runs, then "all"), a column per run, each cell ``metric``; N is
    the group's sample count, "a/b/..." where the runs disagree and "–" in a cell where a run has no such group.
    """
    if not runs:
        raise PrimaError("name at least one run folder to compare")
    _check_metric(metric)
    results = [(_run_name(run), load_run_metrics(run)) for run in runs]
    if by is None:
        header = "| run | N | " + " | ".join(METRIC_LABELS[k] for k in METRIC_KEYS) + " |"
        rows = [header, "|---|---:|" + "---:|" * len(METRIC_KEYS)]
        for name, m in results:
            rows.append(
                f"| {name} | {m.get('num_samples', '?')} | " + " | ".join(percent(m.get(k)) for k in METRIC_KEYS) + " |"
            )
        note = "All metrics in percent (`prima compare`); – means undefined for that run."
    else:
        key, titles = f"by_{by}", dict(GROUPINGS)
        if key not in titles:
            choices = ", ".join(k.removeprefix("by_") for k in titles)
            raise PrimaError(f"unknown grouping {by!r}; choose one of {choices}")
        for name, m in results:
            if not m.get(key):
                raise PrimaError(f"run {name} has no {key} in its metrics.json (its samples carry no {by}?)")
        groups = list(dict.fromkeys(g for _, m in results for g in m[key]))
        header = f"| {titles[key]} | N | " + " | ".join(name for name, _ in results) + " |"
        rows = [header, "|---|---:|" + "---:|" * len(results)]
        for group in [*groups, None]:
            cells = [m if group is None else m[key].get(group) for _, m in results]
            counts = list(dict.fromkeys(c["num_samples"] for c in cells if c is not None))
            values = [percent(c.get(metric)) if c is not None else "–" for c in cells]
            label = "all" if group is None else group
            rows.append(f"| {label} | {'/'.join(map(str, counts))} | " + " | ".join(values) + " |")
        note = f"{METRIC_LABELS[metric]} in percent by {titles[key]} (`prima compare --by {by}`); – means "
        note += "undefined for that run or group."
    return _table(rows, note, out)


def _check_metric(metric: str) -> None:
    if metric not in METRIC_LABELS:
        raise PrimaError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_LABELS)}")


def _table(rows: list[str], note: str, out: str | os.PathLike | None) -> str:
    """Markdown table ``rows`` and a ``note`` under them, written to ``out`` if given."""
    table = "\n".join(rows) + f"\n\n{note}\n"
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table, encoding="utf-8")
    return table


def load_run_scores(run: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """scores.jsonl of a run folder by sample id; a PrimaError naming the path if absent (runs scored before it
    existed: score them again) or broken."""
    path = Path(run)
    path = path / SCORES_FILE if path.is_dir() else path.parent / SCORES_FILE
    if not path.is_file():
        folder = path.parent
        raise PrimaError(
            f"no {SCORES_FILE} in {folder} (scored before prima wrote one?); score it again: "
            f"prima score --pred {folder / 'predictions.jsonl'} --gt GT.jsonl --out {folder}"
        )
    rows = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrimaError(f"{path}, line {n}: invalid JSON: {e.msg}") from None
        missing = [f for f in SCORE_FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise PrimaError(f"{path}, line {n}: not a scores.jsonl row (no field {missing[0]!r})")
        rows[str(row["id"])] = row
    return rows


def sample_value(row: dict[str, Any], metric: str) -> float | None:
    """One sample's own value of ``metric`` from its scores.jsonl row (None where the metric does not apply to it)."""
    if metric == "recall":
        return row["true_positives"] / row["num_gt"] if row["num_gt"] else None
    if metric == "giou":
        return giou_of(row["intersection"], row["union"])
    if metric == "no_mask_acc":
        return None if row["no_mask_correct"] is None else float(row["no_mask_correct"])
    if metric == "ciou":
        raise PrimaError("cIoU pools pixels over samples, so no sample has one of its own; choose another --metric")
    return row[metric]


def changed_samples(
    runs: Sequence[str | os.PathLike], metric: str = "miou", out: str | os.PathLike | None = None
) -> str:
    """A Markdown table of the samples whose own ``metric`` differs (by `CHANGE_FLOOR` or more) between two runs of the
    same ground truth (from their scores.jsonl), the largest losses first; written to ``out`` if given."""
    if len(runs) != 2:
        raise PrimaError(f"--changed compares exactly two runs, got {len(runs)}")
    _check_metric(metric)
    (name_a, a), (name_b, b) = [(_run_name(run), load_run_scores(run)) for run in runs]
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise PrimaError(
            f"{name_a} and {name_b} scored different samples ({len(only)} in one only, e.g. {only[0]!r}): "
            "compare runs of the same ground truth"
        )
    rows = []
    for sid, row in a.items():
        va, vb = sample_value(row, metric), sample_value(b[sid], metric)
        if va != vb and not (va is not None and vb is not None and abs(va - vb) < CHANGE_FLOOR):
            rows.append((sid, row.get("family") or row.get("category") or "", va, vb))
    rows.sort(key=lambda r: ((r[3] or 0.0) - (r[2] or 0.0), r[0]))
    up = sum((vb or 0.0) > (va or 0.0) for _, _, va, vb in rows)
    label = METRIC_LABELS[metric]
    lines = [f"| sample | family | {name_a} | {name_b} | change |", "|---|---|---:|---:|---:|"]
    for sid, family, va, vb in rows:
        change = "–" if va is None or vb is None else f"{100 * (vb - va):+.2f}"
        lines.append(f"| {sid} | {family} | {percent(va)} | {percent(vb)} | {change} |")
    note = (
        f"{label} per sample in percent (`prima compare --changed`): {len(rows)} of {len(a)} samples differ, "
        f"{up} up and {len(rows) - up} down; – means undefined for that sample."
    )
    return _table(lines, note, out)


def _run_name(run: str | os.PathLike) -> str:
    path = Path(run)
    return path.name if path.is_dir() else path.parent.name
