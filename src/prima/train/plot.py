"""`prima plot RUN_DIR`: the training curves of a run (log.jsonl) drawn to one PNG."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from prima.errors import PrimaError
from prima.train.trainer import LOG_FILE


def read_log(run_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """The run's log records grouped by split (``train``, ``val``), in step order."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise PrimaError(f"{path} not found; is {run_dir} a training run folder (prima train --out ...)?")
    by_split: dict[str, list[dict]] = defaultdict(list)
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrimaError(f"{path}:{line_no}: not JSON ({e.msg})") from None
        by_split[rec.get("split", "train")].append(rec)
    return dict(by_split)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw loss parts, validation metrics, learning rate and throughput against step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = read_log(run_dir)
    train, val = logs.get("train", []), logs.get("val", [])
    if not train:
        raise PrimaError(f"{Path(run_dir) / LOG_FILE} has no training records yet")
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r["step"] for r in train]
    loss_keys = sorted({k for r in train for k in r if k == "loss" or k.startswith("loss_")})
    ax = axes[0, 0]
    for k in loss_keys:
        ax.plot(steps, [r.get(k, float("nan")) for r in train], label=k, lw=1.2 if k == "loss" else 0.8)
    ax.set_title("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    val_keys = sorted({k for r in val for k in r if k.startswith("val_")})
    for k in val_keys:
        ax.plot([r["step"] for r in val], [r.get(k, float("nan")) for r in val], marker="o", ms=3, label=k)
    ax.set_title("validation" if val else "validation (none logged)")
    if val_keys:
        ax.legend(fontsize=8)
    axes[1, 0].plot(steps, [r.get("lr", float("nan")) for r in train])
    axes[1, 0].set_title("learning rate")
    axes[1, 1].plot(steps, [r.get("samples_per_s", float("nan")) for r in train])
    axes[1, 1].set_title("samples / s")
    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
