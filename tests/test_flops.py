"""`prima flops`: the full-scale presets on the meta device have the real architectures' sizes and costs."""

from __future__ import annotations

import json

import pytest

from prima.cli import main
from prima.model.flops import component_parameters, flops_table


def _close(value: int, billions: float) -> bool:
    return abs(value / 1e9 - billions) < 0.0015  # the published sizes are rounded to 3 decimals


def test_paper_components_have_the_published_parameter_counts():
    counts = component_parameters("paper")
    assert _close(counts["vision"], 0.986)  # EVA ViT-g/14
    assert _close(counts["qformer"], 0.186)  # InstructBLIP Q-Former
    assert _close(counts["llm"], 6.738)  # Vicuna-7B (+ PRIMA's 12 new token rows)
    assert _close(counts["sam"], 0.641)  # SAM ViT-H


def test_glamm_uses_clip_vit_l_336():
    counts = component_parameters("glamm")
    assert _close(counts["vision"], 0.304) and "qformer" not in counts


def test_rows_count_every_component():
    (row,) = flops_table(["lisa"], [1])
    assert row.num_images == row.grounded_images == 1 and row.cross_image == "none"
    assert row.vision > 0 and row.llm > 0 and row.grounding > 0
    assert row.tflops == pytest.approx(row.vision + row.query + row.llm + row.grounding, abs=0.02)
    assert 0 < row.params_trainable < row.params_total


@pytest.mark.slow
def test_prima_costs_at_most_three_quarters_of_the_glamm_baseline_at_three_images():
    rows = {r.preset: r for r in flops_table(["paper", "glamm"], [3])}
    prima, lazy, glamm = rows["paper"], rows["paper (lazy, 1 image grounded)"], rows["glamm"]
    assert prima.tflops <= 0.75 * glamm.tflops
    assert lazy.tflops < prima.tflops and lazy.grounded_images == 1
    assert prima.llm < glamm.llm  # 32 query tokens per image instead of 576 patch tokens


def test_cli_json_and_bad_image_count(capsys):
    assert main(["flops", "--presets", "lisa", "--images", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert {"preset", "cross_image", "num_images", "tflops", "params_total", "params_trainable"} <= set(row)
    assert main(["flops", "--images", "6"]) == 2
    assert "1..5" in capsys.readouterr().err
