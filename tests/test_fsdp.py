"""FSDP2 on two CPU processes (gloo): stage 1 sharded per SemVIE layer under train.modules.MarsFSDPStrategy
(Lightning's ModelParallelStrategy, `fully_shard` in configure_model), equal to one process with the whole
batch, and a sharded checkpoint that resumes exactly.

    OMP_NUM_THREADS=1 python -m pytest tests/test_fsdp.py -q

Reuses the DDP test's harness (tests/test_train.py): the tiny world, the stage-1 YAML + smoke overlay,
and the real CLI in subprocesses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from mars.config import MemoryConfig
from mars.model import is_trainable
from tests.test_train import run_cli, stage_config, world  # noqa: F401  (world: the shared fixture)


MEMORY = {"activation_checkpointing": True, "loss_chunk": 16}  # levers that leave the result unchanged


def fsdp_config(world: dict, run_dir, **kwargs) -> dict:
    """The stage-1 test config, checkpoints every 2 steps and all kept, no EMA (its shadow copy is
    not sharded: EMAWeights serves single-process and DDP runs), i2t_ratio 0 as in the DDP test (a
    rank's mix of tasks is drawn per rank, so only a single task splits exactly), activation
    checkpointing and a chunked loss on (recomputation under FSDP too)."""
    config = stage_config(world, run_dir, max_steps=4, every=2, i2t_ratio=0.0, memory=MEMORY, **kwargs)
    callbacks = [cb for cb in config["trainer"]["callbacks"] if not cb["class_path"].endswith("EMAWeights")]
    callbacks[0]["init_args"]["save_top_k"] = -1  # keep the step-2 checkpoint to resume from
    config["trainer"]["callbacks"] = callbacks
    return config


def exported(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "mars_trainable.safetensors")


@pytest.mark.slow
def test_fsdp_two_cpu_processes_equal_one_process_and_resume_exactly(world, tmp_path):
    single = tmp_path / "single"
    result = run_cli(world, fsdp_config(world, single, batch_size=8), tmp_path / "single.yaml")
    assert result.returncode == 0, result.stderr[-3000:]

    def fsdp_run(name: str):
        config = fsdp_config(world, tmp_path / name, batch_size=4)  # 4 rows a rank: the same global batch
        config["trainer"].update(strategy={"class_path": "train.modules.MarsFSDPStrategy"}, devices=2,
                                 accelerator="cpu")
        return run_cli(world, config, tmp_path / f"{name}.yaml", timeout=240)

    result = fsdp_run("fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = exported(single), exported(tmp_path / "fsdp")
    assert got.keys() == want.keys() and all(is_trainable(name) for name in got)
    for name in want:  # gradients reduce-scattered: averaging two halves equals the whole batch
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)

    # The checkpoint is sharded (a directory, each tensor in two pieces, one a rank) and, like every
    # MARS checkpoint, holds the trainable tensors and their optimizer state, nothing of the Qwen.
    step2 = tmp_path / "fsdp" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert step2.is_dir() and sorted(p.name for p in step2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    saved = FileSystemReader(step2).read_metadata().state_dict_metadata
    weights = {key.removeprefix("state_dict.model.") for key in saved if key.startswith("state_dict.")}
    assert weights == set(want)
    assert len(saved[f"state_dict.model.{'model.layers.0.visual_mlp.up_proj.weight'}"].chunks) == 2
    meta = torch.load(step2 / "meta.pt", weights_only=True)
    assert meta["global_step"] == 2 and meta["hyper_parameters"]["memory"]["activation_checkpointing"]

    # Resume: the step-2 checkpoint as a run's last.ckpt, the same command; auto-resume finds it.
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    result = fsdp_run("resumed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "auto-resume: continuing from" in result.stdout + result.stderr
    resumed = exported(tmp_path / "resumed")
    for name in got:  # steps 3 and 4 after the resume are those of the uninterrupted run, bit for bit
        assert torch.equal(resumed[name], got[name]), name


def test_memory_levers_go_from_the_cli_to_the_model_and_the_checkpoint(world, tmp_path):
    """MemoryConfig travels under one name: YAML/CLI `model.init_args.memory.*` -> MarsLitModule(memory=...)
    -> the model -> the checkpoint's hyper-parameters."""
    from train.__main__ import main as train_main

    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(stage_config(world, tmp_path / "run")))
    cli = train_main(["--config", str(path), "--model.init_args.memory.activation_checkpointing", "true",
                      "--model.init_args.memory.frozen_dtype", "bfloat16", "--model.init_args.memory.loss_chunk", "64"],
                     run=False)
    module = cli.model
    assert module.hparams.memory == {"activation_checkpointing": True, "frozen_dtype": "bfloat16", "loss_chunk": 64}
    assert module.model.model.activation_checkpointing and module.model.loss_chunk == 64
    for name, param in module.model.named_parameters():
        assert param.dtype == (torch.float32 if is_trainable(name) else torch.bfloat16), name


def test_the_real_data_config_shards_with_the_strategy_tested_here():
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "train/configs/real_data_example.yaml").read_text())
    assert config["trainer"]["strategy"] == {"class_path": "train.modules.MarsFSDPStrategy"}
    MemoryConfig(**config["model"]["init_args"]["memory"])  # the keys are MemoryConfig's
