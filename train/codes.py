"""Image codes extracted once (LlamaGen style) and the deterministic batches the MARS stages read.

The VQ tokenizer is frozen after its own stage, so every training image is encoded once, here,
and stages 1-3 train on integer grids and captions, never on pixels.

Codes directory format (version 1), written by `extract_codes` / `python -m train.codes`:

    DIR/meta.json          {"format": "mars-codes", "version": 1, "num_items": N,
                            "sizes": [128, 256], "grids": {"128": [8, 8], "256": [16, 16]},
                            "codebook_size": 1024, "downsample": 16, "source": "shapes",
                            "seed": 0, "vq": "<VQ directory used>"}
                           (+ "held_out": M when the last M items come from a held-out folder, a data
                           set's test/ part: CodesDataModule validates on exactly them, never trains on them)
    DIR/codes.safetensors  one tensor per encoded image size S: "codes_<S>" of shape
                           (N, S/f, S/f), int16 (int32 when the codebook exceeds 32767 entries).
                           Row i of every tensor is the same image i (the same scene rendered
                           at each size), so codes_128[i] and codes_256[i] are a super-resolution pair.
    DIR/captions.jsonl     N lines, line i describes image i:
                           {"index": i, "category": "position" | ... | "scene" | null,
                            "captions": {"<kind>_<lang>": text or [texts], ...},
                            "concept": "..." (a folder record's `concept`, when it has one)}
                           kinds: "prompt" (category prompts of the shapes world, mars/shapes.py, that the
                           image passes strictly), "scene" (a full scene description), "caption"
                           (a real-data caption: caption_en holds the source's `caption` field,
                           whatever its language, caption_zh its `caption_zh` when it has one);
                           langs: "en", "zh"; a list holds equally likely
                           alternatives. Shapes-world items carry prompt_en and prompt_zh (lists:
                           every prompt the scene passes strictly; free scenes often none), scene_en
                           and scene_zh.

Reading:

    codes = CodeSet.load("runs/shapes/codes")       # checks format and shapes, one-line errors
    codes.grid(128), codes.codes[128][i]            # (8, 8), int16 as stored (batches hand out int64)
    codes.caption(i, rng, kind="mixed", lang="both")
    codes.caption(i, rng, kind="prompt", weights={"color_attr": 3.0})   # oversample a category's prompts

Training data is a pure function of the global sample position p (the p-th sample the run
consumes, over all ranks): epoch p // N_train, a permutation seeded by (seed, epoch) (a weighted
draw under concept_balance), and a caption drawn with rng (seed, p). A resumed run therefore sees
exactly the batches an uninterrupted one would: `CodesDataModule` starts its stream at batch
`trainer.global_step * accumulate_grad_batches` (see `IndexedBatches`).

    python -m train.codes --vq checkpoints/mars-shapes/vq --out runs/shapes/codes --n 20000 --sizes 128 256
    python -m train.codes --captions-only --out runs/shapes/codes   # rewrite a shapes set's captions.jsonl
    python -m train.codes --source webdataset --path "shards/{000..099}.tar" --vq DIR --sizes 256 --out DIR
    python -m train.codes --source folder --path data/emoji/train --held-out data/emoji/test --n 0 --sizes 128 \
        --vq DIR --out DIR   # every training image, then the held-out ones (validation only)
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import ConcatDataset, DataLoader, IterableDataset, Subset, get_worker_info
from tqdm import tqdm

from mars.cli import NON_NEGATIVE_INT, POSITIVE_INT, OneLineParser, one_line_errors
from mars.device import resolve_device
from mars.errors import first_line
from mars.shapes import (CATEGORIES, LANGS, describe_scene, format_prompt, parse_prompt, random_scene, render,
                         sample_example, scene_prompts)
from train.data import ImageCaptionFolder, WebDatasetShards, distributed_rank, folder_captions, image_to_tensor

FORMAT, VERSION = "mars-codes", 1
META_FILE, CODES_FILE, CAPTIONS_FILE = "meta.json", "codes.safetensors", "captions.jsonl"
KINDS = ("prompt", "scene", "caption")


# ----------------------------------------------------------------------------- items to encode

def scene_mix(weights: dict[str, float] | None) -> np.ndarray | None:
    """Probabilities over CATEGORIES from {category: weight} (a category not named weighs 1); None: uniform."""
    if not weights:
        return None
    for category, weight in weights.items():
        if category not in CATEGORIES:
            raise ValueError(f"scene_weights names {category!r}: use categories of {CATEGORIES}")
        if not weight >= 0:
            raise ValueError(f"scene_weights[{category!r}] = {weight}: weights must be >= 0")
    p = np.array([float(weights.get(category, 1.0)) for category in CATEGORIES])
    if not p.sum() > 0:
        raise ValueError("scene_weights are all 0: give at least one category a positive weight")
    return p / p.sum()


def shapes_item(seed: int, index: int, free_scene_ratio: float = 0.25,
                scene_weights: dict[str, float] | None = None) -> tuple:
    """Shapes-world item `index`: (scene, category, captions dict); a pure function of (seed, index,
    scene_weights). A prompted scene is drawn for a category chosen uniformly, or in proportion to
    `scene_weights` (more scenes for the categories a model finds hard).
    Its prompt captions are every category prompt the scene passes strictly (mars.shapes.scene_prompts),
    the one it was drawn for first when it is among them (a pair named against drawing order is not);
    a free scene has them too when it passes any."""
    rng = np.random.default_rng([seed, index])
    if rng.random() < free_scene_ratio:
        scene, category, specs = random_scene(rng), "scene", []
    else:
        mix = scene_mix(scene_weights)
        category = str(rng.choice(CATEGORIES) if mix is None else rng.choice(CATEGORIES, p=mix))
        example = sample_example(rng, category=category, lang="en")
        scene, category, specs = example.scene, example.category, [example.spec]
    passed = scene_prompts(scene)
    specs = list(dict.fromkeys([spec for spec in specs if spec in passed] + passed))
    captions = {f"prompt_{lang}": [format_prompt(spec, lang) for spec in specs] for lang in LANGS} if specs else {}
    captions |= {f"scene_{lang}": describe_scene(scene, lang) for lang in LANGS}
    return scene, category, captions


class ShapesBatches(torch.utils.data.Dataset):
    """Shapes-world items 0..N-1 rendered at every size, one batch an index: a DataLoader's workers
    render batches in parallel (rendering, not VQ encoding, is the bottleneck on a GPU) and hand them
    back in order."""

    def __init__(self, n: int, sizes: list[int], seed: int, batch_size: int,
                 scene_weights: dict[str, float] | None = None):
        self.n, self.sizes, self.seed, self.batch_size = n, sizes, seed, batch_size
        self.scene_weights = scene_weights

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __getitem__(self, batch: int) -> tuple[dict, list[dict]]:
        first = batch * self.batch_size
        items = [shapes_item(self.seed, i, scene_weights=self.scene_weights)
                 for i in range(first, min(self.n, first + self.batch_size))]
        images = {size: torch.stack([image_to_tensor(render(scene, size), size) for scene, _, _ in items])
                  for size in self.sizes}  # size -> (B, 3, size, size)
        return images, [{"category": category, "captions": captions} for _, category, captions in items]


def item_record(item: dict) -> dict:
    """A folder/WebDataset item's codes record: its `caption` (and `caption_zh` when it has one) in the codes
    format, and its `concept` when it has one."""
    captions = {"caption_en": item["caption"]} | ({"caption_zh": item["caption_zh"]} if item.get("caption_zh") else {})
    return {"category": None, "captions": captions} | ({"concept": item["concept"]} if item.get("concept") else {})


def _dataset_batches(dataset, n: int | None, sizes: list[int], batch_size: int) -> Iterator[tuple[dict, list[dict]]]:
    """Folder/WebDataset images: read at the largest size, smaller sizes downscaled from it."""
    from torch.nn.functional import interpolate

    def flush(buffer: list[dict]) -> tuple[dict, list[dict]]:
        full = torch.stack([x["image"] for x in buffer])  # (B, 3, S, S)
        images = {size: full if size == max(sizes) else
                  interpolate(full, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1) for size in sizes}
        return images, [item_record(x) for x in buffer]

    buffer, count = [], 0
    # A map-style set is read by index: ImageCaptionFolder wraps indices around, so never iterate it.
    items = iter(dataset) if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    for item in items:
        buffer.append(item)
        count += 1
        if len(buffer) == batch_size:
            yield flush(buffer)
            buffer = []
        if count == n:
            break
    if buffer:
        yield flush(buffer)


# ----------------------------------------------------------------------------- extraction

@torch.no_grad()
def extract_codes(vq_dir: str | Path, out: str | Path, n: int | None = 2048, sizes: tuple[int, ...] = (128, 256),
                  seed: int = 0, batch_size: int = 64, source: str = "shapes", path: str | None = None,
                  device: str | torch.device = "cpu", num_workers: int = 0,
                  scene_weights: dict[str, float] | None = None, held_out: str | None = None) -> Path:
    """Encode N images at every size with the VQ tokenizer in `vq_dir` and write the codes directory `out`.

    source "shapes" renders shapes-world items 0..N-1 (seeded); "folder"/"webdataset" read `path`
    (train/data.py formats; n=None reads everything). Written atomically: `out` appears complete or not at all.
    num_workers > 0 renders shapes-world batches in that many processes (the codes are the same);
    scene_weights sets the shapes world's category mix (shapes_item). held_out (source "folder"): a second
    folder, every image of it encoded after the first N of `path`; meta.json's "held_out" counts them, and
    CodesDataModule validates on them (a data set's test/ part: never trained on).
    """
    from vq import VQTokenizer

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: delete it or choose another --out")
    sizes = sorted(int(s) for s in sizes)
    if not sizes:
        raise ValueError("sizes is empty: give at least one image size, e.g. --sizes 128 256")
    tokenizer = VQTokenizer.from_pretrained(vq_dir, map_location=device)
    bad = [s for s in sizes if s <= 0 or s % tokenizer.downsample]
    if bad:
        raise ValueError(f"sizes {bad} are not positive multiples of the VQ downsampling factor {tokenizer.downsample}")
    if source == "shapes":
        if n is None or n < 1:
            raise ValueError(f"n={n}: the shapes source needs a positive number of images")
        scene_mix(scene_weights)  # bad weights fail before the tokenizer works
        batches = DataLoader(ShapesBatches(n, sizes, seed, batch_size, scene_weights), batch_size=None,
                             num_workers=num_workers)
        total = n
    elif source in ("folder", "webdataset"):
        if path is None:
            raise ValueError(f"source={source!r} needs path= (a captions.jsonl folder or tar shards)")
        if held_out is not None and source != "folder":
            raise ValueError(f"held_out is for source 'folder' (a test/ folder beside path), not {source!r}")
        if source == "folder":
            dataset = ImageCaptionFolder(path, max(sizes))
            dataset = Subset(dataset, range(min(n, len(dataset)))) if n else dataset  # n None or 0: every image
            if held_out is not None:
                held = ImageCaptionFolder(held_out, max(sizes))
                dataset = ConcatDataset([dataset, held])
            batches, total = _dataset_batches(dataset, None, sizes, batch_size), len(dataset)
        else:
            dataset = WebDatasetShards(path, max(sizes), rank=0, world_size=1)
            batches, total = _dataset_batches(dataset, n, sizes, batch_size), n
    else:
        raise ValueError(f"source={source!r}: use 'shapes', 'folder' or 'webdataset'")
    dtype = torch.int16 if tokenizer.codebook_size <= torch.iinfo(torch.int16).max + 1 else torch.int32
    codes: dict[int, list[torch.Tensor]] = {size: [] for size in sizes}
    records: list[dict] = []
    with tqdm(total=total, desc="extract codes", unit="img", disable=None) as progress:
        for images, infos in batches:
            for size in sizes:
                codes[size].append(tokenizer.encode(images[size].to(device)).cpu().to(dtype))  # (B, h, w)
            records += [{"index": len(records) + j, **info} for j, info in enumerate(infos)]
            progress.update(len(infos))
    if not records:
        raise ValueError(f"no images were read from {path}: check the path and the files' format")
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    tensors = {f"codes_{size}": torch.cat(codes[size]).contiguous() for size in sizes}
    save_file(tensors, staging / CODES_FILE)
    write_captions(staging / CAPTIONS_FILE, records)
    meta = {"format": FORMAT, "version": VERSION, "num_items": len(records), "sizes": sizes,
            "grids": {str(s): list(tensors[f"codes_{s}"].shape[1:]) for s in sizes},
            "codebook_size": tokenizer.codebook_size, "downsample": tokenizer.downsample,
            "source": source, "seed": seed, "vq": str(Path(vq_dir).resolve())}
    if source == "shapes" and scene_weights:
        meta["scene_weights"] = scene_weights
    if held_out is not None:
        meta["held_out"] = len(held)
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    staging.rename(out)
    return out


def rewrite_shapes_captions(directory: str | Path) -> int:
    """Recompute the captions of a shapes-world codes directory from (seed, index), codes untouched:
    a set extracted before a captioning change gets the new captions without rendering or encoding.
    Returns the number of items."""
    directory = Path(directory)
    meta = CodeSet.load(directory).meta
    if meta.get("source") != "shapes":
        raise ValueError(f"{directory} holds {meta.get('source')!r} images: only shapes-world captions can be recomputed")
    records = []
    for i in tqdm(range(meta["num_items"]), desc="captions", unit="item", disable=None):
        _, category, captions = shapes_item(meta["seed"], i, scene_weights=meta.get("scene_weights"))
        records.append({"index": i, "category": category, "captions": captions})
    staging = directory / (CAPTIONS_FILE + ".partial")
    write_captions(staging, records)
    staging.replace(directory / CAPTIONS_FILE)  # atomic: the old captions or the new, never half
    return len(records)


def write_captions(path: Path, records: list[dict]) -> None:
    """captions.jsonl: one record a line, non-ASCII (Chinese) captions kept readable."""
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ----------------------------------------------------------------------------- reading

def matching_captions(captions: dict[str, str | list[str]], kind: str = "mixed", lang: str = "both") -> list[str]:
    """The texts of a {"<kind>_<lang>": text or [texts]} dict matching kind ("mixed" = any) and lang
    ("both" = any), lists flattened."""
    return [text for key, value in sorted(captions.items())
            if kind in ("mixed", key.split("_")[0]) and lang in ("both", key.split("_")[-1])
            for text in ([value] if isinstance(value, str) else value)]


def select_captions(captions: dict[str, str | list[str]], kind: str = "mixed", lang: str = "both") -> list[str]:
    """matching_captions, or all of the texts when none match, so an item always has a caption."""
    return matching_captions(captions, kind, lang) or matching_captions(captions)


@functools.lru_cache(maxsize=1 << 16)
def caption_category(text: str) -> str | None:
    """The shapes-world category of a caption ("color_attr", ...), None for any other text."""
    try:
        return parse_prompt(text)[0].category
    except ValueError:
        return None


class CodeSet:
    """A loaded codes directory: `codes[size]` (N, h, w) in the stored integer type (int16 keeps a
    large set 4x smaller in memory than int64), `records[i]`, `meta`."""

    def __init__(self, codes: dict[int, torch.Tensor], records: list[dict], meta: dict):
        self.codes, self.records, self.meta = codes, records, meta

    @classmethod
    def load(cls, directory: str | Path) -> CodeSet:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: extract codes first "
                                    f"(python -m train.codes --vq VQ_DIR --out {directory})")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            tensors = load_file(directory / CODES_FILE)
            lines = (directory / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
            codes = {int(s): tensors[f"codes_{s}"] for s in meta["sizes"]}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            reason = first_line(error)
            raise ValueError(f"codes directory {directory} is incomplete or corrupt ({reason}): "
                             "delete it and extract again with python -m train.codes") from None
        counts = {len(records), meta["num_items"], *(len(c) for c in codes.values())}
        if len(counts) != 1:
            raise ValueError(f"codes directory {directory} holds mismatched item counts {sorted(counts)}: "
                             "extract again")
        return cls(codes, records, meta)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sizes(self) -> list[int]:
        return sorted(self.codes)

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    def grid(self, size: int) -> tuple[int, int]:
        if size not in self.codes:
            raise ValueError(f"no codes at {size} px in this codes directory (it holds {self.sizes}): "
                             f"extract with --sizes {size}")
        return tuple(self.codes[size].shape[1:])

    def captions(self, index: int, kind: str = "mixed", lang: str = "both") -> list[str]:
        """Captions of item `index` matching kind ("prompt", "scene", "caption" or "mixed") and
        lang ("en", "zh", "both"); when none match, all of its captions (never an empty list)."""
        return select_captions(self.records[index]["captions"], kind, lang)

    def caption(self, index: int, rng: np.random.Generator, kind: str = "mixed", lang: str = "both",
                weights: dict[str, float] | None = None) -> str:
        """One caption of item `index`, uniformly, or with probability proportional to the weight of its
        shapes-world category when `weights` is given (a category not named, or no category, weighs 1)."""
        options = self.captions(index, kind, lang)
        if not weights:
            return options[int(rng.integers(len(options)))]
        p = np.array([weights.get(caption_category(text), 1.0) for text in options])
        return options[int(rng.choice(len(options), p=p / p.sum()))]


# ----------------------------------------------------------------------------- deterministic batches

class IndexedBatches(IterableDataset):
    """An endless stream of whole batches where batch k is `self.make_batch(k, rank, world_size)`.

    Starts at `start_batch` (set before iterating, e.g. from the restored global step). DataLoader
    workers take batches round-robin, which the loader reads back in order, so the stream is the
    same for any number of workers; DDP ranks build disjoint rows of the same global batch.
    """

    start_batch = 0

    def make_batch(self, k: int, rank: int, world: int) -> dict:
        raise NotImplementedError

    def __iter__(self):
        rank, world = distributed_rank(None, None)
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        k = self.start_batch + worker
        while True:
            yield self.make_batch(k, rank, world)
            k += workers


def positions(batch: int, batch_size: int, rank: int, world: int) -> range:
    """Global sample positions of `rank`'s rows in global batch `batch`."""
    first = (batch * world + rank) * batch_size
    return range(first, first + batch_size)


class CodeSampler:
    """Global position p -> (item index, caption): a fresh permutation of the items every epoch; each
    item's caption drawn by `CodeSet.caption` (category `weights` optional).

    concept_balance b > 0: an epoch is instead len(items) draws with replacement, item i with probability
    proportional to n_i ** -b, where n_i counts the items of its record's `concept` (an item without one is
    a concept of its own). b = 1 gives every concept the same share of samples, b = 0.5 a concept of n images
    sqrt(n) shares: emoji with five skin tones in two styles (12 images) would otherwise take six times
    the samples of an emoji without tones."""

    def __init__(self, code_set: CodeSet, items: Sequence[int], seed: int, kind: str, lang: str,
                 weights: dict[str, float] | None = None, concept_balance: float = 0.0):
        self.code_set, self.items, self.seed, self.kind, self.lang = code_set, items, seed, kind, lang
        self.weights = weights
        self.p_items = concept_probabilities(code_set, items, concept_balance) if concept_balance else None
        self._perm_epoch, self._perm = -1, None

    def __call__(self, p: int) -> tuple[int, str]:
        epoch, offset = divmod(p, len(self.items))
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self.items)
            self._perm = rng.permutation(n) if self.p_items is None else rng.choice(n, size=n, p=self.p_items)
            self._perm_epoch = epoch
        index = self.items[int(self._perm[offset])]
        rng = np.random.default_rng([self.seed, 1, p])
        return index, self.code_set.caption(index, rng, self.kind, self.lang, self.weights)


def concept_probabilities(code_set: CodeSet, items: Sequence[int], balance: float) -> np.ndarray:
    """(len(items),) sampling probabilities, item i's proportional to (items sharing its concept) ** -balance."""
    concepts = [code_set.records[i].get("concept") or f"#{i}" for i in items]
    counts = Counter(concepts)
    weights = np.array([counts[c] ** -balance for c in concepts], dtype=np.float64)
    return weights / weights.sum()


class CodeBatches(IndexedBatches):
    """Batches {"codes_<S>": (B, h, w) per size, "caption": [str], "category": [str | None],
    "index": (B,), "seed": int}. `seed` is a per-batch integer for the module's own draws
    (task mix, caption dropout), so those repeat on resume too."""

    def __init__(self, sampler: CodeSampler, batch_size: int, sizes: tuple[int, ...]):
        self.sampler, self.batch_size, self.sizes = sampler, batch_size, tuple(sizes)

    def make_batch(self, k: int, rank: int = 0, world: int = 1) -> dict:
        code_set = self.sampler.code_set
        picks = [self.sampler(p) for p in positions(k, self.batch_size, rank, world)]
        index = torch.tensor([i for i, _ in picks])
        out = {f"codes_{s}": code_set.codes[s][index].long() for s in self.sizes}  # (B, h, w)
        return out | {"caption": [c for _, c in picks], "index": index,
                      "category": [code_set.records[i]["category"] for i in index.tolist()],
                      "seed": int(np.random.default_rng([self.sampler.seed, 2, k, rank]).integers(2**62))}


class CodesDataModule(L.LightningDataModule):
    """CodeBatches from a codes directory for training; the last `val_items` items are held out
    and `val_batches` fixed batches of them validate. val_items null: the codes' held-out items
    (meta.json "held_out", a data set's test/ folder) when they have any, else a tenth of the items.

    strict_captions: only items with a caption of the chosen kind and language take part. A
    `prompt` stage then skips the free scenes, whose descriptions (~100 tokens) would otherwise pad
    nearly every batch of 10-token prompts to their length and double the cost of a step.

    category_weights: oversample (or undersample) the prompts of shapes-world categories among an
    item's captions during training, e.g. {color_attr: 3}: a two-object scene is also "a circle and
    a square" and two position prompts, so colour binding would otherwise be a quarter of its draws.
    Validation keeps uniform draws, so its loss stays comparable across weightings.

    concept_balance: how far training evens out the samples of concepts with many images (CodeSampler);
    0 samples every image equally, 1 every concept. Validation stays uniform."""

    def __init__(self, path: str, batch_size: int = 32, sizes: tuple[int, ...] = (128,), captions: str = "mixed",
                 lang: str = "both", val_items: int | None = 64, val_batches: int = 2, seed: int = 0,
                 num_workers: int = 0, strict_captions: bool = False, category_weights: dict[str, float] | None = None,
                 concept_balance: float = 0.0):
        super().__init__()
        if not 0.0 <= concept_balance <= 1.0:
            raise ValueError(f"concept_balance={concept_balance}: use a number from 0 (every image alike) "
                             "to 1 (every concept alike)")
        if captions not in ("mixed", *KINDS):
            raise ValueError(f"captions={captions!r}: use 'mixed' or one of {KINDS}")
        if lang not in ("en", "zh", "both"):
            raise ValueError(f"lang={lang!r}: use 'en', 'zh' or 'both'")
        for category, weight in (category_weights or {}).items():
            if category not in CATEGORIES:
                raise ValueError(f"category_weights names {category!r}: use categories of {CATEGORIES}")
            if not weight > 0:
                raise ValueError(f"category_weights[{category!r}] = {weight}: weights must be > 0 "
                                 "(leave a category out to keep its share)")
        self.save_hyperparameters()
        self.code_set: CodeSet | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.code_set is not None:
            return
        h = self.hparams
        self.code_set = CodeSet.load(h.path)
        for size in h.sizes:
            self.code_set.grid(size)  # a clear error for a size that was not extracted
        n = len(self.code_set)
        held_out = int(self.code_set.meta.get("held_out", 0))
        val_items = h.val_items if h.val_items is not None else held_out or max(1, n // 10)
        if n <= val_items:
            raise ValueError(f"{h.path} has {n} items but val_items={val_items}: extract more or lower val_items")
        if val_items < held_out:
            raise ValueError(f"val_items={val_items} would train on {held_out - val_items} of the {held_out} held-out "
                             f"items of {h.path}: set val_items to null (or >= {held_out})")
        records = self.code_set.records

        def usable(items: range) -> Sequence[int]:
            if not h.strict_captions:
                return items
            kept = [i for i in items if matching_captions(records[i]["captions"], h.captions, h.lang)]
            if not kept:
                raise ValueError(f"no item of {h.path} has a {h.captions!r} caption in {h.lang!r}: "
                                 "set strict_captions false or choose another captions kind")
            return kept

        train = CodeSampler(self.code_set, usable(range(0, n - val_items)), h.seed, h.captions, h.lang,
                            h.category_weights, h.concept_balance)
        val = CodeSampler(self.code_set, usable(range(n - val_items, n)), h.seed + 1, h.captions, h.lang)
        self.train_set = CodeBatches(train, h.batch_size, h.sizes)
        self.val_set = CodeBatches(val, h.batch_size, h.sizes)

    def train_dataloader(self) -> DataLoader:
        self.train_set.start_batch = resume_batch(self.trainer)
        return DataLoader(self.train_set, batch_size=None, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        # Fixed, rank-independent batches; under DDP Lightning's sampler splits them between ranks.
        batches = [self.val_set.make_batch(k) for k in range(self.hparams.val_batches)]
        return DataLoader(batches, batch_size=None)


class CaptionBatches(IndexedBatches):
    """Caption-only batches {"caption": [str], "seed": int} for the text LM (stage 0): sample p is
    one caption of shapes item p (seeded), of the chosen kinds and languages; or, given `texts` (an
    image folder's captions), texts[i] for i in a fresh seeded permutation every pass."""

    def __init__(self, batch_size: int, seed: int, kind: str = "mixed", lang: str = "both",
                 texts: Sequence[str] | None = None):
        self.batch_size, self.seed, self.kind, self.lang, self.texts = batch_size, seed, kind, lang, texts
        self._perm_epoch, self._perm = -1, None

    def text(self, p: int) -> str:
        if self.texts is not None:
            epoch, offset = divmod(p, len(self.texts))
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, 3, epoch]).permutation(len(self.texts))
                self._perm_epoch = epoch
            return self.texts[int(self._perm[offset])]
        options = select_captions(shapes_item(self.seed, p)[2], self.kind, self.lang)
        return options[int(np.random.default_rng([self.seed, 1, p]).integers(len(options)))]

    def make_batch(self, k: int, rank: int = 0, world: int = 1) -> dict:
        captions = [self.text(p) for p in positions(k, self.batch_size, rank, world)]
        return {"caption": captions, "seed": int(np.random.default_rng([self.seed, 2, k, rank]).integers(2**62))}


class CaptionsDataModule(L.LightningDataModule):
    """Captions for the text LM: an endless seeded stream and `val_batches` fixed batches. Shapes-world
    captions by default; `path`, an image folder with captions.jsonl: its captions in `lang` ("both":
    `caption` and `caption_zh`), validated on `val_path`'s (a held-out folder) or, without one, on
    batches drawn from the same captions in another order."""

    def __init__(self, batch_size: int = 64, captions: str = "mixed", lang: str = "both", val_batches: int = 2,
                 seed: int = 0, num_workers: int = 0, path: str | None = None, val_path: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        if val_path is not None and path is None:
            raise ValueError("val_path needs path: give the training folder's captions too")
        texts = folder_captions(path, lang) if path is not None else None
        val_texts = folder_captions(val_path, lang) if val_path is not None else texts
        self.train_set = CaptionBatches(batch_size, seed, captions, lang, texts)
        # Shapes: unseen items; a folder: its held-out captions, else its own in another order.
        self.val_set = CaptionBatches(batch_size, seed + 1_000_003, captions, lang, val_texts)

    def train_dataloader(self) -> DataLoader:
        self.train_set.start_batch = resume_batch(self.trainer)
        return DataLoader(self.train_set, batch_size=None, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([self.val_set.make_batch(k) for k in range(self.hparams.val_batches)], batch_size=None)


def resume_batch(trainer) -> int:
    """Batches this run has already trained on (0 for a fresh run): where its data stream resumes."""
    if trainer is None:
        return 0
    return trainer.global_step * trainer.accumulate_grad_batches


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m train.codes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vq", help="VQ tokenizer directory (VQTokenizer.save_pretrained)")
    parser.add_argument("--out", required=True, type=Path, help="codes directory to create")
    parser.add_argument("--captions-only", action="store_true",
                        help="rewrite the captions of the shapes-world codes directory --out, codes untouched")
    parser.add_argument("--n", type=NON_NEGATIVE_INT, default=2048,
                        help="images to encode (all of a folder/shards when 0)")
    parser.add_argument("--sizes", type=POSITIVE_INT, nargs="+", default=[128, 256], help="image sizes to encode")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    parser.add_argument("--source", choices=("shapes", "folder", "webdataset"), default="shapes")
    parser.add_argument("--path", help="image folder with captions.jsonl, or tar shards (source folder/webdataset)")
    parser.add_argument("--held-out", help="source folder: a held-out image folder (e.g. a data set's test/) encoded "
                        "after --path; training stages validate on it and never train on it")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--num-workers", type=NON_NEGATIVE_INT, default=0,
                        help="processes rendering shapes-world batches")
    parser.add_argument("--scene-weights", nargs="+", default=[], metavar="CATEGORY=WEIGHT",
                        help="shapes-world category mix, e.g. counting=2 single_object=0.5 (unnamed: 1)")
    args = parser.parse_args(argv)
    if args.vq is None and not args.captions_only:
        parser.error("--vq is required (the VQ tokenizer directory that encodes the images)")
    status = run(args)
    if status:  # exit code 2 (bad input) or 130 (Ctrl-C), as SystemExit like the usage errors
        raise SystemExit(status)


@one_line_errors
def run(args: argparse.Namespace) -> int:
    if args.captions_only:
        print(f"rewrote the captions of {rewrite_shapes_captions(args.out)} items in {args.out}")
        return 0
    weights = {}
    for item in args.scene_weights:
        category, _, weight = item.partition("=")
        try:
            weights[category] = float(weight)
        except ValueError:
            raise ValueError(f"--scene-weights {item!r}: write CATEGORY=WEIGHT, e.g. counting=2") from None
    out = extract_codes(args.vq, args.out, args.n or None, tuple(args.sizes), args.seed, args.batch_size,
                        args.source, args.path, resolve_device(args.device, "--device"), args.num_workers,
                        weights or None, args.held_out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    main()
