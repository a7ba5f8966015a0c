"""Which samples each optimizer step sees: a weighted epoch order fixed by (seed, epoch), split across processes.

The order depends only on the seed and the epoch, and a step's batch only on the step number, so a
resumed run reads exactly the batches it would have read, and 1 process x 8 reads the same samples as
2 processes x 4 (rank r takes the r-th contiguous slice of the global batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prima.errors import PrimaError


class WeightedEpochSampler:
    """Epoch orders over several sources (concatenated index space) drawn in proportion to their weights.

    Each epoch has ``epoch_size`` samples (default: all sources' sizes summed); source ``d`` contributes
    ``round(epoch_size * w_d / sum(w))`` of them, taken from its own shuffled order, cycled when it is small.

    With ``lengths`` (one per sample) and ``group`` > 1, every run of ``group`` global batches of ``batch_size`` in
    that order is sorted by length, cut into batches again, and those batches are shuffled among themselves: each
    batch holds samples of similar length, so padding wastes less (``data.group_by_length``).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
        *,
        seed: int = 0,
        epoch_size: int | None = None,
        lengths: Sequence[int] | None = None,
        group: int = 0,
        batch_size: int = 1,
    ):
        if not sizes or any(n <= 0 for n in sizes):
            raise PrimaError(f"every training source needs at least one sample (sizes: {list(sizes)})")
        weights = list(weights) if weights is not None else [float(n) for n in sizes]
        if len(weights) != len(sizes) or any(w <= 0 for w in weights):
            raise PrimaError(f"need one positive weight per source, got {weights} for sizes {list(sizes)}")
        self.sizes = list(sizes)
        self.weights = weights
        self.seed = seed
        self.epoch_size = epoch_size or sum(sizes)
        total = sum(weights)
        counts = [round(self.epoch_size * w / total) for w in weights]
        counts[-1] = self.epoch_size - sum(counts[:-1])
        self.counts = counts
        if group > 1 and (lengths is None or len(lengths) != sum(sizes)):
            raise PrimaError(f"grouping by length needs one length per sample ({sum(sizes)})")
        self.lengths = list(lengths) if lengths is not None else None
        self.group, self.batch_size = group, batch_size
        self._cache: tuple[int, list[int]] | None = None

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's sample indices (into the concatenated sources), in the order they are used."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = self._generator(epoch)
        order: list[torch.Tensor] = []
        offset = 0
        for n, count in zip(self.sizes, self.counts):
            reps = -(-count // n)
            picks = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:count]
            order.append(picks + offset)
            offset += n
        flat = torch.cat(order)
        flat = flat[torch.randperm(len(flat), generator=g)].tolist()
        if self.group > 1:
            flat = self._grouped(flat, g)
        self._cache = (epoch, flat)
        return flat

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        """``order`` with each run of ``group`` batches sorted by length and its batches shuffled."""
        assert self.lengths is not None
        size = self.group * self.batch_size
        out: list[int] = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: self.lengths[i])  # type: ignore[index]
            batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            full = [b for b in batches if len(b) == self.batch_size]  # a short last one stays last (dropped)
            out += [i for k in torch.randperm(len(full), generator=g).tolist() for i in full[k]]
            out += [i for b in batches[len(full) :] for i in b]
        return out

    def steps_per_epoch(self, batch_size: int) -> int:
        steps = self.epoch_size // batch_size
        if steps == 0:
            raise PrimaError(
                f"an epoch has {self.epoch_size} samples, fewer than one batch of {batch_size}; "
                "lower train.batch_size or raise data.epoch_size"
            )
        return steps

    def batch_for_step(self, step: int, batch_size: int) -> list[int]:
        """The global batch of optimizer step ``step`` (0-based); the last partial batch of an epoch is dropped."""
        epoch, pos = divmod(step, self.steps_per_epoch(batch_size))
        return self.epoch_order(epoch)[pos * batch_size : (pos + 1) * batch_size]


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch (the batch size must divide evenly)."""
    if len(batch) % world_size:
        raise PrimaError(f"a global batch of {len(batch)} cannot be split evenly over {world_size} processes")
    per = len(batch) // world_size
    return list(batch[rank * per : (rank + 1) * per])
