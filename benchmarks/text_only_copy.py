"""Can the tiny LLM alone learn to copy "left" / "right" from the question? A control for benchmarks/question_copy.py.

Trains configs/tiny.yaml's Llama (same width, depth, heads, tied embeddings unless --untied; the trainer's AdamW and
learning-rate schedule over --steps steps, gradient clip and batch size from the config) from scratch on the
question and answer text of the training samples alone: the prompt keeps its image blocks, each visual token being
the `<image>` word's embedding, so positions are as in the model, but no image is seen. Every --every steps it
prints the share of the `spatial` / `spatial-compare` samples of --val for which, given the reference answer so far,
the LLM ranks the question's direction above the other one at the answer's first "left" / "right"
(question_copy.py's "direction").

    .venv/bin/python benchmarks/text_only_copy.py --steps 3000 --stop 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import random

import torch
import torch.nn.functional as F
from question_copy import DIRECTION_FAMILIES  # benchmarks/ is on sys.path when this script runs
from transformers import LlamaConfig, LlamaForCausalLM

from prima.model import PrimaModel
from prima.train.config import load_run_config
from prima.train.data import load_samples
from prima.train.trainer import lr_lambda, make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-from", default="checkpoints/prima-tiny-synth", help="a checkpoint's processor")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--train", default="data/synth/train/samples.jsonl")
    parser.add_argument("--train-limit", type=int, default=6000)
    parser.add_argument("--val", default="data/synth/val3/samples.jsonl")
    parser.add_argument("--steps", type=int, default=3000, help="the length of the learning-rate schedule")
    parser.add_argument("--stop", type=int, default=None, help="stop after this step (default: --steps)")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--untied", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = load_run_config(args.config)
    proc = PrimaModel.from_pretrained(args.tokenizer_from).processor
    tok = proc.tokenizer
    llm = {**cfg.model.language.config, "tie_word_embeddings": not args.untied}
    model = LlamaForCausalLM(
        LlamaConfig(**llm, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    )

    def encode(s):
        return proc.encode_prompt(s.question, len(s.images)), proc.encode_answer(s.answer)

    train = [encode(s) for s in load_samples(args.train, limit=args.train_limit)]
    val = [encode(s) for s in load_samples(args.val) if s.family in DIRECTION_FAMILIES]
    left, right = tok.convert_tokens_to_ids("left"), tok.convert_tokens_to_ids("right")
    t = dataclasses.replace(cfg.train, max_steps=args.steps)
    opt = make_optimizer(model, t)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))

    def batch(items):
        n = max(len(p) + len(a) for p, a in items)
        ids = torch.full((len(items), n), tok.pad_token_id)
        labels = torch.full((len(items), n), -100)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, (p, a) in enumerate(items):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        return ids, mask, labels

    def direction_accuracy() -> float:
        model.eval()
        hits = 0
        with torch.no_grad():
            for p, a in val:
                ids, mask, _ = batch([(p, a)])
                logits = model(input_ids=ids, attention_mask=mask).logits[0]
                pos = next(i for i in range(len(p), len(p) + len(a)) if int(ids[0, i]) in (left, right))
                want = int(ids[0, pos])
                other = right if want == left else left
                hits += int(logits[pos - 1, want] > logits[pos - 1, other])
        model.train()
        return hits / len(val)

    order: list[int] = []
    for step in range(args.stop or args.steps):
        if len(order) < t.batch_size:
            order = list(range(len(train)))
            rng.shuffle(order)
        ids, mask, labels = batch([train[order.pop()] for _ in range(t.batch_size)])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % args.every == 0:
            print(
                f"step {step + 1}: loss {loss.item():.3f}, direction ranked first {direction_accuracy():.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
