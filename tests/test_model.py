"""PrimaModel on tiny random configs: forward/backward, [SEG] routing, 1..5 images, errors, generation, save/load."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from prima.data.collate import collate_samples
from prima.data.masks import encode_rle
from prima.data.schema import Sample, Segment
from prima.errors import PrimaError
from prima.model import PrimaModel, create_model, load_model_config
from prima.model.prima import SUPPORT_FLOOR, GeneratedSegment, GenerationOutput, PrimaOutput
from prima.model.prior import PriorReading

SMALL = [  # tiny.yaml shrunk further so a test builds and runs a model in about a second
    "vision.image_size=64",
    "vision.package_weights=false",
    "language.config.hidden_size=32",
    "language.config.intermediate_size=64",
    "language.config.num_hidden_layers=2",
    "language.config.num_attention_heads=2",
    "language.config.num_key_value_heads=2",
    "qformer.num_queries=4",
    "qformer.config.hidden_size=32",
    "qformer.config.num_hidden_layers=1",
    "qformer.config.num_attention_heads=2",
    "qformer.config.intermediate_size=64",
    "relational.num_heads=2",
    "grounding.hidden_size=32",
    "grounding.num_heads=2",
    "grounding.pixel_dim=8",
    "grounding.num_layers=1",
]
TEXTS = [
    "Which object could you sit on?",
    "You could sit on the <p> chair </p> [SEG] (IMAGE2) and the <p> desk's drawer </p> [SEG] (IMAGE1).",
    "Is there a lamp? No, none of the images shows a lamp.",
]


def small_model(*overrides: str, seed: int = 0) -> PrimaModel:
    torch.manual_seed(seed)
    return create_model(load_model_config("tiny", [*SMALL, *overrides]), TEXTS)


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def box_mask(size: tuple[int, int], top: int = 5, left: int = 5) -> dict:
    m = np.zeros(size, bool)
    m[top : top + 10, left : left + 12] = True
    return encode_rle(m)


def grounded_sample(sid: str = "s1", n_images: int = 3, size: tuple[int, int] = (48, 40)) -> Sample:
    """Three [SEG]s on images 2, 1, 2 (in answer order)."""
    answer = (
        "The <p> chair </p> [SEG] (IMAGE2) is by the <p> desk </p> [SEG] (IMAGE1) and its <p> legs </p> [SEG] (IMAGE2)."
    )
    segs = [
        Segment("chair", 2, box_mask(size)),
        Segment("desk", 1, box_mask(size, 20)),
        Segment("legs", 2, box_mask(size, 30, 20)),
    ]
    return Sample(sid, [f"{sid}_{i}.png" for i in range(n_images)], "Where can I sit?", answer, "functional", segs)


def negative_sample(sid: str = "s2", n_images: int = 2) -> Sample:
    return Sample(
        sid,
        [f"{sid}_{i}.png" for i in range(n_images)],
        "Is there a lamp?",
        "No, none of the images shows a lamp.",
        "functional",
        [],
    )


def make_batch(model: PrimaModel, samples: list[Sample], seed: int = 0) -> dict:
    images = [random_images(len(s.images), seed + i) for i, s in enumerate(samples)]
    return collate_samples(samples, None, model.processor, model.config, images=images)


@pytest.fixture(scope="module")
def model() -> PrimaModel:
    return small_model()


def test_forward_and_backward_reach_every_trainable_group(model):
    model.train()
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    out = model(batch)
    assert torch.isfinite(out.loss)
    for part in (out.loss_ce, out.loss_bce, out.loss_dice):
        assert part is not None and float(part.detach()) > 0
    model.zero_grad()
    out.loss.backward()
    groups = model.parameter_groups()
    assert set(groups) == {"language", "query_module", "square", "projector", "grounding", "image_prior"}
    assert not groups.pop("image_prior")  # model.image_prior is off by default: the paper's model
    for name, params in groups.items():
        assert params, name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"no gradient reaches {name}"
    assert all(p.grad is None for p in model.vision.parameters())  # the encoder is frozen
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_training_runs_the_lm_head_only_where_a_label_follows(model, monkeypatch):
    """In training mode the text loss comes from the logits of the labelled positions alone: the same loss and
    gradient as from the full (B, L, V) logits, which evaluation mode still returns."""
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    head = model.language.get_output_embeddings()
    rows = []
    monkeypatch.setattr(head, "forward", lambda h, f=head.forward: rows.append(h.shape[:-1].numel()) or f(h))
    grads = []
    for mode in ("train", "eval"):
        getattr(model, mode)()
        model.zero_grad()
        out = model(batch)
        out.loss_ce.backward()
        grads.append([p.grad for p in model.language.parameters()])
        if mode == "train":
            sparse = out
    model.zero_grad()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert sparse.logits is None and out.logits is not None and rows == [labelled, batch["input_ids"].numel()]
    assert torch.allclose(sparse.loss_ce, out.loss_ce, atol=1e-6)
    assert all(g is not None for g in grads[0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_n_seg_tokens_give_n_masks_each_on_the_image_its_tag_names(model, monkeypatch):
    model.eval()
    batch = make_batch(model, [negative_sample("a", 2), grounded_sample("b", 3)])
    encoded = []
    original = model.grounding.encode
    monkeypatch.setattr(model.grounding, "encode", lambda feats: encoded.append(feats) or original(feats))
    with torch.no_grad():
        out = model(batch)
    assert [m.shape[0] for m in out.mask_logits] == [0, 3]
    assert out.mask_logits[1].shape[1:] == (64, 64)  # the model's mask size = its input size
    # images of sample "b" are batch images 2, 3, 4: tags (IMAGE2), (IMAGE1), (IMAGE2) -> 3, 2, 3
    assert out.seg_image_index.tolist() == [3, 2, 3]
    assert out.seg_image_index.tolist() == batch["mask_image_index"].tolist()
    # only the named images (2 and 3) reach the grounding decoder, each once
    features = model.encode_images(batch["pixel_values"])
    (grounded,) = encoded
    assert grounded[0].shape[0] == 2
    assert torch.allclose(grounded[-1], features[-1][[2, 3]])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_one_to_five_images(model, n):
    model.eval()
    sample = negative_sample("n", n)
    batch = make_batch(model, [sample])
    assert batch["pixel_values"].shape[0] == n
    with torch.no_grad():
        out = model(batch)
    assert out.logits.shape[0] == 1 and torch.isfinite(out.loss)
    assert (batch["input_ids"] == model.config.tokens.image_slot_id).sum() == n * model.tokens_per_image


def test_more_images_than_max_or_none_is_an_error(model):
    with pytest.raises(PrimaError, match="1..5"):
        model.generate(random_images(6), "Which one?", max_new_tokens=2)
    with pytest.raises(PrimaError, match="1..5"):
        model.generate([], "Which one?", max_new_tokens=2)
    with pytest.raises(PrimaError, match="1..5"):
        model.processor.encode_prompt("Which one?", 6)


def test_prompt_naming_a_different_number_of_images_is_an_error(model):
    batch = make_batch(model, [negative_sample("x", 2)])
    batch["pixel_values"] = torch.cat([batch["pixel_values"], batch["pixel_values"][:1]])
    batch["image_sample_index"] = torch.zeros(3, dtype=torch.long)
    with pytest.raises(PrimaError, match="2 image block"):
        model(batch)


def test_seg_without_image_tag_is_an_error(model):
    batch = make_batch(model, [grounded_sample()])
    ids = batch["input_ids"]
    tags = torch.tensor(model.config.tokens.image_tag_ids)
    answer = batch["labels"] != -100
    ids[answer & torch.isin(ids, tags)] = model.processor.tokenizer.convert_tokens_to_ids("the")
    with pytest.raises(PrimaError, match="not followed by an image tag"):
        model(batch)


class ScriptedLogits:
    """Wraps the LM so greedy decoding emits a fixed token script (to test generation's bookkeeping)."""

    def __init__(self, model: PrimaModel, script: list[str]):
        self.lm, self.forward = model.language, model.language.forward
        tok = model.processor.tokenizer
        self.script = [tok.convert_tokens_to_ids(t) for t in script]
        self.step = 0

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if self.step < len(self.script):
            out.logits[:, -1] = -1e4
            out.logits[:, -1, self.script[self.step]] = 1e4
        self.step += 1
        return out


def test_generate_routes_each_seg_and_grounds_only_named_images(model, monkeypatch):
    model.eval()
    script = [
        "the",
        "<p>",
        "chair",
        "</p>",
        "[SEG]",
        "(IMAGE3)",
        "and",
        "<p>",
        "lamp",
        "</p>",
        "[SEG]",
        "(IMAGE3)",
        "</s>",
    ]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    calls = []
    original = model.grounding.encode
    monkeypatch.setattr(model.grounding, "encode", lambda feats: calls.append(feats[0].shape[0]) or original(feats))
    images = random_images(2) + random_images(1, seed=5, size=(30, 52))
    result = model.generate(images, "Where can I sit?", max_new_tokens=20)
    assert result.answer == "the <p> chair </p> [SEG] (IMAGE3) and <p> lamp </p> [SEG] (IMAGE3)"
    assert [(s.phrase, s.image) for s in result.segments] == [("chair", 3), ("lamp", 3)]
    for s in result.segments:
        assert s.mask.shape == (30, 52) and s.mask.dtype == np.float32
        assert 0.0 <= s.mask.min() and s.mask.max() <= 1.0 and 0.0 <= s.score <= 1.0
    assert calls == [1] and result.grounded_images == [3]  # one encoder pass, for image 3 only


def test_generate_without_seg_runs_no_grounding(model, monkeypatch):
    model.eval()
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, ["No", ",", "lamp", ".", "</s>"]))
    monkeypatch.setattr(model.grounding, "encode", lambda feats: pytest.fail("grounding ran without a [SEG]"))
    result = model.generate(random_images(3), "Is there a lamp?", max_new_tokens=10)
    assert result.segments == [] and result.grounded_images == []
    assert "lamp" in result.answer


@pytest.mark.parametrize("distinct", [True, False])
def test_generate_never_names_one_phrase_twice_on_one_image(model, monkeypatch, distinct):
    """grounding.distinct_images: a repeated phrase gets the best image it does not have yet, until it has them all."""
    model.eval()
    monkeypatch.setattr(model.config.grounding, "distinct_images", distinct)
    seg = lambda phrase: ["<p>", phrase, "</p>", "[SEG]", "(IMAGE2)"]  # noqa: E731
    script = [*seg("chair"), *seg("chair"), *seg("lamp"), *seg("chair"), *seg("chair"), "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    result = model.generate(random_images(3), "Where?", max_new_tokens=30)
    got = [(s.phrase, s.image) for s in result.segments]
    if distinct:  # the 2nd chair: image 2 is taken (the others tie: the first wins); the 5th: all three taken
        assert got == [("chair", 2), ("chair", 1), ("lamp", 2), ("chair", 3), ("chair", 2)]
    else:
        assert got == [("chair", 2), ("chair", 2), ("lamp", 2), ("chair", 2), ("chair", 2)]


def test_generate_forces_an_image_tag_after_seg(model, monkeypatch):
    model.eval()
    # the script asks for a word after [SEG] and for (IMAGE5) with only two images: both are overruled
    script = ["<p>", "chair", "</p>", "[SEG]", "chair", "(IMAGE5)", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    tags = [
        model.config.tokens.image_tag_ids.index(t) + 1
        for t in result.token_ids
        if t in model.config.tokens.image_tag_ids
    ]
    assert len(result.segments) == 1 and result.segments[0].image in (1, 2)
    assert all(k <= 2 for k in tags)


@pytest.mark.parametrize("copy", [False, True], ids=["llm", "llm+visual-copy"])
def test_generate_greedy_with_cache_matches_full_recompute(model, copy):
    """Every token of the KV-cached loop is the (constrained) argmax of a cache-free pass over the whole sequence."""
    model = small_model("visual_copy=true", seed=1) if copy else model
    model.eval()
    images, question = random_images(2, seed=3), "Which object could you sit on?"
    result = model.generate(images, question, max_new_tokens=12)
    assert result.token_ids
    proc, t = model.processor, model.config.tokens
    with torch.no_grad():
        feats = model.encode_images(proc.preprocess_images(images))
        qids = torch.tensor([proc.encode_qformer_text(question)])
        visual = model.visual_tokens(feats, torch.zeros(2, dtype=torch.long), qids, torch.ones_like(qids))
        prompt = proc.encode_prompt(question, 2)
        ids = torch.tensor([prompt + result.token_ids])
        out = model.language(
            inputs_embeds=model.embed_prompt(ids, visual, torch.tensor([2])), output_hidden_states=True
        )
        logits = out.logits
        if copy:
            logits = model.copy_logits(logits, out.hidden_states[-1], visual, torch.zeros(2, dtype=torch.long))
        logits = logits[0]
    banned = [t.image_slot_id, t.pad_token_id, t.bos_token_id, t.image_start_id, t.image_end_id, *t.image_tag_ids[2:]]
    for j, token in enumerate(result.token_ids):
        step = logits[len(prompt) - 1 + j].clone()
        if j and result.token_ids[j - 1] == t.seg_token_id:
            allowed = torch.full_like(step, float("-inf"))
            allowed[t.image_tag_ids[:2]] = step[t.image_tag_ids[:2]]
            step = allowed
        else:
            step[banned] = float("-inf")
        assert int(step.argmax()) == token, f"token {j}"


def test_output_rms_sets_the_visual_tokens_scale():
    model = small_model("qformer.output_rms=0.0625")
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    with torch.no_grad():
        visual = model.visual_tokens(
            model.encode_images(batch["pixel_values"]),
            batch["image_sample_index"],
            batch["qformer_input_ids"],
            batch["qformer_attention_mask"],
        )
    rms = visual.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.0625), rtol=1e-3)
    assert model.query.output_norm.weight.requires_grad  # the gain is learnt
    assert small_model().query.output_norm is None  # off by default


@pytest.mark.parametrize("tied", [True, False], ids=["tied-embeddings", "untied-embeddings"])
def test_save_and_load_round_trip_gives_identical_outputs(model, tied, tmp_path):
    if not tied:  # an LLM with its own output layer (docs/MODEL.md, "Copying from the question")
        model = small_model("language.config.tie_word_embeddings=false")
        head, words = model.language.get_output_embeddings().weight, model.language.get_input_embeddings().weight
        assert head.data_ptr() != words.data_ptr()
    model.eval()
    model.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.yaml", "processor.json", "tokenizer.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = PrimaModel.from_pretrained(tmp_path, device="cpu")
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.mask_logits, b.mask_logits))
    assert loaded.config.tokens == model.config.tokens
    images = random_images(2, seed=7)
    ga, gb = model.generate(images, "Where?", max_new_tokens=8), loaded.generate(images, "Where?", max_new_tokens=8)
    assert ga.answer == gb.answer and ga.token_ids == gb.token_ids


def test_loading_fails_loudly_on_missing_or_unexpected_weights(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.startswith("grounding."))
    save_file({k: v for k, v in state.items() if k != name}, str(weights))
    with pytest.raises(PrimaError, match="1 missing"):
        PrimaModel.from_pretrained(tmp_path)
    save_file({**state, "surplus.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(PrimaError, match="1 unexpected"):
        PrimaModel.from_pretrained(tmp_path)
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a crash mid-copy
    with pytest.raises(PrimaError, match=r"model\.safetensors cannot be read as safetensors .*another checkpoint"):
        PrimaModel.from_pretrained(tmp_path)


def test_package_weights_are_not_stored_but_reloaded(tmp_path):
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny", [*SMALL, "vision.package_weights=true"]), TEXTS)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert not any(k.startswith("vision.") for k in load_file(str(tmp_path / "model.safetensors")))
    assert "vision." in (tmp_path / "config.yaml").read_text()  # external_weights says where they come from
    loaded = PrimaModel.from_pretrained(tmp_path)
    for (name, a), b in zip(model.vision.state_dict().items(), loaded.vision.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("variant", ["square", "projection", "pooling", "concat", "none"])
def test_every_cross_image_variant_trains_and_generates(variant):
    model = small_model(f"cross_image={variant}")
    model.train()
    out = model(make_batch(model, [grounded_sample(), negative_sample()]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    expected = 16 if variant == "concat" else 4  # concat: every 16 px cell of a 64 px image; else the queries
    assert model.tokens_per_image == expected
    if variant == "square":
        assert model.parameter_groups()["square"]
    model.eval()
    result = model.generate(random_images(3), "Where?", max_new_tokens=4)
    assert isinstance(result.answer, str)


def test_cross_image_context_starts_at_zero_and_trains():
    """Z starts at exactly zero (the queries are G alone, as with `none`), and the loss reaches the layer that
    opens it, so training can turn the cross-image path on."""
    for variant, layer in (("square", "relational.norm"), ("projection", "context_proj"), ("pooling", "context_proj")):
        model = small_model(f"cross_image={variant}")
        tokens = torch.randn(3, 16, model.vision.channels[model.vision.token_index])
        assert not model.query.cross_image_context(tokens, torch.tensor([0, 0, 1])).any(), variant
        model.train()
        model(make_batch(model, [grounded_sample(), negative_sample()])).loss.backward()
        weight = model.query.get_submodule(layer).weight
        assert weight.grad is not None and weight.grad.abs().sum() > 0, variant


def test_cross_image_context_depends_on_the_other_images():
    """SQuARE: changing image 2 changes image 1's visual tokens; with `none` it does not."""
    for variant, should_change in (("square", True), ("none", False)):
        model = small_model(f"cross_image={variant}").eval()
        if variant == "square":  # open the path that starts closed (as training does)
            torch.nn.init.ones_(model.query.relational.norm.weight)
        proc = model.processor
        qids = torch.tensor([proc.encode_qformer_text("Where?")])
        index = torch.zeros(2, dtype=torch.long)
        with torch.no_grad():
            a = model.visual_tokens(model.encode_images(proc.preprocess_images(random_images(2, 1))), index, qids)
            imgs = random_images(2, 1)[:1] + random_images(1, 9)
            b = model.visual_tokens(model.encode_images(proc.preprocess_images(imgs)), index, qids)
        assert (not torch.allclose(a[0], b[0])) == should_change, variant


def test_batch_without_seg_still_uses_every_trainable_parameter(model):
    """Distributed training needs every trainable parameter in the graph, also when no sample has a mask: under
    DDP with find_unused_parameters=false one unused one (it was the visual-words head's bias) desynchronises the
    processes' gradient all-reduces (a tiny run crashed at the step where one process's 4 samples had no mask)."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(make_batch(model, [negative_sample("a"), negative_sample("b", 3)]))
    assert float(out.loss_bce.detach()) == 0.0 and float(out.loss_dice.detach()) == 0.0
    out.loss.backward()
    assert model.visual_words is not None  # the head that was missed before
    for name, p in model.named_parameters():
        assert p.grad is not None or not p.requires_grad, name


def test_spatial_prior_is_a_switch_and_old_configs_load_without_it():
    from prima.model.config import GroundingConfig

    assert GroundingConfig().spatial_prior is False  # checkpoints written before the switch existed load unchanged
    with_prior, without = small_model(), small_model("grounding.spatial_prior=false")
    assert with_prior.grounding.locator is not None and without.grounding.locator is None
    out = without(make_batch(without, [grounded_sample()]))
    assert out.mask_logits[0].shape == (3, 64, 64)


def test_forward_and_generate_under_bf16_autocast(model):
    """The GPU recipe (bf16 autocast over fp32 weights) mixes dtypes correctly; run here with CPU autocast."""
    model.train()
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    out.loss.backward()
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = model.generate(random_images(2), "Where?", max_new_tokens=4)
    assert all(s.mask.dtype == np.float32 for s in result.segments)


@pytest.mark.parametrize("readout", [False, True])
def test_loading_in_bfloat16_generates(model, tmp_path, readout):
    (small_model(*READOUT) if readout else model).save_pretrained(tmp_path)
    half = PrimaModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.language.get_input_embeddings().weight.dtype == torch.bfloat16
    monkey = ScriptedLogits(half, ["<p>", "chair", "</p>", "[SEG]", "(IMAGE1)", "</s>"])
    half.language.forward = monkey
    result = half.generate(random_images(2), "Where?", max_new_tokens=8)
    assert len(result.segments) == 1 and result.segments[0].mask.dtype == np.float32


def test_generate_batch_equals_one_at_a_time(model):
    model.eval()
    requests = [
        (random_images(1, 11), "Is there a lamp?"),
        (random_images(3, 12), "Which object could you sit on?"),
        (random_images(2, 13), "Where?"),
    ]
    batched = model.generate_batch(requests, max_new_tokens=10)
    for (images, question), got in zip(requests, batched):
        alone = model.generate(images, question, max_new_tokens=10)
        assert got.token_ids == alone.token_ids and got.answer == alone.answer
        assert [(s.phrase, s.image) for s in got.segments] == [(s.phrase, s.image) for s in alone.segments]
        for a, b in zip(got.segments, alone.segments):
            assert np.allclose(a.mask, b.mask, atol=1e-4)


@pytest.mark.slow
def test_model_learns_to_answer_and_ground_two_samples():
    """60 AdamW steps on two samples: the answers come back word for word and the mask covers the red box."""
    rng = np.random.default_rng(0)

    def scene(box, color):
        pixels = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
        mask = np.zeros((64, 64), bool)
        y, x, h, w = box
        mask[y : y + h, x : x + w] = True
        pixels[mask] = color
        return Image.fromarray(pixels), mask

    blue, _ = scene((5, 5, 10, 10), (0, 0, 255))
    red, red_mask = scene((30, 20, 20, 25), (255, 0, 0))
    other, _ = scene((10, 35, 25, 15), (255, 0, 0))
    samples = [
        Sample(
            "a",
            ["1", "2"],
            "Which object is red?",
            "The <p> red box </p> [SEG] (IMAGE2).",
            "functional",
            [Segment("red box", 2, encode_rle(red_mask))],
        ),
        Sample("b", ["1", "3"], "Is there a lamp?", "No, there is no lamp.", "functional", []),
    ]
    torch.manual_seed(0)
    texts = [t for s in samples for t in (s.question, s.answer)]
    model = create_model(load_model_config("tiny", [*SMALL, "vision.package_weights=true"]), texts)
    batch = collate_samples(samples, None, model.processor, model.config, images=[[blue, red], [blue, other]])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(60):
        out = model(batch)
        first = first if first is not None else float(out.loss.detach())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(out.loss.detach()) < 0.2 * first
    model.eval()
    grounded = model.generate([blue, red], "Which object is red?", max_new_tokens=12)
    assert grounded.answer == samples[0].answer
    (segment,) = grounded.segments
    assert (segment.phrase, segment.image) == ("red box", 2)
    predicted = segment.mask > 0.5
    assert (predicted & red_mask).sum() / (predicted | red_mask).sum() > 0.8
    negative = model.generate([blue, other], "Is there a lamp?", max_new_tokens=12)
    assert negative.answer == samples[1].answer and negative.segments == []


def test_qformer_shortcut_is_a_switch_that_passes_each_image_on_its_own():
    from prima.model.config import QFormerConfig

    assert QFormerConfig().shortcut is False  # checkpoints written before the switch existed load unchanged
    model = small_model("qformer.shortcut=true").eval()
    assert model.query.shortcut is not None
    assert any(p is model.query.shortcut.weight for p in model.parameter_groups()["projector"])
    proc = model.processor
    qids = torch.tensor([proc.encode_qformer_text("Where?")])
    with torch.no_grad():
        features = model.encode_images(proc.preprocess_images(random_images(2, 4)))
        with_path = model.visual_tokens(features, torch.zeros(2, dtype=torch.long), qids)
        model.query.shortcut = None
        without = model.visual_tokens(features, torch.zeros(2, dtype=torch.long), qids)
    assert with_path.shape == without.shape and not torch.allclose(with_path, without)


def test_difference_from_others_is_each_images_tokens_minus_the_mean_of_its_samples_others():
    from prima.model.square import difference_from_others

    visual = torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]], [[5.0, 7.0]], [[4.0, 4.0]]])  # (4 images, 1 token, 2)
    samples = torch.tensor([0, 0, 0, 1])  # three images, then one alone
    d = difference_from_others(visual, samples)
    assert d[:, 0].tolist() == [[1 - 4, 0 - 4.5], [3 - 3, 2 - 3.5], [5 - 2, 7 - 1], [0, 0]]


def test_contrast_switch_starts_as_the_model_without_it_and_trains():
    from prima.config import ConfigError
    from prima.model.config import QFormerConfig

    assert QFormerConfig().contrast is False  # checkpoints written before the switch load unchanged
    with pytest.raises(ConfigError, match="contrast compares the Q-Former"):
        small_model("qformer.contrast=true", "cross_image=concat")
    model = small_model("qformer.contrast=true")
    assert any(p is model.query.contrast[2].weight for p in model.parameter_groups()["square"])
    qids = torch.tensor([model.processor.encode_qformer_text("Which is odd?")] * 2)
    features = model.encode_images(model.processor.preprocess_images(random_images(4)))
    samples = torch.tensor([0, 0, 0, 1])
    with torch.no_grad():
        model.query.contrast = None
        without = model.visual_tokens(features, samples, qids)
        model.query.contrast = small_model("qformer.contrast=true").query.contrast
        fresh = model.visual_tokens(features, samples, qids)
    assert torch.equal(fresh, without)  # zero-initialised output layer
    torch.nn.init.normal_(model.query.contrast[2].weight)
    with torch.no_grad():
        trained = model.visual_tokens(features, samples, qids)
    assert not torch.allclose(trained[:3], without[:3])  # the three images that have others to differ from
    assert torch.equal(trained[3], without[3])  # a one-image sample: nothing to compare, nothing added
    fresh_model = small_model("qformer.contrast=true")
    fresh_model(make_batch(fresh_model, [grounded_sample(), negative_sample()])).loss.backward()
    assert fresh_model.query.contrast[2].weight.grad.abs().sum() > 0  # the zero layer gets a gradient: it trains


def test_a_grid_shortcut_gives_each_visual_token_a_region_of_its_own():
    from prima.config import ConfigError
    from prima.model.square import region_grid

    assert [region_grid(n) for n in (8, 16, 6, 7)] == [(2, 4), (4, 4), (2, 3), (1, 7)]
    with pytest.raises(ConfigError, match="pools for the shortcut"):
        small_model("qformer.shortcut_pool=grid")
    model = small_model("qformer.shortcut=true", "qformer.shortcut_pool=grid", "qformer.num_queries=4").eval()
    side = int(model.query.token_pos.shape[1] ** 0.5)
    cells = torch.zeros(1, side, side, 112)
    cells[0, : side // 2, side // 2 :] = 1.0  # only the top right quarter has content
    pooled = model.query._pool(cells.reshape(1, side * side, 112))
    assert pooled.shape == (1, 4, 112)
    assert pooled[0, :, 0].tolist() == [0.0, 1.0, 0.0, 0.0]  # regions row by row: the second is the top right


def test_phrase_pooling_switch_trains_and_generates(monkeypatch):
    from prima.model.config import GroundingConfig

    assert GroundingConfig().phrase_pooling is False
    model = small_model("grounding.phrase_pooling=true")
    out = model(make_batch(model, [grounded_sample(), negative_sample()]))
    out.loss.backward()
    assert out.mask_logits[0].shape == (3, 64, 64) and model.seg_projector[0].in_features == 64
    model.eval()
    script = ["the", "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert [(s.phrase, s.image) for s in result.segments] == [("chair", 2)]


def test_visual_words_loss_reads_each_phrase_word_from_its_own_image():
    from prima.model.config import LossConfig

    assert LossConfig().visual_words == 0.0  # off unless a preset asks: no head, no term
    plain = small_model("loss.visual_words=0.0")
    assert plain.visual_words is None
    assert plain(make_batch(plain, [grounded_sample()])).loss_words is None

    model = small_model("loss.visual_words=1.0").eval()  # no dropout: the hand computation must match
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    out = model(batch)
    # by hand: "chair" and "legs" are named in image 2, "desk" in image 1 of the first sample (batch images 1, 0)
    with torch.no_grad():
        visual = model.visual_tokens(
            batch["image_features"] if "image_features" in batch else model.encode_images(batch["pixel_values"]),
            batch["image_sample_index"],
            batch["qformer_input_ids"],
            batch["qformer_attention_mask"],
        )
        scores = torch.logsumexp(model.visual_words(torch.nn.functional.rms_norm(visual, visual.shape[-1:])), dim=1)
        vocab = model.processor.tokenizer.convert_tokens_to_ids
        words = torch.tensor([vocab("chair"), vocab("desk"), vocab("legs")])
        expected = torch.nn.functional.cross_entropy(scores[torch.tensor([1, 0, 1])], words)
    assert torch.allclose(out.loss_words.detach(), expected, atol=1e-5)
    model.zero_grad()
    out.loss_words.backward()
    assert model.query.global_queries.grad.abs().sum() > 0  # it trains the query module that makes V
    assert any(p is model.visual_words.weight for p in model.parameter_groups()["query_module"])


def test_visual_diversity_loss_is_how_alike_one_images_visual_tokens_are():
    from prima.model.prima import visual_alikeness

    apart = torch.eye(4).unsqueeze(0)  # four orthogonal tokens
    assert visual_alikeness(apart).tolist() == [0.0]
    assert torch.allclose(visual_alikeness(torch.ones(2, 4, 3)), torch.ones(2))  # copies of one vector
    model = small_model("loss.visual_diversity=0.5").train()
    assert small_model().train()(make_batch(model, [grounded_sample()])).loss_diversity is None  # off by default
    out = model(make_batch(model, [grounded_sample(), negative_sample()]))
    assert 0.0 < float(out.loss_diversity) <= 1.0
    model.zero_grad()
    out.loss_diversity.backward()
    assert model.query.global_queries.grad.abs().sum() > 0  # it reaches the queries


def test_mask_centres_are_each_masks_centre_of_mass_in_its_width_and_height():
    from prima.model.losses import mask_centres

    masks = torch.zeros(2, 4, 8)
    masks[0, 0, 0:2] = 1  # top left: x (0.5 + 1.5) / 2 / 8, y 0.5 / 4
    masks[1, 2:4, 6] = 1
    assert torch.allclose(mask_centres(masks), torch.tensor([[0.125, 0.125], [6.5 / 8, 3 / 4]]))


def test_visual_position_loss_reads_each_grounded_phrases_centre_from_its_images_tokens():
    from prima.config import ConfigError
    from prima.model.config import LossConfig
    from prima.model.losses import mask_centres

    assert LossConfig().visual_position == 0.0  # off unless a preset asks: no head, no term
    assert small_model("loss.visual_words=1.0").visual_position is None
    with pytest.raises(ConfigError, match="visual_position needs model.loss.visual_words"):
        small_model("loss.visual_words=0.0", "loss.visual_position=1.0")
    model = small_model("loss.visual_words=1.0", "loss.visual_position=1.0").train()
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    out = model(batch)
    model.zero_grad()
    out.loss_position.backward()
    assert model.query.global_queries.grad.abs().sum() > 0  # it trains the query module that makes V
    assert model.visual_words.weight.grad is None  # the key is read, not trained: which token names what stays
    assert any(p is model.visual_position[0].weight for p in model.parameter_groups()["query_module"])
    # with the head's last layer at zero it reads (0.5, 0.5) everywhere: the loss is the centres' mean distance
    torch.nn.init.zeros_(model.visual_position[-1].weight)
    torch.nn.init.zeros_(model.visual_position[-1].bias)
    expected = (mask_centres(batch["masks"]) - 0.5).abs().mean()
    assert torch.allclose(model(batch).loss_position, expected)
    assert_in_the_graph_without_a_seg(model, "loss_position", model.visual_position)


def test_images_and_visual_words_can_start_late_in_a_training_run():
    model = small_model("loss.visual_words=1.0", "loss.visual_words_from_step=3", "images_from_step=2").train()
    batch = make_batch(model, [grounded_sample()])
    ids, n = batch["input_ids"], batch["num_images"]
    slots = ids == model.config.tokens.image_slot_id
    visual = torch.randn(int(n.sum()), model.tokens_per_image, model.language.config.hidden_size)

    def shown_and_words():
        with torch.no_grad():
            shown = model.embed_prompt(ids, visual, n)[slots]
            return shown.reshape(visual.shape), model(batch).loss_words

    assert model.training_step is None  # outside a run everything is on
    shown, words = shown_and_words()
    assert torch.equal(shown, visual) and words is not None
    model.set_training_step(1)  # images hidden from the LLM, no visual-words loss
    shown, words = shown_and_words()
    assert not shown.any() and words is None
    model.eval()  # validation and a stage 2's cached [SEG] queries see the images
    assert torch.equal(shown_and_words()[0], visual)
    model.train()
    model.set_training_step(2)  # images shown, the loss still off
    shown, words = shown_and_words()
    assert torch.equal(shown, visual) and words is None
    model.set_training_step(3)
    assert shown_and_words()[1] is not None


def test_hide_images_hides_whole_samples_in_training_only():
    model = small_model("hide_images=0.5")
    batch = make_batch(model, [grounded_sample(f"s{i}", n_images=2 + i % 3) for i in range(6)])  # 2-4 images each
    ids, n = batch["input_ids"], batch["num_images"]
    slots = ids == model.config.tokens.image_slot_id
    visual = torch.randn(int(n.sum()), model.tokens_per_image, model.language.config.hidden_size)

    def shown_per_sample():
        with torch.no_grad():
            rows = [model.embed_prompt(ids, visual, n)[b][slots[b]] for b in range(ids.shape[0])]
        own = visual.split(n.tolist())  # each sample's images
        shown = [torch.equal(r, v.reshape(r.shape)) for r, v in zip(rows, own)]
        assert all(s or not r.any() for s, r in zip(shown, rows))  # a sample sees all its own images or none
        return shown

    model.train()
    torch.manual_seed(0)
    draws = [shown_per_sample() for _ in range(8)]
    assert 0 < sum(map(sum, draws)) < 6 * 8  # some samples hidden, some shown
    model.eval()
    assert all(shown_per_sample())


def test_phrase_tokens_prompt_the_decoder_with_each_segs_own_words(monkeypatch):
    from prima.model.config import GroundingConfig

    assert GroundingConfig().phrase_tokens == 0  # off unless a preset asks (the paper: the [SEG] state alone)
    assert small_model("grounding.phrase_tokens=0").grounding.words is None
    model = small_model("grounding.phrase_tokens=2").eval()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    seen = []
    decode = model.grounding.decode
    monkeypatch.setattr(model.grounding, "decode", lambda *a: seen.append(a[3]) or decode(*a))

    batch = make_batch(model, [grounded_sample(), negative_sample()])
    out = model(batch)
    # one row per [SEG], in answer order, -1 padded to phrase_tokens
    assert seen[-1].tolist() == [[vocab("chair"), -1], [vocab("desk"), -1], [vocab("legs"), -1]]
    out.loss.backward()
    assert model.grounding.words.weight.grad[vocab("chair")].abs().sum() > 0  # the mask loss trains the words
    assert any(p is model.grounding.words.weight for p in model.parameter_groups()["grounding"])

    # a longer phrase is cut to its first phrase_tokens words
    long = Sample(
        "s3",
        ["a.png", "b.png"],
        "Where?",
        "The <p> desk's drawer chair </p> [SEG] (IMAGE1).",
        "functional",
        [Segment("desk's drawer chair", 1, box_mask((48, 40)))],
    )
    with torch.no_grad():
        model(make_batch(model, [long]))
    assert seen[-1].tolist() == [[vocab("desk's"), vocab("drawer")]]

    # the words, all else equal, change their own [SEG]'s mask and no other
    with torch.no_grad():
        before = torch.cat(model(batch).mask_logits)
        swapped = seen[-1].clone()
        swapped[1, 0] = vocab("chair")
        monkeypatch.setattr(model, "phrase_words", lambda ids, positions: swapped)
        after = torch.cat(model(batch).mask_logits)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.allclose(before[1], after[1])
    monkeypatch.undo()
    monkeypatch.setattr(model.grounding, "decode", lambda *a: seen.append(a[3]) or decode(*a))

    # generation hands the decoder the generated phrase's words
    script = ["the", "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert [(s.phrase, s.image) for s in result.segments] == [("chair", 2)]
    assert seen[-1].tolist() == [[vocab("chair"), -1]]


def test_phrase_tokens_config_is_checked():
    with pytest.raises(PrimaError, match="phrase_tokens must be >= 0"):
        small_model("grounding.phrase_tokens=-1")
    with pytest.raises(PrimaError, match="needs kind one_way"):
        load_model_config("tiny", ["grounding.kind=sam", "grounding.phrase_tokens=4"])


def test_word_noise_swaps_the_decoders_words_in_training_only(monkeypatch):
    from prima.model.prima import swap_words

    words = torch.tensor([[1, 2, -1], [3, -1, -1], [5, 6, 7]]).repeat(50, 1)
    assert torch.equal(swap_words(words, 0.0), words)
    torch.manual_seed(0)
    out = swap_words(words, 0.9)
    assert torch.equal(out >= 0, words >= 0)  # a word stays a word, padding stays padding
    for col, allowed in enumerate([{1, 3, 5}, {2, 6, -1}, {7, -1}]):  # ... from the same place of another phrase
        assert set(out[:, col].tolist()) <= allowed
    assert (out[:, 0] != words[:, 0]).float().mean() > 0.4  # 0.9 x 2/3 expected: a third of the donors agree

    model = small_model("grounding.phrase_tokens=2", "grounding.word_noise=0.9")
    seen = []
    decode = model.grounding.decode
    monkeypatch.setattr(model.grounding, "decode", lambda *a: seen.append(a[3]) or decode(*a))
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    with torch.no_grad():
        model.eval()(batch)
        exact = seen[-1].clone()
        model.train()
        for seed in range(8):
            torch.manual_seed(seed)
            model(batch)
    assert all(torch.equal(w >= 0, exact >= 0) for w in seen[1:])
    assert any(not torch.equal(w, exact) for w in seen[1:])  # training swaps some words, evaluation none


def test_word_noise_config_is_checked():
    with pytest.raises(PrimaError, match="word_noise needs phrase_tokens"):
        small_model("grounding.word_noise=0.5")
    with pytest.raises(PrimaError, match=r"word_noise must be in \[0, 1\)"):
        small_model("grounding.phrase_tokens=2", "grounding.word_noise=1.0")


def test_position_in_sample_counts_images_within_each_sample():
    from prima.model.square import position_in_sample

    index = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    assert position_in_sample(index).tolist() == [0, 1, 0, 1, 2, 0, 0, 1]


def test_sincos_cell_positions_join_the_tokens_after_their_norm_and_read_off_left_to_right():
    from prima.config import ConfigError
    from prima.model.square import sincos_positions

    table = sincos_positions(4, 8)
    first = table[:, 0].reshape(4, 4)  # the column's slowest sine: the same down a column, rising left to right
    assert torch.equal(first, first[:1].expand(4, -1)) and bool((first[0].diff() > 0).all())
    assert torch.equal(table[:, 4].reshape(4, 4), first.T)  # the second half: the row
    with pytest.raises(ConfigError, match="cell_positions' must be one of"):
        small_model("qformer.cell_positions=grid")
    with pytest.raises(ConfigError, match="'sincos' is for the Q-Former"):
        small_model("qformer.cell_positions=sincos", "cross_image=concat")

    def qformer_input(model):
        seen = {}
        model.query.qformer.register_forward_pre_hook(
            lambda m, a, kw: seen.update(cells=kw["encoder_hidden_states"]), with_kwargs=True
        )
        cells = torch.ones(1, *model.query.token_pos.shape[1:])  # every cell the same: only a position tells them apart
        qids = torch.tensor([model.processor.encode_qformer_text("Where?")])
        model.query(cells, torch.tensor([0]), qids)
        return seen["cells"][0]

    learned = qformer_input(small_model())  # the learned table starts at zero: every cell alike
    assert torch.allclose(learned, learned[:1].expand_as(learned))
    model = small_model("qformer.cell_positions=sincos")
    normed = model.query.token_norm(torch.ones_like(model.query.token_pos[0]))
    assert torch.allclose(qformer_input(model), normed + model.query.token_pos[0])


def test_image_index_embedding_marks_each_images_tokens_with_its_position():
    from prima.model.config import ModelConfig

    assert ModelConfig().image_index_embedding is False  # checkpoints written before the switch load unchanged
    assert small_model("image_index_embedding=false").query.image_index is None
    model = small_model("image_index_embedding=true").eval()  # (on in the tiny preset)
    assert any(p is model.query.image_index.weight for p in model.parameter_groups()["query_module"])
    proc = model.processor
    qids = torch.tensor([proc.encode_qformer_text("Where?")] * 2)
    image = random_images(1, 4)
    with torch.no_grad():
        features = model.encode_images(proc.preprocess_images(image * 3))  # one picture, three times
        # sample 0: images 1 and 2; sample 1: image 1 -- with the `none` variant no image sees the others
        model.query.cross_image = "none"
        visual = model.visual_tokens(features, torch.tensor([0, 0, 1]), qids)
    table = model.query.image_index.weight
    assert torch.allclose(visual[0] - visual[2], torch.zeros_like(visual[0]), atol=1e-5)  # both are image 1
    assert torch.allclose(visual[1] - visual[0], (table[1] - table[0]).expand_as(visual[0]), atol=1e-5)
    out = model(make_batch(model, [grounded_sample()]))
    out.loss.backward()
    assert table.grad is not None and table.grad[:3].abs().sum() > 0


def test_visual_copy_mixes_in_the_words_of_the_samples_own_images():
    from prima.model.config import ModelConfig

    assert ModelConfig().visual_copy is False and small_model().copy is None
    model = small_model("visual_copy=true", "loss.visual_words=0.0").eval()
    # open SQuARE's context (it starts at zero), so that a sample's visual tokens clearly depend on its images
    torch.nn.init.ones_(model.query.relational.norm.weight)
    assert model.visual_words is not None  # the copy path reads words through the visual-words head
    assert any(p is model.copy.gate.weight for p in model.parameter_groups()["language"])
    samples = [grounded_sample(), negative_sample()]
    batch = make_batch(model, samples)
    out = model(batch)
    assert out.loss_words is None  # the auxiliary loss stays off; the copy path is trained by the text loss
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(out.logits.shape[:2]), atol=1e-4)  # log-probs
    out.loss.backward()
    assert model.copy.query.weight.grad.abs().sum() > 0 and model.visual_words.weight.grad.abs().sum() > 0
    with torch.no_grad():
        # a sample's next-token distribution depends on its own images only
        other = dict(batch, pixel_values=batch["pixel_values"].clone())
        second = batch["image_sample_index"] == 1
        other["pixel_values"][second] = make_batch(model, samples, seed=5)["pixel_values"][second]
        changed = model(other).logits
        assert torch.allclose(changed[0], out.logits[0], atol=1e-5) and not torch.allclose(changed[1], out.logits[1])
        # gate fully on the copy path and every visual token naming "chair": every position predicts "chair"
        chair = model.processor.tokenizer.convert_tokens_to_ids("chair")
        model.copy.gate.weight.zero_()
        model.copy.gate.bias.fill_(-50.0)
        model.visual_words.weight.zero_()
        model.visual_words.bias.zero_()
        model.visual_words.bias[chair] = 30.0
        assert (model(batch).logits.argmax(-1) == chair).all()


@pytest.mark.parametrize("order", ["image_first", "image_first_reversed"])
def test_image_first_answer_order_trains_on_the_right_images_and_generates_written_answers(order, monkeypatch):
    """The model writes `(IMAGEk) <p> ... </p> [SEG]` (words reversed too, in image_first_reversed); training routes
    each [SEG] to the tag before its phrase and answers come back in the written order."""
    model = small_model(f"answer_order={order}")
    assert model.processor.answer_order == order
    batch = make_batch(model, [grounded_sample()])  # [SEG]s on images 2, 1, 2
    out = model(batch)  # raises if a [SEG]'s tag and its GT mask's image differ
    assert out.seg_image_index.tolist() == [1, 0, 1] and torch.isfinite(out.loss)
    tok = model.processor.tokenizer
    answer = tok.convert_ids_to_tokens(model.processor.encode_answer("the <p> desk's drawer </p> [SEG] (IMAGE2)."))
    words = ["drawer", "desk's"] if order == "image_first_reversed" else ["desk's", "drawer"]
    assert answer[:7] == ["the", "(IMAGE2)", "<p>", *words, "</p>", "[SEG]"]

    model.eval()
    # the script asks for a [SEG] without a phrase, a <p> without a tag and a tag inside a phrase: all overruled
    script = ["the", "[SEG]", "<p>", "(IMAGE3)", "<p>", *words, "(IMAGE1)", "</p>", "[SEG]", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    result = model.generate(random_images(3), "Where can I sit?", max_new_tokens=12)
    marks = [tok.convert_ids_to_tokens(i) for i in result.token_ids if tok.convert_ids_to_tokens(i) in SCRIPT_MARKS]
    assert marks == ["(IMAGE3)", "<p>", "</p>", "[SEG]"]
    assert [s.image for s in result.segments] == [3] and result.grounded_images == [3]
    phrase = result.segments[0].phrase  # the overruled tag became another word inside the phrase
    assert phrase.replace("<unk>", "").split() == ["desk's", "drawer"]
    assert result.answer.endswith(f"<p> {phrase} </p> [SEG] (IMAGE3)")


SCRIPT_MARKS = {"<p>", "</p>", "[SEG]", "(IMAGE1)", "(IMAGE2)", "(IMAGE3)"}


def test_image_choice_scores_each_seg_against_its_own_samples_images():
    """grounding.image_choice: one logit per (SEG, image of its sample), -inf past the sample's images, trained by
    cross-entropy towards the image the answer's tag names; each logit depends on its image alone."""
    model = small_model("grounding.image_choice=true", "grounding.phrase_tokens=2")
    assert small_model().grounding.choice_token is None  # off by default: the paper's model
    batch = make_batch(model, [grounded_sample(), negative_sample(), grounded_sample("s3", n_images=2)])
    out = model(batch)
    logits = out.image_choice_logits
    assert logits.shape == (6, 3)
    assert (
        torch.isinf(logits[3:, 2]).all() and torch.isfinite(logits[:3]).all() and torch.isfinite(logits[3:, :2]).all()
    )
    targets = torch.tensor([1, 0, 1, 1, 0, 1])  # the tags (IMAGE2) (IMAGE1) (IMAGE2) of each grounded sample
    assert torch.allclose(out.loss_image, torch.nn.functional.cross_entropy(logits, targets))
    out.loss.backward()
    assert model.grounding.choice_token.grad.abs().sum() > 0
    assert any(p is model.grounding.choice_token for p in model.parameter_groups()["grounding"])

    with torch.no_grad():  # the same query against the same images in another order: the same logits, reordered
        prompts = torch.randn(1, model.grounding.prompt_dim)
        # random features: a randomly initialised EfficientNet gives nearly the same deep features for every image
        feats = [torch.randn_like(f) for f in model.encode_images(batch["pixel_values"])]
        words = torch.tensor([[5, -1]])
        forward = model.image_choice_logits(prompts, words, torch.tensor([[0, 1, 2]]), feats)
        backward = model.image_choice_logits(prompts, words, torch.tensor([[2, 1, 0]]), feats)
    assert torch.allclose(forward, backward.flip(-1), atol=1e-5)
    assert not torch.allclose(forward[0, 0], forward[0, 1])


def test_generate_chooses_the_tag_by_llm_plus_decoder(monkeypatch):
    """At the tag after a [SEG]: LLM tag log-probability + image_choice_weight x the decoder's image log-probability,
    from that [SEG]'s state and its phrase's words."""
    model = small_model("grounding.image_choice=true", "grounding.phrase_tokens=2").eval()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    seen = []

    def prefer(image):
        def choice(prompts, words, candidates, features):
            seen.append((prompts.shape, words.tolist(), candidates.tolist()))
            logits = torch.zeros(candidates.shape)
            logits[:, image] = 5.0
            return logits

        return choice

    undecided = ["<p>", "chair", "</p>", "[SEG]", "chair", "</s>"]  # the LLM ranks every tag the same
    for image in (0, 1, 2):
        monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, undecided))
        monkeypatch.setattr(model, "image_choice_logits", prefer(image))
        result = model.generate(random_images(3), "Where?", max_new_tokens=10)
        assert [(s.phrase, s.image) for s in result.segments] == [("chair", image + 1)]
    assert seen[-1] == ((1, model.grounding.prompt_dim), [[vocab("chair"), -1]], [[0, 1, 2]])

    # a sure LLM is not overruled by a weight-1 decoder (a sum of log-probabilities, not a switch) ...
    sure = ["<p>", "chair", "</p>", "[SEG]", "(IMAGE1)", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, sure))
    assert model.generate(random_images(3), "Where?", max_new_tokens=10).segments[0].image == 1
    # ... and with weight 0 the decoder has no say
    model.config.grounding.image_choice_weight = 0.0
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, undecided))
    monkeypatch.setattr(model, "image_choice_logits", prefer(2))
    assert model.generate(random_images(3), "Where?", max_new_tokens=10).segments[0].image == 1
    model.config.grounding.image_choice_weight = 1.0
    monkeypatch.undo()

    # the real decoder path, in a batch with rows at different steps
    results = model.generate_batch([(random_images(3), "Where?"), (random_images(2), "Which one?")], max_new_tokens=12)
    for result, n in zip(results, (3, 2)):
        assert all(1 <= s.image <= n for s in result.segments)


def test_image_prior_scores_the_first_segs_image_from_question_and_all_images():
    """model.image_prior: one logit per image of each sample (-inf past its count), trained by cross-entropy towards
    the image of the sample's first [SEG] (samples without one left out); its own group, clipped on its own; each
    image's logit depends on the other images too (it compares them)."""
    model = small_model("image_prior=true")
    batch = make_batch(model, [grounded_sample(), negative_sample(), grounded_sample("s3", n_images=2)])
    out = model(batch)
    logits = out.image_prior_logits
    assert logits.shape == (3, 3) and torch.isinf(logits[1:, 2]).all() and torch.isfinite(logits[0]).all()
    targets = torch.tensor([1, 1])  # the first [SEG]s' tags: (IMAGE2) in both grounded samples
    assert torch.allclose(out.loss_prior, torch.nn.functional.cross_entropy(logits[[0, 2]], targets))
    model.zero_grad()
    out.loss_prior.backward()
    prior = list(model.image_prior.parameters())
    assert all(p.grad is not None for p in prior)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("image_prior."))
    assert model.parameter_groups()["image_prior"] == prior
    assert prior in model.separately_clipped_groups()

    with torch.no_grad():
        model.eval()
        feats = [torch.randn_like(f) for f in model.encode_images(batch["pixel_values"])][model.vision.token_index]
        index = batch["image_sample_index"]
        qids, qmask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
        before = model.image_prior(feats, index, qids, qmask)
        changed = feats.clone()
        changed[2] = torch.randn_like(changed[2])  # the first sample's third image
        after = model.image_prior(changed, index, qids, qmask)
    assert not torch.allclose(before[0, :2], after[0, :2])  # its other images' logits move with it
    assert torch.allclose(before[1:], after[1:], atol=1e-6)  # other samples do not


def test_image_prior_places_learn_where_the_answers_masks_show_the_questions_words():
    """model.image_prior_places: each question word's place in each image (an attention over its cells), taught by
    the GT mask of every answer phrase that has the word, on that phrase's image; the pairs of places then score the
    images, but their gates start at zero, so an untrained prior scores exactly as one without them."""

    with pytest.raises(Exception, match="image_prior: true"):
        small_model("image_prior_places=true")
    model = small_model("image_prior=true", "image_prior_places=true")
    plain = small_model("image_prior=true")
    asked = dataclasses.replace(grounded_sample(), question="Which chair could you sit on?")  # "chair": phrase 1
    batch = make_batch(model, [asked, negative_sample()])
    out, without = model(batch), plain(batch)
    assert torch.equal(out.image_prior_logits, without.image_prior_logits)
    assert without.loss_places is None

    # by hand: the word's attention over the cells of image 2 against the pooled mask of "chair"; the question's
    # words the vocabulary lacks match no phrase's (the phrases "desk" and "legs" are unknown words here too)
    x = model._inputs(batch)
    places = model.image_prior_reading(batch, x).places
    chair = batch["qformer_input_ids"][0].tolist().index(model.processor.encode_qformer_text("chair")[0])
    grid = int(places.shape[-1] ** 0.5)
    target = torch.nn.functional.adaptive_avg_pool2d(batch["masks"][0][None, None].float(), grid).flatten()
    expected = -(target / target.sum() * places[1, chair].log()).sum()  # the first sample's images are rows 0-2
    assert torch.allclose(out.loss_places, expected, atol=1e-5)
    model.zero_grad()
    out.loss_places.backward()
    assert model.image_prior.relations.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("image_prior."))

    # no question word in any phrase: a zero, still in the graph
    none = model(make_batch(model, [grounded_sample(), negative_sample()]))
    assert float(none.loss_places.detach()) == 0.0 and none.loss_places.requires_grad


def test_image_prior_contrast_scores_the_image_that_differs_where_the_word_is():
    """model.image_prior_contrast: the encoder's features at each question word's place, compared with the mean of the
    sample's other images; its gates start at zero, so an untrained prior scores exactly as one without it, and it
    needs the word places (which it reads without training them)."""
    from prima.model.prior import WordContrast

    with pytest.raises(Exception, match="image_prior_places: true"):
        small_model("image_prior=true", "image_prior_contrast=true")
    model = small_model("image_prior=true", "image_prior_places=true", "image_prior_contrast=true")
    plain = small_model("image_prior=true", "image_prior_places=true")
    batch = make_batch(model, [grounded_sample(), negative_sample(), grounded_sample("s3", n_images=2)])
    assert torch.equal(model(batch).image_prior_logits, plain(batch).image_prior_logits)
    assert {n for n, _ in plain.named_parameters()} < {n for n, _ in model.named_parameters()}
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in plain.named_parameters())

    # by hand: three images of one sample, the word "there" on the first cell of each; the third differs there
    torch.manual_seed(0)
    contrast = WordContrast(channels=6, dim=8)
    with torch.no_grad():
        contrast.distance.weight.fill_(1.0)
        contrast.gate[-1].bias.fill_(1.0)
    places = torch.zeros(4, 1, 4)
    places[:, 0, 0] = 1.0
    cells = torch.randn(1, 4, 6).repeat(4, 1, 1)
    cells[2, 0] = torch.randn(6)
    cells[1, 1:] = torch.randn(3, 6)  # elsewhere than the word's place: no say
    index, words, present = torch.tensor([0, 0, 0, 1]), torch.randn(4, 1, 8), torch.ones(4, 1, dtype=torch.bool)
    scores = contrast(places, cells, index, words, present)
    assert int(scores[:3].argmax()) == 2 and torch.allclose(scores[0], scores[1])
    assert float(scores[3].detach()) == 0.0  # a sample of one image has nothing to differ from
    assert float(contrast(places, cells, index, words, torch.zeros_like(present)).detach().abs().sum()) == 0.0


def test_image_prior_cells_say_where_the_answers_first_object_is_without_changing_the_image_choice():
    """model.image_prior_cells: `AnswerCells`' log-probabilities over each image's cells, trained towards the first
    [SEG]'s GT mask on its image; it reads the prior's tokens and readings without training them, so the image choice
    is the same and trains the same; a cell its other images match nowhere scores as it should."""
    from prima.model.prior import AnswerCells

    with pytest.raises(Exception, match="image_prior: true"):
        small_model("image_prior_cells=true")
    with pytest.raises(PrimaError, match="image_prior_cells_weight must be >= 0"):
        load_model_config("tiny", ["image_prior_cells_weight=-1"])
    with pytest.raises(PrimaError, match=r"image_prior_cells_below must be in \[0, 1\]"):
        load_model_config("tiny", ["image_prior_cells_below=2"])
    with pytest.raises(PrimaError, match="image_prior_cells_temperature must be > 0"):
        load_model_config("tiny", ["image_prior_cells_temperature=0"])
    with pytest.raises(PrimaError, match="image_prior_cells_match is part of the answer cells"):
        load_model_config("tiny", ["image_prior=true", "image_prior_cells_match=true"])
    model = small_model("image_prior=true", "image_prior_cells=true")
    plain = small_model("image_prior=true")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in plain.named_parameters())
    batch = make_batch(model, [grounded_sample(), negative_sample(), grounded_sample("s3", n_images=2)])
    out, without = model(batch), plain(batch)
    assert torch.equal(out.image_prior_logits, without.image_prior_logits) and without.loss_cells is None

    x = model._inputs(batch)
    cells = model.image_prior_reading(batch, x).cells  # (N images, g * g + 1): the last "nowhere"
    assert cells.shape[0] == 7 and torch.allclose(cells.exp().sum(-1), torch.ones(7))
    grid = int((cells.shape[-1] - 1) ** 0.5)
    pooled = torch.nn.functional.adaptive_avg_pool2d(batch["masks"].float().unsqueeze(1), grid).flatten(1)
    first = [0, 3]  # the grounded samples' first [SEG]s (the second sample has none), both on their image 2
    where = pooled[first] / pooled[first].sum(-1, keepdim=True)
    grounded = -(where * cells[[1, 6], :-1]).sum(-1)  # image 2 of sample 1 is row 1; of sample 3, row 6
    nowhere = -cells[[3, 4], -1].mean()  # the second sample (no [SEG]): "nowhere" on both its images
    assert torch.allclose(out.loss_cells, torch.cat([grounded, nowhere[None]]).mean(), atol=1e-5)
    model.zero_grad()
    out.loss_cells.backward()
    prior = dict(model.image_prior.named_parameters())
    assert all(prior[n].grad is not None for n in prior if n.startswith("cells."))
    assert all(prior[n].grad is None for n in prior if not n.startswith("cells."))  # the image choice: untouched
    groups = model.separately_clipped_groups()  # clipped apart from the prior's, whose updates stay as without them
    assert list(model.image_prior.cells.parameters()) in groups
    assert [p for n, p in model.image_prior.named_parameters() if not n.startswith("cells.")] in groups
    only_negative = model(make_batch(model, [negative_sample()]))
    assert torch.allclose(
        only_negative.loss_cells,
        -model.image_prior_reading(
            make_batch(model, [negative_sample()]), model._inputs(make_batch(model, [negative_sample()]))
        )
        .cells[:, -1]
        .mean(),
        atol=1e-5,
    )

    # by hand: two images of one sample alike but for cell 3 of the first; cell 3's matches are the lowest there
    torch.manual_seed(0)
    head = AnswerCells(dim=8)
    raw = torch.randn(1, 4, 6).repeat(3, 1, 1)
    raw[0, 3] = -raw[0, 3]
    tokens, readings, index = torch.zeros(3, 4, 8), torch.zeros(3, 8), torch.tensor([0, 0, 1])
    seen = []

    class MatchesOnly(torch.nn.Module):  # scores a cell by the sum of its four match statistics
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            seen.append(h)
            return h[..., -4:].sum(-1, keepdim=True)

    head.score = MatchesOnly()
    scores = head(raw, tokens, readings, index)
    assert scores.shape == (3, 5) and int(scores[0, :4].argmin()) == 3
    assert torch.allclose(seen[0][0, :3, -4:], torch.ones(3, 4), atol=1e-5)  # the others are matched exactly
    assert float(seen[0][2, :, -4:].detach().abs().sum()) == 0.0  # a sample of one image has nothing to match against

    # model.image_prior_cells_match: the four statistics again from learnt projections, which the cells' loss trains
    head = AnswerCells(dim=8, channels=6)
    seen.clear()
    head.score = MatchesOnly()
    scores = head(raw, tokens, readings, index)
    assert seen[0].shape[-1] == 2 * 8 + 8 and scores.shape == (3, 5)
    assert torch.allclose(seen[0][0, :3, -8:], torch.ones(3, 8), atol=1e-5)  # matched exactly in both spaces
    scores[0, 3].backward()
    assert head.match.weight.grad is not None and float(head.match.weight.grad.abs().sum()) > 0
    model = small_model("image_prior=true", "image_prior_cells=true", "image_prior_cells_match=true")
    batch = make_batch(model, [grounded_sample(), negative_sample(), grounded_sample("s3", n_images=2)])
    out = model(batch)
    assert torch.equal(out.image_prior_logits, plain(batch).image_prior_logits)  # the image choice as without it
    out.loss_cells.backward()
    assert model.image_prior.cells.match.weight.grad is not None


def test_training_the_prior_alone_runs_only_the_prior_with_the_same_losses_and_gradients(monkeypatch):
    """With every other group frozen (configs/tiny-prior.yaml) training runs the prior alone: its losses and gradients
    are those of the whole forward, the LLM and the decoder do not run, and evaluation still runs everything."""

    model = small_model("image_prior=true", "image_prior_places=true", "grounding.phrase_tokens=4")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("image_prior."))
    asked = dataclasses.replace(grounded_sample(), question="Which chair could you sit on?")
    batch = make_batch(model, [asked, negative_sample(), grounded_sample("s3", n_images=2)])
    model.train()

    def run() -> tuple[PrimaOutput, list[torch.Tensor]]:
        model.zero_grad()
        out = model(batch)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.image_prior.parameters()]

    fast, fast_grads = run()
    assert fast.loss_ce is None and fast.loss_bce is None and fast.logits is None  # nothing else ran
    levels = model.feature_levels()  # what a training batch from the feature cache need hold
    assert levels == [model.vision.token_index]
    with torch.no_grad():
        features = model.encode_images(batch["pixel_values"])
    one_level = {k: v for k, v in batch.items() if k != "pixel_values"}
    one_level["image_features"] = [f if i in levels else f[:0].flatten() for i, f in enumerate(features)]
    model.zero_grad()
    read = model(one_level)
    read.loss.backward()
    assert torch.equal(read.loss, fast.loss)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.image_prior.parameters(), fast_grads))
    monkeypatch.setattr(model, "_trains_only_the_prior", lambda: False)
    full, full_grads = run()
    assert full.loss_bce is not None
    assert torch.allclose(fast.loss_prior, full.loss_prior) and torch.allclose(fast.loss_places, full.loss_places)
    assert torch.equal(fast.image_prior_logits, full.image_prior_logits)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fast_grads, full_grads))
    monkeypatch.undo()
    with torch.no_grad():
        assert model.eval()(batch).loss_bce is not None  # validation reports every loss
        assert model.feature_levels() is None  # ... from every level
    model.image_prior.requires_grad_(False)
    model.grounding.requires_grad_(True)
    assert model.train()(batch).loss_bce is not None  # another group trains: the whole forward


def test_a_frozen_branch_with_nothing_to_do_still_reports_its_loss_parts():
    """A batch without [SEG] keeps each branch in the graph with a zero; with that branch frozen the zero must still
    be a tensor, or one process reports fewer loss parts than another and their averaging across processes fails
    (a run that trains the image prior under a frozen decoder hit this)."""
    model = small_model("image_prior=true")
    model.grounding.requires_grad_(False)
    model.seg_projector.requires_grad_(False)
    model.image_prior.requires_grad_(False)
    out = model(make_batch(model, [negative_sample()]))
    for name in ("loss_bce", "loss_dice", "loss_score", "loss_prior"):
        part = getattr(out, name)
        assert isinstance(part, torch.Tensor) and part.numel() == 1 and float(part) == 0.0, name


def test_image_prior_reweighs_only_the_answers_first_image_reference(monkeypatch):
    """At generation the prior re-weighs the image tags and, after the word "image" (or "Image", opening a sentence),
    its numbers, among themselves (their total probability stays the LLM's), until the answer has named an image; then
    it has no say."""
    texts = [
        "In image 1 , image 2 , image 3 , image 4 , image 5 : the <p> chair </p> [SEG] (IMAGE1).",
        "Image 1 , with the <p> chair </p> [SEG] (IMAGE1).",
    ]
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny", [*SMALL, "image_prior=true"]), TEXTS + texts).eval()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    words, numbers = model._image_words()
    assert words == {vocab("image"), vocab("Image")} and numbers == [vocab(str(k)) for k in range(1, 6)]
    word = vocab("image")
    tags = model.config.tokens.image_tag_ids
    prior = torch.log_softmax(torch.tensor([[0.0, 4.0, 0.0]]), -1)  # image 2
    scores = torch.zeros(1, model.config.tokens.vocab_size)
    scores[0, vocab("the")] = 3.0
    for generated, reweighed in (
        ([vocab("In"), word], [tags[:3], numbers[:3]]),
        ([vocab("Image")], [tags[:3], numbers[:3]]),
        ([vocab("In")], [tags[:3]]),
    ):
        out = model._weigh_first_image(scores, prior, [generated], [3])
        for ids in reweighed:
            assert torch.allclose(torch.logsumexp(out[0, ids], -1), torch.logsumexp(scores[0, ids], -1))
            assert int(out[0, ids].argmax()) == 1
        assert out[0, vocab("the")] == 3.0 and torch.equal(out[0, tags[3:]], scores[0, tags[3:]])
        if len(reweighed) == 1:
            assert torch.equal(out[0, numbers], scores[0, numbers])
    for named in ([vocab("In"), word, numbers[0], vocab("the"), word], [vocab("<p>"), vocab("</p>"), tags[0]]):
        assert torch.equal(model._weigh_first_image(scores, prior, [named], [3]), scores)
    # once a phrase is written its tag is the LLM's, unless model.image_prior_after_phrase gives the prior a weight
    phrase = [vocab("The"), vocab("<p>"), vocab("chair"), vocab("</p>"), vocab("[SEG]")]
    assert torch.equal(model._weigh_first_image(scores, prior, [phrase], [3]), scores)
    model.config.image_prior_after_phrase = 1.0
    out = model._weigh_first_image(scores, prior, [phrase], [3])
    assert int(out[0, tags[:3]].argmax()) == 1 and out[0, vocab("the")] == 3.0
    assert torch.equal(model._weigh_first_image(scores, prior, [[*phrase, tags[0]]], [3]), scores)
    # ... floored (model.image_prior_after_phrase_floor), the prior no longer overrules an image the LLM is sure of
    sure = scores.clone()
    sure[0, tags[0]] = 3.0
    assert int(model._weigh_first_image(sure, prior, [phrase], [3])[0, tags[:3]].argmax()) == 1
    model.config.image_prior_after_phrase_floor = 0.1
    assert int(model._weigh_first_image(sure, prior, [phrase], [3])[0, tags[:3]].argmax()) == 0
    assert int(model._weigh_first_image(scores, prior, [phrase], [3])[0, tags[:3]].argmax()) == 1  # a tie: moved
    model.config.image_prior_after_phrase_floor = 0.0
    model.config.image_prior_after_phrase = 0.0
    with pytest.raises(PrimaError, match="image_prior_after_phrase must be >= 0"):
        load_model_config("tiny", ["image_prior_after_phrase=-1"])
    with pytest.raises(PrimaError, match=r"image_prior_after_phrase_floor must be in \[0, 1\)"):
        load_model_config("tiny", ["image_prior_after_phrase_floor=1.0"])

    # in generate: where the LLM has no preference among the numbers after "In image", the prior picks; the tag after
    # the phrase is the LLM's (the phrase opened first)
    tied = PriorReading(torch.tensor([[0.0, 0.0, 6.0]]), None, None)
    monkeypatch.setattr(model.image_prior, "read", lambda *a: tied)
    script = ["In", "image", None, ":", "the", "<p>", "chair", "</p>", "[SEG]", "(IMAGE1)", "</s>"]
    for weight, number in ((1.0, 3), (0.0, 1)):  # weight 0: the prior does not even run; the tie goes to the first
        model.config.image_prior_weight = weight
        monkeypatch.setattr(model.language, "forward", TiedNumbers(model, script, numbers))
        result = model.generate(random_images(3), "Where?", max_new_tokens=14)
        assert result.token_ids[2] == numbers[number - 1] and [s.image for s in result.segments] == [1]
        monkeypatch.setattr(model.image_prior, "read", lambda *a: pytest.fail("the prior ran at weight 0"))


def test_answer_cells_rewrite_the_first_phrase_where_it_holds_too_little_of_them(monkeypatch):
    """model.image_prior_cells_weight: an answer whose first mask holds less than image_prior_cells_below of the
    cells' distribution is written again from branches at the words of its first phrase; the branch on the same image
    whose phrase has as many words with the best log-probability + weight x log(share) stands, and the first answer
    is kept."""
    model = small_model("image_prior=true", "image_prior_cells=true")
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    ids = [vocab(w) for w in ["the", "<p>", "chair", "sit", "</p>", "[SEG]", "(IMAGE2)", "."]]
    branches = model._phrase_branches(GenerationOutput("", [], ids), set())
    assert branches == [(ids[:p], rank) for p in (2, 3) for rank in (1, 2)]  # at "chair" and "sit"
    assert model._phrase_branches(GenerationOutput("", [], ids[:1]), set()) == []
    # the words read where the cells are, that the phrase lacks, as its first word and as its second
    read = GenerationOutput("", [], ids, cells_words=[vocab("lamp"), vocab("chair")])
    lamp = [([*ids[:2], vocab("lamp")], 0), ([*ids[:3], vocab("lamp")], 0)]
    assert model._phrase_branches(read, set()) == [*branches, *lamp]
    # a word the question has stays, in any form ("Which chairs ...?": only "sit" may change)
    asked = model._word_forms(model.processor.encode_words("chair"))
    assert model._phrase_branches(read, asked) == [(ids[:3], 1), (ids[:3], 2), lamp[1]]

    tokens = {1: "Chairs", 2: "chair's", 3: "chair", 4: "Glass", 5: "is"}
    monkeypatch.setattr(model.processor.tokenizer, "convert_ids_to_tokens", lambda ids: [tokens[i] for i in ids])
    assert model._word_forms([1, 2, 3]) == {"chair"} and model._word_forms([4, 5]) == {"glas", "is"}
    monkeypatch.undo()

    def answer(text: str, image: int, share: float, logp: float) -> GenerationOutput:
        seg = GeneratedSegment(text, image, np.zeros((4, 4), np.float32), 1.0)
        return GenerationOutput(text, [seg], ids, mean_logprob=logp, logprob=logp, cells_share=share)

    written = [
        answer("sure", 2, 0.9, -1.0),  # row 0 holds enough: not written again
        answer("unsure", 2, 0.1, -0.5),
    ]
    asked = []
    candidates = [
        answer("other image", 1, 0.99, -0.5),
        answer("better", 2, 0.8, -0.9),
        answer("likelier", 2, 0.2, -0.4),
        answer("", 2, 0.99, -0.1),  # a phrase with fewer words ("the <p> red </p>" for "the <p> red mug </p>")
    ]

    def branches_of(requests, rows, own, max_new_tokens, *, ungrounded, first_images):
        asked.append((rows, own, ungrounded, first_images))
        return [candidates]

    monkeypatch.setattr(model, "_generate_branches", branches_of)
    model.config.image_prior_cells_weight = 1.0
    out = model._rewrite_where_cells_disagree([([], "q")] * 2, list(written), 8)
    assert asked == [([1], [branches], False, [None])]  # on the first [SEG]'s own image: no image forced
    assert out[0] is written[0] and out[1].answer == "better" and out[1].first_answer == "unsure"
    model.config.image_prior_cells_weight = 0.1  # the LLM's likelihood weighs more
    assert model._rewrite_where_cells_disagree([([], "q")] * 2, list(written), 8)[1].answer == "likelier"
    # a branch that writes the same answer again (its first word read back) is no rewrite, however it scores
    candidates[:] = [answer("unsure", 2, 0.1, -0.4)]
    out = model._rewrite_where_cells_disagree([([], "q")] * 2, list(written), 8)
    assert out[1] is written[1] and out[1].first_answer is None
    candidates[:] = [answer("better", 2, 0.8, -0.9)]
    model.config.image_prior_cells_below = 0.05  # every answer holds enough
    asked.clear()
    assert model._rewrite_where_cells_disagree([([], "q")] * 2, list(written), 8) == written and not asked


def test_generation_reads_the_answer_cells_under_the_first_mask(monkeypatch):
    """With model.image_prior_cells_weight the first [SEG]'s result carries the share of the cells' distribution on
    its image under its mask (where on the image: "nowhere" left out) and the words the phrase check reads where the
    cells are; the rewrite then runs."""
    import prima.model.prima as prima_module

    model = small_model("image_prior=true", "image_prior_cells=true", *CHECK).eval()
    model.config.image_prior_cells_weight = 1.0
    model.config.image_prior_cells_below = 1.0  # every grounded answer is written again
    images = random_images(3)
    script = ["the", "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", ".", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    first, reading = _generate_and_read_prior(model, images, "Where?")
    cells = reading.cells[1].exp()
    where = cells[:-1] / cells[:-1].sum()  # where on the image, if anywhere
    grid = int(where.shape[0] ** 0.5)
    cover = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(first.segments[0].mask)[None, None], grid)
    assert first.cells_share == pytest.approx(float((where * cover.flatten()).sum()), abs=1e-5)
    assert 0.0 < first.cells_share < 1.0
    model.config.image_prior_cells_temperature = 0.25  # the distribution sharpened before the share is taken
    model.language.forward.step = 0
    sharp = reading.cells[1, :-1].div(0.25).softmax(-1)
    sharpened, _ = _generate_and_read_prior(model, images, "Where?")
    assert sharpened.cells_share == pytest.approx(float((sharp * cover.flatten()).sum()), abs=1e-5)
    assert sharpened.cells_share != pytest.approx(first.cells_share, abs=1e-4)
    model.config.image_prior_cells_temperature = 1.0
    assert len(first.cells_words) == prima_module.CELL_WORDS
    assert not set(first.cells_words) & set(model._structure_token_ids())
    rewritten = []
    monkeypatch.setattr(model, "_generate_branches", lambda *a, **k: rewritten.append(a[1]) or [[]])
    model.language.forward.step = 0
    model.generate_batch([(images, "Where?")])
    assert rewritten == [[0]]


def test_nothing_there_reads_each_image_against_the_one_the_question_compares_and_trains_apart():
    """model.image_prior_nowhere: `NothingThere`'s log-probabilities over each image's cells and "nowhere", trained
    as the answer cells are; the image choice and the cells train as without it, each clipped apart; an image is read
    against each other image and the readings mixed by which one the question compares against."""
    from prima.model.prior import NothingThere

    with pytest.raises(Exception, match="image_prior: true"):
        small_model("image_prior_nowhere=true")
    with pytest.raises(PrimaError, match=r"image_prior_nowhere_below must be in \[0, 1\]"):
        load_model_config("tiny", ["image_prior_nowhere_below=2"])
    model = small_model("image_prior=true", "image_prior_cells=true", "image_prior_nowhere=true")
    plain = small_model("image_prior=true", "image_prior_cells=true")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in plain.named_parameters())
    batch = make_batch(model, [grounded_sample(), negative_sample(), grounded_sample("s3", n_images=2)])
    out, without = model(batch), plain(batch)
    assert torch.equal(out.image_prior_logits, without.image_prior_logits)
    assert torch.equal(out.loss_cells, without.loss_cells) and without.loss_nowhere is None
    reading = model.image_prior_reading(batch, model._inputs(batch))
    expected = model.image_prior_cells_loss(reading.nowhere, model._inputs(batch), *_first_segs(model, batch))
    assert torch.allclose(out.loss_nowhere, expected)
    _trains_alone(model, out.loss_nowhere, "nowhere")
    assert list(model.image_prior.cells.parameters()) in model.separately_clipped_groups()

    # by hand: image 0 is read against each other image and the two readings mixed by the reference weights; where
    # they all but pick image 2, image 0 reads as in a sample of images 0 and 2 alone
    torch.manual_seed(0)
    head = NothingThere(channels=6, dim=8)
    raw, readings = torch.randn(3, 4, 6), torch.randn(3, 8)
    readings[:, 0] = torch.tensor([0.0, 0.0, 1.0])
    with torch.no_grad():
        head.reference.weight.zero_()
        head.reference.weight[0, 0] = 100.0
        three = head(raw, readings, torch.tensor([0, 0, 0]))
        two = head(raw[[0, 2]], readings[[0, 2]], torch.tensor([0, 0]))
        one = head(raw[:1], readings[:1], torch.tensor([0]))  # nothing to compare with: still a distribution
    assert torch.allclose(three[0], two[0], atol=1e-5) and not torch.allclose(three[1], two[1], atol=1e-3)
    assert torch.allclose(three.exp().sum(-1), torch.ones(3)) and torch.allclose(one.exp().sum(-1), torch.ones(1))


def test_odd_image_scores_the_image_that_differs_where_nothing_there_looks_and_trains_apart():
    """model.image_prior_odd: `OddImage` adds to the prior's image logits each image's standardised mean distance to
    the sample's other images, described under its own `NothingThere` distribution, scaled by a gate of the question's
    reading (zero at the start: the logits as without it); trained by the image loss alone, clipped apart; nothing in
    a sample of fewer than three images."""
    from prima.model.prior import OddImage

    with pytest.raises(PrimaError, match="set model.image_prior_nowhere"):
        load_model_config("tiny", ["image_prior=true", "image_prior_cells=true", "image_prior_odd=true"])
    heads = ("image_prior=true", "image_prior_cells=true", "image_prior_nowhere=true")
    model, plain = small_model(*heads, "image_prior_odd=true"), small_model(*heads)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in plain.named_parameters())
    batch = make_batch(model, [grounded_sample(), grounded_sample("s2", n_images=3)])
    out = model(batch)
    assert torch.equal(out.image_prior_logits, plain(batch).image_prior_logits)  # the gate starts at zero
    model.zero_grad()
    out.loss_prior.backward()  # the image loss: the prior's and this head's, not NothingThere's or the cells'
    prior = dict(model.image_prior.named_parameters())
    assert all(prior[n].grad is not None for n in prior if n.startswith("odd."))
    assert all(prior[n].grad is None for n in prior if n.startswith(("nowhere.", "cells.")))
    assert list(model.image_prior.odd.parameters()) in model.separately_clipped_groups()
    model.zero_grad()  # a batch without a sample of three images still trains (the gate stays in the graph)
    model(make_batch(model, [grounded_sample(n_images=2)])).loss_prior.backward()
    assert all(p.grad is not None for p in model.image_prior.odd.parameters())

    # by hand: three images alike but the second, under a uniform place: the second is the odd one
    torch.manual_seed(0)
    head = OddImage(dim=8)
    with torch.no_grad():
        head.gate[-1].bias.fill_(2.0)
    cells = torch.ones(4, 5, 6)
    cells[[1, 3], :, 0] = 5.0  # sample 0: image 1 differs; sample 1 has two images only
    uniform = torch.full((4, 6), -math.log(6))
    scores = head(cells, uniform, torch.randn(4, 8), torch.tensor([0, 0, 0, 1]))
    assert int(scores[:3].argmax()) == 1 and scores[1] > 0 > scores[0]
    assert scores[3] == 0


def _trains_alone(model: PrimaModel, loss: torch.Tensor, head: str) -> None:
    """``loss`` reaches the image prior's ``head`` and nothing else of it, and that head is clipped on its own."""
    model.zero_grad()
    loss.backward()
    prior = dict(model.image_prior.named_parameters())
    assert all(prior[n].grad is not None for n in prior if n.startswith(head + "."))
    assert all(prior[n].grad is None for n in prior if not n.startswith(head + "."))
    assert list(getattr(model.image_prior, head).parameters()) in model.separately_clipped_groups()


def _first_segs(model: PrimaModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The [SEG] rows, their batch images and the GT masks, as `PrimaModel._prior_losses` passes them on."""
    x = model._inputs(batch)
    positions, seg_images = model.seg_targets(x.input_ids, x.image_offsets, x.num_images, x.labels)
    return positions[0], seg_images, batch["masks"].float()


def test_a_sure_image_prior_moves_the_cells_rewrite_to_its_image(monkeypatch):
    """model.image_prior_rewrite_above: where the prior finds the answer's first image with at least that probability
    and the first [SEG] lies on another, the cells are read on the prior's image (the first mask holds none of them),
    the rewrite reaches the answer whatever its share if the pixels show its first phrase, its branches must name the
    prior's image first, and only a branch on that image may stand."""
    torch.manual_seed(0)
    cfg = load_model_config("tiny", [*SMALL, "image_prior=true", "image_prior_cells=true", *CHECK])
    model = create_model(
        cfg, [*TEXTS, "In image 1 , image 2 , image 3 , image 4 , image 5 : the <p> chair </p> [SEG] (IMAGE1)."]
    ).eval()
    model.config.image_prior_cells_weight = 1.0
    model.config.image_prior_cells_below = 0.0  # no share is too little: only a moved answer is written again
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    tags = model.config.tokens.image_tag_ids
    numbers = model._image_words()[1]
    assert model._other_images([vocab("the")], 2, 3) == [tags[0], tags[2]]
    assert model._other_images([vocab("the"), vocab("image")], 2, 3) == [tags[0], tags[2], numbers[0], numbers[2]]
    with pytest.raises(PrimaError, match=r"image_prior_rewrite_above must be in \[0, 1\]"):
        load_model_config("tiny", ["image_prior=true", "image_prior_cells=true", "image_prior_rewrite_above=1.5"])
    with pytest.raises(PrimaError, match="image_prior_rewrite_above is part of the cells' rewrite"):
        load_model_config("tiny", ["image_prior=true", "image_prior_rewrite_above=0.9"])

    images = random_images(3)
    script = ["the", "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", ".", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    with torch.no_grad():  # a first image forced: the LLM's tag is banned
        forced = model._generate([(images, "Where?")], 16, [False], first_images=[3])[0]
    assert [s.image for s in forced.segments] == [3] and vocab("(IMAGE3)") in forced.token_ids

    read = model.image_prior.read
    sure = lambda *a: dataclasses.replace(read(*a), logits=torch.tensor([[0.0, 0.0, 9.0]]))  # noqa: E731
    monkeypatch.setattr(model.image_prior, "read", sure)
    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "chair"))  # the phrase is shown
    for above, image in ((0.0, 2), (0.9, 3), (0.9999, 2)):  # off; sure enough; not sure enough
        model.config.image_prior_rewrite_above = above
        model.language.forward.step = 0
        with torch.no_grad():
            first = model._generate([(images, "Where?")], 16, [False])[0]
        assert first.segments[0].image == 2 and first.cells_image == image
        assert first.cells_moved == (image == 3) and model._cells_reach(first) == (image == 3)
        assert (first.cells_share == 0.0) == (image == 3)
    # a phrase the pixels do not show is the phrase check's to turn down, wherever the prior is sure it starts
    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "lamp"))
    model.config.image_prior_rewrite_above = 0.9
    model.language.forward.step = 0
    with torch.no_grad():
        unshown = model._generate([(images, "Where?")], 16, [False])[0]
    assert unshown.cells_moved and not model._shown(unshown.segments[0]) and not model._cells_reach(unshown)
    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "chair"))
    asked = []
    monkeypatch.setattr(
        model, "_generate_branches", lambda *a, first_images=None, **k: asked.append(first_images) or [[forced]]
    )
    model.language.forward.step = 0
    model.generate_batch([(images, "Where?")])
    assert asked[0] == [3]  # (the phrase check may write the answer again after, with no image forced)

    def answer(text: str, image: int, share: float, logp: float, cells_image: int) -> GenerationOutput:
        seg = GeneratedSegment(text, image, np.zeros((4, 4), np.float32), 1.0, 0.9)
        ids = [vocab(w) for w in ["the", "<p>", "chair", "</p>", "[SEG]"]]
        return GenerationOutput(text, [seg], ids, logprob=logp, cells_share=share, cells_image=cells_image)

    moved = answer("chair", 2, 0.0, -0.1, 3)
    candidates = [answer("likelier", 2, 0.9, -0.2, 3), answer("lamp", 3, 0.5, -3.0, 3)]
    monkeypatch.setattr(model, "_generate_branches", lambda *a, **k: [list(candidates)])
    out = model._rewrite_where_cells_disagree([(images, "Where?")], [moved], 16)[0]
    assert out.answer == "lamp" and out.first_answer == "chair"
    candidates.pop()  # no branch on the prior's image: the answer stands
    assert model._rewrite_where_cells_disagree([(images, "Where?")], [moved], 16)[0] is moved


def test_nothing_there_lets_the_cells_rewrite_an_answer_the_phrase_check_would_turn_down(monkeypatch):
    """model.image_prior_nowhere_below: an answer whose first phrase the pixels do not show is written again by the
    cells' rewrite only where `NothingThere` finds its image empty with a probability under the threshold (0: never,
    as without it); a shown phrase is the cells' share's to decide, as before. Generation records that probability
    for the first [SEG]'s image."""
    model = small_model("image_prior=true", "image_prior_cells=true", "image_prior_nowhere=true", *CHECK).eval()
    model.config.image_prior_cells_weight = 1.0
    model.config.image_prior_cells_below = 0.1

    def answer(support: float, share: float, nowhere: float | None) -> GenerationOutput:
        seg = GeneratedSegment("chair", 2, np.zeros((4, 4), np.float32), 1.0, support)
        return GenerationOutput("", [seg], cells_share=share, nowhere=nowhere)

    unshown, shown = 0.01, 0.9
    assert not model._cells_reach(answer(unshown, 0.9, 0.01))  # threshold 0: off
    model.config.image_prior_nowhere_below = 0.05
    assert model._cells_reach(answer(unshown, 0.9, 0.01)) and model._cells_reach(answer(unshown, 0.01, 0.04))
    assert not model._cells_reach(answer(unshown, 0.01, 0.2)) and not model._cells_reach(answer(unshown, 0.01, None))
    assert model._cells_reach(answer(shown, 0.05, 0.9)) and not model._cells_reach(answer(shown, 0.5, 0.01))
    assert not model._cells_reach(GenerationOutput("", []))

    images = random_images(3)
    script = ["the", "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", ".", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    first, reading = _generate_and_read_prior(model, images, "Where?")
    assert first.nowhere == pytest.approx(float(reading.nowhere[1, -1].exp()), abs=1e-6)
    model.config.image_prior_nowhere_below = 0.0  # off: not even read
    model.language.forward.step = 0
    with torch.no_grad():
        assert model._generate([(images, "Where?")], 16, [False])[0].nowhere is None


def test_nothing_there_can_be_read_as_the_answer_cells(monkeypatch):
    """model.image_prior_cells_nowhere: `NothingThere`'s distribution over each image's cells weighs W in the cells'
    read-out (geometric mixture, renormalised; 0 the cells' alone, 1 its alone), so the share under the first mask
    comes from it; only with both heads, and 0..1."""
    with pytest.raises(PrimaError, match=r"image_prior_cells_nowhere must be in \[0, 1\]"):
        load_model_config("tiny", ["image_prior_cells_nowhere=1.5"])
    with pytest.raises(PrimaError, match="set model.image_prior_cells and model.image_prior_nowhere"):
        load_model_config("tiny", ["image_prior=true", "image_prior_cells=true", "image_prior_cells_nowhere=1"])
    model = small_model("image_prior=true", "image_prior_cells=true", "image_prior_nowhere=true", *CHECK).eval()
    model.config.image_prior_cells_weight = 1.0
    images = random_images(3)
    script = ["the", "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", ".", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    _, reading = _generate_and_read_prior(model, images, "Where?")
    assert torch.equal(model._answer_cells(reading), reading.cells)  # 0: the cells' alone
    shares = {}
    for w in (0.5, 1.0):
        model.config.image_prior_cells_nowhere = w
        mixed = model._answer_cells(reading)
        cells, nowhere = reading.cells[:, :-1].log_softmax(-1), reading.nowhere[:, :-1].log_softmax(-1)
        expected = ((1 - w) * cells + w * nowhere).log_softmax(-1)
        assert torch.allclose(mixed[:, :-1], expected, atol=1e-6) and torch.equal(mixed[:, -1], reading.cells[:, -1])
        model.language.forward.step = 0
        first, _ = _generate_and_read_prior(model, images, "Where?")
        where = expected[1].div(model.config.image_prior_cells_temperature).softmax(-1)
        grid = int(expected.shape[-1] ** 0.5)
        cover = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(first.segments[0].mask)[None, None], grid)
        assert first.cells_share == pytest.approx(float((where * cover.flatten()).sum()), abs=1e-5)
        shares[w] = first.cells_share
    assert shares[0.5] != pytest.approx(shares[1.0], abs=1e-6)


def test_which_cells_weighs_the_two_distributions_image_by_image_and_trains_apart(monkeypatch):
    """model.image_prior_cells_mix: `WhichCells` gives each image a weight in (0, 1) on `NothingThere`'s cells, the
    read-out mixes the two by it (`prior.mix_cells`, in place of the fixed image_prior_cells_nowhere), and its loss
    (the cells' loss of that mixture) trains it alone: both distributions and every other weight as without it."""
    from prima.model.prior import mix_cells

    with pytest.raises(PrimaError, match="set model.image_prior_cells and model.image_prior_nowhere"):
        load_model_config("tiny", ["image_prior=true", "image_prior_cells=true", "image_prior_cells_mix=true"])
    heads = ("image_prior=true", "image_prior_cells=true", "image_prior_nowhere=true")
    model = small_model(*heads, "image_prior_cells_mix=true", *CHECK)
    plain = small_model(*heads, *CHECK)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in plain.named_parameters())
    batch = make_batch(model, [grounded_sample(), negative_sample(), grounded_sample("s3", n_images=2)])
    out, without = model(batch), plain(batch)
    assert torch.equal(out.loss_nowhere, without.loss_nowhere) and without.loss_mix is None
    reading = model.image_prior_reading(batch, model._inputs(batch))
    assert reading.mix.shape == (reading.cells.shape[0],) and torch.allclose(
        reading.mix, torch.full_like(reading.mix, 0.5)
    )
    expected = model.image_prior_cells_loss(
        mix_cells(reading.cells, reading.nowhere, reading.mix), model._inputs(batch), *_first_segs(model, batch)
    )
    assert torch.allclose(out.loss_mix, expected)
    _trains_alone(model, out.loss_mix, "mix")

    # the read-out: the learnt weight, image by image, in place of the fixed one; off, the fixed one again
    model.eval()
    with torch.no_grad():
        model.image_prior.mix.weigh[-1].bias.fill_(2.0)
    images = random_images(3)
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, ["the", "<p>", "chair", "</p>", "</s>"]))
    _, reading = _generate_and_read_prior(model, images, "Where?")
    weight = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(reading.mix, weight.expand(3))
    assert torch.allclose(model._answer_cells(reading), mix_cells(reading.cells, reading.nowhere, float(weight)))
    assert not torch.allclose(model._answer_cells(reading), mix_cells(reading.cells, reading.nowhere, 0.5))
    model.config.image_prior_cells_mix = False
    assert torch.equal(model._answer_cells(reading), reading.cells)  # image_prior_cells_nowhere 0: the cells alone


def _generate_and_read_prior(model: PrimaModel, images: list, question: str) -> tuple[GenerationOutput, PriorReading]:
    """The first answer `PrimaModel._generate` writes for one sample, and the image prior's reading of that sample."""
    proc = model.processor
    with torch.no_grad():
        first = model._generate([(images, question)], 16, [False])[0]
        features = model.encode_images(proc.preprocess_images(images))
        qids = torch.tensor([proc.encode_qformer_text(question)])
        index = torch.zeros(len(images), dtype=torch.long)
        return first, model.image_prior.read(features[model.vision.token_index], index, qids, torch.ones_like(qids))


class TiedNumbers(ScriptedLogits):
    """`ScriptedLogits` where a None in the script makes every image number equally likely (and nothing else)."""

    def __init__(self, model: PrimaModel, script: list[str | None], numbers: list[int]):
        super().__init__(model, [t if t is not None else "<unk>" for t in script])
        self.tied = [i for i, t in enumerate(script) if t is None]
        self.numbers = numbers

    def __call__(self, *args, **kwargs):
        step = self.step
        out = super().__call__(*args, **kwargs)
        if step in self.tied:
            out.logits[:, -1] = -1e4
            out.logits[:, -1, self.numbers] = 1e4
        return out


def test_last_decoder_layer_updates_only_the_output_tokens():
    """`OneWayBlock(keep=n)` gives exactly the first n tokens of the full update (the decoder's last layer)."""
    from prima.model.grounding import OneWayBlock

    torch.manual_seed(0)
    block = OneWayBlock(32, 4)
    x, memory = torch.randn(3, 9, 32), torch.randn(3, 16, 32)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    full = block(x, memory, padding)
    assert torch.allclose(block(x, memory, padding, keep=2), full[:, :2], atol=1e-6)


def test_mask_threshold_config_is_checked():
    with pytest.raises(PrimaError, match="mask_threshold must be in"):
        load_model_config("tiny", ["grounding.mask_threshold=1.0"])
    with pytest.raises(PrimaError, match="mask_regions must be one of all, largest, supported"):
        load_model_config("tiny", ["grounding.mask_regions=biggest"])
    with pytest.raises(PrimaError, match="mask_regions 'supported' needs phrase_check"):
        load_model_config("tiny", ["grounding.mask_regions=supported"])


def test_choice_layers_are_the_image_choices_own_and_start_from_the_mask_layers():
    """grounding.choice_layers: the choice reads its own copy of the decoder's layers; the masks never read it."""
    model = small_model("grounding.image_choice=true", "grounding.phrase_tokens=2", "grounding.choice_layers=true")
    model.eval()
    g = model.grounding
    assert all(any(p is q for q in g.choice_parameters()) for p in g.choice_layers.parameters())
    batch = make_batch(model, [grounded_sample()])
    with torch.no_grad():
        before = model(batch)
        for p in g.choice_layers.parameters():
            p.add_(0.1)
        after = model(batch)
    assert torch.equal(torch.cat(before.mask_logits), torch.cat(after.mask_logits))
    assert not torch.allclose(before.image_choice_logits, after.image_choice_logits)
    # a stage 2 from a model without them starts them from the mask layers; a model that has them keeps its own
    g.warm_start({"words.weight"})
    assert not torch.equal(g.choice_layers[0].mlp[0].weight, g.layers[0].mlp[0].weight)
    g.warm_start({f"choice_layers.{k}" for k in g.choice_layers.state_dict()})
    assert all(torch.equal(a, b) for a, b in zip(g.choice_layers.state_dict().values(), g.layers.state_dict().values()))
    with pytest.raises(PrimaError, match="choice_layers needs image_choice"):
        load_model_config("tiny", ["grounding.choice_layers=true"])


def test_image_choice_config_is_checked():
    with pytest.raises(PrimaError, match="image_choice needs kind one_way"):
        load_model_config("tiny", ["grounding.kind=sam", "grounding.image_choice=true"])
    with pytest.raises(PrimaError, match="image_choice needs model.answer_order 'written'"):
        load_model_config("tiny", ["answer_order=image_first", "grounding.image_choice=true"])
    with pytest.raises(PrimaError, match="phrase_pooling"):
        load_model_config("tiny", ["grounding.phrase_pooling=true", "grounding.image_choice=true"])
    with pytest.raises(PrimaError, match="image_choice_weight must be >= 0"):
        load_model_config("tiny", ["grounding.image_choice_weight=-1"])


def test_tag_pointer_adds_each_images_match_to_its_tag_at_each_seg(monkeypatch):
    """``tag_pointer``: at an answer's [SEG] (only there, only on the tags of its sample's images) the pointer's
    score of each image is added to the tag's logit, alike in training (LM head at labelled positions only) and
    evaluation; a fresh pointer adds nothing; generation reads it at the step after a [SEG]."""
    plain = small_model()
    model = small_model("tag_pointer=true")
    model.load_state_dict(plain.state_dict(), strict=False)  # the same weights but the pointer's
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    for m in (plain, model):
        m.eval()
    assert torch.equal(model(batch).logits, plain(batch).logits)  # zero-initialised query: nothing added

    with torch.no_grad():
        model.tag_pointer.query.weight.normal_(0, 1.0)
        model.tag_pointer.key.weight.normal_(0, 1.0)
    diff = (model(batch).logits - plain(batch).logits).abs() > 1e-6
    t = model.config.tokens
    seg_rows, seg_cols = ((batch["input_ids"] == t.seg_token_id) & (batch["labels"] != -100)).nonzero(as_tuple=True)
    assert diff.any(-1).nonzero().tolist() == torch.stack([seg_rows, seg_cols], 1).tolist()  # at answer [SEG]s only
    assert set(diff.nonzero()[:, 2].tolist()) == set(t.image_tag_ids[:3])  # the grounded sample has 3 images

    model.eval()
    losses = [model(batch).loss_ce]
    model.train()
    losses.append(model(batch).loss_ce)
    assert torch.allclose(*losses, atol=1e-6)
    losses[1].backward()
    assert model.tag_pointer.query.weight.grad.abs().sum() > 0
    assert "tag_pointer.query.weight" in {n for n, _ in model.named_parameters()}
    assert PrimaModel.group_of("tag_pointer.query.weight") == "language"
    model.zero_grad(set_to_none=True)
    model(make_batch(model, [negative_sample("a"), negative_sample("b", 3)])).loss.backward()  # no [SEG] at all
    assert all(p.grad is not None for p in model.tag_pointer.parameters())  # still in the graph (DDP)

    # generation: a pointer that prefers the last image decides an undecided LLM's tag
    model.eval()
    undecided = ["<p>", "chair", "</p>", "[SEG]", "chair", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, undecided))
    seen = []

    def prefer_last(states, visual, candidates):
        seen.append(candidates.tolist())
        scores = torch.zeros(candidates.shape)
        scores[:, -1] = 5.0
        return scores

    monkeypatch.setattr(model.tag_pointer, "forward", prefer_last)
    assert [s.image for s in model.generate(random_images(3), "Where?", max_new_tokens=10).segments] == [3]
    assert seen == [[[0, 1, 2]]]


def test_tag_pointer_detach_keeps_the_pointers_loss_out_of_the_visual_tokens():
    """``tag_pointer_detach``: the tags' loss still trains the pointer, but reaches the query module only through
    the LLM (as without a pointer), never through the pointer's keys."""
    batch_of = lambda m: make_batch(m, [grounded_sample()])  # noqa: E731
    grads = {}
    for detach in (False, True):
        model = small_model("tag_pointer=true", f"tag_pointer_detach={str(detach).lower()}")
        with torch.no_grad():
            model.tag_pointer.query.weight.normal_(0, 1.0)
        outputs: list[torch.Tensor] = []
        model.query.register_forward_hook(lambda mod, args, out, seen=outputs: seen.append(out) or out.retain_grad())
        model.train()
        model(batch_of(model)).loss_ce.backward()
        assert model.tag_pointer.key.weight.grad.abs().sum() > 0
        grads[detach] = outputs[0].grad
    assert not torch.allclose(grads[False], grads[True])  # the pointer's keys are one path less


def test_tag_pointer_config_is_checked():
    with pytest.raises(PrimaError, match="tag_pointer needs model.answer_order 'written'"):
        load_model_config("tiny", ["tag_pointer=true", "answer_order=image_first"])


READOUT = ("grounding.phrase_tokens=2", "grounding.word_readout=true")


def read_under_the_masks(model: PrimaModel, method: str, monkeypatch) -> tuple:
    """A training forward on a grounded and a negative sample with ``model.method`` (a reader of the pixels under
    masks) recorded: it reads under the GT masks, then the decoder's own, each on its [SEG]'s image. Returns the
    output, the original method and the arguments of its last call."""
    calls, original = [], getattr(model, method)
    monkeypatch.setattr(model, method, lambda *a: calls.append(a) or original(*a))
    batch = make_batch(model, [grounded_sample(), negative_sample()])
    out = model(batch)
    masks, images, _ = calls[-1]
    predicted = torch.sigmoid(torch.cat(out.mask_logits).detach())
    assert torch.equal(masks, torch.cat([batch["masks"], predicted]))  # the GT masks, then the decoder's ...
    assert images.tolist() == [1, 0, 1, 1, 0, 1]  # ... on their images
    return out, original, calls[-1]


def assert_in_the_graph_without_a_seg(model: PrimaModel, loss: str, head: torch.nn.Module) -> None:
    """With no [SEG] in the batch the head's loss is 0 and the head still gets gradients (distributed training)."""
    model.zero_grad(set_to_none=True)
    out = model(make_batch(model, [negative_sample("a"), negative_sample("b", 3)]))
    out.loss.backward()
    assert float(getattr(out, loss).detach()) == 0.0
    assert all(p.grad is not None for p in head.parameters())


def test_word_readout_learns_each_phrases_first_word_from_the_pixels_under_its_gt_mask(monkeypatch):
    """grounding.word_readout: in training a classifier reads the first word of each [SEG]'s phrase from the image
    features under its GT mask (loss.word_readout); it is part of `grounding` and in the graph without any [SEG]."""
    from prima.model.config import GroundingConfig

    assert GroundingConfig().word_readout is False
    assert small_model("grounding.phrase_tokens=2").grounding.reader is None
    model = small_model(*READOUT).train()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    out, reader, args = read_under_the_masks(model, "read_first_words", monkeypatch)
    expected = torch.nn.functional.cross_entropy(
        reader(*args).float(), torch.tensor([vocab("chair"), vocab("desk"), vocab("legs")] * 2)
    )
    assert torch.allclose(out.loss_readout, expected)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.grounding.reader.parameters())
    assert {id(p) for p in model.grounding.reader.parameters()} <= {
        id(p) for p in model.parameter_groups()["grounding"]
    }
    assert_in_the_graph_without_a_seg(model, "loss_readout", model.grounding.reader)


CHECK = ("grounding.phrase_tokens=2", "grounding.phrase_check=true")


def checker_reading(model: PrimaModel, word: str):
    """A stand-in for `PrimaModel.check_phrases` that reads ``word`` under every mask, and nothing else."""
    vocab = model.processor.tokenizer.convert_tokens_to_ids

    def check_phrases(masks, seg_images, features):
        logits = torch.full((masks.shape[0], model.config.tokens.vocab_size), -10.0)
        logits[:, vocab(word)] = 10.0
        return logits

    return check_phrases


def test_phrase_check_learns_every_word_of_each_phrase_from_the_pixels_under_its_mask(monkeypatch):
    """grounding.phrase_check: in training a multi-label classifier reads every word of each [SEG]'s phrase from the
    image features under its GT mask and under the decoder's own (loss.phrase_check: binary cross-entropy summed over
    the vocabulary); it is part of `grounding`, clipped on its own, and in the graph without any [SEG]."""
    from prima.model.config import GroundingConfig

    assert GroundingConfig().phrase_check is False
    assert small_model("grounding.phrase_tokens=2").grounding.checker is None
    model = small_model(*CHECK, "grounding.word_readout=true").train()
    assert model.grounding.checker is not None and model.grounding.reader is not None
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    out, check, args = read_under_the_masks(model, "check_phrases", monkeypatch)
    target = torch.zeros(3, model.config.tokens.vocab_size)
    for row, phrase in enumerate((["chair"], ["desk"], ["legs"])):
        target[row, [vocab(w) for w in phrase]] = 1.0
    logits = check(*args).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.repeat(2, 1), reduction="sum") / 6
    assert torch.allclose(out.loss_check, expected)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.grounding.checker.parameters())
    groups = model.separately_clipped_groups()
    assert [len(g) for g in groups] == [len(list(model.grounding.reader.parameters()))] * 2  # reader, then checker
    assert {id(p) for p in groups[1]} == {id(p) for p in model.grounding.checker.parameters()}

    assert_in_the_graph_without_a_seg(model, "loss_check", model.grounding.checker)


def test_generate_writes_an_answer_without_masks_when_the_pixels_show_none_of_its_phrases(monkeypatch):
    """grounding.phrase_check at generation: each segment's support is its phrase's least likely word under its mask;
    an answer whose every phrase reads below phrase_check_threshold is written again with no phrase, tag or [SEG]
    allowed, greedily and from branches of it (`_branches`); the likeliest of those answers replaces it if the LLM
    finds it as likely per token, and the first answer is kept as ``first_answer``."""
    model = small_model(*CHECK).eval()
    grounded = ["the", "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", "</s>"]

    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "lamp"))  # the pixels show a lamp, not a chair
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, [*grounded, "none", "</s>"]))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert result.segments == [] and result.answer == "none"
    assert result.first_answer is not None and "<p> chair </p> [SEG] (IMAGE2)" in result.first_answer

    # the LLM has no answer without a phrase (it insists on `<p>`, which is banned): the grounded answer stands
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, [*grounded, *["<p>"] * 10]))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert [s.phrase for s in result.segments] == ["chair"] and result.first_answer is None

    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "chair"))  # shown: the answer stands
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, grounded))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert [s.phrase for s in result.segments] == ["chair"] and result.first_answer is None
    assert result.segments[0].support == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item())

    model.config.grounding.phrase_check_threshold = 0.0  # off: every answer stands, its supports still recorded
    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "lamp"))
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, grounded))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert [s.phrase for s in result.segments] == ["chair"] and result.segments[0].support < 1e-3


class GradedScript(ScriptedLogits):
    """ScriptedLogits whose steps may also be ``{token: score}``: those tokens get those scores, the rest -1e4."""

    def __init__(self, model: PrimaModel, script: list):
        super().__init__(model, [t if isinstance(t, str) else "</s>" for t in script])
        tok = model.processor.tokenizer
        self.graded = {i: {tok.convert_tokens_to_ids(k): v for k, v in t.items()} for i, t in enumerate(script)
                       if isinstance(t, dict)}  # fmt: skip

    def __call__(self, *args, **kwargs):
        step = self.step
        out = super().__call__(*args, **kwargs)
        if step in self.graded:
            out.logits[:, -1] = -1e4
            for token, score in self.graded[step].items():
                out.logits[:, -1, token] = score
        return out


def test_generate_grounds_an_answer_without_phrases_when_the_pixels_show_its_phrases(monkeypatch):
    """grounding.phrase_check: an answer without phrases is written again from branches of it (here: its first token
    replaced by the LLM's second likeliest); the likeliest of those whose every phrase the pixels show replaces it
    (however unlikely the LLM finds it), and the first answer is kept as ``first_answer``; threshold 0 turns the
    check off."""
    model = small_model(*CHECK).eval()
    ungrounded = ["none", "</s>"]
    grounded = [{"none": 1e4, "the": 5e3}, "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", "</s>"]  # "the" ranks second

    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "chair"))  # the pixels show the chair
    monkeypatch.setattr(model.language, "forward", GradedScript(model, [*ungrounded, *grounded]))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert [(s.phrase, s.image) for s in result.segments] == [("chair", 2)]
    assert result.answer.startswith("the <p> chair </p> [SEG] (IMAGE2)") and result.first_answer == "none"

    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "lamp"))  # not shown: the answer stands
    monkeypatch.setattr(model.language, "forward", GradedScript(model, [*ungrounded, *grounded]))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert result.answer == "none" and result.segments == [] and result.first_answer is None

    model.config.grounding.phrase_check_threshold = 0.0  # off: no second answer is written
    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "chair"))
    script = GradedScript(model, [*ungrounded, *grounded])
    monkeypatch.setattr(model.language, "forward", script)
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert result.answer == "none" and script.step == len(ungrounded)


def test_an_answer_without_phrases_that_names_an_object_is_replaced_only_by_phrases_of_it(monkeypatch):
    """An answer without phrases that names objects ("No, none of the images shows a boat.") is replaced only by a
    branch every phrase of which names one of them ("Yes: the pink boat", not "A tree: the yellow tree"); objects are
    the words the vocabulary also has with "'s", in any form ("boats"); an answer that names none may be replaced by
    any shown branch, as before."""
    texts = [
        "No , none of the images shows a boat or trees .",
        "the <p> boat's sail </p> and the <p> tree's crown </p>",
    ]
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny", [*SMALL, *CHECK]), TEXTS + texts).eval()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    no_boat = [vocab(w) for w in ["No", ",", "none", "of", "the", "images", "shows", "a", "boat", "or", "trees", "."]]
    assert model._named_objects(no_boat) == {"boat", "tree"}
    assert model._named_objects([vocab(w) for w in ["none", "."]]) == set()
    assert model._text_forms("boat's sail") == {"boat", "sail"}

    def answer(text: str, phrases: list[str], logp: float, ids: list[int] | None = None) -> GenerationOutput:
        segments = [GeneratedSegment(p, 1, np.zeros((4, 4), np.float32), 1.0, 0.9) for p in phrases]
        return GenerationOutput(text, segments, ids or [], mean_logprob=logp, logprob=logp)

    first = answer("No, none of the images shows a boat.", [], -0.1, no_boat)
    branches = [
        answer("A tree: the yellow tree.", ["yellow tree"], -0.2),
        answer("Yes: the boat.", ["pink boat"], -0.9),
    ]
    monkeypatch.setattr(model, "_generate", lambda *a, **k: [dataclasses.replace(first)])
    monkeypatch.setattr(model, "_generate_branches", lambda *a, **k: [list(branches)])
    assert model.generate_batch([(random_images(2), "Is there a boat?")])[0].answer == "Yes: the boat."
    branches.pop()  # only the tree is shown: the answer stands
    assert model.generate_batch([(random_images(2), "Is there a boat?")])[0].answer == first.answer
    first = answer("none.", [], -0.1, [vocab("none"), vocab(".")])  # names no object: any shown branch may replace it
    assert model.generate_batch([(random_images(2), "Where?")])[0].answer == "A tree: the yellow tree."


def test_an_answer_that_says_an_object_is_in_every_image_stands_only_where_the_pixels_show_it_on_half(monkeypatch):
    """`grounding.every_image_check`: "A bottle appears in every image: ..." is turned down as an answer none of whose
    phrases is shown (written again without phrases, which replaces it where the LLM finds that as likely) where
    the shown phrases naming a bottle lie on fewer than half of the images; the check off, or another claim, it
    stands as any answer with a shown phrase."""
    texts = ["A bottle appears in every image : the <p> bottle's cap </p> and the <p> red laptop </p> .", "No object ."]
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny", [*SMALL, *CHECK]), TEXTS + texts).eval()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    claim = [vocab(w) for w in "A bottle appears in every image : the <p>".split()]

    def answer(ids: list[int], supports: list[tuple[str, int, float]]) -> GenerationOutput:
        segments = [GeneratedSegment(p, k, np.zeros((4, 4), np.float32), 1.0, s) for p, k, s in supports]
        return GenerationOutput("A bottle appears in every image: ...", segments, ids, mean_logprob=-0.5)

    nothing = GenerationOutput("No object appears in every image.", [], [], mean_logprob=-0.2)
    monkeypatch.setattr(model, "_generate_branches", lambda *a, **k: [[dataclasses.replace(nothing)]])

    def read(first: GenerationOutput, images: int = 3) -> str:
        monkeypatch.setattr(model, "_generate", lambda *a, **k: [dataclasses.replace(first)])
        return model.generate_batch([(random_images(images), "Which object appears in every image?")])[0].answer

    bottle_on_one = [("pink bottle", 1, 0.9), ("purple bottle", 2, 0.0), ("red laptop", 3, 0.9)]
    one_of_three = answer(claim, bottle_on_one)
    model.config.grounding.every_image_check = False
    assert read(one_of_three) == one_of_three.answer  # a phrase is shown: the phrase check alone lets it stand
    model.config.grounding.every_image_check = True
    assert read(one_of_three) == nothing.answer  # a bottle shown on 1 of 3 images
    assert read(one_of_three, images=2) == one_of_three.answer  # ... on 1 of 2: half
    two_of_three = answer(claim, [("pink bottle", 1, 0.9), ("purple bottle", 2, 0.9), ("red laptop", 3, 0.9)])
    assert read(two_of_three) == two_of_three.answer
    other_claim = answer([vocab(w) for w in "A bottle : the <p>".split()], bottle_on_one)
    assert read(other_claim) == other_claim.answer


def test_an_answer_is_written_again_from_a_branch_after_its_first_words(monkeypatch):
    """The branches of an answer without phrases keep its first words and change a later one ("There are" + "no"
    -> "three"): each of the first BRANCH_POSITIONS positions, with the LLM's next BRANCH_RANKS tokens there; the
    likeliest shown answer wins, so the branch that keeps the likely first word beats those that change it."""
    from prima.model.prima import BRANCH_POSITIONS, BRANCH_RANKS

    model = small_model(*CHECK).eval()
    ungrounded = ["and", "none", "</s>"]
    # every branch runs in one batch, in step: the first position's branches get "and"'s tied runners-up, the
    # second position's "the" (second to "none"), then all go on to the chair
    branched = ["and", {"none": 1e4, "the": 5e3}, "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", "</s>"]
    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "chair"))
    script = GradedScript(model, [*ungrounded, *branched])
    monkeypatch.setattr(model.language, "forward", script)
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert result.answer.startswith("and the <p> chair </p> [SEG] (IMAGE2)") and result.first_answer == "and none"
    assert [(s.phrase, s.image) for s in result.segments] == [("chair", 2)]

    tokens = model.processor.tokenizer.convert_tokens_to_ids(["and", "none", "the", "<p>", "chair", "</p>"])
    assert model._branches(tokens[:2]) == [(tokens[:p], r) for p in range(3) for r in range(1, BRANCH_RANKS + 1)]
    # before the first phrase only, and at most BRANCH_POSITIONS deep
    assert {len(prefix) for prefix, _ in model._branches(tokens[2:])} == {0, 1}
    assert max(len(prefix) for prefix, _ in model._branches(tokens[:2] * 4)) == BRANCH_POSITIONS - 1


def test_a_parts_phrase_is_supported_when_its_owner_is(monkeypatch):
    """`phrase_support` reads the words that name the object: up to the first possessive, which counts as itself or
    as its bare noun (the checker reads a part's mask as its whole object), or up to a lone "'s" token."""
    model = small_model(*CHECK).eval()
    n = model.config.tokens.vocab_size
    red, table, tables, top, clitic = 10, 11, 12, 13, 14  # ids standing for red, table, table's, top, 's
    bare, possessive, lone = torch.arange(n), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    bare[tables], possessive[tables], lone[clitic] = table, True, True
    monkeypatch.setattr(model, "_possessive_tables", (bare, possessive, lone), raising=False)
    prob = torch.full((1, n), 0.5)
    prob[0, [red, table, tables, top]] = torch.tensor([0.9, 0.8, 0.1, 0.01])
    monkeypatch.setattr(model, "check_phrases", lambda *a: torch.logit(prob.expand(a[0].shape[0], -1)))
    words = torch.tensor([[red, tables, top, -1], [red, table, clitic, top], [red, top, -1, -1], [-1, -1, -1, -1]])
    support = model.phrase_support(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long), [], words)
    assert support.tolist() == pytest.approx([0.8, 0.8, 0.01, 1.0])


def test_phrase_check_config_is_checked():
    with pytest.raises(PrimaError, match="phrase_check needs kind one_way and phrase_tokens"):
        small_model("grounding.phrase_check=true")
    with pytest.raises(PrimaError, match="phrase_check_threshold must be in"):
        small_model(*CHECK, "grounding.phrase_check_threshold=1.5")


def test_word_reader_sees_only_the_pixels_in_and_around_its_mask():
    from prima.model.grounding import WordReader

    torch.manual_seed(0)
    reader = WordReader([3, 5], hidden=16, vocab_size=7, margin=4)  # one cell of the coarse grid
    features = [torch.randn(1, 3, 32, 32), torch.randn(1, 5, 16, 16)]
    mask = torch.zeros(1, 32, 32)
    mask[0, 4:10, 4:10] = 1.0
    logits = reader(features, mask)
    assert logits.shape == (1, 7)
    far = [f.clone() for f in features]
    far[0][..., 20:, 20:] += 5.0  # beyond the mask and its margin
    far[1][..., 10:, 10:] += 5.0
    assert torch.allclose(reader(far, mask), logits)
    near = [f.clone() for f in features]
    near[0][..., 11, 11] += 5.0  # in the margin only: the grown region reads it
    assert not torch.allclose(reader(near, mask), logits)
    inside = [f.clone() for f in features]
    inside[1][..., 3, 3] += 5.0
    assert not torch.allclose(reader(inside, mask), logits)


def test_generate_writes_the_first_word_its_own_mask_reads_as(monkeypatch):
    """At generation the LLM's first phrase word competes with the reader's best READOUT_CANDIDATES under the LLM's
    mask; each is drawn with its own words and the one the reader finds under its own mask most surely is written,
    with that mask."""
    from prima.model.prima import READOUT_CANDIDATES

    model = small_model(*READOUT).eval()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    drawn = []  # per decoder call: the words it read and the scores it gave
    decode = model.grounding.decode

    def recording_decode(*a):
        masks, scores = decode(*a)
        drawn.append((a[3].tolist(), scores))
        return masks, scores

    monkeypatch.setattr(model.grounding, "decode", recording_decode)

    def reader(sure):  # reads `sure` under every mask
        calls = []

        def read_first_words(masks, seg_images, features):
            calls.append(seg_images.tolist())
            logits = torch.zeros(masks.shape[0], model.config.tokens.vocab_size)
            logits[:, model.config.tokens.seg_token_id] = 50.0  # markup is never a candidate
            logits[:, vocab(sure)] = 5.0
            return logits

        return read_first_words, calls

    script = ["the", "<p>", "chair", "</p>", "[SEG]", "(IMAGE2)", "</s>"]
    read, calls = reader("lamp")
    monkeypatch.setattr(model, "read_first_words", read)
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert [(s.phrase, s.image) for s in result.segments] == [("lamp", 2)]
    assert "<p> lamp </p> [SEG] (IMAGE2)" in result.answer and vocab("lamp") in result.token_ids
    assert calls == [[1], [1] * (1 + READOUT_CANDIDATES)]  # on the tagged image: the LLM's mask, then every option's
    (llm_words, _), (options, scores) = drawn[-2:]
    assert llm_words == [[vocab("chair"), -1]]
    assert len(options) == READOUT_CANDIDATES and options[0] == [vocab("lamp"), -1]
    assert vocab("[SEG]") not in [row[0] for row in options]
    assert result.segments[0].score == pytest.approx(float(scores[0]))  # the mask drawn with "lamp"

    read, calls = reader("chair")  # the reader agrees with the LLM: its word and its mask stand
    monkeypatch.setattr(model, "read_first_words", read)
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    drawn.clear()
    result = model.generate(random_images(2), "Where?", max_new_tokens=10)
    assert [s.phrase for s in result.segments] == ["chair"]
    (_, llm_scores), (options, _) = drawn
    assert result.segments[0].score == pytest.approx(float(llm_scores[0]))

    model.config.grounding.word_readout = False  # switched off: the LLM's words stand
    read, calls = reader("lamp")
    monkeypatch.setattr(model, "read_first_words", read)
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, script))
    assert [s.phrase for s in model.generate(random_images(2), "Where?", max_new_tokens=10).segments] == ["chair"]
    assert calls == []


def test_word_readout_config_is_checked():
    with pytest.raises(PrimaError, match="word_readout needs kind one_way and phrase_tokens"):
        small_model("grounding.word_readout=true")


def test_image_support_adds_the_pixels_reading_of_the_phrase_on_each_image_to_the_tag_choice(monkeypatch):
    """grounding.image_support_weight: the tag after a [SEG] adds w x log `phrase_support` of its phrase under its mask
    drawn on each candidate image; with the word reader on, the first word (read again from the chosen image) is not
    checked."""
    model = small_model(*CHECK, "grounding.image_choice=true", "grounding.image_support_weight=1.0").eval()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    monkeypatch.setattr(model, "image_choice_logits", lambda p, w, c, f: torch.zeros(c.shape))  # no opinion

    def chair_on_image(k):  # the checker reads "chair" (and nothing else) under masks on batch image k only
        def check_phrases(masks, seg_images, features):
            logits = torch.full((masks.shape[0], model.config.tokens.vocab_size), -10.0)
            logits[seg_images == k, vocab("chair")] = 10.0
            return logits

        return check_phrases

    for k in (1, 2):
        monkeypatch.setattr(model, "check_phrases", chair_on_image(k))
        undecided = ["<p>", "chair", "</p>", "[SEG]", "chair", "</s>"]  # the LLM ranks every tag the same
        monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, undecided))
        result = model.generate(random_images(3), "Where?", max_new_tokens=10)
        assert [s.image for s in result.segments] == [k + 1], k
    # "the" is read nowhere: with the first word checked, every image has the floor support and the tie goes to 1
    undecided = ["<p>", "the", "chair", "</p>", "[SEG]", "chair", "</s>"]
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, undecided))
    model.config.grounding.phrase_check_threshold = 0.0  # keep the answer however little its phrase reads
    assert model.generate(random_images(3), "Where?", max_new_tokens=10).segments[0].image == 1
    model.config.grounding.word_readout = True  # ... the reader's word is not checked: image 3 shows the chair
    monkeypatch.setattr(
        model, "read_first_words", lambda m, s, f: torch.zeros(m.shape[0], model.config.tokens.vocab_size)
    )
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, undecided))
    assert model.generate(random_images(3), "Where?", max_new_tokens=10).segments[0].image == 3
    model.config.grounding.image_support_weight = 0.0  # off: the tie again
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, undecided))
    assert model.generate(random_images(3), "Where?", max_new_tokens=10).segments[0].image == 1


def test_supported_regions_keep_the_region_of_most_mass_times_support(monkeypatch):
    """grounding.mask_regions "supported": of a mask's connected regions (at grounding.mask_threshold) only the one of
    the largest probability mass x the phrase check's support for its phrase stays above the threshold; a mask of
    one region is left as it is."""
    model = small_model(*CHECK, "grounding.mask_regions=supported", "grounding.mask_threshold=0.5").eval()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    m = 8
    logits = torch.full((2, m, m), -5.0)
    logits[0, :4, :4] = 3.0  # mask 0: a big region (16 pixels) ...
    logits[0, 6:, 6:] = 3.0  # ... and a small one (4 pixels)
    logits[1, 2:5, 2:5] = 3.0  # mask 1: one region
    words = torch.tensor([[vocab("chair"), -1], [vocab("chair"), -1]])
    images = torch.tensor([0, 0])
    kept_pixels = []

    def check_phrases(masks, seg_images, features):  # "chair" is read under the masks holding the pixel (7, 7)
        out = torch.full((masks.shape[0], model.config.tokens.vocab_size), -10.0)
        out[masks[:, 7, 7] > 0.5, vocab("chair")] = 10.0
        kept_pixels.append(masks.shape[0])
        return out

    monkeypatch.setattr(model, "check_phrases", check_phrases)
    out = model._supported_regions(logits, images, None, words)
    assert kept_pixels == [2]  # only mask 0's two regions were read
    assert (out[0] > 0).sum() == 4 and out[0, 7, 7] > 0 and out[0, 0, 0] == logits[0].min()  # the small shown one
    assert torch.equal(out[1], logits[1])
    # read nowhere: both regions at the floor, so the mass decides
    monkeypatch.setattr(model, "check_phrases", checker_reading(model, "table"))
    out = model._supported_regions(logits, images, None, words)
    assert (out[0] > 0).sum() == 16 and out[0, 0, 0] > 0 and out[0, 7, 7] == logits[0].min()
    # at generation every [SEG]'s mask goes through it, with the phrase as written
    seen = []
    monkeypatch.setattr(model, "_supported_regions", lambda lg, im, f, w: seen.append(w.tolist()) or lg)
    monkeypatch.setattr(model.language, "forward", ScriptedLogits(model, ["<p>", "chair", "</p>", "[SEG]", "</s>"]))
    model.config.grounding.phrase_check_threshold = 0.0  # keep the answer however little its phrase reads
    assert len(model.generate(random_images(2), "Where?", max_new_tokens=10).segments) == 1
    assert seen == [[[vocab("chair"), -1]]]


def test_image_support_can_read_the_first_word_again_on_each_image(monkeypatch):
    """`_image_support(read_first=True)` (benchmarks/image_choice.py): on each candidate image the first word is the
    word reader's there, and the phrase so written is what the checker must read."""
    model = small_model(*CHECK, "grounding.word_readout=true").eval()
    vocab = model.processor.tokenizer.convert_tokens_to_ids
    v = model.config.tokens.vocab_size
    red, blue, chair = vocab("sit"), vocab("lamp"), vocab("chair")  # words of the small vocabulary
    assert len({red, blue, chair, model.processor.tokenizer.unk_token_id}) == 4

    def read_first_words(masks, seg_images, features):  # image 1 shows a "sit" thing, image 0 a "lamp" one
        out = torch.zeros(masks.shape[0], v)
        out[seg_images == 1, red] = 10.0
        out[seg_images == 0, blue] = 10.0
        return out

    def check_phrases(masks, seg_images, features):  # "sit" and "chair" are read on image 1 only
        out = torch.full((masks.shape[0], v), -10.0)
        out[seg_images == 1, red] = 10.0
        out[seg_images == 1, chair] = 10.0
        out[seg_images == 0, blue] = 10.0
        return out

    monkeypatch.setattr(model, "read_first_words", read_first_words)
    monkeypatch.setattr(model, "check_phrases", check_phrases)
    size = model.config.vision.image_size
    features = model.encode_images(torch.rand(2, 3, size, size))
    prompts = torch.randn(1, model.seg_projector[-1].out_features)
    words = torch.tensor([[blue, chair]])  # the LLM says "lamp chair"
    candidates = torch.tensor([[0, 1]])
    read = model._image_support(prompts, words, candidates, features, read_first=True)
    checked = model._image_support(prompts, words, candidates, features, check_first=True)
    floor = math.log(SUPPORT_FLOOR)
    assert read[0, 1] > -0.01 and read[0, 0] == pytest.approx(floor)  # "sit chair" on image 1; no chair on 0
    assert checked[0, 0] == checked[0, 1] == pytest.approx(floor)  # "lamp chair" is shown on neither


def test_image_support_config_is_checked():
    with pytest.raises(PrimaError, match="image_support_weight must be >= 0"):
        load_model_config("tiny", [*CHECK, "grounding.image_choice=true", "grounding.image_support_weight=-1"])
    with pytest.raises(PrimaError, match="image_support_weight needs image_choice and phrase_check"):
        load_model_config("tiny", [*CHECK, "grounding.image_support_weight=1"])
