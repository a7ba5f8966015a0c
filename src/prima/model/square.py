"""The query module: from each image's patch tokens to the visual tokens V_i the LLM reads, per `cross_image`.

One interface (`ImageQueryModule.forward(tokens, image_sample_index, qformer_ids, qformer_mask) -> V`) covers
every variant of DESIGN §2, so an ablation changes one config value:

- ``square``: SQuARE. Relational queries R attend over the concatenated tokens of all images of the sample
  (`RelationalAttention`) -> Z; the Q-Former's queries are G + Z, conditioned on the question, and
  cross-attend to ONE image at a time -> projection -> V_i.
- ``projection``: Z = a learned linear map of the sample's token sequence average-pooled into one chunk per query.
- ``pooling``: Z = the mean of all tokens of all images of the sample (one vector, widened by a linear map),
  shared by every query.
- ``none``: Z = 0 (no cross-image context); with no Q-Former configured (LISA) every patch token of the image
  goes through the MLP projector instead.
- ``concat``: no query compression: every patch token of every image through the MLP projector (GLaMM/LLaVA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prima.model.config import ModelConfig, vision_grid_size
from prima.model.vision import load_transformers_model


class RelationalAttention(nn.Module):
    """Learnable relational queries that cross-attend to the tokens of ALL images of a sample at once."""

    def __init__(
        self,
        num_queries: int,
        dim: int,
        token_dim: int,
        num_heads: int,
        num_layers: int,
        max_images: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.token_proj = nn.Linear(token_dim, dim)
        self.image_embed = nn.Embedding(max_images, dim)  # tells the queries which image a token came from
        self.layers = nn.ModuleList([_CrossAttentionBlock(dim, num_heads, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, image_position: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """tokens (B, N*T, D_v), image_position (B, N*T) 0-based image of each token, padding (B, N*T) True=pad.

        Returns Z: (B, num_queries, dim).
        """
        memory = self.token_proj(tokens) + self.image_embed(image_position)
        z = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            z = layer(z, memory, padding)
        return self.norm(z)


class _CrossAttentionBlock(nn.Module):
    """Pre-norm block: queries self-attend, cross-attend to a memory, then an MLP."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        x = x + self.cross_attn(self.norm2(x), memory, memory, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


def mlp_projector(in_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    """LLaVA-style projector: Linear, then (GELU, Linear) for each extra layer."""
    modules: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(layers - 1):
        modules += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*modules)


def build_qformer(cfg: ModelConfig, token_dim: int, *, load_weights: bool = True) -> nn.Module:
    """transformers `InstructBlipQFormerModel`: loaded from ``qformer.pretrained`` or built from its config."""
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    qc = cfg.qformer
    assert qc is not None
    if qc.pretrained and load_weights:
        return load_transformers_model(InstructBlipQFormerModel, qc.pretrained, "model.qformer.pretrained")
    kwargs = dict(qc.config)
    kwargs["encoder_hidden_size"] = token_dim  # the Q-Former cross-attends to the vision encoder's tokens
    if qc.pretrained is None and cfg.tokens.qformer_vocab_size is not None:
        kwargs.setdefault("vocab_size", cfg.tokens.qformer_vocab_size)
        kwargs.setdefault("pad_token_id", cfg.tokens.pad_token_id or 0)
    return InstructBlipQFormerModel(InstructBlipQFormerConfig(**kwargs))


def sincos_positions(grid: int, dim: int, scale: float = 0.5) -> torch.Tensor:
    """(grid * grid, dim) a 2D sine-cosine table for a raster of grid x grid cells: the first half of the channels
    codes the column, the second the row, each as sin and cos of the position in [0, 1] at ``dim // 4``
    frequencies from pi / 2 (monotonic over the image: left-right reads off linearly) to pi * grid / 2; times
    ``scale`` (unit-variance tokens: a third of their norm)."""
    if dim % 4:
        raise ValueError(f"a 2D sine-cosine table needs a width divisible by 4, got {dim}")
    k = dim // 4
    frequencies = torch.pi / 2 * torch.logspace(0, 1, k, base=float(grid))
    where = torch.arange(grid, dtype=torch.float32) / max(grid - 1, 1)
    angles = where[:, None] * frequencies  # (grid, k)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim // 2)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return scale * torch.cat([axis[cols.flatten()], axis[rows.flatten()]], dim=1)


def region_grid(regions: int) -> tuple[int, int]:
    """(rows, columns) with rows x columns = ``regions``, as square as it gets, never taller than wide: 8 -> (2, 4)."""
    rows = max(r for r in range(1, int(regions**0.5) + 1) if regions % r == 0)
    return rows, regions // rows


def position_in_sample(image_sample_index: torch.Tensor) -> torch.Tensor:
    """0-based position of each image within its sample (images of a sample consecutive): [0, 0, 1, 1, 1] ->
    [0, 1, 0, 1, 2]."""
    n = image_sample_index.shape[0]
    index = torch.arange(n, device=image_sample_index.device)
    new_sample = torch.ones(n, dtype=torch.bool, device=image_sample_index.device)
    new_sample[1:] = image_sample_index[1:] != image_sample_index[:-1]
    first = torch.cummax(torch.where(new_sample, index, torch.zeros_like(index)), dim=0).values
    return index - first


def difference_from_others(visual: torch.Tensor, image_sample_index: torch.Tensor) -> torch.Tensor:
    """(N, T, D): each image's tokens minus the mean of the other images' tokens of its sample, token by token;
    zeros for an image alone in its sample."""
    counts = torch.bincount(image_sample_index.cpu()).to(visual.device)  # on the host, as in cross_image_context
    sums = visual.new_zeros(counts.shape[0], *visual.shape[1:]).index_add(0, image_sample_index, visual)
    sums = sums[image_sample_index]
    others = (counts[image_sample_index] - 1).to(visual.dtype)
    mean_others = (sums - visual) / others.clamp(min=1)[:, None, None]
    return torch.where((others > 0)[:, None, None], visual - mean_others, torch.zeros_like(visual))


class ImageQueryModule(nn.Module):
    """Patch tokens of every image in a batch -> visual tokens V (num_images_total, T_out, llm_hidden)."""

    def __init__(self, cfg: ModelConfig, token_dim: int, llm_hidden: int, *, load_weights: bool = True):
        super().__init__()
        self.cross_image = cfg.cross_image
        self.uses_qformer = cfg.uses_qformer
        grid = vision_grid_size(cfg.vision)
        # CNN cells carry no position of their own; ViT tokens already do
        self.positions_after_norm = self.uses_qformer and cfg.qformer.cell_positions == "sincos"
        self.token_pos = None
        if cfg.vision.kind == "efficientnet_lite0":
            table = (
                sincos_positions(grid, token_dim) if self.positions_after_norm else torch.zeros(grid * grid, token_dim)
            )
            self.token_pos = nn.Parameter(table.unsqueeze(0))
        # image k of a sample -> a vector added to each of its visual tokens (None: off)
        self.image_index = nn.Embedding(cfg.max_images, llm_hidden) if cfg.image_index_embedding else None
        if self.image_index is not None:
            nn.init.normal_(self.image_index.weight, std=0.5)  # the scale of fresh visual tokens, not of words
        if not self.uses_qformer:
            self.projector = mlp_projector(token_dim, llm_hidden, cfg.projector_layers)
            return
        qc = cfg.qformer
        assert qc is not None
        self.token_norm = nn.LayerNorm(token_dim) if cfg.vision.kind == "efficientnet_lite0" else nn.Identity()
        self.qformer = build_qformer(cfg, token_dim, load_weights=load_weights)
        dim = self.qformer.config.hidden_size
        self.num_queries = qc.num_queries
        self.global_queries = nn.Parameter(torch.randn(1, qc.num_queries, dim) * 0.02)  # G
        if cfg.cross_image == "square":
            rc = cfg.relational
            self.relational = RelationalAttention(
                qc.num_queries, dim, token_dim, rc.num_heads, rc.num_layers, cfg.max_images, rc.dropout
            )
            # Z starts at zero: at first the queries are G alone (`none`), as the Q-Former expects; training
            # opens the cross-image path (docs/MODEL.md, "Cross-image context starts at zero")
            nn.init.zeros_(self.relational.norm.weight)
        elif cfg.cross_image in ("projection", "pooling"):
            self.context_proj = nn.Linear(token_dim, dim)
            nn.init.zeros_(self.context_proj.weight)
            nn.init.zeros_(self.context_proj.bias)
        self.projection = nn.Linear(dim, llm_hidden)  # Q-Former width -> LLM width
        self.shortcut = nn.Linear(token_dim, llm_hidden) if qc.shortcut else None
        self.region_grid = region_grid(qc.num_queries) if qc.shortcut_pool == "grid" else None
        self.contrast = None
        if qc.contrast:  # no biases: a one-image sample (nothing to differ from) gets exactly nothing
            self.contrast = nn.Sequential(
                nn.Linear(llm_hidden, llm_hidden, bias=False), nn.GELU(), nn.Linear(llm_hidden, llm_hidden, bias=False)
            )
            nn.init.zeros_(self.contrast[2].weight)  # starts as the model without it
        self.output_norm = None
        if qc.output_rms is not None:
            self.output_norm = nn.RMSNorm(llm_hidden, eps=1e-6)
            nn.init.constant_(self.output_norm.weight, qc.output_rms)
        if qc.frozen:
            self.qformer.requires_grad_(False)

    def forward(
        self,
        tokens: torch.Tensor,
        image_sample_index: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (N, T, D_v) of every image; image_sample_index (N,) the batch sample each image belongs to
        (images of a sample consecutive, in order); qformer ids/mask (B, L) the question per sample."""
        visual = self._query(tokens, image_sample_index, qformer_input_ids, qformer_attention_mask)
        if self.image_index is not None:
            visual = visual + self.image_index(position_in_sample(image_sample_index)).unsqueeze(1)
        return visual

    def _query(
        self,
        tokens: torch.Tensor,
        image_sample_index: torch.Tensor,
        qformer_input_ids: torch.Tensor | None,
        qformer_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.token_pos is not None and not self.positions_after_norm:
            tokens = tokens + self.token_pos
        if not self.uses_qformer:
            return self.projector(tokens)
        tokens = self.token_norm(tokens)
        if self.positions_after_norm:
            tokens = tokens + self.token_pos
        n_images = tokens.shape[0]
        queries = self.global_queries.expand(n_images, -1, -1)
        context = self.cross_image_context(tokens, image_sample_index)
        if context is not None:
            queries = queries + context
        if qformer_input_ids is None:
            raise ValueError("the Q-Former needs the question: pass batch['qformer_input_ids']")
        text_ids = qformer_input_ids[image_sample_index]
        attention_mask = None  # None: every query and question token is attended (no mask to build)
        if qformer_attention_mask is not None:
            text_mask = qformer_attention_mask[image_sample_index]
            query_mask = torch.ones(n_images, self.num_queries, dtype=text_mask.dtype, device=text_mask.device)
            attention_mask = torch.cat([query_mask, text_mask], dim=1)
        out = self.qformer(
            input_ids=text_ids,
            attention_mask=attention_mask,
            query_embeds=queries,
            encoder_hidden_states=tokens,
        ).last_hidden_state
        visual = self.projection(out[:, : self.num_queries])
        if self.shortcut is not None:  # this image's own tokens, pooled into one chunk per query (no cross-image)
            visual = visual + self.shortcut(self._pool(tokens))
        if self.contrast is not None:
            visual = visual + self.contrast(difference_from_others(visual, image_sample_index))
        if self.output_norm is not None:
            visual = self.output_norm(visual)
        return visual

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, num_queries, D) an image's tokens (N, T, D) average-pooled: chunks of the row-by-row sequence, or with
        ``shortcut_pool: grid`` the regions of a rows x columns grid, row by row."""
        if self.region_grid is None:
            return F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.num_queries).transpose(1, 2)
        n, t, d = tokens.shape
        side = int(round(t**0.5))
        cells = tokens.transpose(1, 2).reshape(n, d, side, side)
        return F.adaptive_avg_pool2d(cells, self.region_grid).flatten(2).transpose(1, 2)

    def cross_image_context(self, tokens: torch.Tensor, image_sample_index: torch.Tensor) -> torch.Tensor | None:
        """Z for every image (N, Q, dim): the sample-level context added to the global queries, or None."""
        if self.cross_image in ("none", "concat"):
            return None
        n, t, d = tokens.shape
        counts = torch.bincount(image_sample_index.cpu())  # on the host: meta tensors have no values to count
        counts = counts[counts > 0]
        per_sample = torch.split(tokens, counts.tolist())  # images of a sample are consecutive
        max_images = int(counts.max())
        if self.cross_image == "pooling":
            z = torch.stack([s.mean(dim=(0, 1)) for s in per_sample])  # (B, D_v)
            z = self.context_proj(z).unsqueeze(1).expand(-1, self.num_queries, -1)
        elif self.cross_image == "projection":
            chunks = [
                F.adaptive_avg_pool1d(s.reshape(1, -1, d).transpose(1, 2), self.num_queries).transpose(1, 2)
                for s in per_sample
            ]
            z = self.context_proj(torch.cat(chunks))  # (B, Q, dim)
        else:
            padded = tokens.new_zeros(len(per_sample), max_images * t, d)
            padding = torch.ones(len(per_sample), max_images * t, dtype=torch.bool, device=tokens.device)
            for b, s in enumerate(per_sample):
                padded[b, : s.shape[0] * t] = s.reshape(-1, d)
                padding[b, : s.shape[0] * t] = False
            position = torch.arange(max_images, device=tokens.device).repeat_interleave(t)
            z = self.relational(padded, position.unsqueeze(0).expand(len(per_sample), -1), padding)
        return z[torch.repeat_interleave(torch.arange(len(counts)), counts)]  # each sample's Z to its images
