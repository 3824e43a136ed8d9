"""The Streamlit app's engine room: input checks, progressive previews and background generation jobs.

No Streamlit here, so the logic is testable on its own (tests/test_app.py). `app/main.py` is the page.

    job = GenerationJob(pipe, GenerationRequest(prompt="a red circle", seed=0), MODEL_LOCK)
    job.start()            # samples in a thread; the page polls job.state / job.preview / job.images
"""

from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from mars.errors import first_line
from mars.images import UnreadableImage, flatten_on_white, load_image
from vq import tensor_to_images

MAX_PROMPT_CHARS = 300  # shapes-world prompts are under 80; a wall of text is a paste gone wrong
PREVIEW_UPDATES = 8  # decoded previews per sampling phase
PENDING = 0.6  # grey, in [-1, 1], painted where codes are not sampled yet

# One model in the process and CPU (or one GPU) to share: sessions take turns sampling.
MODEL_LOCK = threading.Lock()
THREADS_ENV = "MARS_APP_THREADS"


def sampling_threads() -> int:
    """CPU threads for torch beside the web server: $MARS_APP_THREADS, else $OMP_NUM_THREADS, else all
    cores but one. The server's threads take the GIL and a core while sampling runs, and torch's
    threads then wait on each other at every op (the tiny test model's job on 2 busy cores: 11.7 s
    with 2 threads, 1.2 s with 1)."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        if os.environ.get(name, "").strip().isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return max(1, (os.cpu_count() or 1) - 1)


def check_prompt(prompt: str | None) -> str:
    """The prompt stripped, or a ValueError saying how to fix it."""
    text = (prompt or "").strip()
    if not text:
        raise ValueError("Type a prompt first, in English or Chinese, "
                         "e.g. 'a red circle' or '两个蓝色的正方形'.")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"The prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}. "
                         "Shorten it to a sentence describing the picture.")
    return text


def unknown_words(pipe, prompt: str) -> list[str]:
    """Pieces of `prompt` the model's trimmed vocabulary lacks (they read as one unknown token)."""
    vocab_map = getattr(pipe.tokenizer, "vocab_map", None)
    return [] if vocab_map is None else list(dict.fromkeys(vocab_map.unknown_pieces(prompt)))


def read_image(data: bytes, name: str) -> Image.Image:
    """Uploaded bytes -> an RGB image (transparency on white), or a ValueError naming the file: not an image,
    damaged, or too large (mars.images.load_image)."""
    try:
        return flatten_on_white(load_image(io.BytesIO(data), name))
    except UnreadableImage as error:
        raise ValueError(f"{name} is not a readable image ({error.reason}): {error.advice}.") from None


def to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- previews

@torch.inference_mode()
def preview_images(vq, codes: Tensor, grid: tuple[int, int]) -> list[Image.Image]:
    """Codes sampled so far -> images to show while sampling continues.

    codes: the base phase's first n codes of a row-major (h, w) `grid`, flat (B, n); or a whole
    grid (B, H, W) (the super-resolution phase fills every slot from the start). The VQ decoder
    is convolutional, so the finished rows decode alone; the rest of the canvas is grey.
    """
    if codes.ndim == 3:
        return tensor_to_images(vq.decode(codes))
    (h, w), f = grid, vq.downsample
    batch, n = codes.shape
    rows = -(-n // w)
    # the partial last row borrows its last code, then is greyed past the sampled slots
    padded = torch.cat([codes, codes[:, -1:].expand(batch, rows * w - n)], dim=1)  # (B, rows * w)
    decoded = vq.decode(rearrange(padded, "b (r w) -> b r w", w=w)).cpu()  # (B, 3, rows * f, w * f)
    canvas = torch.full((batch, 3, h * f, w * f), PENDING)
    canvas[:, :, : rows * f] = decoded
    canvas[:, :, (rows - 1) * f: rows * f, (n - (rows - 1) * w) * f:] = PENDING
    return tensor_to_images(canvas)


# ----------------------------------------------------------------------------- jobs

@dataclass(frozen=True)
class GenerationRequest:
    """What the person asked for: the arguments of MarsPipeline.__call__ plus the seed."""

    prompt: str
    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    candidates: int = 1
    seed: int = 0
    num_images: int = 1
    super_resolution: bool = True

    def describe(self) -> str:
        """One line of settings for the gallery."""
        parts = [f"CFG {self.guidance_scale:g}", f"T {self.temperature:g}",
                 f"top-k {self.top_k}" if self.top_k else "top-k off", f"top-p {self.top_p:g}",
                 *([f"best of {self.candidates}"] if self.candidates > 1 else []),
                 f"seed {self.seed}", "SR on" if self.super_resolution else "SR off"]
        return " · ".join(parts)


@dataclass(frozen=True)
class GalleryItem:
    png: bytes
    prompt: str
    settings: str
    file_name: str
    size: int  # pixels per side
    serial: int = 0  # numbers the session's images, for stable widget keys


class GenerationJob:
    """One request sampled in a background thread, so the page stays live and shows previews.

    `state`: "queued" (another session holds the model) -> "running" -> "done" | "failed".
    The thread only writes plain attributes; the page reads them on its polling reruns.
    """

    def __init__(self, pipe, request: GenerationRequest, lock: threading.Lock = MODEL_LOCK,
                 preview_updates: int = PREVIEW_UPDATES):
        self.pipe, self.request, self.lock, self.preview_updates = pipe, request, lock, preview_updates
        self.state = "queued"
        self.phase, self.step, self.total = "base", 0, 0
        self.preview: list[Image.Image] = []
        self.images: list[Image.Image] = []
        self.error: str | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="mars-generation", daemon=True)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def start(self) -> GenerationJob:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.finished

    def gallery_items(self) -> list[GalleryItem]:
        r = self.request
        count = len(self.images)
        return [GalleryItem(png=to_png(image), prompt=r.prompt,
                            settings=r.describe() + (f" · image {i + 1}/{count}" if count > 1 else "")
                            + f" · {self.seconds:.1f} s",
                            file_name=f"mars-seed{r.seed}-{i + 1}.png", size=image.size[0])
                for i, image in enumerate(self.images)]

    def _run(self) -> None:
        with self.lock:  # queued until then; the page says so
            self.state = "running"
            start = time.perf_counter()
            try:
                self.images, state = self._sample(), "done"
            except Exception as error:  # shown in the page as one line, never a traceback
                self.error, state = f"Generation failed: {first_line(error)}", "failed"
            self.seconds = time.perf_counter() - start
            self.state = state  # last: the page files the result as soon as it sees this

    def _sample(self) -> list[Image.Image]:
        r = self.request
        generator = torch.Generator(device=self.pipe.device).manual_seed(r.seed)
        output = self.pipe(r.prompt, guidance_scale=r.guidance_scale, temperature=r.temperature, top_k=r.top_k,
                           top_p=r.top_p, candidates=r.candidates, generator=generator,
                           num_images_per_prompt=r.num_images, super_resolution=r.super_resolution,
                           callback=self._on_step)
        return output.images

    def _on_step(self, phase: str, step: int, total: int, codes: Tensor) -> None:
        self.phase, self.step, self.total = phase, step + 1, total
        every = max(1, total // self.preview_updates)
        if (step + 1) % every == 0 or step + 1 == total:
            self.preview = preview_images(self.pipe.vq, codes, tuple(self.pipe.model.config.image_grid))

