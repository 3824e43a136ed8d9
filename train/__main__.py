"""Training entry for every MARS stage: LightningCLI over one YAML per stage (subclass mode).

    python -m train fit --config train/configs/shapes_stage1.yaml
    python -m train fit --config train/configs/shapes_vq.yaml --trainer.max_steps 200   # override anything
    python -m train fit --config A.yaml --config smoke.yaml                              # later files win

The YAML names `model.class_path` and `data.class_path` (any LightningModule / LightningDataModule),
so a new stage is a new YAML, not new code. On top of LightningCLI:

- checkpoints: a ModelCheckpoint without `dirpath` writes to `<trainer.default_root_dir>/checkpoints`
  (a fixed place, not the logger's versioned folder), so a rerun can find them;
- auto-resume: without `--ckpt_path`, `fit` resumes from that folder's `last.ckpt` when it exists
  (global step, optimizer, scheduler, callbacks and data position; see train/codes.py). A torn
  last.ckpt (killed mid-write) falls back to the newest readable checkpoint. `--auto_resume false`
  starts afresh;
- precision: a bf16 precision on a CPU without native bf16 (AVX2 and older: PyTorch emulates it, on
  one core) trains in 32-true instead: 30 times faster on a 2-core AVX2 EPYC (benchmarks/train_step.py).
  `--bf16_fallback false` keeps the configured precision.

Multi-GPU / multi-node: set `trainer.devices`, `trainer.num_nodes` and `trainer.strategy` (ddp or
fsdp, see train/configs/real_data_example.yaml), then launch the same command on every node
with torchrun or SLURM's srun (Lightning reads their environment):

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m train fit --config CONFIG.yaml --trainer.num_nodes 2 --trainer.devices 8
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info


def readable_checkpoint(path: Path) -> bool:
    if path.is_dir():  # a sharded checkpoint (train.modules.MarsFSDPStrategy): meta.pt holds the step
        path = path / "meta.pt"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torn zip, truncated pickle, empty file: all mean "not this one"
        return False
    return isinstance(checkpoint, dict) and "global_step" in checkpoint


def find_resume_checkpoint(directory: str | Path) -> Path | None:
    """`last.ckpt` in `directory`, else the newest readable *.ckpt there, else None."""
    directory = Path(directory)
    last = directory / "last.ckpt"
    if last.exists() and readable_checkpoint(last):
        return last
    others = sorted((p for p in directory.glob("*.ckpt") if p.name != "last.ckpt"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    if last.exists():
        warnings.warn(f"{last} is unreadable (killed while writing?); looking for an older checkpoint", stacklevel=2)
    return next((p for p in others if readable_checkpoint(p)), None)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN's check: AVX-512 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")


def trains_on_cpu(accelerator) -> bool:
    if accelerator in (None, "auto"):
        return not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return accelerator == "cpu"


def fallback_precision(precision, accelerator, native_bf16: bool | None = None) -> str | None:
    """32-true where a bf16 `precision` would run emulated (on a CPU without native bf16), else None.
    native_bf16: whether the CPU has it (None: ask this one)."""
    if not (str(precision).startswith("bf16") and trains_on_cpu(accelerator)):
        return None
    native = cpu_has_bf16() if native_bf16 is None else native_bf16
    return None if native else "32-true"


class MarsCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--auto_resume", type=bool, default=True,
                            help="resume fit from <checkpoint dir>/last.ckpt when it exists and no ckpt_path is given")
        parser.add_argument("--bf16_fallback", type=bool, default=True,
                            help="train a bf16 precision in 32-true on a CPU without native bf16 (emulated bf16 "
                                 "was 30 times slower than fp32 on an AVX2 CPU)")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if not config.get("bf16_fallback", True):
            return
        trainer = config["trainer"]
        wanted = trainer.get("precision")
        fallback = fallback_precision(wanted, trainer.get("accelerator"))
        if fallback is not None:
            rank_zero_info(f"precision {wanted}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native "
                           f"bf16, which PyTorch emulates on one core: training in {fallback} "
                           "(--bf16_fallback false keeps it)")
            trainer["precision"] = fallback

    def before_fit(self) -> None:
        checkpoints = [cb for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        for callback in checkpoints:
            if callback.dirpath is None:
                callback.dirpath = str(Path(self.trainer.default_root_dir) / "checkpoints")
        config = self.config_init["fit"]
        if config.get("ckpt_path") or not config.get("auto_resume", True) or not checkpoints:
            return
        found = find_resume_checkpoint(checkpoints[0].dirpath)
        if found is not None:
            rank_zero_info(f"auto-resume: continuing from {found}")
            config["ckpt_path"] = str(found)


def bad_input_line(error: BaseException) -> str:
    """One line for a bad config or bad data: jsonargparse wraps the error a class's __init__ (or a data
    module's setup) raised in its own multi-line report, so the innermost cause says what is wrong."""
    while error.__cause__ is not None and not isinstance(error, argparse.ArgumentError):
        error = error.__cause__
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The training CLI; bad input (a config key, a missing model, a corrupt codes folder) ends in one line
    "error: ..." and exit code 2 instead of a usage dump or a traceback."""
    try:
        return MarsCLI(subclass_mode_model=True, subclass_mode_data=True, args=args, run=run,
                       save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    except (argparse.ArgumentError, OSError, ValueError) as error:
        print(f"error: {bad_input_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
