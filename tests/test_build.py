"""`prima data build`: multi-image samples from COCO-format objects and PACO-style parts, valid and reproducible."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from prima.cli import main
from prima.data.build import BuildOptions, BuildReport, QuestionWriter, build_dataset, load_images, plural
from prima.data.coco import display_name, load_coco
from prima.data.masks import decode_rle
from prima.data.schema import CATEGORIES, parse_answer, read_samples
from prima.errors import PrimaError

HANDMADE = Path(__file__).parent / "fixtures" / "coco"
COCO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_sample"
needs_coco_sample = pytest.mark.skipif(
    not (COCO_SAMPLE / "panoptic_coco_detection_format.json").is_file(),
    reason="the shared COCO sample (../shared/data/coco_sample) is not next to this checkout",
)


def build_handmade(out: Path, **overrides) -> BuildReport:
    options = BuildOptions(**{"num": 40, "seed": 0, "max_images": 3, "min_area": 0.01, **overrides})
    return build_dataset(
        HANDMADE / "instances.json",
        images=HANDMADE / "images",
        parts=HANDMADE / "parts.json",
        out=out,
        options=options,
    )


def rect_mask(x0, y0, x1, y1, h=16, w=20):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture(scope="module")
def handmade_entries():
    report = BuildReport(out=Path("."))
    entries = load_images(
        load_coco(HANDMADE / "instances.json"),
        load_coco(HANDMADE / "parts.json"),
        image_dir=HANDMADE / "images",
        out=Path("."),
        options=BuildOptions(num=1, min_area=0.01),
        report=report,
    )
    return {e.info.file_name: e for e in entries}, report


def test_every_segmentation_kind_decodes_and_broken_entries_are_counted(handmade_entries):
    entries, report = handmade_entries
    assert sorted(entries) == ["a.png", "b.png", "c.png"]  # d_missing.png has no file
    a, b, c = entries["a.png"], entries["b.png"], entries["c.png"]
    assert np.array_equal(decode_rle(a.instances["chair"][0].rle), rect_mask(1, 4, 7, 14))  # polygon
    assert np.array_equal(decode_rle(a.instances["cup"][0].rle), rect_mask(13, 6, 19, 12))  # compressed RLE
    multi, uncompressed = b.instances["chair"]
    assert np.array_equal(decode_rle(multi.rle), rect_mask(0, 0, 4, 4) | rect_mask(0, 10, 4, 14))  # multi-polygon
    assert np.array_equal(decode_rle(uncompressed.rle), rect_mask(12, 4, 18, 12))  # uncompressed RLE
    assert sorted(a.instances["chair"][0].parts) == ["back", "seat"]
    assert "handle" in c.instances["cup"][0].parts
    assert not a.instances["sky"][0].isthing
    assert dict(report.skipped) == {
        "annotation of an unknown category": 1,
        "annotation on an unknown image": 1,
        "tiny mask": 1,
        "crowd annotation": 1,
        "bad segmentation": 1,
        "image file missing (its annotations unused)": 1,
        "part without obj_ann_id": 1,
        "part of an unknown or skipped object": 1,
    }
    # Categories that lost an instance are never counted (or called absent) in that image.
    assert "dog" in a.dropped and "cup" in b.dropped and "person" in c.dropped
    assert not a.countable("dog") and not b.absent("cup")


def test_handmade_build_covers_all_categories_and_parts_and_validates(tmp_path):
    report = build_handmade(tmp_path)
    samples = read_samples(tmp_path / "samples.jsonl")  # checks [SEG] counts, tags, mask sizes, images
    assert len(samples) == report.written == 40
    assert {s.category for s in samples} == set(CATEGORIES)
    assert all(2 <= len(s.images) <= 3 for s in samples)
    assert any(seg.kind == "part" for s in samples for seg in s.segments)
    assert any(not s.segments for s in samples)  # negatives: answers with no mask
    for s in samples:
        assert [phrase for phrase, _ in parse_answer(s.answer)] == [seg.phrase for seg in s.segments]
    assert report.by_category == {c: sum(s.category == c for s in samples) for c in CATEGORIES}
    assert "skipped, crowd annotation: 1" in report.summary()


def test_counts_never_use_an_image_with_a_skipped_instance(tmp_path):
    build_handmade(tmp_path, num=200, seed=3)
    counted_questions = [s for s in read_samples(tmp_path / "samples.jsonl") if s.category == "numerical"]
    assert counted_questions
    for s in counted_questions:
        names = [Path(p).name for p in s.images]
        if "cups" in s.question:
            assert "b.png" not in names  # b has a crowd of cups: its count is unknown
        if "dogs" in s.question:
            assert "a.png" not in names  # a's dog mask is tiny and was skipped
        if s.family == "count-total":
            total = int(re.search(r"There (?:is|are) (\d+)", s.answer).group(1))
            assert total == len(s.segments)


def test_parts_inside_the_coco_file_are_found_and_checked(tmp_path):
    # PACO keeps objects and parts in one file; a part must belong to an object of its own category.
    instances = json.loads((HANDMADE / "instances.json").read_text())
    parts = json.loads((HANDMADE / "parts.json").read_text())
    instances["categories"] += parts["categories"]
    instances["annotations"] += parts["annotations"]
    instances["annotations"].append(
        {
            "id": 1100,
            "image_id": 3,
            "category_id": 101,
            "obj_ann_id": 30,
            "iscrowd": 0,
            "segmentation": [[2, 2, 5, 2, 5, 5]],
        }
    )  # a chair's seat on a cup
    merged = tmp_path / "paco_style.json"
    merged.write_text(json.dumps(instances))
    report = BuildReport(out=tmp_path)
    entries = load_images(
        load_coco(merged),
        None,
        image_dir=HANDMADE / "images",
        out=tmp_path,
        options=BuildOptions(num=1, min_area=0.01),
        report=report,
    )
    by_file = {e.info.file_name: e for e in entries}
    assert sorted(by_file["a.png"].instances["chair"][0].parts) == ["back", "seat"]
    assert sorted(by_file["c.png"].instances["cup"][0].parts) == ["handle"]
    assert report.skipped["part whose object has another category"] == 1
    assert report.skipped["part without obj_ann_id"] == 1


def test_build_is_deterministic_by_seed(tmp_path):
    build_handmade(tmp_path / "one", seed=5)
    build_handmade(tmp_path / "two", seed=5)
    build_handmade(tmp_path / "other", seed=6)
    one = (tmp_path / "one" / "samples.jsonl").read_text()
    assert one == (tmp_path / "two" / "samples.jsonl").read_text()
    assert one != (tmp_path / "other" / "samples.jsonl").read_text()


def test_stuff_is_only_used_in_open_ended_questions(handmade_entries):
    entries, _ = handmade_entries
    writer = QuestionWriter(list(entries.values()), random.Random(0), BuildOptions(num=1, max_images=3))
    for category in ("numerical", "spatial", "functional"):
        for _ in range(30):
            draft = writer.write(category)
            assert draft is None or all(seg.phrase != "sky" for seg in draft.segments)


def test_stops_when_no_more_distinct_questions_exist(tmp_path):
    report = build_handmade(tmp_path, num=5000, max_images=2)
    assert 40 < report.written < 5000
    assert "allow no more distinct questions" in report.summary()
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == report.written


@needs_coco_sample
def test_real_coco_sample_gives_valid_pairs_in_all_categories(tmp_path):
    report = build_dataset(
        COCO_SAMPLE / "panoptic_coco_detection_format.json",
        images=COCO_SAMPLE / "input_images",
        categories=COCO_SAMPLE / "panoptic_coco_categories.json",
        out=tmp_path,
        options=BuildOptions(num=20, seed=0),
    )
    samples = read_samples(tmp_path / "samples.jsonl")  # opens the real JPEGs: mask sizes match
    # Two photos allow only a few distinct questions: the builder stops and says so rather than repeat.
    assert 10 <= len(samples) == report.written < 20
    assert "allow no more distinct questions" in report.summary()
    assert {s.category for s in samples} == set(CATEGORIES)
    assert all(len(s.images) == 2 for s in samples)  # the sample has two photos
    assert report.skipped["crowd annotation"] == 3
    for s in samples:
        if s.category == "numerical":  # both photos have a crowd of people, one a crowd of horses
            assert "people" not in s.question and "horses" not in s.question
        if s.category != "open-ended":  # stuff (sky, grass, tree, gravel) has no count or position
            assert not {seg.phrase for seg in s.segments} & {"sky", "grass", "tree", "gravel"}


def test_cli_builds_and_reports(tmp_path, capsys):
    args = ["data", "build", "--coco", str(HANDMADE / "instances.json"), "--images", str(HANDMADE / "images")]
    rc = main(
        [*args, "--parts", str(HANDMADE / "parts.json"), "--out", str(tmp_path), "--num", "8", "--max-images", "3"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 8 of 8 samples" in out and "skipped, crowd annotation: 1" in out
    assert len(read_samples(tmp_path / "samples.jsonl")) == 8


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--min-images", "1", "--min-images"),
        ("--num", "0", "--num"),
        ("--coco", "{tmp}/missing.json", "COCO annotation file not found"),
        ("--images", "{tmp}/no_such_folder", "no such folder"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, flag, value, message):
    args = {
        "--coco": str(HANDMADE / "instances.json"),
        "--images": str(HANDMADE / "images"),
        "--out": str(tmp_path),
        "--num": "4",
    }
    args[flag] = value.format(tmp=tmp_path)
    rc = main(["data", "build", *[item for pair in args.items() for item in pair]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err


def test_not_a_coco_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("[]")
    with pytest.raises(PrimaError, match="expected a COCO annotation object"):
        load_coco(bad)
    no_images = tmp_path / "no_images.json"
    no_images.write_text('{"categories": []}')
    with pytest.raises(PrimaError, match="'images'"):
        load_coco(no_images)


def test_coco_file_is_read_in_any_key_order(tmp_path):
    reordered = tmp_path / "reordered.json"
    reordered.write_text(
        '{"annotations": [{"id": 7, "image_id": 1, "category_id": 2, "segmentation": [[0, 0, 4, 0, 4, 4]]},'
        ' {"id": 8, "image_id": 1, "category_id": 3}],'
        ' "info": {"nested": [1, {"deep": "]}"}]}, "categories": [{"id": 2, "name": "cup"}],'
        ' "images": [{"id": 1, "file_name": "x.png", "height": 5, "width": 6}]}'
    )
    index = load_coco(reordered)
    assert list(index.annotations) == [7] and index.annotations[7].segmentation == [[0, 0, 4, 0, 4, 4]]
    assert index.skipped == {"annotation of an unknown category": 1}
    assert index.image("1").file_name == "x.png"
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [{"id": 1,, }], "categories": []}')
    with pytest.raises(PrimaError, match=r"invalid JSON in images\[\] 0"):
        load_coco(broken)


def test_names_read_as_words():
    assert display_name("mouse_(computer_equipment)") == "mouse"
    assert display_name("trash_can") == "trash can"
    assert display_name("sky-other-merged") == "sky"
    assert display_name("chair:seat") == "seat"
    assert [plural(n) for n in ("person", "bus", "sports ball", "toothbrush", "pony")] == [
        "people",
        "buses",
        "sports balls",
        "toothbrushes",
        "ponies",
    ]
