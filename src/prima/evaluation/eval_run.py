"""`prima eval`: run a checkpoint's predictor over a samples JSONL into predictions.jsonl, then score it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prima.data.schema import Sample, read_samples, resolve_image, write_jsonl
from prima.errors import PrimaError

PREDICTIONS_FILE = "predictions.jsonl"


def predict_samples(predictor: Any, samples: Sequence[Sample], root: Path, batch_size: int = 1) -> Iterator[dict]:
    """Prediction rows (``{"id", "answer", "segments"}``) for ``samples``, with a tqdm progress bar.

    ``predictor`` needs ``predict(images=, question=)`` returning an object with ``to_json()``;
    with ``batch_size`` > 1 its ``predict_batch([(images, question), ...])`` is used when it has one.
    """
    from tqdm import tqdm

    batched = batch_size > 1 and hasattr(predictor, "predict_batch")
    with tqdm(total=len(samples), desc="predict", unit="sample", dynamic_ncols=True) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            queries = [([str(resolve_image(s, i, root)) for i in range(len(s.images))], s.question) for s in chunk]
            try:
                if batched:
                    outputs = predictor.predict_batch(queries)
                else:
                    outputs = [predictor.predict(images=images, question=q) for images, q in queries]
            except PrimaError as e:
                ids = ", ".join(s.id for s in chunk)
                raise PrimaError(f"predicting sample(s) {ids}: {e}") from None
            for sample, output in zip(chunk, outputs):
                yield {"id": sample.id, **output.to_json()}
            bar.update(len(chunk))


def run_eval(
    checkpoint: str | os.PathLike | None,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    predictor: Any = None,
    phrase_model: str | os.PathLike | None = None,
    wordnet: str = "auto",
    embed: Any = None,
    **readout: Any,
) -> dict[str, Any]:
    """Predict the first ``limit`` samples of ``data`` into OUT/predictions.jsonl, score them into OUT.

    ``predictor`` replaces loading ``checkpoint`` with `PrimaPredictor.from_pretrained` (tests pass a
    small fake); ``readout`` are its read-out options (`prima.inference.cli.readout_options`; None: the
    checkpoint's own), named in the scores' ``checkpoint`` where given. Only the predicted samples are scored, so
    ``limit`` never counts as missing predictions.
    """
    if limit is not None and limit < 1:
        raise PrimaError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise PrimaError(f"--batch-size must be at least 1, got {batch_size}")
    data = Path(data)
    samples = read_samples(data)  # checks the images exist before hours of prediction start
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise PrimaError(f"{data} has no samples to evaluate")
    if predictor is None:
        from prima.inference.predictor import PrimaPredictor

        predictor = PrimaPredictor.from_pretrained(checkpoint, device=device, **readout)
    out = Path(out_dir)
    pred_path = out / PREDICTIONS_FILE
    write_jsonl(pred_path, predict_samples(predictor, samples, data.parent, batch_size))

    from prima.evaluation.report import write_outputs
    from prima.evaluation.scorer import score_predictions

    result = score_predictions(
        pred_path, samples, phrase_model=phrase_model, wordnet=wordnet, embed=embed, device=device
    )
    result["ground_truth"] = str(data) + (f" (first {len(samples)} samples)" if limit is not None else "")
    result["checkpoint"] = str(checkpoint) if checkpoint is not None else "(bundled or injected predictor)"
    for name, value in readout.items():  # what overrode the checkpoint's own read-out
        if value is not None:
            shown = (
                str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else value
            )
            result["checkpoint"] += f" with {name} {shown}"
    write_outputs(result, out)
    return result
