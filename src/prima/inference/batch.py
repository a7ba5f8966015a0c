"""Queries files and output folders: what `prima predict` and `prima demo` read and write.

A queries file is JSONL, one ``{"id", "images": [...], "question"}`` a line, image paths relative to
the file's folder (a sample file in the project's format also works: extra fields are ignored).
Predictions go to ``predictions.jsonl``: the query's id, images and question plus `Prediction.to_json()`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prima.data.schema import iter_jsonl, write_jsonl
from prima.errors import PrimaError, SampleError
from prima.inference.predictor import Prediction, PrimaPredictor, check_question
from prima.inference.render import save_overlays


@dataclass
class Query:
    id: str
    images: list[str]  # as written in the file
    paths: list[Path]  # resolved against the file's folder
    question: str
    line: int
    reference: str | None = None  # the expected answer, when the file is a samples file (examples/ is)


def read_queries(path: str | Path) -> list[Query]:
    """Parse and check a queries JSONL (fields, image files present, question); errors name line and id."""
    path = Path(path)
    if not path.is_file():
        raise PrimaError(f"queries file not found: {path}")
    queries = []
    seen: dict[str, int] = {}
    for line_no, d in iter_jsonl(path):
        queries.append(_query_from_dict(d, path, line_no))
        qid = queries[-1].id
        if qid in seen:
            raise SampleError(f"duplicate id (first on line {seen[qid]})", path=path, line=line_no, field="id")
        seen[qid] = line_no
    if not queries:
        raise PrimaError(f"{path}: no queries in the file")
    return queries


def _query_from_dict(d: Any, path: Path, line: int) -> Query:
    where: dict[str, Any] = {"path": path, "line": line}
    if not isinstance(d, dict):
        raise SampleError(f"expected a JSON object, got {type(d).__name__}", **where)
    qid = d.get("id", f"line{line}")  # an id is optional: the line number stands in
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise SampleError("expected a string or integer id", field="id", **where)
    where["sample_id"] = str(qid)
    images = d.get("images")
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise SampleError("expected a list of image paths", field="images", **where)
    paths = [p if p.is_absolute() else path.parent / p for p in map(Path, images)]
    for i, p in enumerate(paths):
        if not p.is_file():
            raise SampleError(f"image file not found: {p}", field=f"images[{i}]", **where)
    try:
        question = check_question(d.get("question", ""))
    except PrimaError as e:
        raise SampleError(str(e), field="question", **where) from None
    reference = d.get("answer") if isinstance(d.get("answer"), str) else None
    return Query(str(qid), list(images), paths, question, line, reference)


def prepare_out_dir(path: str | Path) -> Path:
    """Create the output folder (and parents); a PrimaError if it is a file or cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".prima-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise PrimaError(f"cannot write to the output folder {path}: {e.strerror or e}") from None
    return path


def write_prediction(out_dir: str | Path, prediction: Prediction, extra: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/prediction.json`` (the prediction plus ``extra`` fields first); returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "prediction.json"
    path.write_text(json.dumps({**(extra or {}), **prediction.to_json()}, indent=2) + "\n", encoding="utf-8")
    return path


def predict_queries(
    predictor: PrimaPredictor,
    queries: list[Query],
    *,
    overlay_dir: str | Path | None = None,
    on_answer: Callable[[Query, Prediction], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Answer each query in turn, yielding its predictions row; overlays go to ``overlay_dir`` if given."""
    for q in queries:
        try:
            images = predictor.load(q.paths)
            prediction = predictor.predict_loaded(images, q.question)
        except PrimaError as e:
            raise PrimaError(f"query {q.id!r} (line {q.line}): {e}") from None
        if overlay_dir is not None:
            save_overlays(images, prediction, overlay_dir, prefix=f"{q.id}_")
        if on_answer is not None:
            on_answer(q, prediction)
        yield {"id": q.id, "images": q.images, "question": q.question, **prediction.to_json()}


def write_predictions(path: str | Path, rows: Iterator[dict[str, Any]]) -> int:
    """Write prediction rows as JSONL atomically; returns how many."""
    return write_jsonl(path, rows)
