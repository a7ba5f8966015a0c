"""Loading a model whose vision encoder, Q-Former, LLM, tokenizer and SAM were saved as separate transformers
checkpoints, the way a user points `pretrained:` paths at real weights (tiny random ones here)."""

from __future__ import annotations

import pytest
import torch

from prima.config import from_dict
from prima.model import ModelConfig, PrimaModel, create_model
from test_model import grounded_sample, make_batch, negative_sample, random_images

WORDS = [
    "the",
    "chair",
    "is",
    "by",
    "desk",
    "and",
    "its",
    "legs",
    "where",
    "can",
    "i",
    "sit",
    "no",
    "none",
    "of",
    "images",
    "shows",
    "a",
    "lamp",
    "is",
    "there",
    ",",
    ".",
    "?",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders holding a tiny InstructBLIP vision model, Q-Former, Llama, SAM and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        InstructBlipQFormerConfig,
        InstructBlipQFormerModel,
        InstructBlipVisionConfig,
        InstructBlipVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        SamConfig,
        SamModel,
    )

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    InstructBlipVisionModel(
        InstructBlipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
    ).save_pretrained(root / "vision")
    InstructBlipQFormerModel(
        InstructBlipQFormerConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=32,
            vocab_size=64,
            cross_attention_frequency=1,
            max_position_embeddings=64,
        )
    ).save_pretrained(root / "qformer")
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=40,
            max_position_embeddings=256,
        )
    ).save_pretrained(root / "llm")
    SamModel(
        SamConfig(
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                global_attn_indexes=[1],
                image_size=64,
                patch_size=16,
                output_channels=32,
                mlp_dim=64,
                window_size=2,
                num_pos_feats=16,
            ),
            prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
            mask_decoder_config=dict(
                hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
            ),
        )
    ).save_pretrained(root / "sam")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        root / "tokenizer"
    )
    return root


def config(root, *, lora: bool = True) -> ModelConfig:
    return from_dict(
        ModelConfig,
        {
            "cross_image": "square",
            "vision": {
                "kind": "instructblip",
                "image_size": 28,
                "package_weights": False,
                "pretrained": str(root / "vision"),
            },
            "qformer": {"num_queries": 4, "pretrained": str(root / "qformer"), "frozen": True},
            "relational": {"num_heads": 2},
            "language": {
                "pretrained": str(root / "llm"),
                "freeze_base": True,
                "lora": {"enabled": lora, "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            },
            "grounding": {"kind": "sam", "pretrained": str(root / "sam"), "image_size": 64},
            "tokenizer": {"kind": "pretrained", "pretrained": str(root / "tokenizer")},
        },
        prefix="model",
    )


def _same(module: torch.nn.Module, reference: torch.nn.Module) -> bool:
    ref = reference.state_dict()
    return all(torch.equal(v, ref[k]) for k, v in module.state_dict().items() if k in ref)


@pytest.fixture(scope="module")
def model(checkpoints):
    torch.manual_seed(1)
    return create_model(config(checkpoints))


def test_components_carry_the_saved_weights(model, checkpoints):
    from transformers import InstructBlipQFormerModel, InstructBlipVisionModel, LlamaForCausalLM, SamModel

    assert _same(model.vision.model, InstructBlipVisionModel.from_pretrained(checkpoints / "vision"))
    assert _same(model.query.qformer, InstructBlipQFormerModel.from_pretrained(checkpoints / "qformer"))
    assert _same(model.grounding.sam.vision_encoder, SamModel.from_pretrained(checkpoints / "sam").vision_encoder)
    llama = LlamaForCausalLM.from_pretrained(checkpoints / "llm")
    base = model.language.get_base_model()
    layer = base.model.layers[0].self_attn
    assert torch.equal(layer.q_proj.base_layer.weight, llama.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(layer.k_proj.weight, llama.model.layers[0].self_attn.k_proj.weight)
    # the tokenizer's 24 words + 3 specials grew by PRIMA's 11 tokens, the image slot and a pad token
    assert (
        model.config.tokens.vocab_size == len(model.processor.tokenizer) == base.get_input_embeddings().num_embeddings
    )
    assert torch.equal(base.get_input_embeddings().weight[:27], llama.get_input_embeddings().weight[:27])


def test_frozen_parts_and_lora_follow_the_config(model, checkpoints):
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.query.qformer.parameters())
    assert not any(p.requires_grad for p in model.grounding.sam.vision_encoder.parameters())
    assert any(p.requires_grad for p in model.grounding.sam.mask_decoder.parameters())
    names = {n for n, p in model.language.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in names) and any("embed_tokens" in n for n in names)
    assert not any("k_proj" in n for n in names)  # frozen base
    off = create_model(config(checkpoints, lora=False))
    assert not any("lora_" in n for n, _ in off.language.named_parameters())  # the switch turns LoRA off


def test_forward_backward_and_generate_through_sam(model):
    model.train()
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    assert batch["grounding_pixel_values"].shape[1:] == (3, 64, 64)
    out = model(batch)
    assert [m.shape for m in out.mask_logits] == [(3, 16, 16), (0, 16, 16)]  # SAM's low-res masks (64 px / 4)
    out.loss.backward()
    assert model.grounding.sam.mask_decoder.iou_token.weight.grad is not None
    model.eval()
    result = model.generate(random_images(2), "where can i sit ?", max_new_tokens=5)
    assert isinstance(result.answer, str)


def test_checkpoint_stores_only_trained_weights_and_round_trips(model, tmp_path):
    from safetensors.torch import load_file

    model.eval()
    model.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert not any(k.startswith(("vision.", "query.qformer.", "grounding.sam.vision_encoder.")) for k in stored)
    assert any("lora_" in k for k in stored) and any(k.startswith("grounding.sam.mask_decoder.") for k in stored)
    assert not any(k.startswith("language.") and "k_proj" in k for k in stored)  # frozen LLM base: its own folder
    loaded = PrimaModel.from_pretrained(tmp_path)
    batch = make_batch(model, [grounded_sample()])
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mask_logits[0], b.mask_logits[0])


TINY_SAM = {
    "vision_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "global_attn_indexes": [1],
        "image_size": 64,
        "patch_size": 16,
        "output_channels": 32,
        "mlp_dim": 64,
        "window_size": 2,
        "num_pos_feats": 16,
    },
    "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 16, "mask_input_channels": 4},
    "mask_decoder_config": {
        "hidden_size": 32,
        "mlp_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "iou_head_hidden_dim": 32,
    },
}


@pytest.mark.parametrize("variant", ["concat", "none"])
def test_glamm_and_lisa_style_models_at_tiny_scale(variant):
    """CLIP patch tokens through the MLP projector (no Q-Former), SAM grounding: the baselines' code path."""
    from test_model import TEXTS

    cfg = from_dict(
        ModelConfig,
        {
            "cross_image": variant,
            "qformer": None,
            "vision": {
                "kind": "clip",
                "image_size": 28,
                "package_weights": False,
                "select_layer": -2,
                "config": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "patch_size": 14,
                    "projection_dim": 16,
                },
            },
            "language": {
                "config": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                }
            },
            "grounding": {"kind": "sam", "sam": TINY_SAM, "image_size": 64, "freeze_encoder": True},
            "tokenizer": {"kind": "wordlevel"},
        },
        prefix="model",
    )
    torch.manual_seed(0)
    model = create_model(cfg, TEXTS)
    assert model.tokens_per_image == 4  # (28 / 14)^2 patch tokens, CLS dropped
    model.train()
    out = model(make_batch(model, [grounded_sample(), negative_sample()]))
    out.loss.backward()
    assert [m.shape for m in out.mask_logits] == [(3, 16, 16), (0, 16, 16)]
    assert model.query.projector[0].weight.grad is not None
    model.eval()
    assert isinstance(model.generate(random_images(3), "Where?", max_new_tokens=4).answer, str)
