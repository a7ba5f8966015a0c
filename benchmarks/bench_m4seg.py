"""Speed and peak memory of `prima data m4seg` on a synthetic M4Seg-format file of N records.

Writes a JSON list (or JSONL/parquet) of N records shaped like M4Seg's (2-5 images of 480x640, one
object and one part grounding per image, polygon masks), converts it, and prints records/s and the
process's peak resident memory. Run it at two sizes: memory that stays flat while N grows 10x is
what "streamed" means.

    .venv/bin/python benchmarks/bench_m4seg.py --num 10000 --format json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from prima.data.m4seg import convert_m4seg, load_sources

HEIGHT, WIDTH = 480, 640


def write_inputs(folder: Path, num: int, fmt: str, seed: int = 0) -> Path:
    rng = random.Random(seed)
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "height": HEIGHT, "width": WIDTH} for i in range(1, 201)]
    annotations = {
        "images": images,
        "categories": [{"id": 1, "name": "table"}, {"id": 2, "name": "table:drawer"}],
        "annotations": [{"id": 10_000 + i, "image_id": i, "category_id": 1} for i in range(1, 201)],
    }
    (folder / "ann.json").write_text(json.dumps(annotations))
    (folder / "images").mkdir()
    Image.new("RGB", (WIDTH, HEIGHT)).save(folder / "images" / "000001.jpg")
    for im in images[1:]:  # same bytes everywhere: only the existence check reads them
        (folder / "images" / im["file_name"]).write_bytes((folder / "images" / "000001.jpg").read_bytes())

    def polygon() -> list[list[float]]:
        x, y = rng.uniform(0, WIDTH - 120), rng.uniform(0, HEIGHT - 120)
        w, h = rng.uniform(20, 120), rng.uniform(20, 120)
        return [[x, y, x + w, y, x + w, y + h, x + w / 2, y + h * 1.2, x, y + h]]

    def record() -> dict:
        n = rng.randint(2, 5)
        ids = rng.sample(range(1, 201), n)
        answer = " ".join(
            f"The drawer_{k}0101 of the table_{k}01 in image {k}; the table_{k}01 again." for k in range(1, n + 1)
        )
        groundings = {
            f"img_{k}": [
                {"segmentation": polygon(), "name": "drawer", "obj_ann_id": 10_000 + ids[k - 1]},
                {"segmentation": polygon(), "name": "table", "obj_ann_id": 10_000 + ids[k - 1]},
            ]
            for k in range(1, n + 1)
        }
        return {
            "dataset_name": "paco_lvis",
            "img_ids": [str(i) for i in ids],
            "q": "Where could you keep pens?",
            "a": answer,
            "groundings": groundings,
        }

    path = folder / f"records.{'jsonl' if fmt == 'jsonl' else fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        for start in range(0, num, 5000):
            rows = [record() for _ in range(min(5000, num - start))]
            table = pa.Table.from_pylist([{**r, "groundings": json.dumps(r["groundings"])} for r in rows])
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        writer.close()
        return path
    with path.open("w") as f:
        if fmt == "json":
            f.write("[\n")
        for i in range(num):
            line = json.dumps(record())
            if fmt == "json":
                f.write(("," if i else "") + line + "\n")
            else:
                f.write(line + "\n")
        if fmt == "json":
            f.write("]\n")
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program.

    Linux's VmHWM belongs to the address space that exec creates; ``ru_maxrss`` would also carry the
    parent's peak over from before the fork.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert(path: Path) -> None:
    """Convert ``path`` in this process and print speed and this process's peak memory."""
    folder = path.parent
    sources = load_sources({"paco_lvis": folder / "ann.json"}, {"paco_lvis": folder / "images"})
    start, cpu_start = time.perf_counter(), time.process_time()
    report = convert_m4seg(path, sources=sources, out=folder / "out", log=io.StringIO())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    total = report.converted + report.rejected
    peak = peak_rss_mb()
    print(
        f"{path.suffix[1:]}: {total} records ({path.stat().st_size / 1e6:.0f} MB), converted {report.converted}, "
        f"rejected {report.rejected}, {seconds:.1f} s wall ({total / seconds:.0f} records/s), {cpu:.1f} s CPU "
        f"({total / cpu:.0f} records per CPU-second), peak RSS {peak:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=10000)
    parser.add_argument("--format", choices=["json", "jsonl", "parquet"], default="json")
    parser.add_argument("--convert", type=Path, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.convert:
        convert(args.convert)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = write_inputs(Path(tmp), args.num, args.format)
        # A fresh process converts, so its peak memory is the converter's, not the generator's.
        subprocess.run([sys.executable, __file__, "--convert", str(path)], check=True)


if __name__ == "__main__":
    main()
