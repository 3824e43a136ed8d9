"""MarsConfig: what MARS adds on top of a frozen Qwen (image vocabulary, grid, switches).

The Qwen itself is described either by a local directory (`text_model`, loaded with
`from_pretrained`, no hub) or by a dict of Qwen config fields (`text_config`, for random models
in tests, benchmarks and meta-device parameter counts). Presets live in `MODEL_PRESETS`:

    from mars import MarsConfig, MarsModel
    model = MarsModel.from_config(MarsConfig.from_name("tiny-qwen3", image_grid=(16, 16)))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


class JsonConfig:
    """to_dict / save / load for a config dataclass stored as JSON beside a model's weights.

    Only `init` fields are written (derived ones are recomputed), and loading names the file and
    the function that writes it in a one-line error. Subclasses set `saved_by`.
    """

    saved_by = "save_pretrained"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}: expected a subset of {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: point at a directory written by {cls.saved_by}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            message = str(error).replace("\n", " ")
            raise ValueError(f"{path} is not a valid {cls.__name__} JSON ({message}); re-save the model") from None


@dataclass
class MarsConfig(JsonConfig):
    saved_by = "MarsModel.save_pretrained"  # a class attribute, not a field (no annotation)
    codebook_size: int = 1024  # VQ codebook entries; the image head predicts one of these
    image_grid: tuple[int, int] = (8, 8)  # (h, w) codes per image
    visual_norms: bool = False  # True: the visual path gets its own trainable RMSNorms
    image_pos_2d: bool = True  # learned row/column embeddings added to image-code embeddings
    # Image codes rotate by their row and column (RoPE frequencies alternating between the two) counted
    # from the image's first position, instead of by their raster position: attention between two codes
    # then depends on their 2-D offset (as LlamaGen does), and text keeps Qwen's 1-D RoPE unchanged.
    # The base stage only: super-resolution (mars.superres) places its codes itself. Off by default: on the
    # shapes world it measured no better than 1-D positions and 4 % slower (docs/experiments.md).
    image_rope_2d: bool = False
    text_model: str | None = None  # local Qwen directory (HF format); None: built from text_config
    text_config: dict | None = None  # Qwen config fields incl. "model_type" (qwen2 / qwen3)

    # Derived in __post_init__. The image vocabulary is the codebook followed by two specials.
    num_image_tokens: int = field(init=False)  # h * w codes per image
    image_vocab_size: int = field(init=False)  # codebook + begin/end-of-image
    boi_index: int = field(init=False)  # index of <boi> inside the image vocabulary
    eoi_index: int = field(init=False)

    def __post_init__(self) -> None:
        self.image_grid = tuple(int(n) for n in self.image_grid)
        if len(self.image_grid) != 2 or min(self.image_grid) < 1:
            raise ValueError(f"image_grid={self.image_grid}: give two positive ints (h, w), e.g. (16, 16)")
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size={self.codebook_size}: must be the VQ tokenizer's codebook size (> 0)")
        self.num_image_tokens = self.image_grid[0] * self.image_grid[1]
        self.image_vocab_size = self.codebook_size + 2
        self.boi_index = self.codebook_size
        self.eoi_index = self.codebook_size + 1

    @classmethod
    def from_name(cls, name: str, **overrides) -> MarsConfig:
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown MarsConfig preset {name!r}: choose one of {sorted(MODEL_PRESETS)}")
        return replace(MODEL_PRESETS[name], **overrides)


FROZEN_DTYPES = ("float32", "bfloat16")


@dataclass
class MemoryConfig:
    """Memory levers for training at scale (mars.model.configure_memory). Each leaves the loss and
    the gradients equal up to rounding; none is saved with the model (they shape how it trains,
    not what it is). train/plan.py says what each one buys for a given Qwen and GPU.

    Lightning modules take it as `memory` (YAML `model.init_args.memory.activation_checkpointing`,
    CLI `--model.init_args.memory.activation_checkpointing true`, checkpoint hparams `memory`).
    """

    # Recompute each SemVIE layer in backward, keeping only its input: activations fall from a few
    # dozen (B, T, D)-sized tensors a layer to one, for about a third more compute.
    activation_checkpointing: bool = False
    # "bfloat16": the frozen Qwen held in bf16 (half its memory), the trainable experts in fp32
    # master weights, the model computing under bf16 autocast. "float32": everything fp32.
    frozen_dtype: str = "float32"
    # Labelled positions per output-head chunk in the loss, logits recomputed in backward, so at most
    # (loss_chunk, vocabulary) logits exist at once (the text head is 151,936 wide). 0: one chunk.
    loss_chunk: int = 0

    def __post_init__(self) -> None:
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype={self.frozen_dtype!r}: choose one of {FROZEN_DTYPES}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk={self.loss_chunk}: give a number of positions, or 0 for no chunking")


def _qwen(model_type: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, **extra) -> dict:
    return dict(
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ) | extra


def _published(model_type: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int = 151936,
               **extra) -> MarsConfig:
    """A released Qwen's architecture (its config.json numbers) at MARS's real-data setting: a
    16,384-code VQ at 16 x 16 codes. Weights come from `MarsModel.from_qwen(local_dir)`; the
    text_config alone serves meta-device counts, train/plan.py and random full-size checkpoints."""
    fields = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151643,
                  max_position_embeddings=32768 if model_type == "qwen2" else 40960) | extra
    if model_type == "qwen3":
        fields.setdefault("head_dim", 128)  # Qwen3 fixes it: 16 heads x 128 exceed a 1024 hidden size
    return MarsConfig(codebook_size=16384, image_grid=(16, 16),
                      text_config=_qwen(model_type, hidden, layers, heads, kv_heads, ffn, vocab, **fields))


MODEL_PRESETS: dict[str, MarsConfig] = {
    # Tests: tiny random Qwens, fp32, milliseconds per step on one core.
    "tiny-qwen2": MarsConfig(
        codebook_size=64, text_config=_qwen("qwen2", 64, 2, 4, 2, 128, 512, eos_token_id=1)
    ),
    "tiny-qwen3": MarsConfig(
        codebook_size=64, text_config=_qwen("qwen3", 64, 2, 4, 2, 128, 512, head_dim=16, eos_token_id=1)
    ),
    # benchmarks/sampling.py: small but not tiny, a 256-token (16x16) image.
    "bench-256": MarsConfig(
        codebook_size=1024, image_grid=(16, 16), text_config=_qwen("qwen2", 256, 6, 4, 2, 768, 2048, eos_token_id=1)
    ),
    # Released Qwens (Qwen2.5 base models: q/k/v biases; Qwen3: q/k norms, head_dim 128).
    "qwen2.5-0.5b": _published("qwen2", 896, 24, 14, 2, 4864),
    "qwen2.5-1.5b": _published("qwen2", 1536, 28, 12, 2, 8960),
    "qwen2.5-7b": _published("qwen2", 3584, 28, 28, 4, 18944, vocab=152064, tie_word_embeddings=False),
    "qwen3-0.6b": _published("qwen3", 1024, 28, 16, 8, 3072),
    "qwen3-1.7b": _published("qwen3", 2048, 28, 16, 8, 6144),
    "qwen3-8b": _published("qwen3", 4096, 36, 32, 8, 12288, tie_word_embeddings=False),
}
