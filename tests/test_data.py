"""Tests for train/data.py: shapes-world stream, image folder, WebDataset shards, DataModule."""

import io
import json
import pickle
import tarfile
from itertools import islice

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from mars.shapes import render, sample_example, score
from train.data import (ImageCaptionFolder, ImageTextDataModule, ShapesWorldDataset, WebDatasetShards,
                        collate_captions)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def _fingerprint(item: dict) -> tuple:
    return item["caption"], round(float(item["image"].sum()), 3)


# ----------------------------------------------------------------------------- shapes world

def test_shapes_items_are_deterministic_images_in_range():
    ds = ShapesWorldDataset(size=64, seed=0)
    item = ds[5]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() == 1.0
    assert torch.equal(item["image"], ShapesWorldDataset(size=64, seed=0)[5]["image"])
    assert item["caption"] == ShapesWorldDataset(size=64, seed=0)[5]["caption"]
    assert _fingerprint(ShapesWorldDataset(size=64, seed=1)[5]) != _fingerprint(item)


def test_shapes_images_are_the_renderer_pixels_and_pass_the_scorer():
    ds = ShapesWorldDataset(size=64, length=24, seed=3, lang="both", captions="category")
    items = list(ds)
    assert len(items) == 24 and {i["lang"] for i in items} == {"en", "zh"}
    for item in items:
        verdict = score(item["caption"], _pil(item["image"]))
        assert verdict.strict and verdict.category == item["category"]
    # item i is sample_example on rng (seed, 0, i) after the language draw: the same pixels
    rng = np.random.default_rng([3, 0, 0])
    lang = str(rng.choice(["en", "zh"]))
    example = sample_example(rng, lang=lang)
    assert items[0]["caption"] == example.prompt
    assert np.array_equal(np.asarray(_pil(items[0]["image"])), np.asarray(render(example.scene, 64)))


def test_shapes_caption_modes_and_languages():
    scene_items = list(islice(ShapesWorldDataset(32, captions="scene", lang="en"), 8))
    assert all(i["category"] == "scene" and i["caption"].startswith(("a ", "an ")) for i in scene_items)
    chinese = list(islice(ShapesWorldDataset(32, captions="mixed", lang="zh"), 16))
    assert all(i["caption"].startswith(("一个", "两个", "三个", "四个")) for i in chinese)
    assert {i["category"] == "scene" for i in chinese} == {True, False}
    for bad in (dict(lang="fr"), dict(captions="words"), dict(length=0)):
        with pytest.raises(ValueError):
            ShapesWorldDataset(32, **bad)
    with pytest.raises(ValueError, match="rank and world_size"):
        list(islice(ShapesWorldDataset(32, rank=1), 1))
    with pytest.raises(TypeError, match="endless"):
        len(ShapesWorldDataset(32))


def test_endless_stream_interleaves_workers_in_index_order():
    ds = ShapesWorldDataset(size=32, seed=4)
    assert isinstance(ds, IterableDataset) and isinstance(ds, ShapesWorldDataset)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    got = [_fingerprint(item) for item in islice(loader, 8)]
    assert got == [_fingerprint(ds[i]) for i in range(8)]
    ds.set_epoch(1)
    assert _fingerprint(ds[0]) != got[0]  # an endless stream gets fresh scenes each epoch
    fixed = ShapesWorldDataset(size=32, seed=4, length=3)
    before = _fingerprint(fixed[0])
    fixed.set_epoch(1)
    assert _fingerprint(fixed[0]) == before


def test_endless_stream_splits_over_two_ranks_and_two_workers():
    got = []
    for rank in (0, 1):
        ds = ShapesWorldDataset(size=32, seed=2, rank=rank, world_size=2)
        got += [_fingerprint(item) for item in islice(DataLoader(ds, batch_size=None, num_workers=2), 6)]
    assert sorted(got) == sorted(_fingerprint(ShapesWorldDataset(size=32, seed=2)[i]) for i in range(12))


def test_fixed_length_set_is_map_style_and_survives_pickling():
    ds = ShapesWorldDataset(size=32, length=5, seed=1)
    assert not isinstance(ds, IterableDataset) and len(ds) == 5
    copy = pickle.loads(pickle.dumps(ds))
    assert type(copy) is ShapesWorldDataset and _fingerprint(copy[4]) == _fingerprint(ds[4])
    stream = pickle.loads(pickle.dumps(ShapesWorldDataset(size=32, seed=1)))
    assert isinstance(stream, IterableDataset) and _fingerprint(stream[0]) == _fingerprint(ds[0])  # same item 0
    with pytest.raises(IndexError):
        ds[5]
    shuffled = list(DataLoader(ds, batch_size=2, shuffle=True, num_workers=2, collate_fn=collate_captions))
    assert sorted(c for b in shuffled for c in b["caption"]) == sorted(ds[i]["caption"] for i in range(5))


# ----------------------------------------------------------------------------- files

def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _stripes(width: int, height: int) -> Image.Image:
    """Red outer thirds, blue middle third."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:] = (220, 40, 40)
    pixels[:, width // 3:2 * width // 3] = (40, 80, 220)
    return Image.fromarray(pixels)


@pytest.fixture
def folder(tmp_path):
    _stripes(60, 20).save(tmp_path / "good.png")
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[:, 10:] = (220, 40, 40, 255)  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.new("L", (20, 20), 100).save(tmp_path / "gray.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (tmp_path / "truncated.png").write_bytes(_png(Image.fromarray(noise))[:3000])
    (tmp_path / "fake.jpg").write_text("this is not a JPEG")
    records = [{"file": "good.png", "caption": "stripes", "caption_zh": "条纹", "concept": "stripes"},
               {"image": "rgba.png", "caption": "rgba"},
               {"file": "truncated.png", "caption": "t"}, {"file": "gray.png", "caption": "gray"},
               {"file": "fake.jpg", "caption": "f"}, {"file": "missing.png", "caption": "m"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                             encoding="utf-8")
    return tmp_path


def test_folder_converts_crops_and_skips_bad_files(folder):
    ds = ImageCaptionFolder(folder, size=16)
    assert len(ds) == 6
    with pytest.warns(UserWarning) as caught:
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 3
    named = " ".join(str(w.message) for w in caught)
    assert all(name in named for name in ("truncated.png", "fake.jpg", "missing.png"))
    assert [i["file"] for i in items] == ["good.png", "rgba.png", "gray.png", "gray.png", "good.png", "good.png"]
    assert [(i["caption_zh"], i["concept"]) for i in items[:2]] == [("条纹", "stripes"), ("", "")]
    assert all(i["image"].shape == (3, 16, 16) for i in items)
    stripes, rgba, gray = (i["image"] for i in items[:3])
    assert (stripes[2] > stripes[0]).all()        # centre crop keeps only the blue middle third
    assert torch.allclose(rgba[:, 8, 0], torch.ones(3))                                    # transparent -> white
    assert torch.allclose(rgba[:, 8, 15], torch.tensor([220, 40, 40]) / 127.5 - 1, atol=0.02)
    assert torch.allclose(gray, torch.full((3, 16, 16), 100 / 127.5 - 1))                  # grayscale -> RGB


def test_folder_languages_and_listing_errors(folder, tmp_path_factory):
    assert [c for _, c in ImageCaptionFolder(folder, 16, lang="zh").items][:2] == ["条纹", "rgba"]
    assert len(ImageCaptionFolder(folder, 16, lang="both")) == 7
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        ImageCaptionFolder(empty, 16)
    (empty / "captions.jsonl").write_text('{"file": "a.png", "caption": "x"}\n{"file": "b.png"\n')
    with pytest.raises(ValueError, match="captions.jsonl:2"):
        ImageCaptionFolder(empty, 16)
    (empty / "captions.jsonl").write_text('{"file": "a.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="'caption'"):
        ImageCaptionFolder(empty, 16)


def test_folder_skip_count_is_shared_by_workers(folder):
    ds = ImageCaptionFolder(folder, size=16)
    batches = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_captions))
    assert [b["image"].shape for b in batches] == [(2, 3, 16, 16)] * 3
    assert ds.skipped == 3


def _write_shards(root, n_shards=8, per_shard=3):
    """8 shards x 3 samples: PNG (RGBA in shard 2, JPEG in shard 6), one corrupt PNG, one sample
    without an image, one broken JSON caption, one JSON caption with caption_zh.
    Returns (readable keys, unreadable keys)."""
    good, bad = [], []
    for shard in range(n_shards):
        with tarfile.open(root / f"shard-{shard:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key, members = f"s{shard}_{i}", {}
                colour = (shard * 30, i * 80, 100)
                if (shard, i) == (0, 1):
                    members["png"] = b"not a png at all"
                elif (shard, i) != (5, 0):
                    image = Image.new("RGBA" if shard == 2 else "RGB", (24, 18), colour)
                    if shard == 6:
                        buffer = io.BytesIO()
                        image.save(buffer, format="JPEG")
                        members["jpg"] = buffer.getvalue()
                    else:
                        members["png"] = _png(image)
                if (shard, i) == (3, 2):
                    members["json"] = json.dumps({"caption": "json en", "caption_zh": "中文"}).encode()
                elif (shard, i) == (4, 0):
                    members["json"] = b'{"caption": "cut short'
                else:
                    members["txt"] = f"caption {key}".encode()
                (good if (shard, i) not in ((0, 1), (5, 0), (4, 0)) else bad).append(key)
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return good, bad


def test_webdataset_reads_captions_and_skips_bad_samples(tmp_path):
    good, _ = _write_shards(tmp_path)
    ds = WebDatasetShards(str(tmp_path / "shard-{000..007}.tar"), size=16, lang="both")
    with pytest.warns(UserWarning) as caught:
        items = list(ds)
    skips = [str(w.message) for w in caught if str(w.message).startswith("skipping")]
    assert sorted(m.split(".tar:")[1].split(":")[0] for m in skips) == ["s0_1", "s4_0", "s5_0"], skips
    assert ds.skipped == 3
    assert sorted({i["key"] for i in items}) == sorted(good)
    assert len(items) == len(good) + 1  # the JSON sample yields its English and Chinese captions
    assert [i["caption"] for i in items if i["key"] == "s3_2"] == ["json en", "中文"]
    assert all(i["image"].shape == (3, 16, 16) for i in items)
    first = next(i for i in items if i["key"] == "s1_2")
    assert torch.allclose(first["image"][:, 0, 0], torch.tensor([30, 160, 100]) / 127.5 - 1, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="4 of 4 shards do not exist"):
        WebDatasetShards(str(tmp_path / "nothing-{0..3}.tar"), size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        WebDatasetShards(tmp_path / "empty", size=16)


def test_webdataset_splits_two_ranks_by_two_workers_exactly_once(tmp_path):
    good, _ = _write_shards(tmp_path)
    keys, skipped = [], 0
    for rank in (0, 1):
        ds = WebDatasetShards(tmp_path, size=16, rank=rank, world_size=2)
        keys += [item["key"] for item in DataLoader(ds, batch_size=None, num_workers=2)]
        skipped += ds.skipped
    assert sorted(keys) == sorted(good)  # every readable sample once, none twice
    assert skipped == 3


# ----------------------------------------------------------------------------- DataModule

class _MeanColourModel(L.LightningModule):
    """Smallest real consumer of the batches: predicts an image's mean colour from nothing."""

    def __init__(self):
        super().__init__()
        self.colour = torch.nn.Parameter(torch.zeros(3))
        self.shapes_seen = []

    def training_step(self, batch, batch_idx):
        self.shapes_seen.append(("train", tuple(batch["image"].shape), len(batch["caption"])))
        return ((batch["image"].mean((2, 3)) - self.colour) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.shapes_seen.append(("val", tuple(batch["image"].shape), len(batch["caption"])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_feeds_a_lightning_trainer():
    dm = ImageTextDataModule("shapes", image_size=32, batch_size=4, val_length=6)
    model = _MeanColourModel()
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.shapes_seen == [("train", (4, 3, 32, 32), 4)] * 2 + [("val", (4, 3, 32, 32), 4),
                                                                      ("val", (2, 3, 32, 32), 2)]
    assert model.colour.abs().sum() > 0  # the optimiser stepped on real pixels
    assert [len(b["caption"]) for b in dm.val_dataloader()] == [4, 2]


@pytest.mark.filterwarnings("ignore:skipping unreadable sample")  # the fixtures' bad files, on purpose
def test_datamodule_folder_and_webdataset_sources(folder, tmp_path):
    dm = ImageTextDataModule("folder", path=str(folder), image_size=16, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and all(isinstance(c, str) for c in batch["caption"])
    assert dm.val_dataloader() == []
    _write_shards(tmp_path)
    dm = ImageTextDataModule("webdataset", path=str(tmp_path), val_path=str(tmp_path), image_size=16, batch_size=5)
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()))["image"].shape == (5, 3, 16, 16)
    with pytest.raises(ValueError, match="needs path"):
        ImageTextDataModule("folder")
    with pytest.raises(ValueError, match="source"):
        ImageTextDataModule("imagenet")
