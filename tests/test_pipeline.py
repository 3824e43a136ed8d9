"""Tests of the end-to-end smoke pipeline (train/pipeline.py) and of MarsPipeline (mars/pipeline.py).

    OMP_NUM_THREADS=1 python -m pytest tests/test_pipeline.py -q

One module fixture runs `python -m train.pipeline --preset shapes --smoke` (every stage, real
Lightning runs, about a minute on 2 cores); the tests then load, sample, re-save, break and rerun it.
The input checks (prompts, sampler settings, images) run on conftest's tiny random bundle.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import mars
from mars.model import build_batch, trainable_parameters
from mars.pipeline import DEFAULT_SAMPLING, SAMPLER_LIMITS, MarsPipeline, MarsPipelineOutput
from mars.sampling import caption_nll, generate_images
from mars.shapes import render, scene_for_prompt
from mars.tuning import read_trials, tune_sampling
from mars.tokenizer import PromptTokenizer, load_qwen_tokenizer
from mars.device import describe_hardware
from train.pipeline import CONFIG_DIR, PIPELINE_PRESETS, StageClock, hold_run_lock, load_stage_config
from vq import VQTokenizer

REPO = Path(__file__).resolve().parents[1]
FIT_STAGES = ("text", "vq", "stage1", "stage2")


def run_pipeline(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "train.pipeline", "--preset", "shapes", "--smoke", "--out", str(out), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    result = run_pipeline(out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def pipe(smoke_run) -> MarsPipeline:
    return MarsPipeline.from_pretrained(smoke_run / "bundle")


def sample(pipe: MarsPipeline, prompt="a red circle", seed=0, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs)


# --- the smoke pipeline --------------------------------------------------------------------------

@pytest.mark.slow
def test_bundle_samples_images_of_the_right_size(smoke_run, pipe):
    index = json.loads((smoke_run / "bundle" / "model_index.json").read_text())
    has_superres = pipe.superres is not None
    assert (index["superres"] is not None) == has_superres == (smoke_run / "superres" / "export").is_dir()
    out = sample(pipe, ["a red circle", "两个蓝色的正方形"], num_images_per_prompt=2)
    side = index["image_size"]
    assert side == 128 * (2 if has_superres else 1)
    assert len(out.images) == 4 and all(isinstance(im, Image.Image) and im.size == (side, side) for im in out.images)
    assert out.codes.shape == (4, side // 16, side // 16)
    base = sample(pipe, super_resolution=False)
    assert base.images[0].size == (128, 128) and base.codes.shape == (1, 8, 8)
    assert torch.equal(sample(pipe).codes, sample(pipe).codes)  # same generator seed, same image


@pytest.mark.slow
def test_the_bundle_takes_the_best_tuned_base_and_super_resolution_settings(smoke_run, pipe):
    trials = json.loads((smoke_run / "sampling.json").read_text())
    base = [t for t in trials if "sr_temperature" not in t["settings"]]
    upsampling = [t for t in trials if "sr_temperature" in t["settings"]]
    assert len(upsampling) == (2 if pipe.superres is not None else 0)  # the smoke grids
    single = [t["settings"] for t in base if t["settings"]["candidates"] == 1]
    reranked = [t["settings"] for t in base if t["settings"]["candidates"] == 2]
    assert len(single) == 2 and len(base) == 4  # fewer settings than finalists: every one is rerun best of 2
    assert sorted(s["temperature"] for s in reranked) == sorted(s["temperature"] for s in single)
    best = upsampling[0] if upsampling else base[0]
    rank = lambda t: (t["overall"] + t["overall_strict"]) / 2  # noqa: E731
    assert rank(best) == max(map(rank, upsampling or base))
    assert all(t["settings"].items() >= base[0]["settings"].items() for t in upsampling)  # on the best base
    assert pipe.sampling == DEFAULT_SAMPLING | best["settings"] | {"top_k": best["settings"]["top_k"] or None}


@pytest.mark.slow
def test_every_stage_left_its_product_and_small_trainable_checkpoints(smoke_run):
    for stage in (*FIT_STAGES, "codes", "codes-superres"):
        assert json.loads((smoke_run / stage / "DONE.json").read_text())["product"] == str(smoke_run / stage / "export")
    for stage, codes, sizes in (("stage2", "codes", [128]), ("superres", "codes-superres", [128, 256])):
        if (smoke_run / stage).is_dir():  # each stage reads its own codes: many base-size scenes, fewer pairs
            config = yaml.safe_load((smoke_run / stage / "config.yaml").read_text())
            assert config["data"]["init_args"]["path"] == str(smoke_run / codes / "export")
            assert json.loads((smoke_run / codes / "export" / "meta.json").read_text())["sizes"] == sizes
    for stage in ("stage1", "stage2"):
        checkpoint = torch.load(smoke_run / stage / "checkpoints" / "last.ckpt", weights_only=True)
        exported = load_file(smoke_run / stage / "export" / "mars_trainable.safetensors")
        assert checkpoint["state_dict"].keys() == {f"model.{name}" for name in exported}
    # The evaluation callback scored generated images and logged per-category accuracy.
    metrics = next((smoke_run / "stage2" / "logs").glob("version_*/metrics.csv")).read_text().splitlines()[0]
    assert "eval/overall_strict" in metrics and "eval/color_attr" in metrics
    assert list((smoke_run / "stage2" / "logs").glob("version_*/samples/step_*.png"))


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_resumes_an_unfinished_one(smoke_run, pipe):
    before = {stage: (smoke_run / stage / "DONE.json").stat().st_mtime_ns for stage in FIT_STAGES}
    result = run_pipeline(smoke_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f"[pipeline] {stage}: done" in result.stdout for stage in FIT_STAGES)
    assert before == {stage: (smoke_run / stage / "DONE.json").stat().st_mtime_ns for stage in FIT_STAGES}

    # Stage 2 finished training but "died" before exporting: the rerun resumes it from last.ckpt,
    # trains no further step and exports exactly the weights it had.
    exported = load_file(smoke_run / "stage2" / "export" / "mars_trainable.safetensors")
    shutil.rmtree(smoke_run / "stage2" / "export")
    (smoke_run / "stage2" / "DONE.json").unlink()
    result = run_pipeline(smoke_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "auto-resume" in result.stdout + result.stderr and "[pipeline] stage2: finished" in result.stdout
    assert json.loads((smoke_run / "stage2" / "DONE.json").read_text())["attempts"] == 2  # both count
    again = load_file(smoke_run / "stage2" / "export" / "mars_trainable.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
    reloaded = MarsPipeline.from_pretrained(smoke_run / "bundle")
    assert torch.equal(sample(reloaded).codes, sample(pipe).codes)


@pytest.mark.slow
def test_rerun_with_another_vq_refuses_to_reuse_stages_built_from_the_old_one(smoke_run):
    result = run_pipeline(smoke_run, "--vq", str(REPO / "checkpoints" / "mars-shapes" / "vq"))
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "stage codes" in message and "was built from vq=" in message and "--out" in message


@pytest.mark.slow
def test_given_parts_skip_their_stages_and_the_codes_only_they_read(smoke_run, tmp_path):
    """--superres reuses a trained superres stage for a new base model: no superres stage, no codes-superres."""
    given = {flag: smoke_run / stage / "export" for flag, stage in
             (("--vq", "vq"), ("--text-model", "text"), ("--superres", "superres"))}
    result = run_pipeline(tmp_path, *(str(part) for pair in given.items() for part in pair))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"[pipeline] superres: using {given['--superres']}" in result.stdout
    assert "[pipeline] codes-superres: not needed (no stage left to train reads it)" in result.stdout
    assert not (tmp_path / "superres").exists() and not (tmp_path / "codes-superres").exists()
    assert (tmp_path / "stage2" / "DONE.json").is_file()
    bundled = load_file(tmp_path / "bundle" / "superres" / "superres_trainable.safetensors")
    trained = load_file(given["--superres"] / "superres_trainable.safetensors")
    assert bundled.keys() == trained.keys()
    assert all(torch.equal(bundled[k], trained[k].to(bundled[k].dtype)) for k in trained)


@pytest.mark.slow
def test_a_rerun_with_other_parts_rebuilds_the_bundle_from_them(smoke_run, tmp_path):
    """Given a finished run, --superres swaps its superres model in the bundle; the rerun without it swaps back."""
    own = smoke_run / "superres" / "export"
    other = shutil.copytree(own, tmp_path / "other-superres")
    weights = load_file(own / "superres_trainable.safetensors")
    changed = {name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in weights.items()}
    save_file(changed, other / "superres_trainable.safetensors")
    bundled = smoke_run / "bundle" / "superres" / "superres_trainable.safetensors"
    for superres, expected in ((other, changed), (None, weights)):
        result = run_pipeline(smoke_run, *(("--superres", str(superres)) if superres else ()))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "[pipeline] bundle: rebuilding (superres changed since it was built)" in result.stdout
        assert "bundle written" in result.stdout and "[pipeline] stage2: done" in result.stdout
        assert "tuning goes on" not in result.stdout  # new parts: the tuning starts over
        now = load_file(bundled)
        assert all(torch.equal(now[k], expected[k].to(now[k].dtype)) for k in expected)
    assert json.loads((smoke_run / "pipeline.json").read_text())["bundle_inputs"]["superres"] == str(own.resolve())
    assert "[pipeline] bundle: done" in run_pipeline(smoke_run).stdout  # nothing changed: nothing rebuilt


@pytest.mark.slow
def test_a_run_stopped_while_tuning_goes_on_from_its_finished_trials(smoke_run):
    ranked = (smoke_run / "sampling.json").read_text()
    trials = (smoke_run / "tuning.jsonl").read_text().splitlines()
    assert len(trials) == len(json.loads(ranked))
    # As if the first run had stopped during its third trial: no bundle or pipeline.json yet, two trials logged.
    (smoke_run / "tuning.jsonl").write_text("\n".join(trials[:2]) + "\n")
    (smoke_run / "pipeline.json").unlink()
    shutil.rmtree(smoke_run / "bundle")
    result = run_pipeline(smoke_run)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"[pipeline] bundle: tuning goes on after the 2 trials in {smoke_run / 'tuning.jsonl'}" in result.stdout
    assert (smoke_run / "sampling.json").read_text() == ranked  # the same choice as in one go
    assert (smoke_run / "bundle" / "model_index.json").is_file()


@pytest.mark.slow
def test_the_bundle_records_how_it_was_made(smoke_run):
    provenance = json.loads((smoke_run / "bundle" / "model_index.json").read_text())["provenance"]
    assert provenance["command"] == f"python -m train.pipeline --preset shapes --smoke --out {smoke_run}"
    stages = [stage.name for stage in PIPELINE_PRESETS["shapes"]]
    assert list(provenance["stage_seconds"]) == stages + ["tune"]
    assert all(seconds > 0 for seconds in provenance["stage_seconds"].values())
    summary = json.loads((smoke_run / "pipeline.json").read_text())["stage_seconds"]
    assert list(summary.items()) == [(name, provenance["stage_seconds"][name]) for name in stages]  # in order
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert [commit.removesuffix("+dirty") for commit in provenance["commit"]] == [head]
    assert provenance["hardware"] == [describe_hardware("cpu")] and "cores of" in provenance["hardware"][0]
    assert provenance["given"] == {}


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from train.pipeline import hold_run_lock; lock = hold_run_lock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_pipeline(tmp_path)
        assert result.returncode != 0 and not (tmp_path / "text").exists()
        message = result.stderr.strip().splitlines()[-1]
        assert f"is in use by a running pipeline (pid {holder.pid})" in message and "rerun this command" in message
    finally:
        holder.kill()
        holder.wait()
    hold_run_lock(tmp_path).close()  # the lock went with the killed holder


def test_a_stage_clock_counts_every_attempt_but_not_the_time_between(tmp_path):
    path = tmp_path / "clock.json"
    killed = StageClock(path, beat=0.05).__enter__()
    time.sleep(0.3)
    killed._stop.set()  # the process dies: no __exit__, the heartbeat stops
    first = json.loads(path.read_text())
    assert len(first) == 1 and 0.2 <= first[0][1] - first[0][0] <= 0.4
    time.sleep(0.3)  # down between attempts
    with StageClock(path, beat=0.05) as resumed:
        time.sleep(0.1)
    assert len(resumed.attempts) == 2 and json.loads(path.read_text()) == resumed.attempts
    assert first[0][1] - first[0][0] + 0.1 <= resumed.seconds <= first[0][1] - first[0][0] + 0.3


def test_the_shapes_preset_names_every_stage_config_and_needs_no_overlay():
    """python -m train.pipeline --preset shapes is the whole recipe: each stage's YAML alone (and with its
    train/configs/gpu/ settings) is a complete training config, and no stage needs another file."""
    from train.__main__ import main as train_main

    stages = PIPELINE_PRESETS["shapes"]
    assert [stage.name for stage in stages] == ["text", "vq", "codes", "codes-superres", "stage1", "stage2", "superres"]
    for stage in stages:
        assert stage.config == f"shapes_{stage.name.replace('-', '_')}.yaml" and (CONFIG_DIR / stage.config).is_file()
        if stage.kind == "codes":
            config = load_stage_config(stage, smoke=False, gpu=True)
            assert config["n"] > 0 and config["sizes"] and "scene_weights" in config
            continue
        for gpu in (False, True):
            configs = [CONFIG_DIR / stage.config] + ([CONFIG_DIR / "gpu" / stage.config] if gpu else [])
            configs = [path for path in configs if path.is_file()]
            with pytest.raises(SystemExit) as printed:
                train_main(["fit", *(f"--config={path}" for path in configs), "--print_config"])
            assert printed.value.code in (0, None), (stage.name, gpu)


def test_gpu_settings_keep_the_number_of_training_samples():
    """The GPU files trade steps for batch: the long stages see as many samples either way."""
    for preset, name in (("shapes", "stage2"), ("shapes", "superres"), ("emoji", "stage1"), ("emoji", "stage2")):
        stage = next(stage for stage in PIPELINE_PRESETS[preset] if stage.name == name)
        cpu, gpu = load_stage_config(stage, smoke=False), load_stage_config(stage, smoke=False, gpu=True)
        samples = lambda c: c["trainer"]["max_steps"] * c["data"]["init_args"]["batch_size"]  # noqa: E731
        assert gpu["data"]["init_args"]["batch_size"] > cpu["data"]["init_args"]["batch_size"]
        assert samples(gpu) == samples(cpu)


@pytest.mark.slow
def test_the_gpu_settings_run_through_every_stage(tmp_path):
    """--settings gpu on a CPU: the train/configs/gpu/ files merge and train (the smoke sizes still apply)."""
    result = run_pipeline(tmp_path, "--settings", "gpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for stage in ("vq", "stage2", "superres"):
        assert json.loads((tmp_path / stage / "DONE.json").read_text())["settings"] == "gpu"
        workers = yaml.safe_load((tmp_path / stage / "config.yaml").read_text())["data"]["init_args"]["num_workers"]
        assert workers == yaml.safe_load((CONFIG_DIR / "gpu" / f"shapes_{stage}.yaml").read_text())["data"][
            "init_args"]["num_workers"] > 0
    assert json.loads((tmp_path / "bundle" / "model_index.json").read_text())["image_size"] == 256  # with superres


# --- MarsPipeline --------------------------------------------------------------------------------

@pytest.mark.slow
def test_save_pretrained_round_trip_is_exact_and_relocatable(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    moved = tmp_path / "elsewhere" / "bundle"
    moved.parent.mkdir()
    (tmp_path / "copy").rename(moved)  # the bundle references its Qwen relatively
    loaded = MarsPipeline.from_pretrained(moved)
    assert torch.equal(sample(loaded, seed=3, guidance_scale=2.0).codes, sample(pipe, seed=3, guidance_scale=2.0).codes)
    assert json.loads((moved / "mars" / "mars_config.json").read_text())["text_model"] == "../text_model"
    tokenizer_files = {path.name for path in (moved / "tokenizer").iterdir()}
    assert "tokenizer.json.xz" in tokenizer_files and "tokenizer.json" not in tokenizer_files  # stored compressed
    texts = ["a red circle", "一个红色的圆形"]
    assert [loaded.tokenizer.encode(t) for t in texts] == [pipe.tokenizer.encode(t) for t in texts]
    if loaded.superres is not None:  # base and super-resolution share one frozen Qwen
        assert loaded.superres.mars.model.embed_tokens.weight is loaded.model.model.embed_tokens.weight


@pytest.mark.slow
def test_callback_sees_every_step_of_each_phase(pipe):
    seen = []
    out = sample(pipe, callback=lambda phase, step, total, codes: seen.append((phase, step, total, codes.shape[0])))
    base = [s for s in seen if s[0] == "base"]
    assert [s[1] for s in base] == list(range(64)) and {s[2] for s in base} == {64}
    if pipe.superres is not None:
        groups = [s for s in seen if s[0] == "superres"]
        assert groups and [s[1] for s in groups] == list(range(len(groups))) and out.codes.shape[-1] == 16


@pytest.mark.slow
@pytest.mark.parametrize("damage, error, message", [
    ("no_index", FileNotFoundError, "model_index.json not found"),
    ("bad_index", ValueError, "is corrupt"),
    ("no_vq", FileNotFoundError, "vq directory"),
    ("bad_weights", ValueError, "not a readable safetensors file"),
    ("bad_text_model", ValueError, "text model in"),
])
def test_broken_bundles_fail_with_one_line_errors(smoke_run, tmp_path, damage, error, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(smoke_run / "bundle", bundle)
    # Without the recorded digests (an older bundle) each part's own loader has to catch the damage; with
    # them the digest check does, first (tests/test_bad_input.py).
    index = json.loads((bundle / "model_index.json").read_text())
    (bundle / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "sha256"}))
    if damage == "no_index":
        (bundle / "model_index.json").unlink()
    elif damage == "bad_index":
        (bundle / "model_index.json").write_text("{not json")
    elif damage == "no_vq":
        shutil.rmtree(bundle / "vq")
    elif damage == "bad_weights":
        (bundle / "mars" / "mars_trainable.safetensors").write_bytes(b"\0" * 64)
    else:
        (bundle / "text_model" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(error, match=message) as caught:
        MarsPipeline.from_pretrained(bundle)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_prompt_tokenizer_round_trips_with_and_without_a_vocab_map(smoke_run, tmp_path):
    trimmed = PromptTokenizer.from_pretrained(smoke_run / "bundle" / "tokenizer")
    text = "一个红色的圆形在一个蓝色的正方形的左边"
    ids = trimmed.encode(text)
    assert trimmed.vocab_map is not None and max(ids) < len(trimmed.vocab_map) and trimmed.decode(ids) == text
    PromptTokenizer(load_qwen_tokenizer()).save_pretrained(tmp_path / "full")
    full = PromptTokenizer.from_pretrained(tmp_path / "full")
    assert full.vocab_map is None and full.decode(full.encode(text)) == text
    assert trimmed.vocab_map.to_full(ids) == full.encode(text)  # the same Qwen tokens, renumbered
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        PromptTokenizer.from_pretrained(tmp_path)


def test_strict_encoding_names_the_unseen_tokens(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    lenient = tokenizer.encode("a red hexagon")
    assert tokenizer.vocab_map.unk_id in lenient  # the default: an unknown token, no error
    assert tokenizer.encode("a red circle", strict=True) == tokenizer.encode("a red circle")
    with pytest.raises(ValueError, match="never saw: ' hexagon'; rephrase"):
        tokenizer.encode("a red hexagon", strict=True)


# --- input checks (tiny random bundle) ---------------------------------------------------------

def repeated(clauses: int) -> str:
    return " and ".join(["a red circle"] * clauses)  # 4 tokens a clause, less one


def test_max_prompt_length_fills_each_stage_sequence_exactly(tiny_pipe):
    context = tiny_pipe.model.text_config.max_position_embeddings
    limit, base_limit = tiny_pipe.max_prompt_length(), tiny_pipe.max_prompt_length(super_resolution=False)
    assert (context, limit, base_limit) == (512, 512 - (1 + 64 + 256), 512 - (1 + 64 + 1))
    codes = torch.zeros(1, 8, 8, dtype=torch.long)
    t2i = build_batch(tiny_pipe.model, [[5] * base_limit], codes)["input_ids"]  # [prompt][boi][codes][eoi]
    assert t2i.shape == (1, context)
    with torch.no_grad():  # [prompt][boi][low codes], then the high-resolution slots
        prefix, _, _ = tiny_pipe.superres.embed_prefix(torch.full((1, limit), 5), codes)
    assert prefix.shape[1] + tiny_pipe.superres.config.num_high_tokens == context


def test_encode_prompts_rejects_empty_too_long_and_strictly_unseen_prompts(tiny_pipe):
    at_limit = repeated(48)
    assert len(tiny_pipe.encode_prompts([at_limit, "两个蓝色的正方形"])[0]) == 191  # the limit itself passes
    over = at_limit + " and"
    cases = [
        (dict(prompts=[""]), "empty prompt: describe the image"),
        (dict(prompts=["a red circle", "  "]), "empty prompt 2 of 2: describe the image"),
        (dict(prompts=[over]), "prompt is 192 tokens; this model takes at most 191 (446 without super-resolution): "
                               "shorten it"),
        (dict(prompts=["a circle", repeated(112)], super_resolution=False),
         "prompt 2 of 2 is 447 tokens; this model takes at most 446: shorten it"),
        (dict(prompts=["a red circle", "一个红色的六边形"], strict=True),
         "prompt contains tokens the model never saw"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as caught:
            tiny_pipe.encode_prompts(**kwargs)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert str(caught.value).endswith("training captions (prompt 2 of 2)")
    assert len(tiny_pipe.encode_prompts([over], super_resolution=False)[0]) == 192
    assert len(tiny_pipe.encode_prompts(["一个红色的六边形"])[0]) >= 1  # lenient by default


@pytest.mark.parametrize("settings", [
    dict(guidance_scale=float("nan")), dict(guidance_scale=-1.0), dict(guidance_scale=0.0), dict(guidance_scale=0.5),
    dict(guidance_scale=float("inf")), dict(num_images_per_prompt=65), dict(sr_guidance_scale=0.0),
    dict(temperature=-0.5), dict(temperature=float("nan")), dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0),
    dict(top_p=1.5), dict(num_images_per_prompt=0), dict(candidates=0), dict(sr_temperature=-1.0),
    dict(sr_guidance_scale=float("nan")),
])
def test_bad_sampler_settings_fail_before_sampling(tiny_pipe, settings):
    steps = []
    with pytest.raises(ValueError, match="is out of range: use ") as caught:
        tiny_pipe("a red circle", callback=lambda *step: steps.append(step), **settings)
    assert steps == [] and "\n" not in str(caught.value)
    name, value = next(iter(settings.items()))
    assert str(caught.value).startswith(f"{name}={value!r} is out of range: use {SAMPLER_LIMITS[name][1]}")


def test_a_float16_bundle_is_half_the_size_and_loads_the_rounded_weights_in_float32(tiny_pipe, tmp_path):
    def weights_bytes(bundle: Path) -> int:
        return sum(f.stat().st_size for part in ("text_model", "mars") for f in (bundle / part).glob("*.safetensors"))

    full, half = tiny_pipe.save_pretrained(tmp_path / "fp32"), tiny_pipe.save_pretrained(tmp_path / "fp16", torch.float16)
    assert 0.45 < weights_bytes(half) / weights_bytes(full) < 0.55
    loaded = MarsPipeline.from_pretrained(half)
    mine, original = loaded.model.state_dict(), tiny_pipe.model.state_dict()  # the Qwen and the experts
    assert mine.keys() == original.keys() and all(t.dtype == torch.float32 for t in mine.values())
    assert all(torch.equal(mine[name], original[name].half().float()) for name in original)


def test_an_interrupted_tuning_reruns_only_its_unfinished_trials(tiny_pipe, tmp_path):
    class BrightnessJudge:  # ranks settings by how light their images are, and counts the trials it judges
        prompts, trials = ["a red circle", "两个蓝色的正方形"], 0

        def __call__(self, images):
            self.trials += 1
            return {"score": float(np.mean([np.asarray(im, dtype=np.float64).mean() for im in images])) / 255}

    tune = lambda judge: tune_sampling(  # noqa: E731
        tiny_pipe, grid={"guidance_scale": (1.0, 3.0), "temperature": (0.7, 1.0)}, candidates=(1, 2), finalists=2,
        progress=False, judge=judge, log=tmp_path / "tuning.jsonl")
    first = BrightnessJudge()
    ranked = tune(first)
    lines = (tmp_path / "tuning.jsonl").read_text().splitlines()
    assert first.trials == len(lines) == 6 and len({score["score"] for _, score in ranked}) > 1  # 4 settings, 2 reranked
    # Stopped while writing the fourth trial: the rerun judges the three it lacks and ranks all six the same.
    (tmp_path / "tuning.jsonl").write_text("\n".join(lines[:3] + [lines[3][:20]]))
    again = BrightnessJudge()
    assert tune(again) == ranked and again.trials == 3
    logged = [json.loads(line) for line in (tmp_path / "tuning.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and all(row.keys() == {"settings", "summary", "seconds"} for row in logged)
    assert read_trials(tmp_path / "tuning.jsonl").keys() == {json.dumps(s, sort_keys=True) for s, _ in ranked}


def test_the_bundle_sampler_settings_are_the_defaults_and_survive_save(tiny_pipe, tmp_path):
    tuned = {"guidance_scale": 2.0, "temperature": 0.5, "top_k": 7, "top_p": 0.9, "candidates": 2,
             "sr_guidance_scale": 1.5, "sr_temperature": 0.8}
    examples = ["a red circle", "一个红色的圆形"]
    pipe = MarsPipeline(tiny_pipe.model, tiny_pipe.vq, tiny_pipe.tokenizer, tiny_pipe.superres, tuned, examples)
    assert pipe.sampling == tuned and tiny_pipe.sampling == DEFAULT_SAMPLING and tiny_pipe.examples == []
    assert torch.equal(sample(pipe, seed=4).codes, sample(tiny_pipe, seed=4, **tuned).codes)
    # A call overrides one setting and keeps the others; top_k=0 turns the bundle's top-k off.
    assert torch.equal(sample(pipe, seed=4, guidance_scale=3.0, top_k=0).codes,
                       sample(tiny_pipe, seed=4, **tuned | {"guidance_scale": 3.0, "top_k": None}).codes)
    pipe.save_pretrained(tmp_path / "bundle")
    index = json.loads((tmp_path / "bundle" / "model_index.json").read_text())
    loaded = MarsPipeline.from_pretrained(tmp_path / "bundle")
    assert index["sampling"] == tuned and loaded.sampling == tuned and loaded.examples == examples
    index["examples"] = "a red circle"
    (tmp_path / "bundle" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model_index.json is corrupt \(examples is not a list of prompts\)"):
        MarsPipeline.from_pretrained(tmp_path / "bundle")
    index["examples"], index["sampling"] = examples, {"temperature": -1}
    (tmp_path / "bundle" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model_index.json: temperature=-1 is out of range"):
        MarsPipeline.from_pretrained(tmp_path / "bundle")


def test_super_resolution_samples_with_its_own_guidance_and_temperature(tiny_pipe):
    from mars.superres import upsample_codes

    ids = tiny_pipe.encode_prompts(["a red circle"])
    generator = torch.Generator().manual_seed(3)
    low = generate_images(tiny_pipe.model, ids, guidance_scale=2.0, temperature=0.9, top_k=5, generator=generator)
    high = upsample_codes(tiny_pipe.superres, ids, low, guidance_scale=1.5, temperature=0.6, top_k=5,
                          generator=generator)  # (1, 16, 16)
    out = sample(tiny_pipe, seed=3, guidance_scale=2.0, temperature=0.9, top_k=5, sr_guidance_scale=1.5,
                 sr_temperature=0.6)
    assert torch.equal(out.codes, high)
    # By default the same base codes are upsampled greedily without guidance.
    default = sample(tiny_pipe, seed=3, guidance_scale=2.0, temperature=0.9, top_k=5)
    greedy = upsample_codes(tiny_pipe.superres, ids, low, guidance_scale=1.0, temperature=0.0)
    assert torch.equal(default.codes, greedy) and not torch.equal(greedy, high)


def test_candidates_keep_the_sample_whose_prompt_the_model_captions_likeliest(tiny_pipe):
    model = copy.deepcopy(tiny_pipe.model)
    with torch.no_grad():
        model.image_embed.weight.normal_(generator=torch.Generator().manual_seed(0))  # codes told apart, as trained
    pipe = MarsPipeline(model, tiny_pipe.vq, tiny_pipe.tokenizer)
    prompts = ["a red circle", "两个蓝色的正方形"]
    tried = [row for row in pipe.encode_prompts(prompts) for _ in range(3)]
    all_codes = generate_images(model, tried, guidance_scale=DEFAULT_SAMPLING["guidance_scale"],
                                generator=torch.Generator().manual_seed(5))  # (6, h, w): the pipeline's draws
    best = caption_nll(model, all_codes, tried).view(2, 3).argmin(1)
    assert best.tolist() != [0, 0]  # a pick that taking the first sample would miss
    out = pipe(prompts, candidates=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.codes, all_codes.view(2, 3, 8, 8)[torch.arange(2), best])
    assert len(out.images) == 2 and out.images[0].size == (128, 128)


def test_edge_sampler_settings_sample_and_caption_checks_its_own(tiny_pipe):
    out = tiny_pipe("a red circle", guidance_scale=1.0, temperature=0.0, top_k=1, top_p=1.0, super_resolution=False)
    assert out.codes.shape == (1, 8, 8)
    image = out.images[0]
    for settings in (dict(max_new_tokens=0), dict(top_p=0.0), dict(top_k=-1), dict(temperature=-1.0)):
        with pytest.raises(ValueError, match="is out of range"):
            tiny_pipe.caption(image, **settings)
    with pytest.raises(ValueError, match="no prompt given"):
        tiny_pipe([])


def test_images_are_flattened_onto_white_before_encoding(tiny_pipe):
    opaque = render(scene_for_prompt("a red circle and a blue square"), 128)
    pixels = np.asarray(opaque)
    background = (pixels == 255).all(-1)
    assert 0 < background.mean() < 1
    alpha = np.where(background, 0, 255).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([np.where(background[..., None], 0, pixels), alpha]).astype(np.uint8), "RGBA")
    codes = tiny_pipe.encode_images([opaque, rgba, rgba.convert("RGB")])  # the last: transparent reads as black
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])
    assert tiny_pipe.caption(rgba) == tiny_pipe.caption(opaque)


def test_save_pretrained_stores_the_vq_in_fp16_and_loads_it_as_fp32(tiny_pipe, tmp_path):
    bundle = tiny_pipe.save_pretrained(tmp_path / "bundle")
    stored = load_file(bundle / "vq" / "model.safetensors")
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    fp32 = tiny_pipe.vq.save_pretrained(tmp_path / "vq32") / "model.safetensors"
    assert (bundle / "vq" / "model.safetensors").stat().st_size < 0.6 * fp32.stat().st_size
    loaded = VQTokenizer.from_pretrained(bundle / "vq")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    codes = torch.randint(0, 256, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode(codes), tiny_pipe.vq.decode(codes))  # the shipped VQ is fp16-exact


def test_mars_exports_the_pipeline_lazily():
    assert mars.MarsPipeline is MarsPipeline and mars.MarsPipelineOutput is MarsPipelineOutput
    assert {"MarsPipeline", "MarsPipelineOutput"} <= set(mars.__all__) & set(dir(mars))
    light = "import sys, mars; assert 'torch' not in sys.modules and 'MarsPipeline' in mars.__all__"
    assert subprocess.run([sys.executable, "-c", light], cwd=REPO, timeout=60).returncode == 0


def test_caption_length_must_fit_the_text_model(tiny_pipe):
    room = tiny_pipe.model.text_config.max_position_embeddings - 2 - tiny_pipe.model.config.num_image_tokens
    image = render(scene_for_prompt("a red circle"), 128)
    with pytest.raises(ValueError, match=f"at most {room} caption tokens"):
        tiny_pipe.caption(image, max_new_tokens=room + 1)
    assert len(tiny_pipe.tokenizer.encode(tiny_pipe.caption(image, max_new_tokens=2))) <= 2


def test_a_model_overfit_on_two_images_captions_each_with_its_prompt(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)  # the shared pipeline stays untouched
    prompts = ["a red circle", "两个正方形"]
    images = [render(scene_for_prompt(prompt), 128) for prompt in prompts]
    ids = [pipe.tokenizer.encode(p, strict=True) for p in prompts]
    batch = build_batch(pipe.model, ids, pipe.encode_images(images), task="i2t", pad_id=pipe.tokenizer.pad_id)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(trainable_parameters(pipe.model), lr=3e-3)
    for _ in range(200):
        optimizer.zero_grad()
        loss = pipe.model(**batch).loss
        loss.backward()
        optimizer.step()
    pipe.model.eval()
    # Only the image's keys and values train (the text pathway and LM head are frozen), so the
    # caption's words come from the image; where a random frozen Qwen stops is its own business.
    for image, prompt, n in zip(images, prompts, map(len, ids)):
        assert pipe.caption(image, max_new_tokens=n) == prompt
