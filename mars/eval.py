"""Shapes-world evaluation: score images against their category prompts, GenEval style.

    python -m mars.eval --images DIR          # per-category / overall table, plain and strict
    python -m mars.eval --images DIR --json   # the same as JSON

DIR holds the images and captions.jsonl (`file` or `image`, `caption`) or prompts.jsonl (`file`,
`prompt`), e.g. from `python -m mars.shapes --out DIR` (a generator's own images score 1.0).
Library use: `evaluate([(prompt, pil_image), ...])` -> report dict; `format_table(report)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mars.shapes import CATEGORIES, LANGS, score, summarize

LISTINGS = (("captions.jsonl", "caption"), ("prompts.jsonl", "prompt"))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score shapes-world images against their prompts")
    parser.add_argument("--images", type=Path, required=True,
                        help="folder with images and captions.jsonl or prompts.jsonl")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        entries = read_listing(args.images)
        images = ((prompt, load_image(path)) for path, prompt in entries)  # lazily: one image in memory
        report = evaluate(images, progress=not args.json, total=len(entries))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: report[k] for k in ("all", "by_lang")}, ensure_ascii=False, indent=2))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
