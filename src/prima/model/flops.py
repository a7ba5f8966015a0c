"""FLOPs and parameter counts of the full-scale presets, built on the `meta` device (no weights, no memory).

Per sample with N images, counted with `torch.utils.flop_counter.FlopCounterMode` (a multiply-add = 2 FLOPs):

- vision: the vision encoder on N images;
- query: the query module (Q-Former + SQuARE, or the MLP projector) for the N images, the question being
  ``QUESTION_TOKENS`` Q-Former tokens;
- llm: one causal forward over the prompt (system + question: ``PROMPT_TEXT_TOKENS`` tokens, plus each image's
  block) followed by ``ANSWER_TOKENS`` answer tokens — the same matrix products as prefill + cached greedy decoding;
- grounding: the grounding encoder on every grounded image and the mask decoder for ``NUM_MASKS`` masks.

PRIMA is counted twice: grounding every image, and with lazy grounding of one image (all masks on it).
The GLaMM/LISA-style baselines ground every image (their pipelines encode every image with SAM up front).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prima.model.config import ModelConfig, TokenIds, image_tokens_per_image, load_model_config

PROMPT_TEXT_TOKENS = 64
ANSWER_TOKENS = 64
QUESTION_TOKENS = 32
NUM_MASKS = 3
BASE_VOCAB = 32000  # Vicuna/Llama
QFORMER_VOCAB = 30522  # InstructBLIP's BERT tokenizer
PRESETS = ("paper", "glamm", "lisa")


@dataclass
class FlopsRow:
    preset: str
    cross_image: str
    num_images: int
    grounded_images: int
    tflops: float
    vision: float
    query: float
    llm: float
    grounding: float
    params_total: int
    params_trainable: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def synthetic_token_ids(vocab: int = BASE_VOCAB) -> TokenIds:
    """Token ids as a pretrained Llama tokenizer plus PRIMA's 11 special tokens and the image slot would give."""
    extra = list(range(vocab, vocab + 12))
    return TokenIds(
        vocab_size=vocab + 12,
        qformer_vocab_size=QFORMER_VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        seg_token_id=extra[0],
        phrase_start_id=extra[1],
        phrase_end_id=extra[2],
        image_start_id=extra[3],
        image_end_id=extra[4],
        image_tag_ids=extra[5:10],
        image_slot_id=extra[11],
    )


def build_meta_model(cfg: ModelConfig) -> Any:
    """The model of ``cfg`` on the meta device, from configs only (pretrained paths ignored)."""
    from prima.model.prima import PrimaModel

    cfg = copy.deepcopy(cfg)
    if not cfg.tokens.complete:
        cfg.tokens = synthetic_token_ids()
    with torch.device("meta"):
        return PrimaModel(cfg, load_weights=False)


def count_flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # meta tensors: no memory, so autograd state is harmless
        fn()
    return int(counter.get_total_flops())


def measure(model: Any, num_images: int, grounded_images: int, num_masks: int = NUM_MASKS) -> dict[str, int]:
    """FLOPs per component for one sample (see the module docstring for what each counts)."""
    cfg: ModelConfig = model.config
    dev = torch.device("meta")
    s = cfg.vision.image_size
    pixels = torch.zeros(num_images, 3, s, s, device=dev)
    out: dict[str, int] = {}
    features: list[torch.Tensor] = []

    def vision() -> None:
        features.extend(model.encode_images(pixels))

    out["vision"] = count_flops(vision)
    sample_index = torch.zeros(num_images, dtype=torch.long)  # index tensors stay on the host
    qids = torch.ones(1, QUESTION_TOKENS, dtype=torch.long, device=dev)
    out["query"] = count_flops(lambda: model.visual_tokens(features, sample_index, qids))
    per_image = image_tokens_per_image(cfg) + 3  # <im_start> V_i <im_end> (IMAGEi)
    length = PROMPT_TEXT_TOKENS + num_images * per_image + ANSWER_TOKENS
    hidden = model.language.config.hidden_size
    embeds = torch.zeros(1, length, hidden, device=dev)
    from transformers import DynamicCache

    # an (empty) cache keeps transformers from inspecting position ids for packed sequences, which needs values
    out["llm"] = count_flops(
        lambda: model.language(inputs_embeds=embeds, past_key_values=DynamicCache(), use_cache=True)
    )

    def grounding() -> None:
        images = torch.arange(grounded_images)
        batch: dict[str, Any] = {}
        if cfg.grounding.kind == "sam":
            g = cfg.grounding.image_size
            batch["grounding_pixel_values"] = torch.zeros(num_images, 3, g, g, device=dev)
        state = model.encode_grounding(batch, features, images)
        local = torch.arange(num_masks) % grounded_images
        prompts = model.seg_projector(torch.zeros(num_masks, hidden, device=dev))
        model.grounding.decode(state, local, prompts)

    out["grounding"] = count_flops(grounding)
    return out


def flops_table(presets: Sequence[str] = PRESETS, images: Sequence[int] = (1, 2, 3, 4, 5)) -> list[FlopsRow]:
    """One row per preset and image count (PRIMA also with lazy grounding of one image)."""
    rows = []
    for preset in presets:
        cfg = load_model_config(preset)
        model = build_meta_model(cfg)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for n in images:
            variants = [n]
            if cfg.cross_image == "square" and n > 1:
                variants.append(1)  # lazy grounding: only the one image the answer names
            for grounded in variants:
                parts = measure(model, n, grounded)
                rows.append(
                    FlopsRow(
                        preset=preset if grounded == n else f"{preset} (lazy, 1 image grounded)",
                        cross_image=cfg.cross_image,
                        num_images=n,
                        grounded_images=grounded,
                        tflops=round(sum(parts.values()) / 1e12, 2),
                        vision=round(parts["vision"] / 1e12, 3),
                        query=round(parts["query"] / 1e12, 3),
                        llm=round(parts["llm"] / 1e12, 3),
                        grounding=round(parts["grounding"] / 1e12, 3),
                        params_total=total,
                        params_trainable=trainable,
                    )
                )
    return rows


def component_parameters(preset: str) -> dict[str, int]:
    """Parameter counts of the main components of a preset (to check them against the real architectures)."""
    model = build_meta_model(load_model_config(preset))
    counts = {"vision": sum(p.numel() for p in model.vision.parameters())}
    if hasattr(model.query, "qformer"):
        counts["qformer"] = sum(p.numel() for p in model.query.qformer.parameters())
    base = model.language.get_base_model() if hasattr(model.language, "get_base_model") else model.language
    counts["llm"] = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    if hasattr(model.grounding, "sam"):
        counts["sam"] = sum(p.numel() for p in model.grounding.sam.parameters())
    return counts


def format_table(rows: Sequence[FlopsRow]) -> str:
    header = (
        f"{'preset':<34} {'cross_image':<11} {'images':>6} {'TFLOPs':>8} {'vision':>7} {'query':>7} "
        f"{'llm':>7} {'ground':>7} {'params':>8} {'trainable':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.preset:<34} {r.cross_image:<11} {r.num_images:>6} {r.tflops:>8.2f} {r.vision:>7.2f} {r.query:>7.2f} "
            f"{r.llm:>7.2f} {r.grounding:>7.2f} {r.params_total / 1e9:>7.3f}B {r.params_trainable / 1e6:>9.1f}M"
        )
    lines.append(
        f"per sample; LLM: {PROMPT_TEXT_TOKENS} prompt text tokens + image blocks + {ANSWER_TOKENS} answer tokens; "
        f"grounding: {NUM_MASKS} masks; Q-Former question: {QUESTION_TOKENS} tokens"
    )
    return "\n".join(lines)
