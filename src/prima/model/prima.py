"""`PrimaModel`: vision encoder -> query module (SQuARE or a variant) -> LLM -> `[SEG]` grounding; forward (losses),
greedy generation with a KV cache and lazy grounding, and safetensors save/load.

Read top to bottom: construction, the pieces of the forward pass, `forward`, `generate`, persistence.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prima.config import save_config, to_dict
from prima.constants import IMAGE_END, IMAGE_START, IMAGE_TAGS, PHRASE_END, PHRASE_START, SEG_TOKEN
from prima.errors import PrimaError
from prima.model.config import ModelConfig, TokenIds, image_tokens_per_image, load_model_config, mask_size
from prima.model.grounding import GroundingImages, build_grounding
from prima.model.language import build_language_model, hidden_size
from prima.model.losses import IGNORE_INDEX, mask_centres, mask_losses, score_loss, text_loss, text_loss_at
from prima.model.prior import ImagePrior, PriorReading, mix_cells
from prima.model.square import ImageQueryModule
from prima.model.vision import ImageFeatures, build_vision_encoder

WEIGHTS_FILE = "model.safetensors"
# grounding.phrase_check: an answer is written again from branches of the first: at each of its first
# BRANCH_POSITIONS tokens (before any phrase), the LLM's next BRANCH_RANKS likeliest tokens there instead
BRANCH_POSITIONS = 4
BRANCH_RANKS = 2
# model.image_prior_cells: the first phrase is written again from its words' next PHRASE_BRANCH_RANKS likeliest tokens
PHRASE_BRANCH_RANKS = 2
# ... and with each of the CELL_WORDS words the phrase check reads likeliest where the answer's cells are
CELL_WORDS = 4
# grounding.word_readout: how many of the reader's words compete with the LLM's for a phrase's first word
READOUT_CANDIDATES = 3
# grounding.image_support_weight: the least support counted (log 1e-4 = -9.2), so no image is ruled out outright
SUPPORT_FLOOR = 1e-4
CONFIG_FILE = "config.yaml"


@dataclass
class PrimaOutput:
    """What `PrimaModel.forward` returns. Loss terms are None when the batch has no labels / no masks."""

    loss: torch.Tensor | None
    loss_ce: torch.Tensor | None
    loss_bce: torch.Tensor | None
    loss_dice: torch.Tensor | None
    loss_score: torch.Tensor | None
    # (B, L, V); None in training mode (the LM head runs only where a label follows) and when the batch brought its
    # [SEG] queries (`seg_queries`)
    logits: torch.Tensor | None
    loss_words: torch.Tensor | None = None  # the auxiliary visual-words loss (only when ``loss.visual_words`` > 0)
    loss_image: torch.Tensor | None = None  # the decoder's image-choice loss (only with ``grounding.image_choice``)
    mask_logits: list[torch.Tensor] = field(default_factory=list)  # per sample: (num [SEG], m, m)
    mask_scores: list[torch.Tensor] = field(default_factory=list)  # per sample: (num [SEG],) predicted IoU
    seg_image_index: torch.Tensor | None = None  # (M,) the image (index into the batch's images) of each [SEG]
    # grounding.image_choice: (M, K) the decoder's logits for each [SEG] over its sample's images (-inf: none)
    image_choice_logits: torch.Tensor | None = None
    loss_readout: torch.Tensor | None = None  # the first word read from the pixels (only with grounding.word_readout)
    loss_check: torch.Tensor | None = None  # every phrase word read from the pixels (only with grounding.phrase_check)
    loss_position: torch.Tensor | None = None  # each grounded phrase's centre read from V_i (``loss.visual_position``)
    loss_diversity: torch.Tensor | None = None  # how alike one image's visual tokens are (``loss.visual_diversity``)
    loss_prior: torch.Tensor | None = None  # the image prior's loss (only with ``model.image_prior``)
    loss_places: torch.Tensor | None = None  # its places' loss (only with ``model.image_prior_places``)
    loss_cells: torch.Tensor | None = None  # its answer cells' loss (only with ``model.image_prior_cells``)
    loss_nowhere: torch.Tensor | None = None  # its `NothingThere`'s loss (only with ``model.image_prior_nowhere``)
    loss_mix: torch.Tensor | None = None  # the cells' loss of the two mixed (only with ``model.image_prior_cells_mix``)
    # model.image_prior: (B, K) its logits over each sample's images (-inf past its count)
    image_prior_logits: torch.Tensor | None = None


@dataclass
class _Inputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    image_sample_index: torch.Tensor
    num_images: torch.Tensor
    image_offsets: torch.Tensor
    features: ImageFeatures


@dataclass
class _Reading:
    """What `PrimaModel._read_answer` gives: next-token logits (B, L, V; None in training), visual tokens (N, T, H),
    grounding queries (M, Hq) and the text loss (None without labels)."""

    logits: torch.Tensor | None
    visual: torch.Tensor
    queries: torch.Tensor
    text_loss: torch.Tensor | None


@dataclass
class GeneratedSegment:
    phrase: str
    image: int  # 1-based, as in the answer text
    mask: np.ndarray  # float32 probabilities at the image's original (height, width)
    score: float
    # grounding.phrase_check: how surely the pixels under the mask show the phrase (`PrimaModel.phrase_support`)
    support: float | None = None


@dataclass
class GenerationOutput:
    answer: str
    segments: list[GeneratedSegment]
    token_ids: list[int] = field(default_factory=list)
    grounded_images: list[int] = field(default_factory=list)  # 1-based images the grounding encoder ran on
    # the mean log-probability of the answer's tokens (</s> included) as the model scores them, before the greedy
    # loop's bans: an answer written around a ban the model wanted to break scores low
    mean_logprob: float = 0.0
    logprob: float = 0.0  # ... and their sum: what one word the LLM is sure of costs where a branch replaces it
    # grounding.phrase_check: the answer the LLM wrote first, when the pixels showed none of its phrases and ``answer``
    # is the one written again without phrases, or when it had none and ``answer`` is one whose phrases they show;
    # model.image_prior_cells: or the answer before its first phrase was written again where the answer's cells are
    first_answer: str | None = None
    # model.image_prior_cells: the share of the cells' distribution over ``cells_image`` (`AnswerCells`', with
    # image_prior_cells_nowhere of `NothingThere`'s mixed in, sharpened by image_prior_cells_temperature) that lies
    # under its mask (None without the cells or a [SEG])
    cells_share: float | None = None
    # ... the image (1-based) those cells are read on: the first [SEG]'s, or the image prior's where it is sure of
    # another (model.image_prior_rewrite_above; then the share is 0)
    cells_image: int | None = None
    # ... and, where that share is under image_prior_cells_below, the words the phrase check reads where those cells
    # are (their distribution as the mask), likeliest first
    cells_words: list[int] = field(default_factory=list)
    # model.image_prior_nowhere: `NothingThere`'s probability that the answer grounds nothing in its first [SEG]'s
    # image (None without it or a [SEG])
    nowhere: float | None = None

    @property
    def cells_moved(self) -> bool:
        """Whether the answer cells are read on another image than the first [SEG]'s (`cells_image`)."""
        return self.cells_image is not None and bool(self.segments) and self.cells_image != self.segments[0].image


class VisualCopy(nn.Module):
    """The copy path of ``visual_copy``: attention from an answer position over its sample's visual tokens, the
    attended tokens' word distributions, and a gate mixing them with the LLM's own (pointer-generator)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, 1)
        nn.init.constant_(self.gate.bias, 1.0)  # start mostly on the LLM's word head (sigmoid(1) = 0.73)

    def forward(
        self,
        lm_logprobs: torch.Tensor,  # (B, L, vocab)
        hidden: torch.Tensor,  # (B, L, H)
        memory: torch.Tensor,  # (B, S, H) visual tokens, RMS-normalised
        words: torch.Tensor,  # (B, S, vocab) log-probabilities of the words each visual token names
        padding: torch.Tensor,  # (B, S) True where there is no token
    ) -> torch.Tensor:
        scores = self.query(hidden) @ self.key(memory).transpose(1, 2) / hidden.shape[-1] ** 0.5  # (B, L, S)
        attention = scores.float().masked_fill(padding[:, None, :], float("-inf"))
        copied = torch.bmm(attention.softmax(-1), words.exp()).clamp_min(1e-12).log()  # (B, L, vocab)
        gate = self.gate(hidden).float()
        return torch.logaddexp(F.logsigmoid(gate) + lm_logprobs, F.logsigmoid(-gate) + copied)


class TagPointer(nn.Module):
    """``tag_pointer``: a score per candidate image for a [SEG]'s state: how well it matches that image's visual
    tokens (a log-mean-exp over the tokens, so the best match decides); added to the LLM's logit of the image's tag.
    The query starts at zero, so a fresh pointer adds nothing."""

    def __init__(self, hidden: int, detach: bool = False):
        super().__init__()
        self.detach = detach  # ``tag_pointer_detach``: no gradient from here into the visual tokens
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)

    def forward(self, states: torch.Tensor, visual: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(M, K) scores for [SEG] states (M, H) over candidate images ``candidates`` (M, K; indices into
        ``visual`` (N, T, H), -1 padded, 0 there)."""
        visual = visual.detach() if self.detach else visual
        keys = self.key(F.rms_norm(visual, visual.shape[-1:]))[candidates.clamp(min=0)]  # (M, K, T, H)
        match = torch.einsum("mh,mkth->mkt", self.query(states), keys) / states.shape[-1] ** 0.5
        scores = torch.logsumexp(match.float(), dim=-1) - np.log(keys.shape[2])
        return scores.masked_fill(candidates < 0, 0.0)


def fill_token_ids(cfg: ModelConfig, processor: Any) -> None:
    """Record the tokenizer's vocabulary size and every special-token id in ``cfg.tokens`` (checked if present)."""
    from prima.data.processor import IMAGE_SLOT_TOKEN, check_special_tokens

    tok = processor.tokenizer
    ids = check_special_tokens(tok)
    qtok = processor.qformer_tokenizer
    new = TokenIds(
        vocab_size=len(tok),
        qformer_vocab_size=len(qtok) if qtok is not None else len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        image_slot_id=ids[IMAGE_SLOT_TOKEN],
        seg_token_id=ids[SEG_TOKEN],
        phrase_start_id=ids[PHRASE_START],
        phrase_end_id=ids[PHRASE_END],
        image_start_id=ids[IMAGE_START],
        image_end_id=ids[IMAGE_END],
        image_tag_ids=[ids[t] for t in IMAGE_TAGS],
    )
    if cfg.tokens.complete and to_dict(cfg.tokens) != to_dict(new):
        raise PrimaError(
            "the tokenizer does not match the token ids recorded in the model config "
            f"(config: vocab {cfg.tokens.vocab_size}, [SEG] {cfg.tokens.seg_token_id}; tokenizer: vocab "
            f"{new.vocab_size}, [SEG] {new.seg_token_id}); load the tokenizer saved with the checkpoint"
        )
    cfg.tokens = new


class PrimaModel(nn.Module):
    """The PRIMA model, built from a `ModelConfig` (+ a `PrimaProcessor` whose tokenizer fixes the vocabulary).

    ``load_weights=False`` builds every component from its config only (no pretrained/package weights), e.g.
    on the ``meta`` device for FLOP counting.
    """

    def __init__(self, cfg: ModelConfig, processor: Any = None, *, load_weights: bool = True):
        super().__init__()
        cfg = copy.deepcopy(cfg)
        if processor is not None:
            fill_token_ids(cfg, processor)
            if processor.answer_order != cfg.answer_order:
                raise PrimaError(
                    f"the processor writes answers in {processor.answer_order!r} order but model.answer_order is "
                    f"{cfg.answer_order!r} (a model trained from another one, train.init_from, keeps its order)"
                )
        if not cfg.tokens.complete:
            raise PrimaError("the model config has no token ids: build the model with a processor (tokenizer)")
        self.config = cfg
        self.processor = processor
        self.vision = build_vision_encoder(cfg.vision, load_weights=load_weights)
        if cfg.vision.frozen:
            self.vision.requires_grad_(False)
        self.language = build_language_model(cfg.language, cfg.tokens, load_weights=load_weights)
        llm_hidden = hidden_size(self.language)
        self.query = ImageQueryModule(cfg, self.vision.token_dim, llm_hidden, load_weights=load_weights)
        strides = getattr(self.vision, "strides", (cfg.vision.token_stride,))
        self.grounding = build_grounding(
            cfg.grounding,
            channels=self.vision.channels,
            strides=strides,
            image_size=cfg.vision.image_size,
            token_stride=cfg.vision.token_stride,
            vocab_size=cfg.tokens.vocab_size,
            load_weights=load_weights,
        )
        prompt_dim = self.grounding.prompt_dim
        # the [SEG] hidden state -> the grounding prompt (LISA's text_hidden_fcs)
        query_in = 2 * llm_hidden if cfg.grounding.phrase_pooling else llm_hidden
        self.seg_projector = nn.Sequential(
            nn.Linear(query_in, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, prompt_dim)
        )
        self.tokens_per_image = image_tokens_per_image(cfg)  # V_i length: the slots per image block
        # auxiliary head: the words of the phrases grounded in an image, read from that image's visual tokens
        wants_words = cfg.loss.visual_words > 0 or cfg.visual_copy
        self.visual_words = nn.Linear(llm_hidden, cfg.tokens.vocab_size) if wants_words else None
        # auxiliary head: where each grounded phrase is, from its image's visual tokens (``loss.visual_position``)
        self.visual_position = (
            nn.Sequential(nn.Linear(2 * llm_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, 2))
            if cfg.loss.visual_position > 0
            else None
        )
        self.copy = VisualCopy(llm_hidden) if cfg.visual_copy else None
        self.tag_pointer = TagPointer(llm_hidden, cfg.tag_pointer_detach) if cfg.tag_pointer else None
        self.image_prior = None
        self._image_word_ids: tuple[frozenset[int], list[int]] | None = None  # `_image_words`, found once
        if cfg.image_prior:  # drawn without moving the random stream: every other weight starts as without it
            with torch.random.fork_rng(devices=[]):
                self.image_prior = ImagePrior(
                    self.vision.token_dim,
                    cfg.vision.image_size // cfg.vision.token_stride,
                    cfg.tokens.qformer_vocab_size or cfg.tokens.vocab_size,
                    cfg.qformer.max_text_length if cfg.qformer is not None else 64,
                    cfg.max_images,
                    num_layers=cfg.image_prior_layers,
                    relations=cfg.image_prior_places,
                    contrast=cfg.image_prior_contrast,
                    cells=cfg.image_prior_cells,
                    cells_match=cfg.image_prior_cells_match,
                    nowhere=cfg.image_prior_nowhere,
                    cells_mix=cfg.image_prior_cells_mix,
                    odd=cfg.image_prior_odd,
                )
            if cfg.image_prior_places and cfg.tokens.qformer_vocab_size not in (None, cfg.tokens.vocab_size):
                # its places learn where the answer's phrases have the question's words: one vocabulary for both
                raise PrimaError("model.image_prior_places needs the Q-Former to read the LLM's own tokenizer")
        self.training_step: int | None = None  # set by the trainer (`set_training_step`); None outside a run

    def set_training_step(self, step: int) -> None:
        """Tell the model which optimizer step comes next (0-based), for what starts late in training
        (``loss.visual_words_from_step``, ``images_from_step``). The trainer calls it before every step and
        validation."""
        self.training_step = step

    def _before_step(self, step: int) -> bool:
        """Whether a training run has not yet reached optimizer step ``step`` (False outside a run)."""
        return self.training_step is not None and self.training_step < step

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.query.parameters()).dtype

    def train(self, mode: bool = True) -> PrimaModel:
        super().train(mode)
        if self.config.vision.frozen:
            self.vision.eval()  # frozen: BatchNorm statistics and dropout stay as pretrained
        return self

    # --- trainable parameters -----------------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by component (frozen encoders and frozen LLM base excluded).

        Groups: ``language`` (the whole LM when trained from scratch, else LoRA adapters + embeddings),
        ``query_module`` (Q-Former, global queries, token positions, the visual-words head), ``square``
        (relational attention or the ablation's context layer; the contrast MLP), ``projector`` (to LLM width),
        ``grounding`` ([SEG] MLP + prompt encoder + mask decoder), ``image_prior`` (``model.image_prior``).
        """
        groups: dict[str, list[nn.Parameter]] = {
            "language": [],
            "query_module": [],
            "square": [],
            "projector": [],
            "grounding": [],
            "image_prior": [],
        }
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[self.group_of(name)].append(p)
        return groups

    @staticmethod
    def group_of(name: str) -> str:
        """The `parameter_groups` group of a parameter name."""
        if name.startswith(("language.", "copy.", "tag_pointer.")):  # the copy path and pointer: the word head
            return "language"
        if name.startswith(("query.relational.", "query.context_proj.", "query.contrast.")):
            return "square"
        if name.startswith(("query.projection.", "query.projector.", "query.shortcut.")):
            return "projector"
        if name.startswith(("grounding.", "seg_projector.")):
            return "grounding"
        if name.startswith("image_prior."):
            return "image_prior"
        return "query_module"  # the query module, and a frozen encoder made trainable by the user

    def separately_clipped_groups(self) -> list[list[nn.Parameter]]:
        """Groups of trainable parameters, each with a loss of its own that no other parameter's gradient shares: the
        word reader (``grounding.word_readout``) and the phrase check (``grounding.phrase_check``) read frozen
        features under GT and detached masks; the image prior (``model.image_prior``) reads frozen features and the
        question's ids, and its answer cells (``model.image_prior_cells``), `NothingThere` and `WhichCells` read its
        tokens, its readings and each other detached. The trainer clips each group's gradient norm on its own, so
        switching them on leaves every other update as it was."""
        heads = [getattr(self.grounding, name, None) for name in ("reader", "checker")] + [self.image_prior]
        own = [getattr(self.image_prior, name, None) for name in ("cells", "nowhere", "mix", "odd")]  # each apart
        own = [head for head in own if head is not None]
        apart = {id(p) for head in own for p in head.parameters()}
        groups = [
            [p for p in head.parameters() if p.requires_grad and id(p) not in apart]
            for head in heads
            if head is not None
        ]
        groups += [[p for p in head.parameters() if p.requires_grad] for head in own]
        return [g for g in groups if g]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.parameter_groups().values() for p in group]

    # --- the pieces of the forward pass -------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """Frozen vision-encoder features of (N, 3, S, S) pixels: a list of tensors with images first.

        EfficientNet: 5 scales [(N, 16, S/2, S/2), (N, 24, S/4, ..), (N, 40, S/8, ..), (N, 112, S/16, ..),
        (N, 320, S/32, ..)]; ViT: [(N, T, D)]. This is the format of ``batch["image_features"]`` (cacheable).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.vision.frozen):
            return self.vision(pixel_values.to(self.device, self.dtype))

    def visual_tokens(
        self,
        features: ImageFeatures,
        image_sample_index: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """V: (N, T, llm_hidden), the tokens each image contributes to the prompt."""
        tokens = self.vision.tokens([f.to(self.dtype) for f in features])
        return self.query(tokens, image_sample_index, qformer_input_ids, qformer_attention_mask)

    def embed_prompt(self, input_ids: torch.Tensor, visual: torch.Tensor, num_images: torch.Tensor) -> torch.Tensor:
        """Token embeddings with every image's slot positions replaced by its visual tokens (checked, not assumed)."""
        t = self.config.tokens
        slots = input_ids == t.image_slot_id
        starts = (input_ids == t.image_start_id).sum(1)
        per_image = self.tokens_per_image
        for b in range(input_ids.shape[0]):
            n = int(num_images[b])
            if int(starts[b]) != n:
                raise PrimaError(
                    f"sample {b}: the prompt has {int(starts[b])} image block(s) but {n} image(s) were given"
                )
            if int(slots[b].sum()) != n * per_image:
                raise PrimaError(
                    f"sample {b}: the prompt has {int(slots[b].sum())} image-token slots; {n} image(s) x "
                    f"{per_image} tokens were expected (was the prompt made by this model's processor?)"
                )
        embeds = self.language.get_input_embeddings()(input_ids)
        if self.training and self._before_step(self.config.images_from_step):
            visual = torch.zeros_like(visual)  # not shown to the LLM yet (`images_from_step`)
        elif self.training and self.config.hide_images > 0:
            hidden = torch.rand(num_images.shape[0], device=visual.device) < self.config.hide_images
            image_hidden = hidden.repeat_interleave(num_images.to(visual.device))  # images are in sample order
            visual = visual.masked_fill(image_hidden[:, None, None], 0.0)  # modality dropout (`hide_images`)
        return embeds.masked_scatter(slots.unsqueeze(-1), visual.to(embeds.dtype).reshape(-1, embeds.shape[-1]))

    def seg_targets(
        self,
        input_ids: torch.Tensor,
        image_offsets: torch.Tensor,
        num_images: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (rows, cols) of the answer's [SEG] tokens and the batch image each is routed to (its tag)."""
        t = self.config.tokens
        is_seg = input_ids == t.seg_token_id
        if labels is not None:
            is_seg &= labels != IGNORE_INDEX
        rows, cols = is_seg.nonzero(as_tuple=True)
        tag_to_image = {tid: k for k, tid in enumerate(t.image_tag_ids)}
        ids = input_ids.tolist() if rows.numel() else []
        images = []
        for r, c in zip(rows.tolist(), cols.tolist()):
            k = tag_to_image.get(self._seg_tag(ids[r], c))
            if k is None or k >= int(num_images[r]):
                where = "followed" if self.config.answer_order == "written" else "preceded (before its <p>)"
                raise PrimaError(
                    f"sample {r}: a [SEG] is not {where} by an image tag (IMAGE1)..(IMAGE{int(num_images[r])})"
                )
            images.append(int(image_offsets[r]) + k)
        return torch.stack([rows, cols]), torch.tensor(images, dtype=torch.long, device=input_ids.device)

    def encode_grounding(self, batch: dict[str, Any], features: ImageFeatures, images: torch.Tensor) -> GroundingImages:
        """Grounding state for the given batch images only (lazy: unnamed images are never encoded)."""
        if self.config.grounding.kind == "sam":
            if batch.get("grounding_features") is not None:
                return GroundingImages(tokens=None, pixels=batch["grounding_features"][images].to(self.dtype))
            pixels = batch.get("grounding_pixel_values")
            if pixels is None:
                raise PrimaError("SAM grounding needs batch['grounding_pixel_values'] (or 'grounding_features')")
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.grounding.freeze_encoder):
                return self.grounding.encode(pixels[images].to(self.device, self.dtype))
        return self.grounding.encode([f[images].to(self.dtype) for f in features])

    def predict_masks(
        self,
        prompts: torch.Tensor,
        seg_images: torch.Tensor,
        batch: dict[str, Any],
        features: ImageFeatures,
        words: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (M, m, m) at the model's mask size and scores (M,) for grounding prompts (M, D) (the
        `seg_projector` of the [SEG] states) on batch images ``seg_images`` (M,) (``words``: see `phrase_words`)."""
        return self.decode_masks(*self._grounding_state(seg_images, batch, features), prompts, words)

    def _grounding_state(
        self, seg_images: torch.Tensor, batch: dict[str, Any], features: ImageFeatures
    ) -> tuple[GroundingImages, torch.Tensor]:
        """The grounding state of the distinct batch images in ``seg_images`` (M,) and each one's index in it."""
        used, local = torch.unique(seg_images, return_inverse=True)
        return self.encode_grounding(batch, features, used), local

    def decode_masks(
        self, state: GroundingImages, local: torch.Tensor, prompts: torch.Tensor, words: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`predict_masks` on grounding ``state`` already encoded (``local``: each prompt's image in it)."""
        logits, scores = self.grounding.decode(state, local, prompts, words)
        side = mask_size(self.config)
        if logits.shape[-1] != side:
            logits = F.interpolate(logits.unsqueeze(1), size=(side, side), mode="bilinear", align_corners=False)
            logits = logits.squeeze(1)
        return logits, scores

    def image_choice_logits(
        self,
        prompts: torch.Tensor,
        words: torch.Tensor | None,
        candidates: torch.Tensor,
        features: ImageFeatures,
    ) -> torch.Tensor:
        """The decoder's image-choice logits (M, K) for grounding prompts (M, D) over each one's candidate batch
        images ``candidates`` (M, K), -1 padded (-inf there); ``grounding.image_choice``."""
        tokens = self.grounding.encode_tokens([f.to(self.dtype) for f in features])
        valid = candidates >= 0
        which = valid.nonzero(as_tuple=True)[0]
        pairs = self.grounding.choose(
            tokens, candidates[valid], prompts[which], words[which] if words is not None else None
        )
        return pairs.new_full(candidates.shape, float("-inf")).masked_scatter(valid, pairs)

    def read_first_words(self, masks: torch.Tensor, seg_images: torch.Tensor, features: ImageFeatures) -> torch.Tensor:
        """Word logits (M, vocab) of each phrase's first word read from the encoder features of batch images
        ``seg_images`` (M,) under ``masks`` (M, m, m) in 0..1 (``grounding.word_readout``)."""
        return self._read_under(self.grounding.reader, masks, seg_images, features)

    def check_phrases(self, masks: torch.Tensor, seg_images: torch.Tensor, features: ImageFeatures) -> torch.Tensor:
        """Logits (M, vocab) of each vocabulary word being in the phrase of the object under each of ``masks``
        (M, m, m) on batch images ``seg_images`` (M,) (``grounding.phrase_check``; multi-label, a sigmoid each)."""
        return self._read_under(self.grounding.checker, masks, seg_images, features)

    def _read_under(
        self, head: nn.Module, masks: torch.Tensor, seg_images: torch.Tensor, features: ImageFeatures
    ) -> torch.Tensor:
        """A `WordReader` ``head``'s logits under ``masks`` (M, m, m) on batch images ``seg_images`` (M,)."""
        return head([f[seg_images].to(self.dtype) for f in features], masks)

    def phrase_support(
        self, masks: torch.Tensor, seg_images: torch.Tensor, features: ImageFeatures, words: torch.Tensor
    ) -> torch.Tensor:
        """How surely the pixels under each of ``masks`` show its phrase ``words`` (M, L; -1 padded): the least
        probability among the words that name the object (M,); 1 for a phrase with no words
        (``grounding.phrase_check``). A part's phrase is shown when its owner is: its words up to the first possessive
        ("red table's" of "red table's top"), that one read as itself or as the bare noun, whichever reads surer;
        the checker reads a part's mask as its whole object (docs/MODEL.md, "Is it there? The phrase check")."""
        prob = torch.sigmoid(self.check_phrases(masks, seg_images, features).float())
        bare, possessive, clitic = (table.to(words.device) for table in self._possessives())
        ids = words.clamp(min=0)
        read = torch.maximum(prob.gather(1, ids), prob.gather(1, bare[ids]))  # "table's" or "table"
        # the words after the first possessive, or from a lone "'s" on, name the part: not checked
        owner = possessive[ids] & (words >= 0)
        part = (owner.long().cumsum(1) - owner.long() + clitic[ids].long().cumsum(1)) > 0
        return read.masked_fill((words < 0) | part, 1.0).min(dim=1).values

    def _possessives(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per vocabulary id (computed once from the tokenizer): its bare noun ("table" for "table's"; the id itself
        for any other word or where the vocabulary has no bare form), whether it is a possessive word, and whether
        it is a lone "'s" token (a tokenizer that splits it off)."""
        if getattr(self, "_possessive_tables", None) is None:
            n = self.config.tokens.vocab_size
            bare = torch.arange(n)
            possessive = torch.zeros(n, dtype=torch.bool)
            clitic = torch.zeros(n, dtype=torch.bool)
            vocab = self.processor.tokenizer.get_vocab() if self.processor is not None else {}
            for word, i in vocab.items():
                if i >= n:
                    continue
                if word == "'s":
                    clitic[i] = True
                elif word.endswith("'s"):
                    possessive[i] = True
                    bare[i] = vocab.get(word[:-2], i) if vocab.get(word[:-2], n) < n else i
            self._possessive_tables = (bare, possessive, clitic)
        return self._possessive_tables

    def phrase_states(self, ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Mean hidden state (M, H) of each [SEG]'s phrase tokens (the `<p> ... </p>` right before it; 0 if none)."""
        out = hidden.new_zeros(positions.shape[1], hidden.shape[-1])
        rows = ids.tolist()
        for q, (r, c) in enumerate(zip(positions[0].tolist(), positions[1].tolist())):
            start, end = self._phrase_span(rows[r], c)
            if end > start:
                out[q] = hidden[r, start:end].mean(0)
        return out

    def phrase_words(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The grounding decoder's word prompt: (M, phrase_tokens) token ids of the phrase before each [SEG] at
        ``positions`` (2, M: rows, columns of ``ids``), its first ``grounding.phrase_tokens`` tokens, -1 padded;
        None when off (nothing is computed then)."""
        limit = self.config.grounding.phrase_tokens
        if not limit:
            return None
        rows = ids.tolist()
        out = torch.full((positions.shape[1], limit), -1, dtype=torch.long)
        for q, (r, c) in enumerate(zip(positions[0].tolist(), positions[1].tolist())):
            start, end = self._phrase_span(rows[r], c)
            words = rows[r][start : min(end, start + limit)]
            out[q, : len(words)] = torch.tensor(words, dtype=torch.long)
        return out.to(self.device)

    def _seg_tag(self, ids: list[int], seg_pos: int) -> int | None:
        """The token that names the image of the [SEG] at ``seg_pos``: right after it (``answer_order`` written),
        or right before its phrase's `<p>` (image_first orders); None past the ends."""
        if self.config.answer_order == "written":
            return ids[seg_pos + 1] if seg_pos + 1 < len(ids) else None
        start, end = self._phrase_span(ids, seg_pos)
        if (start, end) == (0, 0) or start < 2:
            return None
        return ids[start - 2]

    def _phrase_span(self, ids: list[int], seg_pos: int) -> tuple[int, int]:
        """[start, end) of the tokens inside the `<p> ... </p>` that ends right before position ``seg_pos``."""
        t = self.config.tokens
        end = seg_pos - 1
        if end < 0 or ids[end] != t.phrase_end_id:
            return 0, 0
        start = end - 1
        while start >= 0 and ids[start] not in (t.phrase_start_id, t.seg_token_id, t.phrase_end_id):
            start -= 1
        if start < 0 or ids[start] != t.phrase_start_id:
            return 0, 0
        return start + 1, end

    # --- forward ------------------------------------------------------------------------------------------------
    def _read_answer(self, batch: dict[str, Any], x: _Inputs, positions: torch.Tensor) -> _Reading:
        """The LLM's pass over prompt and answer: the visual tokens, the grounding queries of the [SEG]s at
        ``positions`` (their last-layer states, with ``phrase_pooling`` their phrases' mean state beside), and
        with labels the text loss. The next-token logits (B, L, V) are computed outside training only: a training
        step needs them only where a label follows, so it runs the LM head there alone (a quarter of the tokens in
        tiny-synth; docs/TRAINING.md, "Batches of similar length")."""
        dev = self.device
        qids, qmask = batch.get("qformer_input_ids"), batch.get("qformer_attention_mask")
        visual = self.visual_tokens(
            x.features,
            x.image_sample_index,
            qids.to(dev) if qids is not None else None,
            qmask.to(dev) if qmask is not None else None,
        )
        embeds = self.embed_prompt(x.input_ids, visual, x.num_images)
        logits = loss = None
        if self.training and x.labels is not None and self.copy is None:
            last = self.language.get_decoder()(
                inputs_embeds=embeds, attention_mask=x.attention_mask, use_cache=False
            ).last_hidden_state
            rows, cols = (x.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
            head = self.language.get_output_embeddings()
            logits_at = head(last[rows, cols])
            if self.tag_pointer is not None:
                seg = (x.input_ids[rows, cols] == self.config.tokens.seg_token_id).nonzero(as_tuple=True)[0]
                r, c = rows[seg], cols[seg]
                pointed = self.point_tags(logits_at[seg], last[r, c], visual, x.image_offsets[r], x.num_images[r])
                logits_at = logits_at.index_copy(0, seg, pointed)
            loss = text_loss_at(logits_at, x.labels[rows, cols + 1], last)
        else:
            out = self.language(
                inputs_embeds=embeds, attention_mask=x.attention_mask, output_hidden_states=True, use_cache=False
            )
            logits, last = out.logits, out.hidden_states[-1]
            if self.copy is not None:
                logits = self.copy_logits(logits, last, visual, x.image_sample_index)
            if self.tag_pointer is not None and positions.shape[1]:
                r, c = positions[0], positions[1]
                pointed = self.point_tags(logits[r, c], last[r, c], visual, x.image_offsets[r], x.num_images[r])
                logits = logits.index_put((r, c), pointed)
            if x.labels is not None:
                loss = text_loss(logits, x.labels)
        queries = last[positions[0], positions[1]]
        if self.config.grounding.phrase_pooling:
            queries = torch.cat([queries, self.phrase_states(x.input_ids, positions, last)], dim=-1)
        return _Reading(logits, visual, queries, loss)

    @torch.no_grad()
    def seg_queries(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per sample of a batch, the grounding queries (its number of answer [SEG]s, Hq) that `forward` hands the
        decoder. With everything upstream of the decoder frozen they depend on the sample alone, so a trainer may
        compute them once and pass them back, concatenated, as ``batch["seg_queries"]``
        (``train.cache_seg_queries``)."""
        x = self._inputs(batch)
        positions, _ = self.seg_targets(x.input_ids, x.image_offsets, x.num_images, x.labels)
        queries = self._read_answer(batch, x, positions).queries
        return list(torch.split(queries, torch.bincount(positions[0], minlength=x.input_ids.shape[0]).tolist()))

    def _inputs(self, batch: dict[str, Any]) -> _Inputs:
        """A batch's tensors on the model's device, its images counted and checked, their features."""
        dev = self.device
        input_ids = batch["input_ids"].to(dev)
        attention_mask = batch.get("attention_mask")
        attention_mask = attention_mask.to(dev) if attention_mask is not None else torch.ones_like(input_ids)
        labels = batch.get("labels")
        image_sample_index = batch["image_sample_index"].to(dev)
        num_images = torch.bincount(image_sample_index, minlength=input_ids.shape[0])
        if int(num_images.max()) > self.config.max_images:
            raise PrimaError(
                f"a sample has {int(num_images.max())} images; this model takes 1..{self.config.max_images}"
            )
        if batch.get("image_features") is not None:
            features = [f.to(dev) for f in batch["image_features"]]
        elif batch.get("pixel_values") is not None:
            features = self.encode_images(batch["pixel_values"])
        else:
            raise PrimaError("the batch has neither 'pixel_values' nor 'image_features'")
        return _Inputs(
            input_ids,
            attention_mask,
            labels.to(dev) if labels is not None else None,
            image_sample_index,
            num_images,
            torch.cumsum(num_images, 0) - num_images,
            features,
        )

    def forward(self, batch: dict[str, Any]) -> PrimaOutput:
        """Losses and outputs for a batch made by `prima.data.collate.collate_samples`.

        Image inputs: ``pixel_values`` (N, 3, S, S), or precomputed ``image_features`` from `encode_images`
        (same images, same order). Labels and masks are optional (no labels: no losses). ``seg_queries`` (M, Hq),
        the concatenated output of `seg_queries` for these samples, replaces the visual tokens and the LLM's pass
        (no text or visual-words loss then; ``logits`` is None).
        """
        dev = self.device
        x = self._inputs(batch)
        input_ids, labels, num_images, image_offsets, features = (
            x.input_ids,
            x.labels,
            x.num_images,
            x.image_offsets,
            x.features,
        )
        positions, seg_images = self.seg_targets(input_ids, image_offsets, num_images, labels)
        if labels is not None and self._trains_only_the_prior():
            return self._prior_forward(batch, x, positions, seg_images)
        logits = visual = loss_ce = None
        queries = batch.get("seg_queries")
        if queries is None:
            reading = self._read_answer(batch, x, positions)
            logits, visual, queries, loss_ce = reading.logits, reading.visual, reading.queries, reading.text_loss
        elif queries.shape[0] != positions.shape[1]:
            raise PrimaError(f"the batch has {queries.shape[0]} seg_queries for {positions.shape[1]} [SEG] tokens")
        mask_logits = torch.zeros(0, 1, 1, device=dev, dtype=self.dtype)
        scores = torch.zeros(0, device=dev, dtype=self.dtype)
        choice_logits = first_words = phrase_targets = None
        if seg_images.numel():
            queries = queries.to(dev, self.dtype)
            words = self.phrase_words(input_ids, positions)
            first_words = words[:, 0] if words is not None else None
            phrase_targets = words
            if self.training and words is not None:
                words = swap_words(words, self.config.grounding.word_noise)
            prompts = self.seg_projector(queries)
            mask_logits, scores = self.predict_masks(prompts, seg_images, batch, features, words)
            if self.config.grounding.image_choice:
                rows = positions[0]
                candidates = _candidates(image_offsets[rows], num_images[rows])
                choice_logits = self.image_choice_logits(prompts, words, candidates, features)

        loss = loss_bce = loss_dice = loss_score = None
        w = self.config.loss
        if labels is not None:
            loss = torch.zeros((), device=dev)
            if loss_ce is not None:  # else the queries came precomputed: the LLM did not run
                loss = loss + w.ce * loss_ce
        targets = batch.get("masks")
        if targets is not None and labels is not None:
            targets = targets.to(dev, torch.float32)
            if targets.shape[0] != seg_images.numel():
                raise PrimaError(f"the batch has {targets.shape[0]} GT masks for {seg_images.numel()} [SEG] tokens")
            if "mask_image_index" in batch and not torch.equal(batch["mask_image_index"].to(dev), seg_images):
                raise PrimaError("the GT masks' images differ from the images the answers' [SEG] tags name")
            if seg_images.numel():
                loss_bce, loss_dice = mask_losses(mask_logits, targets, seg_images)
                loss_score = score_loss(scores, mask_logits.detach(), targets)
            else:  # keep the mask branch in the graph so distributed training sees every parameter used
                branch = [*self.seg_projector.parameters(), *self.grounding.parameters()]
                loss_bce = loss_dice = loss_score = _unused_loss(branch, dev)
            loss = loss + w.bce * loss_bce + w.dice * loss_dice + w.score * loss_score
        read_masks = None  # what the word reader and the phrase check read under: the GT masks, then the decoder's own
        if targets is not None and seg_images.numel():
            read_masks = torch.cat([targets, torch.sigmoid(mask_logits.detach().float())])
        loss_readout = None
        if self.config.grounding.word_readout and targets is not None and labels is not None:
            if first_words is not None and bool((first_words >= 0).any()):
                # under the GT masks and under the decoder's own (what generation reads), for the same words
                read = self.read_first_words(read_masks, seg_images.repeat(2), features)
                loss_readout = F.cross_entropy(read.float(), first_words.repeat(2), ignore_index=-1)
            else:  # no [SEG]: keep the reader in the graph, as the mask branch above
                loss_readout = _unused_loss(self.grounding.reader.parameters(), self.device)
            loss = loss + w.word_readout * loss_readout
        loss_check = None
        if self.config.grounding.phrase_check and targets is not None and labels is not None:
            has_words = (phrase_targets >= 0).any(-1) if phrase_targets is not None else None
            if has_words is not None and bool(has_words.any()):
                # every word of the phrase under the GT masks and under the decoder's own, as the word reader
                rows = has_words.nonzero(as_tuple=True)[0]
                both = torch.cat([rows, rows + seg_images.numel()])  # the GT masks' rows, then the decoder's
                read = self.check_phrases(read_masks[both], seg_images[rows].repeat(2), features).float()
                present = torch.zeros_like(read[: rows.numel()])
                present.scatter_add_(1, phrase_targets[rows].clamp(min=0), (phrase_targets[rows] >= 0).float())
                present.clamp_(max=1.0)  # a word twice in a phrase is still one word
                loss_check = F.binary_cross_entropy_with_logits(read, present.repeat(2, 1), reduction="none")
                loss_check = loss_check.sum(-1).mean()
            else:  # no [SEG]: keep the check in the graph, as the mask branch above
                loss_check = _unused_loss(self.grounding.checker.parameters(), self.device)
            loss = loss + w.phrase_check * loss_check
        loss_image = None
        if self.config.grounding.image_choice and labels is not None:
            if choice_logits is not None:
                loss_image = F.cross_entropy(choice_logits.float(), seg_images - image_offsets[positions[0]])
            else:  # no [SEG]: keep the choice path in the graph, as the mask branch above
                loss_image = _unused_loss(self.grounding.choice_parameters(), self.device)
            loss = loss + w.image_choice * loss_image
        prior_logits, prior_losses = None, {}
        if self.image_prior is not None:
            prior_logits, prior_losses, weighted = self._prior_losses(batch, x, positions, seg_images, targets)
            if weighted is not None:
                loss = loss + weighted
        loss_words = loss_position = None
        words_on = not self._before_step(w.visual_words_from_step)
        if w.visual_words > 0 and words_on and visual is not None and (labels is not None or targets is not None):
            normed = F.rms_norm(visual, visual.shape[-1:])  # as the LLM's first layer reads them
            word_scores = self.visual_words(normed)  # (N, T, vocab): what each visual token names
            if labels is not None:
                loss_words = self.visual_words_loss(word_scores, input_ids, positions, seg_images)
                loss = loss + w.visual_words * loss_words
            if w.visual_position > 0 and targets is not None:
                loss_position = self.visual_position_loss(
                    normed, word_scores.detach(), input_ids, positions, seg_images, targets
                )
                loss = loss + w.visual_position * loss_position
        loss_diversity = None
        if w.visual_diversity > 0 and labels is not None and visual is not None and visual.shape[1] > 1:
            loss_diversity = visual_alikeness(visual).mean()
            loss = loss + w.visual_diversity * loss_diversity
        per_sample = torch.bincount(positions[0], minlength=input_ids.shape[0]).tolist()
        return PrimaOutput(
            loss=loss,
            loss_ce=loss_ce,
            loss_bce=loss_bce,
            loss_dice=loss_dice,
            loss_score=loss_score,
            logits=logits,
            mask_logits=list(torch.split(mask_logits, per_sample)),
            mask_scores=list(torch.split(scores, per_sample)),
            seg_image_index=seg_images,
            loss_words=loss_words,
            loss_image=loss_image,
            image_choice_logits=choice_logits,
            loss_readout=loss_readout,
            loss_check=loss_check,
            loss_position=loss_position,
            loss_diversity=loss_diversity,
            image_prior_logits=prior_logits,
            **prior_losses,
        )

    def feature_levels(self) -> list[int] | None:
        """The levels of the encoder's features that `forward` reads now (None: all): only the token level while the
        image prior trains alone (`_trains_only_the_prior`), so a training batch from cached features need hold no
        more (`prima.train.run.TrainCollator`)."""
        return [self.vision.token_index] if self._trains_only_the_prior() else None

    def _trains_only_the_prior(self) -> bool:
        """Training with every weight but the image prior's frozen (configs/tiny-prior.yaml): the prior reads only
        the encoder's features, the question and the answer's [SEG] tags and masks, so nothing else need run."""
        if not self.training or self.image_prior is None:
            return False
        return not any(p.requires_grad for n, p in self.named_parameters() if not n.startswith("image_prior."))

    def _prior_forward(
        self, batch: dict[str, Any], x: _Inputs, positions: torch.Tensor, seg_images: torch.Tensor
    ) -> PrimaOutput:
        """`forward` when only the image prior trains: its losses alone, the very values (and gradients) the whole
        forward gives it, without running the LLM or the decoder, whose frozen losses are then not reported."""
        targets = batch.get("masks")
        targets = targets.to(self.device, torch.float32) if targets is not None else None
        logits, losses, loss = self._prior_losses(batch, x, positions, seg_images, targets)
        return PrimaOutput(
            loss=loss,
            loss_ce=None,
            loss_bce=None,
            loss_dice=None,
            loss_score=None,
            logits=None,
            seg_image_index=seg_images,
            image_prior_logits=logits,
            **losses,
        )

    def _prior_losses(
        self,
        batch: dict[str, Any],
        x: _Inputs,
        positions: torch.Tensor,
        seg_images: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """The prior's logits, its losses by `PrimaOutput` field (``loss_prior``, and ``loss_places`` / ``loss_cells`` /
        ``loss_nowhere`` / ``loss_mix`` where the prior has those parts; none without labels) and their weighted sum
        (None without labels)."""
        w = self.config.loss
        reading = self.image_prior_reading(batch, x)
        if x.labels is None:
            return reading.logits, {}, None
        losses = {
            "loss_prior": self.image_prior_loss(
                reading.logits, positions[0], seg_images - x.image_offsets[positions[0]]
            )
        }
        loss = w.image_prior * losses["loss_prior"]
        if reading.places is not None:
            losses["loss_places"] = self.image_prior_places_loss(
                reading.places, batch, x, positions, seg_images, targets
            )
            loss = loss + w.image_prior_places * losses["loss_places"]
        # the cells and `NothingThere` learn the same outcomes, each with its own weight
        for name, found, weight in (
            ("loss_cells", reading.cells, w.image_prior_cells),
            ("loss_nowhere", reading.nowhere, w.image_prior_nowhere),
        ):
            if found is not None:
                losses[name] = self.image_prior_cells_loss(found, x, positions[0], seg_images, targets)
                loss = loss + weight * losses[name]
        if reading.mix is not None:  # the mixture the read-out reads, of the two heads' distributions as they are
            assert reading.cells is not None and reading.nowhere is not None
            mixed = mix_cells(reading.cells.detach(), reading.nowhere.detach(), reading.mix)
            losses["loss_mix"] = self.image_prior_cells_loss(mixed, x, positions[0], seg_images, targets)
            loss = loss + w.image_prior_cells_mix * losses["loss_mix"]
        return reading.logits, losses, loss

    def image_prior_reading(self, batch: dict[str, Any], x: _Inputs) -> PriorReading:
        """The `ImagePrior`'s reading of a batch's samples from its encoder features and its questions' Q-Former ids:
        its logits (B, K), where each question word found itself in each image (N, L, cells; None without
        image_prior_places) and where the answer's first object is in each (N, cells; None without
        image_prior_cells)."""
        assert self.image_prior is not None
        qids, qmask = batch.get("qformer_input_ids"), batch.get("qformer_attention_mask")
        if qids is None or qmask is None:
            raise PrimaError("model.image_prior needs the batch's 'qformer_input_ids' and 'qformer_attention_mask'")
        return self.image_prior.read(
            x.features[self.vision.token_index], x.image_sample_index, qids.to(self.device), qmask.to(self.device)
        )

    def image_prior_places_loss(
        self,
        places: torch.Tensor,
        batch: dict[str, Any],
        x: _Inputs,
        positions: torch.Tensor,
        seg_images: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> torch.Tensor:
        """Cross-entropy of ``places`` (N, L, g * g: each question word's attention over each image's cells) against
        the GT mask of every answer phrase that has that word, on the phrase's image (the mask pooled to the cells
        and made a distribution); the mean over such (phrase, word) pairs. None of them in the batch: 0, in the
        graph."""
        assert self.image_prior is not None
        pairs = []
        if targets is not None and seg_images.numel():
            question = batch["qformer_input_ids"][:, : places.shape[1]].tolist()
            known = batch["qformer_attention_mask"][:, : places.shape[1]].tolist()
            rows = x.input_ids.tolist()
            unknown = getattr(getattr(self.processor, "tokenizer", None), "unk_token_id", None)
            for q, (r, c) in enumerate(zip(positions[0].tolist(), positions[1].tolist())):
                start, end = self._phrase_span(rows[r], c)
                phrase = set(rows[r][start:end]) - {unknown}  # an unknown word is no word in common
                for word, (token, real) in enumerate(zip(question[r], known[r])):
                    if real and token in phrase:
                        pairs.append((q, word))
        if not pairs:
            return _unused_loss(self.image_prior.parameters(), self.device)
        seg, word = torch.tensor(pairs, device=self.device).T
        grid = int(round(places.shape[-1] ** 0.5))
        where = F.adaptive_avg_pool2d(targets[seg].unsqueeze(1).float(), grid).flatten(1)
        where = where / where.sum(-1, keepdim=True).clamp_min(1e-6)
        found = places[seg_images[seg], word].float().clamp_min(1e-8).log()
        return -(where * found).sum(-1).mean()

    def image_prior_cells_loss(
        self,
        cells: torch.Tensor,
        x: _Inputs,
        rows: torch.Tensor,
        seg_images: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> torch.Tensor:
        """Cross-entropy of `AnswerCells`' ``cells`` (N, g * g + 1 log-probabilities, the last "nowhere"): on the image
        of each sample's first [SEG] against its GT mask pooled to the cells and made a distribution (``rows``: the
        sample of each [SEG], in order; a sample whose mask is empty is left out), and on every image of a sample
        without a [SEG] against "nowhere" (their mean over its images); the mean over those samples (none: 0, in the
        graph)."""
        assert self.image_prior is not None
        terms = []
        if targets is not None and rows.numel():
            first = _first_per_sample(rows)
            grid = int(round((cells.shape[-1] - 1) ** 0.5))
            where = F.adaptive_avg_pool2d(targets[first].unsqueeze(1).float(), grid).flatten(1)
            mass = where.sum(-1, keepdim=True)
            kept = mass[:, 0] > 0
            where = where[kept] / mass[kept]
            terms.append(-(where * cells[seg_images[first][kept], :-1]).sum(-1))
        grounded = torch.zeros(x.num_images.shape[0], dtype=torch.bool, device=cells.device)
        grounded[rows] = True
        unground = ~grounded[x.image_sample_index]
        if bool(unground.any()):
            nowhere = -cells[unground, -1]
            per_sample = nowhere.new_zeros(grounded.shape).index_add(0, x.image_sample_index[unground], nowhere)
            terms.append(per_sample[~grounded] / x.num_images[~grounded])
        if not terms or not sum(t.numel() for t in terms):
            return _unused_loss(self.image_prior.parameters(), self.device)
        return torch.cat(terms).mean()

    def image_prior_loss(self, logits: torch.Tensor, rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the prior's ``logits`` (B, K) against the image (``local``, 0-based in its sample) of each
        sample's first [SEG] (``rows``: the sample of each [SEG], in order); samples without one are left out."""
        assert self.image_prior is not None
        if not rows.numel():  # no [SEG] in the batch: keep the prior in the graph, as the mask branch
            return _unused_loss(self.image_prior.parameters(), self.device)
        first = _first_per_sample(rows)
        return F.cross_entropy(logits[rows[first]], local[first])

    def point_tags(
        self,
        logits: torch.Tensor,
        states: torch.Tensor,
        visual: torch.Tensor,
        offsets: torch.Tensor,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """Next-token logits (M, V) at M [SEG]s with the ``tag_pointer`` scores of their states (M, H) added to the
        tags of their samples' images: ``counts[m]`` images from batch image ``offsets[m]`` of ``visual`` (N, T, H),
        every image's visual tokens."""
        assert self.tag_pointer is not None
        if not logits.shape[0]:  # no [SEG]: keep the pointer in the graph, as the mask branch does
            return logits + _unused_loss(self.tag_pointer.parameters(), self.device)
        candidates = _candidates(offsets, counts)
        scores = self.tag_pointer(states, visual, candidates).to(logits.dtype)
        tags = torch.tensor(self.config.tokens.image_tag_ids[: candidates.shape[1]], device=logits.device)
        return logits.index_add(1, tags, scores)

    def copy_logits(
        self, logits: torch.Tensor, hidden: torch.Tensor, visual: torch.Tensor, image_sample_index: torch.Tensor
    ) -> torch.Tensor:
        """Next-token log-probabilities (B, L, vocab) of the LLM's word head mixed with the visual copy path
        (``visual_copy``); ``visual`` (N, T, H) every image's visual tokens, ``image_sample_index`` (N,) their sample.
        Log-probabilities are valid logits: cross-entropy and argmax read them unchanged."""
        assert self.copy is not None and self.visual_words is not None
        b, t = logits.shape[0], visual.shape[1]
        counts = torch.bincount(image_sample_index, minlength=b).tolist()
        memory = visual.new_zeros(b, max(counts) * t, visual.shape[-1])
        padding = torch.ones(b, max(counts) * t, dtype=torch.bool, device=visual.device)
        for i, part in enumerate(torch.split(visual, counts)):
            memory[i, : part.shape[0] * t] = part.reshape(-1, visual.shape[-1])
            padding[i, : part.shape[0] * t] = False
        memory = F.rms_norm(memory, memory.shape[-1:])
        words = self.visual_words(memory).float().log_softmax(-1)  # (B, S, vocab): what each visual token names
        return self.copy(logits.float().log_softmax(-1), hidden, memory, words, padding)

    def visual_words_loss(
        self, word_scores: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, seg_images: torch.Tensor
    ) -> torch.Tensor:
        """Mean CE of every word of every grounded phrase under its image's word scores (see ``loss.visual_words``).

        ``word_scores`` (N, T, vocab) is the word head on each visual token, RMS-normalised as the LLM's first layer
        reads it; an image's score for a word is the logsumexp over its tokens: some token of the image must name it.
        """
        assert self.visual_words is not None
        rows = input_ids.tolist()
        words: list[int] = []
        images: list[int] = []
        for q, (r, c) in enumerate(zip(positions[0].tolist(), positions[1].tolist())):
            start, end = self._phrase_span(rows[r], c)
            words += rows[r][start:end]
            images += [int(seg_images[q])] * (end - start)
        if not words:  # keep the head in the graph so distributed training sees every parameter used
            return _unused_loss(self.visual_words.parameters(), self.device)
        scores = torch.logsumexp(word_scores, dim=1)  # (N, vocab)
        target = torch.tensor(words, device=scores.device)
        return F.cross_entropy(scores[torch.tensor(images, device=scores.device)].float(), target)

    def visual_position_loss(
        self,
        normed: torch.Tensor,
        word_scores: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seg_images: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        """Mean L1 distance between each grounded phrase's GT mask centre (x, y in [0, 1]) and the centre read from
        its image's visual tokens (see ``loss.visual_position``); ``normed`` (N, T, H) the visual tokens RMS-normalised,
        ``word_scores`` (N, T, vocab) the visual-words head on them, detached; ``masks`` (M, h, w) one per [SEG].

        The phrase's token is found as the visual-words head finds its words (their mean score on each token,
        softmax over the image's tokens; detached: this loss does not move which token names what); the head reads
        that token mixture beside the phrase's mean word embedding, as an LLM layer reads a word and what it attended.
        """
        assert self.visual_position is not None and self.visual_words is not None
        rows = input_ids.tolist()
        spans = [self._phrase_span(rows[r], c) for r, c in zip(positions[0].tolist(), positions[1].tolist())]
        mass = masks.flatten(1).sum(1)
        kept = [q for q, (start, end) in enumerate(spans) if end > start and float(mass[q]) > 0]
        if not kept:  # keep the head in the graph so distributed training sees every parameter used
            return _unused_loss(self.visual_position.parameters(), self.device)
        dev = normed.device
        words = _pad([rows[int(positions[0, q])][spans[q][0] : spans[q][1]] for q in kept], -1, dev, left=False)[0]
        present = (words >= 0).float()  # (P, L)
        tokens = normed[seg_images[kept]]  # (P, T, H)
        scores = word_scores[seg_images[kept]].float()  # (P, T, vocab)
        picked = scores.gather(2, words.clamp(min=0).unsqueeze(1).expand(-1, tokens.shape[1], -1))  # (P, T, L)
        key = (picked * present.unsqueeze(1)).sum(-1) / present.sum(-1, keepdim=True)
        attention = key.softmax(-1)  # (P, T)
        attended = torch.einsum("pt,pth->ph", attention.to(tokens.dtype), tokens)
        embedded = self.language.get_input_embeddings()(words.clamp(min=0)).detach()
        word = (embedded * present.unsqueeze(-1).to(embedded.dtype)).sum(1) / present.sum(-1, keepdim=True)
        centre = torch.sigmoid(self.visual_position(torch.cat([attended, word.to(attended.dtype)], -1)).float())
        return F.l1_loss(centre, mask_centres(masks[kept]))

    # --- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: list[Any], question: str, max_new_tokens: int = 96) -> GenerationOutput:
        """Greedy answer with a KV cache, then masks for every [SEG] (lazy grounding: named images only).

        Every [SEG] is followed by an image tag: the step after a [SEG] may only choose among (IMAGE1)..(IMAGEn)
        (the most likely of them), so each mask is bound to exactly one of the given images. Tags of images
        that were not given, image-block tokens and padding are never generated.
        """
        return self.generate_batch([(images, question)], max_new_tokens=max_new_tokens)[0]

    @torch.no_grad()
    def generate_batch(self, requests: list[tuple[list[Any], str]], max_new_tokens: int = 96) -> list[GenerationOutput]:
        """`generate` for several (images, question) pairs at once: prompts left-padded, one cached greedy loop.

        With ``grounding.phrase_check`` (a threshold above 0) the pixels get a say, both ways (a phrase is shown when
        its `GeneratedSegment.support` reaches ``phrase_check_threshold``). An answer that grounds phrases none of
        which is shown is written again with no phrase, tag or [SEG] allowed, and that answer ("None of the images
        shows ...") replaces it when the LLM scores it at least as likely per token (`GenerationOutput.mean_logprob`).
        An answer without phrases ("There are no lamps in these images.") is written again, and the likeliest
        answer whose every phrase is shown replaces it ("There are three lamps: ..."); where the answer names objects
        (`_named_objects`), only one every phrase of which names one of them ("No, none of the images shows a boat."
        is not replaced by "A tree: the yellow tree"). Both rewrites are written from
        branches of the first answer (`_branches`: its first words kept, then another likely word). The replaced
        answer is kept as `GenerationOutput.first_answer`. With the image prior's answer cells, their rewrite of the
        first phrase comes first (`_rewrite_where_cells_disagree`)."""
        results = self._generate(requests, max_new_tokens, [False] * len(requests))
        results = self._rewrite_where_cells_disagree(requests, results, max_new_tokens)
        g = self.config.grounding
        if not g.phrase_check or g.phrase_check_threshold <= 0:
            return results
        unshown = [
            b
            for b, r in enumerate(results)
            if r.segments
            and (
                not any(map(self._shown, r.segments))
                or (g.every_image_check and self._every_image_contradicted(r, len(requests[b][0])))
            )
        ]
        ungrounded = [b for b, r in enumerate(results) if not r.segments]
        if unshown:
            # greedy with the bans alone would keep the LLM's grounded sentence ("You could sit on the ...") and run
            # into the ban; so the answer is written again from branches of its words before the first phrase too,
            # and the likeliest per token is taken ("None of the images shows something you could sit on.") if the
            # LLM finds it at least as likely as the grounded one: where it has no answer without phrases (it wanted
            # a phrase all along), the grounded answer stands
            branches = [[([], 0), *self._branches(results[b].token_ids)] for b in unshown]
            again = self._generate_branches(requests, unshown, branches, max_new_tokens, ungrounded=True)
            for b, written in zip(unshown, again):
                best = max(written, key=lambda r: r.mean_logprob)
                if best.mean_logprob >= results[b].mean_logprob:
                    best.first_answer = results[b].first_answer or results[b].answer
                    results[b] = best
        if ungrounded:
            # the LLM's prior for "nothing there" is strong ("No, ..." is its likeliest start whatever the images
            # show; "There are no ..." where it counts), so here the pixels alone decide which branch may stand:
            # every phrase of the answer must be shown (a [SEG] without one is not); then the LLM's likeliest per token
            branches = [self._branches(results[b].token_ids) for b in ungrounded]
            again = self._generate_branches(requests, ungrounded, branches, max_new_tokens, ungrounded=False)
            for b, written in zip(ungrounded, again):
                named = self._named_objects(results[b].token_ids)
                found = [
                    r
                    for r in written
                    if r.segments
                    and all(s.phrase and self._shown(s) for s in r.segments)
                    and (not named or all(named & self._text_forms(s.phrase) for s in r.segments))
                ]
                if found:
                    best = max(found, key=lambda r: r.mean_logprob)
                    best.first_answer = results[b].first_answer or results[b].answer
                    results[b] = best
        return results

    def _rewrite_where_cells_disagree(
        self, requests: list[tuple[list[Any], str]], results: list[GenerationOutput], max_new_tokens: int
    ) -> list[GenerationOutput]:
        """``model.image_prior_cells``: an answer whose first mask holds less than ``image_prior_cells_below`` of
        `AnswerCells`' distribution over its image (and, with the phrase check, whose first phrase the pixels show:
        one they do not is the phrase check's to turn down, unless `NothingThere` finds something in its image;
        `_cells_reach`) is written again from branches at the words of its first phrase (`_phrase_branches`), and
        among it and those whose first [SEG] is on the same image, whose first phrase has as many words or more and
        is shown, the one with the highest `GenerationOutput.logprob` (summed: a phrase word the LLM is sure of costs
        what it is sure by) +
        ``image_prior_cells_weight`` x log(`GenerationOutput.cells_share`) stands ("What is in image 2 but not in
        image 3?": "The brown chair" -> "The red mug"; docs/MODEL.md, "Where in the image: the answer's cells").
        It runs before the phrase check, which then checks the answer that stands."""
        c = self.config
        if not c.image_prior_cells_weight:
            return results
        shown = self._shown

        def score(r: GenerationOutput) -> float:
            return r.logprob + c.image_prior_cells_weight * math.log(max(r.cells_share or 0.0, SUPPORT_FLOOR))

        asked = [self._text_forms(question) for _, question in requests]
        branches = {b: self._phrase_branches(r, asked[b]) for b, r in enumerate(results) if self._cells_reach(r)}
        rows = [b for b, own in branches.items() if own]
        if not rows:
            return results
        # where the cells are read on another image than the first [SEG]'s, the branches must start there
        moved = [results[b].cells_image if results[b].cells_moved else None for b in rows]
        again = self._generate_branches(
            requests, rows, [branches[b] for b in rows], max_new_tokens, ungrounded=False, first_images=moved
        )
        for b, written in zip(rows, again):
            first = results[b].segments[0]
            same = [
                r
                for r in written
                if r.segments
                and r.answer != results[b].answer  # a branch can end up writing the same answer: no rewrite
                and r.segments[0].image == (results[b].cells_image or first.image)
                and shown(r.segments[0])
                and len(r.segments[0].phrase.split()) >= len(first.phrase.split())
            ]
            best = max([results[b], *same], key=score)
            if best is not results[b]:
                best.first_answer = results[b].first_answer or results[b].answer
                results[b] = best
        return results

    def _shown(self, segment: GeneratedSegment) -> bool:
        """Whether the phrase check finds ``segment``'s phrase in its pixels (always, without the check)."""
        g = self.config.grounding
        if not g.phrase_check or g.phrase_check_threshold <= 0:
            return True
        return segment.support is not None and segment.support >= g.phrase_check_threshold

    def _cells_reach(self, result: GenerationOutput) -> bool:
        """Whether the cells' rewrite (`_rewrite_where_cells_disagree`) writes ``result``'s first phrase again: where
        less than ``image_prior_cells_below`` of the cells lies under its shown first phrase's mask, or, with
        ``model.image_prior_nowhere``, where the phrase check would turn the phrase down but `NothingThere` finds
        something in its image (the LLM named an object that image lacks, not one it has: "What is in image 1 but
        not in image 2?" with the object image 2 lacks misnamed); and always where a shown first phrase lies on another
        image than the one the cells are read on (``model.image_prior_rewrite_above``)."""
        c = self.config
        if result.cells_share is None:
            return False
        if self._shown(result.segments[0]):
            if result.cells_moved:  # the image prior is sure the answer starts elsewhere
                return True
            return result.cells_share < c.image_prior_cells_below
        return result.nowhere is not None and result.nowhere < c.image_prior_nowhere_below

    def _every_image_contradicted(self, result: GenerationOutput, num_images: int) -> bool:
        """Whether ``result`` says an object is in every image ("A bottle appears in every image: ...": the words
        before its first phrase have "every", "each" or "all" and "image", and name objects, `_named_objects`) while
        the pixels show a phrase naming it on fewer than half of its ``num_images`` images
        (``grounding.every_image_check``; docs/MODEL.md, "In every image?")."""
        ids = result.token_ids
        start = self.config.tokens.phrase_start_id
        claim = ids[: ids.index(start)] if start in ids else ids
        forms = self._word_forms(claim)
        if not ("image" in forms and forms & {"every", "each", "all"}):
            return False
        named = self._named_objects(claim)  # reads the vocabulary's object names: only for a claim about every image
        if not named:
            return False
        found = {s.image for s in result.segments if self._shown(s) and named & self._text_forms(s.phrase)}
        return len(found) < num_images / 2

    def _named_objects(self, ids: list[int]) -> set[str]:
        """The `_word_forms` of ``ids`` that name objects: words the vocabulary also has with "'s" ("boat" of "No,
        none of the images shows a boat.")."""
        bare, possessive, _ = self._possessives()
        return self._word_forms(ids) & self._word_forms(bare[possessive].tolist())

    def _text_forms(self, text: str) -> set[str]:
        """The `_word_forms` of a text's words (a question, a phrase)."""
        return self._word_forms(self.processor.encode_words(text))

    def _word_forms(self, ids: list[int]) -> set[str]:
        """The words of token ``ids`` as the cells' rewrite compares them: lower case, without a possessive "'s" or a
        plural "s" ("Chairs", "chair's" and "chair" are one word)."""
        forms = set()
        for word in self.processor.tokenizer.convert_ids_to_tokens(ids):
            word = word.lower().removeprefix("ġ").removeprefix("▁").removesuffix("'s")
            forms.add(word[:-1] if len(word) > 3 and word.endswith("s") else word)
        return forms

    def _answer_cells(self, reading: PriorReading) -> torch.Tensor:
        """The log-probabilities (N, g * g + 1) the cells' read-out uses: `AnswerCells`' over each image's cells, with
        `NothingThere`'s mixed in (`prior.mix_cells`): as much as `WhichCells` weighs it image by image with
        ``model.image_prior_cells_mix``, else ``image_prior_cells_nowhere`` everywhere."""
        c, cells = self.config, reading.cells
        assert cells is not None
        if reading.nowhere is None:
            return cells
        if c.image_prior_cells_mix and reading.mix is not None:
            return mix_cells(cells, reading.nowhere, reading.mix)
        return mix_cells(cells, reading.nowhere, c.image_prior_cells_nowhere) if c.image_prior_cells_nowhere else cells

    def _read_cells(self, result: GenerationOutput, cells: torch.Tensor, features: ImageFeatures, image: int) -> None:
        """Set ``result``'s `GenerationOutput.cells_share` and ``cells_image`` and, where the rewrite reaches it
        (`_cells_reach`), ``cells_words`` from the cells' log-probabilities ``cells`` (g * g + 1,; `_answer_cells`) on
        ``image`` (1-based; its first [SEG]'s unless the image prior is sure of another; ``features``: its sample's
        images)."""
        first = result.segments[0]
        probs = (cells[:-1].float() / self.config.image_prior_cells_temperature).softmax(-1)  # where, if anywhere
        grid = int(probs.shape[-1] ** 0.5)
        cover = F.adaptive_avg_pool2d(torch.from_numpy(first.mask)[None, None], grid).flatten().to(probs.device)
        result.cells_share = float((probs * cover).sum()) if image == first.image else 0.0
        result.cells_image = image
        if not self._cells_reach(result) or getattr(self.grounding, "checker", None) is None:
            return  # only an answer the rewrite reaches needs the words (`_rewrite_where_cells_disagree`)
        region = (probs / probs.max()).view(1, grid, grid)
        image_index = torch.tensor([image - 1], device=region.device)
        read = self.check_phrases(region, image_index, features)[0].float()
        read[self._structure_token_ids()] = float("-inf")
        result.cells_words = read.topk(CELL_WORDS).indices.tolist()

    def _phrase_branches(self, result: GenerationOutput, asked: set[str]) -> list[tuple[list[int], int]]:
        """(prefix, rank) pairs at each of the first `BRANCH_POSITIONS` words of the answer's first phrase: its
        tokens up to the word, then the rank-th likeliest token instead of it, rank 1..`PHRASE_BRANCH_RANKS`; and for
        each of the words read where the answer's cells are (`GenerationOutput.cells_words`) that the phrase lacks,
        that word as the phrase's first word, and as its second (then greedily on: rank 0). A word of the phrase the
        question has (``asked``: its `_word_forms`) stays: "How many chairs are there?" is not answered by another
        object."""
        t = self.config.tokens
        ids = result.token_ids
        if t.phrase_start_id not in ids:
            return []
        start = ids.index(t.phrase_start_id) + 1
        end = next((j for j in range(start, len(ids)) if ids[j] == t.phrase_end_id), len(ids))
        phrase = range(start, min(end, start + BRANCH_POSITIONS))
        free = [p for p in phrase if not self._word_forms([ids[p]]) & asked]
        ranked = [(ids[:p], rank) for p in free for rank in range(1, PHRASE_BRANCH_RANKS + 1)]
        own = set(ids[start:end])
        read = [([*ids[:p], word], 0) for word in result.cells_words if word not in own for p in free if p < start + 2]
        return ranked + read

    def _branches(self, answer_ids: list[int]) -> list[tuple[list[int], int]]:
        """(prefix, rank) pairs: the answer's first p tokens, then the rank-th likeliest token instead of its own,
        for p below `BRANCH_POSITIONS` and up to the answer's first phrase, tag or [SEG] (the prefix never holds one;
        the branch may replace it), rank 1..`BRANCH_RANKS`."""
        structure = set(self._structure_token_ids())
        plain = next((j for j, token in enumerate(answer_ids) if token in structure), len(answer_ids))
        return [
            (answer_ids[:p], rank)
            for p in range(min(BRANCH_POSITIONS, plain + 1))
            for rank in range(1, BRANCH_RANKS + 1)
        ]

    def _generate_branches(
        self,
        requests: list[tuple[list[Any], str]],
        rows: list[int],
        branches: list[list[tuple[list[int], int]]],
        max_new_tokens: int,
        *,
        ungrounded: bool,
        first_images: list[int | None] | None = None,
    ) -> list[list[GenerationOutput]]:
        """Every branch of ``branches[i]`` written for request ``rows[i]``, in one batch; a list per row (with
        ``first_images``, each branch of row i names image ``first_images[i]`` first, where not None)."""
        flat = [branch for own in branches for branch in own]
        of = [i for i, own in enumerate(branches) for _ in own]
        forced = [first_images[i] for i in of] if first_images else None
        written = self._generate(
            [requests[b] for b in rows], max_new_tokens, [ungrounded] * len(flat), flat, of, first_images=forced
        )
        out, start = [], 0
        for own in branches:
            out.append(written[start : start + len(own)])
            start += len(own)
        return out

    def _generate(
        self,
        requests: list[tuple[list[Any], str]],
        max_new_tokens: int,
        ungrounded: list[bool],
        branches: list[tuple[list[int], int]] | None = None,
        of: list[int] | None = None,
        first_images: list[int | None] | None = None,
    ) -> list[GenerationOutput]:
        """The greedy loop of `generate_batch`; rows with ``ungrounded`` set may not write a phrase, tag or [SEG], and
        with ``branches`` row b writes ``branches[b] = (prefix, rank)``: the tokens of ``prefix``, then its
        ``rank``-th most likely token (0: the greedy one), then greedily on. With ``of``, row b answers request
        ``of[b]`` (several rows may share one, whose images are encoded once); ``ungrounded``, ``branches`` and
        ``first_images`` (where not None, the 1-based image row b's first image reference must name: the other tags
        and numbers after "image" are banned until it names one) are per row."""
        from prima.data.processor import load_image

        if self.processor is None:
            raise PrimaError("generate needs the model's processor (tokenizer); load with PrimaModel.from_pretrained")
        proc, t, dev = self.processor, self.config.tokens, self.device
        counts = [len(images) for images, _ in requests]
        for n in counts:
            if not 1 <= n <= self.config.max_images:
                raise PrimaError(f"got {n} images; this model takes 1..{self.config.max_images}")
        pil = [[load_image(im) for im in images] for images, _ in requests]
        features = self.encode_images(proc.preprocess_images([im for images in pil for im in images]))
        if of is not None:
            starts = np.cumsum([0, *counts])
            index = torch.tensor([i for j in of for i in range(starts[j], starts[j + 1])], device=dev)
            features = [f[index] for f in features]
            requests, pil, counts = [requests[j] for j in of], [pil[j] for j in of], [counts[j] for j in of]
        sample_index = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts)).to(dev)
        qrows = [proc.encode_qformer_text(question) for _, question in requests]
        # the Q-Former reads questions right-padded, as in training (its text positions are absolute)
        qids, qmask = _pad(qrows, (proc.qformer_tokenizer or proc.tokenizer).pad_token_id, dev, left=False)
        visual = self.visual_tokens(features, sample_index, qids, qmask)
        prior = None  # model.image_prior: (B, K) log-probabilities of the image each row's answer starts in
        cells = None  # model.image_prior_cells: (N, g * g + 1) log-probabilities of where in each image it starts
        nowhere = None  # model.image_prior_nowhere: (N,) the probability that it grounds nothing in each image
        c = self.config
        weighs_image = c.image_prior_weight or c.image_prior_after_phrase
        reads_nowhere = c.image_prior_nowhere and c.image_prior_nowhere_below > 0
        sure = None  # model.image_prior_rewrite_above: (B,) the image the prior is that sure of (1-based), else 0
        if self.image_prior is not None and (weighs_image or c.image_prior_cells_weight or reads_nowhere):
            reading = self.image_prior.read(features[self.vision.token_index], sample_index, qids, qmask)
            prior = reading.logits.log_softmax(-1) if weighs_image else None
            if c.image_prior_rewrite_above and c.image_prior_cells_weight:
                p, k = reading.logits.float().softmax(-1).max(-1)
                sure = torch.where(p >= c.image_prior_rewrite_above, k + 1, 0).tolist()
            cells = self._answer_cells(reading) if c.image_prior_cells_weight else None
            nowhere = reading.nowhere[:, -1].exp() if reads_nowhere and reading.nowhere is not None else None
        ids, attention = _pad(
            [proc.encode_prompt(q, n) for (_, q), n in zip(requests, counts)], t.pad_token_id, dev, left=True
        )
        embeds = self.embed_prompt(ids, visual, torch.tensor(counts))
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        banned = torch.zeros(len(requests), t.vocab_size, dtype=torch.bool, device=dev)  # type: ignore[arg-type]
        tag_only = torch.ones_like(banned)
        for b, n in enumerate(counts):
            for tid in (
                t.image_slot_id,
                t.image_start_id,
                t.image_end_id,
                t.bos_token_id,
                t.pad_token_id,
                *t.image_tag_ids[n:],
            ):
                if tid is not None and tid != t.eos_token_id:
                    banned[b, tid] = True
            if ungrounded[b]:
                banned[b, [t.phrase_start_id, t.phrase_end_id, t.seg_token_id, *t.image_tag_ids]] = True
            tag_only[b, t.image_tag_ids[:n]] = False
        rules = self._phrase_rules(banned) if self.config.answer_order != "written" else None
        in_phrase = [False] * len(requests)
        num_images = torch.tensor(counts, device=dev)
        image_offsets = num_images.cumsum(0) - num_images  # each row's first image in `features` and `visual`

        copy = self.copy is not None
        out = self.language(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=copy,
        )
        past, logits = out.past_key_values, self._next_token_logits(out, visual, sample_index)
        generated: list[list[int]] = [[] for _ in requests]
        seg_hidden: list[list[torch.Tensor]] = [[] for _ in requests]
        pooling = self.config.grounding.phrase_pooling
        fed_hidden: list[list[torch.Tensor]] = [[] for _ in requests]  # phrase pooling: the state of each fed token
        done = [False] * len(requests)
        logp = [0.0] * len(requests)  # each row's summed log-probability of its tokens, before the bans
        while True:
            after_seg = torch.tensor([bool(g) and g[-1] == t.seg_token_id for g in generated], device=dev)
            for b, g in enumerate(generated):
                done[b] = done[b] or (len(g) >= max_new_tokens and not (rules is None and bool(after_seg[b])))
            if all(done):
                break
            if rules is None:  # written order: a tag right after every [SEG]
                ban = torch.where(after_seg[:, None], tag_only, banned)
            else:
                ban = torch.stack([rules[self._phrase_state(g, in_phrase[b])][b] for b, g in enumerate(generated)])
            scores = logits.float()
            seg_rows = after_seg.nonzero(as_tuple=True)[0]  # the rows whose next token follows a [SEG]
            if self.tag_pointer is not None and seg_rows.numel():
                states = torch.stack([seg_hidden[b][-1] for b in seg_rows.tolist()])
                pointed = self.point_tags(
                    scores[seg_rows], states, visual, image_offsets[seg_rows], num_images[seg_rows]
                )
                scores = scores.index_copy(0, seg_rows, pointed.float())
            if self.config.grounding.image_choice and seg_rows.numel():
                candidates = _candidates(image_offsets[seg_rows], num_images[seg_rows])
                scores = self._choose_tags(
                    scores, seg_rows.tolist(), generated, seg_hidden, features, candidates, counts
                )
            likelihood = scores  # what `GenerationOutput.mean_logprob` sums: the prior steers, it does not score
            if prior is not None:
                scores = self._weigh_first_image(scores, prior, generated, counts)
            if rules is None and self.config.grounding.distinct_images:
                for b in seg_rows.tolist():
                    ban[b, self._repeated_tags(generated[b], counts[b])] = True
            for b, k in enumerate(first_images or []):
                if k and not self._names_image(generated[b]):
                    ban[b, self._other_images(generated[b], k, counts[b])] = True
            allowed = scores.masked_fill(ban, float("-inf"))
            tokens = allowed.argmax(-1)
            for b, (prefix, rank) in enumerate(branches or []):
                at = len(generated[b])
                if at < len(prefix):
                    tokens[b] = prefix[at]
                elif at == len(prefix) and rank:
                    tokens[b] = allowed[b].topk(rank + 1).indices[rank]
            token_logp = likelihood.log_softmax(-1).gather(1, tokens[:, None])[:, 0].tolist()
            fed_seg = []
            for b, token in enumerate(tokens.tolist()):
                if done[b]:
                    tokens[b] = t.pad_token_id  # finished rows idle along; their outputs are ignored
                    continue
                generated[b].append(token)
                logp[b] += token_logp[b]
                in_phrase[b] = token == t.phrase_start_id or (in_phrase[b] and token != t.phrase_end_id)
                done[b] = token == t.eos_token_id
                if token == t.seg_token_id:
                    fed_seg.append(b)
            if all(done):
                break
            attention = torch.cat([attention, attention.new_ones(len(requests), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.language(
                inputs_embeds=self.language.get_input_embeddings()(tokens[:, None]),
                attention_mask=attention,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
                output_hidden_states=bool(fed_seg) or pooling or copy,
            )
            past, logits = out.past_key_values, self._next_token_logits(out, visual, sample_index)
            for b in fed_seg:  # a [SEG]'s hidden state (as an input position) is its grounding query
                seg_hidden[b].append(out.hidden_states[-1][b, -1])
            if pooling:
                for b in range(len(requests)):
                    fed_hidden[b].append(out.hidden_states[-1][b, -1])

        results, offset = [], 0
        for b, n in enumerate(counts):
            answer_ids = [i for i in generated[b] if i != t.eos_token_id]
            own = {"image_sample_index": torch.zeros(n, dtype=torch.long, device=dev)}
            own_features = [f[offset : offset + n] for f in features]
            queries = seg_hidden[b]
            if pooling and queries:
                states = torch.stack(fed_hidden[b])  # row j: generated token j, fed back as input
                seg_at = [j for j, tok in enumerate(generated[b]) if tok == t.seg_token_id][: len(queries)]
                pos = torch.tensor([[0] * len(seg_at), seg_at])
                phrase = self.phrase_states(torch.tensor([generated[b]]), pos, states.unsqueeze(0))
                queries = list(torch.cat([torch.stack(queries), phrase], dim=-1))
            segments, grounded = self._segments(answer_ids, queries, own, own_features, pil[b], n)
            mean_logp = logp[b] / max(1, len(generated[b]))
            result = GenerationOutput(proc.decode(answer_ids), segments, answer_ids, grounded, mean_logp, logp[b])
            if nowhere is not None and segments:
                result.nowhere = float(nowhere[offset + segments[0].image - 1])
            if cells is not None and segments:
                k = sure[b] if sure is not None and sure[b] else segments[0].image
                self._read_cells(result, cells[offset + k - 1], own_features, k)
            results.append(result)
            offset += n
        return results

    def _choose_tags(
        self,
        scores: torch.Tensor,
        rows: list[int],
        generated: list[list[int]],
        seg_hidden: list[list[torch.Tensor]],
        features: ImageFeatures,
        candidates: torch.Tensor,
        counts: list[int],
    ) -> torch.Tensor:
        """Next-token scores (B, vocab) where ``rows``, those right after a [SEG], rank the image tags by the LLM's
        tag log-probability + ``grounding.image_choice_weight`` x the decoder's image log-probability (its
        `image_choice_logits` for that [SEG]'s state and phrase over ``candidates``, the rows' images)."""
        t = self.config.tokens
        prompts = self.seg_projector(torch.stack([seg_hidden[b][-1] for b in rows]))
        words = None
        if self.config.grounding.phrase_tokens:
            words = torch.cat(
                [
                    self.phrase_words(torch.tensor([generated[b]]), torch.tensor([[0], [len(generated[b]) - 1]]))
                    for b in rows
                ]
            )
        choice = self.image_choice_logits(prompts, words, candidates, features).float().log_softmax(-1)
        if self.config.grounding.image_support_weight and words is not None:
            choice = choice + self.config.grounding.image_support_weight * self._image_support(
                prompts, words, candidates, features
            )
        scores = scores.clone()
        weight = self.config.grounding.image_choice_weight
        for i, b in enumerate(rows):
            tags = t.image_tag_ids[: counts[b]]
            scores[b] = scores[b].log_softmax(-1)
            scores[b, tags] += weight * choice[i, : counts[b]]
        return scores

    def _weigh_first_image(
        self, scores: torch.Tensor, prior: torch.Tensor, generated: list[list[int]], counts: list[int]
    ) -> torch.Tensor:
        """Next-token scores (B, vocab) where the rows whose answer has not named an image yet re-weigh the ways of
        naming one, the image tags and, right after the word "image" or "Image", its numbers
        (`_image_words`): among themselves, by their log-probability + ``model.image_prior_weight`` x ``prior`` (B, K),
        the `ImagePrior`'s log-probabilities. The group's total probability stays the LLM's, so whether an image is
        named there is the LLM's to say. In the written order the first tag follows a phrase; once a phrase is
        written the weight is ``model.image_prior_after_phrase`` (0: the phrase's image stays the LLM's, the
        decoder's and the pixels') and the prior's probabilities are floored at
        ``model.image_prior_after_phrase_floor`` (so it can no longer overrule them where they agree), and where the
        tag moves, the word reader reads the phrase's colour again under
        its mask on the new image ("The red mug [SEG]" on the prior's odd one out becomes "The orange mug";
        docs/MODEL.md, "The prior after a phrase")."""
        t = self.config.tokens
        words, numbers = self._image_words()
        scores = scores.clone()
        for b, g in enumerate(generated):
            n = counts[b]
            if self._names_image(g):
                continue
            after = t.phrase_start_id in g
            w = self.config.image_prior_after_phrase if after else self.config.image_prior_weight
            if not w:
                continue
            floor = self.config.image_prior_after_phrase_floor if after else 0.0
            row = prior[b, :n].clamp(min=math.log(floor)) if floor > 0 else prior[b, :n]
            groups = [t.image_tag_ids[:n]]
            if numbers and g and g[-1] in words:
                groups.append(numbers[:n])
            for ids in groups:
                own = scores[b, ids].float().log_softmax(-1)
                scores[b, ids] = (torch.logsumexp(scores[b, ids].float(), -1) + (own + w * row).log_softmax(-1)).to(
                    scores.dtype
                )
        return scores

    def _image_words(self) -> tuple[frozenset[int], list[int]]:
        """The tokens of the word "image" (and of "Image", which opens a sentence, where the tokenizer keeps case) and
        those of its numbers 1..max_images, as "image 3" tokenizes; (empty, []) when the tokenizer does not write each
        as one word and one number (then only tags are re-weighed)."""
        if self._image_word_ids is None:
            tok = self.processor.tokenizer
            unk = getattr(tok, "unk_token_id", None)
            spelled = {}
            for word in ("image", "Image"):
                pairs = [
                    tok(f"{word} {k}", add_special_tokens=False).input_ids for k in range(1, self.config.max_images + 1)
                ]
                ok = all(len(p) == 2 and p[0] == pairs[0][0] and p[0] != unk and p[1] != unk for p in pairs)
                if ok and len({p[1] for p in pairs}) == len(pairs):
                    spelled[pairs[0][0]] = [p[1] for p in pairs]
            numbers = list(spelled.values())[0] if spelled else []
            if any(n != numbers for n in spelled.values()):  # the numbers must read the same after either
                spelled = {}
                numbers = []
            self._image_word_ids = (frozenset(spelled), numbers)
        return self._image_word_ids

    def _other_images(self, ids: list[int], image: int, n: int) -> list[int]:
        """The tokens that would name another image than ``image`` (1-based, of ``n``) next after ``ids``: the other
        tags, and the other numbers right after the word "image" (`_image_words`)."""
        t = self.config.tokens
        words, numbers = self._image_words()
        other = [tag for k, tag in enumerate(t.image_tag_ids[:n], 1) if k != image]
        if numbers and ids and ids[-1] in words:
            other += [number for k, number in enumerate(numbers[:n], 1) if k != image]
        return other

    def _names_image(self, ids: list[int]) -> bool:
        """Whether ``ids`` name an image: a tag, or the word "image" followed by a number."""
        tags = set(self.config.tokens.image_tag_ids)
        words, numbers = self._image_words()
        return any(i in tags for i in ids) or any(a in words and b in numbers for a, b in zip(ids, ids[1:]))

    def _image_support(
        self,
        prompts: torch.Tensor,
        words: torch.Tensor,
        candidates: torch.Tensor,
        features: ImageFeatures,
        *,
        check_first: bool | None = None,
        read_first: bool = False,
    ) -> torch.Tensor:
        """Log `phrase_support` (M, K) of each [SEG]'s phrase under its mask drawn on each of its ``candidates``
        (batch images, -1 padded: 0 there), for ``grounding.image_support_weight``. The first word is checked when
        ``check_first`` says so; by default only without ``grounding.word_readout``, which reads it again from the
        pixels of the image chosen. With ``read_first`` (needs ``grounding.word_readout``) it is read again on each
        candidate image, as it would be written were that image chosen, and the phrase so written is checked under
        the mask so drawn."""
        if check_first is None:
            check_first = not self.config.grounding.word_readout
        valid = candidates >= 0
        which = valid.nonzero(as_tuple=True)[0]
        images = candidates[valid]
        checked = words[which].clone()
        state, local = self._grounding_state(images, {}, features)
        logits, scores = self.decode_masks(state, local, prompts[which], checked)
        if read_first:
            first, logits, _ = self._read_first_words(
                state, local, prompts[which], images, features, checked, logits, scores
            )
            checked[:, 0] = first  # -1 stays -1: a phrase with no words
        elif not check_first:
            checked[:, 0] = -1
        support = self.phrase_support(torch.sigmoid(logits.float()), images, features, checked)
        out = torch.zeros(candidates.shape, device=support.device)
        out[valid] = support.clamp(min=SUPPORT_FLOOR).log()
        return out

    def _repeated_tags(self, ids: list[int], n: int) -> list[int]:
        """The image tags that earlier [SEG]s of ``ids`` gave the phrase of its last token, a [SEG] (written order),
        or none when they cover all ``n`` images (``grounding.distinct_images``)."""
        t = self.config.tokens
        start, end = self._phrase_span(ids, len(ids) - 1)
        phrase = ids[start:end]
        used = {
            ids[pos + 1]
            for pos, tok in enumerate(ids[:-1])
            if tok == t.seg_token_id and ids[slice(*self._phrase_span(ids, pos))] == phrase
        }
        return [] if len(used) >= n else sorted(used)

    def _phrase_rules(self, banned: torch.Tensor) -> dict[str, torch.Tensor]:
        """Banned tokens (B, vocab) in each state of an image-first answer, on top of ``banned``: a tag is followed by
        `<p>` only, a `<p>` comes only after a tag, inside a phrase no `<p>`, tag or `[SEG]`, and a `[SEG]` only
        right after `</p>`. So every [SEG] has exactly one image: the tag before its phrase."""
        t = self.config.tokens
        rules = {name: banned.clone() for name in ("outside", "inside", "closed")}
        rules["outside"][:, [t.phrase_start_id, t.phrase_end_id, t.seg_token_id]] = True
        rules["inside"][:, [t.phrase_start_id, t.seg_token_id, *t.image_tag_ids]] = True
        rules["closed"][:, [t.phrase_start_id, t.phrase_end_id]] = True
        rules["tagged"] = torch.ones_like(banned)
        rules["tagged"][:, t.phrase_start_id] = False
        return rules

    def _phrase_state(self, generated: list[int], in_phrase: bool) -> str:
        """Which `_phrase_rules` entry applies after ``generated``."""
        t = self.config.tokens
        last = generated[-1] if generated else None
        if last in t.image_tag_ids:
            return "tagged"
        if in_phrase:
            return "inside"
        return "closed" if last == t.phrase_end_id else "outside"

    def _next_token_logits(self, out: Any, visual: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        """(B, vocab) scores of the next token from the LLM output at the last position (with the copy path)."""
        if self.copy is None:
            return out.logits[:, -1]
        last = out.hidden_states[-1][:, -1:]
        return self.copy_logits(out.logits[:, -1:], last, visual, sample_index)[:, 0]

    def _segments(
        self,
        ids: list[int],
        seg_hidden: list[torch.Tensor],
        batch: dict[str, Any],
        features: ImageFeatures,
        pil: list[Any],
        n: int,
    ) -> tuple[list[GeneratedSegment], list[int]]:
        """The masks of the answer ``ids``' [SEG]s (their queries ``seg_hidden``) and the 1-based images they are on.
        With ``grounding.word_readout`` each phrase's first word in ``ids`` is replaced, in place, by the word read
        from the pixels under its mask."""
        t = self.config.tokens
        tag_to_image = {tid: k for k, tid in enumerate(t.image_tag_ids[:n])}
        images, seg_at = [], []
        for pos, tok in enumerate(ids):
            if tok != t.seg_token_id:
                continue
            images.append(tag_to_image[self._seg_tag(ids, pos)])  # generate() binds every [SEG] to a tag
            seg_at.append(pos)
        if not images:
            return [], []
        if self.config.grounding.kind == "sam":
            batch["grounding_pixel_values"] = self.processor.preprocess_grounding_images(pil)
        seg_images = torch.tensor(images, device=self.device)
        words = self.phrase_words(torch.tensor([ids]), torch.tensor([[0] * len(seg_at), seg_at]))
        prompts = self.seg_projector(torch.stack(seg_hidden[: len(images)]))
        state, local = self._grounding_state(seg_images, batch, features)  # once: every candidate word reuses it
        logits, scores = self.decode_masks(state, local, prompts, words)
        if self.config.grounding.word_readout and words is not None:
            first, logits, scores = self._read_first_words(
                state, local, prompts, seg_images, features, words, logits, scores
            )
            for q, word in enumerate(first.tolist()):
                start, end = self._phrase_span(ids, seg_at[q])
                if end > start:
                    ids[start] = word
        support: list[float | None] = [None] * len(images)
        if self.config.grounding.phrase_check and words is not None:
            words = self.phrase_words(torch.tensor([ids]), torch.tensor([[0] * len(seg_at), seg_at]))  # as written
            if self.config.grounding.mask_regions == "supported":
                logits = self._supported_regions(logits, seg_images, features, words)
            support = self.phrase_support(torch.sigmoid(logits.float()), seg_images, features, words).tolist()
        phrases = [self._phrase_before(ids, pos) for pos in seg_at]
        segments = []
        for q, k in enumerate(images):
            h, w = pil[k].height, pil[k].width
            prob = torch.sigmoid(
                F.interpolate(logits[q][None, None].float(), size=(h, w), mode="bilinear", align_corners=False)
            )[0, 0]
            segments.append(
                GeneratedSegment(phrases[q], k + 1, prob.cpu().numpy().astype(np.float32), float(scores[q]), support[q])
            )
        return segments, sorted({k + 1 for k in images})

    def _supported_regions(
        self, logits: torch.Tensor, seg_images: torch.Tensor, features: ImageFeatures, words: torch.Tensor
    ) -> torch.Tensor:
        """Mask logits (M, m, m) where a mask of several connected regions (at ``grounding.mask_threshold``) keeps
        only the one of the most probability mass weighed by how surely the phrase check reads its phrase ``words``
        (M, L) there (the largest mass x support); the other regions' pixels drop to the mask's least logit
        (``grounding.mask_regions: supported``)."""
        from prima.data.masks import connected_regions

        probs = torch.sigmoid(logits.float())
        above = (probs >= self.config.grounding.mask_threshold).cpu().numpy()
        owner, regions = [], []
        for q in range(len(above)):
            labels, n = connected_regions(above[q])
            if n > 1:
                owner += [q] * n
                regions += [labels == j for j in range(1, n + 1)]
        if not regions:
            return logits
        owner_t = torch.tensor(owner, device=logits.device)
        drawn = torch.from_numpy(np.stack(regions)).to(logits.device) * probs[owner_t]
        support = self.phrase_support(drawn, seg_images[owner_t], features, words[owner_t]).tolist()
        mass = drawn.flatten(1).sum(1).tolist()
        out = logits.clone()
        for q in sorted(set(owner)):
            mine = [i for i, o in enumerate(owner) if o == q]
            best = max(mine, key=lambda i: math.log(max(support[i], SUPPORT_FLOOR)) + math.log(max(mass[i], 1e-6)))
            drop = torch.from_numpy(above[q] & ~regions[best]).to(logits.device)
            out[q] = out[q].masked_fill(drop, float(logits[q].min()))
        return out

    def _read_first_words(
        self,
        state: GroundingImages,
        local: torch.Tensor,
        prompts: torch.Tensor,
        seg_images: torch.Tensor,
        features: ImageFeatures,
        words: torch.Tensor,
        logits: torch.Tensor,
        scores: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``grounding.word_readout`` at generation: each phrase's first word (M,) and its masks and scores. The
        candidates are the LLM's word, with its mask ``logits``, and the reader's best ``READOUT_CANDIDATES`` under that
        mask, each drawn with its own phrase; the word kept is the one the reader finds under its own mask most surely
        (a word whose mask shows something else reads as that something else). Drawn on the grounding ``state`` of the
        answer's images (``local``: each [SEG]'s image in it; ``seg_images`` the same in ``features``)."""
        k = READOUT_CANDIDATES
        m = words.shape[0]
        read = self.read_first_words(torch.sigmoid(logits.float()), seg_images, features).float()
        read[:, self._structure_token_ids()] = float("-inf")
        options = torch.cat([words[:, :1], read.topk(k, dim=-1).indices], dim=1)  # (M, 1 + k)
        trial = words.repeat(k, 1)
        trial[:, 0] = options[:, 1:].T.reshape(-1)
        drawn, drawn_scores = self.decode_masks(state, local.repeat(k), prompts.repeat(k, 1), trial)
        drawn, drawn_scores = torch.cat([logits, drawn]), torch.cat([scores, drawn_scores])  # row j * M + q
        agree = self.read_first_words(torch.sigmoid(drawn.float()), seg_images.repeat(1 + k), features).float()
        agree = agree.log_softmax(-1).gather(1, options.T.reshape(-1, 1).clamp(min=0)).view(1 + k, m)
        best = torch.where(words[:, 0] >= 0, agree.argmax(0), 0)  # a phrase with no words keeps the LLM's mask
        pick = best * m + torch.arange(m, device=best.device)
        return options.gather(1, best[:, None])[:, 0], drawn[pick], drawn_scores[pick]

    def _structure_token_ids(self) -> list[int]:
        """The tokens that are markup, never a word: image tags and blocks, phrase marks, [SEG], special tokens."""
        t = self.config.tokens
        marks = (t.image_slot_id, t.image_start_id, t.image_end_id, t.bos_token_id, t.eos_token_id, t.pad_token_id)
        fixed = (t.phrase_start_id, t.phrase_end_id, t.seg_token_id)
        return [i for i in (*marks, *fixed, *t.image_tag_ids) if i is not None]

    def _phrase_before(self, ids: list[int], seg_pos: int) -> str:
        """The text of the `<p> ... </p>` that ends right before the [SEG] at ``seg_pos`` ('' if there is none)."""
        start, end = self._phrase_span(ids, seg_pos)
        return self.processor.decode_phrase(ids[start:end]).strip() if end > start else ""

    # --- persistence --------------------------------------------------------------------------------------------
    def external_weight_prefixes(self) -> list[str]:
        """State-dict prefixes reloaded from their source instead of being stored in model.safetensors."""
        cfg, prefixes = self.config, []
        if cfg.vision.frozen and (
            (cfg.vision.kind == "efficientnet_lite0" and cfg.vision.package_weights) or cfg.vision.pretrained
        ):
            prefixes.append("vision.")
        if cfg.grounding.kind == "sam" and cfg.grounding.pretrained and cfg.grounding.freeze_encoder:
            prefixes.append("grounding.sam.vision_encoder.")
        if cfg.qformer is not None and cfg.qformer.pretrained and cfg.qformer.frozen:
            prefixes.append("query.qformer.")
        if cfg.language.pretrained and cfg.language.freeze_base:
            prefixes += [f"language.{n}" for n, p in self.language.named_parameters() if not p.requires_grad]
        return prefixes

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """What model.safetensors holds: the state dict minus external weights and minus tied duplicates."""
        prefixes = tuple(self.external_weight_prefixes())
        seen: set[tuple[int, int]] = set()
        out = {}
        for name, tensor in self.state_dict().items():
            if prefixes and (name.startswith(prefixes)):
                continue
            key = (
                (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
                if tensor.device.type != "meta"
                else (id(tensor), 0)
            )
            if key in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
                continue
            seen.add(key)
            out[name] = tensor
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        """Write model.safetensors + config.yaml (model section, token ids included) + tokenizer/processor files."""
        from safetensors.torch import save_file

        if self.processor is None:
            raise PrimaError("save_pretrained needs the model's processor (tokenizer) to make a loadable checkpoint")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.config)
        cfg.external_weights = self.external_weight_prefixes()
        state = {k: v.detach().contiguous().cpu() for k, v in self.stored_state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        save_config(_ModelSection(cfg), directory / CONFIG_FILE)
        self.processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> PrimaModel:
        """Load a checkpoint folder; missing or unexpected weights are an error, nothing is unpickled."""
        from prima.data.processor import PrimaProcessor

        directory = Path(directory)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (directory / name).is_file():
                raise PrimaError(f"{directory} is not a PRIMA checkpoint: {name} is missing")
        cfg = load_model_config(directory / CONFIG_FILE)
        processor = PrimaProcessor.from_pretrained(directory)
        model = cls(cfg, processor)
        state = read_weights(directory / WEIGHTS_FILE)
        expected = set(model.stored_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise PrimaError(
                f"{directory / WEIGHTS_FILE} does not match the model of its config.yaml: "
                f"{len(missing)} missing weight(s) {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}"
            )
        model.load_state_dict(state, strict=False)  # the rest are external weights, loaded from their source
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
        return model.eval()


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (nothing is unpickled); a PrimaError naming the file if it cannot be read
    (cut short by a crash, or not safetensors at all)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' own error names neither the file nor what to do
        raise PrimaError(f"{path} cannot be read as safetensors ({e}); a damaged file: use another checkpoint") from e


def visual_alikeness(visual: torch.Tensor) -> torch.Tensor:
    """(N,) per image of ``visual`` (N, T, H) the mean cosine between two of its different tokens."""
    unit = F.normalize(visual.float(), dim=-1)
    t = visual.shape[1]
    return ((unit @ unit.transpose(1, 2)).sum((1, 2)) - t) / (t * (t - 1))


def _unused_loss(params: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    """A zero on ``device`` that depends on the trainable ``params``: keeps a branch with nothing to do in this batch
    in the autograd graph, so distributed training sees every parameter used. A tensor even when none of them trains,
    so every process reports the same loss parts (the trainer averages them across processes in one call)."""
    return sum((p.sum() for p in params if p.requires_grad), torch.zeros((), device=device)) * 0.0


def swap_words(words: torch.Tensor, p: float) -> torch.Tensor:
    """``words`` (M, L; -1 where none) with each word swapped, with probability ``p``, for the word at the same
    place of a random row (kept where that row has none there; the row drawn may be its own)."""
    if not p:
        return words
    donors = words.gather(0, torch.randint(words.shape[0], words.shape, device=words.device))
    swap = (torch.rand(words.shape, device=words.device) < p) & (words >= 0) & (donors >= 0)
    return torch.where(swap, donors, words)


def _first_per_sample(rows: torch.Tensor) -> torch.Tensor:
    """Which of the [SEG]s whose samples are ``rows`` (in order) is its sample's first: [0, 0, 2, 2, 2] -> [T, F, T, F,
    F]."""
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    return first


def _candidates(offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(M, K) batch-image indices ``offsets[m] .. offsets[m] + counts[m] - 1`` per row, -1 padded (K = max count)."""
    k = torch.arange(int(counts.max()), device=counts.device)
    return torch.where(k < counts[:, None], offsets[:, None] + k, torch.full_like(k, -1))


def _pad(rows: list[list[int]], pad_id: int, device: torch.device, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids and their attention mask; prompts are padded on the left so generation appends to all alike."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        cols = slice(length - len(r), length) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


@dataclass
class _ModelSection:
    """config.yaml of a checkpoint: the model section, so `load_model_config(path)` reads it like a preset."""

    model: ModelConfig


def create_model(cfg: ModelConfig, texts: Any = None, *, load_weights: bool = True) -> PrimaModel:
    """A new model and its processor: the tokenizer trained on ``texts`` (tiny) or loaded (``tokenizer.pretrained``)."""
    from prima.data.processor import PrimaProcessor, load_tokenizers

    tokenizer, qformer_tokenizer = load_tokenizers(cfg, texts)
    processor = PrimaProcessor.from_config(cfg, tokenizer, qformer_tokenizer)
    return PrimaModel(cfg, processor, load_weights=load_weights)
