"""Tests of train/: codes format and deterministic batches, trainable-only checkpoints, the NaN guard,
SIGKILL at any moment + auto-resume equal to an uninterrupted run, and a 2-process CPU DDP run equal to one process.

    OMP_NUM_THREADS=1 python -m pytest tests/test_train.py -q

Fit runs go through the real CLI (`python -m train fit --config ...`) in subprocesses on tiny configs
built from the repo's stage-1 YAML and its smoke overlay.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mars.eval import category_prompts
from mars.model import build_qwen, is_trainable
from mars.tokenizer import PromptTokenizer
from mars.shapes import CATEGORIES, LANGS, render, write_eval_folder
from mars.tokenizer import VocabMap, load_qwen_tokenizer
from train.__main__ import fallback_precision, find_resume_checkpoint
from train.__main__ import main as train_main
from train.callbacks import FiniteLossGuard, image_grid
from train.codes import (CodeBatches, CodeSampler, CodeSet, CodesDataModule, caption_category, extract_codes,
                         shapes_item)
from train.codes import main as codes_main
from train.data import image_to_tensor, load_rgb
from train.modules import MarsLitModule, shapes_caption_corpus
from train.pipeline import Stage, load_stage_config
from vq import VQConfig, VQTokenizer

REPO = Path(__file__).resolve().parents[1]

# Test-only callbacks, importable by the CLI subprocess through PYTHONPATH.
HELPERS = textwrap.dedent('''
    import json
    import lightning as L

    class RecordBatches(L.Callback):
        """Append (rank, global step, item indices) of every training batch to `path`.<rank>.jsonl."""
        def __init__(self, path: str):
            self.path = path
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with open(f"{self.path}.{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps([trainer.global_rank, trainer.global_step, batch["index"].tolist()]) + "\\n")
''')


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Qwen with a trimmed vocabulary and its tokenizer files, a random f=16 VQ, and codes."""
    root = tmp_path_factory.mktemp("world")
    tokenizer = load_qwen_tokenizer()
    vocab_map = VocabMap.from_texts(tokenizer, shapes_caption_corpus(300, 1))
    qwen = build_qwen(dict(model_type="qwen3", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, intermediate_size=64, vocab_size=len(vocab_map),
                           eos_token_id=vocab_map.eos_id, max_position_embeddings=256))
    qwen.save_pretrained(root / "text")
    PromptTokenizer(tokenizer, vocab_map).save_pretrained(root / "text")
    torch.manual_seed(0)
    VQTokenizer(VQConfig(patch_size=4, channels=8, channel_mults=(1, 2, 2), latent_dim=16, codebook_size=64,
                         kmeans_init=False)).save_pretrained(root / "vq")
    extract_codes(root / "vq", root / "codes", n=96, sizes=(128, 256), seed=3, batch_size=32)
    (root / "helpers").mkdir()
    (root / "helpers" / "test_helpers_train.py").write_text(HELPERS)
    return {"root": root, "text": root / "text", "vq": root / "vq", "codes": root / "codes"}


def stage_config(world: dict, run_dir: Path, *, max_steps: int = 12, every: int = 4, batch_size: int = 4,
                 callbacks: tuple = (), **model_args) -> dict:
    """The repo's stage-1 YAML + smoke overlay, rewired to the tiny world and a run directory."""
    config = load_stage_config(Stage("stage1", "shapes_stage1.yaml"), smoke=True)
    config["model"]["init_args"].update(text_model=str(world["text"]), export_dir=str(run_dir / "export"),
                                        **model_args)
    config["data"]["init_args"].update(path=str(world["codes"]), batch_size=batch_size, val_items=16)
    config["trainer"].update(default_root_dir=str(run_dir), max_steps=max_steps, val_check_interval=max_steps,
                             logger=False, enable_progress_bar=False)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": every}},
        {"class_path": "train.callbacks.FiniteLossGuard"},
        {"class_path": "train.callbacks.EMAWeights", "init_args": {"decay": 0.9}}, *callbacks]
    return config


def cli_command(world: dict, config: dict, path: Path) -> tuple[list[str], dict]:
    path.write_text(yaml.safe_dump(config))
    env = os.environ | {"PYTHONPATH": f"{world['root'] / 'helpers'}{os.pathsep}{REPO}"}
    return [sys.executable, "-m", "train", "fit", "--config", str(path)], env


def run_cli(world: dict, config: dict, path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    command, env = cli_command(world, config, path)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def start_cli(world: dict, config: dict, path: Path) -> subprocess.Popen:
    command, env = cli_command(world, config, path)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def final_state(run_dir: Path) -> tuple[dict, dict]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint, load_file(run_dir / "export" / "mars_trainable.safetensors")


# --- codes ---------------------------------------------------------------------------------------

def test_codes_match_a_fresh_encoding_and_captions_are_bilingual(world):
    code_set = CodeSet.load(world["codes"])
    vq = VQTokenizer.from_pretrained(world["vq"])
    assert len(code_set) == 96 and code_set.grid(128) == (8, 8) and code_set.grid(256) == (16, 16)
    for index in (0, 41, 95):
        scene, category, captions = shapes_item(3, index)
        for size in (128, 256):
            fresh = vq.encode(image_to_tensor(render(scene, size), size)[None])[0]
            assert torch.equal(code_set.codes[size][index].long(), fresh)
        assert code_set.records[index] == {"index": index, "category": category, "captions": captions}
        assert {"scene_en", "scene_zh"} <= set(captions)
        assert code_set.captions(index, kind="scene", lang="zh") == [captions["scene_zh"]]


def test_captions_only_rewrites_captions_and_keeps_codes(world, tmp_path, capsys):
    copy = shutil.copytree(world["codes"], tmp_path / "codes")
    old = (copy / "captions.jsonl").read_text(encoding="utf-8")
    (copy / "captions.jsonl").write_text(old.replace('"prompt_en"', '"stale_en"'), encoding="utf-8")
    codes_main(["--captions-only", "--out", str(copy)])
    assert (copy / "captions.jsonl").read_text(encoding="utf-8") == old
    assert (copy / "codes.safetensors").read_bytes() == (world["codes"] / "codes.safetensors").read_bytes()
    with pytest.raises(SystemExit) as stopped:
        codes_main(["--captions-only", "--out", str(tmp_path / "absent")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {tmp_path / 'absent' / 'meta.json'} not found")


def test_codes_rendered_by_workers_match_in_process(world, tmp_path):
    extract_codes(world["vq"], tmp_path / "codes", n=20, sizes=(128,), seed=3, batch_size=6, num_workers=2)
    parallel, serial = CodeSet.load(tmp_path / "codes"), CodeSet.load(world["codes"])
    assert torch.equal(parallel.codes[128], serial.codes[128][:20])  # same items, same order
    assert parallel.records == serial.records[:20]


def test_scene_weights_set_the_category_mix_and_travel_with_the_codes(world, tmp_path, capsys):
    counts = lambda weights: Counter(shapes_item(0, i, scene_weights=weights)[1] for i in range(600))  # noqa: E731
    assert counts(None) == counts({})  # no weights: the uniform mix, item for item
    only = counts({category: 0.0 for category in CATEGORIES if category not in ("counting", "position")})
    assert set(only) == {"counting", "position", "scene"}  # free scenes keep their share
    more = counts({"counting": 4.0})
    assert more["counting"] > 2 * counts(None)["counting"]
    with pytest.raises(ValueError, match="scene_weights names 'count'"):
        shapes_item(0, 0, scene_weights={"count": 2.0})
    codes_main(["--vq", str(world["vq"]), "--out", str(tmp_path / "codes"), "--n", "12", "--sizes", "128",
                "--scene-weights", "counting=3", "colors=0"])
    code_set = CodeSet.load(tmp_path / "codes")
    assert code_set.meta["scene_weights"] == {"counting": 3.0, "colors": 0.0}
    assert [r["category"] for r in code_set.records] == [shapes_item(0, i, scene_weights={"counting": 3.0, "colors": 0.0})[1]
                                                         for i in range(12)]
    before = (tmp_path / "codes" / "captions.jsonl").read_text(encoding="utf-8")
    codes_main(["--captions-only", "--out", str(tmp_path / "codes")])  # recomputed with the recorded mix
    assert (tmp_path / "codes" / "captions.jsonl").read_text(encoding="utf-8") == before
    with pytest.raises(SystemExit):
        codes_main(["--vq", str(world["vq"]), "--out", str(tmp_path / "bad"), "--scene-weights", "counting:3"])
    assert "write CATEGORY=WEIGHT" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_codes_from_an_image_folder(world, tmp_path):
    write_eval_folder(tmp_path / "images", n=5, size=128, seed=0)
    listing_path = tmp_path / "images" / "captions.jsonl"
    records = [json.loads(line) for line in listing_path.read_text().splitlines()]
    records[1]["concept"] = records[2]["concept"] = "same thing"  # grouped for concept-balanced sampling
    listing_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    extract_codes(world["vq"], tmp_path / "codes", n=None, sizes=(64, 128), source="folder",
                  path=str(tmp_path / "images"), batch_size=2)
    code_set = CodeSet.load(tmp_path / "codes")
    listing = [json.loads(line) for line in (tmp_path / "images" / "captions.jsonl").read_text().splitlines()]
    assert len(code_set) == 5 and code_set.grid(64) == (4, 4)
    assert [r["captions"] for r in code_set.records] == [{"caption_en": r["caption"]} for r in listing]
    assert [r.get("concept") for r in code_set.records] == [None, "same thing", "same thing", None, None]
    vq = VQTokenizer.from_pretrained(world["vq"])
    image = image_to_tensor(load_rgb(tmp_path / "images" / listing[3]["file"]), 128)[None]
    assert torch.equal(code_set.codes[128][3].long(), vq.encode(image)[0])
    with pytest.raises(FileExistsError, match="already exists"):
        extract_codes(world["vq"], tmp_path / "codes", n=2)


def test_codes_errors_are_one_line(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m train.codes"):
        CodeSet.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "captions.jsonl"):
        (broken / name).write_bytes((world["codes"] / name).read_bytes())
    (broken / "codes.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="incomplete or corrupt") as error:
        CodeSet.load(broken)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="--sizes 64"):
        CodeSet.load(world["codes"]).grid(64)


def test_code_batches_are_a_function_of_position(world):
    code_set = CodeSet.load(world["codes"])
    items = range(0, 80)

    def batches(batch_size, world_size=1, rank=0, start=0, count=3):
        stream = CodeBatches(CodeSampler(code_set, items, 7, "mixed", "both"), batch_size, (128, 256))
        return [stream.make_batch(k, rank, world_size) for k in range(start, start + count)]

    single = batches(8, count=25)  # 200 samples: two and a half epochs of 80 items
    for epoch in range(2):  # every item once per epoch, in a new order each epoch
        seen = torch.cat([b["index"] for b in single[epoch * 10:(epoch + 1) * 10]])
        assert sorted(seen.tolist()) == list(items)
    assert not torch.equal(single[0]["index"], single[10]["index"])
    assert [b["caption"] for b in batches(8, start=5)] == [b["caption"] for b in single[5:8]]  # resume point
    stream = CodeBatches(CodeSampler(code_set, items, 7, "mixed", "both"), 8, (128,))
    stream.start_batch = 5  # where a run resumed after 5 optimizer steps starts reading
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    read = [batch["index"] for _, batch in zip(range(4), loader)]  # workers interleave, order is kept
    assert all(torch.equal(a, b["index"]) for a, b in zip(read, single[5:9]))
    halves = [batches(4, world_size=2, rank=r) for r in range(2)]  # DDP: rank rows tile the global batch
    for k in range(3):
        joined = torch.cat([halves[0][k]["index"], halves[1][k]["index"]])
        assert torch.equal(joined, single[k]["index"])
        assert torch.equal(torch.cat([h[k]["codes_256"] for h in halves]), code_set.codes[256][joined].long())


def test_concept_balance_evens_out_concepts_and_repeats_on_resume(world):
    # 12 images of one concept (an emoji in six tones and two styles) beside four concepts of one image.
    records = [{"index": i, "category": None, "captions": {"caption_en": f"image {i}"},
                **({"concept": "thumbs_up"} if i < 12 else {})} for i in range(16)]
    code_set = CodeSet({128: torch.zeros(16, 2, 2, dtype=torch.int16)}, records, {"codebook_size": 4})
    items = range(16)

    def share_of_big_concept(balance: float) -> float:
        sampler = CodeSampler(code_set, items, 3, "caption", "en", concept_balance=balance)
        return np.mean([sampler(p)[0] < 12 for p in range(16 * 400)])

    assert share_of_big_concept(0.0) == 0.75  # a permutation every epoch: each image once
    assert abs(share_of_big_concept(1.0) - 1 / 5) < 0.03  # every concept alike
    assert abs(share_of_big_concept(0.5) - 12 ** 0.5 / (12 ** 0.5 + 4)) < 0.03
    fresh = CodeSampler(code_set, items, 3, "caption", "en", concept_balance=1.0)
    resumed = CodeSampler(code_set, items, 3, "caption", "en", concept_balance=1.0)
    assert [fresh(p) for p in range(40)][33:] == [resumed(p) for p in range(33, 40)]
    with pytest.raises(ValueError, match="from 0 .* to 1"):
        CodesDataModule(str(world["codes"]), concept_balance=2.0)


def test_strict_captions_keep_only_items_with_a_caption_of_the_kind(world):
    records = CodeSet.load(world["codes"]).records
    loose, strict = (CodesDataModule(str(world["codes"]), batch_size=8, captions="prompt", val_items=16,
                                     strict_captions=flag) for flag in (False, True))
    loose.setup(), strict.setup()
    # free scenes of 3-4 mixed objects pass no category prompt; those of one or two objects pass some
    unprompted = [r["index"] for r in records[:80] if "prompt_en" not in r["captions"]]
    assert unprompted and all(records[i]["category"] == "scene" for i in unprompted)
    assert any(r["category"] == "scene" and "prompt_en" in r["captions"] for r in records[:80])
    assert len(strict.train_set.sampler.items) == 80 - len(unprompted)
    batches = [strict.train_set.make_batch(k) for k in range(20)]  # two epochs of the kept items
    assert all("prompt_en" in records[i]["captions"] for b in batches for i in b["index"].tolist())
    assert any(i in unprompted for k in range(20) for i in loose.train_set.make_batch(k)["index"].tolist())
    drawn = {(i, c) for b in batches for i, c in zip(b["index"].tolist(), b["caption"])}
    assert all(c in records[i]["captions"]["prompt_en"] + records[i]["captions"]["prompt_zh"] for i, c in drawn)
    assert len({c for _, c in drawn}) > len({i for i, _ in drawn})  # alternatives, not one prompt an item


def test_category_weights_oversample_a_category_and_leave_validation_uniform(world):
    def data(weights):
        module = CodesDataModule(str(world["codes"]), batch_size=8, captions="prompt", strict_captions=True,
                                 val_items=16, category_weights=weights)
        module.setup()
        return module

    def share(batches, category):
        return sum(caption_category(c) == category for b in batches for c in b["caption"]) / (8 * len(batches))

    uniform, weighted = data(None), data({"color_attr": 20.0, "position": 0.05})
    plain, heavy = ([m.train_set.make_batch(k) for k in range(30)] for m in (uniform, weighted))
    assert [b["index"].tolist() for b in plain] == [b["index"].tolist() for b in heavy]  # same items, other captions
    records = CodeSet.load(world["codes"]).records
    assert all(c in records[i]["captions"]["prompt_en"] + records[i]["captions"]["prompt_zh"]
               for b in heavy for i, c in zip(b["index"].tolist(), b["caption"]))
    assert share(heavy, "color_attr") > share(plain, "color_attr") + 0.15
    assert share(heavy, "position") < share(plain, "position") - 0.1
    binding = [(i, c) for b in heavy for i, c in zip(b["index"].tolist(), b["caption"])
               if any(caption_category(t) == "color_attr" for t in records[i]["captions"]["prompt_en"])]
    assert binding and sum(caption_category(c) == "color_attr" for _, c in binding) >= 0.8 * len(binding)
    assert ([b["caption"] for b in uniform.val_dataloader()] == [b["caption"] for b in weighted.val_dataloader()])
    assert [b["caption"] for b in heavy[5:8]] == [weighted.train_set.make_batch(k)["caption"] for k in (5, 6, 7)]
    with pytest.raises(ValueError, match="use categories of"):
        data({"colour_binding": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        data({"color_attr": 0.0})


# --- the stage modules ---------------------------------------------------------------------------

def test_stage0_vocabulary_covers_the_evaluation_prompts():
    vocab_map = VocabMap.from_texts(load_qwen_tokenizer(), shapes_caption_corpus(1000, 12345))  # the smoke setting
    prompts = [row["prompt"] for row in category_prompts(600, LANGS, seed=5)]
    assert {"en", "zh"} == {"zh" if any(ord(ch) > 127 for ch in p) else "en" for p in prompts}
    assert len(vocab_map) < 100 and not any(vocab_map.unk_id in vocab_map.encode(p) for p in prompts)


def test_stage_batches_mix_tasks_by_the_batch_seed(world):
    module = MarsLitModule(str(world["text"]), codebook_size=64, i2t_ratio=0.5)
    code_set = CodeSet.load(world["codes"])
    batch = CodeBatches(CodeSampler(code_set, range(80), 0, "mixed", "both"), 8, (128, 256)).make_batch(0)
    tensors, share = module.sequences(batch, 0.5, 0.0)
    labels = tensors["labels"]
    on_codes, on_text = module.model.is_code(labels), (labels >= 0) & ~module.model.is_code(labels)
    t2i, i2t = on_codes.any(1), on_text.any(1)
    assert len(labels) == 8 and bool((t2i ^ i2t).all()) and 0 < share < 1 and i2t.float().mean().item() == share
    assert on_codes.sum(1)[t2i].eq(64).all()  # t2i rows learn the 8x8 codes, i2t rows the caption + eos
    assert torch.equal(module.sequences(batch, 0.5, 0.0)[0]["input_ids"], tensors["input_ids"])  # seeded
    assert module.sequences(batch, 0.0, 0.0)[1] == 0.0 and module.sequences(batch, 1.0, 0.0)[1] == 1.0
    dropped, _ = module.sequences(batch, 0.0, 0.999)  # caption dropout: prompts become empty
    assert dropped["input_ids"][:, 0].eq(module.model.boi_token_id).all()
    losses = module.shared_step(batch, 0.5, 0.0)
    torch.testing.assert_close(losses["loss"], (1 - share) * losses["image_loss"] + share * losses["text_loss"])
    with pytest.raises(ValueError, match="no codes with grid"):
        module.batch_codes({"codes_256": batch["codes_256"]})


def test_first_codes_weigh_more_in_training_only(world):
    code_set = CodeSet.load(world["codes"])
    batch = CodeBatches(CodeSampler(code_set, range(80), 0, "mixed", "both"), 4, (128, 256)).make_batch(0)
    torch.manual_seed(0)
    plain = MarsLitModule(str(world["text"]), codebook_size=64)
    torch.manual_seed(0)
    heavy = MarsLitModule(str(world["text"]), codebook_size=64, first_codes=8, first_codes_weight=4.0)
    assert plain.cell_weights is None and heavy.cell_weights.tolist() == [4.0] * 8 + [1.0] * 56
    heavy.load_state_dict(plain.state_dict())
    tensors, _ = plain.sequences(batch, 0.0, 0.0)
    hidden = plain.model.hidden_states(tensors["input_ids"], tensors["attention_mask"])
    targets = tensors["labels"][:, 1:]
    rows = plain.model.is_code(targets)
    per_code = torch.nn.functional.cross_entropy(plain.model.image_head(hidden[:, :-1][rows]),
                                                 targets[rows] - plain.model.image_token_offset,
                                                 reduction="none").view(4, 64)  # (B, h*w)
    first, rest = per_code[:, :8].sum(), per_code[:, 8:].sum()
    trained = heavy.shared_step(batch, 0.0, 0.0, heavy.cell_weights)["image_loss"]
    torch.testing.assert_close(trained, (4.0 * first + rest) / (4 * (4 * 8 + 56)))
    torch.testing.assert_close(heavy.shared_step(batch, 0.0, 0.0)["image_loss"], per_code.mean())  # validation
    with pytest.raises(ValueError, match="first_codes=65 must lie in"):
        MarsLitModule(str(world["text"]), codebook_size=64, first_codes=65)


def test_a_compiled_step_matches_the_eager_one(world):
    """compile=True: the same losses and gradients as eager (fp32), and the same checkpoint keys."""
    code_set = CodeSet.load(world["codes"])
    batch = CodeBatches(CodeSampler(code_set, range(80), 0, "mixed", "both"), 4, (128, 256)).make_batch(0)
    torch.manual_seed(0)
    eager = MarsLitModule(str(world["text"]), codebook_size=64, i2t_ratio=0.5, first_codes=8, first_codes_weight=4.0)
    compiled = MarsLitModule(str(world["text"]), codebook_size=64, i2t_ratio=0.5, first_codes=8,
                             first_codes_weight=4.0, compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.compiled_forward is not None and eager.compiled_forward is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    losses, grads = [], []
    for module in (eager, compiled):
        losses.append(module.shared_step(batch, 0.5, 0.0, module.cell_weights))
        losses[-1]["loss"].backward()
        grads.append({n: p.grad for n, p in module.model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0])  # loss, image_loss, text_loss
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


# --- the NaN guard -------------------------------------------------------------------------------

class NaNAtStep(L.LightningModule):
    def __init__(self, bad_step: int):
        super().__init__()
        self.layer, self.bad_step = torch.nn.Linear(4, 1), bad_step

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).square().mean()
        return loss * float("nan") if self.global_step == self.bad_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)


def test_bf16_trains_in_fp32_on_a_cpu_that_would_emulate_it(monkeypatch):
    assert fallback_precision("bf16-mixed", "cpu", native_bf16=False) == "32-true"
    assert fallback_precision("bf16-true", "cpu", native_bf16=False) == "32-true"
    assert fallback_precision("bf16-mixed", "cpu", native_bf16=True) is None
    assert fallback_precision("32-true", "cpu", native_bf16=False) is None
    assert fallback_precision("bf16-mixed", "gpu", native_bf16=False) is None
    monkeypatch.setattr("train.__main__.cpu_has_bf16", lambda: False)
    args = ["--config", "train/configs/shapes_vq.yaml", "--trainer.logger", "false",
            "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed"]
    assert train_main(args, run=False).trainer.precision == "32-true"
    assert train_main(args + ["--bf16_fallback", "false"], run=False).trainer.precision == "bf16-mixed"


def test_nan_loss_stops_before_it_is_checkpointed(tmp_path):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(max_steps=10, callbacks=[FiniteLossGuard(), checkpoints], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(FloatingPointError, match="loss is nan at batch 4 .*resume from the last checkpoint"):
        trainer.fit(NaNAtStep(bad_step=4))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4  # the finite steps were checkpointed, the broken one was not
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_image_grid_layout():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    grid = image_grid(images, columns=2)  # (3, 4, 4): two rows, the last cell white padding
    assert grid.shape == (3, 4, 4) and grid.dtype == torch.uint8
    assert grid[:, :2, :2].eq(0).all() and grid[:, :2, 2:].eq(128).all() and grid[:, 2:, :].eq(255).all()


# --- fault tolerance and multi-process runs (real CLI subprocesses) ------------------------------

@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_equals_an_uninterrupted_run(world, tmp_path):
    reference = tmp_path / "reference"
    result = run_cli(world, stage_config(world, reference, max_steps=32), tmp_path / "reference.yaml")
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    record = {"class_path": "test_helpers_train.RecordBatches", "init_args": {"path": str(tmp_path / "batches")}}
    config = stage_config(world, killed, max_steps=32, callbacks=(record,))
    process = start_cli(world, config, tmp_path / "killed.yaml")
    deadline = time.monotonic() + 90
    while not (killed / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))  # an arbitrary moment after the first checkpoint
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL  # killed mid-stage, no chance to clean up
    resume_step = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 4 <= resume_step < 32 and resume_step % 4 == 0 and not (killed / "export").exists()

    result = run_cli(world, config, tmp_path / "killed.yaml")  # the very same command again
    assert result.returncode == 0, result.stderr[-3000:]
    assert "auto-resume" in result.stdout + result.stderr

    steps = [json.loads(line) for line in (tmp_path / "batches.0.jsonl").read_text().splitlines()]
    # A kill between a checkpoint and the next batch loses nothing: then no step is redone.
    restart = next((i for i in range(1, len(steps)) if steps[i][1] <= steps[i - 1][1]), resume_step)
    assert [s[1] for s in steps] == [*range(restart), *range(resume_step, 32)]  # lost steps are redone...
    redone = steps[restart:restart + restart - resume_step]
    assert [s[2] for s in redone] == [s[2] for s in steps[resume_step:restart]]  # ...on exactly the same data

    (want, want_weights), (got, got_weights) = final_state(reference), final_state(killed)
    assert got["global_step"] == want["global_step"] == 32
    assert got_weights.keys() == want_weights.keys()
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name])
    assert got["lr_schedulers"] == want["lr_schedulers"]
    # The export is the EMA of the weights (restored on resume too), not the last step's weights.
    ema = next(state for key, state in got["callbacks"].items() if key.startswith("EMAWeights"))
    assert ema["updates"] == 32
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], ema["shadow"][f"model.{name}"].to(got_weights[name].dtype))
    assert any(not torch.equal(got_weights[n], got["state_dict"][f"model.{n}"].to(got_weights[n].dtype))
               for n in want_weights)
    for got_state, want_state in zip(got["optimizer_states"][0]["state"].values(),
                                     want["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(got_state["exp_avg_sq"], want_state["exp_avg_sq"])
    # The optimizer and the checkpoints see the trainable tensors only: the Qwen is referenced, not copied.
    assert len(got["optimizer_states"][0]["state"]) == len(want_weights)
    assert got["state_dict"] and all(is_trainable(name) for name in got["state_dict"])
    assert got["state_dict"].keys() == {f"model.{n}" for n in want_weights}


def test_auto_resume_skips_a_torn_last_checkpoint(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    torch.save({"global_step": 4}, tmp_path / "step4.ckpt")
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 torn")
    with pytest.warns(UserWarning, match="unreadable"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step4.ckpt"
    torch.save({"global_step": 8}, tmp_path / "last.ckpt")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "last.ckpt"


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_one_process_with_the_whole_batch(world, tmp_path):
    single = tmp_path / "single"
    result = run_cli(world, stage_config(world, single, max_steps=4, batch_size=8, i2t_ratio=0.0),
                     tmp_path / "single.yaml")
    assert result.returncode == 0, result.stderr[-3000:]

    ddp = tmp_path / "ddp"
    record = {"class_path": "test_helpers_train.RecordBatches", "init_args": {"path": str(tmp_path / "ddp_batches")}}
    config = stage_config(world, ddp, max_steps=4, batch_size=4, i2t_ratio=0.0, callbacks=(record,))
    config["trainer"].update(strategy="ddp", devices=2, accelerator="cpu")
    result = run_cli(world, config, tmp_path / "ddp.yaml", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [[json.loads(line) for line in (tmp_path / f"ddp_batches.{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4]
    reference = CodesDataModule(**config["data"]["init_args"] | {"batch_size": 8})  # the stage's data, one process
    reference.setup()
    reference = reference.train_set
    for step in range(4):  # the two ranks' rows are disjoint halves of the one-process batch
        assert ranks[0][step][2] + ranks[1][step][2] == reference.make_batch(step)["index"].tolist()
    (_, want), (checkpoint, got) = final_state(single), final_state(ddp)
    assert checkpoint["global_step"] == 4
    for name in want:  # gradients were all-reduced: averaging two halves equals the whole batch
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
