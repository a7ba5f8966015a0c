"""Masks: COCO RLE round trips with text counts, polygons, resizing, IoU and boxes."""

import json

import numpy as np
import pytest

from prima.data.masks import (
    binarize,
    decode_rle,
    encode_rle,
    mask_bbox,
    mask_iou,
    polygons_to_mask,
    resize_mask,
    rle_area,
    rle_iou_matrix,
    segmentation_to_mask,
)


def _random_mask(seed: int, shape=(37, 53)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=shape) < 0.3


def test_rle_round_trip_through_json_keeps_every_pixel():
    mask = _random_mask(0)
    rle = encode_rle(mask)
    assert isinstance(rle["counts"], str)
    assert rle["size"] == [37, 53]
    again = json.loads(json.dumps(rle))  # what a JSONL line stores
    np.testing.assert_array_equal(decode_rle(again), mask)
    assert rle_area(again) == mask.sum()


def test_rle_of_empty_and_full_masks():
    for mask in (np.zeros((5, 7), bool), np.ones((5, 7), bool)):
        np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)


def test_uncompressed_rle_with_list_counts_decodes():
    # COCO crowd style: column-major runs, starting with background. 3x2 mask, column 0 = [0,1,1], column 1 = [1,0,0]
    rle = {"size": [3, 2], "counts": [1, 3, 2]}
    np.testing.assert_array_equal(decode_rle(rle), np.array([[0, 1], [1, 0], [1, 0]], bool))


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(np.zeros((2, 3, 3), bool))


def test_polygon_square_fills_its_area():
    mask = polygons_to_mask([[2, 2, 8, 2, 8, 6, 2, 6]], 10, 12)
    assert mask.shape == (10, 12)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 7, 2, 5)
    assert mask.sum() == 6 * 4


def test_bad_polygon_names_the_polygon():
    with pytest.raises(ValueError, match="polygon 1"):
        polygons_to_mask([[0, 0, 4, 0, 4, 4], [1, 2, 3]], 5, 5)


def test_segmentation_to_mask_checks_rle_size():
    rle = encode_rle(_random_mask(1, (4, 6)))
    np.testing.assert_array_equal(segmentation_to_mask(rle, 4, 6), decode_rle(rle))
    with pytest.raises(ValueError, match="differs from the image size"):
        segmentation_to_mask(rle, 6, 4)


def test_resize_mask_nearest_doubles_blocks_and_halves_back():
    small = np.array([[1, 0], [0, 1]], bool)
    big = resize_mask(small, (4, 4))
    np.testing.assert_array_equal(big, np.kron(small, np.ones((2, 2), int)).astype(bool))
    np.testing.assert_array_equal(resize_mask(big, (2, 2)), small)


def test_iou_and_iou_matrix_agree():
    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = np.zeros((10, 10), bool)
    b[:, :5] = True
    assert mask_iou(a, b) == pytest.approx(25 / 75)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0
    matrix = rle_iou_matrix([encode_rle(a), encode_rle(b)], [encode_rle(b)])
    np.testing.assert_allclose(matrix, [[25 / 75], [1.0]])
    assert rle_iou_matrix([], [encode_rle(a)]).shape == (0, 1)


def test_bbox_is_coco_xywh():
    mask = np.zeros((8, 9), bool)
    mask[2:5, 3:7] = True
    assert mask_bbox(mask) == [3, 2, 4, 3]
    assert mask_bbox(np.zeros((3, 3), bool)) == [0, 0, 0, 0]


def test_binarize_keeps_all_pixels_or_the_region_of_largest_probability_mass():
    probs = np.zeros((6, 8), dtype=np.float32)
    probs[0:2, 0:2] = 0.9  # small and sure: mass 3.6
    probs[3:6, 4:8] = 0.35  # large and unsure: mass 4.2
    probs[2, 3] = 0.6  # touches the large region's corner: one region with it (8-neighbourhood)
    assert binarize(probs, 0.3).sum() == 4 + 12 + 1
    largest = binarize(probs, 0.3, "largest")
    assert largest.sum() == 13 and largest[2, 3] and largest[5, 7] and not largest[0, 0]
    assert binarize(probs, 0.5, "largest").sum() == 4  # above 0.5 the sure one is the larger mass
    assert not binarize(np.zeros((3, 3)), 0.5, "largest").any()
    # "supported" is the model's choice of region (it needs the pixels' features); what the model left, the
    # largest region of it (upsampling may leave slivers) is kept
    assert binarize(probs, 0.3, "supported").tolist() == largest.tolist()
    with pytest.raises(ValueError, match="regions must be one of"):
        binarize(probs, 0.5, "biggest")
