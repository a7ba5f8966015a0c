"""Peak memory and time of loading a COCO-format annotation file, streamed (`load_coco`) vs `json.load`.

Writes a PACO-sized file shape at a chosen scale (images, object and part annotations with polygon
masks), then loads it in a fresh process each way and prints that process's peak resident memory
(Linux ``VmHWM``) and CPU time.

    .venv/bin/python benchmarks/bench_coco_load.py --annotations 200000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_file(path: Path, num_annotations: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    num_images = max(1, num_annotations // 12)
    with path.open("w") as f:
        f.write('{"info": {"description": "synthetic"}, "images": [')
        f.write(
            ",".join(
                json.dumps({"id": i, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640})
                for i in range(1, num_images + 1)
            )
        )
        f.write('], "categories": [{"id": 1, "name": "chair"}, {"id": 2, "name": "chair:seat"}], "annotations": [')
        for a in range(1, num_annotations + 1):
            poly = [round(rng.uniform(0, 600), 2) for _ in range(24)]
            ann = {
                "id": a,
                "image_id": rng.randint(1, num_images),
                "category_id": 1 + a % 2,
                "iscrowd": 0,
                "bbox": [1, 2, 3, 4],
                "area": 100.0,
                "segmentation": [poly],
            }
            if a % 2 == 0:
                ann["obj_ann_id"] = a - 1
            f.write(("," if a > 1 else "") + json.dumps(ann))
        f.write("]}")


def measure(path: Path, how: str) -> None:
    """Load ``path`` in this process and print this process's peak memory."""
    start = time.process_time()
    if how == "stream":
        from prima.data.coco import load_coco

        index = load_coco(path, keep_segmentations=False)
        count = len(index.annotations)
    else:
        with path.open() as f:
            count = len(json.load(f)["annotations"])
    cpu = time.process_time() - start
    hwm = next(
        int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")
    )
    print(f"{how:7s}: {count} annotations, {cpu:.1f} s CPU, peak RSS {hwm / 1024:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=200_000)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # the child process's job: PATH HOW
    args = parser.parse_args()
    if args.measure:
        measure(Path(args.measure[0]), args.measure[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotations.json"
        write_file(path, args.annotations)
        print(f"{path.stat().st_size / 1e6:.0f} MB file")
        for how in ("stream", "json"):
            subprocess.run([sys.executable, __file__, "--measure", str(path), how], check=True)


if __name__ == "__main__":
    main()
