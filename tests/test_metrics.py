"""Hand-computed cases for every M4Seg metric in prima.evaluation.metrics, greedy-matching edge cases included.

Phrase similarity is injected as a bag-of-words embedding, so cosines are exact by hand:
cos("red chair", "chair") = 1/sqrt(2), cos("chair", "mug") = 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from phrase_vectors import bag_of_words
from prima.data.masks import encode_rle
from prima.data.schema import Segment
from prima.evaluation import metrics
from prima.evaluation.wordnet import load_wordnet


def box(y0, x0, y1, x1, size=(10, 10)):
    m = np.zeros(size, dtype=bool)
    m[y0:y1, x0:x1] = True
    return encode_rle(m)


def seg(phrase, image, mask):
    return Segment(phrase=phrase, image=image, mask=mask)


# --- IoU matrix, mIoU pairing ---------------------------------------------------------------------


def test_iou_matrix_is_zero_for_pairs_on_different_images():
    same = box(0, 0, 5, 5)
    pred = [seg("chair", 1, same), seg("mug", 2, box(0, 0, 5, 10))]
    gt = [seg("chair", 2, same), seg("mug", 2, box(0, 0, 5, 5))]
    iou = metrics.iou_matrix(pred, gt)
    # pred 0 is identical to gt 0 but on image 1 vs 2: IoU 0. pred 1 (50 px) vs gt masks (25 px) on image 2: 0.5.
    np.testing.assert_allclose(iou, [[0.0, 0.0], [0.5, 0.5]])


def test_miou_is_greedy_not_optimal():
    iou = np.array([[0.5, 0.25], [0.6, 0.0]])
    assert metrics.miou_pairs(iou) == [(1, 0), (0, 1)]  # 0.6 first, then what is left: 0.25
    assert metrics.sample_miou(iou) == pytest.approx((0.6 + 0.25) / 2)  # optimal would pair 0.5 + 0.0


def test_miou_ties_go_to_the_lowest_prediction_then_lowest_gt_index():
    iou = np.array([[0.5, 0.5], [0.5, 0.2]])
    assert metrics.miou_pairs(iou) == [(0, 0), (1, 1)]
    assert metrics.sample_miou(iou) == pytest.approx(0.35)


def test_miou_stops_at_zero_and_ignores_extra_predictions():
    iou = np.array([[0.8, 0.0], [0.0, 0.0], [0.0, 0.0]])  # 3 predictions, 2 GT; only one pair overlaps
    assert metrics.miou_pairs(iou) == [(0, 0)]
    assert metrics.sample_miou(iou) == pytest.approx(0.8)
    assert metrics.sample_miou(np.zeros((2, 2))) == 0.0
    assert metrics.sample_miou(np.zeros((0, 3))) == 0.0


# --- Recall ---------------------------------------------------------------------------------------


def test_recall_matches_pairs_that_pass_both_thresholds():
    iou = np.array([[0.9, 0.1], [0.2, 0.6]])  # GT x pred
    sim = np.ones((2, 2))
    assert metrics.recall_matches(iou, sim) == [(0, 0), (1, 1)]


def test_recall_stops_at_first_highest_pair_below_iou_threshold():
    iou = np.array([[0.9, 0.0], [0.0, 0.45]])
    assert metrics.recall_matches(iou, np.ones((2, 2))) == [(0, 0)]


def test_recall_stops_at_first_highest_pair_with_low_phrase_similarity_even_if_a_lower_pair_passes():
    iou = np.array([[0.9, 0.0], [0.0, 0.8]])
    sim = np.array([[0.3, 0.0], [0.0, 1.0]])
    assert metrics.recall_matches(iou, sim) == []


def test_recall_ties_take_the_lowest_gt_index_and_its_phrase_decides():
    # Two GT masks with the same IoU to one prediction; GT 0 has the wrong phrase, so matching stops.
    iou = np.array([[0.7], [0.7]])
    assert metrics.recall_matches(iou, np.array([[0.2], [0.9]])) == []
    assert metrics.recall_matches(iou, np.array([[0.9], [0.2]])) == [(0, 0)]


def test_recall_thresholds_are_inclusive():
    assert metrics.recall_matches(np.array([[0.5]]), np.array([[0.5]])) == [(0, 0)]


# --- phrases --------------------------------------------------------------------------------------


def test_phrase_word_set_iou():
    assert metrics.phrase_words("The Chair's back!") == {"the", "chair", "s", "back"}
    assert metrics.phrase_siou("red chair", "chair") == pytest.approx(0.5)
    assert metrics.phrase_siou("chair", "mug") == 0.0
    assert metrics.phrase_siou("", "") == 0.0  # an empty phrase matches nothing, not even another empty one
    assert metrics.phrase_siou("...", "chair") == 0.0


def test_ss_siou_use_the_miou_pairs_and_the_phrases_of_each_pair():
    gt = [seg("chair", 1, box(0, 0, 5, 5)), seg("mug", 2, box(0, 0, 5, 5))]
    pred = [seg("red chair", 1, box(0, 0, 5, 5)), seg("car", 2, box(0, 0, 5, 10))]
    s = metrics.score_sample("x", gt, pred, "", "", bag_of_words, num_images=2)
    assert s.miou == pytest.approx((1.0 + 0.5) / 2)
    assert s.ss == pytest.approx((1 / math.sqrt(2) + 0.0) / 2)
    assert s.siou == pytest.approx((0.5 + 0.0) / 2)
    # Recall: chair pair (IoU 1, cos 0.71) matches; car/mug (IoU 0.5, cos 0) stops the matching.
    assert s.true_positives == 1


def test_image_set_metrics_compare_phrase_sets_per_image():
    gt = [seg("chair", 1, box(0, 0, 5, 5)), seg("mug", 1, box(5, 5, 10, 10)), seg("car", 2, box(0, 0, 5, 5))]
    pred = [seg("chair", 1, box(0, 0, 5, 5)), seg("red mug", 1, box(5, 5, 10, 10)), seg("chair", 1, box(0, 0, 2, 2))]
    s = metrics.score_sample("x", gt, pred, "", "", bag_of_words, num_images=2)
    # Image 1: words {chair, red, mug} vs {chair, mug} -> 2/3; image 2 has GT only -> 0.
    assert s.i_siou == pytest.approx((2 / 3 + 0.0) / 2)
    # Image 1: mean of e_chair and (e_red + e_mug)/sqrt2 vs mean of e_chair and e_mug:
    # cos = (1 + 1/sqrt2) / (sqrt2 * sqrt2). The repeated "chair" counts once in the set.
    assert s.i_ss == pytest.approx(((1 + 1 / math.sqrt(2)) / 2 + 0.0) / 2)


def test_image_with_predicted_phrases_but_no_gt_scores_zero_in_image_metrics():
    gt = [seg("chair", 1, box(0, 0, 5, 5))]
    pred = [seg("chair", 1, box(0, 0, 5, 5)), seg("mug", 2, box(0, 0, 5, 5))]
    s = metrics.score_sample("x", gt, pred, "", "", bag_of_words, num_images=2)
    assert s.i_ss == pytest.approx(0.5)
    assert s.i_siou == pytest.approx(0.5)
    assert s.miou == 1.0 and s.ss == pytest.approx(1.0)  # the extra mask does not lower mIoU or SS


def test_empty_predicted_phrase_pairs_by_mask_but_never_matches_by_phrase():
    gt = [seg("chair", 1, box(0, 0, 5, 5))]
    pred = [seg("", 1, box(0, 0, 5, 5))]
    s = metrics.score_sample("x", gt, pred, "", "", bag_of_words)
    assert s.miou == 1.0
    assert s.true_positives == 0
    assert (s.ss, s.siou, s.i_ss, s.i_siou) == (0.0, 0.0, 0.0, 0.0)


def test_cosine_is_clipped_to_zero_one():
    assert metrics.clipped(-0.3) == 0.0
    assert metrics.clipped(1.0000001) == 1.0
    assert metrics.set_cosine(np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]])) == 0.0


# --- samples without GT masks / predictions without masks -----------------------------------------


def test_prediction_without_masks_on_a_sample_with_gt_masks_scores_zero():
    gt = [seg("chair", 1, box(0, 0, 5, 5))]
    s = metrics.score_sample("x", gt, [], "the chair", "", bag_of_words)
    assert (s.miou, s.true_positives, s.ss, s.siou, s.i_ss, s.i_siou) == (0.0, 0, 0.0, 0.0, 0.0, 0.0)
    assert (s.intersection, s.union) == (0, 25)
    assert s.no_mask_correct is None
    assert s.meteor == 0.0


def test_sample_without_gt_masks_counts_only_for_no_mask_accuracy_meteor_and_giou():
    right = metrics.score_sample("a", [], [], "No lamp.", "No lamp.", bag_of_words)
    wrong = metrics.score_sample("b", [], [seg("lamp", 1, box(0, 0, 3, 10))], "No lamp.", "A lamp.", bag_of_words)
    assert right.miou is None and right.ss is None and right.i_ss is None
    assert right.no_mask_correct is True and wrong.no_mask_correct is False
    assert metrics.giou_of(right.intersection, right.union) == 1.0  # nothing on either side: LISA scores 1
    assert metrics.giou_of(wrong.intersection, wrong.union) == 0.0
    agg = metrics.aggregate([right, wrong])
    assert agg["no_mask_acc"] == 0.5
    assert agg["miou"] is None and agg["recall"] is None and agg["ss"] is None
    assert agg["giou"] == 0.5
    assert agg["ciou"] == 0.0  # Σ I = 0 over Σ U = 30


# --- gIoU / cIoU ----------------------------------------------------------------------------------


def test_giou_ciou_merge_masks_per_image_and_sum_over_images():
    # GT: two overlapping masks on image 1 (union 10x6 = 60 px) and one on image 2 (25 px).
    gt = [seg("a", 1, box(0, 0, 10, 4)), seg("b", 1, box(0, 2, 10, 6)), seg("c", 2, box(0, 0, 5, 5))]
    # Prediction: image 1 covers exactly the GT union with one mask; image 2 misses (disjoint 25 px).
    pred = [seg("a", 1, box(0, 0, 10, 6)), seg("c", 2, box(5, 5, 10, 10))]
    inter, union = metrics.intersection_union(pred, gt)
    assert (inter, union) == (60, 60 + 25 + 25)
    other = metrics.score_sample(
        "y", [seg("a", 1, box(0, 0, 10, 10))], [seg("a", 1, box(0, 0, 5, 10))], "", "", bag_of_words
    )
    agg = metrics.aggregate([metrics.score_sample("x", gt, pred, "", "", bag_of_words, num_images=2), other])
    assert agg["giou"] == pytest.approx((60 / 110 + 0.5) / 2)
    assert agg["ciou"] == pytest.approx((60 + 50) / (110 + 100))


# --- METEOR ---------------------------------------------------------------------------------------


def test_meteor_strips_markup_and_scores_identical_text_near_one():
    gt = "The <p> chair </p> [SEG] (IMAGE2) is red."
    # 5 tokens, all matched in one chunk: METEOR = 1 - 0.5 * (chunks / matches)^3.
    assert metrics.meteor_tokens(gt) == ["the", "chair", "is", "red", "."]
    assert metrics.meteor(gt, "the chair is red.") == pytest.approx(1 - 0.5 * (1 / 5) ** 3)


def test_meteor_without_wordnet_matches_stems_and_gives_zero_for_empty_or_unrelated_text():
    assert metrics.meteor("chairs", "chair") == pytest.approx(1 - 0.5)  # one stem match, one chunk
    assert metrics.meteor("a red mug", "") == 0.0
    assert metrics.meteor("", "a red mug") == 0.0
    assert metrics.meteor("a red mug", "two blue cars") == 0.0


def test_meteor_with_wordnet_also_matches_synonyms():
    resources = load_wordnet("auto")
    if resources.wordnet is None:
        pytest.skip("no WordNet data installed (Debian `wordnet-base` or nltk's corpus); synonym stage untestable")
    assert metrics.meteor("car", "auto", resources.wordnet) == pytest.approx(0.5)
    assert metrics.meteor("car", "auto") == 0.0
    assert load_wordnet("none").wordnet is None
    # The memoised synonym lookup scores exactly as nltk does with the plain WordNet reader.
    from nltk.translate.meteor_score import meteor_score

    ref, hyp = "the kid sits in the car near a big automobile .", "a child is sitting in an auto by the large dog ."
    plain = meteor_score([ref.split()], hyp.split(), wordnet=resources.wordnet.reader)
    assert metrics.meteor(ref, hyp, resources.wordnet) == pytest.approx(plain)
    # child/kid and auto/car match as synonyms. large/big do not: nltk looks up synonyms of the Porter
    # stems the stem stage leaves ("larg"), a quirk of its implementation that is kept.
    assert plain > metrics.meteor(ref, hyp)


# --- aggregation ----------------------------------------------------------------------------------


def test_aggregate_recall_pools_segments_and_groups_are_split():
    a = metrics.score_sample(
        "a",
        [seg("chair", 1, box(0, 0, 5, 5)), seg("mug", 1, box(5, 5, 10, 10))],
        [seg("chair", 1, box(0, 0, 5, 5))],
        "",
        "",
        bag_of_words,
        category="functional",
        num_images=2,
    )
    b = metrics.score_sample(
        "b",
        [seg("car", 1, box(0, 0, 5, 5))],
        [seg("car", 1, box(0, 0, 5, 5))],
        "",
        "",
        bag_of_words,
        category="spatial",
        num_images=3,
    )
    agg = metrics.aggregate([a, b])
    assert agg["recall"] == pytest.approx(2 / 3)  # Σ TP / Σ GT, not a mean of per-sample recalls (0.75)
    assert agg["miou"] == pytest.approx(1.0)  # mIoU does not see the missed mug
    assert agg["no_mask_acc"] is None
    assert agg["num_samples"] == 2 and agg["num_gt_segments"] == 3
    by_images = metrics.aggregate_by([b, a], lambda s: s.num_images)
    assert list(by_images) == ["2", "3"]
    assert by_images["2"]["recall"] == 0.5 and by_images["3"]["recall"] == 1.0
    for key in metrics.METRIC_KEYS:
        assert agg[key] is None or 0.0 <= agg[key] <= 1.0
