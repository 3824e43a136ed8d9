"""Does a model trained on an image folder recall its training images from their captions? A code-space diagnostic.

    python -m train.recall --run runs/emoji                       # a pipeline run: its stage2, text, vq and codes
    python -m train.recall --run runs/emoji --stage stage1 --first-codes 16
    python -m train.recall --checkpoint DIR --codes CODES_DIR     # a bundle and the codes of its training images

Concept retrieval (python -m mars.eval) asks whether a sample looks like the named concept to InceptionV3. This
asks the question beneath it, on the model's side and without decoding an image. One training image of each of
--concepts concepts (mars.metrics.pick_concepts, seed 0) is sampled from its English and from its Chinese caption,
and each sample is matched to the training image whose codes agree with it at the most cells. Per sampler setting:

    match      the share of samples whose nearest training image shows the named concept
    same       the share whose nearest training image is the captioned image itself
    agreement  the mean share of cells a sample shares with its nearest training image

With --first-codes K each setting is also run with the captioned image's first K codes given and the rest
sampled: how far the model completes an image once it knows which one it is drawing. Then the teacher-forced
image loss (nats a code) of the same images, on the first row of the grid and on the rest, under the image's
own caption, the empty caption, and another image's caption: how much of what the caption says lands on the
first codes. docs/emoji.md reads these figures for the emoji model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mars.cli import OneLineParser
from mars.device import resolve_device
from mars.errors import first_line

SETTINGS = ((1.0, 1.0), (3.0, 1.0), (1.0, 0.0), (3.0, 0.0))  # (guidance_scale, temperature): 0 is greedy


def nearest_items(samples: torch.Tensor, codes: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """samples (S, L) and codes (N, L) -> for each sample the index (S,) of the row of `codes` agreeing with it at
    the most cells, and that share of cells (S,)."""
    index, agreement = [], []
    for start in range(0, len(samples), chunk):
        shared = (samples[start:start + chunk, None, :] == codes[None]).float().mean(-1)  # (chunk, N)
        best = shared.max(1)
        index.append(best.indices)
        agreement.append(best.values)
    return torch.cat(index), torch.cat(agreement)


def training_items(code_set) -> list[int]:
    """The indices of a codes directory's training items (its held-out ones come last)."""
    return list(range(len(code_set) - int(code_set.meta.get("held_out", 0))))


def concept_of(record: dict) -> str:
    """A codes record's concept: its `concept`, else its English caption (as mars.metrics.keys_of, unnormalised)."""
    return record.get("concept") or record["captions"].get("caption_en", "")


def pick_items(code_set, n: int, seed: int = 0) -> list[int]:
    """One training item each of n concepts, drawn as the retrieval curve draws its concepts (pick_concepts)."""
    from mars.metrics import pick_concepts

    return pick_concepts(training_items(code_set), n, seed, concept=lambda i: concept_of(code_set.records[i]))


@torch.no_grad()
def recall(pipe, code_set, items: list[int], settings=SETTINGS, first_codes: int = 0, batch_size: int = 32,
           seed: int = 0) -> dict:
    """The figures of the module docstring for `items` of `code_set`, sampled by `pipe` (a MarsPipeline)."""
    from mars.sampling import generate_images, image_nll

    model, device = pipe.model, pipe.device
    grid = tuple(model.config.image_grid)
    size = next((s for s in code_set.sizes if code_set.grid(s) == grid), None)
    if size is None:
        raise ValueError(f"the codes hold grids {[code_set.grid(s) for s in code_set.sizes]}, the model draws {grid}: "
                         "give the codes of its training images")
    train = training_items(code_set)
    codes = code_set.codes[size][train].long().flatten(1).to(device)  # (N, h*w)
    concepts = [concept_of(code_set.records[i]) for i in train]
    position = {item: k for k, item in enumerate(train)}
    languages = [lang for lang in ("en", "zh") if all(f"caption_{lang}" in code_set.records[i]["captions"]
                                                      for i in items)]
    prompts = [(lang, i, code_set.records[i]["captions"][f"caption_{lang}"]) for lang in languages for i in items]
    ids = pipe.encode_prompts([text for _, _, text in prompts], super_resolution=False)
    wanted = torch.tensor([position[i] for _, i, _ in prompts], device=device)
    in_language = {lang: torch.tensor([p[0] == lang for p in prompts]) for lang in languages}
    report = {"concepts": len(items), "languages": languages, "training_items": len(train), "settings": []}
    for given in sorted({0, first_codes}):
        for guidance, temperature in settings:
            start, generator = time.perf_counter(), torch.Generator(device=device).manual_seed(seed)
            samples = []
            for lo in range(0, len(ids), batch_size):
                prefix = codes[wanted[lo:lo + batch_size], :given] if given else None
                samples.append(generate_images(model, ids[lo:lo + batch_size], guidance_scale=guidance,
                                               temperature=temperature, generator=generator,
                                               first_codes=prefix).flatten(1))
            nearest, agreement = nearest_items(torch.cat(samples), codes)
            match = torch.tensor([concepts[a] == concepts[b] for a, b in zip(nearest.tolist(), wanted.tolist())])
            row = {"guidance_scale": guidance, "temperature": temperature, "first_codes": given,
                   "match": match.float().mean().item(), "same": (nearest == wanted).float().mean().item(),
                   "agreement": agreement.mean().item(), "seconds": round(time.perf_counter() - start, 1)}
            for lang, mine in in_language.items():
                row[f"match_{lang}"] = match[mine].float().mean().item()
            report["settings"].append(row)
    width = grid[1]
    images = codes[wanted].view(len(wanted), *grid)
    captions = {"own": ids, "empty": [[] for _ in ids], "other": ids[1:] + ids[:1]}
    for name, texts in captions.items():
        nll = torch.cat([image_nll(model, texts[lo:lo + batch_size], images[lo:lo + batch_size])
                         for lo in range(0, len(ids), batch_size)])  # (S, h*w)
        report[f"nll_{name}"] = {"first_row": nll[:, :width].mean().item(), "rest": nll[:, width:].mean().item(),
                                 "all": nll.mean().item()}
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['concepts']} concepts x {', '.join(report['languages'])} captions, nearest of "
             f"{report['training_items']} training images by shared codes",
             f"{'guidance':>8} {'temp':>5} {'given':>5} {'match':>6} " +
             " ".join(f"{'match_' + lang:>8}" for lang in report["languages"]) + f" {'same':>6} {'agree':>6}"]
    for row in report["settings"]:
        lines.append(f"{row['guidance_scale']:>8g} {row['temperature']:>5g} {row['first_codes']:>5} "
                     f"{row['match']:>6.3f} " + " ".join(f"{row['match_' + lang]:>8.3f}" for lang in report["languages"])
                     + f" {row['same']:>6.3f} {row['agreement']:>6.3f}")
    lines.append("image loss, nats a code (first row / rest): " + "; ".join(
        f"{name} caption {report[f'nll_{name}']['first_row']:.3f} / {report[f'nll_{name}']['rest']:.3f}"
        for name in ("own", "empty", "other")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineParser(prog="python -m train.recall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a train.pipeline run folder (its text, vq, codes and --stage exports)")
    parser.add_argument("--stage", default="stage2", help="the run's stage whose export is the model (default stage2)")
    parser.add_argument("--checkpoint", type=Path, help="a bundle (MarsPipeline.save_pretrained) instead of --run")
    parser.add_argument("--mars", type=Path, help="a MARS export (with --text-model and --vq) instead of --run")
    parser.add_argument("--text-model", type=Path)
    parser.add_argument("--vq", type=Path)
    parser.add_argument("--codes", type=Path, help="the codes of the training images (default: the run's)")
    parser.add_argument("--concepts", type=int, default=64, help="training concepts to sample (default 64)")
    parser.add_argument("--first-codes", type=int, default=0, help="also sample with this many first codes given")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.0], help="0 is greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda, ... (default: the GPU when there is one)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.checkpoint is None and args.mars is None):
        parser.error("give --run DIR, or --checkpoint DIR with --codes, or --mars, --text-model, --vq and --codes")
    if args.run is not None:
        run = args.run
        parts = dict(text_model=run / "text/export", mars=run / args.stage / "export", vq=run / "vq/export")
        args.codes = args.codes or run / "codes/export"
    elif args.mars is not None:
        parts = dict(text_model=args.text_model, mars=args.mars, vq=args.vq)
        if None in parts.values():
            parser.error("--mars needs --text-model and --vq too")
    if args.codes is None:
        parser.error("give --codes: the codes directory of the model's training images (python -m train.codes)")
    if args.concepts < 1 or args.first_codes < 0:
        parser.error(f"--concepts {args.concepts} must be >= 1 and --first-codes {args.first_codes} >= 0")
    from mars.pipeline import MarsPipeline
    from train.codes import CodeSet

    try:
        code_set = CodeSet.load(args.codes)
        pipe = (MarsPipeline.from_pretrained(args.checkpoint) if args.checkpoint is not None
                else MarsPipeline.from_parts(**parts))
    except (OSError, ValueError) as error:
        parser.error(first_line(error))
    pipe = pipe.to(resolve_device(args.device))
    if args.first_codes > pipe.model.config.num_image_tokens:
        parser.error(f"--first-codes {args.first_codes}: the model's images have {pipe.model.config.num_image_tokens}")
    settings = [(guidance, temperature) for temperature in args.temperatures for guidance in args.guidance_scales]
    report = recall(pipe, code_set, pick_items(code_set, args.concepts, args.seed), settings,
                    first_codes=args.first_codes, seed=args.seed)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
