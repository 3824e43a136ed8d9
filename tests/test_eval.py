"""Tests for mars/eval.py: the evaluation CLI and its library functions."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mars import eval as mars_eval
from mars import shapes
from mars.shapes import CATEGORIES, render, sample_example, scene_for_prompt


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    shapes.main(["--n", "24", "--size", "64", "--seed", "1", "--out", str(out)])
    return out


def test_table_of_generated_images_is_all_ones(folder, capsys):
    assert mars_eval.main(["--images", str(folder)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["category", "n", "acc", "strict", "en", "acc", "en", "strict",
                                "zh", "acc", "zh", "strict"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:] if not line.startswith("-")}
    assert list(rows) == [*CATEGORIES, "overall"]
    assert rows["overall"] == ["24"] + ["1.000"] * 6
    assert rows["counting"] == ["4"] + ["1.000"] * 6


def test_json_output_via_the_real_cli(folder):
    result = subprocess.run([sys.executable, "-m", "mars.eval", "--images", str(folder), "--json"],
                            capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert report["all"]["overall"] == 1.0 and report["all"]["overall_strict"] == 1.0
    assert report["all"]["n"] == 24
    assert set(report["by_lang"]) == {"en", "zh"}
    assert report["by_lang"]["zh"]["n"] == 12


def test_prompts_jsonl_with_wrong_prompts_scores_exactly(tmp_path):
    rows = []
    for i, (truth, asked) in enumerate([("a red circle", "a red circle"), ("a red circle", "a blue circle"),
                                        ("two squares", "两个正方形"), ("two squares", "三个正方形")]):
        render(scene_for_prompt(truth, seed=i), 64).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "prompt": asked}, ensure_ascii=False))
    (tmp_path / "prompts.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = mars_eval.evaluate([(p, Image.open(f)) for f, p in mars_eval.read_listing(tmp_path)], progress=False)
    assert report["all"]["categories"] == {"colors": {"n": 2, "accuracy": 0.5, "strict": 0.5},
                                           "counting": {"n": 2, "accuracy": 0.5, "strict": 0.5}}
    assert report["by_lang"]["zh"]["overall"] == 0.5 and report["by_lang"]["en"]["overall"] == 0.5
    table = mars_eval.format_table(report)
    assert "missing: single_object, two_object, position, color_attr" in table


def test_library_scores_in_memory_images():
    example = sample_example(np.random.default_rng(0), "position", "en")
    report = mars_eval.evaluate([(example.prompt, render(example.scene, 128)),
                                 (example.prompt, Image.new("RGB", (128, 128), "white"))], progress=False)
    assert report["all"]["overall"] == 0.5
    assert [v["passed"] for v in report["verdicts"]] == [True, False]
    assert "en acc" not in mars_eval.format_table(report)  # one language: no per-language columns


def _run_cli(capsys, folder) -> tuple[int, str]:
    """Exit code and the error text, which must be exactly one line (progress bars aside)."""
    code = mars_eval.main(["--images", str(folder)])
    errors = [line for line in capsys.readouterr().err.split("\n") if line.startswith("error:")]
    assert len(errors) == 1, errors
    return code, errors[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    code, err = _run_cli(capsys, tmp_path / "absent")
    assert code == 2 and "does not exist" in err
    code, err = _run_cli(capsys, tmp_path)
    assert code == 2 and "neither captions.jsonl nor prompts.jsonl" in err

    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "broken.png", "caption": "a circle"}) + "\n")
    code, err = _run_cli(capsys, tmp_path)
    assert code == 2 and "broken.png" in err

    render(scene_for_prompt("a circle"), 64).save(tmp_path / "ok.png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "ok.png", "caption": "a hexagon"}) + "\n")
    code, err = _run_cli(capsys, tmp_path)
    assert code == 2 and "cannot parse prompt 'a hexagon'" in err

    (tmp_path / "captions.jsonl").write_text('{"file": "ok.png"\n')
    code, err = _run_cli(capsys, tmp_path)
    assert code == 2 and "captions.jsonl:1" in err


def test_a_listing_line_that_is_not_an_object_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "captions.jsonl").write_text('[1, 2]\n')
    assert mars_eval.main(["--images", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "captions.jsonl:1" in err and "JSON object" in err and "\n" not in err


def test_failure_sheet_tiles_only_the_failed_images_with_their_prompts():
    prompts = ["a red circle", "两个正方形", "a blue square"]
    drawn = [render(scene_for_prompt(prompts[0]), 64), Image.new("RGB", (64, 64), "white"),
             render(scene_for_prompt("a red circle"), 64)]  # the last two fail their prompts
    pairs = list(zip(prompts, drawn))
    report = mars_eval.evaluate(pairs, progress=False)
    sheet = mars_eval.failure_sheet(pairs, report)
    tile = mars_eval.SHEET_TILE
    assert sheet.width == mars_eval.SHEET_COLUMNS * tile and sheet.height > tile
    cells = np.asarray(sheet)[:tile, :3 * tile]
    assert (cells[2:-2, 2:tile - 2] == 255).all()  # first tile: the blank image that failed
    assert not (cells[2:-2, tile + 2:2 * tile - 2] == 255).all()  # second: the red circle drawn for a blue square
    assert (cells[2:-2, 2 * tile + 2:3 * tile - 2] == 255).all()  # no third failure
    assert mars_eval.failure_sheet(pairs[:1], mars_eval.evaluate(pairs[:1], progress=False)) is None
