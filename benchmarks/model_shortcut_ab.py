"""A/B of `model.qformer.shortcut` on the tiny preset: N training steps, then teacher-forced validation.

Trains tiny (spatial prior as in configs/tiny.yaml) for STEPS AdamW steps (batch 8, lr 2e-3, 20 warm-up steps,
cosine) on training samples whose frozen features are already in the trainer's feature cache
(.cache/features), then reports on the first 48 validation samples: text CE, DICE, the accuracy of the tokens
inside <p> ... </p> (the phrases: colours and object names, which only the images can tell), and how much the
visual tokens vary across images and positions (std / mean norm; near 0 means the LLM sees the same tokens
for every image). One thread, seed 0.

    .venv/bin/python benchmarks/model_shortcut_ab.py false 300
    .venv/bin/python benchmarks/model_shortcut_ab.py true 300
    .venv/bin/python benchmarks/model_shortcut_ab.py grounding.phrase_pooling=true 200   # any model override
"""

import math
import random
import sys
import time

import torch

from prima.data.collate import collate_samples
from prima.data.schema import read_samples
from prima.model import create_model, load_model_config
from prima.model.vision import stack_image_features
from prima.train.run import make_feature_cache

torch.set_num_threads(1)
flag = sys.argv[1]
steps = int(sys.argv[2])
train = read_samples("data/synth/train/samples.jsonl", validate=False)
val = read_samples("data/synth/val/samples.jsonl", validate=False)[:48]
for s in train:
    s.images = [f"data/synth/train/{p}" for p in s.images]
for s in val:
    s.images = [f"data/synth/val/{p}" for p in s.images]
torch.manual_seed(0)
random.seed(0)
model = create_model(
    load_model_config("tiny", [flag if "=" in flag else f"qformer.shortcut={flag}"]),
    [t for s in train for t in (s.question, s.answer)],
)
cache = make_feature_cache(model, ".cache/features")


def enc(paths):
    with torch.no_grad():
        from prima.model.vision import split_image_features

        return [
            [t.cpu() for t in f]
            for f in split_image_features(model.encode_images(model.processor.preprocess_images(paths)))
        ]


cached = [s for s in train if all(cache.get(p) is not None for p in s.images[:1])][: steps * 8]
print("cached train samples", len(cached), cache.prefix, flush=True)


def batch_of(samples):
    b = collate_samples(samples, None, model.processor, model.config, include_pixels=False)
    b["image_features"] = stack_image_features(cache.features([p for s in samples for p in s.images], enc))
    return b


opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3, weight_decay=0.01)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda i: min(1, (i + 1) / 20) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / steps)))
)
model.train()
t = time.time()
for i in range(steps):
    b = batch_of(random.sample(cached, 8))
    out = model(b)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    if i % 50 == 49:
        print(i + 1, round(float(out.loss_ce), 3), round(float(out.loss_dice), 3), round(time.time() - t), flush=True)
model.eval()
ce = dice = 0
hit = tot = 0
tk = model.config.tokens
with torch.no_grad():
    for j in range(0, 48, 8):
        b = batch_of(val[j : j + 8])
        o = model(b)
        ce += float(o.loss_ce)
        dice += float(o.loss_dice)
        pred = o.logits[:, :-1].argmax(-1)
        tgt = b["labels"][:, 1:]
        inside = torch.zeros_like(tgt, dtype=torch.bool)
        for r in range(tgt.shape[0]):
            on = False
            for c in range(tgt.shape[1]):
                if tgt[r, c] == tk.phrase_start_id:
                    on = True
                    continue
                if tgt[r, c] == tk.phrase_end_id:
                    on = False
                inside[r, c] = on
        hit += int(((pred == tgt) & inside).sum())
        tot += int(inside.sum())
    V = []
    for s in val[:10]:
        f = stack_image_features(cache.features(s.images, enc))
        q = torch.tensor([model.processor.encode_qformer_text(s.question)])
        V.append(model.visual_tokens(f, torch.zeros(len(s.images), dtype=torch.long), q).reshape(-1, 256))
    V = torch.cat(V)
print("phrase token acc", round(hit / tot, 3), tot)
print(
    "shortcut",
    flag,
    "val ce",
    round(ce / 6, 3),
    "val dice",
    round(dice / 6, 3),
    "V std/mean",
    round((V.std(0).norm() / V.mean(0).norm()).item(), 3),
    flush=True,
)
