"""The JSONL sample format: round trips, answer parsing, and errors that say where a line is broken."""

import json

import numpy as np
import pytest
from PIL import Image

from prima.cli import main
from prima.data.masks import encode_rle
from prima.data.schema import (
    Sample,
    Segment,
    parse_answer,
    read_samples,
    strip_markup,
    write_samples,
)
from prima.errors import SampleError


def _mask(h=6, w=8):
    m = np.zeros((h, w), bool)
    m[1:4, 2:6] = True
    return encode_rle(m)


@pytest.fixture
def folder(tmp_path):
    """A dataset folder with two 6x8 images."""
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "images" / name)
    return tmp_path


def _good(**changes) -> dict:
    d = {
        "id": "s-1",
        "images": ["images/a.png", "images/b.png"],
        "question": "Which object appears in every image?",
        "answer": "The <p> red mug </p> [SEG] (IMAGE1) and the <p> red mug's handle </p> [SEG] (IMAGE2).",
        "category": "open-ended",
        "family": "common",
        "segments": [
            {"phrase": "red mug", "image": 1, "kind": "object", "mask": _mask()},
            {"phrase": "red mug's handle", "image": 2, "kind": "part", "mask": _mask()},
        ],
        "source": "test",
    }
    d.update(changes)
    return d


def _write_lines(folder, *lines) -> str:
    path = folder / "samples.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_jsonl_round_trip_keeps_every_field(folder):
    sample = Sample(
        id="s-1",
        images=["images/a.png", "images/b.png"],
        question="Is there a lamp?",
        answer="Yes: the <p> blue lamp </p> [SEG] (IMAGE2).",
        category="open-ended",
        segments=[Segment("blue lamp", 2, _mask(), "object")],
        family="existence",
        source="synth",
    )
    negative = Sample("s-2", ["images/a.png"], "Is there a car?", "No, none of the images shows a car.", "open-ended")
    path = folder / "out.jsonl"
    assert write_samples(path, [sample, negative]) == 2
    again = read_samples(path)
    assert [s.to_dict() for s in again] == [sample.to_dict(), negative.to_dict()]
    assert again[1].segments == [] and again[1].family is None


def test_parse_answer_returns_seg_phrases_in_order_and_skips_later_mentions():
    answer = "The <p> red car </p> [SEG] (IMAGE1) and its <p> wheels </p> [SEG] (IMAGE3); the <p> red car </p> (IMAGE1) again."
    assert parse_answer(answer) == [("red car", 1), ("wheels", 3)]
    assert parse_answer("No, none of the images shows a lamp.") == []
    assert parse_answer("the <p> mug </p> [SEG] and more") == [("mug", None)]


def test_strip_markup_leaves_plain_text():
    answer = "The <p> red car </p> [SEG] (IMAGE1) is left of the <p> tree </p> [SEG] (IMAGE1)."
    assert strip_markup(answer) == "The red car is left of the tree."


@pytest.mark.parametrize(
    "line, message, field",
    [
        (_good(segments=_good()["segments"][:1]), "2 [SEG] token(s) but there are 1 segment(s)", "segments"),
        (
            _good(
                answer="The <p> red mug </p> [SEG] (IMAGE3) and <p> x </p> [SEG] (IMAGE2).",
                segments=[
                    {"phrase": "red mug", "image": 3, "mask": _mask()},
                    {"phrase": "x", "image": 2, "mask": _mask()},
                ],
            ),
            "image index 3 is out of range 1..2",
            "segments[0].image",
        ),
        (
            _good(segments=[_good()["segments"][0], {"phrase": "h", "image": 1, "mask": _mask()}]),
            "tags [SEG] number 2 with (IMAGE2) but the segment is on image 1",
            "segments[1].image",
        ),
        (
            _good(segments=[{"phrase": "red mug", "image": 1, "mask": _mask(7, 8)}, _good()["segments"][1]]),
            "mask size [7, 8] differs from image 1's size [6, 8]",
            "segments[0].mask.size",
        ),
        (_good(images=["images/a.png", "images/missing.png"]), "image file not found", "images[1]"),
        ({k: v for k, v in _good().items() if k != "question"}, "missing required field", "question"),
        (_good(category="trivia"), "expected one of", "category"),
        (_good(segments=[{"phrase": "red mug", "image": 1}]), "COCO RLE", "segments[0].mask"),
    ],
)
def test_broken_line_error_names_file_line_sample_and_field(folder, line, message, field):
    path = _write_lines(folder, _good(id="fine"), line)
    with pytest.raises(SampleError) as info:
        read_samples(path)
    text = str(info.value)
    assert "samples.jsonl:2" in text
    assert "sample 's-1'" in text
    assert f"field '{field}'" in text
    assert message in text
    assert (info.value.line, info.value.field, info.value.sample_id) == (2, field, "s-1")


def test_bad_json_names_the_line(folder):
    path = _write_lines(folder, _good(), '{"id": "s-2", "images": [')
    with pytest.raises(SampleError, match=r"samples\.jsonl:2: invalid JSON"):
        read_samples(path)


def test_unreadable_image_is_reported(folder):
    (folder / "images" / "b.png").write_bytes(b"not a png")
    with pytest.raises(SampleError, match=r"field 'images\[1\]': cannot read image"):
        read_samples(_write_lines(folder, _good()))


def test_reading_without_image_checks_skips_missing_files(folder):
    path = _write_lines(folder, _good(images=["images/a.png", "images/gone.png"]))
    assert len(read_samples(path, check_images=False)) == 1


def test_cli_prints_one_line_error_and_exits_2(folder, capsys):
    path = _write_lines(folder, _good(), _good(id="s-9", category="trivia"))
    assert main(["data", "stats", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "samples.jsonl:2" in err and "s-9" in err and "category" in err


def test_written_jsonl_is_readable_by_others_as_usual(tmp_path):
    import os
    import stat

    path = tmp_path / "s.jsonl"
    write_samples(path, [])
    old = os.umask(0o022)
    os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~old
