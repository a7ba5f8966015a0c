"""The trainer on a toy regression model: exact resume, 1x8 == 2x4 processes, NaN stops, validation, logs.

Run as a script (``torchrun --nproc_per_node 2 tests/test_train.py RUN_DIR MAX_STEPS``) it is the worker
of the distributed test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from prima.config import ConfigError
from prima.errors import PrimaError
from prima.train.checkpoint import list_checkpoints
from prima.train.config import TrainConfig, load_run_config
from prima.train.ema import EMA_FILE, WeightAverage
from prima.train.trainer import Trainer, TrainingDiverged

# 1 process x 8 and 2 processes x 4 differ only by the order of floating-point sums in the gradient
# all-reduce; on this toy over 12 steps that stays far below this bound. Dropout is off there: its masks
# come from each process's own RNG stream, so with dropout the runs agree in distribution, not bit for bit.
DISTRIBUTED_TOLERANCE = 1e-5


@dataclass
class ToyOutput:
    loss: torch.Tensor
    loss_mse: torch.Tensor
    loss_l1: torch.Tensor


class ToyModel(nn.Module):
    """A tiny MLP regressor with dropout, so the RNG state matters for exact resume."""

    def __init__(self, nan_at_call: int | None = None, dropout: float = 0.1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        pred = self.net(batch["x"]).squeeze(-1)
        mse = ((pred - batch["y"]) ** 2).mean()
        l1 = (pred - batch["y"]).abs().mean()
        loss = mse + 0.1 * l1
        if self.training and self.nan_at_call is not None and self.calls >= self.nan_at_call:
            loss = loss * float("nan")
        return ToyOutput(loss=loss, loss_mse=mse, loss_l1=l1)


def toy_data(n: int = 64, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def collate(items: list[dict]) -> dict:
    return {"x": torch.stack([it["x"] for it in items]), "y": torch.stack([it["y"] for it in items])}


def toy_cfg(**kw) -> TrainConfig:
    base = dict(
        max_steps=12,
        batch_size=8,
        lr=0.05,
        warmup_steps=2,
        log_every=1,
        val_every=4,
        save_every=4,
        keep_last=2,
        progress_bar=False,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def run_toy(run_dir: Path, *, resume: bool = False, stop_at_step: int | None = None, model=None, **kw):
    trainer = Trainer(model or ToyModel(), toy_data(), collate, toy_cfg(**kw), run_dir, val_set=toy_data(16, seed=2))
    return trainer.fit(resume=resume, stop_at_step=stop_at_step)


def read_log(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines() if ln]
    return [r for r in rows if r["split"] == split]


def losses(run_dir: Path, split: str = "train", key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_log(run_dir, split)]


def test_loss_falls_and_log_has_parts_and_speed(tmp_path):
    result = run_toy(tmp_path / "run", max_steps=30, val_every=10, save_every=10)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"loss", "loss_mse", "loss_l1", "lr", "samples_per_s", "grad_norm"} <= set(rows[0])
    val = read_log(tmp_path / "run", "val")
    assert [r["step"] for r in val] == [10, 20, 30]
    assert val[-1]["val_loss"] < 0.5 * val[0]["val_loss"] or val[-1]["val_loss"] < 0.05
    assert result.step == 30 and result.best_checkpoint is not None


def test_two_n_steps_equal_n_steps_resume_n_steps(tmp_path):
    run_toy(tmp_path / "full")
    first = run_toy(tmp_path / "split", stop_at_step=6)
    assert first.step == 6
    run_toy(tmp_path / "split", resume=True)
    for split, key in (("train", "loss"), ("train", "lr"), ("val", "val_loss")):
        full, split_run = losses(tmp_path / "full", split, key), losses(tmp_path / "split", split, key)
        assert [s for s, _ in full] == [s for s, _ in split_run]
        assert [v for _, v in full] == pytest.approx([v for _, v in split_run], abs=1e-7), (split, key)


def test_resume_drops_log_lines_written_after_the_checkpoint(tmp_path):
    run_toy(tmp_path / "run", stop_at_step=6)
    with (tmp_path / "run" / "log.jsonl").open("a") as f:  # a run killed after step 6 logged step 7
        f.write(json.dumps({"step": 7, "split": "train", "loss": 123.0}) + "\n")
    run_toy(tmp_path / "run", resume=True, stop_at_step=8)
    assert [s for s, _ in losses(tmp_path / "run")] == list(range(1, 9))
    assert 123.0 not in [v for _, v in losses(tmp_path / "run")]


def test_keeps_last_k_and_best(tmp_path):
    run_toy(tmp_path / "run", max_steps=20, save_every=2, val_every=2, keep_last=2)
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert steps[-2:] == [18, 20]
    assert set(steps) == {18, 20, best["step"]}
    vals = dict(losses(tmp_path / "run", "val", "val_loss"))
    assert best["value"] == pytest.approx(min(vals.values()))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"training loss became nan at step 7.*step-0000004"):
        run_toy(tmp_path / "run", model=ToyModel(nan_at_call=7), val_every=0)
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert steps == [4]
    result = run_toy(tmp_path / "run", resume=True, val_every=0)  # the kept checkpoint still loads
    assert result.step == 12


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    run_toy(tmp_path / "run", stop_at_step=4)
    with pytest.raises(PrimaError, match="--resume"):
        run_toy(tmp_path / "run")


def test_uneven_batch_split_is_a_clear_error(tmp_path):
    with pytest.raises(PrimaError, match="micro_batch_size"):
        run_toy(tmp_path / "run", micro_batch_size=3)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    run_toy(tmp_path / "full", model=ToyModel(dropout=0.0))
    run_toy(tmp_path / "accum", model=ToyModel(dropout=0.0), micro_batch_size=2)
    full, accum = losses(tmp_path / "full"), losses(tmp_path / "accum")
    assert [v for _, v in full] == pytest.approx([v for _, v in accum], abs=DISTRIBUTED_TOLERANCE)


def test_fused_adamw_trains_as_the_per_tensor_loop_within_float_rounding(tmp_path):
    """`train.fused_optimizer` (default) picks torch's fused AdamW kernel; it only reorders float operations."""
    for fused in (True, False):
        trainer = Trainer(ToyModel(dropout=0.0), toy_data(), collate, toy_cfg(fused_optimizer=fused), tmp_path / "x")
        assert bool(trainer.optimizer.defaults["fused"]) is fused
    run_toy(tmp_path / "fused", model=ToyModel(dropout=0.0))
    run_toy(tmp_path / "loop", model=ToyModel(dropout=0.0), fused_optimizer=False)
    fused, loop = losses(tmp_path / "fused"), losses(tmp_path / "loop")
    assert [v for _, v in fused] == pytest.approx([v for _, v in loop], abs=DISTRIBUTED_TOLERANCE)


class ToyWithOwnHead(ToyModel):
    """ToyModel plus a head with a loss of its own (it reads detached inputs), large enough to dominate the norm."""

    def __init__(self, clip_alone: bool):
        super().__init__(dropout=0.0)
        self.head = nn.Linear(4, 1)
        self.clip_alone = clip_alone

    def separately_clipped_groups(self):
        return [list(self.head.parameters())] if self.clip_alone else []

    def forward(self, batch):
        out = super().forward(batch)
        own = 100.0 * ((self.head(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        return ToyOutput(loss=out.loss + own, loss_mse=out.loss_mse, loss_l1=out.loss_l1)


def test_a_head_clipped_on_its_own_leaves_the_other_updates_as_without_it(tmp_path):
    """`separately_clipped_groups`: a head whose loss shares no gradient path with the rest is clipped on its own,
    so the rest trains exactly as without the head (in one global norm it would scale their updates down)."""
    plain, alone, shared = ToyModel(dropout=0.0), ToyWithOwnHead(clip_alone=True), ToyWithOwnHead(clip_alone=False)
    for name, model in (("plain", plain), ("alone", alone), ("shared", shared)):
        run_toy(tmp_path / name, model=model, grad_clip=0.5)
    for a, b in zip(plain.net.parameters(), alone.net.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(plain.net.parameters(), shared.net.parameters()))
    assert losses(tmp_path / "plain", key="loss_mse") == losses(tmp_path / "alone", key="loss_mse")


def test_weight_average_follows_its_formula_and_is_applied_only_inside_its_block():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen weights are not averaged
    ema = WeightAverage(model, decay=0.5)
    assert set(ema.average) == {"weight"}
    expected = model.weight.detach().clone()
    for n in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        d = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.1818..., then the decay
        expected = d * expected + (1 - d) * model.weight.detach()
        ema.update()
    raw = model.weight.detach().clone()
    assert torch.allclose(ema.average["weight"], expected)
    with ema.applied():
        assert torch.allclose(model.weight, expected)
    assert torch.equal(model.weight, raw)


def test_averaged_weights_leave_training_unchanged_and_resume_exactly(tmp_path):
    """`train.ema_decay`: the optimizer's path is the run's without it; validation judges the average, which a
    checkpoint stores so that N steps + resume + N steps validates exactly like 2N steps."""
    run_toy(tmp_path / "plain")
    run_toy(tmp_path / "ema", ema_decay=0.8)
    assert losses(tmp_path / "plain") == losses(tmp_path / "ema")
    assert losses(tmp_path / "plain", "val", "val_loss") != losses(tmp_path / "ema", "val", "val_loss")
    assert all((folder / EMA_FILE).is_file() for _, folder in list_checkpoints(tmp_path / "ema"))
    run_toy(tmp_path / "split", ema_decay=0.8, stop_at_step=6)
    run_toy(tmp_path / "split", ema_decay=0.8, resume=True)
    for split, key in (("train", "loss"), ("val", "val_loss")):
        assert [v for _, v in losses(tmp_path / "ema", split, key)] == pytest.approx(
            [v for _, v in losses(tmp_path / "split", split, key)], abs=1e-7
        ), split


def test_resuming_with_averaged_weights_a_run_saved_without_them_is_a_clear_error(tmp_path):
    run_toy(tmp_path / "run", stop_at_step=4)
    with pytest.raises(PrimaError, match=r"step-0000004/ema\.safetensors not found.*train\.ema_decay=0"):
        run_toy(tmp_path / "run", ema_decay=0.9, resume=True)
    run_toy(tmp_path / "broken", ema_decay=0.9, stop_at_step=4)
    (tmp_path / "broken" / "checkpoints" / "step-0000004" / EMA_FILE).write_bytes(b"not safetensors")
    with pytest.raises(
        PrimaError, match=r"step-0000004/ema\.safetensors cannot be read as safetensors .*use another checkpoint"
    ):
        run_toy(tmp_path / "broken", ema_decay=0.9, resume=True)


def test_ema_decay_out_of_range_or_with_deepspeed_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.ema_decay must be in \[0, 1\), got 1\.0"):
        load_run_config("tiny", ["train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="not supported with train.deepspeed"):
        load_run_config("tiny", ["train.ema_decay=0.99", "train.deepspeed=configs/deepspeed/zero2.json"])


@pytest.mark.slow
def test_one_process_batch_8_equals_two_processes_batch_4(tmp_path):
    run_toy(tmp_path / "one", model=ToyModel(dropout=0.0), ema_decay=0.8)  # each process averages its own copy
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 13))
    for key in ("loss", "loss_mse", "lr", "grad_norm"):
        a, b = [r[key] for r in one], [r[key] for r in two]
        assert a == pytest.approx(b, abs=DISTRIBUTED_TOLERANCE), key
    val_one, val_two = losses(tmp_path / "one", "val", "val_loss"), losses(tmp_path / "two", "val", "val_loss")
    assert [v for _, v in val_one] == pytest.approx([v for _, v in val_two], abs=DISTRIBUTED_TOLERANCE)
    assert (
        json.loads((tmp_path / "two" / "checkpoints" / "step-0000012" / "trainer_state.json").read_text())["world_size"]
        == 2
    )


def test_hiding_images_from_a_frozen_llm_is_a_config_error():
    """A stage 2 built on configs/tiny.yaml (images_from_step: 1000) must say that its frozen LLM would run blind."""
    with pytest.raises(ConfigError, match=r"model\.images_from_step=1000 .* set model\.images_from_step: 0"):
        load_run_config("tiny", ["train.freeze=[language]"])
    with pytest.raises(ConfigError, match=r"model\.hide_images=0\.2 .* train\.freeze holds 'language'"):
        load_run_config("tiny", ["train.freeze=[language]", "model.images_from_step=0", "model.hide_images=0.2"])
    assert load_run_config("tiny-masks").model.images_from_step == 0  # the shipped stage 2 loads


def test_the_prior_stage_trains_the_prior_alone_over_stage_two():
    """configs/tiny-prior.yaml (stage 3): stage 2's model and read-out, + the image prior with its word places,
    contrast, answer cells, `NothingThere` and `WhichCells` (and their read-outs), every other group frozen, seed 1 as
    the shipped runs; stage 2 itself no longer trains a prior."""
    stage2, stage3 = load_run_config("tiny-masks"), load_run_config("tiny-prior")
    assert not stage2.model.image_prior
    assert stage3.model.image_prior and stage3.model.image_prior_places and stage3.model.image_prior_contrast
    assert stage3.model.image_prior_after_phrase == 1.0 and stage2.model.image_prior_after_phrase == 0.0
    assert stage3.model.image_prior_after_phrase_floor == 0.05
    assert stage3.model.image_prior_cells and not stage2.model.image_prior_cells
    assert (stage3.model.image_prior_cells_weight, stage3.model.image_prior_cells_below) == (2.0, 0.1)
    assert stage3.model.image_prior_cells_temperature == 0.25 and not stage3.model.image_prior_cells_match
    assert stage3.model.image_prior_rewrite_above == 0.9
    assert stage3.model.image_prior_nowhere and not stage2.model.image_prior_nowhere
    assert stage3.model.image_prior_cells_mix and stage3.model.image_prior_nowhere_below == 0.03
    assert not stage3.model.image_prior_odd and stage3.train.seed == 1 and stage3.train.max_steps == 8000
    # stage 2 at half stage 1's learning rate (session 39); the prior at stage 1's, as it was trained
    assert (load_run_config("tiny").train.lr, stage2.train.lr, stage3.train.lr) == (2e-3, 1e-3, 2e-3)
    assert set(stage3.train.freeze) == {"language", "query_module", "square", "projector", "grounding"}
    assert stage3.model.grounding == stage2.model.grounding
    assert [d.path for d in stage3.data.train] == [
        "data/synth/train/samples.jsonl",
        "data/synth/train-first/samples.jsonl",
        "data/synth/train-odd/samples.jsonl",
    ]


if __name__ == "__main__":  # worker of test_one_process_batch_8_equals_two_processes_batch_4
    from accelerate import PartialState

    run_toy(Path(sys.argv[1]), model=ToyModel(dropout=0.0), ema_decay=0.8)
    PartialState().destroy_process_group()  # as `prima train` does: gloo's threads may otherwise abort the exit
