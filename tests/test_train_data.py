"""Training data: weighted epoch sampling, the frozen-feature cache's keys, run curves."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from PIL import Image

from prima.errors import PrimaError
from prima.train.data import FeatureCache, module_digest
from prima.train.plot import plot_run
from prima.train.sampler import WeightedEpochSampler, shard


def test_epoch_order_is_fixed_by_seed_and_epoch():
    a, b = WeightedEpochSampler([10, 20], seed=1), WeightedEpochSampler([10, 20], seed=1)
    assert a.epoch_order(3) == b.epoch_order(3)
    assert a.epoch_order(0) != a.epoch_order(1)
    assert WeightedEpochSampler([10, 20], seed=2).epoch_order(0) != a.epoch_order(0)
    assert sorted(a.epoch_order(0)) == list(range(30))  # default weights: every sample once per epoch


def test_weights_set_each_sources_share_of_an_epoch():
    s = WeightedEpochSampler([5, 100], [3.0, 1.0], seed=0, epoch_size=40)
    counts = Counter("small" if i < 5 else "large" for i in s.epoch_order(0))
    assert counts == {"small": 30, "large": 10}  # the 5-sample source is cycled 6 times


def test_batches_follow_the_step_and_split_across_ranks():
    s = WeightedEpochSampler([20], seed=0)
    steps = s.steps_per_epoch(8)
    assert steps == 2  # the last partial batch is dropped
    assert s.batch_for_step(2, 8) == s.epoch_order(1)[:8]
    batch = s.batch_for_step(0, 8)
    assert shard(batch, 0, 2) + shard(batch, 1, 2) == batch
    with pytest.raises(PrimaError, match="evenly"):
        shard(batch, 0, 3)


def test_grouping_by_length_makes_batches_of_similar_length_from_the_same_samples():
    """data.group_by_length: each run of `group` batches is sorted by length and cut again; batches shuffled."""
    lengths = [int(x) for x in torch.randint(10, 200, (101,), generator=torch.Generator().manual_seed(0))]
    plain = WeightedEpochSampler([101], seed=3)
    grouped = WeightedEpochSampler([101], seed=3, lengths=lengths, group=4, batch_size=8)
    order, base = grouped.epoch_order(0), plain.epoch_order(0)
    assert sorted(order) == list(range(101)) and order != base
    for start in range(0, 96, 32):  # each run of 4 batches holds the same samples as without grouping
        assert sorted(order[start : start + 32]) == sorted(base[start : start + 32])
    assert order[96:] == sorted(base[96:], key=lambda i: lengths[i])  # the short tail stays last (dropped)

    def padding(sampler):  # padded tokens over 12 batches of 8
        return sum(8 * max(b) - sum(b) for b in ([lengths[i] for i in sampler.batch_for_step(s, 8)] for s in range(12)))

    assert padding(grouped) < padding(plain) / 3
    assert [grouped.batch_for_step(s, 8) for s in range(12)] == [
        WeightedEpochSampler([101], seed=3, lengths=lengths, group=4, batch_size=8).batch_for_step(s, 8)
        for s in range(12)
    ]  # fixed by seed and epoch: a resumed run reads the same batches
    with pytest.raises(PrimaError, match="one length per sample"):
        WeightedEpochSampler([101], lengths=lengths[:5], group=4, batch_size=8)


def _image(path, color):
    Image.new("RGB", (8, 8), color).save(path)
    return str(path)


def test_feature_cache_reuses_and_never_serves_stale_features(tmp_path):
    img = _image(tmp_path / "a.png", (255, 0, 0))
    calls = []

    def compute(paths):
        calls.append(list(paths))
        return [[torch.full((2, 3), float(len(calls))), torch.ones(4)] for _ in paths]

    enc = torch.nn.Linear(2, 2)
    cache = FeatureCache(tmp_path / "cache", "enc@128", module_digest(enc))
    first = cache.features([img], compute)
    again = cache.features([img], compute)
    assert len(calls) == 1 and torch.equal(first[0][0], again[0][0]) and first[0][0].dtype == torch.float32
    _image(tmp_path / "a.png", (0, 255, 0))  # same path, new pixels
    FeatureCache(tmp_path / "cache", "enc@128", module_digest(enc)).features([img], compute)
    assert len(calls) == 2
    with torch.no_grad():
        enc.weight.add_(1.0)  # new weights
    FeatureCache(tmp_path / "cache", "enc@128", module_digest(enc)).features([img], compute)
    assert len(calls) == 3
    FeatureCache(tmp_path / "cache", "enc@256", module_digest(enc)).features([img], compute)  # new preprocessing
    assert len(calls) == 4


def test_feature_cache_recomputes_an_entry_cut_short(tmp_path):
    img = _image(tmp_path / "a.png", (255, 0, 0))
    calls = []

    def compute(paths):
        calls.append(list(paths))
        return [[torch.full((2, 3), 7.0)] for _ in paths]

    cache = FeatureCache(tmp_path / "cache", "enc@128", "weights")
    assert not cache.has(img)
    cache.features([img], compute)
    entry = cache._file(img)
    assert cache.has(img) and entry.is_file()
    entry.write_bytes(entry.read_bytes()[:20])  # a crash mid-write of an older version (writes are atomic now)
    assert cache.has(img)  # fill_cache does not read entries: the one that is needed first is checked then
    again = cache.features([img], compute)
    assert len(calls) == 2 and torch.equal(again[0][0], torch.full((2, 3), 7.0))
    assert cache.get(img) is not None  # written again whole


def test_feature_cache_reads_only_the_levels_asked_for(tmp_path):
    img, new = _image(tmp_path / "a.png", (255, 0, 0)), _image(tmp_path / "b.png", (0, 0, 255))
    cache = FeatureCache(tmp_path / "cache", "enc@128", "weights")
    levels = [torch.arange(6.0).view(2, 3), torch.ones(4), torch.full((2, 2), 3.0)]
    cache.features([img], lambda paths: [levels for _ in paths])
    for found in cache.features([img, new], lambda paths: [levels for _ in paths], levels=[1]):  # cached, computed
        assert torch.equal(found[1], torch.ones(4)) and found[1].dtype == torch.float32
        assert found[0].numel() == 0 and found[2].numel() == 0
    assert all(torch.equal(a, b) for a, b in zip(cache.features([new], None)[0], levels))  # stored whole


def test_plot_writes_a_png(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 1 / s, "loss_ce": 0.5 / s, "lr": 1e-3, "samples_per_s": 9.0}
            for s in range(1, 6)]  # fmt: skip
    rows.append({"step": 5, "split": "val", "val_loss": 0.3})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 1000
    with pytest.raises(PrimaError, match="log.jsonl"):
        plot_run(tmp_path / "missing")
