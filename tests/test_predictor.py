"""PrimaPredictor: image conversion, bad input, mask post-processing, JSON output, and a real tiny checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prima.data.masks import decode_rle
from prima.errors import PrimaError
from prima.inference.images import load_image, load_images
from prima.inference.predictor import MAX_QUESTION_CHARS, Prediction, PrimaPredictor, Segment, check_question
from prima.inference.render import answer_html, render_overlays
from prima.visualize import color_for, color_hex
from test_model import SMALL

# A tiny random PRIMA (hidden 32, 2 layers): built once per test session through the model's own constructor
# (test_model.SMALL) and save_pretrained, then loaded the way a real checkpoint is. The other inference test files
# reuse it.
TINY_TEXTS = ["Which object appears in every image? The <p> mug </p> [SEG] (IMAGE1) and <p> chair </p> [SEG] (IMAGE2)."]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory)


def build_tiny_checkpoint(tmp_path_factory) -> Path:
    """The random tiny checkpoint's folder, built on first use in this pytest session."""
    import torch

    path = tmp_path_factory.getbasetemp() / "prima-tiny-random"  # shared with the files that import this fixture
    if not (path / "model.safetensors").is_file():
        torch.manual_seed(0)
        save_small_checkpoint(path)
    return path


def save_small_checkpoint(path: Path, *overrides: str) -> Path:
    """A random `SMALL` model with the model-config ``overrides``, saved as a checkpoint folder at ``path``."""
    from prima.model import create_model, load_model_config

    create_model(load_model_config("tiny", [*SMALL, *overrides]), TINY_TEXTS).save_pretrained(path)
    return path


# ---- images -------------------------------------------------------------------------------------------------------


def test_grayscale_rgba_and_16bit_files_become_8bit_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((20, 30), 77, np.uint8)).save(gray)
    rgba = tmp_path / "rgba.png"
    a = np.zeros((20, 30, 4), np.uint8)
    a[..., 0] = 200
    a[:, :15, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(a, "RGBA").save(rgba)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")

    loaded = load_images([gray, rgba, deep], max_images=5)
    for im in loaded:
        assert im.image.mode == "RGB" and im.size == (20, 30)
    assert np.asarray(loaded[0].image)[0, 0].tolist() == [77, 77, 77]
    px = np.asarray(loaded[1].image)
    assert px[0, 0].tolist() == [200, 0, 0] and px[0, 29].tolist() == [255, 255, 255]  # transparent -> white
    assert np.asarray(loaded[2].image)[0, 0].tolist() == [255, 255, 255]  # 16-bit full scale -> 255, not clipped


def test_arrays_of_every_common_type_are_accepted():
    assert np.asarray(load_image(np.full((4, 5), 0.5, np.float32)).image)[0, 0, 0] == 128
    assert np.asarray(load_image(np.full((4, 5, 1), 9, np.uint8)).image)[0, 0].tolist() == [9, 9, 9]
    assert np.asarray(load_image(np.full((4, 5), 65535, np.uint16)).image)[0, 0, 0] == 255
    assert load_image(np.zeros((4, 5, 4), np.uint8)).size == (4, 5)
    with pytest.raises(PrimaError, match="shape"):
        load_image(np.zeros((4, 5, 2), np.uint8), 3)
    with pytest.raises(PrimaError, match="NaN"):
        load_image(np.full((4, 5), np.nan, np.float32))


def test_very_large_images_are_shrunk_to_max_side_keeping_aspect(tmp_path):
    big = Image.new("RGB", (5000, 1000), (10, 20, 30))
    im = load_image(big, max_side=4096)
    assert (im.image.width, im.image.height) == (4096, 819)
    assert im.original_size == (1000, 5000) and im.size == (819, 4096)


def test_bad_image_files_give_one_clear_error_naming_the_image(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-40])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = {
        tmp_path / "missing.png": "file not found",
        truncated: "truncated or corrupt",
        text: "not an image file",
        tmp_path: "is a folder",
    }
    for path, words in cases.items():
        with pytest.raises(PrimaError, match=words) as e:
            load_images([good, path], max_images=5)
        assert str(e.value).startswith("image 2 (") and "\n" not in str(e.value)
    with Image.open(truncated) as lazy:  # opened by the caller, not yet decoded
        with pytest.raises(PrimaError, match="image 1 \\(<PIL image>\\): truncated or corrupt"):
            load_images([lazy], max_images=5)


def test_image_count_is_checked():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(PrimaError, match="no image given"):
        load_images([], max_images=5)
    with pytest.raises(PrimaError, match="6 images given, but this model takes at most 5"):
        load_images([img] * 6, max_images=5)
    assert len(load_images(img, max_images=5)) == 1  # a bare image is one image


def test_question_checks():
    assert check_question("  Which mug?  ") == "Which mug?"
    for bad, words in [("", "empty"), ("   ", "empty"), ("x" * (MAX_QUESTION_CHARS + 1), "limit is"),
                       ("what is [SEG]?", "reserved"), (None, "must be text")]:  # fmt: skip
        with pytest.raises(PrimaError, match=words):
            check_question(bad)


# ---- predictor post-processing, with a stand-in model whose output we choose --------------------------------------
# The real model's answers are random until trained; these pin down what the predictor does with *any* output.


@dataclass
class _Generated:
    phrase: str
    image: int
    mask: np.ndarray
    score: float


@dataclass
class _Output:
    answer: str
    segments: list = field(default_factory=list)


class _ScriptedModel:
    """Answers every query with one mug in the last image: the mask covers its right half, probability 0.9."""

    def __init__(self):
        self.calls = []

    def generate(self, images, question):
        self.calls.append(([im.size for im in images], question))
        w, h = images[-1].size
        probs = np.zeros((h, w), np.float32)
        probs[:, w // 2 :] = 0.9
        probs[0, 0] = 0.49  # just under the threshold
        k = len(images)
        return _Output(f"The <p> mug </p> [SEG] (IMAGE{k}) is there; the <p> mug </p> (IMAGE{k}) again.",
                       [_Generated("mug", k, probs, 0.75)])  # fmt: skip


def test_predict_returns_bool_masks_at_each_images_size_with_bbox_and_rle():
    model = _ScriptedModel()
    predictor = PrimaPredictor(model)
    images = [np.zeros((30, 40, 3), np.uint8), Image.new("L", (16, 12))]
    pred = predictor.predict(images, " where is the mug? ")
    assert model.calls == [([(40, 30), (16, 12)], "where is the mug?")]
    (seg,) = pred.segments
    assert seg.image == 2 and seg.mask.dtype == bool and seg.mask.shape == (12, 16)
    assert seg.mask[:, 8:].all() and not seg.mask[:, :8].any()
    assert seg.bbox == [8, 0, 8, 12] and seg.score == 0.75
    assert pred.image_sizes == [(30, 40), (12, 16)]
    assert pred.text == "The mug is there; the mug again."

    data = json.loads(json.dumps(pred.to_json()))  # must be JSON-safe
    assert data["answer"] == pred.answer
    (s,) = data["segments"]
    assert set(s) == {"phrase", "image", "score", "bbox", "mask"}
    assert isinstance(s["mask"]["counts"], str) and s["mask"]["size"] == [12, 16]
    assert np.array_equal(decode_rle(s["mask"]), seg.mask)


def test_predict_batch_checks_every_query_before_running_any():
    model = _ScriptedModel()
    predictor = PrimaPredictor(model)
    img = Image.new("RGB", (8, 8))
    with pytest.raises(PrimaError, match="query 2: the question is empty"):
        predictor.predict_batch([([img], "fine?"), ([img], " ")])
    assert model.calls == []
    preds = predictor.predict_batch([([img], "one?"), ([img, img], "two?")])
    assert [p.segments[0].image for p in preds] == [1, 2]


def test_max_images_comes_from_the_model_config():
    class _Config:
        max_images = 2

    model = _ScriptedModel()
    model.config = _Config()
    predictor = PrimaPredictor(model)
    with pytest.raises(PrimaError, match="at most 2"):
        predictor.predict([Image.new("RGB", (8, 8))] * 3, "q?")


def test_a_segment_on_an_image_that_does_not_exist_is_an_error_not_a_crash():
    class _Wrong(_ScriptedModel):
        def generate(self, images, question):
            return _Output("<p> x </p> [SEG] (IMAGE3)", [_Generated("x", 3, np.ones((8, 8), np.float32), 1.0)])

    with pytest.raises(PrimaError, match="image 3, but there are 1"):
        PrimaPredictor(_Wrong()).predict([Image.new("RGB", (8, 8))], "q?")


def test_overlays_and_answer_html_share_each_segments_colour():
    black = Image.new("RGB", (80, 60), (0, 0, 0))
    pred = PrimaPredictor(_ScriptedModel()).predict([black, black], "mug?")
    first, second = render_overlays([black, black], pred)
    assert np.asarray(first).max() == 0  # no mask on image 1: the picture is unchanged
    px = np.asarray(second)[45, 60]  # inside the mask (right half), below its label: tinted half-way
    assert px.tolist() == [int(0.5 * c) for c in color_for(0)]
    html = answer_html(pred)
    assert html.count(color_hex(0)) == 2  # the [SEG] mention and the later mention of the same mug
    assert "[SEG]" not in html and "&lt;p&gt;" not in html and "image 2" in html


def test_a_label_at_the_right_or_bottom_edge_moves_inside_the_picture():
    from PIL import ImageDraw, ImageFont

    from prima.visualize import overlay_masks

    black = Image.new("RGB", (80, 60), (0, 0, 0))
    mask = np.zeros((60, 80), bool)
    mask[50:, 70:] = True  # the bottom-right corner: a label at the mask's top-left would run off both edges
    out = np.asarray(overlay_masks(black, [mask], labels=["a long phrase"], colors=[(255, 0, 0)]))
    rows, cols = np.nonzero((out == (255, 0, 0)).all(-1) & ~mask)  # the label's box, outside the mask
    left, top, right, bottom = ImageDraw.Draw(black).textbbox((0, 0), "a long phrase", font=ImageFont.load_default())
    assert cols.min() < 70 and rows.min() < 50  # moved left and up from the mask's corner
    # the whole box (the text + a 1-pixel margin) is in the picture
    assert (cols.max() - cols.min(), rows.max() - rows.min()) == (right - left + 2, bottom - top + 2)


def test_default_checkpoint_missing_is_one_clear_error(monkeypatch, tmp_path):
    import prima.inference.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "BUNDLED_CHECKPOINT", tmp_path / "nope")
    with pytest.raises(PrimaError, match="bundled checkpoint is not there yet"):
        PrimaPredictor.from_pretrained()
    with pytest.raises(PrimaError, match="checkpoint folder not found"):
        PrimaPredictor.from_pretrained(tmp_path / "other")


def test_prediction_json_of_an_answer_without_masks():
    assert Prediction("No, there is no lamp.").to_json() == {"answer": "No, there is no lamp.", "segments": []}


def test_prediction_json_and_summary_show_the_phrase_check():
    """grounding.phrase_check: each segment's support and the answer the check turned down are in prediction.json
    and in `prima predict`'s summary; without a check neither field appears."""
    from prima.inference.render import format_summary

    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    shown = Prediction("The <p> lamp </p> [SEG] (IMAGE1).", [Segment("lamp", 1, mask, 0.9, [1, 1, 2, 2], 0.87)])
    assert shown.to_json()["segments"][0]["support"] == 0.87 and "first_answer" not in shown.to_json()
    assert "support 0.87" in format_summary(shown)
    turned_down = Prediction("No lamp.", first_answer="The <p> lamp </p> [SEG] (IMAGE1).")
    assert turned_down.to_json() == {
        "answer": "No lamp.",
        "segments": [],
        "first_answer": turned_down.first_answer,
    }
    assert "replaced by the read-out: 'The lamp.'" in format_summary(turned_down)
    plain = Prediction("The <p> lamp </p> [SEG] (IMAGE1).", [Segment("lamp", 1, mask, 0.9, [1, 1, 2, 2])])
    assert "support" not in plain.to_json()["segments"][0] and "support" not in format_summary(plain)


def test_web_summary_shows_the_phrase_check(tmp_path):
    """The web demo's JSON summary carries each segment's support and the replaced first answer, as prediction.json."""
    from prima.inference.web import DemoHandler

    paths = []
    for k in (1, 2):
        paths.append(tmp_path / f"scene{k}.png")
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(paths[-1])
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 2:5] = True

    class CheckedPredictor:
        check_question = staticmethod(check_question)

        def load(self, images):
            return load_images(images, max_images=5)

        def predict_loaded(self, images, question):
            segment = Segment("lamp", 2, mask, 0.9, [2, 2, 3, 3], 0.64)
            return Prediction("Yes: the <p> lamp </p> [SEG] (IMAGE2).", [segment], first_answer="No lamp.")

    html, gallery, summary = DemoHandler(CheckedPredictor())(paths, "Is there a lamp?")
    assert "lamp" in html and len(gallery) == 2
    assert summary["segments"][0]["support"] == 0.64 and summary["first_answer"] == "No lamp."


def test_public_import():
    from prima import PrimaPredictor as Exported

    assert Exported is PrimaPredictor


# ---- a real (random) checkpoint, loaded like the bundled one --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_predictor(tiny_checkpoint):
    return PrimaPredictor.from_pretrained(tiny_checkpoint, device="cpu", max_new_tokens=12)


def test_real_checkpoint_answers_with_masks_at_every_images_own_size(tiny_predictor, tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30).save(path)
    rgba = Image.new("RGBA", (70, 30), (10, 200, 10, 128))
    array = np.zeros((33, 21, 3), np.uint8)
    pred = tiny_predictor.predict([path, rgba, array], "Which object appears in every image?")
    assert isinstance(pred.answer, str)
    assert pred.image_sizes == [(40, 50), (30, 70), (33, 21)]
    for s in pred.segments:
        assert 1 <= s.image <= 3 and s.mask.dtype == bool and s.mask.shape == pred.image_sizes[s.image - 1]
    json.dumps(pred.to_json())
    again = tiny_predictor.predict_batch([([path, rgba, array], "Which object appears in every image?")])
    assert again[0].answer == pred.answer  # greedy decoding: the same query gives the same answer


def test_real_checkpoint_reports_its_max_images_and_refuses_more(tiny_predictor):
    assert tiny_predictor.max_images == tiny_predictor.model.config.max_images == 5
    with pytest.raises(PrimaError, match="at most 5"):
        tiny_predictor.predict([Image.new("RGB", (8, 8))] * 6, "q?")


def test_image_choice_weight_override_is_checked_and_set(tiny_checkpoint, tmp_path):
    """`--image-choice-weight` (prima predict / prima eval): only for a checkpoint with the decoder's image choice."""
    import torch

    with pytest.raises(PrimaError, match="has no image choice"):
        PrimaPredictor.from_pretrained(tiny_checkpoint, image_choice_weight=0.0)
    torch.manual_seed(0)
    path = tmp_path / "with-choice"
    save_small_checkpoint(path, "grounding.image_choice=true")
    assert PrimaPredictor.from_pretrained(path).model.config.grounding.image_choice_weight == 1.0  # the checkpoint's
    predictor = PrimaPredictor.from_pretrained(path, image_choice_weight=0.0)
    assert predictor.model.config.grounding.image_choice_weight == 0.0
    with pytest.raises(PrimaError, match="must be >= 0"):
        PrimaPredictor.from_pretrained(path, image_choice_weight=-1.0)


def test_image_support_weight_override_is_checked_and_set(tiny_checkpoint, tmp_path):
    """`--image-support-weight` (prima predict / prima eval): only with the image choice and the phrase check."""
    import torch

    with pytest.raises(PrimaError, match="needs the image choice and the phrase check"):
        PrimaPredictor.from_pretrained(tiny_checkpoint, image_support_weight=1.0)
    assert PrimaPredictor.from_pretrained(tiny_checkpoint, image_support_weight=0.0)  # off is always fine
    torch.manual_seed(0)
    path = tmp_path / "with-check"
    heads = ["grounding.image_choice=true", "grounding.phrase_tokens=2", "grounding.phrase_check=true"]
    save_small_checkpoint(path, *heads)
    assert PrimaPredictor.from_pretrained(path).model.config.grounding.image_support_weight == 0.0  # the checkpoint's
    predictor = PrimaPredictor.from_pretrained(path, image_support_weight=2.0)
    assert predictor.model.config.grounding.image_support_weight == 2.0
    with pytest.raises(PrimaError, match="must be >= 0"):
        PrimaPredictor.from_pretrained(path, image_support_weight=-1.0)


def test_image_prior_weight_override_is_checked_and_set(tiny_checkpoint, tmp_path):
    """`--image-prior-weight`, `--image-prior-after-phrase`, `--image-prior-cells-weight`, `--image-prior-cells-below`,
    `--image-prior-cells-temperature`, `--image-prior-rewrite` and `--image-prior-nowhere` (prima predict / prima
    eval): only with the image prior (the last five with its heads); 0 is always fine but for the temperature."""
    import torch

    for option in ("image_prior_weight", "image_prior_after_phrase"):
        with pytest.raises(PrimaError, match="has no image prior"):
            PrimaPredictor.from_pretrained(tiny_checkpoint, **{option: 1.0})
        assert PrimaPredictor.from_pretrained(tiny_checkpoint, **{option: 0.0})
    torch.manual_seed(0)
    path = tmp_path / "with-prior"
    save_small_checkpoint(path, "image_prior=true")
    assert PrimaPredictor.from_pretrained(path).model.config.image_prior_weight == 1.0  # the checkpoint's
    assert PrimaPredictor.from_pretrained(path, image_prior_weight=2.5).model.config.image_prior_weight == 2.5
    with pytest.raises(PrimaError, match="must be >= 0"):
        PrimaPredictor.from_pretrained(path, image_prior_weight=-1.0)
    assert PrimaPredictor.from_pretrained(path).model.config.image_prior_after_phrase == 0.0
    after = PrimaPredictor.from_pretrained(path, image_prior_after_phrase=1.0).model.config
    assert after.image_prior_after_phrase == 1.0 and after.image_prior_weight == 1.0
    with pytest.raises(PrimaError, match="must be >= 0"):
        PrimaPredictor.from_pretrained(path, image_prior_after_phrase=-1.0)
    # the answer's cells re-rank the first phrase only where the prior has them (model.image_prior_cells)
    with pytest.raises(PrimaError, match="has no answer cells"):
        PrimaPredictor.from_pretrained(path, image_prior_cells_weight=1.0)
    assert PrimaPredictor.from_pretrained(path, image_prior_cells_weight=0.0)
    cells = save_small_checkpoint(tmp_path / "with-cells", "image_prior=true", "image_prior_cells=true")
    assert PrimaPredictor.from_pretrained(cells).model.config.image_prior_cells_weight == 0.0
    assert (
        PrimaPredictor.from_pretrained(cells, image_prior_cells_weight=2.0).model.config.image_prior_cells_weight == 2
    )
    # where the cells' rewrite reaches (`--image-prior-cells-below`): a share, so 0..1, and only with the cells
    assert (
        PrimaPredictor.from_pretrained(cells, image_prior_cells_below=0.3).model.config.image_prior_cells_below == 0.3
    )
    with pytest.raises(PrimaError, match="between 0 and 1"):
        PrimaPredictor.from_pretrained(cells, image_prior_cells_below=1.5)
    with pytest.raises(PrimaError, match="--image-prior-cells-below: .* has no answer cells"):
        PrimaPredictor.from_pretrained(path, image_prior_cells_below=0.3)
    # how sharp the cells are read (`--image-prior-cells-temperature`): > 0, only with the cells
    sharp = PrimaPredictor.from_pretrained(cells, image_prior_cells_temperature=0.25).model.config
    assert sharp.image_prior_cells_temperature == 0.25
    assert PrimaPredictor.from_pretrained(cells).model.config.image_prior_cells_temperature == 1.0  # the checkpoint's
    with pytest.raises(PrimaError, match="--image-prior-cells-temperature must be > 0"):
        PrimaPredictor.from_pretrained(cells, image_prior_cells_temperature=0.0)
    with pytest.raises(PrimaError, match="--image-prior-cells-temperature: .* has no answer cells"):
        PrimaPredictor.from_pretrained(path, image_prior_cells_temperature=0.5)
    # where the prior is sure enough to move the cells' rewrite to its image (`--image-prior-rewrite`): 0..1
    assert PrimaPredictor.from_pretrained(cells).model.config.image_prior_rewrite_above == 0.0
    moved = PrimaPredictor.from_pretrained(cells, image_prior_rewrite_above=0.9).model.config
    assert moved.image_prior_rewrite_above == 0.9
    with pytest.raises(PrimaError, match="--image-prior-rewrite must be between 0 and 1"):
        PrimaPredictor.from_pretrained(cells, image_prior_rewrite_above=1.5)
    with pytest.raises(PrimaError, match="--image-prior-rewrite: .* has no answer cells"):
        PrimaPredictor.from_pretrained(path, image_prior_rewrite_above=0.9)
    # `NothingThere` is read only where the prior has it (model.image_prior_nowhere)
    with pytest.raises(PrimaError, match="has no `NothingThere`"):
        PrimaPredictor.from_pretrained(cells, image_prior_nowhere_below=0.05)
    heads = ("image_prior=true", "image_prior_cells=true", "image_prior_nowhere=true")
    nowhere = save_small_checkpoint(tmp_path / "with-nowhere", *heads)
    assert PrimaPredictor.from_pretrained(nowhere).model.config.image_prior_nowhere_below == 0.0
    read = PrimaPredictor.from_pretrained(nowhere, image_prior_nowhere_below=0.05).model.config
    assert read.image_prior_nowhere_below == 0.05
    with pytest.raises(PrimaError, match="between 0 and 1"):
        PrimaPredictor.from_pretrained(nowhere, image_prior_nowhere_below=2.0)
    # how much `NothingThere`'s cells weigh in the cells' read-out (`--image-prior-cells-nowhere`): 0..1, with it only
    assert PrimaPredictor.from_pretrained(nowhere, image_prior_cells_nowhere=1.0).model.config.image_prior_cells_nowhere
    with pytest.raises(PrimaError, match="--image-prior-cells-nowhere must be between 0 and 1"):
        PrimaPredictor.from_pretrained(nowhere, image_prior_cells_nowhere=1.5)
    with pytest.raises(PrimaError, match="--image-prior-cells-nowhere: .* has no `NothingThere`"):
        PrimaPredictor.from_pretrained(cells, image_prior_cells_nowhere=0.5)
    # a checkpoint that learnt the weight image by image (model.image_prior_cells_mix) reads it, unless one is given
    mixed = save_small_checkpoint(tmp_path / "with-mix", *heads, "image_prior_cells_mix=true")
    assert PrimaPredictor.from_pretrained(mixed).model.config.image_prior_cells_mix
    fixed = PrimaPredictor.from_pretrained(mixed, image_prior_cells_nowhere=0.5).model.config
    assert not fixed.image_prior_cells_mix and fixed.image_prior_cells_nowhere == 0.5


def test_repeat_images_override_sets_distinct_images(tiny_checkpoint):
    """`--repeat-images` (prima predict / prima eval) turns the checkpoint's grounding.distinct_images off."""
    assert PrimaPredictor.from_pretrained(tiny_checkpoint).model.config.grounding.distinct_images is True
    predictor = PrimaPredictor.from_pretrained(tiny_checkpoint, distinct_images=False)
    assert predictor.model.config.grounding.distinct_images is False


def test_llm_words_override_turns_the_word_readout_off(tiny_checkpoint):
    """`--llm-words` (prima predict / prima eval) keeps the LLM's first phrase words; asking for a read-out a
    checkpoint has no reader for is an error naming it."""
    assert (
        PrimaPredictor.from_pretrained(tiny_checkpoint, word_readout=False).model.config.grounding.word_readout is False
    )
    with pytest.raises(PrimaError, match="has no word reader"):
        PrimaPredictor.from_pretrained(tiny_checkpoint, word_readout=True)
    with pytest.raises(PrimaError, match="has no phrase check"):
        PrimaPredictor.from_pretrained(tiny_checkpoint, phrase_check=0.5)
    # `--no-every-image-check`: off is always possible; on needs the phrase check
    off = PrimaPredictor.from_pretrained(tiny_checkpoint, every_image_check=False).model.config.grounding
    assert off.every_image_check is False
    with pytest.raises(PrimaError, match="every_image_check: .* has no phrase check"):
        PrimaPredictor.from_pretrained(tiny_checkpoint, every_image_check=True)


def test_mask_threshold_and_regions_are_the_checkpoints_unless_given(tiny_checkpoint, tmp_path):
    """A pixel is in the mask when its probability reaches grounding.mask_threshold and, with grounding.mask_regions
    "largest", it lies in the region of the largest probability mass (`--mask-threshold`, `--mask-regions`)."""
    import shutil

    import yaml

    assert PrimaPredictor.from_pretrained(tiny_checkpoint).mask_threshold == 0.5  # the config default
    path = tmp_path / "calibrated"
    shutil.copytree(tiny_checkpoint, path)
    config = yaml.safe_load((path / "config.yaml").read_text())
    config["model"]["grounding"]["mask_threshold"] = 0.3
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    calibrated = PrimaPredictor.from_pretrained(path)
    assert calibrated.mask_threshold == 0.3
    assert PrimaPredictor.from_pretrained(path, mask_threshold=0.7).mask_threshold == 0.7
    with pytest.raises(PrimaError, match="between 0 and 1"):
        PrimaPredictor.from_pretrained(path, mask_threshold=1.5)

    class Generated:  # one segment whose probabilities straddle both thresholds
        phrase, image, score = "chair", 1, 0.9
        mask = np.array([[0.2, 0.4], [0.6, 0.8]], dtype=np.float32)

    assert calibrated._segment(Generated(), [(2, 2)]).mask.sum() == 3  # >= 0.3
    assert PrimaPredictor(calibrated.model, mask_threshold=0.7)._segment(Generated(), [(2, 2)]).mask.sum() == 1

    # grounding.mask_regions: "largest" keeps the connected region of the largest probability mass
    assert calibrated.mask_regions == "all"
    config["model"]["grounding"]["mask_regions"] = "largest"
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    one_region = PrimaPredictor.from_pretrained(path)
    assert one_region.mask_regions == "largest"
    assert PrimaPredictor.from_pretrained(path, mask_regions="all").mask_regions == "all"
    with pytest.raises(PrimaError, match="--mask-regions must be one of"):
        PrimaPredictor.from_pretrained(path, mask_regions="biggest")
    with pytest.raises(PrimaError, match="--mask-regions supported needs a checkpoint with the phrase check"):
        PrimaPredictor.from_pretrained(path, mask_regions="supported")  # the random tiny one has none
    # the model cuts "supported" regions itself: it gets the predictor's threshold and regions
    overridden = PrimaPredictor.from_pretrained(path, mask_threshold=0.7, mask_regions="all").model.config.grounding
    assert (overridden.mask_threshold, overridden.mask_regions) == (0.7, "all")

    class TwoBlobs(Generated):
        mask = np.array([[0.9, 0.0, 0.4], [0.0, 0.0, 0.4]], dtype=np.float32)

    assert calibrated._segment(TwoBlobs(), [(2, 3)]).mask.sum() == 3
    assert one_region._segment(TwoBlobs(), [(2, 3)]).mask.tolist() == [[True, False, False], [False, False, False]]
