"""The model section of the presets: inheritance, dotted overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from prima.config import CONFIG_DIR, ConfigError, save_config
from prima.model.config import CROSS_IMAGE_VARIANTS, ModelConfig, image_tokens_per_image, load_model_config


@pytest.mark.parametrize("preset", ["tiny", "paper", "glamm", "lisa"])
def test_every_preset_loads_and_validates(preset):
    cfg = load_model_config(preset)
    assert isinstance(cfg, ModelConfig) and cfg.max_images == 5
    assert (cfg.loss.ce, cfg.loss.bce, cfg.loss.dice) == (1.0, 2.0, 0.5)


def test_presets_describe_the_intended_architectures():
    tiny, paper, glamm, lisa = (load_model_config(p) for p in ("tiny", "paper", "glamm", "lisa"))
    assert (tiny.vision.kind, tiny.cross_image, tiny.grounding.kind) == ("efficientnet_lite0", "square", "one_way")
    assert not tiny.language.lora.enabled and not tiny.language.freeze_base  # the tiny LLM trains from scratch
    assert (paper.vision.kind, paper.grounding.kind, paper.qformer.num_queries) == ("instructblip", "sam", 32)
    assert paper.language.lora.enabled and paper.language.freeze_base
    assert (glamm.vision.kind, glamm.vision.image_size, glamm.cross_image, glamm.qformer) == (
        "clip",
        336,
        "concat",
        None,
    )
    assert image_tokens_per_image(glamm) == 576 and image_tokens_per_image(lisa) == 256
    assert (lisa.cross_image, lisa.vision.image_size) == ("none", 224)
    assert lisa.language == glamm.language == paper.language  # baselines differ from PRIMA only in the vision side


@pytest.mark.parametrize("variant", CROSS_IMAGE_VARIANTS)
def test_each_ablation_config_changes_only_cross_image(variant):
    tiny = load_model_config("tiny")
    ablation = load_model_config(f"ablations/{variant}")
    assert ablation.cross_image == variant
    tiny.cross_image = variant
    assert ablation == tiny


def test_base_inheritance_merges_nested_sections(tmp_path):
    (tmp_path / "child.yaml").write_text(
        f"base: {CONFIG_DIR / 'tiny.yaml'}\nmodel:\n  language:\n    config:\n      num_hidden_layers: 2\n"
    )
    cfg = load_model_config(tmp_path / "child.yaml")
    assert cfg.language.config["num_hidden_layers"] == 2
    assert cfg.language.config["hidden_size"] == 256  # the rest of the section comes from the base


def test_dotted_overrides_with_or_without_the_model_prefix():
    cfg = load_model_config(
        "tiny",
        [
            "model.cross_image=pooling",
            "language.lora.enabled=true",
            "train.lr=0.1",
            "grounding.mask_stride=4",
            "loss.bce=1.5",
        ],
    )
    assert cfg.cross_image == "pooling" and cfg.language.lora.enabled
    assert cfg.grounding.mask_stride == 4 and cfg.loss.bce == 1.5
    assert load_model_config("tiny", ["qformer=null", "cross_image=concat"]).qformer is None


def test_numbers_with_an_exponent_and_no_dot_are_floats_in_files_and_overrides(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as a string; a float key then rejected `train.lr=1e-3` (session 39)
    (tmp_path / "child.yaml").write_text(f"base: {CONFIG_DIR / 'tiny.yaml'}\nmodel:\n  loss:\n    bce: 2e0\n")
    cfg = load_model_config(tmp_path / "child.yaml", ["loss.dice=5E-1", "language.config.rms_norm_eps=1e-5"])
    assert (cfg.loss.bce, cfg.loss.dice) == (2.0, 0.5)
    assert cfg.language.config["rms_norm_eps"] == 1e-5  # a free-form section gets the float too, not '1e-5'
    assert load_model_config("tiny", ["language.config.name=1e-5x"]).language.config["name"] == "1e-5x"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.vision\.imagesize'"):
        load_model_config("tiny", ["model.vision.imagesize=64"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("max_images=many", r"'model\.max_images'.*expects int"),
        ("cross_image=attention", r"'model\.cross_image' must be one of"),
        ("language.lora.enabled=maybe", r"'model\.language\.lora\.enabled' expects true or false"),
        ("max_images=7", r"model\.max_images must be in 1\.\.5"),
        ("vision.image_size=100", r"multiple of 32"),
        ("grounding.mask_stride=3", r"mask_stride must be 2 or 4"),
        ("vision.kind=clip", r"'one_way' reads the multi-scale CNN features"),
        ("qformer.output_rms=0", r"model\.qformer\.output_rms must be > 0 or null, got 0"),
        ("qformer.num_queries=0", r"model\.qformer\.num_queries must be >= 1, got 0"),
        ("images_from_step=-1", r"model\.images_from_step must be >= 0, got -1"),
        ("hide_images=1.0", r"model\.hide_images must be in \[0, 1\), got 1\.0"),
        ("loss.visual_words_from_step=-1", r"model\.loss\.visual_words_from_step must be >= 0, got -1"),
    ],
)
def test_wrong_types_and_values_are_errors_that_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_model_config("tiny", [override])


def test_square_without_a_qformer_is_an_error():
    with pytest.raises(ConfigError, match="needs a 'model.qformer' section"):
        load_model_config("tiny", ["qformer=null"])


def test_saved_config_reads_back_identically(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Section:
        model: ModelConfig

    cfg = load_model_config("paper", ["cross_image=projection"])
    save_config(Section(cfg), tmp_path / "config.yaml")
    assert load_model_config(tmp_path / "config.yaml") == cfg
