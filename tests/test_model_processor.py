"""The processor (prompt, tokenizer, images) and the collate function that feeds PrimaModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prima.constants import SPECIAL_TOKENS
from prima.data.collate import collate_samples
from prima.data.processor import (
    IMAGE_SLOT_TOKEN,
    PrimaProcessor,
    build_tokenizer,
    format_prompt,
    from_model_order,
    load_image,
    to_model_order,
)
from prima.data.schema import Segment
from prima.errors import PrimaError, SampleError
from prima.model.config import load_model_config
from test_model import SMALL, TEXTS, grounded_sample, negative_sample, random_images


@pytest.fixture(scope="module", params=["wordlevel", "bpe"])
def processor(request) -> PrimaProcessor:
    cfg = load_model_config("tiny", [*SMALL, f"tokenizer.kind={request.param}"])
    return PrimaProcessor.from_config(cfg, build_tokenizer(TEXTS, kind=request.param, vocab_size=300))


def test_every_special_token_is_one_token(processor):
    tok = processor.tokenizer
    for t in (*SPECIAL_TOKENS, IMAGE_SLOT_TOKEN):
        ids = tok(f"x {t} y", add_special_tokens=False).input_ids
        assert ids.count(tok.convert_tokens_to_ids(t)) == 1, t


def test_answers_round_trip_through_the_tokenizer(processor):
    answer = TEXTS[1]
    ids = processor.encode_answer(answer)
    assert ids[-1] == processor.tokenizer.eos_token_id
    assert processor.decode(ids) == answer
    # spacing around markup does not change the ids
    assert processor.encode_answer(answer.replace(" </p> [SEG] ", "</p>[SEG]")) == ids


ORDERED = [  # (written, image_first, image_first_reversed)
    (
        "The <p> green lamp </p> [SEG] (IMAGE1) is green, like the <p> dark green boat's sail </p> [SEG] (IMAGE2).",
        "The (IMAGE1) <p> green lamp </p> [SEG] is green, like the (IMAGE2) <p> dark green boat's sail </p> [SEG].",
        "The (IMAGE1) <p> lamp green </p> [SEG] is green, like the (IMAGE2) <p> sail boat's green dark </p> [SEG].",
    ),
    (  # a later mention (tag, no [SEG]) and a phrase without a tag
        "The <p> red chair </p> (IMAGE3) and a <p> big desk </p>; no image.",
        "The (IMAGE3) <p> red chair </p> and a <p> big desk </p>; no image.",
        "The (IMAGE3) <p> chair red </p> and a <p> desk big </p>; no image.",
    ),
]


@pytest.mark.parametrize("written, first, reversed_", ORDERED)
def test_answer_orders_round_trip(written, first, reversed_):
    assert to_model_order(written, "written") == from_model_order(written, "written") == written
    assert to_model_order(written, "image_first") == first
    assert to_model_order(written, "image_first_reversed") == reversed_
    assert from_model_order(first, "image_first") == written
    assert from_model_order(reversed_, "image_first_reversed") == written


def test_prompt_has_one_block_of_slots_per_image(processor):
    for n in (1, 3, 5):
        ids = processor.encode_prompt("Which object could you sit on?", n)
        assert ids.count(processor.slot_id) == n * processor.num_image_tokens
        assert ids.count(processor.image_start_id) == n
    text = format_prompt("Q?", 2)
    assert "(IMAGE1)" in text and "(IMAGE2)" in text and "(IMAGE3)" not in text and text.endswith("Answer:")
    with pytest.raises(PrimaError):
        format_prompt(f"what is {IMAGE_SLOT_TOKEN}?", 1)


def test_load_image_converts_to_8bit_rgb(tmp_path):
    gray = np.full((6, 7), 50, np.uint8)
    assert load_image(gray).mode == "RGB" and np.asarray(load_image(gray))[0, 0].tolist() == [50, 50, 50]
    deep = Image.fromarray(np.full((6, 7), 65535, np.uint16))
    assert np.asarray(load_image(deep))[0, 0].tolist() == [255, 255, 255]
    rgba = np.zeros((6, 7, 4), np.uint8)
    rgba[..., 0] = 200  # fully transparent red -> white background
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    path = tmp_path / "x.png"
    Image.fromarray(gray).save(path)
    assert load_image(path).size == (7, 6)
    with pytest.raises(PrimaError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_preprocessed_pixels_are_resized_and_normalised(processor):
    pixels = processor.preprocess_images([Image.new("RGB", (40, 30), (124, 116, 104))])
    assert pixels.shape == (1, 3, 64, 64)
    assert pixels.abs().max() < 0.05  # the ImageNet mean colour maps to ~0


def test_collate_builds_the_documented_batch(processor):
    cfg = load_model_config("tiny", SMALL)
    samples = [grounded_sample("a", 3), negative_sample("b", 2)]
    images = [random_images(3), random_images(2, 1)]
    batch = collate_samples(samples, None, processor, cfg, images=images)
    assert batch["pixel_values"].shape == (5, 3, 64, 64)
    assert batch["image_sample_index"].tolist() == [0, 0, 0, 1, 1]
    assert batch["image_sizes"].tolist() == [[48, 40]] * 5
    assert batch["masks"].shape == (3, 64, 64) and set(batch["masks"].unique().tolist()) == {0.0, 1.0}
    assert batch["mask_image_index"].tolist() == [1, 0, 1]
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == attn.shape
    for row in range(2):
        answer = labels[row][labels[row] != -100]
        assert processor.decode(answer.tolist()) == processor.decode(processor.encode_answer(samples[row].answer))
        n_prompt = len(processor.encode_prompt(samples[row].question, len(samples[row].images)))
        assert (labels[row, :n_prompt] == -100).all()  # the prompt is never a target
    assert attn[1].sum() < attn.shape[1] and (labels[1][attn[1] == 0] == -100).all()  # padding masked
    assert batch["qformer_input_ids"].shape[0] == 2 and batch["sample_ids"] == ["a", "b"]


def test_collate_reads_images_relative_to_root(processor, tmp_path):
    cfg = load_model_config("tiny", SMALL)
    sample = negative_sample("r", 2)
    for name, im in zip(sample.images, random_images(2)):
        im.save(tmp_path / name)
    batch = collate_samples([sample], tmp_path, processor, cfg)
    assert batch["pixel_values"].shape[0] == 2
    without = collate_samples([sample], tmp_path, processor, cfg, include_pixels=False)
    assert "pixel_values" not in without and without["image_sizes"].tolist() == [[48, 40], [48, 40]]


def test_collate_rejects_inconsistent_samples(processor):
    cfg = load_model_config("tiny", SMALL)
    sample = grounded_sample("bad", 3)
    sample.segments = sample.segments[:2]
    with pytest.raises(SampleError, match="3 \\[SEG\\] token"):
        collate_samples([sample], None, processor, cfg, images=[random_images(3)])
    sample = grounded_sample("small", 3)
    m = np.zeros((10, 10), bool)
    from prima.data.masks import encode_rle

    sample.segments[0] = Segment("chair", 2, encode_rle(m))
    with pytest.raises(SampleError, match="mask size"):
        collate_samples([sample], None, processor, cfg, images=[random_images(3)])


def test_processor_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = PrimaProcessor.from_pretrained(tmp_path)
    assert loaded.encode_prompt("Where?", 2) == processor.encode_prompt("Where?", 2)
    assert loaded.encode_answer(TEXTS[1]) == processor.encode_answer(TEXTS[1])
    assert torch.equal(loaded.preprocess_images(random_images(1)), processor.preprocess_images(random_images(1)))


def test_processor_file_with_unknown_or_broken_content_is_a_clear_error(processor, tmp_path):
    import json

    processor.save_pretrained(tmp_path)
    meta_path = tmp_path / "processor.json"
    meta = json.loads(meta_path.read_text())
    assert meta["answer_order"] == "written"
    meta_path.write_text(json.dumps({**meta, "image_tag_before": True}))
    with pytest.raises(PrimaError, match=r"processor.json: unknown key\(s\) image_tag_before"):
        PrimaProcessor.from_pretrained(tmp_path)
    meta_path.write_text("{not json")
    with pytest.raises(PrimaError, match="processor.json: not valid JSON"):
        PrimaProcessor.from_pretrained(tmp_path)
    del meta["answer_order"]  # written before answer orders existed: loads as "written"
    meta_path.write_text(json.dumps(meta))
    assert PrimaProcessor.from_pretrained(tmp_path).answer_order == "written"
