"""Shapes-world speed on this machine: generation (scene + caption + render), dataset items, scoring.

    OMP_NUM_THREADS=1 python -m benchmarks.shapes [--seconds 2]

Prints images/s per size S for one process (one core); the DataLoader multiplies it by its workers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mars.shapes import describe_scene, render, sample_example, score
from train.data import ShapesWorldDataset


def rate(step, seconds: float) -> float:
    """Calls of step(i) per second, over at least `seconds` (after a short warm-up)."""
    for i in range(5):
        step(i)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(count)
        count += 1
    return count / (time.perf_counter() - start)


def generate(size: int):
    def step(i: int) -> None:
        example = sample_example(np.random.default_rng([0, i]))
        describe_scene(example.scene, example.lang)
        render(example.scene, size)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    rows = {}
    for size in (64, 128, 256):
        dataset = ShapesWorldDataset(size=size, captions="mixed")
        examples = [sample_example(np.random.default_rng([1, i])) for i in range(64)]
        images = [render(e.scene, size) for e in examples]
        rows[size] = (rate(generate(size), args.seconds),
                      rate(lambda i: dataset[i], args.seconds),
                      rate(lambda i: score(examples[i % 64].prompt, images[i % 64]), args.seconds))
    print(f"{'S':>4} {'generate img/s':>15} {'dataset item/s':>15} {'score img/s':>12}")
    for size, (gen, item, scored) in rows.items():
        print(f"{size:>4} {gen:>15.0f} {item:>15.0f} {scored:>12.0f}")
    print(f"generation at 128 is {rows[128][0] / rows[256][0]:.1f}x the rate at 256; "
          f"an item at 128 costs {1e3 / rows[128][1]:.2f} ms")


if __name__ == "__main__":
    main()
