"""Tests for mars/shapes.py: generator, renderer, captions, parser and scorer (shared/shapes-world.md)."""

import itertools
import json
from collections import deque

import numpy as np
import pytest
from PIL import Image

from mars import shapes
from mars.shapes import (CATEGORIES, COLORS, LANGS, PALETTE, SHAPES, PromptSpec, Scene, ShapeObject,
                         classify_pixels, describe_scene, detect_objects, drawing_order, format_prompt,
                         label_components, parse_prompt, random_scene, random_spec, render, sample_example,
                         scene_for_prompt, scene_prompts, score, summarize)


def test_same_seed_same_examples_and_pixels():
    first = [sample_example(np.random.default_rng([7, i])) for i in range(20)]
    again = [sample_example(np.random.default_rng([7, i])) for i in range(20)]
    other = [sample_example(np.random.default_rng([8, i])) for i in range(20)]
    assert first == again
    assert first != other
    a, b = render(first[0].scene, 128), render(again[0].scene, 128)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_scenes_keep_the_spec_geometry():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_scene(rng)
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            assert shapes.MIN_SIZE <= obj.size <= shapes.MAX_SIZE
            assert 0 <= obj.x and obj.x + obj.size <= 1 and 0 <= obj.y and obj.y + obj.size <= 1
        for a, b in itertools.combinations(scene.objects, 2):
            x_gap = max(a.x - b.x - b.size, b.x - a.x - a.size)
            y_gap = max(a.y - b.y - b.size, b.y - a.y - a.size)
            assert max(x_gap, y_gap) >= shapes.MIN_GAP
            assert shapes.relation(a.cx, a.cy, b.cx, b.cy, 1.0) is not None


def test_layout_is_the_same_at_every_size():
    scene = sample_example(np.random.default_rng(3), "color_attr").scene
    centres = {}
    for size in (64, 128, 256):
        found = sorted(detect_objects(render(scene, size)), key=lambda o: o.color)
        centres[size] = np.array([(o.cx / size, o.cy / size) for o in found])
    assert np.abs(centres[64] - centres[256]).max() <= 1 / 64
    assert np.abs(centres[128] - centres[256]).max() <= 1 / 128


def test_rendered_pixels_read_only_as_their_objects_colour():
    # anti-aliased edges must never read as another palette colour (the edge look-up table's job)
    rng = np.random.default_rng(1)
    for size in (64, 256):
        for _ in range(20):
            scene = random_scene(rng)
            read = set(np.unique(classify_pixels(np.asarray(render(scene, size)))).tolist())
            assert read <= {-1} | {COLORS.index(o.color) for o in scene.objects}


@pytest.mark.parametrize("size", [64, 128, 256])
def test_scorer_is_exact_on_generated_images(size):
    verdicts = []
    for category, lang in itertools.product(CATEGORIES, LANGS):
        for i in range(6):
            example = sample_example(np.random.default_rng([size, i]), category, lang)
            verdicts.append(score(example.prompt, render(example.scene, size)))
    summary = summarize(verdicts)
    assert summary["overall"] == 1.0 and summary["overall_strict"] == 1.0
    assert {c: (v["accuracy"], v["strict"], v["n"]) for c, v in summary["categories"].items()} == {
        c: (1.0, 1.0, 12) for c in CATEGORIES}
    assert {v.lang for v in verdicts} == set(LANGS)


def reversed_pair(spec: PromptSpec) -> PromptSpec:
    return PromptSpec(spec.category, spec.shapes[::-1], spec.colors[::-1], spec.count, spec.relation)


def test_every_scene_prompt_passes_strictly_and_the_drawn_prompt_is_among_them():
    rng = np.random.default_rng(5)
    seen = {category: 0 for category in CATEGORIES}
    for category in CATEGORIES * 4:
        example = sample_example(rng, category)
        prompts = scene_prompts(example.scene)
        if category in ("two_object", "color_attr"):  # named in drawing order, whichever order it was drawn for
            assert (example.spec in prompts) != (reversed_pair(example.spec) in prompts)
        else:
            assert example.spec in prompts
        for scene in (example.scene, random_scene(rng)):
            image = render(scene, 128)
            for spec in scene_prompts(scene):
                seen[spec.category] += 1
                for lang in LANGS:
                    verdict = score(format_prompt(spec, lang), image)
                    assert verdict.passed and verdict.strict, (spec, lang)
    assert min(seen["position"], seen["color_attr"]) > 4 * 2


def test_pairs_are_named_in_drawing_order_positions_both_ways():
    circle = ShapeObject("circle", "red", 0.6, 0.1, 0.2)  # top edge in code row 0 of 8
    square = ShapeObject("square", "blue", 0.1, 0.3, 0.2)  # code row 2, further left
    expected = {"a circle and a square", "a red circle and a blue square",
                "a circle to the right of a square", "a square to the left of a circle"}
    for objects in ((circle, square), (square, circle)):
        assert {format_prompt(spec, "en") for spec in scene_prompts(Scene(objects))} == expected
    # tops in one code row: left to right
    level = ShapeObject("square", "blue", 0.1, 0.11, 0.2)
    assert drawing_order([circle, level]) == [level, circle]
    assert [spec for spec in scene_prompts(Scene((circle, level))) if spec.category == "color_attr"] == [
        PromptSpec("color_attr", ("square", "circle"), ("blue", "red"))]


@pytest.mark.parametrize("size", [64, 128])
def test_every_shape_colour_and_pixel_size_is_detected(size):
    for shape, color in itertools.product(SHAPES, COLORS):
        for side in range(round(shapes.MIN_SIZE * size), round(shapes.MAX_SIZE * size) + 1):
            scene = Scene((ShapeObject(shape, color, 0.3, 0.3, side / size),))
            (found,) = detect_objects(render(scene, size))
            assert (found.shape, found.color) == (shape, color), (side, found)


def test_prompt_phrasings_in_both_languages():
    cases = [
        (PromptSpec("single_object", ("circle",)), "a circle", "一个圆形"),
        (PromptSpec("two_object", ("square", "triangle")), "a square and a triangle", "一个正方形和一个三角形"),
        (PromptSpec("counting", ("triangle",), count=2), "two triangles", "两个三角形"),
        (PromptSpec("counting", ("circle",), count=4), "four circles", "四个圆形"),
        (PromptSpec("colors", ("circle",), ("orange",)), "an orange circle", "一个橙色的圆形"),
        (PromptSpec("position", ("circle", "square"), relation="left"),
         "a circle to the left of a square", "一个圆形在一个正方形的左边"),
        (PromptSpec("position", ("triangle", "circle"), relation="below"),
         "a triangle below a circle", "一个三角形在一个圆形的下方"),
        (PromptSpec("color_attr", ("square", "circle"), ("cyan", "black")),
         "a cyan square and a black circle", "一个青色的正方形和一个黑色的圆形"),
    ]
    for spec, english, chinese in cases:
        assert format_prompt(spec, "en") == english
        assert format_prompt(spec, "zh") == chinese
        assert parse_prompt(english) == (spec, "en")
        assert parse_prompt(chinese) == (spec, "zh")


def test_parse_inverts_format_for_random_prompts():
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = random_spec(rng, str(rng.choice(CATEGORIES)))
        for lang in LANGS:
            assert parse_prompt(format_prompt(spec, lang)) == (spec, lang)
    assert parse_prompt("  An Orange   circle. ") == (PromptSpec("colors", ("circle",), ("orange",)), "en")


@pytest.mark.parametrize("bad", ["", "a pentagon", "five circles", "a circle and a circle", "a pink square",
                                 "一个圆形和", "a circle near a square", "一个圆形在一个正方形的旁边"])
def test_unparseable_prompts_raise_a_clear_error(bad):
    with pytest.raises(ValueError, match="cannot parse prompt"):
        parse_prompt(bad)
    with pytest.raises(ValueError, match="cannot parse prompt"):
        score(bad, Image.new("RGB", (64, 64), "white"))


def test_scene_descriptions_name_every_object_and_pair():
    scene = Scene((ShapeObject("circle", "red", 0.05, 0.05, 0.2),
                   ShapeObject("square", "blue", 0.6, 0.1, 0.2),
                   ShapeObject("triangle", "orange", 0.1, 0.45, 0.25)))
    assert describe_scene(scene, "en") == (
        "a red circle, a blue square and an orange triangle. "
        "the red circle is to the left of the blue square. "
        "the red circle is above the orange triangle. "
        "the blue square is to the right of the orange triangle")
    assert describe_scene(scene, "zh") == (
        "一个红色的圆形、一个蓝色的正方形和一个橙色的三角形。"
        "红色的圆形在蓝色的正方形的左边。红色的圆形在橙色的三角形的上方。蓝色的正方形在橙色的三角形的右边")


def _scene(*objects) -> Image.Image:
    return render(Scene(tuple(ShapeObject(*o) for o in objects)), 128)


def test_scorer_rejects_sensible_negatives():
    red_circle = _scene(("circle", "red", 0.3, 0.3, 0.25))
    assert score("a red circle", red_circle).strict
    assert not score("a blue circle", red_circle).passed                      # wrong colour
    assert not score("a square", red_circle).passed                           # wrong shape
    three = _scene(("circle", "red", 0.05, 0.05, 0.2), ("circle", "blue", 0.6, 0.1, 0.2),
                   ("circle", "green", 0.3, 0.6, 0.2))
    assert score("three circles", three).strict
    assert not score("two circles", three).passed                             # counting is exact
    assert not score("四个圆形", three).passed
    left = _scene(("circle", "red", 0.05, 0.4, 0.2), ("square", "blue", 0.6, 0.4, 0.2))
    assert score("a circle to the left of a square", left).strict
    assert not score("a circle to the right of a square", left).passed        # swapped relation
    assert not score("一个圆形在一个正方形的右边", left).passed
    assert not score("a circle above a square", left).passed
    assert score("a red circle and a blue square", left).strict
    assert not score("a blue circle and a red square", left).passed          # swapped attributes
    assert not score("a circle and a triangle", left).passed                  # missing object


def test_extra_and_unknown_objects_fail_strict_only():
    busy = _scene(("circle", "red", 0.05, 0.05, 0.2), ("square", "blue", 0.6, 0.1, 0.2))
    verdict = score("a red circle", busy)
    assert verdict.passed and not verdict.strict and verdict.category == "colors"
    pixels = np.asarray(_scene(("circle", "red", 0.05, 0.05, 0.2))).copy()
    pixels[100:110, 20:110] = PALETTE["green"]  # a 90 x 10 bar: aspect 9, an unknown object
    pixels[60:63, 60:63] = PALETTE["blue"]      # 9 px < 0.004 S^2 = 65.5 px: not an object
    found = detect_objects(pixels)
    assert sorted((o.shape, o.color, o.area) for o in found)[1] == ("unknown", "green", 900)
    assert len(found) == 2
    assert score("a circle", Image.fromarray(pixels)).passed
    assert not score("a circle", Image.fromarray(pixels)).strict
    assert not score("a green square", Image.fromarray(pixels)).passed


def test_pixel_colour_rule():
    rgb = np.array([*PALETTE.values(), (255, 255, 255), (220, 40, 40 + 91), (220, 40, 40 + 89)])
    assert classify_pixels(rgb).tolist() == list(range(len(COLORS))) + [-1, -1, 0]


def _bfs_components(classes):
    h, w = classes.shape
    seen, found = np.zeros_like(classes, dtype=bool), []
    for y, x in zip(*np.nonzero(classes >= 0)):
        if seen[y, x]:
            continue
        queue, pixels = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny, nx in itertools.product((cy - 1, cy, cy + 1), (cx - 1, cx, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and classes[ny, nx] == classes[y, x]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = zip(*pixels)
        found.append((int(classes[y, x]), len(pixels), (min(xs), min(ys), max(xs) + 1, max(ys) + 1)))
    return sorted(found)


def test_labeller_matches_breadth_first_search():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.45, 0.7):
        classes = np.where(rng.random((40, 33)) < density, rng.integers(0, 3, (40, 33)), -1).astype(np.int8)
        assert sorted(label_components(classes)) == _bfs_components(classes)
    assert label_components(np.full((5, 5), -1, dtype=np.int8)) == []


def test_summary_averages_categories_not_images():
    blank = Image.new("RGB", (64, 64), "white")
    circle = render(scene_for_prompt("a circle"), 64)
    verdicts = [score("a circle", circle), score("a circle", blank), score("a circle", blank),
                score("two circles", render(scene_for_prompt("two circles"), 64))]
    summary = summarize(verdicts)
    assert summary["categories"]["single_object"] == {"n": 3, "accuracy": 1 / 3, "strict": 1 / 3}
    assert summary["overall"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["missing_categories"] == ["two_object", "colors", "position", "color_attr"]
    with pytest.raises(ValueError, match="no verdicts"):
        summarize([])


def test_cli_writes_images_and_bilingual_captions(tmp_path):
    shapes.main(["--n", "12", "--size", "64", "--seed", "3", "--out", str(tmp_path)])
    lines = (tmp_path / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["file"] for r in records] == [f"{i:06d}.png" for i in range(12)]
    assert {(r["category"], r["lang"]) for r in records} == set(itertools.product(CATEGORIES, LANGS))
    assert any("个" in line for line in lines)  # written as UTF-8, not \\u escapes
    for record in records:
        image = Image.open(tmp_path / record["file"])
        assert image.size == (64, 64)
        verdict = score(record["caption"], image)
        assert verdict.strict and (verdict.category, verdict.lang) == (record["category"], record["lang"])
