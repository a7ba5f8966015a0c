"""`prima predict` and `prima demo`: bad input gives one line and exit 2; good input writes JSON and overlays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prima.cli import main
from prima.data.schema import strip_markup as prediction_text
from prima.inference.batch import read_queries
from prima.inference.predictor import MAX_QUESTION_CHARS
from test_predictor import build_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory)  # the random checkpoint of test_predictor, built once


@pytest.fixture()
def pictures(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"scene{i + 1}.png"
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(p)
        paths.append(p)
    return paths


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *words):
    assert code == 2
    assert err.startswith("prima predict: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(pictures, tmp_path, capsys):
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(pictures[0].read_bytes()[:-30])
    absent = tmp_path / "no-checkpoint"  # never reached: input is checked first
    cases = [
        ([], "Which?", "no image given"),
        ([*pictures[:6]], "Which?", "6 images given, but this model takes at most 5"),
        ([pictures[0], tmp_path / "missing.png"], "Which?", "image 2 (", "file not found"),
        ([pictures[0], truncated], "Which?", "truncated or corrupt"),
        ([pictures[0]], "   ", "question is empty"),
        ([pictures[0]], "w" * (MAX_QUESTION_CHARS + 1), f"limit is {MAX_QUESTION_CHARS}"),
    ]
    for images, question, *words in cases:
        argv = ["predict", "--images", *images, "--question", question, "--checkpoint", absent]
        code, _, err = _run(argv, capsys)
        _assert_one_line_error(code, err, *words)


def test_an_output_folder_that_is_a_file_is_a_clear_error(pictures, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    argv = ["predict", "--images", pictures[0], "--question", "q?", "--out", taken, "--checkpoint", tmp_path]
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, "cannot write to the output folder", str(taken))


def test_missing_checkpoint_and_unavailable_device(pictures, tmp_path, capsys):
    code, _, err = _run(
        ["predict", "--images", pictures[0], "--question", "q?", "--checkpoint", tmp_path / "x"], capsys
    )
    _assert_one_line_error(code, err, "checkpoint folder not found")
    if not __import__("torch").cuda.is_available():
        (tmp_path / "ck").mkdir()
        argv = ["predict", "--images", pictures[0], "--question", "q?", "--checkpoint", tmp_path / "ck"]
        code, _, err = _run([*argv, "--device", "cuda"], capsys)
        _assert_one_line_error(code, err, "no usable CUDA GPU")


def test_question_and_jsonl_flags_must_go_together(pictures, tmp_path, capsys):
    code, _, err = _run(["predict", "--images", pictures[0]], capsys)
    _assert_one_line_error(code, err, "--question is required")
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "a", "images": [pictures[0].name], "question": "q?"}) + "\n")
    code, _, err = _run(["predict", "--jsonl", q, "--question", "q?"], capsys)
    _assert_one_line_error(code, err, "--question goes with --images")


def test_queries_file_errors_name_the_line_and_id(pictures, tmp_path):
    from prima.errors import PrimaError

    q = tmp_path / "queries.jsonl"
    lines = [
        {"id": "ok", "images": [pictures[0].name, str(pictures[1])], "question": "q?"},
        {"id": "bad", "images": ["nowhere.png"], "question": "q?"},
    ]
    q.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(PrimaError, match=r"queries.jsonl:2, sample 'bad', field 'images\[0\]': image file not found"):
        read_queries(q)
    q.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps({**lines[0], "question": ""}) + "\n")
    with pytest.raises(PrimaError, match=r":3, sample 'ok', field 'question': the question is empty"):
        read_queries(q)
    q.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[0]) + "\n")
    with pytest.raises(PrimaError, match="duplicate id"):
        read_queries(q)
    q.write_bytes(json.dumps(lines[0]).encode() + b'\n{"id": "\xff"}\n')
    with pytest.raises(PrimaError, match=r"queries.jsonl:2: not UTF-8 text"):
        read_queries(q)
    q.write_text(json.dumps(lines[0]) + "\n")
    (query,) = read_queries(q)
    assert query.paths == [pictures[0], pictures[1]] and query.images == lines[0]["images"]


def test_demo_without_the_bundled_checkpoint_says_so_in_one_line(tmp_path):
    """`make demo` before training: a clear line and exit 2, never a fake answer (subprocess: no traceback)."""
    import prima.inference.predictor as predictor_module

    if predictor_module.BUNDLED_CHECKPOINT.is_dir():
        pytest.skip("the bundled checkpoint exists; the demo's real run is tested elsewhere")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "prima", "demo", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "bundled checkpoint is not there yet" in done.stderr
    assert not (tmp_path / "demo").exists()


def test_predict_prints_the_answer_and_writes_json_and_one_overlay_per_image(
    pictures, tmp_path, capsys, tiny_checkpoint
):
    out = tmp_path / "out"
    argv = ["predict", "--images", pictures[0], pictures[1], "--question", "Which object is in both?"]
    code, stdout, err = _run([*argv, "--checkpoint", tiny_checkpoint, "--out", out], capsys)
    assert code == 0, err
    data = json.loads((out / "prediction.json").read_text())
    assert data["question"] == "Which object is in both?" and isinstance(data["answer"], str)
    assert isinstance(data["segments"], list)
    assert stdout.startswith(prediction_text(data["answer"]))
    for k in (1, 2):
        with Image.open(out / f"image{k}_overlay.png") as im:
            assert im.size == (32, 24) and im.mode == "RGB"
    assert "wrote" in stdout and str(out / "image2_overlay.png") in stdout


def test_predict_jsonl_answers_every_query_into_one_file(pictures, tmp_path, capsys, tiny_checkpoint):
    q = tmp_path / "queries.jsonl"
    rows = [
        {"id": "one", "images": [pictures[0].name], "question": "What is this?"},
        {"id": "two", "images": [pictures[1].name, pictures[2].name], "question": "Which is brighter?"},
    ]
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code, stdout, err = _run(
        ["predict", "--jsonl", q, "--checkpoint", tiny_checkpoint, "--out", out, "--overlays"], capsys
    )
    assert code == 0, err
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [w["id"] for w in written] == ["one", "two"]
    assert written[1]["images"] == rows[1]["images"] and written[1]["question"] == "Which is brighter?"
    assert all({"answer", "segments"} <= set(w) for w in written)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "one_image1_overlay.png",
        "two_image1_overlay.png",
        "two_image2_overlay.png",
    ]
    assert stdout.splitlines()[0].startswith("one: ")


def test_demo_answers_every_example_with_a_given_checkpoint(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "demo"
    code, stdout, err = _run(["demo", "--checkpoint", tiny_checkpoint, "--out", out], capsys)
    assert code == 0, err
    queries = read_queries(REPO / "examples" / "queries.jsonl")
    assert 2 <= len(queries) <= 3
    for q in queries:
        assert f"[{q.id}]" in stdout and f"Q: {q.question}" in stdout
        assert (out / q.id / "prediction.json").is_file()
        assert len(list((out / q.id).glob("image*_overlay.png"))) == len(q.images)
    assert "reference answer:" in stdout and "cold start to first answer:" in stdout


def test_example_images_are_small_and_valid_samples():
    from prima.data.schema import read_samples

    samples = read_samples(REPO / "examples" / "queries.jsonl")  # checks masks, tags and that images open
    assert len(samples) >= 2
    for s in samples:
        for p in s.images:
            assert (REPO / "examples" / p).stat().st_size <= 100 * 1024


@pytest.mark.slow
def test_make_demo_on_the_bundled_checkpoint_answers_every_example(tmp_path):
    """What `make demo` runs, in a fresh process, on the checkpoint shipped in the repository."""
    import prima.inference.predictor as predictor_module

    if not predictor_module.BUNDLED_CHECKPOINT.is_dir():
        pytest.skip("the bundled checkpoint checkpoints/prima-tiny-synth is not in the repository yet")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "prima", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for q in read_queries(REPO / "examples" / "queries.jsonl"):
        prediction = json.loads((out / q.id / "prediction.json").read_text())
        assert prediction["answer"].strip(), q.id
        assert f"[{q.id}]" in done.stdout
