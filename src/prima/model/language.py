"""The causal LM: a transformers `LlamaForCausalLM` (built from a config or loaded from a local folder), its
vocabulary sized to the tokenizer (PRIMA's special tokens included), optionally frozen with LoRA via peft."""

from __future__ import annotations

from torch import nn

from prima.errors import PrimaError
from prima.model.config import LanguageConfig, TokenIds
from prima.model.vision import load_transformers_model


def build_language_model(cfg: LanguageConfig, tokens: TokenIds, *, load_weights: bool = True) -> nn.Module:
    """The LM with ``tokens.vocab_size`` embeddings; frozen base + LoRA when the config says so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokens.vocab_size is None:
        raise PrimaError("the model config has no vocabulary size; build the model with a tokenizer/processor")
    if cfg.pretrained and load_weights:
        model = load_transformers_model(LlamaForCausalLM, cfg.pretrained, "model.language.pretrained")
        if model.get_input_embeddings().num_embeddings != tokens.vocab_size:
            model.resize_token_embeddings(tokens.vocab_size)
    else:
        kwargs = {**cfg.config, "vocab_size": tokens.vocab_size}
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokens, name) is not None:
                kwargs[name] = getattr(tokens, name)
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    model.config.use_cache = True
    if cfg.freeze_base:
        model.requires_grad_(False)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)  # freezes everything but the adapters
        if not cfg.freeze_base:
            for name, p in model.named_parameters():
                if "lora_" not in name:
                    p.requires_grad_(True)
    if cfg.freeze_base and cfg.train_embeddings:
        # new special tokens ([SEG], image tags) need trainable rows, as LISA/GLaMM train embed_tokens + lm_head
        model.get_input_embeddings().requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    return model


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)
