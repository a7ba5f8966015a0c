"""The prompt template, the tokenizer (trained or loaded) and image preprocessing: the one place for each.

`PrimaProcessor` turns images + a question (+ an answer, for training) into the token ids and pixel tensors
that `PrimaModel` reads, and turns generated ids back into answer text.

Prompt layout (``PROMPT_TEMPLATE``, one ``IMAGE_BLOCK_TEMPLATE`` per image)::

    <s> {system} <im_start> <image>×T <im_end> (IMAGE1) ... <im_start> <image>×T <im_end> (IMAGEn)
        Question: {question} Answer: {answer} </s>

``<image>`` is a tokenizer-internal slot token: its T positions per image are overwritten by that image's
T visual tokens V_i inside the model, so no position is ever guessed from an offset.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from prima.constants import (
    ANSWER_ORDERS,
    GROUNDED_PHRASE_RE,
    IMAGE_END,
    IMAGE_START,
    IMAGE_TAGS,
    SPECIAL_TOKENS,
    image_tag,
)
from prima.errors import PrimaError

# --- image normalisation: the one place for these constants ---------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MEAN, IMAGE_STD = IMAGENET_MEAN, IMAGENET_STD  # EfficientNet-Lite0 (tiny) and SAM
NORMALIZATION = {  # vision kind -> (mean, std); EVA ViT-g (InstructBLIP) and CLIP share CLIP's statistics
    "efficientnet_lite0": (IMAGENET_MEAN, IMAGENET_STD),
    "instructblip": (CLIP_MEAN, CLIP_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "sam": (IMAGENET_MEAN, IMAGENET_STD),
}

# --- the prompt: the one place for its wording ------------------------------------------------------------------
DEFAULT_SYSTEM_PROMPT = "You see several images. Answer the question and segment what you name."
IMAGE_SLOT_TOKEN = "<image>"  # placeholder for one visual token; replaced by V_i inside the model
IMAGE_BLOCK_TEMPLATE = f"{IMAGE_START} {IMAGE_SLOT_TOKEN} {IMAGE_END} {{tag}}"
PROMPT_TEMPLATE = "{system} {image_blocks} Question: {question} Answer:"
PROMPT = PROMPT_TEMPLATE  # public name used across the project
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
PROCESSOR_FILE = "processor.json"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, IMAGE_SLOT_TOKEN)))
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,!?;:])(?=\s|$)")


def format_prompt(question: str, num_images: int, system: str | None = None) -> str:
    """The prompt as text, with one ``<image>`` standing for each image's block of visual tokens."""
    if IMAGE_SLOT_TOKEN in question:
        raise PrimaError(f"the question may not contain the reserved token {IMAGE_SLOT_TOKEN!r}")
    blocks = " ".join(IMAGE_BLOCK_TEMPLATE.format(tag=image_tag(k)) for k in range(1, num_images + 1))
    return PROMPT_TEMPLATE.format(system=system or DEFAULT_SYSTEM_PROMPT, image_blocks=blocks, question=question)


def tidy_answer(text: str) -> str:
    """Decoded text with exactly one space around every special token (tokenizers glue or double them)."""
    text = _SPECIAL_RE.sub(lambda m: f" {m.group(0)} ", text)
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", " ".join(text.split()))


# --- the order the model writes a grounded phrase in -----------------------------------------------------------
# a model-order phrase: `(IMAGEk) <p> phrase </p> [SEG]`, the tag and the [SEG] optional
_MODEL_ORDER_PHRASE_RE = re.compile(r"(?:\(IMAGE(?P<image>\d+)\)\s*)?<p>\s*(?P<phrase>.*?)\s*</p>(?P<seg>\s*\[SEG\])?")


def reverse_words(phrase: str) -> str:
    """The phrase's whitespace-separated words in reverse order ("red chair's seat" -> "seat chair's red")."""
    return " ".join(reversed(phrase.split()))


def to_model_order(answer: str, order: str) -> str:
    """A written answer (`<p> phrase </p> [SEG] (IMAGEk)`) in the order the model generates it (``answer_order``).

    ``image_first``: `(IMAGEk) <p> phrase </p> [SEG]`, so the image is chosen before the words that describe what
    it shows; ``image_first_reversed``: besides, the phrase's words reversed (`seat chair's red`): the head noun
    first, its owner next and the colour last, each word written with what it qualifies already named. A phrase
    without an image tag stays in place. `from_model_order` undoes it.
    """
    if order == "written":
        return answer
    return GROUNDED_PHRASE_RE.sub(_phrase_writer(order, tag_first=True), answer)


def from_model_order(text: str, order: str) -> str:
    """The written answer for a text in the model's order (the inverse of `to_model_order`)."""
    if order == "written":
        return text
    return tidy_answer(_MODEL_ORDER_PHRASE_RE.sub(_phrase_writer(order, tag_first=False), text))


def _phrase_writer(order: str, *, tag_first: bool) -> Any:
    """A `re.sub` replacement that writes a matched phrase (groups phrase, seg, image) with its words in
    ``order``'s direction (reversing is its own inverse) and its image tag before or after it."""
    reverse = order == "image_first_reversed"

    def write(m: re.Match) -> str:
        phrase = reverse_words(m.group("phrase")) if reverse else m.group("phrase")
        text = f"<p> {phrase} </p>" + (" [SEG]" if m.group("seg") else "")
        if not m.group("image"):
            return text
        tag = image_tag(int(m.group("image")))
        return f"{tag} {text}" if tag_first else f"{text} {tag}"

    return write


# --- images -----------------------------------------------------------------------------------------------------
def load_image(image: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """Any path, PIL image or HxW(xC) array as an 8-bit RGB PIL image (grayscale, RGBA, 16-bit converted)."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except FileNotFoundError:
            raise PrimaError(f"image file not found: {image}") from None
        except Exception as e:  # PIL raises several types for unreadable files
            raise PrimaError(f"cannot read image {image}: {e}") from None
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.dtype == np.uint16:
            arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        elif arr.dtype != np.uint8:
            raise PrimaError(f"unsupported image array dtype {arr.dtype}; use uint8, uint16 or float in 0..1")
        if arr.ndim == 3 and arr.shape[2] == 4:
            return _flatten_alpha(Image.fromarray(arr, "RGBA"))
        return Image.fromarray(arr).convert("RGB")
    if not isinstance(image, Image.Image):
        raise PrimaError(f"expected an image path, PIL image or numpy array, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float32)
        scale = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray((arr / scale * 255.0).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return load_image(np.asarray(image, dtype=np.float32))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image.convert("RGBA"))
    return image.convert("RGB")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background


def image_to_tensor(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize (aspect not kept: masks are resized back the same way) and normalise to a (3, size, size) tensor."""
    resized = image.resize((size, size), Image.BILINEAR) if image.size != (size, size) else image
    arr = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# --- tokenizer --------------------------------------------------------------------------------------------------
def _all_special_tokens() -> list[str]:
    return [*SPECIAL_TOKENS, IMAGE_SLOT_TOKEN]


def build_tokenizer(
    texts: Iterable[str], *, kind: str = "bpe", vocab_size: int = 2000, model_max_length: int = 512
) -> Any:
    """Train a small tokenizer on ``texts`` (questions + answers), with every special token as ONE token.

    ``bpe``: byte-level BPE (no unknown words, exact round trip); ``wordlevel``: one id per whitespace/punctuation
    word (shorter sequences; unseen words become ``<unk>``). Returns a transformers fast tokenizer.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base_specials = [UNK, BOS, EOS, PAD]
    # strip the spaces around special tokens so "<p> chair </p>" and "<p>chair</p>" give the same ids
    specials = [AddedToken(t, lstrip=True, rstrip=True, special=True, normalized=False) for t in _all_special_tokens()]
    corpus = [_SPECIAL_RE.sub(" ", t) for t in texts]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=base_specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        # punctuation becomes its own word, but "desk's" stays one word
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s']"), behavior="isolated")]
        )
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=base_specials, show_progress=False)
    else:
        raise PrimaError(f"unknown tokenizer kind {kind!r}; use 'bpe', 'wordlevel' or 'pretrained'")
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )
    check_special_tokens(fast)
    return fast


def load_pretrained_tokenizer(path: str | os.PathLike) -> Any:
    """A local transformers tokenizer (e.g. Vicuna's) with PRIMA's special tokens added as single tokens."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise PrimaError(f"tokenizer folder not found: {path} (model.tokenizer.pretrained)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": _all_special_tokens()})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    check_special_tokens(tok)
    return tok


def check_special_tokens(tokenizer: Any) -> dict[str, int]:
    """Assert that every PRIMA special token is exactly one known token; returns token -> id."""
    ids = {}
    unk = tokenizer.unk_token_id
    for t in _all_special_tokens():
        tid = tokenizer.convert_tokens_to_ids(t)
        encoded = tokenizer(f"a {t} b", add_special_tokens=False).input_ids
        if tid is None or (unk is not None and tid == unk) or encoded.count(tid) != 1:
            raise PrimaError(f"the tokenizer does not encode {t!r} as one token; it must be added as a special token")
        ids[t] = tid
    return ids


# --- the processor ----------------------------------------------------------------------------------------------
class PrimaProcessor:
    """Tokenizer(s) + image preprocessing for one model: prompt/answer ids, pixel tensors, decoding."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_size: int,
        num_image_tokens: int,
        vision_kind: str = "efficientnet_lite0",
        max_images: int = 5,
        system_prompt: str | None = None,
        qformer_tokenizer: Any = None,
        qformer_max_length: int = 32,
        grounding_image_size: int | None = None,
        answer_order: str = "written",
    ):
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.vision_kind = vision_kind
        self.image_mean, self.image_std = NORMALIZATION[vision_kind]
        self.max_images = max_images
        self.system_prompt = system_prompt
        self.qformer_max_length = qformer_max_length
        self.grounding_image_size = grounding_image_size  # SAM input side when grounding has its own encoder
        if answer_order not in ANSWER_ORDERS:
            raise PrimaError(f"unknown answer_order {answer_order!r}; use one of {', '.join(ANSWER_ORDERS)}")
        self.answer_order = answer_order  # how the model writes grounded phrases (`to_model_order`)
        self.special_ids = check_special_tokens(tokenizer)
        self.slot_id = self.special_ids[IMAGE_SLOT_TOKEN]
        self.image_start_id = self.special_ids[IMAGE_START]

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any, qformer_tokenizer: Any = None) -> PrimaProcessor:
        """The processor for a `ModelConfig` (image size, tokens per image, normalisation follow from it)."""
        from prima.model.config import image_tokens_per_image

        return cls(
            tokenizer,
            image_size=cfg.vision.image_size,
            num_image_tokens=image_tokens_per_image(cfg),
            vision_kind=cfg.vision.kind,
            max_images=cfg.max_images,
            system_prompt=cfg.system_prompt,
            qformer_tokenizer=qformer_tokenizer,
            qformer_max_length=cfg.qformer.max_text_length if cfg.qformer is not None else 32,
            grounding_image_size=cfg.grounding.image_size if cfg.grounding.kind == "sam" else None,
            answer_order=cfg.answer_order,
        )

    # text ---------------------------------------------------------------------------------------------------------
    def encode_words(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens), as the LLM reads it."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode_prompt(self, question: str, num_images: int) -> list[int]:
        """Token ids of the prompt (BOS first), with ``num_image_tokens`` slot ids inside every image block."""
        if not 1 <= num_images <= self.max_images:
            raise PrimaError(f"got {num_images} images; this model takes 1..{self.max_images}")
        text = format_prompt(question, num_images, self.system_prompt)
        ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids += self.encode_words(text)
        if ids.count(self.slot_id) != num_images:
            raise PrimaError("the prompt's image blocks did not tokenize as expected (check the tokenizer)")
        expanded: list[int] = []
        for i in ids:
            expanded.extend([self.slot_id] * self.num_image_tokens if i == self.slot_id else [i])
        return expanded

    def encode_answer(self, answer: str) -> list[int]:
        """Token ids of a (grounded) answer, in the model's `answer_order`, followed by EOS: what it learns to
        generate."""
        return self.encode_words(to_model_order(answer, self.answer_order)) + [self.tokenizer.eos_token_id]

    def encode_qformer_text(self, question: str) -> list[int]:
        """The question as the Q-Former reads it (its own tokenizer when it has one), cut to its max length."""
        tok = self.qformer_tokenizer or self.tokenizer
        ids = list(tok(question, add_special_tokens=self.qformer_tokenizer is not None).input_ids)
        return ids[: self.qformer_max_length] or [tok.pad_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids as written answer text: special tokens kept (single-spaced), BOS/EOS/PAD dropped."""
        return from_model_order(self._decode(ids), self.answer_order)

    def decode_phrase(self, ids: Sequence[int]) -> str:
        """The words between a generated `<p>` and `</p>` as written text."""
        text = self._decode(ids)
        return reverse_words(text) if self.answer_order == "image_first_reversed" else text

    def _decode(self, ids: Sequence[int]) -> str:
        drop = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        text = self.tokenizer.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)
        return tidy_answer(text)

    # images -------------------------------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels for the vision encoder."""
        return torch.stack(
            [image_to_tensor(load_image(im), self.image_size, self.image_mean, self.image_std) for im in images]
        )

    def preprocess_grounding_images(self, images: Sequence[Any]) -> torch.Tensor | None:
        """(N, 3, G, G) pixels for a separate grounding encoder (SAM), or None when grounding reuses the vision one."""
        if self.grounding_image_size is None:
            return None
        mean, std = NORMALIZATION["sam"]
        return torch.stack([image_to_tensor(load_image(im), self.grounding_image_size, mean, std) for im in images])

    # persistence --------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(str(directory / QFORMER_TOKENIZER_DIR))
        meta = {
            "image_size": self.image_size,
            "num_image_tokens": self.num_image_tokens,
            "vision_kind": self.vision_kind,
            "max_images": self.max_images,
            "system_prompt": self.system_prompt,
            "qformer_max_length": self.qformer_max_length,
            "grounding_image_size": self.grounding_image_size,
            "answer_order": self.answer_order,
        }
        (directory / PROCESSOR_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PrimaProcessor:
        from transformers import AutoTokenizer

        directory = Path(directory)
        meta_path = directory / PROCESSOR_FILE
        if not meta_path.is_file():
            raise PrimaError(f"{directory} has no {PROCESSOR_FILE}; is it a PRIMA checkpoint folder?")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PrimaError(f"{meta_path}: not valid JSON ({e})") from None
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "tokenizer", "qformer_tokenizer"}
        unknown = sorted(set(meta) - known)
        if unknown:
            raise PrimaError(
                f"{meta_path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))}); "
                "was it written by another version of PRIMA?"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        qdir = directory / QFORMER_TOKENIZER_DIR
        qtok = AutoTokenizer.from_pretrained(str(qdir), local_files_only=True) if qdir.is_dir() else None
        return cls(tokenizer, qformer_tokenizer=qtok, **meta)


def load_tokenizers(cfg: Any, texts: Iterable[str] | None = None) -> tuple[Any, Any]:
    """(LLM tokenizer, Q-Former tokenizer or None) for a `ModelConfig`: trained on ``texts`` or loaded from disk."""
    from transformers import AutoTokenizer

    tc = cfg.tokenizer
    if tc.kind == "pretrained":
        if not tc.pretrained:
            raise PrimaError("model.tokenizer.kind is 'pretrained' but model.tokenizer.pretrained names no folder")
        tok = load_pretrained_tokenizer(tc.pretrained)
    else:
        if texts is None:
            raise PrimaError(f"a {tc.kind} tokenizer is trained on text; pass the training questions and answers")
        # the prompt's own words (system text, "Question", "Answer") are in the vocabulary too, not <unk>
        prompt = format_prompt("", 1, cfg.system_prompt)
        tok = build_tokenizer(
            [prompt, *texts], kind=tc.kind, vocab_size=tc.vocab_size, model_max_length=tc.model_max_length
        )
    qtok = None
    if tc.qformer_pretrained:
        if not Path(tc.qformer_pretrained).is_dir():
            raise PrimaError(f"Q-Former tokenizer folder not found: {tc.qformer_pretrained}")
        qtok = AutoTokenizer.from_pretrained(tc.qformer_pretrained, local_files_only=True)
    return tok, qtok


__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "IMAGE_TAGS",
    "NORMALIZATION",
    "PROMPT",
    "PrimaProcessor",
    "build_tokenizer",
    "format_prompt",
    "load_image",
    "load_tokenizers",
]
