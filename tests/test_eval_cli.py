"""`prima eval` (with a fake predictor), `prima score` and `prima compare` through the real command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from phrase_vectors import bag_of_words
from prima.cli import main
from prima.data.masks import encode_rle
from prima.evaluation.eval_run import run_eval


class BagOfWordsEmbedder:
    """Stands in for PhraseEmbedder in CLI tests (same call signature and `name`)."""

    name = "bag-of-words (test)"

    def __init__(self, model_path=None, device="cpu"):
        pass

    def __call__(self, phrases):
        return bag_of_words(phrases)


def box(y0, x0, y1, x1, size=(16, 16)):
    m = np.zeros(size, dtype=bool)
    m[y0:y1, x0:x1] = True
    return encode_rle(m)


@pytest.fixture
def dataset(tmp_path):
    """Three samples with real 16x16 PNGs (prima eval opens them); returns the samples JSONL."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rows = []
    for n in range(3):
        images = []
        for k in range(2):
            name = f"images/{n}_{k + 1}.png"
            Image.new("RGB", (16, 16), (40 * n, 80, 120)).save(root / name)
            images.append(name)
        segments = [{"phrase": "red chair", "image": 2, "mask": box(0, 0, 8, 8)}] if n != 1 else []
        answer = "The <p> red chair </p> [SEG] (IMAGE2)." if segments else "There is no chair."
        rows.append(
            {
                "id": f"s{n}",
                "images": images,
                "question": f"Question {n}: where is the chair?",
                "answer": answer,
                "category": "spatial",
                "segments": segments,
            }
        )
    path = root / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class FakeOutput:
    def __init__(self, answer, segments):
        self.answer, self.segments = answer, segments

    def to_json(self):
        return {"answer": self.answer, "segments": self.segments}


class FakePredictor:
    """Answers every question with the GT of the sample asked (looked up by question); records its calls."""

    def __init__(self, data_path):
        rows = [json.loads(x) for x in data_path.read_text().splitlines()]
        self.by_question = {r["question"]: r for r in rows}
        self.calls = []

    def predict(self, images, question):
        self.calls.append(("predict", list(images), question))
        for path in images:
            assert Image.open(path).size == (16, 16)  # real, resolved image paths reach the predictor
        r = self.by_question[question]
        segments = [dict(s, score=1.0, bbox=[0, 0, 8, 8]) for s in r["segments"]]
        return FakeOutput(r["answer"], segments)

    def predict_batch(self, queries):
        queries = list(queries)
        self.calls.append(("predict_batch", len(queries)))
        return [self.predict(images, q) for images, q in queries]


def test_run_eval_predicts_then_scores(dataset, tmp_path):
    fake = FakePredictor(dataset)
    out = tmp_path / "run"
    result = run_eval(None, dataset, out, predictor=fake, embed=bag_of_words, wordnet="none")
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["s0", "s1", "s2"]
    assert json.loads(lines[0])["segments"][0]["mask"] == box(0, 0, 8, 8)
    assert result["num_samples"] == 3 and result["miou"] == 1.0 and result["recall"] == 1.0
    assert result["no_mask_acc"] == 1.0
    assert json.loads((out / "metrics.json").read_text())["ground_truth"] == str(dataset)
    assert (out / "report.md").is_file() and (out / "by_category.png").is_file()
    assert [c[0] for c in fake.calls] == ["predict"] * 3


def test_run_eval_limit_and_batch_size(dataset, tmp_path):
    fake = FakePredictor(dataset)
    result = run_eval(
        None, dataset, tmp_path / "run", limit=2, batch_size=2, predictor=fake, embed=bag_of_words, wordnet="none"
    )
    assert result["num_samples"] == 2 and result["num_missing_predictions"] == 0  # the limit is not "missing"
    assert fake.calls[0] == ("predict_batch", 2)
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 2


def test_eval_command_loads_the_checkpoint_through_from_pretrained(dataset, tmp_path, monkeypatch, capsys):
    from prima.evaluation import similarity
    from prima.inference import predictor

    loaded = {}

    def fake_from_pretrained(path=None, device="cpu", **kwargs):
        loaded.update(
            path=path,
            device=device,
            distinct_images=kwargs.get("distinct_images"),
            word_readout=kwargs.get("word_readout"),
            phrase_check=kwargs.get("phrase_check"),
            every_image_check=kwargs.get("every_image_check"),
            image_support_weight=kwargs.get("image_support_weight"),
            image_prior_weight=kwargs.get("image_prior_weight"),
            image_prior_after_phrase=kwargs.get("image_prior_after_phrase"),
            mask_threshold=kwargs.get("mask_threshold"),
            mask_regions=kwargs.get("mask_regions"),
        )
        return FakePredictor(dataset)

    monkeypatch.setattr(predictor.PrimaPredictor, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(similarity, "PhraseEmbedder", BagOfWordsEmbedder)
    out = tmp_path / "run"
    code = main(["eval", "--checkpoint", "ckpt/x", "--data", str(dataset), "--out", str(out), "--wordnet", "none"])
    assert code == 0
    assert loaded == {
        "path": "ckpt/x",
        "device": "cpu",
        "distinct_images": None,
        "word_readout": None,
        "phrase_check": None,
        "every_image_check": None,
        "image_support_weight": None,
        "image_prior_weight": None,
        "image_prior_after_phrase": None,
        "mask_threshold": None,
        "mask_regions": None,
    }
    printed = capsys.readouterr().out
    assert "3 samples" in printed and "miou=100.00" in printed
    assert json.loads((out / "metrics.json").read_text())["phrase_model"] == "bag-of-words (test)"
    args = ["eval", "--checkpoint", "ckpt/x", "--data", str(dataset), "--out", str(out), "--wordnet", "none"]
    flags = ["--repeat-images", "--llm-words", "--phrase-check", "0.2", "--mask-threshold", "0.3"]
    flags += ["--no-every-image-check"]
    flags += ["--mask-regions", "largest", "--image-support-weight", "0.5", "--image-prior-after-phrase", "0.5"]
    assert main([*args, *flags]) == 0
    assert loaded["image_support_weight"] == 0.5
    assert loaded["distinct_images"] is False and loaded["word_readout"] is False
    assert loaded["mask_threshold"] == 0.3 and loaded["mask_regions"] == "largest"
    checkpoint = json.loads((out / "metrics.json").read_text())["checkpoint"]
    assert "with distinct_images false" in checkpoint and "with mask_threshold 0.3" in checkpoint
    assert "with word_readout false" in checkpoint and "with phrase_check 0.2" in checkpoint
    assert loaded["every_image_check"] is False and "with every_image_check false" in checkpoint
    assert "with mask_regions largest" in checkpoint and "with image_support_weight 0.5" in checkpoint


def test_eval_command_rejects_a_bad_limit(dataset, tmp_path, capsys):
    assert main(["eval", "--data", str(dataset), "--out", str(tmp_path / "o"), "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_score_command_writes_outputs_and_malformed_input_is_a_one_line_error(dataset, tmp_path, monkeypatch, capsys):
    from prima.evaluation import similarity

    monkeypatch.setattr(similarity, "PhraseEmbedder", BagOfWordsEmbedder)
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"id": "s0", "answer": "The red chair.", "segments": []}) + "\n")
    out = tmp_path / "scored"
    assert main(["score", "--pred", str(pred), "--gt", str(dataset), "--out", str(out), "--wordnet", "none"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["missing_prediction_ids"] == ["s1", "s2"]
    assert metrics["no_mask_acc"] == 1.0 and metrics["miou"] == 0.0
    assert "by_family" not in metrics and not (out / "by_family.png").exists()  # no sample has a family
    capsys.readouterr()

    pred.write_text('{"id": "s0", "answer": "x", "segments": []}\n{"id": "s1", "answer": 3}\n')
    assert main(["score", "--pred", str(pred), "--gt", str(dataset), "--out", str(out), "--wordnet", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{pred}:2" in err and "field 'answer'" in err and "Traceback" not in err


def test_compare_command_makes_one_table_of_several_runs(tmp_path, capsys):
    for name, miou in (("square", 0.4623), ("pooling", 0.4434)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"miou": miou, "recall": None, "num_samples": 10}))
    table_path = tmp_path / "table.md"
    assert main(["compare", str(tmp_path / "square"), str(tmp_path / "pooling"), "--out", str(table_path)]) == 0
    table = table_path.read_text()
    assert table == capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | N | mIoU | Recall |")
    assert rows[1].startswith("| square | 10 | 46.23 | – |")
    assert rows[2].startswith("| pooling | 10 | 44.34 | – |")

    assert main(["compare", str(tmp_path / "square"), str(tmp_path / "nothing")]) == 2
    assert "no metrics.json in" in capsys.readouterr().err


def test_compare_by_family_puts_one_metric_per_run_in_each_familys_row(tmp_path, capsys):
    def group(miou, recall, n):
        return {"miou": miou, "recall": recall, "num_samples": n}

    runs = {
        "square": {"common": group(0.5, 0.25, 4), "spatial": group(0.75, 0.5, 6)},
        "none": {"common": group(0.125, 0.0, 4), "odd-part": group(None, None, 2)},
    }
    for name, families in runs.items():
        (tmp_path / name).mkdir()
        metrics = {"miou": 0.6, "recall": 0.3, "num_samples": 10, "by_family": families}
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    square, none = str(tmp_path / "square"), str(tmp_path / "none")

    assert main(["compare", square, none, "--by", "family", "--metric", "recall"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == [
        "| question family | N | square | none |",
        "| common | 4 | 25.00 | 0.00 |",
        "| spatial | 6 | 50.00 | – |",  # none has no such family
        "| odd-part | 2 | – | – |",  # undefined there
        "| all | 10 | 30.00 | 30.00 |",
    ]

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.json").write_text(json.dumps({"miou": 0.5, "num_samples": 3}))
    assert main(["compare", square, str(tmp_path / "plain"), "--by", "family"]) == 2
    assert "run plain has no by_family" in capsys.readouterr().err
    assert main(["compare", square, "--by", "family", "--metric", "accuracy"]) == 2
    assert "unknown metric 'accuracy'" in capsys.readouterr().err
    assert main(["compare", square, "--by", "colour"]) == 2
    assert "unknown grouping 'colour'; choose one of category, num_images, family" in capsys.readouterr().err


def test_compare_changed_lists_the_samples_whose_own_metric_moved(tmp_path, capsys):
    def row(sid, family, miou, tp, gt, neg=None):
        return {
            "id": sid,
            "family": family,
            "category": "c",
            "num_images": 2,
            "num_gt": gt,
            "num_pred": gt,
            "miou": miou,
            "true_positives": tp,
            "ss": miou,
            "siou": miou,
            "i_ss": miou,
            "i_siou": miou,
            "meteor": 0.5,
            "intersection": 1,
            "union": 2,
            "no_mask_correct": neg,
            "missing": False,
        }

    runs = {
        "before": [
            row("a", "common", 0.5, 1, 1),
            row("b", "spatial", 0.25, 0, 2),
            row("n", "existence", None, 0, 0, False),
        ],
        "after": [
            row("a", "common", 0.5, 1, 1),
            row("b", "spatial", 0.75000001, 2, 2),
            row("n", "existence", None, 0, 0, True),
        ],
    }
    for name, rows in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before, after = str(tmp_path / "before"), str(tmp_path / "after")

    assert main(["compare", before, after, "--changed"]) == 0  # mIoU: only b moved (a is equal, n has none)
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("| ")] == [
        "| sample | family | before | after | change |",
        "| b | spatial | 25.00 | 75.00 | +50.00 |",
    ]
    assert "1 of 3 samples differ, 1 up and 0 down" in out
    assert main(["compare", before, after, "--changed", "--metric", "no_mask_acc"]) == 0
    assert "| n | existence | 0.00 | 100.00 | +100.00 |" in capsys.readouterr().out
    assert main(["compare", before, after, "--changed", "--metric", "recall"]) == 0
    assert "| b | spatial | 0.00 | 100.00 | +100.00 |" in capsys.readouterr().out

    assert main(["compare", before, "--changed"]) == 2
    assert "exactly two runs, got 1" in capsys.readouterr().err
    assert main(["compare", before, after, "--changed", "--metric", "ciou"]) == 2
    assert "no sample has one of its own" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    assert main(["compare", before, str(tmp_path / "old"), "--changed"]) == 2
    err = capsys.readouterr().err
    assert "no scores.jsonl in" in err and "score it again: prima score --pred" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scores.jsonl").write_text(json.dumps(row("z", "common", 0.5, 1, 1)) + "\n")
    assert main(["compare", before, str(tmp_path / "other"), "--changed"]) == 2
    assert "scored different samples" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "scores.jsonl").write_text('{"id": "a"}\n')
    assert main(["compare", before, str(tmp_path / "broken"), "--changed"]) == 2
    err = capsys.readouterr().err
    assert "broken/scores.jsonl, line 1: not a scores.jsonl row (no field 'category')" in err and "Traceback" not in err
    assert main(["compare", before, after, "--changed", "--metric", "accuracy"]) == 2
    assert "unknown metric 'accuracy'" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_command_end_to_end_with_a_real_random_checkpoint(
    dataset, tmp_path, tmp_path_factory, monkeypatch, capsys
):
    """The whole path a user takes: from_pretrained on a saved (random, tiny) checkpoint, predict, score."""
    from prima.evaluation import similarity
    from test_predictor import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(tmp_path_factory)
    monkeypatch.setattr(similarity, "PhraseEmbedder", BagOfWordsEmbedder)  # the model test lives in test_scorer
    out = tmp_path / "run"
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(dataset), "--out", str(out), "--limit", "2"]
    assert main([*argv, "--wordnet", "none"]) == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["s0", "s1"]
    for r in rows:
        assert isinstance(r["answer"], str)
        for s in r["segments"]:
            assert s["mask"]["size"] == [16, 16] and 1 <= s["image"] <= 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 2 and metrics["num_missing_predictions"] == 0
    assert metrics["checkpoint"] == str(checkpoint)
    assert f"- Checkpoint: `{checkpoint}`" in (out / "report.md").read_text()
    assert all(metrics[k] is None or 0.0 <= metrics[k] <= 1.0 for k in ("miou", "recall", "giou", "meteor"))
