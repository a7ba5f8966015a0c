"""How fast `prima data synth` writes a dataset: samples/s, images/s and CPU time, end to end.

    .venv/bin/python benchmarks/synth_speed.py --num 10000 --size 256 --workers 2

Runs generate_dataset exactly as the CLI does (progress bar off) into a temporary folder (or --out),
then prints one JSON line. With --stages N it instead times the stages of N samples in this process
(background bank warmed first, files not written: file creation is timed on its own). Wall time depends on what else runs on the machine; the CPU seconds of this
process and its workers are printed too, so a busy machine can be told apart from a slow generator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from prima.data.synth import generate_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-images", type=int, default=2)
    parser.add_argument("--max-images", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", default=None, help="keep the dataset here (default: a temporary folder)")
    parser.add_argument("--stages", type=int, default=0, help="time the stages of this many samples instead")
    args = parser.parse_args()
    if args.stages:
        print(json.dumps(stage_times(args.stages, args.size, args.seed)))
        return

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="synth_speed_"))
    start_wall = time.perf_counter()
    start_cpu = _cpu_seconds()
    path = generate_dataset(
        out,
        num=args.num,
        seed=args.seed,
        min_images=args.min_images,
        max_images=args.max_images,
        size=args.size,
        workers=args.workers,
        progress=False,
    )
    wall = time.perf_counter() - start_wall
    cpu = _cpu_seconds() - start_cpu
    images = sum(1 for _ in (out / "images").iterdir())
    disk = sum(p.stat().st_size for p in (out / "images").iterdir()) + path.stat().st_size
    print(
        json.dumps(
            {
                "num": args.num,
                "size": args.size,
                "workers": args.workers or os.cpu_count(),
                "images": images,
                "wall_s": round(wall, 1),
                "samples_per_s": round(args.num / wall, 1),
                "images_per_s": round(images / wall, 1),
                "cpu_s": round(cpu, 1),
                "cpu_ms_per_sample": round(1000 * cpu / args.num, 2),
                "disk_mb": round(disk / 2**20, 1),
                "load_avg_1min_after": round(os.getloadavg()[0], 2),
            }
        )
    )
    if not args.out:
        shutil.rmtree(out)


def stage_times(num: int, size: int, seed: int) -> dict:
    """CPU milliseconds per sample spent in each stage, by wrapping the stage functions with timers."""
    from prima.data import synth, synth_questions, synth_scene

    totals: dict[str, float] = {}

    def timed(module, name, label):
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.process_time() - start

        setattr(module, name, wrapper)

    for number in range(synth_scene.BACKGROUNDS):  # warm the bank, as a long run has it
        synth_scene._banked_background(size, number)
    timed(synth_questions, "layout_scene", "layout")
    timed(synth_questions, "paint_scene", "paint")
    timed(synth_questions, "encode_rle", "rle")
    timed(synth, "png_bytes", "png")
    folder = Path(tempfile.mkdtemp(prefix="synth_stages_"))
    start = time.process_time()
    images = 0
    for index in range(num):
        _, pixels = synth.generate_sample(seed, "train", index, size=size)
        for k, image in enumerate(pixels):
            data = synth.png_bytes(image)
            write_start = time.process_time()
            (folder / f"{index}_{k}.png").write_bytes(data)
            totals["files"] = totals.get("files", 0.0) + time.process_time() - write_start
        images += len(pixels)
    total = time.process_time() - start
    shutil.rmtree(folder)
    out = {"num": num, "size": size, "images": images, "total_ms_per_sample": round(1000 * total / num, 2)}
    out.update({f"{k}_ms_per_sample": round(1000 * v / num, 2) for k, v in totals.items()})
    out["other_ms_per_sample"] = round(1000 * (total - sum(totals.values())) / num, 2)
    return out


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the worker pool)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
