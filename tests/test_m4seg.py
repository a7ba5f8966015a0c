"""`prima data m4seg`: raw M4Seg records (JSON list, JSONL, parquet) become valid samples; bad records are counted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from prima.cli import main
from prima.data.m4seg import (
    convert_m4seg,
    convert_record,
    infer_category,
    iter_json_array,
    iter_records,
    load_sources,
    parse_named_paths,
    strip_codes,
)
from prima.data.masks import decode_rle, encode_rle, polygons_to_mask
from prima.data.schema import read_samples
from prima.errors import PrimaError

FIXTURES = Path(__file__).parent / "fixtures" / "m4seg"
REJECTED = {
    3: "code names a missing image",
    4: "missing grounding",
    5: "unknown image id",
    6: "bad segmentation",
    7: "unknown object annotation",
}


def source_args() -> list[str]:
    return [
        "--source",
        f"paco_lvis={FIXTURES / 'paco_lvis_annotations.json'}",
        "--source",
        f"pascal_part={FIXTURES / 'pascal_part_annotations.json'}",
        "--image-root",
        f"paco_lvis={FIXTURES / 'images' / 'paco'}",
        "--image-root",
        f"pascal_part={FIXTURES / 'images' / 'pascal'}",
    ]


@pytest.fixture(scope="module")
def sources():
    return load_sources(
        {
            "paco_lvis": FIXTURES / "paco_lvis_annotations.json",
            "pascal_part": FIXTURES / "pascal_part_annotations.json",
        },
        {"paco_lvis": FIXTURES / "images" / "paco", "pascal_part": FIXTURES / "images" / "pascal"},
    )


def convert(path, sources, out, **kwargs):
    return convert_m4seg(path, sources=sources, out=out, log=io.StringIO(), **kwargs)


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_objects_parts_and_repeated_mentions_follow_the_m4seg_rules(sources, tmp_path):
    report = convert(FIXTURES / "records.json", sources, tmp_path)
    assert (report.converted, report.rejected) == (4, 5)
    samples = {s.id: s for s in read_samples(tmp_path / "samples.jsonl")}  # validates images and mask sizes
    s = samples["m4seg-0000000"]
    assert s.question == "Which part of table could store pens, and is the trash can close to it?"
    assert s.answer == (
        "The <p> table's drawer </p> [SEG] (IMAGE1) of the <p> table </p> [SEG] (IMAGE1) can store pens. "
        "The <p> table </p> (IMAGE1) stands apart from the <p> trash can </p> [SEG] (IMAGE2)."
    )
    assert [(g.phrase, g.image, g.kind) for g in s.segments] == [
        ("table's drawer", 1, "part"),
        ("table", 1, "object"),
        ("trash can", 2, "object"),
    ]
    assert s.category == "functional" and s.source == "m4seg/paco_lvis"
    # img_1's groundings are consumed in first-mention order: the polygon first, then the RLE table.
    assert np.array_equal(decode_rle(s.segments[0].mask), box(6, 8, 1, 3, 1, 4))
    assert np.array_equal(decode_rle(s.segments[1].mask), box(6, 8, 0, 4, 0, 8))
    assert np.array_equal(decode_rle(s.segments[2].mask), box(6, 8, 2, 6, 5, 8))  # uncompressed RLE input
    assert all(Path(p).is_absolute() for p in s.images)


def test_second_source_string_ids_multi_polygon_and_no_mask_answers(sources, tmp_path):
    convert(FIXTURES / "records.json", sources, tmp_path)
    samples = {s.id: s for s in read_samples(tmp_path / "samples.jsonl")}
    dog = samples["m4seg-0000001"]
    assert (
        dog.answer == "Only one: the <p> dog's head </p> [SEG] (IMAGE2) of the <p> dog </p> [SEG] (IMAGE2) in image 2."
    )
    assert [Path(p).name for p in dog.images] == ["2008_000001.png", "2008_000002.png", "2008_000003.png"]
    assert dog.category == "numerical"  # inferred: the record has no category field
    none = samples["m4seg-0000002"]
    assert none.segments == [] and none.question == "Is the mouse in image 1 too?"
    assert none.category == "open-ended"
    mouse = samples["m4seg-0000008"]
    expected = box(6, 8, 0, 2, 0, 2) | box(6, 8, 4, 6, 5, 7)
    assert np.array_equal(decode_rle(mouse.segments[0].mask), expected)
    assert mouse.answer.startswith("The <p> mouse </p> [SEG] (IMAGE1)")


def test_bad_records_are_reported_with_index_and_reason(sources, tmp_path):
    log = io.StringIO()
    report = convert_m4seg(FIXTURES / "records.json", sources=sources, out=tmp_path, log=log)
    rows = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert {r["index"]: r["reason"] for r in rows} == REJECTED
    assert sum(report.reasons.values()) == report.rejected == 5
    assert "record 6: rejected, bad segmentation" in log.getvalue()
    assert "rejected 5" in report.summary()


@pytest.mark.parametrize("name", ["records.json", "records.jsonl"])
def test_json_list_and_jsonl_give_the_same_samples(sources, tmp_path, name):
    report = convert(FIXTURES / name, sources, tmp_path)
    reference = tmp_path / "reference"
    convert(FIXTURES / "records.json", sources, reference)
    assert (tmp_path / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()
    if name.endswith(".jsonl"):  # its last line is not JSON: counted, the run goes on
        assert report.reasons["invalid JSON"] == 1 and report.rejected == 6


def test_parquet_with_json_text_or_struct_groundings(sources, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = json.loads((FIXTURES / "records.json").read_text())
    columns = sorted({key for r in records for key in r})  # from_pylist takes its columns from the first row
    as_text = [
        {
            **dict.fromkeys(columns),
            **r,
            "groundings": json.dumps(r["groundings"]),
            "img_ids": [str(i) for i in r["img_ids"]],
        }
        for r in records
    ]
    pq.write_table(pa.Table.from_pylist(as_text), tmp_path / "text.parquet", row_group_size=3)
    convert(tmp_path / "text.parquet", sources, tmp_path / "text")
    convert(FIXTURES / "records.json", sources, tmp_path / "reference")
    assert (tmp_path / "text" / "samples.jsonl").read_text() == (tmp_path / "reference" / "samples.jsonl").read_text()

    # A typed export: groundings as a struct column (img_1..img_k, missing ones null), RLE segmentations.
    pascal = [r for r in records if r["dataset_name"] == "pascal_part"]
    for entries in pascal[0]["groundings"].values():
        for g in entries:  # a struct column can't mix polygon lists and RLE objects: use RLE throughout
            if isinstance(g["segmentation"], list):
                g["segmentation"] = encode_rle(polygons_to_mask(g["segmentation"], 5, 7))
    pq.write_table(pa.Table.from_pylist(pascal), tmp_path / "struct.parquet")
    report = convert(tmp_path / "struct.parquet", sources, tmp_path / "struct")
    assert report.converted == 1
    (sample,) = read_samples(tmp_path / "struct" / "samples.jsonl")
    assert [g.phrase for g in sample.segments] == ["dog's head", "dog"]


def test_json_list_is_streamed_across_chunk_boundaries(tmp_path):
    records = json.loads((FIXTURES / "records.json").read_text())
    for chunk in (1, 7, 64):
        with (FIXTURES / "records.json").open() as f:
            assert list(iter_json_array(f, path=FIXTURES / "records.json", chunk_chars=chunk)) == records
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1234567, 89]")  # a number cut by a chunk boundary must not be split
    with numbers.open() as f:
        assert list(iter_json_array(f, path=numbers, chunk_chars=3)) == [1234567, 89]


def test_a_broken_json_list_stops_with_the_record_index(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"a": 1}, {"a": 2,, }]')
    with pytest.raises(PrimaError, match="record 1"):
        list(iter_records(broken))
    endless = tmp_path / "endless.json"
    endless.write_text('[{"a": 1}, {"a": "' + "x" * 100_000)  # a string that never ends
    with endless.open() as f:  # the parser gives up without reading the rest of the file into memory
        with pytest.raises(PrimaError, match="record 1"):
            list(iter_json_array(f, path=endless, chunk_chars=16, max_record_chars=64))
        assert f.tell() < 1000
    truncated = tmp_path / "truncated.json"
    truncated.write_text('[{"a": 1}, {"a": ')
    with pytest.raises(PrimaError, match="record 1"):
        list(iter_records(truncated))


def test_relative_paths_are_relative_to_the_output_folder(sources, tmp_path):
    convert(FIXTURES / "records.json", sources, tmp_path / "out", relative_paths=True)
    samples = read_samples(tmp_path / "out" / "samples.jsonl")  # resolves images from the JSONL's folder
    assert samples and all(not Path(p).is_absolute() for s in samples for p in s.images)


def test_missing_image_files_and_unknown_datasets_are_rejected(tmp_path):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    only_paco = load_sources({"paco_lvis": FIXTURES / "paco_lvis_annotations.json"}, {"paco_lvis": empty})
    report = convert(FIXTURES / "records.json", only_paco, tmp_path / "out")
    assert report.converted == 0
    assert report.reasons["unknown dataset_name"] == 1  # the pascal_part record
    assert report.reasons["image file missing"] == 7  # every paco_lvis record but the unknown image id
    report = convert(FIXTURES / "records.json", only_paco, tmp_path / "unchecked", check_images=False)
    assert report.converted == 3


def test_long_field_names_and_own_ids_are_accepted(sources):
    record = {
        "id": "q42",
        "dataset_name": "paco_lvis",
        "img_ids": [101, 102],
        "question": "What is left of the trash_can_201?",
        "answer": "The table_101.",
        "groundings": {"img_1": [{"segmentation": [[0, 0, 8, 0, 8, 4, 0, 4]], "name": "table"}], "img_2": []},
    }
    sample, inferred, unused = convert_record(record, index=0, sources=sources)
    assert sample.id == "m4seg-q42" and sample.answer == "The <p> table </p> [SEG] (IMAGE1)."
    assert sample.category == "spatial" and inferred and not unused


def test_codes_and_categories():
    assert strip_codes("Is trash_can_201 near table_101's drawer_10101?") == "Is trash can near table's drawer?"
    assert strip_codes("In 2019 and image_1 nothing changes") == "In 2019 and image_1 nothing changes"
    assert infer_category("How many chairs are in total?") == "numerical"
    assert infer_category("What is to the left of the lamp?") == "spatial"
    assert infer_category("Which object could you use to cut bread?") == "functional"
    assert infer_category("What do these images share?") == "open-ended"


def test_source_arguments_are_checked():
    with pytest.raises(PrimaError, match="NAME=PATH"):
        parse_named_paths(["paco_lvis"], "--source")
    with pytest.raises(PrimaError, match="no --image-root for pascal_part"):
        load_sources({"pascal_part": FIXTURES / "pascal_part_annotations.json"}, {})
    with pytest.raises(PrimaError, match="not found"):
        load_sources({"x": FIXTURES / "nope.json"}, {"x": FIXTURES})


def test_cli_converts_and_prints_counts(tmp_path, capsys):
    rc = main(["data", "m4seg", "--input", str(FIXTURES / "records.jsonl"), *source_args(), "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "converted 4, rejected 6" in out
    assert len(read_samples(tmp_path / "samples.jsonl")) == 4


def test_cli_strict_stops_at_the_first_bad_record(tmp_path, capsys):
    args = ["data", "m4seg", "--input", str(FIXTURES / "records.json"), *source_args(), "--out", str(tmp_path)]
    rc = main([*args, "--strict"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "record 3" in err and "code names a missing image" in err
    assert not (tmp_path / "samples.jsonl").exists()  # nothing half-written
