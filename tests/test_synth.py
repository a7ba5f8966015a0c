"""M4Seg-Synth: deterministic output, valid samples, parts inside objects, every family, show and stats."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from prima.cli import main
from prima.constants import SEG_RE
from prima.data.masks import decode_rle
from prima.data.schema import CATEGORIES, parse_answer, read_samples
from prima.data.show import render_sample
from prima.data.stats import dataset_stats, format_stats, segment_classes
from prima.data.synth import FAMILIES, generate_dataset, generate_sample, png_bytes
from prima.data.synth_questions import make_draft
from prima.data.synth_scene import ObjectSpec, render_scene
from prima.data.synth_shapes import CATEGORIES as OBJECT_CATEGORIES
from prima.errors import PrimaError

NUM, SIZE = 20, 128


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, num=NUM, seed=3, split="val", size=SIZE, workers=2, progress=False)
    return out


def _files(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_arguments_give_byte_identical_files_whatever_the_workers(dataset, tmp_path):
    generate_dataset(tmp_path, num=NUM, seed=3, split="val", size=SIZE, workers=1, progress=False)
    first, second = _files(dataset), _files(tmp_path)
    assert len(first) > NUM  # samples.jsonl and the images
    assert first == second


def test_every_sample_is_valid_and_its_masks_are_sound(dataset):
    samples = read_samples(dataset / "samples.jsonl")  # validates [SEG] count, tags, mask sizes, images
    assert [s.id for s in samples] == [f"synth-val-{i:06d}" for i in range(NUM)]
    for s in samples:
        assert 2 <= len(s.images) <= 5
        assert s.category in CATEGORIES and s.family in FAMILIES and s.source == "synth"
        assert FAMILIES[s.family].category == s.category
        grounded = parse_answer(s.answer)
        assert len(SEG_RE.findall(s.answer)) == len(s.segments) == len(grounded)
        for (phrase, tag), seg in zip(grounded, s.segments):
            assert (phrase, tag) == (seg.phrase, seg.image)
            mask = decode_rle(seg.mask)
            width, height = Image.open(dataset / s.images[seg.image - 1]).size
            assert mask.shape == (height, width) == (SIZE, SIZE)
            assert mask.sum() >= 10, f"{s.id}: {seg.phrase} is almost empty"
            assert seg.kind == ("part" if "'s " in seg.phrase else "object")


def test_parts_lie_inside_their_objects_and_objects_do_not_overlap():
    rng = np.random.default_rng(0)
    for category in OBJECT_CATEGORIES:
        specs = [ObjectSpec(category, "red", 1), ObjectSpec("mug", "blue", 2), ObjectSpec("lamp", "green", 3)]
        if category in ("mug", "lamp"):
            specs = specs[:1] + [ObjectSpec("car", "blue", 4)]
        scene = render_scene(rng, specs, SIZE)
        seen = np.zeros((SIZE, SIZE), bool)
        for obj in scene.objects:
            assert obj.mask.any()
            assert not (seen & obj.mask).any(), "visible masks of two objects overlap"
            seen |= obj.mask
            assert set(obj.parts) == set(OBJECT_CATEGORIES[obj.spec.category].named_parts)
            union = np.zeros_like(obj.mask)
            for name, part in obj.parts.items():
                assert part.any(), f"{category}: part {name} is not visible"
                assert not (part & ~obj.mask).any(), f"{obj.spec.category}'s {name} leaks outside the object"
                assert not (union & part).any(), "two parts share pixels"
                union |= part
        # the picture shows the objects: object pixels differ from a plain background somewhere
        assert len(np.unique(scene.image.reshape(-1, 3), axis=0)) > 10


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_writes_grounded_answers(family, monkeypatch):
    rng = np.random.default_rng(7)
    n = max(3, FAMILIES[family].min_images)
    import prima.data.synth_questions as q

    monkeypatch.setattr(q, "FAMILIES", {family: FAMILIES[family]})
    segments = 0
    for _ in range(4):
        draft = make_draft(rng, n, 96)
        assert draft.family == family and draft.category == FAMILIES[family].category
        assert len(draft.scenes) == n and draft.question.endswith(("?", "."))
        grounded = parse_answer(draft.answer)
        assert [(p, i) for p, i in grounded] == [(s.phrase, s.image) for s in draft.segments]
        assert all(1 <= s.image <= n for s in draft.segments)
        segments += len(draft.segments)
    assert segments > 0  # every family grounds something at least sometimes


def test_dataset_has_all_categories_negatives_objects_and_parts():
    samples = [generate_sample(11, "train", i, size=64)[0] for i in range(60)]
    assert {s.category for s in samples} == set(CATEGORIES)
    assert any(not s.segments for s in samples), "no negative (answer without [SEG])"
    kinds = {seg.kind for s in samples for seg in s.segments}
    assert kinds == {"object", "part"}
    cross = [s for s in samples if FAMILIES[s.family].cross_image]
    assert len(cross) >= len(samples) // 3


def test_splits_and_seeds_never_share_scenes():
    def scene_hashes(seed, split, count):
        return {
            hashlib.sha256(image.tobytes()).hexdigest()
            for i in range(count)
            for image in generate_sample(seed, split, i, size=64)[1]
        }

    train = scene_hashes(0, "train", 12)
    assert not train & scene_hashes(0, "test", 6)
    assert not train & scene_hashes(0, "val", 6)
    assert not train & scene_hashes(1, "train", 6)


def test_png_writer_is_lossless():
    pixels = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    path_bytes = png_bytes(pixels)
    import io

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(path_bytes)).convert("RGB")), pixels)


def test_show_draws_images_text_and_legend(dataset, tmp_path):
    out = tmp_path / "one.png"
    picture = render_sample(dataset, index=1, out=out)
    sample = read_samples(dataset / "samples.jsonl")[1]
    assert out.is_file()
    assert picture.width >= 256 * len(sample.images)  # 128 px images are shown enlarged side by side
    assert picture.height > 256 + 60  # room for the question, the answer and the legend
    with pytest.raises(PrimaError, match="fewer than"):
        render_sample(dataset, index=NUM)


def test_stats_count_what_the_file_holds(dataset):
    stats = dataset_stats(dataset)
    samples = read_samples(dataset / "samples.jsonl", check_images=False)
    assert stats["samples"] == NUM
    assert stats["segments"] == sum(len(s.segments) for s in samples)
    assert sum(stats["per_category"].values()) == NUM
    assert sum(stats["per_num_images"].values()) == NUM
    assert stats["no_mask_samples"] == sum(not s.segments for s in samples)
    assert sum(stats["object_classes"].values()) + sum(stats["part_classes"].values()) == stats["segments"]
    assert set(stats["object_classes"]) <= set(OBJECT_CATEGORIES)
    areas = stats["median_mask_area_px"]
    assert set(areas) == set(stats["object_classes"]) | set(stats["part_classes"])
    assert all(0 < a <= SIZE * SIZE for a in areas.values())
    assert list(areas.values()) == sorted(areas.values())
    assert "per_category" not in format_stats(stats) and "category" in format_stats(stats)


def test_segment_classes_drop_colour_words():
    assert segment_classes("red mug's handle", "part") == ("mug", "mug's handle")
    assert segment_classes("red mug", "object") == ("mug", None)
    assert segment_classes("dining table", "object") == ("dining table", None)


def test_cli_synth_show_stats(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "synth", "--out", str(out), "--num", "3", "--size", "64", "--workers", "1"]) == 0
    assert len(read_samples(out / "samples.jsonl")) == 3
    assert main(["data", "show", str(out), "--index", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    capsys.readouterr()
    assert main(["data", "stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--min-images", "4", "--max-images", "2"], "--min-images"),
        (["--size", "16"], "--size"),
        (["--num", "-1"], "--num"),
        (["--families", "describe,nope"], "unknown family 'nope'"),
        (["--families", "odd-one-out", "--max-images", "2"], "pass --min-images 3 --max-images 3"),
        (["--families", "odd-one-out,odd-part"], "none takes fewer than 3 images, but --min-images is 2"),
    ],
)
def test_cli_synth_rejects_bad_arguments(tmp_path, capsys, argv, message):
    assert main(["data", "synth", "--out", str(tmp_path), "--num", "1", *argv]) == 2
    assert message in capsys.readouterr().err


def test_later_mention_has_no_seg_and_no_mask():
    from prima.data.synth_questions import odd_one_out

    draft = odd_one_out(np.random.default_rng(1), 3, 96)
    assert draft.answer.count("<p>") == 2 and draft.answer.count("[SEG]") == 1 == len(draft.segments)
    ((phrase, image),) = parse_answer(draft.answer)
    assert f"<p> {phrase} </p> (IMAGE{image})" in draft.answer  # mentioned again, same phrase and image


def test_occlusion_is_partial_every_object_and_part_stays_mostly_visible():
    from prima.data.synth_scene import MIN_VISIBLE_OBJECT, MIN_VISIBLE_PART
    from prima.data.synth_shapes import draw_object

    rng = np.random.default_rng(5)
    names = list(OBJECT_CATEGORIES)
    occluded = 0
    for trial in range(12):  # crowded scenes: four objects each
        specs = [ObjectSpec(names[(trial + 3 * i) % len(names)], "red", 100 * trial + i) for i in range(4)]
        for obj in render_scene(rng, specs, SIZE).objects:
            category = OBJECT_CATEGORIES[obj.spec.category]
            x0, y0, x1, y1 = obj.box
            full = draw_object(category, obj.spec.style, y1 - y0, False)  # unoccluded; area ignores mirroring
            assert obj.mask.sum() >= MIN_VISIBLE_OBJECT * (full > 0).sum()
            occluded += obj.mask.sum() < (full > 0).sum()
            for name, part in obj.parts.items():
                assert part.sum() >= MIN_VISIBLE_PART * (full == category.part_id(name)).sum()
    assert occluded > 0  # the scenes did overlap, so the rule was exercised


def test_describe_names_every_object_of_one_image_left_to_right():
    from prima.data.synth_questions import AUXILIARY_FAMILIES, centre_x, describe

    assert "describe" not in FAMILIES and "describe" in AUXILIARY_FAMILIES  # never in the test mix
    for seed in range(4):
        draft = describe(np.random.default_rng(seed), 3, 96)
        k = int(draft.question.split("image ")[1].split(",")[0])
        objects = sorted(draft.scenes[k - 1].objects, key=centre_x)
        assert [(s.phrase, s.image) for s in draft.segments] == [(o.spec.phrase, k) for o in objects]
        assert [(p, i) for p, i in parse_answer(draft.answer)] == [(o.spec.phrase, k) for o in objects]
        assert all(s.kind == "object" for s in draft.segments) and draft.answer.startswith(f"Image {k} shows the")


def test_families_option_draws_only_the_named_families_and_leaves_the_default_mix_alone():
    default, _ = generate_sample(0, "train", 5, size=96)
    assert generate_sample(0, "train", 5, size=96, families=list(FAMILIES))[0] == default
    only, _ = generate_sample(0, "train", 5, size=96, families=["describe"])
    assert only.family == "describe" and only.category == "open-ended"
    with pytest.raises(PrimaError, match="none of the families"):
        make_draft(np.random.default_rng(0), 1, 96, ["odd-one-out"])
