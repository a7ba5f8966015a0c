"""Checkpoints are atomic: a save that fails or is killed half-way never damages the previous checkpoint."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from prima.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from prima.train.trainer import Trainer
from test_train import ToyModel, collate, losses, toy_cfg, toy_data


def make_trainer(run_dir: Path) -> Trainer:
    return Trainer(ToyModel(), toy_data(), collate, toy_cfg(val_every=0), run_dir)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def break_save_state(trainer: Trainer, then) -> None:
    """Make the next save write part of the model file into its folder and then fail via ``then()``."""

    def half_written_save(output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        Path(output_dir, "model.safetensors").write_bytes(b"\0" * 100)
        then()

    trainer.accelerator.save_state = half_written_save


def test_exception_mid_save_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    make_trainer(run).fit(stop_at_step=4)
    before = digest(run / "checkpoints" / "step-0000004")
    trainer = make_trainer(run)

    def disk_full():
        raise OSError(28, "No space left on device")

    break_save_state(trainer, disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(resume=True, stop_at_step=8)
    assert [s for s, _ in list_checkpoints(run)] == [4]
    assert digest(run / "checkpoints" / "step-0000004") == before
    # the half-written folder is ignored, and the next save cleans it up
    result = make_trainer(run).fit(resume=True, stop_at_step=8)
    assert result.step == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(run)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(run)] == [4]
    assert latest_checkpoint(run).name == "step-0000004"
    result = make_trainer(run).fit(resume=True)
    assert result.step == 12
    # the resumed curve equals an uninterrupted run's
    make_trainer(tmp_path / "clean").fit()
    assert dict(losses(run)) == pytest.approx(dict(losses(tmp_path / "clean")), abs=1e-7)


if __name__ == "__main__":  # the process killed by test_kill_mid_save_keeps_previous_checkpoint
    run_dir = Path(sys.argv[1])
    make_trainer(run_dir).fit(stop_at_step=4)
    trainer = make_trainer(run_dir)
    break_save_state(trainer, lambda: os.kill(os.getpid(), signal.SIGKILL))
    trainer.fit(resume=True, stop_at_step=8)


class ToyWithFrozenEncoder(ToyModel):
    """The toy plus a frozen 'encoder' that, like PrimaModel's, is rebuilt from its source, not the checkpoint."""

    def __init__(self, encoder_layers: int = 1):
        super().__init__()
        self.encoder = nn.Sequential(*[nn.Linear(4, 4) for _ in range(encoder_layers)]).requires_grad_(False)

    def external_weight_prefixes(self) -> list[str]:
        return ["encoder."]


def test_resume_ignores_a_changed_frozen_encoder_but_not_changed_trainable_weights(tmp_path):
    run = tmp_path / "run"
    Trainer(ToyWithFrozenEncoder(1), toy_data(), collate, toy_cfg(val_every=0), run).fit(stop_at_step=4)
    changed = Trainer(ToyWithFrozenEncoder(2), toy_data(), collate, toy_cfg(val_every=0), run)
    assert changed.fit(resume=True, stop_at_step=6).step == 6

    class Wider(ToyModel):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match=r"missing weight\(s\) \['extra.weight'"):
        Trainer(Wider(), toy_data(), collate, toy_cfg(val_every=0), run).fit(resume=True)


def test_only_the_tied_output_layer_note_is_silenced(caplog):
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    class Tied(nn.Module):
        def __init__(self, name: str):
            super().__init__()
            self.embed = nn.Embedding(4, 2)
            setattr(self, name, nn.Linear(2, 4, bias=False))
            getattr(self, name).weight = self.embed.weight

    PartialState()  # accelerate's logger needs it
    with caplog.at_level("WARNING"):
        clean_state_dict_for_safetensors(Tied("lm_head").state_dict())
    assert "Removed shared tensor" not in caplog.text
    with caplog.at_level("WARNING"):
        clean_state_dict_for_safetensors(Tied("other_head").state_dict())
    assert "Removed shared tensor {'other_head.weight'}" in caplog.text
