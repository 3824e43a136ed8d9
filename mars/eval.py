"""Shapes-world evaluation: score images against their category prompts, GenEval style.

    python -m mars.eval --images DIR          # per-category / overall table, plain and strict
    python -m mars.eval --images DIR --json   # the same as JSON
    python -m mars.eval --generate --n 300 --lang both [--checkpoint DIR] [--seed S] [--cfg 3] [--no-sr] [--out DIR]
    python -m mars.eval --generate --n 300 --failures failures.png   # and a contact sheet of the failed images
    python -m mars.eval --vq checkpoints/mars-shapes/vq --n 200 --size 256 --seed 1234   # a VQ tokenizer's round trips
    python -m mars.eval --images GEN --reference REAL   # any images: FID, KID, concept retrieval (mars.metrics)
    python -m mars.eval --generate --checkpoint BUNDLE --reference REAL [--n 300] [--lang en|zh|both] [--cache DIR]
    python -m mars.eval --generate --checkpoint BUNDLE --reference REAL --n 64 --sheet sheet.png   # real | EN | ZH
    python -m mars.eval --vq DIR --reference REAL --n 256 --size 64   # what retrieval sees in a VQ's round trips

DIR holds the images and captions.jsonl (`file` or `image`, `caption`) or prompts.jsonl (`file`,
`prompt`), e.g. from `python -m mars.shapes --out DIR` (a generator's own images score 1.0).
`--generate` samples fresh seeded category prompts (the six categories in turn) with a MARS bundle
(default checkpoints/mars-shapes), in batches, scores the images and prints the same table;
`--out DIR` keeps the images and prompts.jsonl, so `--images DIR` rescores them. `--generate --reference
REAL` evaluates a model trained on a folder of images instead: it samples one image for each of up to N
captions of REAL's records (a seeded draw; `caption`, `caption_zh` or both by --lang) and reports FID, KID
and concept retrieval against REAL, for all the images and for each language; `--sheet PNG` also tiles
each drawn record's real image beside its samples, each labelled with retrieval's verdict (right, or its
concept's rank and the concept it looks most like), failures included. `--vq DIR` renders
fresh scenes, round-trips them through the tokenizer and reports how often the scorer's verdict
survives, PSNR and codebook usage; `--vq DIR --reference REAL` round-trips N of REAL's images (a
seeded draw, each brought to --size) instead and reports their PSNR, FID, KID and retrieval against
REAL: the ceiling the tokenizer sets on a model trained on its codes.
Library use: `evaluate([(prompt, pil_image), ...])` -> report dict; `format_table(report)`.
Bad input ends with a one-line error and exit code 2 (--out and --failures are checked before the
model loads; --out must be a new or empty folder, or one an earlier run wrote); with --out, Ctrl-C
ends with exit code 130 and prompts.jsonl naming exactly the images written.
Tests: `pytest tests/test_eval.py tests/test_sample.py tests/test_bad_input.py`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mars.cli import (DEFAULT_CHECKPOINT, POSITIVE_INT, OneLineParser, add_sampling_arguments, check_image_folder,
                      check_output_file, check_prompts, load_pipeline, one_line_errors, sampling_options,
                      write_image_folder)
from mars.images import labelled_sheet, load_image, read_image_listing, save_image
from mars.shapes import (CATEGORIES, LANGS, MAX_IMAGE_SIDE, format_prompt, image_side, parse_prompt, random_spec,
                         score, summarize, write_eval_folder)

SHEET_TILE = 128  # px of one image in a --failures or --sheet sheet
SHEET_COLUMNS = 6


def read_listing(folder: str | Path) -> list[tuple[Path, str]]:
    """[(image path, prompt)] from folder/captions.jsonl or folder/prompts.jsonl."""
    return [(path, text) for path, text, _, _ in read_image_listing(folder)[1]]


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


# ----------------------------------------------------------------------------- --generate

def category_prompts(n: int, langs: tuple[str, ...], seed: int) -> list[dict]:
    """n fresh evaluation prompts: the six categories in turn, the languages alternating by round."""
    rows = []
    for i in range(n):
        category, lang = CATEGORIES[i % len(CATEGORIES)], langs[(i // len(CATEGORIES)) % len(langs)]
        spec = random_spec(np.random.default_rng([seed, i]), category)
        rows.append({"prompt": format_prompt(spec, lang), "category": category, "lang": lang})
    return rows


def iter_images(pipe, prompts: list[str], batch_size: int, seed: int, options: dict, bar: tqdm | None = None):
    """One image per prompt as they come, `batch_size` prompts per pipeline call, from one seeded generator."""
    import torch

    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        images = pipe(batch, generator=generator, **options).images
        if bar is not None:
            bar.update(len(batch))
        yield from images


def sample_images(pipe, prompts: list[str], batch_size: int, seed: int, options: dict,
                  progress: bool = True) -> list[Image.Image]:
    """iter_images as a list, with a progress bar."""
    with tqdm(total=len(prompts), desc="sampling", unit="img", disable=not progress) as bar:
        return list(iter_images(pipe, prompts, batch_size, seed, options, bar))


def failure_sheet(pairs, report: dict) -> Image.Image | None:
    """The images whose prompt failed, tiled with their prompt under each (a Chinese prompt is shown
    by its English twin, which the default font can draw) -> one RGB sheet, or None when none failed."""
    failed = [(prompt, image) for (prompt, image), verdict in zip(pairs, report["verdicts"]) if not verdict["passed"]]
    if not failed:
        return None
    tiles = []
    for prompt, image in failed:
        spec, lang = parse_prompt(prompt)
        tiles.append((image, prompt if lang == "en" else "zh: " + format_prompt(spec, "en")))
    return labelled_sheet(tiles, SHEET_COLUMNS, SHEET_TILE)


def verdicts_agree(captions: list[str], originals, reconstructions) -> list[bool]:
    """Per image: does the scorer give the reconstruction the same plain verdict as the original?
    originals, reconstructions: (B, 3, H, W) tensors in [-1, 1]."""
    from vq import tensor_to_images

    return [score(caption, original).passed == score(caption, rebuilt).passed
            for caption, original, rebuilt in zip(captions, tensor_to_images(originals),
                                                  tensor_to_images(reconstructions))]


def check_round_trip_size(tokenizer, size: int) -> None:
    """A one-line error for a size the tokenizer cannot encode, before any round trip (whose error would name a
    temporary folder)."""
    f = tokenizer.downsample
    if size % f:
        raise ValueError(f"image size {size} is not a multiple of the tokenizer's downsampling factor {f}: "
                         f"use a multiple, e.g. {8 * f} or {16 * f}")


def evaluate_tokenizer(tokenizer, n: int = 200, size: int = 256, seed: int = 1234, batch_size: int = 16,
                       progress: bool = True) -> dict:
    """Verdict agreement, PSNR and codebook usage of a VQ tokenizer on n fresh shapes-world images of
    side `size` (the evaluation folder writer's categories in turn, English and Chinese)."""
    import torch

    from vq.reconstruct import codebook_stats, reconstruct_folder

    check_round_trip_size(tokenizer, size)
    with tempfile.TemporaryDirectory() as tmp:
        originals, rebuilt = Path(tmp, "originals"), Path(tmp, "rebuilt")
        write_eval_folder(originals, n, size, seed, progress=progress)
        result = reconstruct_folder(tokenizer, originals, rebuilt, batch_size, progress=progress)
        agree, strict_agree, passed = [], [], []
        for path, caption in tqdm(read_listing(originals), desc="scoring", unit="img", disable=not progress):
            before, after = score(caption, load_image(path)), score(caption, load_image(rebuilt / path.name))
            agree.append(before.passed == after.passed)
            strict_agree.append(before.strict == after.strict)
            passed.append(before.passed)
    counts = torch.bincount(result["codes"], minlength=tokenizer.codebook_size).float()
    return {"n": n, "size": size, "seed": seed, "agreement": sum(agree) / n,
            "strict_agreement": sum(strict_agree) / n, "originals_passed": sum(passed) / n,
            "psnr": result["psnr"], **codebook_stats(counts), "codebook_size": tokenizer.codebook_size}


def generate_report(args: argparse.Namespace) -> dict:
    """--generate: sample the category prompts with the model, optionally save them, score them."""
    langs = LANGS if args.lang == "both" else (args.lang,)
    rows = category_prompts(args.n, langs, args.seed)
    prompts = [row["prompt"] for row in rows]
    options = sampling_options(args)
    pipe = load_pipeline(args.checkpoint, args.device, args.dtype)
    check_prompts(pipe, prompts, options["super_resolution"])
    with tqdm(total=len(prompts), desc="sampling", unit="img", disable=args.json) as bar:  # closed before any message
        images = iter_images(pipe, prompts, args.batch_size, args.seed, options, bar)
        # With --out each image is on disk (and in the listing) as soon as it is sampled.
        images = write_image_folder(args.out, images, rows) if args.out is not None else list(images)
    report = evaluate(zip(prompts, images), progress=not args.json, total=len(images))
    if args.failures is not None:
        sheet = failure_sheet(zip(prompts, images), report)
        if sheet is None:
            print(f"no image failed: {args.failures} not written", file=sys.stderr)
        else:
            save_image(sheet, args.failures)
    return report


def reference_prompts(items: list, n: int, langs: tuple[str, ...], seed: int) -> list[dict]:
    """Up to n prompts from the records of a real folder (mars.metrics.Item): records in an order drawn with
    `seed`, each giving its `caption` for "en" and its `caption_zh` for "zh" (where it has one), with the
    fields retrieval checks (concept, style, skin_tone) and the real image's path (`reference_file`)."""
    rows = []
    for j in np.random.default_rng(seed).permutation(len(items)).tolist():
        item = items[j]
        kept = {key: item.record[key] for key in ("concept", "style", "skin_tone") if key in item.record}
        for lang in langs:
            text = item.text if lang == "en" else item.record.get("caption_zh")
            if isinstance(text, str) and text.strip():
                rows.append({"prompt": text, "lang": lang, **kept, "reference_file": str(item.path)})
        if len(rows) >= n:
            break
    return rows[:n]


def retrieval_sheet(rows: list[dict], images: list[Image.Image], verdicts: list[dict],
                    items: list) -> Image.Image:
    """A contact sheet of --generate --reference: for each drawn record, its real image (captioned) then its
    samples in row order, each labelled with retrieval's verdict. Two records a line of six tiles."""
    real = {str(item.path): item for item in items}  # by path: two --reference folders may share file names
    tiles, current = [], None
    for row, image, verdict in zip(rows, images, verdicts, strict=True):
        if row["reference_file"] != current:
            current = row["reference_file"]
            tiles += [(None, "")] * (-len(tiles) % 3)  # every record starts a group of three tiles
            tiles.append((load_image(real[current].path), real[current].text))
        rank, nearest = verdict["rank"], verdict["nearest"].replace("_", " ")
        label = ("right" if rank == 0 else "concept unknown" if rank is None
                 else f"rank {rank + 1}; looks like: {nearest}")
        tiles.append((image, f"{row['lang'].upper()}: {label}"))
    return labelled_sheet(tiles, SHEET_COLUMNS, SHEET_TILE)


def generate_real_report(args: argparse.Namespace) -> dict:
    """--generate --reference: sample captions of the real folder with the model, then FID, KID and retrieval
    against it (mars.metrics.compare_folders), all images and each language apart."""
    from mars.metrics import InceptionFeatures, compare_folders, read_folders

    model = InceptionFeatures()  # before any sampling: a missing model file is a one-line error now
    langs = LANGS if args.lang == "both" else (args.lang,)
    items = read_folders(args.reference)
    rows = reference_prompts(items, args.n, langs, args.seed)
    if not rows:
        raise ValueError(f"--reference {' '.join(map(str, args.reference))} has no caption_zh to sample: "
                         "use --lang en")
    prompts = [row["prompt"] for row in rows]
    options = sampling_options(args)
    pipe = load_pipeline(args.checkpoint, args.device, args.dtype)
    check_prompts(pipe, prompts, options["super_resolution"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out if args.out is not None else Path(tmp)
        with tqdm(total=len(prompts), desc="sampling", unit="img", disable=args.json) as bar:
            images = write_image_folder(folder, iter_images(pipe, prompts, args.batch_size, args.seed, options, bar),
                                        rows)
        report = compare_folders(folder, args.reference, args.gallery, batch_size=args.batch_size,
                                 device=args.device, cache_dir=args.cache, progress=not args.json, model=model,
                                 group_by="lang", per_image=args.sheet is not None)
    if args.sheet is not None:
        verdicts = report["retrieval"].pop("per_image")
        save_image(retrieval_sheet(rows, images, verdicts, items), args.sheet)
    report["generated"].update(folder=str(args.out) if args.out is not None else "not kept (--out DIR keeps them)",
                               checkpoint=str(args.checkpoint or DEFAULT_CHECKPOINT), seed=args.seed)
    return report


def vq_real_report(args: argparse.Namespace) -> dict:
    """--vq --reference: round-trip n records of the real folder (a seeded draw) at --size through the
    tokenizer, then FID, KID and retrieval of the reconstructions against the folder, as for generated
    images, with the mean PSNR: how much of what retrieval sees the codes keep."""
    from mars.metrics import InceptionFeatures, compare_folders, read_folders
    from vq import VQTokenizer
    from vq.reconstruct import reconstruct_folder

    tokenizer = VQTokenizer.from_pretrained(args.vq)
    check_round_trip_size(tokenizer, args.size)
    model = InceptionFeatures()  # before the round trips: a missing model file is a one-line error now
    items = read_folders(args.reference)
    drawn = [items[j] for j in np.random.default_rng(args.seed).permutation(len(items))[:args.n].tolist()]
    with tempfile.TemporaryDirectory() as tmp:
        originals, rebuilt = Path(tmp, "originals"), Path(tmp, "rebuilt")
        originals.mkdir()
        with open(originals / "captions.jsonl", "w", encoding="utf-8") as listing:
            for j, item in enumerate(drawn):  # new names: two --reference folders may share file names
                name = f"{j:06d}{item.path.suffix.lower()}"
                shutil.copyfile(item.path, originals / name)
                record = {key: value for key, value in item.record.items() if key not in ("file", "image")}
                listing.write(json.dumps({**record, "file": name, "caption": item.text}, ensure_ascii=False) + "\n")
        result = reconstruct_folder(tokenizer, originals, rebuilt, args.batch_size, args.size,
                                    progress=not args.json)
        report = compare_folders(rebuilt, args.reference, args.gallery, batch_size=args.batch_size,
                                 device=args.device, cache_dir=args.cache, progress=not args.json, model=model)
    report["generated"].update(folder=f"round trips of {len(drawn)} reference images at {args.size} px",
                               vq=str(args.vq), size=args.size, seed=args.seed, psnr=result["psnr"])
    return report


def scored_image(path: Path, decode: bool = True) -> Image.Image:
    """An image of an --images folder, or a one-line error naming it (the scorer reads square images).
    decode=False checks the header alone."""
    image = load_image(path, decode=decode)
    if image.width != image.height:
        raise ValueError(f"{path} is {image.width} x {image.height} pixels: the scorer reads square images "
                         "(shapes-world renders); crop or pad it to a square")
    return image


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mars.eval", description="Score shapes-world images against their prompts")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder with images and captions.jsonl or prompts.jsonl")
    source.add_argument("--generate", action="store_true", help="sample the category prompts with a MARS bundle")
    source.add_argument("--vq", type=Path, metavar="DIR",
                        help="round-trip fresh scenes (or, with --reference, its images) through this VQ tokenizer")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    real = parser.add_argument_group("any images against real ones (FID, KID, concept retrieval), with --images, "
                                     "--generate or --vq")
    real.add_argument("--reference", type=Path, nargs="+", default=None, metavar="DIR",
                      help="real images with captions.jsonl: report FID, KID and retrieval instead of the shapes "
                           "scorer; --generate samples the captions of its records")
    real.add_argument("--gallery", type=Path, nargs="+", default=None, metavar="DIR",
                      help="retrieval searches these folders (default: --reference)")
    real.add_argument("--cache", type=Path, default=None, metavar="DIR",
                      help="keep the reference's InceptionV3 features in this folder (computed once)")
    generation = parser.add_argument_group("--generate and --vq options")
    generation.add_argument("--n", type=POSITIVE_INT, default=300,
                            help="images to sample or render; with --reference, its captions to sample or its "
                                 "images to round-trip (default 300)")
    generation.add_argument("--lang", choices=(*LANGS, "both"), default="both", help="prompt language (default both)")
    generation.add_argument("--out", type=Path, default=None, help="also save the images and prompts.jsonl here")
    generation.add_argument("--failures", type=Path, default=None, metavar="PNG",
                            help="also write the failed images, tiled with their prompts, to this PNG")
    generation.add_argument("--sheet", type=Path, default=None, metavar="PNG",
                            help="with --reference: also tile each record's real image beside its samples, "
                                 "labelled with retrieval's verdict, into this PNG")
    generation.add_argument("--size", type=image_side, default=256,
                            help=f"--vq: image side in px, 48 to {MAX_IMAGE_SIDE}; with --reference, each of its "
                                 "images is brought to it (default 256)")
    add_sampling_arguments(generation, batch_size=True)
    args = parser.parse_args(argv)
    if (args.out or args.failures or args.sheet) and not args.generate:
        parser.error("--out, --failures and --sheet go with --generate")
    if args.sheet and not args.reference:
        parser.error("--sheet tiles samples beside the real images of --reference REAL: give it, or use --failures")
    if (args.gallery or args.cache) and not args.reference:
        parser.error("--gallery and --cache go with --reference")
    if args.failures and args.reference:
        parser.error("--failures tiles the images the shapes scorer failed: it does not go with --reference")
    try:  # the outputs, before the model loads
        if args.out is not None:
            check_image_folder(args.out, "--out")
        for flag, path in (("--failures", args.failures), ("--sheet", args.sheet)):
            if path is not None:
                check_output_file(path, flag)
    except ValueError as error:
        parser.error(str(error))
    return run(args)


@one_line_errors
def run(args: argparse.Namespace) -> int:
    if args.vq is not None and args.reference is None:
        from vq import VQTokenizer

        figures = evaluate_tokenizer(VQTokenizer.from_pretrained(args.vq), args.n, args.size, args.seed,
                                     args.batch_size, progress=not args.json)
        print(json.dumps(figures, indent=2))
        return 0
    if args.reference is not None:  # a folder of real images: not the shapes world, Inception features
        from mars.metrics import compare_folders, format_report

        if args.generate:
            report = generate_real_report(args)
        elif args.vq is not None:
            report = vq_real_report(args)
        else:
            report = compare_folders(args.images, args.reference, args.gallery, batch_size=args.batch_size,
                                     device=args.device, cache_dir=args.cache, progress=not args.json)
        print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_report(report))
        return 0
    if args.generate:
        report = generate_report(args)
    else:
        entries = read_listing(args.images)
        for path, prompt in entries:  # all checked first: a bad image or prompt stops the run before scoring
            scored_image(path, decode=False)
            parse_prompt(prompt)
        images = ((prompt, scored_image(path)) for path, prompt in entries)  # lazily: one image in memory
        report = evaluate(images, progress=not args.json, total=len(entries))
    if args.json:
        print(json.dumps({k: report[k] for k in ("all", "by_lang")}, ensure_ascii=False, indent=2))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
