"""The shapes world: a seeded scene generator, renderer, bilingual captions and the scorer.

The shapes world (v1): up to four flat-coloured circles, squares and triangles on white, six
GenEval-style prompt categories in English and Chinese (the grammar is _PATTERNS below), and a
pixel-rule scorer that decides whether an image satisfies a prompt (plain and strict).

    from mars.shapes import sample_example, render, score
    ex = sample_example(np.random.default_rng(0), category="position", lang="zh")
    score(ex.prompt, render(ex.scene, 256)).strict   # True

Write a captioned evaluation folder (DIR/000000.png ..., DIR/captions.jsonl):
    python -m mars.shapes --n 64 --size 256 --seed 0 --out DIR
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mars.cli import (NON_NEGATIVE_INT, POSITIVE_INT, OneLineParser, check_image_folder, int_range,
                      one_line_errors, write_image_folder)
from mars.images import flatten_on_white

SHAPES = ("circle", "square", "triangle")
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30),
    "purple": (140, 60, 180), "orange": (245, 130, 30), "black": (30, 30, 30), "cyan": (30, 190, 200),
}
COLORS = tuple(PALETTE)
COLORS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色",
             "purple": "紫色", "orange": "橙色", "black": "黑色", "cyan": "青色"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
LANGS = ("en", "zh")
RELATIONS_EN = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
RELATIONS_ZH = {"left": "左边", "right": "右边", "above": "上方", "below": "下方"}
NUMBERS_EN = {2: "two", 3: "three", 4: "four"}
NUMBERS_ZH = {2: "两", 3: "三", 4: "四"}

MIN_SIZE, MAX_SIZE = 0.18, 0.30  # object side, fraction of S
MIN_GAP = 0.04                   # between bounding boxes, fraction of S
RELATION_OFFSET = 0.05           # centre offset a relation needs, fraction of S
# Generated scenes keep every pair this far from the |dx| = |dy| diagonal, so that the pixel-level
# centres the scorer measures (off by up to ~1 px after anti-aliasing) give the same relation at S >= 64.
RELATION_MARGIN = 0.04
MAX_COLOR_DISTANCE = 90
MIN_AREA = 0.004                 # object area, fraction of S^2

_REFS = np.array([*PALETTE.values(), (255, 255, 255)], dtype=np.int32)  # (9, 3), white last


# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class ShapeObject:
    """One object; position and size are fractions of the canvas side, so any S renders the same layout."""
    shape: str
    color: str
    x: float     # left edge of the bounding box
    y: float     # top edge
    size: float  # bounding-box side

    @property
    def cx(self) -> float:
        return self.x + self.size / 2

    @property
    def cy(self) -> float:
        return self.y + self.size / 2


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]


def relation(ax: float, ay: float, bx: float, by: float, side: float) -> str | None:
    """Where centre A lies relative to centre B ("left", "right", "above", "below" or None); side is S in the same units."""
    dx, dy = bx - ax, by - ay  # positive when A is left of / above B
    offset = RELATION_OFFSET * side
    if abs(dx) >= abs(dy):
        return "left" if dx > offset else "right" if -dx > offset else None
    return "above" if dy > offset else "below" if -dy > offset else None


def _fits(new: ShapeObject, placed: list[ShapeObject]) -> bool:
    for old in placed:
        x_gap = max(old.x - (new.x + new.size), new.x - (old.x + old.size))
        y_gap = max(old.y - (new.y + new.size), new.y - (old.y + old.size))
        if max(x_gap, y_gap) < MIN_GAP:
            return False
        if abs(abs(new.cx - old.cx) - abs(new.cy - old.cy)) < RELATION_MARGIN:
            return False
    return True


def place_objects(rng: np.random.Generator, shapes: list[str], colors: list[str | None]) -> Scene:
    """Random non-overlapping layout for the given shapes; a None colour is drawn at random, keeping
    (colour, shape) pairs unique so scene descriptions can say "the red circle" unambiguously."""
    colors = list(colors)
    for i, (shape, color) in enumerate(zip(shapes, colors)):
        if color is None:
            taken = {c for s, c in zip(shapes, colors) if s == shape and c is not None}
            colors[i] = str(rng.choice([c for c in COLORS if c not in taken]))
    for _ in range(200):
        placed: list[ShapeObject] = []
        for shape, color in zip(shapes, colors):
            for _ in range(100):
                size = rng.uniform(MIN_SIZE, MAX_SIZE)
                x, y = rng.uniform(0.0, 1.0 - size, size=2)
                candidate = ShapeObject(shape, color, float(x), float(y), float(size))
                if _fits(candidate, placed):
                    placed.append(candidate)
                    break
            else:
                break  # crowded: start the whole layout again
        else:
            return Scene(tuple(placed))
    raise RuntimeError(f"could not place {len(shapes)} objects after 200 layouts")


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A free scene of 1-4 objects (for full scene descriptions)."""
    n = int(rng.integers(1, 5)) if n_objects is None else n_objects
    return place_objects(rng, [str(s) for s in rng.choice(SHAPES, size=n)], [None] * n)


# ----------------------------------------------------------------------------- rendering

def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) palette index (order of COLORS), -1 where white or no colour is within 90."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)  # (N, 3); integer values, exact in float32
    # |p - r|^2 = |p|^2 - 2 p.r + |r|^2: one matrix product instead of an (N, 9, 3) difference.
    d2 = (pixels**2).sum(1, keepdims=True) - 2 * pixels @ _REFS.T.astype(np.float32) + (_REFS**2).sum(1)
    nearest = d2.argmin(1)  # (N,)
    near_enough = d2[np.arange(len(nearest)), nearest] <= MAX_COLOR_DISTANCE**2
    return np.where((nearest < len(COLORS)) & near_enough, nearest, -1).astype(np.int8).reshape(rgb.shape[:-1])


def _edge_colour_lut() -> np.ndarray:
    """(colours, 256 coverage levels, 3) uint8: the RGB a pixel gets at each coverage.

    The scorer must see the same geometry for every colour, so a pixel at least half covered reads
    as its colour and a less covered one as background. A plain blend with white breaks that: the
    90 radius cuts dark colours at ~75 % coverage, and some blends land nearer another palette
    colour (red at 30 % reads as orange, black at 55 % as purple). Such coverages move to the
    nearest level that reads right: up to one that reads as the colour, down to one that reads as none."""
    coverage = np.arange(256)
    lut = np.empty((len(COLORS), 256, 3), dtype=np.uint8)
    for index, rgb in enumerate(PALETTE.values()):
        blend = np.rint(255 - (255 - np.array(rgb)) * coverage[:, None] / 255)  # (256, 3)
        reads_as = classify_pixels(blend)
        own, none = np.flatnonzero(reads_as == index), np.flatnonzero(reads_as == -1)
        up = own[np.searchsorted(own, coverage)[128:]]                   # smallest own level >= a
        down = none[np.searchsorted(none, coverage, side="right")[:128] - 1]  # largest none level <= a
        lut[index] = blend[np.concatenate([down, up])]
    return lut


_EDGE_LUT = _edge_colour_lut()


def render(scene: Scene, size: int, supersample: int = 4) -> Image.Image:
    """Draw the scene on a white size x size canvas, anti-aliased by supersampled coverage.

    Boxes snap to whole pixels (layout moves < 0.5 px): at S = 64 a circle is only 12-19 px wide,
    and sub-pixel offsets would push its measured fill ratio out of the scorer's circle band."""
    big = size * supersample
    coverage = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(coverage)
    colour_index = np.zeros((size, size), dtype=np.intp)
    for obj in scene.objects:
        side = round(obj.size * size)
        left, top = min(round(obj.x * size), size - side), min(round(obj.y * size), size - side)
        colour_index[top:top + side, left:left + side] = COLORS.index(obj.color)
        x0, y0 = left * supersample, top * supersample
        x1, y1 = x0 + side * supersample - 1, y0 + side * supersample - 1  # inclusive, as PIL draws
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=255)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=255)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=255)
    alpha = np.asarray(coverage.reduce(supersample))  # (S, S) mean coverage 0..255
    rgb = _EDGE_LUT.reshape(-1, 3).take(colour_index * 256 + alpha, axis=0)  # (S, S, 3)
    return Image.fromarray(rgb, "RGB")


# ----------------------------------------------------------------------------- prompts and captions

@dataclass(frozen=True)
class PromptSpec:
    """What a category prompt asks for; format_prompt and parse_prompt convert it to and from text."""
    category: str
    shapes: tuple[str, ...]
    colors: tuple[str, ...] = ()   # colors, color_attr: one per shape
    count: int = 1                 # counting: n
    relation: str | None = None    # position: where shapes[0] lies relative to shapes[1]

    @property
    def expected_objects(self) -> int:
        return self.count if self.category == "counting" else len(self.shapes)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _noun(shape: str, color: str | None, lang: str) -> str:
    if lang == "en":
        return _a(f"{color} {shape}" if color else shape)
    return "一个" + (f"{COLORS_ZH[color]}的" if color else "") + SHAPES_ZH[shape]


def _relate(first: str, relation_name: str, second: str, lang: str, verb: str = "") -> str:
    if lang == "en":
        return f"{first} {verb}{RELATIONS_EN[relation_name]} {second}"
    return f"{first}在{second}的{RELATIONS_ZH[relation_name]}"


def format_prompt(spec: PromptSpec, lang: str) -> str:
    """The evaluation phrasing of a prompt, exactly as the spec's category table writes it."""
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    if spec.category == "counting":
        s = spec.shapes[0]
        return f"{NUMBERS_EN[spec.count]} {s}s" if lang == "en" else f"{NUMBERS_ZH[spec.count]}个{SHAPES_ZH[s]}"
    colors = spec.colors or (None,) * len(spec.shapes)
    nouns = [_noun(s, c, lang) for s, c in zip(spec.shapes, colors)]
    if spec.category == "position":
        return _relate(nouns[0], spec.relation, nouns[1], lang)
    return (" and " if lang == "en" else "和").join(nouns)


def describe_scene(scene: Scene, lang: str) -> str:
    """Every object with its colour, then the relation of every pair (all scene pairs have one):
    "a red circle and a blue square. the red circle is to the left of the blue square"."""
    comma, last, stop = (", ", " and ", ". ") if lang == "en" else ("、", "和", "。")
    names = [_noun(o.shape, o.color, lang) for o in scene.objects]
    sentences = [names[0] if len(names) == 1 else comma.join(names[:-1]) + last + names[-1]]
    for a, b in itertools.combinations(scene.objects, 2):
        the_a, the_b = (f"the {o.color} {o.shape}" if lang == "en" else f"{COLORS_ZH[o.color]}的{SHAPES_ZH[o.shape]}"
                        for o in (a, b))
        sentences.append(_relate(the_a, relation(a.cx, a.cy, b.cx, b.cy, 1.0), the_b, lang, verb="is "))
    return stop.join(sentences)


def random_spec(rng: np.random.Generator, category: str) -> PromptSpec:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; use one of {CATEGORIES}")
    two_shapes = tuple(str(s) for s in rng.choice(SHAPES, size=2, replace=False))
    two_colors = tuple(str(c) for c in rng.choice(COLORS, size=2, replace=False))
    if category == "single_object":
        return PromptSpec(category, two_shapes[:1])
    if category == "two_object":
        return PromptSpec(category, two_shapes)
    if category == "counting":
        return PromptSpec(category, two_shapes[:1], count=int(rng.integers(2, 5)))
    if category == "colors":
        return PromptSpec(category, two_shapes[:1], two_colors[:1])
    if category == "position":
        return PromptSpec(category, two_shapes, relation=str(rng.choice(list(RELATIONS_EN))))
    return PromptSpec(category, two_shapes, two_colors)


def scene_for_spec(rng: np.random.Generator, spec: PromptSpec) -> Scene:
    """A scene holding exactly the objects the prompt names, satisfying it."""
    shapes = list(spec.shapes) * spec.count if spec.category == "counting" else list(spec.shapes)
    colors = list(spec.colors) if spec.colors else [None] * len(shapes)
    while True:
        scene = place_objects(rng, shapes, colors)
        a, b = scene.objects[0], scene.objects[-1]
        if spec.relation is None or relation(a.cx, a.cy, b.cx, b.cy, 1.0) == spec.relation:
            return scene


def drawing_order(objects, rows: int = 8) -> list:
    """Objects in the order a raster-scan image model starts drawing them: by the code row their top
    edge falls in (`rows` code rows, the base grid's), then left to right by centre."""
    return sorted(objects, key=lambda o: (int(o.y * rows), o.cx))


def scene_prompts(scene: Scene) -> list[PromptSpec]:
    """Every category prompt that `scene` passes strictly: a scene drawn for "a red circle and a blue
    square" is also "a circle and a square", "a circle above a square", "a square below a circle", ...
    so position and colour binding see three times as many scenes for the same rendering.

    A pair without a relation word (two_object, color_attr) is named in drawing order only, the object
    a raster-scan model draws first named first: a prompt then tells the model which object to start
    with, where naming both orders left it to guess, and it swapped and blended colours (a red circle
    and a blue square came out purple). Position prompts name both orders; the relation word orders them."""
    objects = scene.objects
    shapes = {o.shape for o in objects}
    if len(objects) == 1:
        (o,) = objects
        return [PromptSpec("single_object", (o.shape,)), PromptSpec("colors", (o.shape,), (o.color,))]
    specs = []
    if len(shapes) == 1 and len(objects) in NUMBERS_EN:
        specs.append(PromptSpec("counting", (objects[0].shape,), count=len(objects)))
    if len(objects) == 2 and len(shapes) == 2:
        first, second = drawing_order(objects)
        specs.append(PromptSpec("two_object", (first.shape, second.shape)))
        if first.color != second.color:
            specs.append(PromptSpec("color_attr", (first.shape, second.shape), (first.color, second.color)))
        for a, b in (objects, objects[::-1]):
            where = relation(a.cx, a.cy, b.cx, b.cy, 1.0)
            if where is not None:
                specs.append(PromptSpec("position", (a.shape, b.shape), relation=where))
    return specs


@dataclass(frozen=True)
class Example:
    scene: Scene
    prompt: str
    category: str
    lang: str
    spec: PromptSpec


def sample_example(rng: np.random.Generator, category: str | None = None, lang: str | None = None) -> Example:
    """A category prompt (random category/lang unless given) and a scene that passes it strictly."""
    category = str(rng.choice(CATEGORIES)) if category is None else category
    lang = str(rng.choice(LANGS)) if lang is None else lang
    spec = random_spec(rng, category)
    prompt = format_prompt(spec, lang)
    return Example(scene_for_spec(rng, spec), prompt, category, lang, spec)


def scene_for_prompt(prompt: str, seed: int = 0) -> Scene:
    """A scene that passes `prompt` strictly (handy for demos and tests)."""
    return scene_for_spec(np.random.default_rng(seed), parse_prompt(prompt)[0])


# ----------------------------------------------------------------------------- parsing

def _alt(words) -> str:
    return "(" + "|".join(re.escape(w) for w in words) + ")"


_S, _C = _alt(SHAPES), _alt(COLORS)
_SZ, _CZ = _alt(SHAPES_ZH.values()), _alt(COLORS_ZH.values())
_PATTERNS = {  # category -> (English regex, Chinese regex); colours come before shapes in groups
    "single_object": (rf"an? {_S}", rf"一个{_SZ}"),
    "two_object": (rf"an? {_S} and an? {_S}", rf"一个{_SZ}和一个{_SZ}"),
    "counting": (rf"{_alt(NUMBERS_EN.values())} {_S}s", rf"{_alt(NUMBERS_ZH.values())}个{_SZ}"),
    "colors": (rf"an? {_C} {_S}", rf"一个{_CZ}的{_SZ}"),
    "position": (rf"an? {_S} {_alt(RELATIONS_EN.values())} an? {_S}",
                 rf"一个{_SZ}在一个{_SZ}的{_alt(RELATIONS_ZH.values())}"),
    "color_attr": (rf"an? {_C} {_S} and an? {_C} {_S}", rf"一个{_CZ}的{_SZ}和一个{_CZ}的{_SZ}"),
}
_FROM_ZH = {v: k for table in (SHAPES_ZH, COLORS_ZH, RELATIONS_ZH) for k, v in table.items()}
_FROM_ZH |= {v: str(k) for k, v in NUMBERS_ZH.items()}
_FROM_EN = {v: k for k, v in RELATIONS_EN.items()} | {v: str(k) for k, v in NUMBERS_EN.items()}


def parse_prompt(prompt: str) -> tuple[PromptSpec, str]:
    """Category prompt in English or Chinese -> (PromptSpec, lang). ValueError if it is none of the six."""
    text = " ".join(prompt.strip().rstrip(".。").split()).lower()
    for category, patterns in _PATTERNS.items():
        for lang, pattern in zip(LANGS, patterns):
            match = re.fullmatch(pattern, text)
            if match is None:
                continue
            words = [(_FROM_ZH if lang == "zh" else _FROM_EN).get(g, g) for g in match.groups()]
            if category == "counting":
                return PromptSpec(category, (words[1],), count=int(words[0])), lang
            if category == "position":
                if lang == "en":
                    return PromptSpec(category, (words[0], words[2]), relation=words[1]), lang
                return PromptSpec(category, (words[0], words[1]), relation=words[2]), lang
            if category in ("colors", "color_attr"):
                return PromptSpec(category, tuple(words[1::2]), tuple(words[0::2])), lang
            if category == "two_object" and words[0] == words[1]:
                break  # "a circle and a circle" is no two_object prompt (s1 != s2)
            return PromptSpec(category, tuple(words)), lang
    raise ValueError(f"cannot parse prompt {prompt!r}: expected one of the six shapes-world categories, "
                     "e.g. 'a red circle', 'two squares', 'a circle above a blue square' / '一个红色的圆形' "
                     "(the grammar is in mars/shapes.py)")


# ----------------------------------------------------------------------------- detection and scoring

@dataclass(frozen=True)
class DetectedObject:
    shape: str                          # circle, square, triangle or unknown
    color: str
    box: tuple[int, int, int, int]      # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    area: int

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def label_components(classes: np.ndarray) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """8-connected components of equal non-negative class -> [(class, area, (x0, y0, x1, y1))].

    Row runs are joined by union-find, so the Python loop is over run links, not pixels."""
    h, w = classes.shape
    cls = classes.astype(np.int16) + 1  # 0 = background
    left = np.pad(cls, ((0, 0), (1, 0)))[:, :-1]
    right = np.pad(cls, ((0, 0), (0, 1)))[:, 1:]
    starts, ends = (cls > 0) & (cls != left), (cls > 0) & (cls != right)
    run_id = np.cumsum(starts.ravel()).reshape(h, w) - 1  # (H, W), valid where cls > 0
    rows, x_start = np.nonzero(starts)
    x_end = np.nonzero(ends)[1] + 1
    run_cls = cls[rows, x_start]
    links = []
    for shift in (-1, 0, 1):  # pixel (r, x) touches (r + 1, x + shift)
        upper = slice(max(0, -shift), w - max(0, shift))
        lower = slice(max(0, shift), w - max(0, -shift))
        same = (cls[:-1, upper] > 0) & (cls[:-1, upper] == cls[1:, lower])
        links.append(run_id[:-1, upper][same] * len(rows) + run_id[1:, lower][same])
    parent = list(range(len(rows)))
    for key in np.unique(np.concatenate(links)).tolist():  # one key per pair of touching runs
        ra, rb = _find(parent, key // len(rows)), _find(parent, key % len(rows))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([_find(parent, i) for i in range(len(rows))], dtype=np.int64)
    _, comp = np.unique(roots, return_inverse=True)
    n = int(comp.max()) + 1 if len(comp) else 0
    area = np.bincount(comp, weights=x_end - x_start, minlength=n).astype(int)
    boxes = np.full((n, 4), [w, h, 0, 0])
    np.minimum.at(boxes[:, 0], comp, x_start)
    np.minimum.at(boxes[:, 1], comp, rows)
    np.maximum.at(boxes[:, 2], comp, x_end)
    np.maximum.at(boxes[:, 3], comp, rows + 1)
    comp_cls = np.zeros(n, dtype=int)
    comp_cls[comp] = run_cls - 1
    return [(int(comp_cls[i]), int(area[i]), tuple(int(v) for v in boxes[i])) for i in range(n)]


def shape_of(area: int, box: tuple[int, int, int, int]) -> str:
    width, height = box[2] - box[0], box[3] - box[1]
    if not 0.7 <= width / height <= 1.43:
        return "unknown"
    fill = area / (width * height)
    if fill >= 0.86:
        return "square"
    if 0.66 <= fill < 0.86:
        return "circle"
    return "triangle" if 0.36 <= fill < 0.64 else "unknown"


def _as_rgb(image) -> np.ndarray:
    image = np.asarray(flatten_on_white(image) if isinstance(image, Image.Image) else image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square RGB image, got array shape {image.shape}")
    return image


def detect_objects(image) -> list[DetectedObject]:
    """Objects per the spec: palette pixels, 8-connected components >= 0.004 S^2, fill-ratio shapes."""
    rgb = _as_rgb(image)
    min_area = MIN_AREA * rgb.shape[0] ** 2
    return [DetectedObject(shape_of(area, box), COLORS[c], box, area)
            for c, area, box in label_components(classify_pixels(rgb)) if area >= min_area]


def satisfies(spec: PromptSpec, objects: list[DetectedObject], side: int) -> bool:
    """The plain ("at least") pass rule of the spec; unknown objects never match."""
    if spec.category == "counting":
        return sum(o.shape == spec.shapes[0] for o in objects) == spec.count
    colors = spec.colors or (None,) * len(spec.shapes)
    for chosen in itertools.permutations(objects, len(spec.shapes)):
        if all(o.shape == s and c in (None, o.color) for o, s, c in zip(chosen, spec.shapes, colors)):
            if spec.relation is None:
                return True
            a, b = chosen
            if relation(a.cx, a.cy, b.cx, b.cy, side) == spec.relation:
                return True
    return False


@dataclass(frozen=True)
class Verdict:
    prompt: str
    category: str
    lang: str
    passed: bool
    strict: bool  # passed and exactly as many objects (unknown included) as the prompt names
    objects: tuple[DetectedObject, ...]


def score(prompt: str, image) -> Verdict:
    """Does `image` (PIL or (S, S, 3) array) satisfy the category prompt? Plain and strict verdict."""
    spec, lang = parse_prompt(prompt)
    rgb = _as_rgb(image)
    objects = detect_objects(rgb)
    passed = satisfies(spec, objects, rgb.shape[0])
    strict = passed and len(objects) == spec.expected_objects
    return Verdict(prompt, spec.category, lang, passed, strict, tuple(objects))


def summarize(verdicts: list[Verdict]) -> dict:
    """Per-category accuracy (plain and strict) and overall = mean of the category accuracies."""
    if not verdicts:
        raise ValueError("no verdicts to summarize: score at least one image")
    per_category = {}
    for category in CATEGORIES:
        group = [v for v in verdicts if v.category == category]
        if group:
            per_category[category] = {"n": len(group),
                                      "accuracy": float(np.mean([v.passed for v in group])),
                                      "strict": float(np.mean([v.strict for v in group]))}
    return {"n": len(verdicts),
            "categories": per_category,
            "overall": float(np.mean([c["accuracy"] for c in per_category.values()])),
            "overall_strict": float(np.mean([c["strict"] for c in per_category.values()])),
            "missing_categories": [c for c in CATEGORIES if c not in per_category]}


# ----------------------------------------------------------------------------- CLI

def write_eval_folder(out: Path, n: int, size: int, seed: int, progress: bool = True) -> None:
    """n images cycling through the six categories, English and Chinese in alternate rounds: out/000000.png
    ... and out/captions.jsonl, each line written right after its image (mars.cli.write_image_folder)."""
    rows = []
    for i in range(n):
        category, lang = CATEGORIES[i % len(CATEGORIES)], LANGS[(i // len(CATEGORIES)) % 2]
        rows.append((sample_example(np.random.default_rng([seed, i]), category, lang), category, lang))
    records = [{"caption": example.prompt, "category": category, "lang": lang} for example, category, lang in rows]
    with tqdm(rows, desc="shapes", unit="img", disable=not progress) as bar:  # closed before any message
        images = (render(example.scene, size) for example, _, _ in bar)
        write_image_folder(out, images, records, listing="captions.jsonl")


# Below 48 px the pixel rules misread some of the smallest shapes (measured: S = 32); above 1024 px an
# image only costs memory (a side of 10**8 px once asked for petabytes).
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 48, 1024


def image_side(text: str) -> int:
    """The argparse type of an image side in pixels, MIN_IMAGE_SIDE to MAX_IMAGE_SIDE."""
    return int_range(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)(text)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mars.shapes", description="Write shapes-world images and captions.jsonl")
    parser.add_argument("--n", type=POSITIVE_INT, default=64, help="number of images")
    parser.add_argument("--size", type=image_side, default=256,
                        help=f"image side S in pixels, {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} (default 256)")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="random seed, >= 0 (default 0)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (new, empty, or written by this command)")
    args = parser.parse_args(argv)
    try:
        check_image_folder(args.out, "--out", listing="captions.jsonl")
    except ValueError as error:
        parser.error(str(error))
    return one_line_errors(write_eval_folder)(args.out, args.n, args.size, args.seed) or 0


if __name__ == "__main__":
    raise SystemExit(main())
