"""Tests for sample.py (the sampling CLI) and `python -m mars.eval --generate`, on the tiny random bundle.

    OMP_NUM_THREADS=1 python -m pytest tests/test_sample.py -q

Most tests run `main(argv)` in-process; `reuse_tiny_pipe` (tests/conftest.py) hands them the session's
loaded pipeline instead of reloading the bundle each time (tests marked `real load` do load it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from mars import cli as mars_cli
from mars import eval as mars_eval
from mars.shapes import CATEGORIES, render, scene_for_prompt

REPO = Path(__file__).resolve().parents[1]
LONG_PROMPT = " and ".join(["a red circle"] * 60)  # 239 tokens; the tiny bundle has room for 191 (446 without SR)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def only_line(err: str) -> str:
    """The error output must be one line (progress bars draw with \\r, so none may precede it)."""
    lines = err.strip().split("\n")
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- bad input: exit 2, one line --------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["a circle", "--cfg", "-1"], "argument --cfg: -1 is out of range: use a value >= 1 (1 turns guidance off)"),
    (["a circle", "--cfg", "0"], "argument --cfg: 0 is out of range: use a value >= 1"),
    (["a circle", "--top-p", "2"], "argument --top-p: 2 is out of range: use a value in (0, 1]"),
    (["a circle", "--top-p", "0"], "argument --top-p: 0 is out of range"),
    (["a circle", "--temperature", "nan"], "argument --temperature: nan is out of range"),
    (["a circle", "--top-k", "-1"], "argument --top-k: -1 is out of range: use an integer >= 1, or 0 for off"),
    (["a circle", "--sr-cfg", "-2"], "argument --sr-cfg: -2 is out of range: use a value >= 1"),
    (["a circle", "--sr-temperature", "inf"], "argument --sr-temperature: inf is out of range"),
    (["a circle", "--num-images", "two"], "argument --num-images: 'two' is not an integer"),
    (["a circle", "--dtype", "float8"], "argument --dtype: invalid choice"),
    ([], "give exactly one of a prompt, --prompts FILE or --caption IMAGE (got 0)"),
    (["a circle", "--caption", "x.png"], "give exactly one of a prompt, --prompts FILE or --caption IMAGE (got 2)"),
    (["--prompts", "p.txt"], "--prompts FILE and --outdir DIR go together"),
    (["a circle", "-o", "out"], "-o out: name an image file, e.g. out.png"),
])
def test_bad_flags_exit_2_with_one_usage_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        sample.main(argv)
    assert exited.value.code == 2
    assert only_line(capsys.readouterr().err).startswith("sample.py: error: " + message)


@pytest.mark.parametrize("argv, message", [
    ([""], "empty prompt: describe the image"),
    (["  "], "empty prompt"),
    ([LONG_PROMPT], "prompt is 239 tokens; this model takes at most 191 (446 without super-resolution): shorten it"),
    (["a red hexagon"], "prompt contains tokens the model never saw: ' hexagon'"),
    (["一个红色的六边形"], "prompt contains tokens the model never saw"),
    (["a circle", "--device", "tpu9"], "--device 'tpu9' is not a device: use cpu, cuda, cuda:N or mps"),
])
def test_bad_prompts_and_devices_exit_2_with_one_line(capsys, reuse_tiny_pipe, argv, message):
    code, out, err = run(capsys, *argv, "--checkpoint", reuse_tiny_pipe)
    assert code == 2 and out == ""
    assert only_line(err).startswith("error: " + message)


def test_a_prompts_file_is_checked_whole_before_any_image(capsys, reuse_tiny_pipe, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\na red hexagon\n", encoding="utf-8")
    code, out, err = run(capsys, "--prompts", tmp_path / "prompts.txt", "--outdir", tmp_path / "out",
                         "--checkpoint", reuse_tiny_pipe)
    assert code == 2 and out == "" and not (tmp_path / "out").exists()
    assert only_line(err) == ("error: prompt contains tokens the model never saw: ' hexagon'; "
                              "rephrase with words from the training captions (prompt 2 of 2)")


def test_a_long_prompt_fits_without_super_resolution(capsys, reuse_tiny_pipe, tmp_path):
    code, _, err = run(capsys, LONG_PROMPT, "--no-sr", "--checkpoint", reuse_tiny_pipe, "-o", tmp_path / "long.png")
    assert code == 0, err
    assert Image.open(tmp_path / "long.png").size == (128, 128)


def test_unreadable_checkpoints_and_inputs_exit_2(capsys, tiny_bundle, tmp_path, monkeypatch):  # real load
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model_index.json").write_text("{not json")
    broken_image = tmp_path / "broken.png"
    broken_image.write_text("not an image")
    cases = [
        (["a circle", "--checkpoint", tmp_path / "absent"], "model_index.json not found"),
        (["a circle", "--checkpoint", corrupt], "model_index.json is corrupt"),
        (["--caption", broken_image, "--checkpoint", tiny_bundle], "cannot read image"),
        (["--prompts", tmp_path / "none.txt", "--outdir", tmp_path / "out"], "cannot read prompts file"),
    ]
    monkeypatch.setattr(mars_cli, "DEFAULT_CHECKPOINT", tmp_path / "checkpoints" / "mars-shapes")
    cases.append((["a circle"], f"the default model {tmp_path / 'checkpoints' / 'mars-shapes'} is missing: train one "
                                "with `python -m train.pipeline --preset shapes`"))
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "", argv
        assert message in only_line(err), (argv, err)
    assert "--checkpoint" in err  # the missing default says how to point elsewhere
    (tmp_path / "blank.txt").write_text("\n  \n")
    code, _, err = run(capsys, "--prompts", tmp_path / "blank.txt", "--outdir", tmp_path / "out")
    assert code == 2 and "holds no prompt" in only_line(err)


def test_the_real_script_exits_2_without_a_traceback():
    result = subprocess.run([sys.executable, "sample.py", "a circle", "--top-p", "2"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "sample.py: error: argument --top-p: 2 is out of range: use a value in (0, 1]\n"


# --- sampling ---------------------------------------------------------------------------------

def test_a_run_writes_a_256_px_png_with_progress_bars(capsys, tiny_bundle, tmp_path):  # real load
    code, out, err = run(capsys, "a red circle above a blue square", "--checkpoint", tiny_bundle,
                         "-o", tmp_path / "deep" / "out.png", "--cfg", "2", "--top-k", "50", "--top-p", "0.9",
                         "--sr-cfg", "1.5", "--sr-temperature", "0.5")
    assert code == 0, err
    assert Image.open(tmp_path / "deep" / "out.png").size == (256, 256)
    assert "base: 100%" in err and "superres: 100%" in err and "64/64" in err
    assert out.strip() == f"wrote {tmp_path / 'deep' / 'out.png'}"


def test_the_shipped_emoji_model_draws_on_white_from_either_language(capsys, tmp_path):  # real load
    for prompt in ("red apple, flat outline style", "红苹果，扁平描边风格"):
        code, _, err = run(capsys, prompt, "--checkpoint", REPO / "checkpoints" / "mars-emoji", "-o", tmp_path / "a.png")
        assert code == 0, err
        image = pixels(tmp_path / "a.png").astype(np.float64)  # (128, 128, 3)
        assert image.shape == (128, 128, 3)
        border = np.concatenate([image[:4], image[-4:], image[:, :4].swapaxes(0, 1), image[:, -4:].swapaxes(0, 1)])
        assert border.mean() > 235  # the white ground of every training image: a trained model, not noise
        assert (image[32:96, 32:96].min(axis=-1) < 200).mean() > 0.05  # and something drawn on it


def test_no_sr_writes_the_128_px_base_image(capsys, reuse_tiny_pipe, tmp_path):
    code, _, err = run(capsys, "两个蓝色的正方形", "--no-sr", "--checkpoint", reuse_tiny_pipe, "-o", tmp_path / "base.png")
    assert code == 0, err
    assert Image.open(tmp_path / "base.png").size == (128, 128)
    assert "base: 100%" in err and "superres" not in err


def test_num_images_writes_a_grid_of_the_single_files(capsys, reuse_tiny_pipe, tmp_path):
    code, out, _ = run(capsys, "a green triangle", "--num-images", "3", "--no-sr", "--checkpoint", reuse_tiny_pipe,
                       "-o", tmp_path / "grid.png")
    assert code == 0 and "3 single images" in out
    grid = pixels(tmp_path / "grid.png")
    assert grid.shape == (256, 256, 3)  # 2 x 2 tiles of 128 px, the fourth left white
    singles = [pixels(tmp_path / f"grid-{i}.png") for i in range(3)]
    assert not (tmp_path / "grid-3.png").exists()
    for index, single in enumerate(singles):
        row, column = divmod(index, 2)
        assert np.array_equal(grid[128 * row:128 * (row + 1), 128 * column:128 * (column + 1)], single)
    assert (grid[128:, 128:] == 255).all()
    assert not np.array_equal(singles[0], singles[1])


def test_same_seed_same_image_other_seed_other_image(capsys, reuse_tiny_pipe, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):  # the random test model's greedy upsampling draws one
        assert run(capsys, "a yellow square", "--seed", seed, "--checkpoint", reuse_tiny_pipe,  # image for any input
                   "--sr-temperature", "1", "-o", tmp_path / f"{name}.png")[0] == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


def test_prompts_file_writes_numbered_images_and_a_reproducible_listing(capsys, reuse_tiny_pipe, tmp_path):
    prompts = ["a red circle", "两个正方形", "a square to the left of a triangle"]
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n  {prompts[1]}  \n{prompts[2]}\n", encoding="utf-8")
    outdir = tmp_path / "samples"
    code, out, err = run(capsys, "--prompts", tmp_path / "prompts.txt", "--outdir", outdir, "--seed", "5",
                         "--no-sr", "--checkpoint", reuse_tiny_pipe)
    assert code == 0, err
    assert out.strip() == f"wrote 3 images and prompts.jsonl to {outdir}"
    rows = [json.loads(line) for line in (outdir / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"file": f"{k:06d}.png", "prompt": p, "seed": 5 + k} for k, p in enumerate(prompts)]
    assert sorted(p.name for p in outdir.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    # A row's seed reproduces its image on its own.
    assert run(capsys, prompts[1], "--seed", "6", "--no-sr", "--checkpoint", reuse_tiny_pipe,
               "-o", tmp_path / "again.png")[0] == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(outdir / "000001.png"))
    # The folder is what mars.eval --images reads (shapes-world category prompts score).
    assert mars_eval.main(["--images", str(outdir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["all"]["n"] == 3


def test_caption_prints_the_pipelines_caption(capsys, reuse_tiny_pipe, tiny_pipe, tmp_path):
    image = render(scene_for_prompt("a red circle"), 128)
    image.save(tmp_path / "circle.png")
    code, out, err = run(capsys, "--caption", tmp_path / "circle.png", "--checkpoint", reuse_tiny_pipe)
    assert code == 0, err
    caption = tiny_pipe.caption(image)
    assert isinstance(caption, str) and caption.strip() and out == caption + "\n"
    # A PNG whose white background is transparent black reads as the same picture.
    pixels = np.asarray(image)
    background = (pixels == 255).all(-1, keepdims=True)
    rgba = np.concatenate([np.where(background, 0, pixels), np.where(background, 0, 255)], -1).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    assert run(capsys, "--caption", tmp_path / "transparent.png", "--checkpoint", reuse_tiny_pipe)[1] == out


# --- python -m mars.eval --generate -----------------------------------------------------------

def run_eval(capsys, *argv) -> tuple[int, str, str]:
    code = mars_eval.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_generate_prints_the_category_table(capsys, reuse_tiny_pipe):
    code, out, err = run_eval(capsys, "--generate", "--n", "12", "--checkpoint", reuse_tiny_pipe, "--no-sr",
                              "--batch-size", "5")
    assert code == 0, err
    table = out.splitlines()
    assert table[0].split() == ["category", "n", "acc", "strict", "en", "acc", "en", "strict",
                                "zh", "acc", "zh", "strict"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:] if not line.startswith("-")}
    assert list(rows) == [*CATEGORIES, "overall"]
    assert all(rows[category][0] == "2" for category in CATEGORIES) and rows["overall"][0] == "12"
    assert "sampling: 100%" in err and "12/12" in err


def test_eval_generate_json_and_saved_images_rescore_identically(capsys, reuse_tiny_pipe, tmp_path):
    out_dir = tmp_path / "generated"
    code, out, err = run_eval(capsys, "--generate", "--n", "6", "--lang", "zh", "--seed", "3", "--cfg", "2",
                              "--checkpoint", reuse_tiny_pipe, "--json", "--out", out_dir)
    assert code == 0, err
    report = json.loads(out)
    assert report["all"]["n"] == 6 and list(report["by_lang"]) == ["zh"]
    assert set(report["all"]["categories"]) == set(CATEGORIES)
    rows = [json.loads(line) for line in (out_dir / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["category"] for row in rows] == list(CATEGORIES) and {row["lang"] for row in rows} == {"zh"}
    assert all(Image.open(out_dir / row["file"]).size == (256, 256) for row in rows)
    assert rows == [{"file": f"{i:06d}.png", **row} for i, row in enumerate(mars_eval.category_prompts(6, ("zh",), 3))]
    assert run_eval(capsys, "--images", out_dir, "--json")[1] == out  # PNGs are lossless: same verdicts


def test_eval_generate_bad_input_exits_2(capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as exited:
        mars_eval.main(["--generate", "--cfg", "-1"])
    assert exited.value.code == 2
    assert only_line(capsys.readouterr().err).startswith("python -m mars.eval: error: argument --cfg: -1")
    monkeypatch.setattr(mars_cli, "DEFAULT_CHECKPOINT", tmp_path / "mars-shapes")
    code, out, err = run_eval(capsys, "--generate", "--n", "6")
    assert code == 2 and "python -m train.pipeline --preset shapes" in only_line(err)
