"""Sampling speed on CPU: KV-cached decoding vs a no-cache recompute baseline, and CFG throughput.

One run prints seconds per 256-token (16x16) image for both samplers, their ratio and
tokens/s with classifier-free guidance, on a small random Qwen2 ("bench-256": hidden 256,
6 layers). Both samplers decode greedily so their codes must agree, which is checked. Each
figure is the best of `--repeats` runs, so a machine shared with other jobs disturbs it less.

    python -m benchmarks.sampling                # all cores torch sees
    OMP_NUM_THREADS=2 python -m benchmarks.sampling --threads 2

With --checkpoint DIR (a MarsPipeline bundle, e.g. the shipped checkpoints/mars-shapes) it times
what a user waits for instead: one image end to end (prompt -> PNG-ready image, CFG on, the
bundle's sampler settings), at the full size (base + super-resolution) and with --no-sr.
"""

from __future__ import annotations

import argparse
import time

import torch

from mars import MarsConfig, MarsModel, generate_images, sample_logits


@torch.inference_mode()
def generate_without_cache(model: MarsModel, prompt: list[int]) -> torch.Tensor:
    """The baseline: every step re-runs the whole sequence so far (greedy) -> codes (1, h*w)."""
    ids = torch.tensor([prompt + [model.boi_token_id]])
    codes = []
    for _ in range(model.config.num_image_tokens):
        logits = model.image_head(model.hidden_states(ids)[:, -1])  # (1, codebook)
        code = sample_logits(logits, temperature=0.0)
        codes.append(code)
        ids = torch.cat([ids, model.codes_to_tokens(code)[:, None]], dim=1)
    return torch.stack(codes, dim=1)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls (the same work each time), and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def time_pipeline(checkpoint: str, repeats: int) -> None:
    """Seconds per image of a MarsPipeline bundle, with and without super-resolution."""
    from mars.pipeline import MarsPipeline

    pipe = MarsPipeline.from_pretrained(checkpoint)
    prompt = "a red circle to the left of a blue square"
    print(f"bundle: {checkpoint}, prompt {prompt!r}, torch threads {torch.get_num_threads()}")
    for super_resolution in (True, False) if pipe.superres is not None else (False,):
        def one_image():
            return pipe(prompt, generator=torch.Generator().manual_seed(0), super_resolution=super_resolution)

        one_image()  # warm-up
        seconds, output = timed(one_image, repeats)
        side = output.images[0].size[0]
        label = "base + super-resolution" if super_resolution else "base only (--no-sr)"
        print(f"{side} px, {label}: {seconds:.2f} s per image (CFG on)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="bench-256", help="a MarsConfig preset with a 16x16 grid")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is reported")
    parser.add_argument("--checkpoint", help="time this MarsPipeline bundle end to end instead")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        time_pipeline(args.checkpoint, args.repeats)
        return
    torch.manual_seed(0)
    model = MarsModel.from_config(MarsConfig.from_name(args.config)).eval()
    prompt = torch.randint(0, model.image_token_offset, (args.prompt_len,)).tolist()
    num_codes = model.config.num_image_tokens
    text = model.text_config
    print(f"model: {args.config} (hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
          f"codebook {model.config.codebook_size}), image {model.config.image_grid} = {num_codes} tokens, "
          f"prompt {args.prompt_len} tokens, torch threads {torch.get_num_threads()}")

    generate_images(model, [prompt], temperature=0.0)  # warm-up (allocator, kernels)
    cached_s, cached = timed(lambda: generate_images(model, [prompt], temperature=0.0), args.repeats)
    recompute_s, recomputed = timed(lambda: generate_without_cache(model, prompt), args.repeats)
    if not torch.equal(cached.flatten(1), recomputed):
        raise SystemExit("cached and no-cache greedy codes differ: the KV cache is broken")
    generator = torch.Generator().manual_seed(0)
    cfg_s, _ = timed(lambda: generate_images(model, [prompt], guidance_scale=3.0, top_k=100, generator=generator),
                     args.repeats)
    cfg4_s, _ = timed(lambda: generate_images(model, [prompt] * 4, guidance_scale=3.0, top_k=100,
                                              generator=generator), args.repeats)

    print(f"cached sampler:       {cached_s:.2f} s per image ({num_codes / cached_s:.0f} tokens/s, "
          f"{1000 * cached_s / num_codes:.2f} ms per token)")
    print(f"no-cache recompute:   {recompute_s:.2f} s per image ({num_codes / recompute_s:.0f} tokens/s)")
    print(f"cache/no-cache ratio: {recompute_s / cached_s:.1f}")
    print(f"CFG on, batch 1:      {cfg_s:.2f} s per image, {num_codes / cfg_s:.0f} tokens/s "
          f"({1000 * cfg_s / num_codes:.2f} ms per token)")
    print(f"CFG on, batch 4:      {cfg4_s:.2f} s for 4 images, {4 * num_codes / cfg4_s:.0f} tokens/s")


if __name__ == "__main__":
    main()
