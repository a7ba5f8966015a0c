"""Speed and peak memory of `prima data build` on a synthetic COCO-format dataset of N images.

Each 480x640 image gets 1-6 polygon objects from 12 COCO/PACO categories (chairs with seats and backs,
mugs with handles, ...) plus part annotations. Prints the CPU time to load, check and index the
annotations, and the CPU time per written sample after that. Run it at two sizes: time per sample
that stays flat while N grows is what "cost independent of dataset size" means.

    .venv/bin/python benchmarks/bench_build.py --images 2000 --num 1000
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from PIL import Image

from prima.data.build import BuildOptions, build_dataset

HEIGHT, WIDTH = 480, 640
OBJECTS = {
    "chair": ["seat", "back"],
    "mug": ["handle", "body"],
    "knife": ["handle", "blade"],
    "bench": ["seat", "back"],
    "bottle": ["cap", "body"],
    "dog": [],
    "horse": [],
    "truck": [],
    "cup": ["handle"],
    "book": [],
    "clock": ["hand"],
    "lamp": ["base"],
}


def write_dataset(folder: Path, num_images: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    names = list(OBJECTS)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    part_names = [f"{o}:{p}" for o in names for p in OBJECTS[o]]
    part_ids = {n: 100 + i for i, n in enumerate(part_names)}
    categories += [{"id": i, "name": n} for n, i in part_ids.items()]
    images, annotations = [], []
    (folder / "images").mkdir()
    Image.new("RGB", (WIDTH, HEIGHT)).save(folder / "images" / "0.jpg")
    data = (folder / "images" / "0.jpg").read_bytes()
    ann_id = 1
    for i in range(1, num_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "height": HEIGHT, "width": WIDTH})
        (folder / "images" / f"{i}.jpg").write_bytes(data)
        for _ in range(rng.randint(1, 6)):
            cat = rng.randrange(len(names))
            x, y = rng.uniform(0, WIDTH - 160), rng.uniform(0, HEIGHT - 160)
            w, h = rng.uniform(40, 160), rng.uniform(40, 160)
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            obj = ann_id
            annotations.append({"id": obj, "image_id": i, "category_id": cat + 1, "iscrowd": 0, "segmentation": [poly]})
            ann_id += 1
            for k, part in enumerate(OBJECTS[names[cat]]):
                py = y + k * h / 2
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": i,
                        "category_id": part_ids[f"{names[cat]}:{part}"],
                        "obj_ann_id": obj,
                        "iscrowd": 0,
                        "segmentation": [[x, py, x + w, py, x + w, py + h / 2, x, py + h / 2]],
                    }
                )
                ann_id += 1
    (folder / "instances.json").write_text(
        json.dumps({"images": images, "categories": categories, "annotations": annotations})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--num", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_dataset(folder, args.images)
        report = build_dataset(
            folder / "instances.json",
            images=folder / "images",
            out=folder / "out",
            options=BuildOptions(num=args.num, seed=0),
        )
    print(
        f"{args.images} images: load+index {report.load_cpu_s:.1f} s CPU; {report.written} samples in "
        f"{report.write_cpu_s:.2f} s CPU ({1000 * report.write_cpu_s / max(1, report.written):.2f} ms per sample)"
    )


if __name__ == "__main__":
    main()
