"""An exponential moving average of a model's trainable weights (``train.ema_decay``; docs/TRAINING.md).

The optimizer keeps training the raw weights; the average is what validation sees and what ``final/`` and
``best/`` hold. Every process keeps its own copy: under DDP the raw weights are the same on every process, so
the averages are too. It is saved with each checkpoint as ``ema.safetensors``, so ``--resume`` continues it
exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from prima.errors import PrimaError

EMA_FILE = "ema.safetensors"


class WeightAverage:
    """``average = d * average + (1 - d) * weight`` after every optimizer step, ``d = min(decay, (1 + n) / (10 + n))``
    after the n-th update, so early averages are not dominated by the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().clone() for name, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.average.values()), [p.detach() for p in self.params.values()], 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its raw weights again after it."""
        raw = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.average[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(raw[name])

    def save(self, folder: str | os.PathLike) -> None:
        """``folder/ema.safetensors``: the averaged trainable weights under the model's own names, so
        `load_model_weights(model, path, allow_missing=True)` puts them into a model."""
        from safetensors.torch import save_file

        save_file({name: t.contiguous() for name, t in self.average.items()}, str(Path(folder) / EMA_FILE))

    def load(self, folder: str | os.PathLike, updates: int) -> None:
        """Continue from a checkpoint's averages, taken after ``updates`` optimizer steps (its step)."""
        from prima.model.prima import read_weights

        path = Path(folder) / EMA_FILE
        if not path.is_file():
            raise PrimaError(
                f"{path} not found: the checkpoint was saved without train.ema_decay; resume with train.ema_decay=0 "
                "or start a new run"
            )
        state = read_weights(path)
        if set(state) != set(self.average):
            missing, extra = sorted(set(self.average) - set(state)), sorted(set(state) - set(self.average))
            raise PrimaError(
                f"{path} does not match the trainable weights: missing {missing[:4]}, unexpected {extra[:4]}"
            )
        for name, t in state.items():
            self.average[name].copy_(t)
        self.updates = updates
