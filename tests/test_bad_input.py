"""Bad input at every entry point: one line saying what to do, exit code 2, nothing lost or half-written.

    OMP_NUM_THREADS=1 python -m pytest tests/test_bad_input.py -q

A hostile but fair user's sweep, kept as tests: out-of-range, wrong-type and hostile flag values for
sample.py, `python -m mars.eval`, `python -m mars.shapes`, `python -m vq`, `python -m train fit`,
`python -m train.codes`, `python -m train.pipeline` and the MarsPipeline API, and the faults: corrupt,
truncated, swapped and newer-version files, existing or unwritable outputs, interrupted runs. Every
command runs in-process through its `main(argv)`; `reuse_tiny_pipe` (tests/conftest.py) stands in for
loading the tiny bundle. docs/robustness.md is the table of these cases for users.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

import sample
from mars import eval as mars_eval
from mars import shapes
from mars.cli import MAX_SEED
from mars.pipeline import INDEX_FILE, VERSION, MarsPipeline
from mars.shapes import render, scene_for_prompt
from tests.conftest import SHIPPED_VQ
from train import codes as train_codes
from train import pipeline as train_pipeline
from train.__main__ import main as train_main
from vq.__main__ import main as vq_main

REPO = Path(__file__).resolve().parents[1]


# --- helpers ------------------------------------------------------------------------------------

def exit_code(main, *argv) -> int:
    """A command's exit code, whether its main returns it or raises SystemExit (usage errors)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return 0 if code is None else code


def refused(capsys, main, *argv) -> str:
    """Run a command that must refuse its input: exit code 2, nothing on stdout, exactly one line on
    stderr and no traceback. Returns that line."""
    code = exit_code(main, *argv)
    out, err = capsys.readouterr()
    lines = err.strip().split("\n")
    assert code == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, (code, out, err)
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its content: equal snapshots mean nothing was written or changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: Pillow refuses it from the header, so the
    huge-image cases cost no memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a bundle fails the test: the check must come before the model loads."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(MarsPipeline, "from_pretrained", classmethod(load))


@pytest.fixture
def files(tmp_path) -> Path:
    """A working folder with the inputs the cases use."""
    scene = render(scene_for_prompt("a red circle and a blue square"), 128)
    scene.save(tmp_path / "scene.png")
    Image.new("RGB", (1, 1), "white").save(tmp_path / "dot.png")
    Image.new("RGB", (128, 128), (250, 250, 250)).save(tmp_path / "blank.png")
    (tmp_path / "huge.png").write_bytes(png_header(20000, 20000))  # over twice Pillow's limit: an error
    (tmp_path / "large.png").write_bytes(png_header(10000, 10000))  # over the limit: only a warning in Pillow
    (tmp_path / "truncated.png").write_bytes((tmp_path / "scene.png").read_bytes()[:200])
    (tmp_path / "notes.png").write_text("my notes, not an image\n")
    (tmp_path / "two.txt").write_text("a red circle\na blue square\n")
    return tmp_path


# --- sample.py ------------------------------------------------------------------------------------

def test_prompts_file_inside_the_outdir_is_never_overwritten(capsys, files, no_model_load):
    folder = files / "D"
    folder.mkdir()
    (folder / "prompts.jsonl").write_text("a red circle\n")  # the user's prompts, under the listing's name
    before = snapshot(files)
    line = refused(capsys, sample.main, "--prompts", folder / "prompts.jsonl", "--outdir", folder)
    assert line.endswith(f"--outdir {folder} holds the input {folder / 'prompts.jsonl'}, which this run would "
                         "overwrite: choose another folder")
    assert snapshot(files) == before


@pytest.mark.parametrize("argv, message", [
    (["a circle", "-o", "notes.png"], "-o notes.png exists and is not an image: choose another name"),
    (["a circle", "-o", "notes.png/out.png"], "-o notes.png/out.png: notes.png is a file, not a folder"),
    (["a circle", "-o", "."], "-o .: name an image file"),
    (["--prompts", "two.txt", "--outdir", "out", "-o", "two.txt"], "-o goes with a prompt"),
    (["--prompts", "two.txt", "--outdir", "notes.png"], "--outdir notes.png is a file: name a folder"),
    (["--prompts", "two.txt", "--outdir", "."], "--outdir . already holds files and no prompts.jsonl"),
    (["a circle", "--seed", str(MAX_SEED + 1)], "argument --seed: 18446744073709551616 is out of range: "
                                                "use an integer from 0 to 2**64 - 1"),
    (["a circle", "--seed", "-1"], "argument --seed: -1 is out of range"),
    (["a circle", "--seed", "1e3"], "argument --seed: '1e3' is not an integer"),
    (["a circle", "--cfg", "0"], "argument --cfg: 0 is out of range: use a value >= 1 (1 turns guidance off)"),
    (["a circle", "--cfg", "0.5"], "argument --cfg: 0.5 is out of range"),
    (["a circle", "--sr-cfg", "0.9"], "argument --sr-cfg: 0.9 is out of range"),
    (["a circle", "--cfg", "nan"], "argument --cfg: nan is out of range"),
    (["a circle", "--num-images", "100000000000"], "argument --num-images: 100000000000 is out of range: "
                                                   "use an integer from 1 to 64"),
    (["a circle", "--candidates", "65"], "argument --candidates: 65 is out of range"),
    (["a circle", "--top-k", "2.5"], "argument --top-k: '2.5' is not an integer"),
])
def test_sample_flags_are_checked_before_anything_loads(capsys, files, monkeypatch, no_model_load, argv, message):
    monkeypatch.chdir(files)
    before = snapshot(files)
    assert refused(capsys, sample.main, *argv).startswith(f"sample.py: error: {message}")
    assert snapshot(files) == before


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "two.txt", "--outdir", "out", "--seed", str(MAX_SEED)],
     f"--seed {MAX_SEED} with 2 prompts needs seeds up to {MAX_SEED + 1}, past the largest (2**64 - 1): "
     f"use --seed {MAX_SEED - 1} or less"),
    (["--caption", "huge.png"], "cannot read image huge.png: it has more than 89 million pixels"),
    (["--caption", "large.png"], "cannot read image large.png: it has more than 89 million pixels"),
    (["--caption", "dot.png"], "dot.png is 1 x 1 pixels, too small to caption: give an image at least 16 pixels"),
    (["--caption", "blank.png"], "blank.png is blank (a single colour): there is nothing to caption"),
    (["--caption", "truncated.png"], "cannot read image truncated.png"),
    (["--caption", "notes.png"], "cannot read image notes.png: not an image format Pillow knows"),
    (["--caption", "."], "cannot read image ."),
])
def test_seeds_and_images_fail_before_the_model_loads(capsys, files, monkeypatch, no_model_load, argv, message):
    monkeypatch.chdir(files)
    before = snapshot(files)
    assert refused(capsys, sample.main, *argv).startswith(f"error: {message}")
    assert snapshot(files) == before and not (files / "out").exists()


def test_a_prompt_is_stripped_like_the_prompt_file(capsys, reuse_tiny_pipe, tmp_path):
    code = exit_code(sample.main, "  a red circle \t", "--no-sr", "--checkpoint", reuse_tiny_pipe,
                     "-o", tmp_path / "out.png")
    assert code == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").size == (128, 128)
    (tmp_path / "bom.txt").write_text("\ufeffa red circle\r\n", encoding="utf-8")  # as some editors save it
    code = exit_code(sample.main, "--prompts", tmp_path / "bom.txt", "--outdir", tmp_path / "out", "--no-sr",
                     "--checkpoint", reuse_tiny_pipe)
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "prompts.jsonl").read_text())["prompt"] == "a red circle"


# --- python -m mars.eval ---------------------------------------------------------------------------

def listing(folder: Path, image: bytes, prompt: str = "a red circle") -> Path:
    folder.mkdir()
    (folder / "000000.png").write_bytes(image)
    (folder / "captions.jsonl").write_text(json.dumps({"file": "000000.png", "caption": prompt}) + "\n")
    return folder


def test_eval_images_refuses_huge_and_odd_images_in_one_line(capsys, tmp_path):
    huge = listing(tmp_path / "huge", png_header(20000, 20000))
    assert refused(capsys, mars_eval.main, "--images", huge) == (
        f"error: cannot read image {huge / '000000.png'}: it has more than 89 million pixels (Pillow's limit "
        "against decompression bombs); downscale it")
    buffer = tmp_path / "wide.png"
    Image.new("RGB", (128, 100), "white").save(buffer)
    wide = listing(tmp_path / "wide", buffer.read_bytes())
    assert "is 128 x 100 pixels: the scorer reads square images" in refused(capsys, mars_eval.main, "--images", wide)
    Image.new("RGB", (128, 128), "white").save(buffer)
    unknown = listing(tmp_path / "unknown", buffer.read_bytes(), prompt="a red hexagon")
    assert refused(capsys, mars_eval.main, "--images", unknown).startswith(
        "error: cannot parse prompt 'a red hexagon': expected one of the six shapes-world categories")


@pytest.mark.parametrize("argv, message", [
    (["--generate", "--out", "notes.png"], "--out notes.png is a file: name a folder"),
    (["--generate", "--out", "shapes"], "--out shapes already holds files and no prompts.jsonl: choose a new or "
                                        "empty folder"),
    (["--generate", "--failures", "sheet.txt"], "--failures sheet.txt: name an image file"),
    (["--generate", "--failures", "notes.png"], "--failures notes.png exists and is not an image"),
    (["--images", "shapes", "--out", "again"], "--out, --failures and --sheet go with --generate"),
    (["--generate", "--seed", str(2**64)], "argument --seed: 18446744073709551616 is out of range"),
    (["--generate", "--cfg", "0"], "argument --cfg: 0 is out of range: use a value >= 1"),
    (["--generate", "--batch-size", "0"], "argument --batch-size: 0 is out of range: use an integer >= 1"),
    (["--vq", "vq", "--size", "100000"], "argument --size: 100000 is out of range: use an integer from 48 to 1024"),
])
def test_eval_outputs_and_flags_are_checked_before_the_model_loads(capsys, files, monkeypatch, no_model_load,
                                                                   argv, message):
    monkeypatch.chdir(files)
    shapes.main(["--n", "2", "--size", "64", "--out", "shapes"])  # someone else's image folder
    capsys.readouterr()
    before = snapshot(files)
    assert refused(capsys, mars_eval.main, *argv).startswith(f"python -m mars.eval: error: {message}")
    assert snapshot(files) == before


def test_eval_vq_size_error_names_no_temporary_folder(capsys):
    line = refused(capsys, mars_eval.main, "--vq", SHIPPED_VQ, "--n", "2", "--size", "250")
    assert line == ("error: image size 250 is not a multiple of the tokenizer's downsampling factor 16: use a "
                    "multiple, e.g. 128 or 256")


# --- python -m mars.shapes -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "argument --seed: -1 is out of range: use an integer >= 0"),
    (["--size", "100000000"], "argument --size: 100000000 is out of range: use an integer from 48 to 1024"),
    (["--size", "10"], "argument --size: 10 is out of range"),
    (["--n", "0"], "argument --n: 0 is out of range: use an integer >= 1"),
    (["--n", "many"], "argument --n: 'many' is not an integer"),
])
def test_shapes_flags_fail_before_any_file_is_created(capsys, tmp_path, argv, message):
    assert refused(capsys, shapes.main, *argv, "--out", tmp_path / "out").startswith(
        f"python -m mars.shapes: error: {message}")
    assert not (tmp_path / "out").exists()


def test_shapes_never_writes_over_a_file_or_another_tools_folder(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "000000.png").write_bytes(b"a sample.py image")
    (samples / "prompts.jsonl").write_text('{"file": "000000.png", "prompt": "a red circle"}\n')
    before = snapshot(tmp_path)
    assert "--out" in refused(capsys, shapes.main, "--n", "2", "--out", tmp_path / "notes.txt")
    assert "already holds files and no captions.jsonl" in refused(capsys, shapes.main, "--n", "2", "--out", samples)
    assert snapshot(tmp_path) == before
    assert exit_code(shapes.main, "--n", "2", "--size", "64", "--out", tmp_path / "eval") == 0
    assert exit_code(shapes.main, "--n", "3", "--size", "64", "--out", tmp_path / "eval") == 0  # its own: replaced
    assert len((tmp_path / "eval" / "captions.jsonl").read_text().splitlines()) == 3


# --- python -m vq ----------------------------------------------------------------------------------

def test_vq_reconstruct_never_overwrites_its_inputs(capsys, tmp_path):
    images = tmp_path / "images"
    shapes.main(["--n", "2", "--size", "64", "--out", str(images)])
    (tmp_path / "notes.txt").write_text("keep me")
    capsys.readouterr()
    before = snapshot(tmp_path)
    base = ["reconstruct", "--checkpoint", SHIPPED_VQ, "--images", images]
    assert "is the --images folder: its images would be overwritten" in refused(capsys, vq_main, *base, "--out", images)
    assert "--out" in refused(capsys, vq_main, *base, "--out", tmp_path / "notes.txt")
    assert "--batch-size: '0' is not an integer >= 1" in refused(capsys, vq_main, *base, "--out", tmp_path / "o",
                                                                 "--batch-size", "0")
    assert "not a readable checkpoint" in refused(capsys, vq_main, "export", "--ckpt", tmp_path / "notes.txt",
                                                  "--out", tmp_path / "exported")
    (images / "000001.png").write_bytes(png_header(20000, 20000))
    before = snapshot(tmp_path)
    assert refused(capsys, vq_main, *base, "--out", tmp_path / "o").startswith(
        f"error: cannot read image {images / '000001.png'}")
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


# --- python -m train.codes, train.pipeline, train fit ----------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--sizes", "0"], "argument --sizes: 0 is out of range: use an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: 0 is out of range"),
    (["--num-workers", "-1"], "argument --num-workers: -1 is out of range: use an integer >= 0"),
    (["--seed", "-1"], "argument --seed: -1 is out of range"),
    (["--n", "-5"], "argument --n: -5 is out of range"),
    (["--device", "tpu"], "error: --device 'tpu' is not a device: use cpu, cuda, cuda:N or mps"),
    (["--sizes", "120"], "sizes [120] are not positive multiples of the VQ downsampling factor 16"),
])
def test_train_codes_flags(capsys, tmp_path, extra, message):
    line = refused(capsys, train_codes.main, "--vq", SHIPPED_VQ, "--out", tmp_path / "codes", "--n", "2", *extra)
    assert message in line
    assert not (tmp_path / "codes").exists() and not (tmp_path / "codes.partial").exists()


def test_train_codes_never_replaces_an_existing_output(capsys, tmp_path):
    (tmp_path / "codes").write_text("keep me")
    assert "already exists: delete it or choose another --out" in refused(
        capsys, train_codes.main, "--vq", SHIPPED_VQ, "--out", tmp_path / "codes", "--n", "2")
    assert (tmp_path / "codes").read_text() == "keep me"


@pytest.mark.parametrize("extra, message", [
    (["--vq", "absent"], "--vq absent has no config.json: give a stage's export folder"),
    (["--text-model", "absent"], "--text-model absent has no config.json"),
    (["--superres", "absent"], "--superres absent has no superres_config.json"),
    (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
])
def test_train_pipeline_checks_given_stages_before_training_any(capsys, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, train_pipeline.main, "--smoke", "--out", "run", *extra)
    assert line.startswith("python -m train.pipeline: error: ") and message in line
    assert not (tmp_path / "run").exists()


def test_train_pipeline_out_naming_a_file(capsys, tmp_path):
    (tmp_path / "run").write_text("keep me")
    assert "--out" in refused(capsys, train_pipeline.main, "--smoke", "--out", tmp_path / "run")
    assert (tmp_path / "run").read_text() == "keep me"


@pytest.mark.parametrize("argv, message", [
    (["fit", "--config", "absent.yaml"], "error: Parser key \"config\": File does not exist"),
    (["fit", "--config", "train/configs/shapes_stage1.yaml", "--trainer.max_steps", "many"],
     "error: Parser key \"trainer.max_steps\": Expected a <class 'int'>. Got value: many"),
])
def test_train_fit_config_errors_are_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(REPO)
    assert refused(capsys, train_main, *argv).startswith(message)


def test_train_fit_on_a_corrupt_codes_folder_is_one_line_without_traceback(capsys, tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    text = shutil.copytree(tiny_bundle / "text_model", tmp_path / "text")
    for path in (tiny_bundle / "tokenizer").iterdir():
        shutil.copy(path, text / path.name)
    codes = tmp_path / "codes"
    codes.mkdir()
    (codes / "meta.json").write_text(json.dumps({"format": "mars-codes", "version": 1, "sizes": [128], "num_items": 2}))
    (codes / "codes.safetensors").write_bytes(b"not safetensors")
    (codes / "captions.jsonl").write_text("")
    code = exit_code(train_main, "fit", "--config", "train/configs/shapes_stage1.yaml",
                     "--config", "train/configs/smoke/shapes_stage1.yaml", "--model.init_args.text_model", text,
                     "--model.init_args.codebook_size", "256", "--data.init_args.path", codes,
                     "--trainer.default_root_dir", tmp_path / "run", "--trainer.logger", "false")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1] == errors[0], err
    assert errors == [f"error: codes directory {codes} is incomplete or corrupt (Error while deserializing header: "
                      "header too large): delete it and extract again with python -m train.codes"]


# --- the Python API --------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, kind, message", [
    (lambda pipe: pipe(None), TypeError, "prompt is NoneType: pass a string or a list of strings"),
    (lambda pipe: pipe(7), TypeError, "prompt is int: pass a string or a list of strings"),
    (lambda pipe: pipe(["a red circle", None]), TypeError, "a prompt in the list is NoneType"),
    (lambda pipe: pipe([]), ValueError, "no prompt given"),
    (lambda pipe: pipe("a red circle", guidance_scale=0), ValueError,
     "guidance_scale=0 is out of range: use a value >= 1"),
    (lambda pipe: pipe("a red circle", num_images_per_prompt=10**11), ValueError, "num_images_per_prompt="),
    (lambda pipe: pipe.caption(None), TypeError, "image is NoneType: pass a PIL image, an image path, or a list"),
    (lambda pipe: pipe.caption(b"\x89PNG"), TypeError, "image is bytes"),
    (lambda pipe: pipe.caption("absent.png"), OSError, "cannot read image absent.png"),
    (lambda pipe: pipe.caption(Image.new("RGB", (1, 1))), ValueError, "the image is 1 x 1 pixels, too small"),
    (lambda pipe: pipe.caption(Image.new("RGBA", (64, 64))), ValueError, "the image is blank (a single colour)"),
    (lambda pipe: MarsPipeline.from_pretrained(None), TypeError, "directory is NoneType: pass a bundle directory"),
])
def test_api_refuses_wrong_types_and_values_in_one_line(tiny_pipe, call, kind, message):
    with pytest.raises(kind) as caught:
        call(tiny_pipe)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_caption_takes_an_image_path(tiny_pipe, files):
    image = Image.open(files / "scene.png")
    caption = tiny_pipe.caption(image)
    assert tiny_pipe.caption(str(files / "scene.png")) == tiny_pipe.caption(files / "scene.png") == caption
    assert tiny_pipe.caption([files / "scene.png"]) == [caption]


def edited_bundle(tiny_bundle: Path, tmp_path: Path, edit) -> Path:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    edit(bundle)
    return bundle


def set_index(bundle: Path, **changes) -> None:
    index = json.loads((bundle / INDEX_FILE).read_text())
    index.update(changes)
    (bundle / INDEX_FILE).write_text(json.dumps({k: v for k, v in index.items() if v is not None}))


def random_weights(path: Path) -> None:
    """Keep the safetensors header, replace every byte behind it: a file that loads and draws garbage."""
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:header] + os.urandom(len(data) - header))


def swap(a: Path, b: Path) -> None:
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


def set_codebook(path: Path, size: int) -> None:
    config = json.loads(path.read_text())
    config["codebook_size"] = size
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("edit, kind, message", [
    (lambda b: set_index(b, version=VERSION + 998), ValueError,
     f"model_index.json is version {VERSION + 998}, newer than this code reads (version {VERSION}): update MARS"),
    (lambda b: set_index(b, version="1"), ValueError, "model_index.json is corrupt (version is '1'"),
    (lambda b: random_weights(b / "mars" / "mars_trainable.safetensors"), ValueError,
     "mars/mars_trainable.safetensors is damaged or replaced (its SHA-256 differs from the one model_index.json "
     "records): re-export or re-download the bundle"),
    (lambda b: (b / "vq" / "model.safetensors").write_bytes((b / "vq" / "model.safetensors").read_bytes()[:999]),
     ValueError, "vq/model.safetensors is damaged or replaced"),
    (lambda b: swap(b / "mars" / "mars_trainable.safetensors", b / "superres" / "mars_trainable.safetensors"),
     ValueError, "is damaged or replaced"),
    (lambda b: (b / "text_model" / "model.safetensors").unlink(), FileNotFoundError,
     "text_model/model.safetensors is missing: the bundle is incomplete; re-export or re-download it"),
    (lambda b: set_index(b, sha256={"../../elsewhere.safetensors": "0" * 64}), ValueError,
     "model_index.json is corrupt (sha256 must map paths inside the bundle to hex digests)"),
])
def test_damaged_swapped_or_newer_bundles_are_refused_before_loading(tiny_bundle, tmp_path, monkeypatch, edit, kind,
                                                                     message):
    bundle = edited_bundle(tiny_bundle, tmp_path, edit)

    def load(*args, **kwargs):
        raise AssertionError("a refused bundle must not reach loading")

    monkeypatch.setattr(MarsPipeline, "from_parts", load)  # refused from the index and the digests alone
    with pytest.raises(kind) as caught:
        MarsPipeline.from_pretrained(bundle)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_config_that_does_not_match_its_weights_is_one_line(tiny_bundle, tmp_path):
    bundle = edited_bundle(tiny_bundle, tmp_path, lambda b: set_codebook(b / "mars" / "mars_config.json", 512))
    with pytest.raises(ValueError) as caught:
        MarsPipeline.from_pretrained(bundle)
    assert str(caught.value) == (
        f"{bundle / 'mars' / 'mars_trainable.safetensors'} does not match its MarsConfig (image_embed.weight is "
        "(258, 64) in the file, (514, 64) for codebook_size=512, image_grid=(8, 8)): load it with the "
        "mars_config.json saved beside it")


def test_saved_bundles_record_every_weight_digest_and_older_ones_still_load(tiny_bundle, tmp_path):
    recorded = json.loads((tiny_bundle / INDEX_FILE).read_text())["sha256"]
    assert recorded == {str(p.relative_to(tiny_bundle)): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(tiny_bundle.rglob("*.safetensors"))}
    older = edited_bundle(tiny_bundle, tmp_path, lambda b: set_index(b, sha256=None))
    assert MarsPipeline.from_pretrained(older).image_size == 128  # nothing recorded, nothing checked


@pytest.mark.parametrize("name, weight_files", [("mars-shapes", 5), ("mars-emoji", 5)])
def test_the_shipped_bundles_record_the_digests_of_their_weights(name, weight_files):
    from mars.pipeline import verify_weights, weight_digests

    bundle = REPO / "checkpoints" / name
    recorded = json.loads((bundle / INDEX_FILE).read_text())["sha256"]
    assert recorded == weight_digests(bundle) and len(recorded) == weight_files
    verify_weights(bundle, recorded)


# --- the app ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (png_header(20000, 20000), "upload.png is not a readable image (it has more than 89 million pixels"),
    (png_header(10000, 10000), "upload.png is not a readable image (it has more than 89 million pixels"),
    (b"GIF89a nonsense", "upload.png is not a readable image (not an image format Pillow knows"),
])
def test_app_uploads_that_are_huge_or_not_images_are_one_line(data, message):
    from app.generation import read_image

    with pytest.raises(ValueError) as caught:
        read_image(data, "upload.png")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_no_message_points_at_files_a_clone_lacks():
    sources = [p for folder in ("mars", "train", "vq", "app") for p in (REPO / folder).rglob("*.py")]
    assert [p for p in sources + [REPO / "sample.py"] if "shared/" in p.read_text(encoding="utf-8")] == []


# --- interrupted runs: exit code 130, the listing names exactly the images on disk --------------------

def interrupt_after(monkeypatch, calls: int):
    """The pipeline raises KeyboardInterrupt (what Ctrl-C raises) on call number `calls` + 1."""
    real = MarsPipeline.__call__
    count = {"calls": 0}

    def call(self, *args, **kwargs):
        count["calls"] += 1
        if count["calls"] > calls:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MarsPipeline, "__call__", call)


def assert_listing_matches_disk(folder: Path, listing_name: str, written: int) -> None:
    rows = [json.loads(line) for line in (folder / listing_name).read_text().splitlines()]
    assert [row["file"] for row in rows] == [f"{k:06d}.png" for k in range(written)]
    assert sorted(p.name for p in folder.iterdir()) == sorted([listing_name] + [row["file"] for row in rows])
    assert all(Image.open(folder / row["file"]).size == (128, 128) for row in rows)  # whole images


def test_ctrl_c_in_sample_prompts_leaves_a_true_listing(capsys, reuse_tiny_pipe, tmp_path, monkeypatch):
    (tmp_path / "five.txt").write_text("a red circle\n" * 5)
    interrupt_after(monkeypatch, 2)
    code = exit_code(sample.main, "--prompts", tmp_path / "five.txt", "--outdir", tmp_path / "out", "--no-sr",
                     "--checkpoint", reuse_tiny_pipe)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted after 2 of 5 images; the listing names the 2 written"
    assert_listing_matches_disk(tmp_path / "out", "prompts.jsonl", 2)


def test_ctrl_c_in_eval_generate_leaves_a_true_listing(capsys, reuse_tiny_pipe, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 3)
    code = exit_code(mars_eval.main, "--generate", "--n", "6", "--batch-size", "1", "--no-sr", "--out",
                     tmp_path / "out", "--checkpoint", reuse_tiny_pipe)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted after 3 of 6 images; the listing names the 3 written"
    assert_listing_matches_disk(tmp_path / "out", "prompts.jsonl", 3)


def test_ctrl_c_in_shapes_leaves_a_true_listing(capsys, tmp_path, monkeypatch):
    real, count = shapes.render, {"calls": 0}

    def render_then_stop(*args, **kwargs):
        count["calls"] += 1
        if count["calls"] > 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(shapes, "render", render_then_stop)
    assert exit_code(shapes.main, "--n", "9", "--size", "128", "--out", tmp_path / "out") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("interrupted after 4 of 9 images; the listing names "
                                                               "the 4 written")
    assert_listing_matches_disk(tmp_path / "out", "captions.jsonl", 4)


@pytest.mark.slow  # a real process and a real SIGINT (about 6 s)
def test_sigint_to_a_running_sample_process(tiny_bundle, tmp_path):
    (tmp_path / "many.txt").write_text("a red circle\n" * 40)
    # A child started from a non-interactive shell may inherit SIGINT ignored; Python's own handler is what
    # a terminal's Ctrl-C reaches.
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", start, str(REPO / "sample.py"), "--prompts",
                                str(tmp_path / "many.txt"), "--outdir", str(out), "--no-sr", "--checkpoint",
                                str(tiny_bundle)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "000002.png").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    last = err.strip().splitlines()[-1]
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    written = int(last.split()[2])
    assert last == f"interrupted after {written} of 40 images; the listing names the {written} written"
    assert_listing_matches_disk(out, "prompts.jsonl", written)
