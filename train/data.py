"""Training data: the shapes world, an image folder with captions.jsonl, WebDataset tar shards.

Every dataset yields {"image": FloatTensor (3, S, S) in [-1, 1], "caption": str, ...}; images are
converted to RGB (transparency composited on white), resized on the shorter side and centre-cropped
to S. An unreadable or missing image is skipped with a warning naming it and counted in
`dataset.skipped` (shared by DataLoader workers); training never stops on a bad file.

    from train.data import ShapesWorldDataset
    ds = ShapesWorldDataset(size=128, length=None, seed=0, lang="both", captions="mixed")  # endless stream
    next(iter(ds))["caption"]   # e.g. "a circle above a square" or "一个红色的圆形和一个蓝色的正方形。..."
    folder_parts("data/emoji")  # (data/emoji/train, data/emoji/test): a folder, or one with train/ and test/

`ImageTextDataModule(source="shapes" | "folder" | "webdataset", ...)` wraps them for Lightning.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mars.images import LISTINGS, UNREADABLE, fit_square, flatten_on_white, read_image_listing
from mars.shapes import describe_scene, random_scene, render, sample_example

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LANG_CHOICES = ("en", "zh", "both")


# ----------------------------------------------------------------------------- images

def load_rgb(source) -> Image.Image:
    """Path or bytes -> decoded RGB image; transparency is composited on white. Raises OSError if unreadable."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()  # decode now, so a truncated file fails here and not inside a collate
    return flatten_on_white(image)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Shorter side to `size`, centre crop, -> (3, size, size) float in [-1, 1]."""
    pixels = torch.from_numpy(np.array(fit_square(image, size), dtype=np.uint8))  # (S, S, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


class SkipCounter:
    """Counts skipped samples across DataLoader worker processes and warns once per name and process."""

    def __init__(self):
        self._count = multiprocessing.Value("q", 0)  # shared memory: workers inherit it
        self._warned: set[str] = set()

    def skip(self, name: str, error: BaseException) -> None:
        with self._count.get_lock():
            self._count.value += 1
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"skipping unreadable sample {name}: {type(error).__name__}: {error}", stacklevel=3)

    @property
    def count(self) -> int:
        return self._count.value


def captions_of(record: dict, lang: str, where: str) -> list[str]:
    """The captions a record contributes: "en" its `caption`, "zh" its `caption_zh` (else `caption`), "both" each."""
    if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
        raise ValueError(f"{where}: no string 'caption' field; every record needs one")
    chinese = record.get("caption_zh")
    if chinese is not None and not isinstance(chinese, str):
        raise ValueError(f"{where}: 'caption_zh' is not a string; write the Chinese caption as text or leave it out")
    if lang == "en" or not chinese:
        return [record["caption"]]
    return [chinese] if lang == "zh" else [record["caption"], chinese]


def record_fields(record: dict) -> dict[str, str]:
    """What an item carries of its record besides the caption it was read for: `caption_zh`, so code
    extraction keeps both languages, and `concept`, which groups images of one thing (emoji skin-tone
    variants) for metrics and concept-balanced sampling; "" where the record has none."""
    concept = record.get("concept")
    return {"caption_zh": record.get("caption_zh") or "", "concept": concept if isinstance(concept, str) else ""}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def distributed_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): explicit values win, else torch.distributed when initialised, else (0, 1)."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"give both rank and world_size with 0 <= rank < world_size, got {rank}, {world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ----------------------------------------------------------------------------- shapes world

class ShapesWorldDataset(Dataset):
    """Rendered shapes-world scenes with category prompts and/or full scene descriptions.

    Item i is a pure function of (seed, i) (and of the epoch, for the stream), so runs repeat
    exactly and `ds[i]` always works.
    length=N gives a map-style set of N items (Lightning adds a DistributedSampler under DDP);
    length=None gives a ShapesWorldStream, an endless IterableDataset (train with max_steps).
    """

    def __new__(cls, size: int = 128, length: int | None = None, *args, **kwargs):
        if cls is ShapesWorldDataset and length is None:
            cls = ShapesWorldStream  # one documented constructor for both kinds
        return super().__new__(cls)

    def __getnewargs_ex__(self):
        # Unpickling (spawned DataLoader workers) calls __new__ again: keep the kind it had.
        return (), {"length": self.length}

    def __init__(self, size: int = 128, length: int | None = None, seed: int = 0, lang: str = "both",
                 captions: str = "category", rank: int | None = None, world_size: int | None = None):
        _check_choice("lang", lang, LANG_CHOICES)
        _check_choice("captions", captions, ("category", "scene", "mixed"))
        if length is not None and length < 1:
            raise ValueError(f"length must be None (endless) or >= 1, got {length}")
        self.size, self.length, self.seed, self.lang, self.captions = size, length, seed, lang, captions
        self.rank, self.world_size = rank, world_size  # only the stream splits itself; see ShapesWorldStream
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Gives the endless stream fresh scenes each epoch; a fixed-length set stays the same."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        if self.length is not None and not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, self.epoch if self.length is None else 0, index])
        lang = str(rng.choice(["en", "zh"])) if self.lang == "both" else self.lang
        describe = self.captions == "scene" or (self.captions == "mixed" and rng.random() < 0.5)
        if describe:
            scene = random_scene(rng)
            caption, category = describe_scene(scene, lang), "scene"
        else:
            example = sample_example(rng, lang=lang)
            scene, caption, category = example.scene, example.prompt, example.category
        # Rendering straight at S keeps edges crisp; resampling would blur the scorer's colours.
        image = image_to_tensor(render(scene, self.size), self.size)
        return {"image": image, "caption": caption, "category": category, "lang": lang}

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless ShapesWorldDataset has no length; pass length=N for a fixed set")
        return self.length


class ShapesWorldStream(ShapesWorldDataset, IterableDataset):
    """The endless kind (ShapesWorldDataset with length=None): DDP rank r of W and DataLoader
    worker k of K yield items r*K + k, r*K + k + W*K, ..., so no two processes repeat an item."""

    def __iter__(self):
        rank, world = distributed_rank(self.rank, self.world_size)
        worker, workers = _worker()
        index = rank * workers + worker
        while True:
            yield self[index]
            index += world * workers


# ----------------------------------------------------------------------------- image folder

LISTING = LISTINGS[0][0]  # captions.jsonl
FOLDER_FORMAT = "one {\"file\": ..., \"caption\": ..., \"caption_zh\": ...} object a line, caption_zh optional"


def read_listing(root: str | Path) -> list[tuple[Path, dict, str]]:
    """The records of root/captions.jsonl as (image path, record, "file:line") (mars.images.read_image_listing:
    one-line errors for a missing listing, a line that is not a JSON object naming an image and its
    caption, and an empty listing)."""
    return [(path, record, where) for path, _, record, where in read_image_listing(root, LISTINGS[:1])[1]]


def folder_captions(root: str | Path, lang: str = "both") -> list[str]:
    """Every caption of an image folder's captions.jsonl in `lang` ("both": `caption` and `caption_zh`)."""
    _check_choice("lang", lang, LANG_CHOICES)
    return [caption for _, record, where in read_listing(root) for caption in captions_of(record, lang, where)]


def folder_parts(root: str | Path) -> tuple[Path, Path | None]:
    """(training folder, held-out folder or None) of an image-caption data set: a folder with captions.jsonl,
    or one with train/ and test/ subfolders that have one each (what `python -m mars.emoji build` writes;
    test/ is optional)."""
    root = Path(root)
    if (root / "train" / LISTING).is_file():
        test = root / "test"
        return root / "train", test if (test / LISTING).is_file() else None
    if (root / LISTING).is_file():
        return root, None
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: give a folder of images with {LISTING}")
    raise FileNotFoundError(f"{root} has no {LISTING} (nor train/{LISTING}): give a folder of images with "
                            f"{LISTING}, {FOLDER_FORMAT}")


class ImageCaptionFolder(Dataset):
    """A folder of images and captions.jsonl (`file` or `image`, `caption`, optional `caption_zh`).

    Map-style (Lightning adds a DistributedSampler under DDP). An unreadable item is replaced by
    the next readable one, so batches stay full; `skipped` counts replaced requests (per epoch:
    the number of unreadable items, summed over workers). Items carry the record's `caption_zh` and
    `concept` too (record_fields)."""

    def __init__(self, root: str | Path, size: int, lang: str = "en"):
        _check_choice("lang", lang, LANG_CHOICES)
        self.root, self.size = Path(root), size
        self.items: list[tuple[Path, str]] = []
        self.fields: list[dict[str, str]] = []  # item i's record_fields
        for path, record, where in read_listing(self.root):
            captions = captions_of(record, lang, where)
            self.items += [(path, caption) for caption in captions]
            self.fields += [record_fields(record)] * len(captions)
        self.skips = SkipCounter()

    @property
    def skipped(self) -> int:
        return self.skips.count

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.items)):
            path, caption = self.items[(index + offset) % len(self.items)]
            try:
                image = load_rgb(path)
            except UNREADABLE as error:
                if offset == 0:  # count each requested item once; stand-ins are counted when requested
                    self.skips.skip(str(path), error)
                continue
            return {"image": image_to_tensor(image, self.size), "caption": caption, "file": path.name,
                    **self.fields[(index + offset) % len(self.items)]}
        raise RuntimeError(f"no readable image in {self.root}: every file listed in captions.jsonl failed to load")


# ----------------------------------------------------------------------------- webdataset shards

def shard_list(urls: str | Path | list[str]) -> list[str]:
    """Brace pattern ("data/shard-{000..009}.tar"), a folder of .tar files, or a list -> sorted shard names."""
    if isinstance(urls, (str, Path)) and Path(urls).is_dir():
        shards = sorted(str(p) for p in Path(urls).glob("*.tar"))
    elif isinstance(urls, (str, Path)):
        shards = sorted(wds.shardlists.expand_urls(str(urls)))
    else:
        shards = sorted(str(u) for u in urls)
    if not shards:
        raise FileNotFoundError(f"no .tar shards found for {urls!r}: give a folder, a brace pattern or a list")
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}; "
                                "check the path or brace pattern")
    return shards


class WebDatasetShards(IterableDataset):
    """WebDataset tar shards of (.jpg/.jpeg/.png/.webp image, .txt caption or .json {"caption", "caption_zh"}).
    Items carry `caption_zh` and `concept` too, as ImageCaptionFolder's do.

    Shards split deterministically: rank r of W takes shards[r::W], worker k of K in that rank
    takes every K-th of those, so every sample is read exactly once per epoch when there are at
    least W * K shards. Ranks may then see different counts: cap steps with limit_train_batches."""

    def __init__(self, urls: str | Path | list[str], size: int, lang: str = "en",
                 rank: int | None = None, world_size: int | None = None):
        _check_choice("lang", lang, LANG_CHOICES)
        self.shards, self.size, self.lang = shard_list(urls), size, lang
        self.rank, self.world_size = rank, world_size
        self.skips = SkipCounter()

    @property
    def skipped(self) -> int:
        return self.skips.count

    def _shard_error(self, error: BaseException) -> bool:
        self.skips.skip("a shard member", error)
        return True  # keep reading: webdataset's handler protocol

    def __iter__(self):
        rank, world = distributed_rank(self.rank, self.world_size)
        worker, workers = _worker()
        mine = self.shards[rank::world][worker::workers]
        if len(self.shards) < world * workers and worker == 0:
            warnings.warn(f"{len(self.shards)} shards for {world} ranks x {workers} workers: some read nothing")
        samples = wds.tarfile_to_samples(handler=self._shard_error)(iter({"url": u} for u in mine))
        for sample in samples:
            name = f"{sample.get('__url__')}:{sample.get('__key__')}"
            image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
            try:
                if image_key is None:
                    raise FileNotFoundError(f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
                image = image_to_tensor(load_rgb(sample[image_key]), self.size)
                if "json" in sample:
                    record = json.loads(sample["json"])
                else:
                    record = {"caption": sample.get("txt", b"").decode("utf-8").strip()}
                captions = captions_of(record, self.lang, name)
            except UNREADABLE as error:  # bad JSON or a missing caption is a ValueError: skipped too
                self.skips.skip(name, error)
                continue
            for caption in captions:
                yield {"image": image, "caption": caption, "key": sample["__key__"], **record_fields(record)}


# ----------------------------------------------------------------------------- Lightning

def collate_captions(batch: list[dict]) -> dict:
    """Stack images to (B, 3, S, S); every other field becomes a list (captions stay strings)."""
    out = {"image": torch.stack([item["image"] for item in batch])}
    for key in batch[0]:
        if key != "image":
            out[key] = [item[key] for item in batch]
    return out


class ImageTextDataModule(L.LightningDataModule):
    """Batches of {"image": (B, 3, S, S), "caption": [str] * B, ...} from one of the three sources.

    source="shapes": endless (or train_length) shapes-world training stream and a fixed val set
    of val_length items from another seed; "folder" / "webdataset": `path` (and optional `val_path`)."""

    def __init__(self, source: str = "shapes", path: str | None = None, val_path: str | None = None,
                 image_size: int = 128, batch_size: int = 16, num_workers: int = 0, seed: int = 0,
                 lang: str = "both", captions: str = "mixed", train_length: int | None = None,
                 val_length: int = 64):
        super().__init__()
        _check_choice("source", source, ("shapes", "folder", "webdataset"))
        if source != "shapes" and path is None:
            raise ValueError(f"source={source!r} needs path= (a folder with captions.jsonl, or tar shards)")
        self.save_hyperparameters()
        self.train_set = self.val_set = None

    def _dataset(self, path: str | None, seed: int, length: int | None) -> Dataset:
        h = self.hparams
        if h.source == "shapes":
            return ShapesWorldDataset(h.image_size, length, seed, h.lang, h.captions)
        if h.source == "folder":
            return ImageCaptionFolder(path, h.image_size, h.lang)
        return WebDatasetShards(path, h.image_size, h.lang)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train_set is None:
            self.train_set = self._dataset(h.path, h.seed, h.train_length)
        if self.val_set is None and (h.source == "shapes" or h.val_path):
            self.val_set = self._dataset(h.val_path, h.seed + 1, h.val_length)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        h = self.hparams
        return DataLoader(dataset, batch_size=h.batch_size, num_workers=h.num_workers,
                          shuffle=train and not isinstance(dataset, IterableDataset),
                          drop_last=train, collate_fn=collate_captions,
                          persistent_workers=h.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return [] if self.val_set is None else self._loader(self.val_set, train=False)
