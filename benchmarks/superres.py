"""Super-resolution speed and accuracy per group size k: 8x8 -> 16x16 codes (128 px -> 256 px).

Speed (always, random weights): seconds per image of `upsample_codes` for k = 1, 4 and 16 with
the default super-resolution guidance (none; --guidance-scale 3 times classifier-free guidance),
one random Qwen shared by the three models, all timed in this run, and
the ratio to k = 1; goal >= 3x at k = 4. The default model is the shipped one's architecture:
the stage-0 text model of train/configs/shapes_text.yaml (Qwen3, hidden 256, 4 layers) and the
codebook of shapes_vq.yaml; --config NAME takes a mars/config.py preset instead (e.g. bench-256).
On a CPU a 4-token step costs more than a 1-token step (the matmuls are compute-bound at this
width), so k = 4 gains less than its 4x fewer steps; where weights dominate (GPU, wide models)
a step costs about the same at any k.

Accuracy (with --checkpoint): shapes-world accuracy of the upsampled 256-px images against the
128-px images they came from (goal: at most 0.02 below). --checkpoint takes a MarsPipeline bundle
(low codes come from its base model, as in use; SuperResModel directories after it, one per
other k, upsample the same codes) or SuperResModel directories alone, one per k, with --vq (low
codes are VQ encodings of rendered scenes: the upsampler's own fidelity, free of base-stage
mistakes). Each stage samples with the bundle's settings (mars.pipeline.DEFAULT_SAMPLING for bare
SR models); flags override them; every model upsamples with the same seed. Tokenizer: the bundle's,
or --tokenizer DIR (default: the bundle's tokenizer/ beside a bundle's superres/, else the Qwen
directory the SR model names).

    python -m benchmarks.superres                  # speed table, one thread, about 20 s
    python -m benchmarks.superres --checkpoint checkpoints/mars-shapes --num-prompts 96
    python -m benchmarks.superres --checkpoint checkpoints/mars-shapes runs/shapes/superres-k1/export runs/shapes/superres-k16/export
    python -m benchmarks.superres --checkpoint checkpoints/mars-shapes/superres --vq checkpoints/mars-shapes/vq
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import numpy as np
import torch
from tqdm import tqdm

from mars import MarsConfig, MarsModel, build_qwen
from mars.superres import SuperResConfig, SuperResModel, upsample_codes

GROUP_SIZES = (1, 4, 16)
CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# bench_config's named models: the preset whose YAMLs give the architecture, and its base image grid
# (shapes: 128 px through f = 16; emoji: 128 px through f = 8).
PRESET_MODELS = {"shipped": ("shapes", (8, 8)), "emoji": ("emoji", (8, 8))}


def bench_config(name: str) -> MarsConfig:
    """"shipped" (the shapes model) or "emoji": that preset's stage-0 text model architecture and its VQ's
    codebook size, read from their YAMLs (the trimmed vocabulary is built in training; 512 ids stand in,
    they only feed the prompt), at PRESET_MODELS' grid; else a MarsConfig preset at 8 x 8."""
    if name not in PRESET_MODELS:
        return MarsConfig.from_name(name, image_grid=(8, 8))
    import yaml

    def init_args(name: str) -> dict:
        return yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]

    preset, grid = PRESET_MODELS[name]
    text_config = {**init_args(f"{preset}_text.yaml")["text_config"], "vocab_size": 512, "eos_token_id": 1}
    return MarsConfig(codebook_size=init_args(f"{preset}_vq.yaml")["vq"]["codebook_size"],
                      image_grid=grid, text_config=text_config)


def speed(config_name: str, prompt_len: int, guidance_scale: float, repeats: int) -> dict[int, float]:
    """{k: seconds per image}: one random Qwen, one SR model per k sharing it. The k are timed in
    turn, `repeats` rounds, best of each: load from other processes hits every k alike."""
    torch.manual_seed(0)
    base = bench_config(config_name)
    qwen = build_qwen(base.text_config)
    low = torch.randint(0, base.codebook_size, (1, 8, 8))
    prompt = [torch.randint(0, qwen.config.vocab_size, (prompt_len,)).tolist()]
    samplers = {}
    for k in GROUP_SIZES:
        model = SuperResModel(SuperResConfig(low_grid=(8, 8), group_size=k), MarsModel.from_qwen(qwen, base)).eval()
        samplers[k] = lambda model=model: upsample_codes(model, prompt, low, guidance_scale=guidance_scale, top_k=100,
                                                         generator=torch.Generator().manual_seed(0))
        samplers[k]()  # warm-up (allocator, kernels)
    seconds = {k: float("inf") for k in GROUP_SIZES}
    for _ in range(repeats):
        for k, sample in samplers.items():
            seconds[k] = min(seconds[k], timed(sample))
    return seconds


# --- accuracy ---------------------------------------------------------------------------------

def eval_prompts(n: int, seed: int):
    """n shapes-world examples cycling through the categories, English and Chinese alternating."""
    from mars.shapes import CATEGORIES, LANGS, sample_example

    return [sample_example(np.random.default_rng([seed, i]), CATEGORIES[i % len(CATEGORIES)],
                           LANGS[(i // len(CATEGORIES)) % 2]) for i in range(n)]


def accuracy(prompts: list[str], images: torch.Tensor) -> tuple[dict, list[bool]]:
    """mars.shapes.summarize of images (B, 3, S, S) in [-1, 1], and whether each image passed."""
    from mars.shapes import score, summarize
    from vq import tensor_to_images

    verdicts = [score(p, image) for p, image in zip(prompts, tensor_to_images(images))]
    return summarize(verdicts), [v.passed for v in verdicts]


def by_category(summary: dict, reference: dict | None = None) -> str:
    """'single_object 0.90 (-0.01)  two_object ...': accuracy per category, against `reference`'s."""
    parts = []
    for name, category in summary["categories"].items():
        delta = "" if reference is None else f" ({category['accuracy'] - reference['categories'][name]['accuracy']:+.2f})"
        parts.append(f"{name} {category['accuracy']:.2f}{delta}")
    return "         " + "  ".join(parts)


def batches(n: int, size: int):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@torch.inference_mode()
def accuracy_table(args) -> list[str]:
    from mars.pipeline import DEFAULT_SAMPLING, INDEX_FILE, MarsPipeline, stage_sampling
    from mars.tokenizer import PromptTokenizer
    from mars.sampling import generate_images
    from mars.shapes import render
    from vq import VQTokenizer, images_to_tensor

    examples = eval_prompts(args.num_prompts, args.seed)
    prompts = [e.prompt for e in examples]
    first = Path(args.checkpoint[0])
    bundle = (first / INDEX_FILE).is_file()
    pipe = MarsPipeline.from_pretrained(first) if bundle else None
    given = dict(guidance_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
                 sr_guidance_scale=args.sr_cfg, sr_temperature=args.sr_temperature)
    settings = (pipe.sampling if bundle else DEFAULT_SAMPLING) | {k: v for k, v in given.items() if v is not None}
    sampling, upsampling = stage_sampling(settings)
    if bundle:
        if pipe.superres is None:
            raise SystemExit(f"{first} has no super-resolution model: train the superres stage and re-export the bundle")
        extra = [SuperResModel.from_pretrained(path).eval() for path in args.checkpoint[1:]]  # other k, same base
        vq, tokenizer, models = pipe.vq, pipe.tokenizer, [pipe.superres, *extra]

        def base_images(rows, g):
            return generate_images(pipe.model, [tokenizer.encode(e.prompt) for e in rows], generator=g, **sampling)
        source = "base model samples"
    else:
        if args.vq is None:
            raise SystemExit("--checkpoint names SuperResModel directories: also give --vq DIR (the VQ tokenizer)")
        vq = VQTokenizer.from_pretrained(args.vq)
        models = [SuperResModel.from_pretrained(path).eval() for path in args.checkpoint]
        text_model = json.loads((first / "mars_config.json").read_text())["text_model"]
        in_bundle = first.parent / "tokenizer"  # a bundle's superres/ keeps its tokenizer beside the Qwen
        default = in_bundle if (in_bundle / "tokenizer_config.json").is_file() else first / text_model
        tokenizer = PromptTokenizer.from_pretrained(args.tokenizer or default)
        size = models[0].config.low_grid[0] * vq.downsample

        def base_images(rows, g):  # the exact codes of the scenes each prompt was drawn with
            return vq.encode(images_to_tensor([render(e.scene, size) for e in rows]))
        source = f"VQ codes of rendered {size}-px scenes"
    generator = torch.Generator().manual_seed(args.seed)
    low = torch.cat([base_images(examples[s], generator) for s in tqdm(batches(len(prompts), 16), desc="low codes")])
    low_score, low_passed = accuracy(prompts, torch.cat([vq.decode(low[s]) for s in batches(len(low), 16)]))
    lines = [f"low codes: {source}, {len(prompts)} prompts; base sampling {sampling}, upsampling {upsampling}",
             f"low-res  {low.shape[-1] * vq.downsample} px  accuracy {low_score['overall']:.3f}  "
             f"strict {low_score['overall_strict']:.3f}", by_category(low_score)]
    paths = [Path(p) for p in args.checkpoint]
    if bundle:
        paths[0] = first / "superres"
    for model, path in sorted(zip(models, paths), key=lambda pair: pair[0].config.group_size):
        generator = torch.Generator().manual_seed(args.seed + 1)  # every model upsamples with the same draws
        high = torch.cat([upsample_codes(model, [tokenizer.encode(p) for p in prompts[s]], low[s], generator=generator,
                                         **upsampling) for s in tqdm(batches(len(low), 16), desc="upsample")])
        score, passed = accuracy(prompts, torch.cat([vq.decode(high[s]) for s in batches(len(high), 16)]))
        drop = score["overall"] - low_score["overall"]
        verdict = "ok" if round(drop, 9) >= -0.02 else "FAILS the 0.02 goal"  # fractions of one n
        lost = sum(before and not after for before, after in zip(low_passed, passed))
        gained = sum(after and not before for before, after in zip(low_passed, passed))
        lines += [f"k={model.config.group_size:<3d} {high.shape[-1] * vq.downsample} px  accuracy {score['overall']:.3f}  "
                  f"strict {score['overall_strict']:.3f}  ({drop:+.3f}, {verdict})  {path}",
                  by_category(score, low_score) + f"  |  passes lost {lost}, gained {gained}"]
    missing = sorted(set(GROUP_SIZES) - {m.config.group_size for m in models})
    if missing:
        lines.append(f"no checkpoint for k={missing}: pass one SuperResModel directory per k to score them")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="shipped", help="speed model: 'shipped' or a MarsConfig preset")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="speed runs' guidance (default: mars.pipeline.DEFAULT_SAMPLING's sr_guidance_scale)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over the k (the best counts)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (0: torch's default); one thread keeps the ratios steady on "
                             "a loaded machine, where two threads swung by up to 10x between runs")
    parser.add_argument("--checkpoint", nargs="+",
                        help="a MarsPipeline bundle (then SuperResModel directories of other k), or SuperResModel directories")
    parser.add_argument("--vq", help="VQ tokenizer directory (with SuperResModel directories)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the SR model's Qwen directory)")
    parser.add_argument("--num-prompts", type=int, default=96)
    accuracy = parser.add_argument_group("accuracy sampling (default: the bundle's settings)")
    accuracy.add_argument("--cfg", type=float, default=None, help="base guidance scale")
    accuracy.add_argument("--temperature", type=float, default=None, help="base temperature")
    accuracy.add_argument("--top-k", type=int, default=None, help="top-k of both stages; 0: off")
    accuracy.add_argument("--sr-cfg", type=float, default=None, help="super-resolution guidance scale")
    accuracy.add_argument("--sr-temperature", type=float, default=None, help="super-resolution temperature")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.guidance_scale is None:
        from mars.pipeline import DEFAULT_SAMPLING

        args.guidance_scale = DEFAULT_SAMPLING["sr_guidance_scale"]
    seconds = speed(args.config, args.prompt_len, args.guidance_scale, args.repeats)
    print(f"speed: random {args.config} SR model, 8x8 -> 16x16 codes, prompt {args.prompt_len} tokens, "
          f"guidance {args.guidance_scale}, batch 1, torch threads {torch.get_num_threads()}")
    for k, s in seconds.items():
        print(f"k={k:<3d} {s:.2f} s/image  {seconds[1] / s:.2f}x  ({256 // k} steps)")
    if args.checkpoint:
        print("\n".join(accuracy_table(args)))


if __name__ == "__main__":
    main()
