"""Shapes-world evaluation: score images against their category prompts, GenEval style.

    python -m mars.eval --images DIR          # per-category / overall table, plain and strict
    python -m mars.eval --images DIR --json   # the same as JSON
    python -m mars.eval --generate --n 300 --lang both [--checkpoint DIR] [--seed S] [--cfg 3] [--no-sr] [--out DIR]

DIR holds the images and captions.jsonl (`file` or `image`, `caption`) or prompts.jsonl (`file`,
`prompt`), e.g. from `python -m mars.shapes --out DIR` (a generator's own images score 1.0).
`--generate` samples fresh seeded category prompts (the six categories in turn) with a MARS bundle
(default checkpoints/mars-shapes), in batches, scores the images and prints the same table;
`--out DIR` keeps the images and prompts.jsonl, so `--images DIR` rescores them.
Library use: `evaluate([(prompt, pil_image), ...])` -> report dict; `format_table(report)`.

The sampling options (`add_sampling_arguments`, `load_pipeline`, `check_prompts`) serve sample.py
too; their range and prompt checks are MarsPipeline's own (SAMPLER_LIMITS, encode_prompts).
Tests: `pytest tests/test_eval.py tests/test_sample.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mars.shapes import CATEGORIES, LANGS, format_prompt, random_spec, score, summarize

LISTINGS = (("captions.jsonl", "caption"), ("prompts.jsonl", "prompt"))
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mars-shapes"
DTYPES = ("float32", "bfloat16", "float16")


def read_listing(folder: str | Path) -> list[tuple[Path, str]]:
    """[(image path, prompt)] from folder/captions.jsonl or folder/prompts.jsonl."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    for name, prompt_key in LISTINGS:
        listing = folder / name
        if listing.is_file():
            break
    else:
        raise FileNotFoundError(f"{folder} has neither captions.jsonl nor prompts.jsonl; "
                                "write one JSON object a line with 'file' and 'caption' (or 'prompt')")
    entries = []
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{listing}:{number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{listing}:{number}: each line must be a JSON object with 'file' and {prompt_key!r}")
        file, prompt = record.get("file", record.get("image")), record.get(prompt_key)
        if not isinstance(file, str) or not isinstance(prompt, str):
            raise ValueError(f"{listing}:{number}: needs string fields 'file' and {prompt_key!r}")
        entries.append((folder / file, prompt))
    if not entries:
        raise ValueError(f"{listing} lists no images")
    return entries


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except OSError as error:
        raise OSError(f"cannot read image {path}: {error}") from None


def evaluate(pairs, progress: bool = True, total: int | None = None) -> dict:
    """Score (prompt, image) pairs -> {"all": summary, "by_lang": {lang: summary}, "verdicts": [...]}.

    A summary is mars.shapes.summarize's dict: per-category accuracy and strict accuracy, and
    overall = the mean of the category figures. `pairs` may be a lazy iterable."""
    with tqdm(pairs, desc="scoring", unit="img", total=total, disable=not progress) as bar:
        verdicts = [score(prompt, image) for prompt, image in bar]  # the bar closes its line on errors too
    by_lang = {lang: summarize([v for v in verdicts if v.lang == lang])
               for lang in LANGS if any(v.lang == lang for v in verdicts)}
    return {"all": summarize(verdicts), "by_lang": by_lang,
            "verdicts": [{"prompt": v.prompt, "category": v.category, "lang": v.lang,
                          "passed": v.passed, "strict": v.strict, "objects": len(v.objects)}
                         for v in verdicts]}


def format_table(report: dict) -> str:
    """Rows per category plus overall; per-language columns when both languages were scored."""
    langs = list(report["by_lang"]) if len(report["by_lang"]) > 1 else []
    summaries = [report["all"]] + [report["by_lang"][lang] for lang in langs]
    titles = ["acc", "strict"] + [f"{lang} {kind}" for lang in langs for kind in ("acc", "strict")]
    header = f"{'category':<14} {'n':>5}" + "".join(f" {t:>9}" for t in titles)
    lines = [header, "-" * len(header)]

    def row(name: str, n: int, figures: list[tuple[float, float] | None]) -> str:
        cells = [f"{'-' if f is None else format(f[k], '.3f'):>9}" for f in figures for k in (0, 1)]
        return f"{name:<14} {n:>5} " + " ".join(cells)

    for category in CATEGORIES:
        if category in report["all"]["categories"]:
            figures = [s["categories"].get(category) for s in summaries]
            lines.append(row(category, figures[0]["n"],
                             [None if f is None else (f["accuracy"], f["strict"]) for f in figures]))
    lines.append("-" * len(header))
    lines.append(row("overall", report["all"]["n"], [(s["overall"], s["overall_strict"]) for s in summaries]))
    missing = report["all"]["missing_categories"]
    if missing:
        lines.append(f"(overall is over {len(CATEGORIES) - len(missing)} categories; missing: {', '.join(missing)})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sampling options (shared with sample.py)

class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (no usage dump) and exit with code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bounded(kind, limit):
    """An argparse type: a `kind` (int or float) that limit() = (accepts, wanted) accepts, else a usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        accepts, wanted = limit()
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {wanted}")
        return value
    return parse


def sampler_flag(kind, setting: str):
    """The argparse type of a MarsPipeline sampler setting, checked by the pipeline's own SAMPLER_LIMITS
    (imported only when such a flag is given, so `--images` runs never load torch)."""
    def limit():
        from mars.pipeline import SAMPLER_LIMITS

        return SAMPLER_LIMITS[setting]
    return _bounded(kind, limit)


POSITIVE_INT = _bounded(int, lambda: (lambda v: v >= 1, "an integer >= 1"))
NON_NEGATIVE_INT = _bounded(int, lambda: (lambda v: v >= 0, "an integer >= 0"))


def add_sampling_arguments(parser: argparse.ArgumentParser, batch_size: bool = False) -> None:
    """The model and sampler flags of sample.py and `mars.eval --generate`."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"MARS bundle directory (default {DEFAULT_CHECKPOINT.parent.name}/{DEFAULT_CHECKPOINT.name})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="Qwen and experts dtype (default float32)")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="random seed, >= 0 (default 0)")
    # None: the bundle's setting (model_index.json "sampling", the values the model was tuned with).
    parser.add_argument("--cfg", type=sampler_flag(float, "guidance_scale"), default=None,
                        help="classifier-free guidance scale; 1 turns guidance off (default: the model's)")
    parser.add_argument("--temperature", type=sampler_flag(float, "temperature"), default=None,
                        help="0 is greedy (default: the model's)")
    parser.add_argument("--top-k", type=sampler_flag(int, "top_k"), default=None,
                        help="keep the k likeliest codes; 0 keeps all (default: the model's)")
    parser.add_argument("--top-p", type=sampler_flag(float, "top_p"), default=None,
                        help="nucleus sampling mass in (0, 1] (default: the model's)")
    parser.add_argument("--candidates", type=sampler_flag(int, "candidates"), default=None,
                        help="base images sampled per image kept: the one whose prompt the model's own "
                             "image-to-text finds likeliest (default: the model's)")
    parser.add_argument("--sr-cfg", type=sampler_flag(float, "sr_guidance_scale"), default=None,
                        help="guidance scale of super-resolution (default: the model's)")
    parser.add_argument("--sr-temperature", type=sampler_flag(float, "sr_temperature"), default=None,
                        help="temperature of super-resolution; 0 is greedy (default: the model's)")
    parser.add_argument("--no-sr", action="store_true", help="skip super-resolution: base images only (128 px)")
    if batch_size:
        parser.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="prompts per sampling call")


def sampling_options(args: argparse.Namespace) -> dict:
    """MarsPipeline.__call__ keyword arguments from add_sampling_arguments' flags."""
    return dict(guidance_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                candidates=args.candidates, sr_guidance_scale=args.sr_cfg, sr_temperature=args.sr_temperature,
                super_resolution=not args.no_sr)


def resolve_device(name: str | None):
    """A torch.device that exists on this machine, or a ValueError saying what to use instead."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device.type]:
        raise ValueError(f"--device {name}: no {device.type.upper()} device on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_pipeline(checkpoint: Path | None, device: str | None = None, dtype: str | None = None):
    """MarsPipeline from a bundle directory (None: the shipped default), errors as one-line OSError/ValueError."""
    import torch
    from transformers.utils import logging as hf_logging

    from mars.pipeline import INDEX_FILE, MarsPipeline

    torch_device = resolve_device(device)  # before the slow load
    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not (checkpoint / INDEX_FILE).is_file():
            raise FileNotFoundError(f"the default model {checkpoint} is missing: train one with "
                                    "`python -m train.pipeline --preset shapes` (it writes runs/shapes/bundle) "
                                    "and pass --checkpoint runs/shapes/bundle, or copy it to that folder")
    hf_logging.disable_progress_bar()  # our own bars report progress; the weight-loading bar is noise
    return MarsPipeline.from_pretrained(checkpoint, device=torch_device,
                                        dtype=getattr(torch, dtype) if dtype else None)


def check_prompts(pipe, prompts: list[str], super_resolution: bool = True) -> None:
    """All prompts checked before any is sampled: MarsPipeline.encode_prompts, strict (tokens the model
    never saw are an error here, not a silent unknown token). One-line ValueError."""
    pipe.encode_prompts(prompts, super_resolution, strict=True)


# ----------------------------------------------------------------------------- --generate

def category_prompts(n: int, langs: tuple[str, ...], seed: int) -> list[dict]:
    """n fresh evaluation prompts: the six categories in turn, the languages alternating by round."""
    rows = []
    for i in range(n):
        category, lang = CATEGORIES[i % len(CATEGORIES)], langs[(i // len(CATEGORIES)) % len(langs)]
        spec = random_spec(np.random.default_rng([seed, i]), category)
        rows.append({"prompt": format_prompt(spec, lang), "category": category, "lang": lang})
    return rows


def sample_images(pipe, prompts: list[str], batch_size: int, seed: int, options: dict,
                  progress: bool = True) -> list[Image.Image]:
    """Sample one image per prompt, `batch_size` prompts per pipeline call, from one seeded generator."""
    import torch

    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    images = []
    with tqdm(total=len(prompts), desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            images += pipe(batch, generator=generator, **options).images
            bar.update(len(batch))
    return images


# Sampler settings tried by tune_sampling, and the prompt seed it uses: not the evaluation's (0), so
# the reported accuracy comes from prompts the settings were not chosen on.
TUNING_GRID = {"guidance_scale": (2.0, 3.0, 5.0), "temperature": (0.7, 1.0), "top_k": (0, 16)}
TUNING_CANDIDATES = (1, 8)
TUNING_FINALISTS = 3  # single-sample winners rerun with each larger candidate count
SUPERRES_TUNING_GRID = {"sr_guidance_scale": (1.0, 3.0), "sr_temperature": (0.0, 0.7)}
TUNING_SEED = 1_000_003


def _ranked(results: list) -> list:
    return sorted(results, key=lambda r: -(r[1]["overall"] + r[1]["overall_strict"]) / 2)


def _grid(grid: dict) -> list[dict]:
    import itertools

    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _trial(pipe, prompts: list[str], seed: int, batch_size: int, settings: dict) -> tuple[dict, dict]:
    """(settings, summary) of one image per prompt sampled with `settings` (pipeline keywords)."""
    images = sample_images(pipe, prompts, batch_size, seed, settings, progress=False)
    shown = {k: v for k, v in settings.items() if k != "super_resolution"}
    return shown, summarize([score(p, im) for p, im in zip(prompts, images)])


def tune_sampling(pipe, n: int = 96, seed: int = TUNING_SEED, batch_size: int = 16, grid: dict | None = None,
                  candidates: tuple[int, ...] = TUNING_CANDIDATES, finalists: int = TUNING_FINALISTS,
                  progress: bool = True) -> list[tuple[dict, dict]]:
    """Base-stage sampler settings chosen on n category prompts (both languages, base images)
    -> [(settings, summary)] best first by the mean of overall and strict accuracy.

    Every combination of `grid` (default TUNING_GRID) is sampled with one candidate, then the best
    `finalists` of them with each larger number of `candidates` (self-reranking costs that many
    samples an image). Not just the single best: reranking can favour another setting (a CPU-trained
    base scored CFG 3 above CFG 2 at best of 8, checkpoints/README.md "The CPU-only path")."""
    prompts = [row["prompt"] for row in category_prompts(n, LANGS, seed)]
    trial = lambda settings: _trial(pipe, prompts, seed, batch_size, settings | {"super_resolution": False})  # noqa: E731
    combos = [settings | {"candidates": 1} for settings in _grid(grid or TUNING_GRID)]
    results = _ranked([trial(settings) for settings in tqdm(combos, desc="tuning the sampler", disable=not progress)])
    reranked = [settings | {"candidates": count}
                for settings, _ in results[:finalists] for count in candidates if count != 1]
    bar = tqdm(reranked, desc="tuning best-of-N", disable=not progress)
    return _ranked(results + [trial(settings) for settings in bar])


def tune_superres(pipe, base: dict, n: int = 288, seed: int = TUNING_SEED, batch_size: int = 16,
                  grid: dict | None = None, progress: bool = True) -> list[tuple[dict, dict]]:
    """Super-resolution settings (default SUPERRES_TUNING_GRID) for the base settings `base`, scored on
    the upsampled images of n category prompts -> [(settings, summary)] best first. The seed fixes the
    base images, so every trial upsamples the same ones. Three times the base tuning's prompts: the
    settings differ by a few hundredths, and 96 prompts once chose a setting that lost by 0.017 on 300."""
    prompts = [row["prompt"] for row in category_prompts(n, LANGS, seed)]
    combos = _grid(grid or SUPERRES_TUNING_GRID)
    return _ranked([_trial(pipe, prompts, seed, batch_size, base | settings)
                    for settings in tqdm(combos, desc="tuning super-resolution", disable=not progress)])


def write_image_folder(folder: Path, images: Iterable[Image.Image], records: Iterable[dict]) -> None:
    """folder/000000.png ... and folder/prompts.jsonl ({"file", **record} a line): what --images reads.
    Lazy `images` are written one by one as they come."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prompts.jsonl", "w", encoding="utf-8") as listing:
        for index, (image, record) in enumerate(zip(images, records, strict=True)):
            name = f"{index:06d}.png"
            image.save(folder / name)
            listing.write(json.dumps({"file": name, **record}, ensure_ascii=False) + "\n")


def generate_report(args: argparse.Namespace) -> dict:
    """--generate: sample the category prompts with the model, optionally save them, score them."""
    langs = LANGS if args.lang == "both" else (args.lang,)
    rows = category_prompts(args.n, langs, args.seed)
    prompts = [row["prompt"] for row in rows]
    options = sampling_options(args)
    pipe = load_pipeline(args.checkpoint, args.device, args.dtype)
    check_prompts(pipe, prompts, options["super_resolution"])
    images = sample_images(pipe, prompts, args.batch_size, args.seed, options, progress=not args.json)
    if args.out is not None:
        write_image_folder(args.out, images, rows)
    return evaluate(zip(prompts, images), progress=not args.json, total=len(images))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mars.eval", description="Score shapes-world images against their prompts")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder with images and captions.jsonl or prompts.jsonl")
    source.add_argument("--generate", action="store_true", help="sample the category prompts with a MARS bundle")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    generation = parser.add_argument_group("--generate options")
    generation.add_argument("--n", type=POSITIVE_INT, default=300, help="images to sample (default 300)")
    generation.add_argument("--lang", choices=(*LANGS, "both"), default="both", help="prompt language (default both)")
    generation.add_argument("--out", type=Path, default=None, help="also save the images and prompts.jsonl here")
    add_sampling_arguments(generation, batch_size=True)
    args = parser.parse_args(argv)
    try:
        if args.generate:
            report = generate_report(args)
        else:
            entries = read_listing(args.images)
            images = ((prompt, load_image(path)) for path, prompt in entries)  # lazily: one image in memory
            report = evaluate(images, progress=not args.json, total=len(entries))
    except (OSError, ValueError) as error:
        print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: report[k] for k in ("all", "by_lang")}, ensure_ascii=False, indent=2))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
