"""Training-step throughput of PRIMA: square vs concat, samples/s, step time, peak memory and MFU.

On CUDA it runs the `paper` preset (EVA ViT-g, Q-Former, Vicuna-7B-sized Llama with LoRA, SAM ViT-H) with
random weights in bf16 autocast; on a CPU it runs the `tiny` preset in fp32 so the script is known to work
before a GPU is at hand. Every sample has ``--images`` images (synthetic scenes) and a grounded answer.

    python benchmarks/gpu_step.py                       # paper on CUDA, tiny on CPU
    python benchmarks/gpu_step.py --preset tiny --steps 3 --json out.json

Model FLOPs per step are counted with `torch.utils.flop_counter.FlopCounterMode` over one real training
step (forward + backward of this exact batch, frozen parts included as they run); MFU divides the achieved
FLOP/s by the device's dense bf16 peak (``--peak-tflops``, known for H100/H200/A100). The tokenizer is a
word-level one trained on the synthetic text (no pretrained tokenizer is needed), so the LM head is smaller
than Vicuna's 32K vocabulary: a difference of well under 1% of the step's FLOPs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def make_samples(folder: Path, num: int, images: int, size: int) -> list:
    from prima.data.synth import generate_dataset
    from prima.train.data import load_samples

    path = generate_dataset(
        folder, num=num, seed=0, split="train", min_images=images, max_images=images, size=size, workers=1,
        progress=False,
    )  # fmt: skip
    return load_samples(path)


def bench_variant(preset: str, variant: str, samples: list, device: torch.device, args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from prima.data.collate import collate_samples
    from prima.model.config import load_model_config
    from prima.model.prima import create_model
    from prima.train.trainer import move_to_device

    overrides = [f"model.cross_image={variant}"]
    if preset != "tiny":  # random weights: a tokenizer trained on the synthetic text stands in for Vicuna's
        overrides += ["model.tokenizer.kind=wordlevel", "model.tokenizer.qformer_pretrained=null"]
    cfg = load_model_config(preset, overrides)
    texts = [t for s in samples for t in (s.question, s.answer)]
    with torch.device(device):
        model = create_model(cfg, texts, load_weights=False)
    bf16 = device.type == "cuda"
    if bf16:
        model.to(torch.bfloat16)  # weights in bf16 too (LoRA/adapters train in bf16 under autocast)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    batch = move_to_device(collate_samples(samples[: args.batch], None, model.processor, model.config), device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    step_s = (time.perf_counter() - started) / args.steps
    peak = peak_tflops(device, args.peak_tflops)
    row = {
        "preset": preset,
        "cross_image": variant,
        "images_per_sample": args.images,
        "batch": args.batch,
        "step_s": step_s,
        "samples_per_s": args.batch / step_s,
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / step_s / 1e12,
        "mfu": (flops / step_s / 1e12) / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "params_total_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "params_trainable_m": sum(p.numel() for p in trainable) / 1e6,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bf16" if bf16 else "fp32",
    }
    return row  # the model is freed when this frame goes; main() empties the CUDA cache between variants


def markdown(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "| preset | cross_image | device | dtype | batch x images | step (s) | samples/s | TFLOPs/step | MFU | peak mem (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['cross_image']} | {r['device']} | {r['dtype']} | {r['batch']} x {r['images_per_sample']} "
            f"| {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {r['tflops_per_step']:.3f} | {fmt(r['mfu'], '.1%')} "
            f"| {fmt(r['peak_memory_gib'], '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="default: paper on CUDA, tiny on CPU")
    p.add_argument("--variants", nargs="+", default=["square", "concat"])
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("paper" if device.type == "cuda" else "tiny")
    size = 256
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_samples(Path(tmp) / "synth", args.batch, args.images, size)
        rows = []
        for v in args.variants:
            rows.append(bench_variant(preset, v, samples, device, args))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
