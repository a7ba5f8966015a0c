"""Grounding: from a `[SEG]` prompt embedding and one image's features to a mask and a score.

Two decoders behind one interface (`encode` once per image, then `decode` any number of prompts per image):

- `OneWayMaskDecoder` (tiny): SAM-style prompt tokens + ONE-WAY transformer. Per image, pixel features are
  computed once from the multi-scale skip features (a small FPN down to stride 2, so thin parts survive) and
  shared by all of that image's prompts; each prompt's tokens cross-attend to the image tokens (the image
  tokens are never updated per prompt — that is what makes it 4-7x cheaper than SAM's two-way decoder on a
  CPU); the mask is the dot product of the mask token (through a hypernetwork MLP) with the pixel features.
- `SamGrounding` (paper): transformers `SamModel`'s vision encoder, prompt encoder and mask decoder; the
  prompt embedding is SAM's sparse prompt, the dense prompt is SAM's "no mask" embedding (as in LISA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prima.model.config import GroundingConfig
from prima.model.vision import load_transformers_model


@dataclass
class GroundingImages:
    """Per-image state computed once and shared by all prompts on that image."""

    tokens: torch.Tensor | None  # one_way: (n, T, D) image tokens with positions added
    pixels: torch.Tensor  # one_way: (n, P, h, w) pixel features; sam: (n, 256, 64, 64) image embeddings


class OneWayMaskDecoder(nn.Module):
    """Small SAM-style prompt encoder + one-way mask decoder over multi-scale CNN features."""

    def __init__(
        self,
        cfg: GroundingConfig,
        channels: list[int],
        strides: tuple[int, ...],
        image_size: int,
        token_stride: int,
        vocab_size: int,
    ):
        super().__init__()
        d, p = cfg.hidden_size, cfg.pixel_dim
        self.prompt_dim = d
        self.strides = strides
        self.mask_stride = cfg.mask_stride
        self.token_index = strides.index(token_stride)
        grid = image_size // token_stride
        # image tokens (the transformer's keys/values)
        self.token_proj = nn.Conv2d(channels[self.token_index], d, 1)
        self.token_pos = nn.Parameter(torch.randn(1, grid * grid, d) * 0.02)
        # pixel decoder: lateral 1x1 per scale, top-down sum, 3x3 refinement, down to the mask stride
        used = [i for i, s in enumerate(strides) if s >= cfg.mask_stride]
        self.pixel_scales = used
        self.lateral = nn.ModuleList([nn.Conv2d(channels[i], p, 1) for i in used])
        self.refine = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(p, p, 3, padding=1), nn.GroupNorm(1, p), nn.GELU()) for _ in used]
        )
        # prompt: the [SEG] embedding plus learned mask and score output tokens, as in SAM
        self.output_tokens = nn.Parameter(torch.randn(2, d) * 0.02)  # 0: mask, 1: score
        self.layers = nn.ModuleList([OneWayBlock(d, cfg.num_heads) for _ in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(d)
        self.hypernetwork = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, p))
        self.score_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.grid = grid
        self.locator = nn.Linear(d, d) if cfg.spatial_prior else None  # mask token -> query over image tokens
        # phrase words as extra prompt tokens: the decoder's own word table plus a position per word
        self.words = nn.Embedding(vocab_size, d) if cfg.phrase_tokens else None
        self.word_pos = nn.Parameter(torch.randn(cfg.phrase_tokens, d) * 0.02) if cfg.phrase_tokens else None
        # image choice: a learned token reads the same prompt against a candidate image through the same layers and
        # becomes a query; the image's logit is its best match among the image tokens (a logsumexp, not softmax
        # attention, whose normalised output cannot say how well the best token matched)
        self.choice_token = nn.Parameter(torch.randn(1, d) * 0.02) if cfg.image_choice else None
        self.choice_query = nn.Linear(d, d) if cfg.image_choice else None
        self.choice_layers = (
            nn.ModuleList([OneWayBlock(d, cfg.num_heads) for _ in range(cfg.num_layers)])
            if cfg.image_choice and cfg.choice_layers
            else None
        )
        self.reader = self.checker = None
        if cfg.word_readout or cfg.phrase_check:
            with torch.random.fork_rng(devices=[]):  # drawn without moving the random stream: every other weight
                # starts as without them
                if cfg.word_readout:
                    self.reader = WordReader(channels, d, vocab_size, margin=image_size // 16)
                if cfg.phrase_check:  # the same reading, every word of the phrase at once (multi-label)
                    self.checker = WordReader(channels, d, vocab_size, margin=image_size // 16)

    def encode_tokens(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Image tokens (n, T, D) with positions added: the transformer's keys and values."""
        return self.token_proj(features[self.token_index]).flatten(2).transpose(1, 2) + self.token_pos

    def encode(self, features: list[torch.Tensor]) -> GroundingImages:
        """Image tokens and pixel features of n images from their multi-scale features (each (n, C_s, H_s, W_s))."""
        tokens = self.encode_tokens(features)
        x = None
        for k in reversed(range(len(self.pixel_scales))):
            lateral = self.lateral[k](features[self.pixel_scales[k]])
            x = lateral if x is None else lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = self.refine[k](x)
        return GroundingImages(tokens=tokens, pixels=x)

    def decode(
        self,
        images: GroundingImages,
        image_index: torch.Tensor,
        prompts: torch.Tensor,
        words: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (Q, h, w) at the mask stride and predicted IoU (Q,) in 0..1 for prompts (Q, D) on
        ``images[image_index]``; ``words`` (Q, L) are the phrases' token ids, -1 where there is none
        (with ``phrase_tokens`` only)."""
        q = prompts.shape[0]
        memory = images.tokens[image_index]  # type: ignore[index]
        x = self._attend(self.output_tokens, prompts, words, memory)
        kernels = self.hypernetwork(x[:, 0])  # (Q, P)
        pixels = images.pixels[image_index]  # (Q, P, h, w)
        masks = torch.einsum("qp,qphw->qhw", kernels, pixels)
        if self.locator is not None:
            where = torch.einsum("qd,qtd->qt", self.locator(x[:, 0]), memory) / memory.shape[-1] ** 0.5
            where = where.view(q, 1, self.grid, self.grid)
            masks = masks + F.interpolate(where, size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return masks, torch.sigmoid(self.score_head(x[:, 1]).squeeze(-1))

    def choose(
        self, tokens: torch.Tensor, image_index: torch.Tensor, prompts: torch.Tensor, words: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image-choice logits (Q,): how well each prompt (Q, D) matches image ``tokens[image_index]`` (image tokens
        from `encode_tokens`); compared across one [SEG]'s candidate images (``grounding.image_choice``)."""
        if self.choice_token is None or self.choice_query is None:
            raise ValueError("this decoder was built without image_choice")
        memory = tokens[image_index]
        x = self._attend(self.choice_token, prompts, words, memory, self.choice_layers)
        match = torch.einsum("qd,qtd->qt", self.choice_query(x[:, 0]), memory) / memory.shape[-1] ** 0.5
        return torch.logsumexp(match, dim=-1)

    def choice_parameters(self) -> list[nn.Parameter]:
        """The parameters only the image choice uses (none without ``image_choice``)."""
        if self.choice_token is None or self.choice_query is None:
            return []
        layers = self.choice_layers.parameters() if self.choice_layers is not None else []
        return [self.choice_token, *self.choice_query.parameters(), *layers]

    def warm_start(self, fresh: set[str]) -> None:
        """Start the choice's own layers from the mask layers when ``fresh`` (the state-dict names a trained model
        lacked, relative to this module) holds all of theirs (``grounding.choice_layers``)."""
        if self.choice_layers is None:
            return
        own = {f"choice_layers.{k}" for k in self.choice_layers.state_dict()}
        if own <= fresh:
            self.choice_layers.load_state_dict(self.layers.state_dict())

    def _attend(
        self,
        output_tokens: torch.Tensor,
        prompts: torch.Tensor,
        words: torch.Tensor | None,
        memory: torch.Tensor,
        layers: nn.ModuleList | None = None,
    ) -> torch.Tensor:
        """The output tokens after the decoder's layers (or ``layers``) over ``memory`` (Q, T, D), normalised:
        (Q, n_out, D). The layers read [output tokens, the [SEG] prompt, the phrase's words]; the last layer updates
        only the output tokens, since nothing reads the others after it."""
        q = prompts.shape[0]
        x = torch.cat([output_tokens.unsqueeze(0).expand(q, -1, -1), prompts.unsqueeze(1)], dim=1)
        padding = None
        if self.words is not None:
            if words is None:
                raise ValueError("this decoder was built with phrase_tokens: it needs the phrases' words")
            present = words >= 0
            x = torch.cat([x, self.words(words.clamp(min=0)) + self.word_pos[: words.shape[1]]], dim=1)
            padding = torch.cat([present.new_zeros(q, output_tokens.shape[0] + 1), ~present], dim=1)
        layers = self.layers if layers is None else layers
        for i, layer in enumerate(layers):
            x = layer(x, memory, padding, keep=output_tokens.shape[0] if i == len(layers) - 1 else None)
        return self.norm(x)


class WordReader(nn.Module):
    """``grounding.word_readout``: word logits from the encoder features under a mask. Each scale is averaged with
    the mask as weights, once inside the mask and once over the mask grown by ``margin`` pixels (a part's first word
    names its object's colour, which glass windows or black tyres do not show); both through a LayerNorm and an MLP.
    The grown region is found at a quarter of the mask's resolution (max-pooling the full-size mask cost more than
    the rest of a decoder training step's reading)."""

    COARSE = 4

    def __init__(self, channels: list[int], hidden: int, vocab_size: int, margin: int):
        super().__init__()
        width = 2 * sum(channels)
        self.margin = max(1, margin // self.COARSE)  # in coarse cells
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, vocab_size)
        )

    def forward(self, features: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """(Q, vocab) logits from ``features`` (per scale (Q, C_s, H_s, W_s): each mask's image) and ``masks``
        (Q, m, m) weights in 0..1 (GT or predicted masks in training, the predicted probabilities at generation)."""
        inside = masks.unsqueeze(1).float()
        coarse = F.avg_pool2d(inside, self.COARSE) if inside.shape[-1] >= 4 * self.COARSE else inside
        grown = F.max_pool2d(coarse, 2 * self.margin + 1, stride=1, padding=self.margin)
        pooled = []
        for region in (inside, grown):
            for f in features:
                w = F.adaptive_avg_pool2d(region, f.shape[-2:])
                pooled.append((f.float() * w).sum((-2, -1)) / w.sum((-2, -1)).clamp(min=1e-6))
        return self.mlp(torch.cat(pooled, dim=-1).to(self.mlp[1].weight.dtype))


class OneWayBlock(nn.Module):
    """Prompt tokens self-attend, cross-attend to the image tokens (which stay fixed), then an MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor | None = None, keep: int | None = None
    ) -> torch.Tensor:
        """``padding`` (Q, tokens): True at prompt tokens the others must not attend to. ``keep``: compute and return
        only the first ``keep`` tokens (they still attend to all)."""
        h = self.norm1(x)
        if keep is not None:
            x = x[:, :keep]
        x = x + self.self_attn(h[:, : x.shape[1]], h, h, key_padding_mask=padding, need_weights=False)[0]
        x = x + self.cross_attn(self.norm2(x), memory, memory, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class SamGrounding(nn.Module):
    """transformers `SamModel` (ViT-H at full scale): frozen image encoder, trainable prompt encoder + decoder."""

    def __init__(self, cfg: GroundingConfig, *, load_weights: bool = True):
        super().__init__()
        from transformers import SamConfig, SamModel

        if cfg.pretrained and load_weights:
            self.sam = load_transformers_model(SamModel, cfg.pretrained, "model.grounding.pretrained")
        else:
            self.sam = SamModel(SamConfig(**cfg.sam))
        self.prompt_dim = self.sam.config.prompt_encoder_config.hidden_size
        if cfg.freeze_encoder:
            self.sam.vision_encoder.requires_grad_(False)

    def encode(self, pixel_values: torch.Tensor) -> GroundingImages:
        """SAM image embeddings of n images from their (n, 3, 1024, 1024) grounding pixels."""
        return GroundingImages(tokens=None, pixels=self.sam.vision_encoder(pixel_values)[0])

    def decode(
        self,
        images: GroundingImages,
        image_index: torch.Tensor,
        prompts: torch.Tensor,
        words: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (Q, 256, 256) and SAM's predicted IoU (Q,) clipped to 0..1, one call per image."""
        masks = prompts.new_zeros(prompts.shape[0], 0, 0)
        out_masks: list[torch.Tensor | None] = [None] * prompts.shape[0]
        out_scores: list[torch.Tensor | None] = [None] * prompts.shape[0]
        positional = self.sam.get_image_wide_positional_embeddings()
        dense_size = self.sam.config.prompt_encoder_config.image_embedding_size
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(-1, -1, dense_size, dense_size)
        for i in torch.unique(image_index).tolist():
            rows = (image_index == i).nonzero().flatten()
            sparse = prompts[rows].reshape(1, len(rows), 1, -1)
            m, iou = self.sam.mask_decoder(
                image_embeddings=images.pixels[i : i + 1],
                image_positional_embeddings=positional,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            for j, r in enumerate(rows.tolist()):
                out_masks[r], out_scores[r] = m[0, j, 0], iou[0, j, 0].clamp(0.0, 1.0)
        if not out_masks:
            return masks, prompts.new_zeros(0)
        return torch.stack(out_masks), torch.stack(out_scores)  # type: ignore[arg-type]


def build_grounding(
    cfg: GroundingConfig,
    *,
    channels: list[int],
    strides: tuple[int, ...],
    image_size: int,
    token_stride: int,
    vocab_size: int,
    load_weights: bool = True,
) -> nn.Module:
    if cfg.kind == "sam":
        return SamGrounding(cfg, load_weights=load_weights)
    return OneWayMaskDecoder(cfg, channels, strides, image_size, token_stride, vocab_size)
