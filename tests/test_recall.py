"""train/recall.py: code-space recall of training images from their captions, and the sampling pieces it uses
(generate with given first codes, image_nll)."""

from __future__ import annotations

import pytest
import torch

from mars.model import build_batch
from mars.sampling import generate_images, image_nll
from train.codes import CodeSet
from train.recall import main, nearest_items, pick_items, recall

CAPTIONS = [("a red circle", "一个红色的圆形"), ("a blue square", "一个蓝色的正方形"),
            ("a green triangle", "一个绿色的三角形"), ("two red circles", "两个红色的圆形")]


def greedy(pipe, prompts, **kwargs) -> torch.Tensor:
    ids = pipe.encode_prompts(prompts, super_resolution=False)
    return generate_images(pipe.model, ids, temperature=0.0, **kwargs)  # (B, 8, 8)


@pytest.fixture(scope="module")
def drawn(tiny_pipe) -> CodeSet:
    """A codes set whose images are the model's own greedy drawings of their English captions."""
    codes = greedy(tiny_pipe, [en for en, _ in CAPTIONS]).to(torch.int16)
    records = [{"index": i, "category": None, "captions": {"caption_en": en, "caption_zh": zh}, "concept": f"c{i}"}
               for i, (en, zh) in enumerate(CAPTIONS)]
    return CodeSet({128: codes}, records, {"codebook_size": 256, "held_out": 0})


def test_nearest_items_finds_the_row_sharing_the_most_cells():
    codes = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0], [5, 6, 7, 8]])
    index, agreement = nearest_items(torch.tensor([[1, 2, 0, 9], [5, 6, 7, 8], [0, 0, 3, 4]]), codes, chunk=2)
    assert index.tolist() == [1, 2, 0] and agreement.tolist() == [0.75, 1.0, 0.5]


def test_given_first_codes_are_kept_and_the_rest_follow_them(tiny_pipe):
    prompts = ["a red circle", "a blue square"]
    full = greedy(tiny_pipe, prompts)  # (2, 8, 8)
    for given in (0, 5, 64):  # greedy decoding after its own first codes is the same drawing
        assert torch.equal(greedy(tiny_pipe, prompts, first_codes=full.flatten(1)[:, :given]), full)
    other = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    forced = greedy(tiny_pipe, prompts, guidance_scale=3.0, first_codes=other).flatten(1)
    assert torch.equal(forced[:, :10], other)
    with pytest.raises(ValueError, match="first_codes has shape"):
        greedy(tiny_pipe, prompts, first_codes=other[:1])


def test_image_nll_is_the_models_image_loss_cell_by_cell(tiny_pipe):
    ids = tiny_pipe.encode_prompts(["a red circle", "a green triangle"], super_resolution=False)
    codes = torch.randint(0, 256, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    nll = image_nll(tiny_pipe.model, ids, codes)
    assert nll.shape == (2, 64)
    with torch.no_grad():
        torch.testing.assert_close(nll.mean(), tiny_pipe.model(**build_batch(tiny_pipe.model, ids, codes)).image_loss)


def test_a_model_that_draws_its_training_images_recalls_them(tiny_pipe, drawn):
    items = pick_items(drawn, 3)
    assert len(items) == 3 and items == pick_items(drawn, 3)  # a fixed draw
    report = recall(tiny_pipe, drawn, items, settings=((1.0, 0.0),), first_codes=64)
    plain, given = report["settings"]
    assert plain["first_codes"] == 0 and plain["match_en"] == 1.0 and plain["agreement"] >= 0.5
    assert given["first_codes"] == 64 and given["match"] == given["same"] == given["agreement"] == 1.0
    assert report["languages"] == ["en", "zh"] and report["training_items"] == 4
    for name in ("own", "empty", "other"):
        assert set(report[f"nll_{name}"]) == {"first_row", "rest", "all"}
    texts = [CAPTIONS[i][0] for i in items] + [CAPTIONS[i][1] for i in items]
    own = image_nll(tiny_pipe.model, tiny_pipe.encode_prompts(texts, False), drawn.codes[128][items + items].long())
    assert report["nll_own"]["first_row"] == pytest.approx(own[:, :8].mean().item(), rel=1e-5)
    assert report["nll_own"]["rest"] == pytest.approx(own[:, 8:].mean().item(), rel=1e-5)


def test_the_command_needs_a_model_and_codes(capsys):
    for argv in ([], ["--checkpoint", "x"], ["--mars", "m", "--codes", "c"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert capsys.readouterr().err.strip().count("\n") == 0  # one line
