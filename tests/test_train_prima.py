"""`prima train` end to end with a very small PrimaModel on a few synthetic samples (CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from prima.cli import main
from prima.errors import PrimaError
from prima.train.checkpoint import list_checkpoints

SMALL_MODEL = [
    "model.vision.image_size=64",
    "model.qformer.num_queries=4",
    "model.qformer.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, "
    "cross_attention_frequency: 1, max_position_embeddings: 64}",
    "model.language.config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 2, max_position_embeddings: 512, tie_word_embeddings: true}",
    "model.grounding.hidden_size=32",
    "model.grounding.pixel_dim=8",
    "model.grounding.num_layers=1",
    "model.grounding.num_heads=2",
]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from prima.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root / "train", num=6, seed=0, split="train", max_images=3, size=64, workers=1)
    generate_dataset(root / "val", num=2, seed=1, split="val", max_images=3, size=64, workers=1)
    return root


def overrides(synth, tmp_path, **train):
    items = [
        f"data.train=[{{path: {synth / 'train' / 'samples.jsonl'}}}]",
        f"data.val={synth / 'val' / 'samples.jsonl'}",
        f"data.feature_cache={tmp_path / 'cache'}",
        "train.batch_size=2",
        "train.max_steps=4",
        "train.save_every=2",
        "train.val_every=2",
        "train.val_generate=1",
        "train.log_every=1",
        "train.progress_bar=false",
        *SMALL_MODEL,
    ]
    return items + [f"train.{k}={v}" for k, v in train.items()]


def log_rows(run, split="train"):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.slow
def test_prima_train_resumes_exactly_and_exports_loadable_models(synth, tmp_path):
    from prima.model.prima import PrimaModel

    full, split = tmp_path / "full", tmp_path / "split"
    config = [*overrides(synth, tmp_path), "data.group_by_length=2"]  # batches of similar length, resumed exactly
    assert main(["train", "--config", "tiny", *config, "--out", str(full)]) == 0
    rows = log_rows(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss_ce", "loss_bce", "loss_dice"} <= set(rows[0])
    val = log_rows(full, "val")
    assert {"val_loss", "val_loss_ce", "val_siou"} <= set(val[0])
    model = PrimaModel.from_pretrained(full / "final")
    assert model.config.tokens.seg_token_id is not None
    PrimaModel.from_pretrained(full / "best")
    assert any((tmp_path / "cache").rglob("*.safetensors"))

    args = ["train", "--config", "tiny", *config, "--out", str(split)]
    assert main([*args, "--stop-at-step", "2"]) == 0
    assert [s for s, _ in list_checkpoints(split)] == [2]
    assert main(["train", "--resume", "--out", str(split)]) == 0
    assert [r["loss"] for r in log_rows(split)] == pytest.approx([r["loss"] for r in rows], abs=1e-6)


@pytest.mark.slow
def test_visual_words_loss_switched_on_late_counts_steps_across_a_resume(synth, tmp_path):
    run = tmp_path / "run"
    config = [*overrides(synth, tmp_path), "model.loss.visual_words_from_step=3"]  # tiny.yaml weighs it 1.0
    assert main(["train", "--config", "tiny", *config, "--out", str(run), "--stop-at-step", "2"]) == 0
    assert main(["train", "--resume", "--out", str(run)]) == 0  # a fresh process must be told the step too
    assert [("loss_words" in r) for r in log_rows(run)] == [False, False, False, True]
    assert [("val_loss_words" in r) for r in log_rows(run, "val")] == [False, True]  # as the next step weighs it


@pytest.mark.slow
def test_averaged_weights_are_what_final_and_best_hold(synth, tmp_path):
    """`train.ema_decay`: final/ and best/ hold the average (trainable weights) of their checkpoints, not the raw
    weights the checkpoints keep for resuming."""
    from safetensors.torch import load_file

    from prima.train.ema import EMA_FILE

    run = tmp_path / "run"
    config = [*overrides(synth, tmp_path, ema_decay=0.5, best_metric="val_loss", best_mode="min"), "train.keep_last=3"]
    assert main(["train", "--config", "tiny", *config, "--out", str(run)]) == 0
    best_step = json.loads((run / "best.json").read_text())["step"]
    for folder, step in (("final", 4), ("best", best_step)):
        saved = load_file(str(run / folder / "model.safetensors"))
        checkpoint = run / "checkpoints" / f"step-{step:07d}"
        averaged, raw = load_file(str(checkpoint / EMA_FILE)), load_file(str(checkpoint / "model.safetensors"))
        assert averaged and all(torch.equal(saved[k], v) for k, v in averaged.items()), folder
        assert any(not torch.equal(saved[k], raw[k]) for k in averaged), folder


def test_train_refuses_missing_config_and_reused_run_dir(synth, tmp_path):
    with pytest.raises(PrimaError, match="--config"):
        from prima.train.run import run_training

        run_training(None, [], tmp_path / "run")
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2


def test_train_refuses_a_best_metric_it_will_never_compute_before_step_one(synth, tmp_path):
    from prima.train.run import run_training

    run = tmp_path / "run"
    with pytest.raises(PrimaError, match="val_generate"):
        run_training("tiny", [*overrides(synth, tmp_path, val_generate=0), "train.best_metric=val_miou"], run)
    assert not (run / "log.jsonl").exists()  # nothing was trained (and so nothing is lost at the end)


@pytest.mark.slow
def test_second_stage_trains_only_the_unfrozen_groups_from_a_trained_model(synth, tmp_path):
    """`train.init_from` + `train.freeze`: the stage-2 run of configs/tiny-masks.yaml, small."""
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--config", "tiny", *overrides(synth, tmp_path, max_steps=2), "--out", str(first)]) == 0
    stage2 = [
        *overrides(synth, tmp_path, init_from=first / "final", val_generate=1),
        "train.freeze=[language, query_module, square, projector]",
        "model.grounding.phrase_tokens=4",
        "model.grounding.word_readout=true",
        "model.images_from_step=0",  # as configs/tiny-masks.yaml; a frozen LLM must see its images (a config error)
    ]
    assert main(["train", "--config", "tiny", *stage2, "--out", str(second)]) == 0
    before = load_file(str(first / "final" / "model.safetensors"))
    after = load_file(str(second / "final" / "model.safetensors"))
    new = {"grounding.words.weight", "grounding.word_pos", "grounding.reader.mlp.1.weight"}
    assert new <= set(after) - set(before)  # started fresh
    assert "loss_readout" in (second / "log.jsonl").read_text()
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all(k.startswith(("grounding.", "seg_projector.")) for k in changed)
    assert (second / "processor" / "tokenizer.json").read_bytes() == (first / "final" / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_cached_seg_queries_train_stage_two_as_the_full_pass_does_and_resume_exactly(synth, tmp_path):
    """`train.cache_seg_queries`: under a frozen LLM the decoder's losses are those of the full pass (the LLM runs
    once per sample instead of once per step), and a resumed run (its cache empty) continues exactly."""
    first = tmp_path / "first"
    assert main(["train", "--config", "tiny", *overrides(synth, tmp_path, max_steps=2), "--out", str(first)]) == 0
    stage2 = [
        *overrides(synth, tmp_path, init_from=first / "final", val_generate=0, best_metric="val_loss"),
        "train.freeze=[language, query_module, square, projector]",
        "model.grounding.phrase_tokens=4",
        "model.grounding.image_choice=true",
        "model.grounding.word_readout=true",
        "model.images_from_step=0",  # as configs/tiny-masks.yaml: the frozen LLM reads its images from step 1
        # the cache computes queries in eval mode; a frozen Q-Former with dropout would differ from its train mode
        "model.qformer.config.hidden_dropout_prob=0.0",
        "model.qformer.config.attention_probs_dropout_prob=0.0",
    ]
    runs = {name: tmp_path / name for name in ("full", "cached", "split")}
    assert main(["train", "--config", "tiny", *stage2, "--out", str(runs["full"])]) == 0
    cached = [*stage2, "train.cache_seg_queries=true"]
    assert main(["train", "--config", "tiny", *cached, "--out", str(runs["cached"])]) == 0
    assert main(["train", "--config", "tiny", *cached, "--out", str(runs["split"]), "--stop-at-step", "2"]) == 0
    assert main(["train", "--resume", "--out", str(runs["split"])]) == 0

    full, with_cache, split = (log_rows(runs[k]) for k in ("full", "cached", "split"))
    assert "loss_ce" in full[0] and "loss_ce" not in with_cache[0]  # the LLM did not run: no text loss
    for name in ("loss_bce", "loss_dice", "loss_score", "loss_image"):
        assert [r[name] for r in with_cache] == pytest.approx([r[name] for r in full], rel=1e-4, abs=1e-6), name
    assert [r["loss"] for r in split] == [r["loss"] for r in with_cache]


@pytest.mark.slow
def test_the_image_prior_trains_beside_stage_two_without_changing_it(synth, tmp_path):
    """`model.image_prior` in a stage 2: its own group, loss and gradient clip, drawn without moving the random
    stream, so every other weight ends exactly as in the same run without it (the bundled checkpoint's prior was
    trained over its finished stage 2 on this ground: docs/MODEL.md), and freezing everything else trains it alone."""
    from safetensors.torch import load_file

    def stage2(init_from, frozen):
        return [
            *overrides(synth, tmp_path, init_from=init_from, val_generate=0, best_metric="val_loss"),
            f"train.freeze=[{', '.join(frozen)}]",
            "train.cache_seg_queries=true",
            "model.grounding.phrase_tokens=4",
            "model.grounding.image_choice=true",
            "model.images_from_step=0",
        ]

    first = tmp_path / "first"
    assert main(["train", "--config", "tiny", *overrides(synth, tmp_path, max_steps=2), "--out", str(first)]) == 0
    upstream = ["language", "query_module", "square", "projector"]
    runs = {name: tmp_path / name for name in ("without", "with", "alone")}
    assert main(["train", "--config", "tiny", *stage2(first / "final", upstream), "--out", str(runs["without"])]) == 0
    with_args = [*stage2(first / "final", upstream), "model.image_prior=true"]
    assert main(["train", "--config", "tiny", *with_args, "--out", str(runs["with"])]) == 0
    alone = [*stage2(runs["without"] / "final", [*upstream, "grounding"]), "model.image_prior=true"]
    assert main(["train", "--config", "tiny", *alone, "--out", str(runs["alone"])]) == 0
    without, with_prior, trained_alone = (load_file(str(runs[k] / "final" / "model.safetensors")) for k in runs)
    prior = {k for k in with_prior if k.startswith("image_prior.")}
    assert prior and set(with_prior) - prior == set(without)
    for k in without:
        assert torch.equal(with_prior[k], without[k]), k
        assert torch.equal(trained_alone[k], without[k]), k
    assert all(torch.allclose(trained_alone[k], with_prior[k], atol=1e-6) for k in prior)
    assert "loss_prior" in log_rows(runs["with"])[0]
    halfway = load_file(str(list_checkpoints(runs["with"])[0][1] / "model.safetensors"))
    assert any(not torch.equal(halfway[k], with_prior[k]) for k in prior)  # it did train

    # train.train_only / train.reinit with a module path: the answer cells trained alone over the prior as it is
    cells_args = [
        *overrides(synth, tmp_path, init_from=runs["with"] / "final", val_generate=0, best_metric="val_loss"),
        "train.cache_seg_queries=true",
        "model.grounding.phrase_tokens=4",
        "model.grounding.image_choice=true",
        "model.images_from_step=0",
        "model.image_prior=true",
        "model.image_prior_cells=true",
        "train.train_only=[image_prior.cells]",
        "train.reinit=[image_prior.cells]",
    ]
    assert main(["train", "--config", "tiny", *cells_args, "--out", str(tmp_path / "cells")]) == 0
    cells = load_file(str(tmp_path / "cells" / "final" / "model.safetensors"))
    assert set(cells) - set(with_prior) and all(
        k.startswith("image_prior.cells.") for k in set(cells) - set(with_prior)
    )
    assert all(torch.equal(cells[k], with_prior[k]) for k in with_prior)  # nothing else moved
    first = load_file(str(list_checkpoints(tmp_path / "cells")[0][1] / "model.safetensors"))
    assert any(not torch.equal(first[k], cells[k]) for k in set(cells) - set(with_prior))  # the cells did train


@pytest.mark.slow
def test_stage_three_trains_the_prior_the_same_with_nothing_there_and_its_weight_beside_it(synth, tmp_path):
    """configs/tiny-prior.yaml trains `NothingThere` and `WhichCells` beside the prior (until session 38 a fourth stage
    over the finished prior): they read the prior's readings detached and are clipped apart, so every weight of the
    prior and its cells ends bit for bit as in the same run without them, and they do train."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    assert main(["train", "--config", "tiny", *overrides(synth, tmp_path, max_steps=2), "--out", str(first)]) == 0
    stage3 = overrides(synth, tmp_path, init_from=first / "final", val_generate=0, best_metric="val_loss")
    off = ["model.image_prior_nowhere=false", "model.image_prior_cells_mix=false", "model.image_prior_nowhere_below=0"]
    runs = {"beside": [], "without": off}
    for name, extra in runs.items():
        assert main(["train", "--config", "tiny-prior", *stage3, *extra, "--out", str(tmp_path / name)]) == 0
    beside, without = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in runs)
    added = set(beside) - set(without)
    assert added and all(k.startswith(("image_prior.nowhere.", "image_prior.mix.")) for k in added)
    assert set(without) < set(beside)
    for k in without:
        assert torch.equal(beside[k], without[k]), k
    assert {"loss_nowhere", "loss_mix"} <= set(log_rows(tmp_path / "beside")[0])
    halfway = load_file(str(list_checkpoints(tmp_path / "beside")[0][1] / "model.safetensors"))
    for part in ("image_prior.nowhere.", "image_prior.mix.", "image_prior.layers."):  # each did train
        assert any(not torch.equal(halfway[k], beside[k]) for k in beside if k.startswith(part)), part


def test_cache_seg_queries_needs_a_frozen_llm():
    from prima.config import ConfigError
    from prima.train.config import TrainConfig

    with pytest.raises(ConfigError, match="cache_seg_queries needs .* frozen"):
        TrainConfig(cache_seg_queries=True, freeze=["language"]).validate()
    TrainConfig(cache_seg_queries=True, freeze=["language", "query_module", "square", "projector"]).validate()
    TrainConfig(cache_seg_queries=True, train_only=["grounding", "image_prior.cells"]).validate()
    with pytest.raises(ConfigError, match="cache_seg_queries needs .* frozen"):
        TrainConfig(cache_seg_queries=True, train_only=["grounding", "square.x"]).validate()


def test_init_from_and_freeze_errors_name_the_problem(synth, tmp_path):
    from prima.config import ConfigError
    from prima.model.prima import PrimaModel
    from prima.train.checkpoint import CheckpointError, load_model_weights
    from prima.train.config import FREEZABLE
    from prima.train.run import run_training

    with pytest.raises(ConfigError, match="unknown group.*'lm'"):
        run_training("tiny", [*overrides(synth, tmp_path), "train.freeze=[lm]"], tmp_path / "a")
    with pytest.raises(ConfigError, match="nothing would be trained"):
        run_training("tiny", [*overrides(synth, tmp_path), f"train.freeze=[{', '.join(FREEZABLE)}]"], tmp_path / "b")
    with pytest.raises(PrimaError, match="init_from.*model.safetensors not found"):
        run_training("tiny", overrides(synth, tmp_path, init_from=tmp_path / "none"), tmp_path / "c")
    with pytest.raises(ConfigError, match=r"train.train_only: unknown group\(s\) or module path\(s\).*'lm.head'"):
        run_training("tiny", [*overrides(synth, tmp_path), "train.train_only=[lm.head]"], tmp_path / "e")
    with pytest.raises(ConfigError, match="train.freeze and train.train_only"):
        run_training(
            "tiny",
            [*overrides(synth, tmp_path), "train.freeze=[language]", "train.train_only=[grounding]"],
            tmp_path / "f",
        )
    with pytest.raises(PrimaError, match="train.train_only: 'grounding.nothing' names no parameter of this model"):
        run_training("tiny", [*overrides(synth, tmp_path), "train.train_only=[grounding.nothing]"], tmp_path / "g")

    from prima.config import load_config
    from prima.data.processor import PrimaProcessor, load_tokenizers
    from prima.train.config import RunConfig

    def small_model(*extra):
        cfg = load_config(RunConfig, "tiny", [*SMALL_MODEL, *extra]).model
        tok, qtok = load_tokenizers(cfg, ["a red cube"])
        return PrimaModel(cfg, PrimaProcessor.from_config(cfg, tok, qtok))

    model = small_model()
    assert tuple(model.parameter_groups()) == FREEZABLE  # the names train.freeze accepts
    model.save_pretrained(tmp_path / "m")
    wider = small_model("model.grounding.hidden_size=16", "model.grounding.num_heads=1")
    with pytest.raises(CheckpointError, match="another shape"):
        load_model_weights(wider, tmp_path / "m" / "model.safetensors", allow_missing=True)
    # train.reinit: the skipped group is not loaded and is reported as starting fresh
    other = small_model()
    fresh = load_model_weights(
        other, tmp_path / "m" / "model.safetensors", allow_missing=True, skip=lambda k: other.group_of(k) == "grounding"
    )
    assert fresh and all(other.group_of(k) == "grounding" for k in fresh)
    assert (other.state_dict()["seg_projector.0.weight"] != model.state_dict()["seg_projector.0.weight"]).any()
    with pytest.raises(ConfigError, match="init_from, which is not set"):
        run_training("tiny", [*overrides(synth, tmp_path), "train.reinit=[grounding]"], tmp_path / "d")
