"""Training data: samples from one or more JSONL sets (weighted), and a disk cache of frozen-encoder features.

`SampleSet` reads sample JSONLs (validated, image paths made absolute) into one indexable list, with the
source sizes and weights a `WeightedEpochSampler` needs. `FeatureCache` stores each image's frozen-encoder
features in fp16 under a key that hashes the encoder's name and preprocessing, its weights and the image
file's bytes, so a changed encoder or a changed image never reuses a stale entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from prima.data.schema import Sample, iter_samples
from prima.errors import PrimaError
from prima.train.config import DataSource
from prima.train.sampler import WeightedEpochSampler


def load_samples(path: str | os.PathLike, *, limit: int | None = None) -> list[Sample]:
    """A JSONL's samples (validated) with image paths made absolute, so they load from any working folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.jsonl"
    root = path.parent.resolve()
    out = []
    for sample in iter_samples(path):
        images = [str(p if Path(p).is_absolute() else root / p) for p in sample.images]
        out.append(dataclasses.replace(sample, images=images))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise PrimaError(f"{path} holds no samples")
    return out


class SampleSet(Sequence[Sample]):
    """The samples of several sources, concatenated; ``sampler(seed)`` draws epochs by the sources' weights."""

    def __init__(self, sources: Sequence[DataSource]):
        if not sources:
            raise PrimaError("data.train names no sample JSONL; add e.g. `- path: data/synth/train/samples.jsonl`")
        self.sources = list(sources)
        self.samples: list[Sample] = []
        self.sizes: list[int] = []
        for src in self.sources:
            samples = load_samples(src.path)
            self.samples.extend(samples)
            self.sizes.append(len(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.samples[i]

    def sampler(
        self,
        seed: int,
        epoch_size: int | None = None,
        *,
        lengths: Sequence[int] | None = None,
        group: int = 0,
        batch_size: int = 1,
    ) -> WeightedEpochSampler:
        return WeightedEpochSampler(
            self.sizes,
            [s.weight for s in self.sources],
            seed=seed,
            epoch_size=epoch_size,
            lengths=lengths,
            group=group,
            batch_size=batch_size,
        )


def sample_lengths(processor: Any, samples: Sequence[Sample]) -> list[int]:
    """Each sample's LLM sequence length in tokens (prompt with its image blocks + answer), unpadded."""
    return [
        len(processor.encode_prompt(s.question, len(s.images))) + len(processor.encode_answer(s.answer))
        for s in samples
    ]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, shapes, values): changes whenever its weights do."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


_UNREAD = torch.empty(0, dtype=torch.float16)  # a level `FeatureCache.features` was not asked for


class FeatureCache:
    """Per-image frozen-encoder features on disk (fp16 safetensors, one file per image and encoder).

    ``encoder_key`` must name everything besides the weights that changes the features (encoder kind,
    input size, normalisation); ``weights_digest`` is `module_digest` of the frozen encoder.
    """

    def __init__(self, folder: str | os.PathLike, encoder_key: str, weights_digest: str):
        self.folder = Path(folder)
        self.prefix = hashlib.sha256(f"{encoder_key}\n{weights_digest}".encode()).hexdigest()[:16]
        self._digests: dict[str, str] = {}  # image path -> bytes digest, read once per process
        self.hits = self.misses = 0

    def _file(self, image_path: str) -> Path:
        digest = self._digests.get(image_path)
        if digest is None:
            digest = self._digests[image_path] = file_digest(image_path)
        key = hashlib.sha256(f"{self.prefix}:{digest}".encode()).hexdigest()
        return self.folder / self.prefix / key[:2] / f"{key}.safetensors"

    def has(self, image_path: str) -> bool:
        """Whether the image has a cache entry (not read: a file cut short by a crash is recomputed when `features`
        first needs it)."""
        return self._file(image_path).is_file()

    def get(self, image_path: str, levels: Sequence[int] | None = None) -> list[torch.Tensor] | None:
        """The image's cached features, or None; with ``levels``, only those are read from the file and the others
        are empty tensors."""
        from safetensors import safe_open

        path = self._file(image_path)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                count = len(f.keys())
                wanted = range(count) if levels is None else levels
                read = {i: f.get_tensor(str(i)) for i in wanted}
        except Exception:  # a file cut short by a crash: recompute it
            return None
        return [read.get(i, _UNREAD) for i in range(count)]

    def put(self, image_path: str, features: Sequence[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self._file(image_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({str(i): f.detach().to("cpu", torch.float16).contiguous() for i, f in enumerate(features)}, tmp)
        os.replace(tmp, path)  # atomic: concurrent processes writing the same entry are harmless

    def features(
        self,
        image_paths: Sequence[str],
        compute: Callable[[list[str]], list[list[torch.Tensor]]],
        levels: Sequence[int] | None = None,
    ) -> list[list[torch.Tensor]]:
        """Every image's features (fp32), computing the missing ones in one call to ``compute``; with ``levels``,
        the other levels are empty tensors (`PrimaModel.feature_levels`: what the model's forward reads)."""
        found = [self.get(p, levels) for p in image_paths]
        missing = [p for p, f in zip(image_paths, found) if f is None]
        self.hits += len(image_paths) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = dict(zip(missing, compute(missing)))
            for p in missing:
                self.put(p, computed[p])
            found = [
                f if f is not None else [t.to(torch.float16) for t in computed[p]] for p, f in zip(image_paths, found)
            ]
            if levels is not None:
                found = [[t if i in levels else _UNREAD for i, t in enumerate(f)] for f in found]  # type: ignore[arg-type]
        return [[t.float() for t in f] for f in found]  # type: ignore[union-attr]
