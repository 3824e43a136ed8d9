"""Sampler tuning: the bundle's default settings, chosen on prompts the evaluation does not use.

    from mars.tuning import tune_sampling, tune_superres, RetrievalJudge
    ranked = tune_sampling(pipe)                    # [(settings, summary)], best first: shapes-world prompts
    ranked_sr = tune_superres(pipe, ranked[0][0])   # super-resolution settings for that base
    ranked = tune_sampling(pipe, judge=RetrievalJudge("data/emoji/train"))   # an image folder's captions

A judge holds the prompts and scores one image per prompt into a summary whose "score" ranks the settings:
ShapesJudge, the shapes scorer's mean of overall and strict accuracy on category prompts; RetrievalJudge,
concept retrieval's mean of top-1 and top-5 on captions of a real folder's records (mars.metrics).
train.pipeline runs them after training and writes the winners into the bundle's model_index.json.
Tests: `pytest tests/test_pipeline.py -k tuned` (shapes), `pytest tests/test_folder_pipeline.py -k emoji_bundle` (folder).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mars.eval import category_prompts, reference_prompts, sample_images
from mars.shapes import LANGS, score, summarize

# Sampler settings tried by tune_sampling, and the prompt seed it uses: not the evaluation's (0), so
# the reported accuracy comes from prompts the settings were not chosen on.
TUNING_GRID = {"guidance_scale": (2.0, 3.0, 5.0), "temperature": (0.7, 1.0), "top_k": (0, 16)}
# An image folder's model draws a named concept by recalling its training images, and strong guidance
# pushes a recalled image off its codes; a folder run's tuning therefore tries no and mild guidance too,
# and a low temperature, which keeps a sample on the codes of the image it recalls (docs/model-card-emoji.md).
RETRIEVAL_TUNING_GRID = {"guidance_scale": (1.0, 1.5, 2.0, 3.0), "temperature": (0.3, 0.7, 1.0), "top_k": (0, 16)}
TUNING_CANDIDATES = (1, 8)
TUNING_FINALISTS = 3  # single-sample winners rerun with each larger candidate count
SUPERRES_TUNING_GRID = {"sr_guidance_scale": (1.0, 3.0), "sr_temperature": (0.0, 0.7)}
TUNING_SEED = 1_000_003


class ShapesJudge:
    """n shapes-world category prompts (both languages) and the shapes scorer: score = mean of overall and
    strict accuracy."""

    def __init__(self, n: int = 96, seed: int = TUNING_SEED):
        self.prompts = [row["prompt"] for row in category_prompts(n, LANGS, seed)]

    def __call__(self, images: list[Image.Image]) -> dict:
        summary = summarize([score(p, im) for p, im in zip(self.prompts, images)])
        return summary | {"score": (summary["overall"] + summary["overall_strict"]) / 2}


class RetrievalJudge:
    """Captions of n records of a real image folder (English and Chinese, drawn with `seed`) and concept
    retrieval of each sample among the folder's images: score = mean of top-1 and top-5. The folder's
    InceptionV3 features are computed once (kept under `cache_dir` when given)."""

    def __init__(self, folder: str | Path, n: int = 96, seed: int = TUNING_SEED, cache_dir: Path | None = None,
                 batch_size: int = 32, device: str | torch.device | None = None):
        from mars.metrics import InceptionFeatures, extract_features, keys_of, read_folder

        items = read_folder(folder)
        rows = reference_prompts(items, n, LANGS, seed)
        by_path = {str(item.path): item for item in items}
        self.prompts = [row["prompt"] for row in rows]
        self.keys = [keys_of(by_path[row["reference_file"]]) for row in rows]
        self.gallery_keys = [keys_of(item) for item in items]
        self.model, self.batch_size, self.device = InceptionFeatures(), batch_size, device
        self.gallery = extract_features([item.path for item in items], self.model, batch_size, device,
                                        progress=False, cache_dir=cache_dir, desc="reference")

    def __call__(self, images: list[Image.Image]) -> dict:
        from mars.metrics import pixel_features, retrieval

        pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1) for im in images])
        features = pixel_features(pixels.float(), self.model, self.batch_size, self.device)  # (B, 2048)
        found = retrieval(features, self.keys, self.gallery, self.gallery_keys)
        return {"top1": found["top1"], "top5": found["top5"], "n": len(images),
                "score": (found["top1"] + found["top5"]) / 2}


def _ranked(results: list) -> list:
    return sorted(results, key=lambda r: -r[1]["score"])


def _grid(grid: dict) -> list[dict]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


class Trials:
    """Sampler trials, settings -> (settings, summary) of one image per prompt of `judge` sampled with
    settings | `extra` (pipeline keywords). With `log` (a JSON-lines file), each finished trial is appended there
    and a trial found there is not rerun: an interrupted tuning resumes at its first unfinished trial. A log
    belongs to one model and one judge; its owner deletes it when either changes."""

    def __init__(self, pipe, judge, seed: int, batch_size: int, extra: dict | None = None, log: Path | None = None):
        self.pipe, self.judge, self.seed, self.batch_size = pipe, judge, seed, batch_size
        self.extra, self.log = extra or {}, log
        self.done = {}
        if log is not None and log.is_file():
            self.done = read_trials(log)
            text = log.read_bytes()
            with log.open("r+b") as file:  # drop a line cut short, so the next trial starts a line of its own
                file.truncate(text.rfind(b"\n") + 1)

    def __call__(self, settings: dict) -> tuple[dict, dict]:
        key = json.dumps(settings, sort_keys=True)
        if key not in self.done:
            start = time.perf_counter()
            images = sample_images(self.pipe, self.judge.prompts, self.batch_size, self.seed, settings | self.extra,
                                   progress=False)
            row = {"settings": settings, "summary": self.judge(images),
                   "seconds": round(time.perf_counter() - start, 1)}
            self.done[key] = row
            if self.log is not None:
                with self.log.open("a") as log:
                    log.write(json.dumps(row) + "\n")
        return settings, self.done[key]["summary"]


def read_trials(log: Path) -> dict[str, dict]:
    """The finished trials in a Trials log, by their settings (JSON with sorted keys): {"settings", "summary",
    "seconds"} each. No file: none. A last line cut short by an interruption is not a finished trial."""
    rows = {}
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[json.dumps(row["settings"], sort_keys=True)] = row
    return rows


def tune_sampling(pipe, n: int = 96, seed: int = TUNING_SEED, batch_size: int = 16, grid: dict | None = None,
                  candidates: tuple[int, ...] = TUNING_CANDIDATES, finalists: int = TUNING_FINALISTS,
                  progress: bool = True, judge=None, log: Path | None = None,
                  super_resolution: bool = False) -> list[tuple[dict, dict]]:
    """Base-stage sampler settings chosen on the prompts of `judge` (default: ShapesJudge(n, seed), n
    category prompts in both languages), base images -> [(settings, summary)] best first by the judge's score.
    super_resolution: judge the images the pipeline's super-resolution draws from each base sample (at its
    own settings), for a base whose own images are too small to judge.

    Every combination of `grid` (default TUNING_GRID) is sampled with one candidate, then the best
    `finalists` of them with each larger number of `candidates` (self-reranking costs that many
    samples an image). Not just the single best: reranking can favour another setting (a CPU-trained
    base scored CFG 3 above CFG 2 at best of 8, docs/experiments.md, "The CPU-only path"). `log`: see Trials."""
    trial = Trials(pipe, judge or ShapesJudge(n, seed), seed, batch_size, {"super_resolution": super_resolution}, log)
    combos = [settings | {"candidates": 1} for settings in _grid(grid or TUNING_GRID)]
    results = _ranked([trial(settings) for settings in tqdm(combos, desc="tuning the sampler", disable=not progress)])
    reranked = [settings | {"candidates": count}
                for settings, _ in results[:finalists] for count in candidates if count != 1]
    bar = tqdm(reranked, desc="tuning best-of-N", disable=not progress)
    return _ranked(results + [trial(settings) for settings in bar])


def tune_superres(pipe, base: dict, n: int = 288, seed: int = TUNING_SEED, batch_size: int = 16,
                  grid: dict | None = None, progress: bool = True, log: Path | None = None,
                  judge=None) -> list[tuple[dict, dict]]:
    """Super-resolution settings (default SUPERRES_TUNING_GRID) for the base settings `base`, scored on
    the upsampled images of the prompts of `judge` (default ShapesJudge(n, seed), n category prompts)
    -> [(settings, summary)] best first. The seed fixes the
    base images, so every trial upsamples the same ones. Three times the base tuning's prompts: the
    settings differ by a few hundredths, and 96 prompts once chose a setting that lost by 0.017 on 300.
    `log`: see Trials (one log serves both tunings: these settings name sr_ keys the base ones lack)."""
    trial = Trials(pipe, judge or ShapesJudge(n, seed), seed, batch_size, log=log)
    combos = _grid(grid or SUPERRES_TUNING_GRID)
    return _ranked([trial(base | settings) for settings in tqdm(combos, desc="tuning super-resolution",
                                                                   disable=not progress)])
