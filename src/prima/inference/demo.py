"""`prima demo`: the bundled checkpoint answers the example scenes in examples/ (what `make demo` runs)."""

from __future__ import annotations

import time
from pathlib import Path

from prima.data.schema import strip_markup
from prima.inference.batch import prepare_out_dir, read_queries, write_prediction
from prima.inference.predictor import REPO_ROOT, PrimaPredictor, resolve_checkpoint
from prima.inference.render import format_summary, save_overlays

EXAMPLES = REPO_ROOT / "examples" / "queries.jsonl"


def run_demo(
    checkpoint: str | Path | None = None,
    out_dir: str | Path = "out/demo",
    device: str = "cpu",
    queries_path: str | Path = EXAMPLES,
) -> int:
    """Answer every example query, print answers and timings, write overlays + prediction.json per query."""
    start = time.perf_counter()
    resolve_checkpoint(checkpoint)  # say first that the checkpoint is missing: that is what a newcomer hits
    queries = read_queries(queries_path)
    prepare_out_dir(out_dir)
    predictor = PrimaPredictor.from_pretrained(checkpoint, device=device)
    loaded = time.perf_counter()
    print(f"checkpoint: {checkpoint or 'bundled'} (loaded in {loaded - start:.1f} s)")
    for n, q in enumerate(queries):
        t0 = time.perf_counter()
        images = predictor.load(q.paths)
        prediction = predictor.predict_loaded(images, q.question)
        seconds = time.perf_counter() - t0
        folder = Path(out_dir) / q.id
        pictures = save_overlays(images, prediction, folder)
        write_prediction(folder, prediction, {"id": q.id, "images": q.images, "question": q.question})
        print(f"\n[{q.id}] {len(q.paths)} images: {', '.join(q.images)}")
        print(f"Q: {q.question}")
        print("A: " + format_summary(prediction))
        if q.reference:
            print(f"   reference answer: {strip_markup(q.reference)}")
        print(f"   overlays: {', '.join(str(p) for p in pictures)}  ({seconds:.2f} s)")
        if n == 0:
            print(f"   cold start to first answer: {time.perf_counter() - start:.1f} s")
    print(f"\nwrote {len(queries)} answers under {out_dir}/")
    return 0
