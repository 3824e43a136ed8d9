"""MarsPipeline: prompt tokenizer + MARS model + VQ decoder (+ optional super-resolution), diffusers-style.

    from mars.pipeline import MarsPipeline
    pipe = MarsPipeline.from_pretrained("runs/shapes/bundle")
    image = pipe("a red circle to the left of a blue square", guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    pipe.caption(image)   # image-to-text with the same model
    pipe.encode_prompts(["a red circle"], strict=True)  # the prompt checks alone (empty, too long, unseen tokens)

A bundle directory (written by `save_pretrained`, and by `python -m train.pipeline`):

    model_index.json   {"format": "mars-pipeline", "version": 1, "tokenizer": "tokenizer",
                        "text_model": "text_model", "mars": "mars", "vq": "vq",
                        "superres": "superres" | null, "image_size": 128 | 256,
                        "sampling": {"guidance_scale": 3.0, "temperature": 1.0, "top_k": null, "top_p": 1.0,
                                     "candidates": 1},
                        "sha256": {"mars/mars_trainable.safetensors": "<hex digest>", ...},
                        "examples": ["a prompt of the kind the model was trained on", ...],  (optional)
                        "provenance": {"command": ..., "commit": ..., "hardware": ..., ...}}  (optional)
    tokenizer/         tokenizer.json.xz (the Qwen tokenizer.json, xz-compressed; a plain one loads too),
                       tokenizer_config.json, and vocab_map.json when the text model uses a trimmed
                       vocabulary (mars.tokenizer.VocabMap)
    text_model/        the frozen Qwen, Hugging Face format (config.json + model*.safetensors)
    mars/              mars_config.json (text_model "../text_model") + mars_trainable.safetensors
    vq/                config.json + model.safetensors (VQTokenizer.save_pretrained, fp16; loads as fp32)
    superres/          optional: mars.superres.SuperResModel.save_pretrained (text_model "../text_model")

"sampling" holds the sampler settings the model was tuned with; a call (or a CLI flag) that
leaves a setting out gets the bundle's value. "examples" are prompts in the form its training captions
take (the app shows them); a bundle without them has `examples` []. "sha256" holds the digest of every weight file
(*.safetensors): from_pretrained checks them before loading, so a damaged, truncated or swapped
file is refused by name instead of drawing garbage (about 0.02 s for the shipped bundle's 27 MB).
Bundles written before the digests existed have no "sha256" and load unchecked; a bundle whose
"version" is newer than this code is refused. Only wiring lives here, plus the input checks every
client shares (`encode_prompts`, `check_sampler_settings`): the models sample themselves
(mars.sampling, mars.superres).
Tests: `pytest tests/test_pipeline.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from mars.config import MarsConfig
from mars.errors import first_line
from mars.images import check_caption_image, flatten_on_white, load_image
from mars.model import CONFIG_NAME, WEIGHTS_NAME, MarsModel, cast_floats
from mars.sampling import caption_images, caption_nll, generate_images
from mars.tokenizer import PromptTokenizer
from vq import VQTokenizer, images_to_tensor, tensor_to_images

INDEX_FILE = "model_index.json"
FORMAT, VERSION = "mars-pipeline", 1  # VERSION: the newest index this code reads (and the one it writes)
WEIGHT_SUFFIX = ".safetensors"  # the files whose SHA-256 the index records


# ----------------------------------------------------------------------------- prompt tokenizer

def load_text_model(directory: Path, dtype: torch.dtype | None = None):
    """The frozen Qwen of a bundle (Hugging Face format), with a one-line error when it is unreadable."""
    from transformers import AutoModelForCausalLM

    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} not found: the bundle's text model is incomplete; "
                                "re-export the bundle")
    try:
        # float32 unless asked: a bundle stored in fp16 still computes in fp32 on CPU.
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
    except Exception as error:  # transformers/safetensors raise many types for truncated or garbled files
        reason = first_line(error)
        raise ValueError(f"text model in {directory} is unreadable ({reason}): re-export the bundle") from None


# ----------------------------------------------------------------------------- sampler settings

def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _count(value, most: int | None = None) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
            and (most is None or value <= most))


# Images per prompt, and candidates per image, in one call: every one is a row of the sampling batch,
# and a batch far past this one outgrows memory (--num-images 10**11 was ended by the OOM killer).
MAX_IMAGES = 64
# Guidance below 1 leans away from the prompt (0 samples as if there were none); 1 turns it off.
GUIDANCE = (lambda v: _finite(v) and v >= 1, "a value >= 1 (1 turns guidance off)")

# Setting -> (accepts(value), what to use instead). The CLIs' flag types read the same table (mars.cli).
SAMPLER_LIMITS: dict[str, tuple[Callable[[object], bool], str]] = {
    "guidance_scale": GUIDANCE,
    "temperature": (lambda v: _finite(v) and v >= 0, "a value >= 0"),
    "sr_guidance_scale": GUIDANCE,
    "sr_temperature": (lambda v: _finite(v) and v >= 0, "a value >= 0"),
    "top_k": (lambda v: v is None or v == 0 or _count(v), "an integer >= 1, or 0 for off"),
    "top_p": (lambda v: _finite(v) and 0 < v <= 1, "a value in (0, 1]"),
    "num_images_per_prompt": (lambda v: _count(v, MAX_IMAGES), f"an integer from 1 to {MAX_IMAGES}"),
    "candidates": (lambda v: _count(v, MAX_IMAGES), f"an integer from 1 to {MAX_IMAGES}"),
    "max_new_tokens": (_count, "an integer >= 1"),
}


# What a call leaves out when its bundle names nothing else. Super-resolution has its own guidance and
# temperature: its 2x2 blocks are nearly determined by the low-resolution code above them, so sampling
# them adds noise the base image never had (greedy, unguided upsampling lost 0.02 accuracy where the
# base's settings lost 0.09, docs/experiments.md); top_k/top_p serve both stages.
DEFAULT_SAMPLING = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": None, "top_p": 1.0, "candidates": 1,
                    "sr_guidance_scale": 1.0, "sr_temperature": 0.0}


def check_sampler_settings(**settings) -> None:
    """One-line ValueError for the first setting outside its range, before any sampling work
    (a NaN scale or top_p=0 would otherwise sample garbage or fail deep inside the sampler)."""
    for name, value in settings.items():
        accepts, wanted = SAMPLER_LIMITS[name]
        if not accepts(value):
            raise ValueError(f"{name}={value!r} is out of range: use {wanted}")


def stage_sampling(settings: dict) -> tuple[dict, dict]:
    """Full sampler settings -> (base, super-resolution) sampler keywords: each stage's guidance and
    temperature, top_k (0 = off) and top_p shared."""
    shared = dict(top_k=settings["top_k"] or None, top_p=settings["top_p"])
    return (dict(guidance_scale=settings["guidance_scale"], temperature=settings["temperature"], **shared),
            dict(guidance_scale=settings["sr_guidance_scale"], temperature=settings["sr_temperature"], **shared))


def sampler_defaults(sampling: dict | None) -> dict:
    """DEFAULT_SAMPLING updated by a bundle's "sampling" settings, checked (one-line ValueError)."""
    unknown = sorted(set(sampling or {}) - set(DEFAULT_SAMPLING))
    if unknown:
        raise ValueError(f"unknown sampler settings {unknown}: use {sorted(DEFAULT_SAMPLING)}")
    settings = DEFAULT_SAMPLING | (sampling or {})
    check_sampler_settings(**settings)
    return settings


# ----------------------------------------------------------------------------- weight digests

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_digests(directory: Path) -> dict[str, str]:
    """{path relative to `directory`: SHA-256} of every weight file under it, what the index records."""
    return {path.relative_to(directory).as_posix(): file_sha256(path)
            for path in sorted(directory.rglob(f"*{WEIGHT_SUFFIX}"))}


def verify_weights(directory: Path, recorded: dict[str, str]) -> None:
    """Every weight file `recorded` (model_index.json "sha256") is present and has its recorded SHA-256,
    or a one-line error naming the first that is not. The index itself is checked for shape first."""
    for name, digest in recorded.items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the bundle is incomplete; re-export or re-download it")
        if file_sha256(path) != digest:
            raise ValueError(f"{path} is damaged or replaced (its SHA-256 differs from the one {INDEX_FILE} "
                             "records): re-export or re-download the bundle")


def _check_index(index) -> None:
    """ValueError (one line) for an index this code cannot read: not an object, another format, a newer
    version, or a malformed digest table."""
    if not isinstance(index, dict):
        raise ValueError("not a JSON object")
    if index.get("format") != FORMAT:
        raise ValueError(f"format is {index.get('format')!r}, expected {FORMAT!r}")
    version = index.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version is {version!r}, expected a whole number >= 1")
    digests = index.get("sha256", {})
    if not isinstance(digests, dict) or not all(
            isinstance(name, str) and isinstance(digest, str) and not Path(name).is_absolute()
            and ".." not in Path(name).parts for name, digest in digests.items()):
        raise ValueError("sha256 must map paths inside the bundle to hex digests")


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class MarsPipelineOutput:
    images: list[Image.Image]
    codes: Tensor  # (B, h, w) codes of the returned images (after super-resolution when it ran)


PipelineCallback = Callable[[str, int, int, Tensor], None]  # (phase "base" | "superres", step, total, codes so far)
ImageInput = Image.Image | str | os.PathLike


def _as_list(value, kind, what: str, wanted: str) -> list:
    """One `kind` or a sequence of them -> a non-empty list; a TypeError (ValueError when empty) that says
    what to pass instead, e.g. for pipe(None), rather than "'NoneType' object is not iterable"."""
    if isinstance(value, kind):
        return [value]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TypeError(f"{what} is {type(value).__name__}: pass {wanted}")
    items = list(value)
    if not items:
        raise ValueError(f"no {what} given: pass {wanted}")
    wrong = [item for item in items if not isinstance(item, kind)]
    if wrong:
        raise TypeError(f"a {what} in the list is {type(wrong[0]).__name__}: pass {wanted}")
    return items


def _phase(callback: PipelineCallback | None, name: str):
    """A sampler's (step, total, codes) callback that reports to `callback` under the phase `name`."""
    return None if callback is None else (lambda step, total, codes: callback(name, step, total, codes))


class MarsPipeline:
    """Text-to-image (and image-to-text) with a trained MARS model; see the module docstring."""

    def __init__(self, model: MarsModel, vq: VQTokenizer, tokenizer: PromptTokenizer, superres=None,
                 sampling: dict | None = None, examples: list[str] | None = None):
        self.model, self.vq, self.tokenizer, self.superres = model.eval(), vq.eval(), tokenizer, superres
        self.sampling = sampler_defaults(sampling)  # the defaults of __call__
        self.examples = list(examples or [])
        if superres is not None:
            superres.eval()
        if vq.codebook_size != model.config.codebook_size:
            raise ValueError(f"the VQ codebook has {vq.codebook_size} entries but the MARS model predicts "
                             f"{model.config.codebook_size}: bundle the VQ the model was trained with")

    @property
    def device(self) -> torch.device:
        return self.model.image_head.weight.device

    @property
    def image_size(self) -> int:
        """Side of a base image in pixels (grid height * VQ downsampling)."""
        return self.model.config.image_grid[0] * self.vq.downsample

    def to(self, device: str | torch.device) -> MarsPipeline:
        for part in (self.model, self.vq, self.superres):
            if part is not None:
                part.to(device)
        return self

    # --- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> MarsPipeline:
        """Load a bundle; `dtype` applies to the Qwen and the experts (the VQ decoder stays fp32).
        The base and super-resolution models share one frozen Qwen in memory."""
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory is {type(directory).__name__}: pass a bundle directory (str or Path)")
        directory = Path(directory)
        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: point at a bundle written by "
                                    "MarsPipeline.save_pretrained or python -m train.pipeline (DIR/bundle)")
        try:
            index = json.loads(index_path.read_text())
            _check_index(index)
            parts = {name: directory / index[name] for name in ("tokenizer", "text_model", "mars", "vq")}
            if index.get("superres"):
                parts["superres"] = directory / index["superres"]
            sampling = index.get("sampling") or {}
            if not isinstance(sampling, dict):
                raise ValueError("sampling is not a JSON object")
            examples = index.get("examples") or []
            if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
                raise ValueError("examples is not a list of prompts")
        except (ValueError, KeyError, TypeError) as error:
            reason = first_line(error)
            raise ValueError(f"{index_path} is corrupt ({reason}): re-export the bundle") from None
        except OSError as error:
            raise OSError(f"cannot read {index_path} ({error.strerror or first_line(error)})") from None
        if index["version"] > VERSION:
            raise ValueError(f"{index_path} is version {index['version']}, newer than this code reads (version "
                             f"{VERSION}): update MARS, or re-export the bundle with this version")
        try:
            sampler_defaults(sampling)  # before the slow load
        except ValueError as error:
            raise ValueError(f"{index_path}: {error}") from None
        verify_weights(directory, index.get("sha256", {}))  # what was recorded: older bundles recorded nothing
        pipe = cls.from_parts(parts["text_model"], parts["mars"], parts["vq"], parts["tokenizer"],
                              parts.get("superres"), dtype=dtype, sampling=sampling)
        pipe.examples = examples
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def from_parts(cls, text_model: str | Path, mars: str | Path, vq: str | Path, tokenizer: str | Path | None = None,
                   superres: str | Path | None = None, dtype: torch.dtype | None = None,
                   sampling: dict | None = None) -> MarsPipeline:
        """Assemble a pipeline from separate directories, e.g. the training stages' exports: a Qwen
        directory, a MarsModel directory, a VQ directory, the tokenizer (default: the Qwen directory)
        and optionally a SuperResModel directory. One frozen Qwen is loaded and shared."""
        parts = {"text_model": Path(text_model), "mars": Path(mars), "vq": Path(vq),
                 "tokenizer": Path(tokenizer or text_model)}
        if superres is not None:
            parts["superres"] = Path(superres)
        for name, path in parts.items():
            if not path.is_dir():
                raise FileNotFoundError(f"{name} directory {path} is missing: re-export it (or the bundle)")
        prompt_tokenizer = PromptTokenizer.from_pretrained(parts["tokenizer"])
        qwen = load_text_model(parts["text_model"], dtype)
        config = MarsConfig.load(parts["mars"] / CONFIG_NAME)
        model = MarsModel.from_qwen(qwen, dataclasses.replace(config, text_model=str(parts["text_model"].resolve())))
        model.load_trainable(parts["mars"] / WEIGHTS_NAME)
        sr_model = None
        if superres is not None:
            from mars.superres import SuperResModel

            sr_model = SuperResModel.from_pretrained(parts["superres"], qwen=qwen)  # the same frozen Qwen
        return cls(model, VQTokenizer.from_pretrained(parts["vq"]), prompt_tokenizer, sr_model, sampling)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None,
                        provenance: dict | None = None) -> Path:
        """Write a self-contained bundle: the Qwen directory is copied once and referenced by both models.
        `dtype` (e.g. torch.float16, half the size) stores the Qwen's and the experts' weights in it;
        loading casts them back to float32 (or the dtype asked for). The VQ is always stored in fp16.
        `provenance` (JSON-able: how the weights were made, e.g. train.pipeline's command, commit,
        hardware and stage times) is recorded as model_index.json "provenance"."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} is a file: save the bundle to a folder (new, or a bundle it replaces)")
        source = self.model.config.text_model
        if source is None or not (Path(source) / "config.json").is_file():
            raise ValueError(f"the MARS model's text_model {source!r} is not a Qwen directory: build the model with "
                             "MarsModel.from_qwen(dir) / from_pretrained so the bundle can copy its Qwen")
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.tokenizer.save_pretrained(staging / "tokenizer", compress=True)  # 1.4 MB instead of 5.4
        (staging / "text_model").mkdir()
        for path in Path(source).iterdir():  # config and weights only: the tokenizer has its own folder
            if dtype is not None and path.suffix == ".safetensors":
                save_file(cast_floats(load_file(path), dtype), staging / "text_model" / path.name,
                          metadata={"format": "pt"})
            elif path.name in ("config.json", "generation_config.json") or path.name.startswith("model"):
                shutil.copy2(path, staging / "text_model" / path.name)
        parts = [("mars", self.model)] + ([("superres", self.superres)] if self.superres is not None else [])
        for name, part in parts:
            mars = part if isinstance(part, MarsModel) else part.mars
            own = mars.config
            mars.config = dataclasses.replace(own, text_model="../text_model")  # relative: the bundle can move
            try:
                part.save_pretrained(staging / name, store_text_model=False, dtype=dtype)
            finally:
                mars.config = own
        self.vq.save_pretrained(staging / "vq", dtype=torch.float16)  # half the size; loads back as fp32
        index = {"format": FORMAT, "version": VERSION, "tokenizer": "tokenizer", "text_model": "text_model",
                 "mars": "mars", "vq": "vq", "superres": "superres" if self.superres is not None else None,
                 "image_size": self.image_size * (2 if self.superres is not None else 1), "sampling": self.sampling,
                 "sha256": weight_digests(staging)}
        if self.examples:
            index["examples"] = self.examples
        if provenance is not None:
            index["provenance"] = provenance
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        shutil.rmtree(directory, ignore_errors=True)  # replaced whole: never half old, half new
        staging.rename(directory)
        return directory

    # --- text to image ----------------------------------------------------------------------

    def max_prompt_length(self, super_resolution: bool = True) -> int:
        """Most prompt tokens this model takes: every sequence must fit the text model's positions.

        Base stage: [prompt][boi][codes][eoi], the text-to-image sequence it was trained on.
        Super-resolution (when it runs): [prompt][boi][low codes][high codes] (mars.superres).
        """
        base = self.model.text_config.max_position_embeddings - (2 + self.model.config.num_image_tokens)
        if not super_resolution or self.superres is None:
            return base
        sr = self.superres.config
        return min(base, self.superres.mars.text_config.max_position_embeddings
                   - (1 + sr.num_low_tokens + sr.num_high_tokens))

    def encode_prompts(self, prompts: Sequence[str], super_resolution: bool = True,
                       strict: bool = False) -> list[list[int]]:
        """Prompts -> token ids, with a one-line ValueError for an empty prompt, one longer than
        max_prompt_length(super_resolution), or (when `strict`) one with tokens the model never saw;
        lenient by default: unseen tokens read as the vocabulary's unknown token. Leading and trailing
        whitespace is dropped, as the prompt file and the app do (the training captions have none,
        so a trailing space would be a token the model never saw). A non-string is a TypeError."""
        prompts = _as_list(prompts, str, "prompt", "a string or a list of strings")
        limit, ids = self.max_prompt_length(super_resolution), []
        for number, prompt in enumerate(prompts, 1):
            which = f" {number} of {len(prompts)}" if len(prompts) > 1 else ""
            prompt = prompt.strip()
            if not prompt:
                raise ValueError(f"empty prompt{which}: describe the image, e.g. 'a red circle above a blue square'")
            try:
                tokens = self.tokenizer.encode(prompt, strict)
            except ValueError as error:  # VocabMap names the pieces it never saw
                if not which:
                    raise
                raise ValueError(f"{error} (prompt{which})") from None
            if len(tokens) > limit:
                without = self.max_prompt_length(False)
                hint = f" ({without} without super-resolution)" if without > limit else ""
                raise ValueError(f"prompt{which} is {len(tokens)} tokens; this model takes at most {limit}{hint}: "
                                 "shorten it")
            ids.append(tokens)
        return ids

    @torch.inference_mode()
    def __call__(self, prompt: str | Sequence[str], guidance_scale: float | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 candidates: int | None = None, sr_guidance_scale: float | None = None,
                 sr_temperature: float | None = None, generator: torch.Generator | None = None,
                 num_images_per_prompt: int = 1, super_resolution: bool = True,
                 callback: PipelineCallback | None = None) -> MarsPipelineOutput:
        """Prompt(s) -> images; `callback(phase, step, total, codes)` sees every sampling step.

        A sampler setting left at None takes the bundle's (`self.sampling`); top_k=0 turns top-k off
        where the bundle sets one. candidates=N samples N base images per image returned and keeps
        the one whose prompt the model's own image-to-text direction finds likeliest (self-reranking).
        sr_guidance_scale and sr_temperature drive super-resolution (top_k/top_p serve both stages)."""
        given = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                     candidates=candidates, sr_guidance_scale=sr_guidance_scale, sr_temperature=sr_temperature)
        settings = self.sampling | {name: value for name, value in given.items() if value is not None}
        check_sampler_settings(**settings, num_images_per_prompt=num_images_per_prompt)
        prompts = _as_list(prompt, str, "prompt", "a string or a list of strings")
        run_superres = super_resolution and self.superres is not None
        ids = [row for row in self.encode_prompts(prompts, run_superres) for _ in range(num_images_per_prompt)]
        sampling, upsampling = stage_sampling(settings)
        codes = self.sample_base(ids, settings["candidates"], sampling | {"generator": generator},
                                 _phase(callback, "base"))  # (B, h, w)
        if run_superres:
            from mars.superres import upsample_codes

            codes = upsample_codes(self.superres, ids, codes, **upsampling, generator=generator,
                                   callback=_phase(callback, "superres"))  # (B, 2h, 2w)
        return MarsPipelineOutput(images=tensor_to_images(self.vq.decode(codes)), codes=codes.cpu())

    def sample_base(self, ids: list[list[int]], candidates: int, sampling: dict, callback) -> Tensor:
        """Base-grid codes (B, h, w) for B prompts: the best of `candidates` samples each by caption_nll."""
        if candidates == 1:
            return generate_images(self.model, ids, **sampling, callback=callback)
        tried = [row for row in ids for _ in range(candidates)]
        codes = generate_images(self.model, tried, **sampling, callback=callback)  # (B*N, h, w)
        nll = caption_nll(self.model, codes, tried).view(len(ids), candidates)  # (B, N)
        return codes.view(len(ids), candidates, *codes.shape[1:])[torch.arange(len(ids)), nll.argmin(1)]

    # --- image to text ----------------------------------------------------------------------

    def encode_images(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images (any mode, any size) -> base-grid codes (B, h, w): transparency is flattened onto
        white, the shapes world's background (a plain RGB conversion would show it as black), and each
        image is resized to the base size."""
        side = self.image_size
        flat = [flatten_on_white(image) for image in images]
        resized = [im if im.size == (side, side) else im.resize((side, side), Image.Resampling.BICUBIC) for im in flat]
        return self.vq.encode(images_to_tensor(resized).to(self.vq.device)).to(self.device)  # (B, h, w)

    @torch.inference_mode()
    def caption(self, image: ImageInput | Sequence[ImageInput], max_new_tokens: int = 64, temperature: float = 0.0,
                top_k: int | None = None, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> str | list[str]:
        """Image(s) -> caption(s): the image is encoded (encode_images) and the model writes text.

        An image is a PIL image or the path of an image file (str or Path). Images under 16 px a side,
        and blank ones (a single colour), are a ValueError (mars.images.check_caption_image): the model
        would caption them with shapes that are not there. One image in, one string out."""
        check_sampler_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        # [boi][codes][eoi][caption]: the image-to-text sequence must fit the text model's positions too.
        room = self.model.text_config.max_position_embeddings - (2 + self.model.config.num_image_tokens)
        if max_new_tokens > room:
            raise ValueError(f"max_new_tokens={max_new_tokens}: this model writes at most {room} caption tokens")
        kinds = (Image.Image, str, os.PathLike)
        single = isinstance(image, kinds)
        images = _as_list(image, kinds, "image", "a PIL image, an image path, or a list of them")
        images = [load_image(item) if isinstance(item, (str, os.PathLike)) else item for item in images]
        for number, item in enumerate(images, 1):
            check_caption_image(item, f"image {number} of {len(images)}" if len(images) > 1 else "the image")
        token_ids = caption_images(self.model, self.encode_images(images), max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k or None, top_p=top_p, generator=generator,
                                   eos_token_id=self.tokenizer.eos_id)
        captions = [self.tokenizer.decode(ids) for ids in token_ids]
        return captions[0] if single else captions
