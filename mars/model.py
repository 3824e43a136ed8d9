"""MarsModel: a frozen Qwen causal LM + SemVIE visual experts, an image vocabulary and head.

Token ids live in one space: Qwen's text ids [0, V), then the image vocabulary at
[V, V + codebook + 2): codes, <boi>, <eoi>. Image-vocabulary tokens take the image embedding
(+ learned row/column embeddings for codes) and the visual experts; text tokens take the frozen
Qwen path unchanged. Sequences:

    text-to-image  [prompt][boi][codes][eoi]            loss on codes (image head)
    image-to-text  [boi][codes][eoi][caption][eos]      loss on caption (frozen LM head)

    model = MarsModel.from_qwen("/models/Qwen2.5-0.5B", codebook_size=16384, image_grid=(16, 16))
    batch = build_batch(model, ["a red circle", "一个红色的圆形"], codes, tokenizer=tok, caption_dropout=0.1)
    model(**batch).loss.backward()
    model.save_pretrained("out/mars")   # experts only; the Qwen is referenced by path or stored

One rule, `is_trainable(name)`, decides what trains, what the optimizer sees and what a
checkpoint saves. `configure_memory(model, MemoryConfig(...))` applies the memory levers a large
Qwen needs (activation checkpointing, a bf16 frozen Qwen beside fp32 experts, a chunked loss).
Tests: `pytest tests/test_model.py tests/test_scale.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mars.config import MarsConfig, MemoryConfig
from mars.semvie import KVCache, ModalityRouter, SemVIEModel, default_position_ids

CONFIG_NAME = "mars_config.json"
WEIGHTS_NAME = "mars_trainable.safetensors"
TEXT_MODEL_DIR = "text_model"  # a stored frozen Qwen, in Hugging Face format
IGNORE_INDEX = -100


# --- the one rule for what trains ------------------------------------------------------------

def is_trainable(name: str) -> bool:
    """True for the visual experts (`visual_*`) and the image embeddings/head (`image_*`)."""
    return any(part.startswith(("visual_", "image_")) for part in name.split("."))


def apply_trainable_filter(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The optimizer's parameter list."""
    return [param for name, param in model.named_parameters() if is_trainable(name)]


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a MARS checkpoint saves: experts, image embeddings and head, nothing of the Qwen."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_trainable(name)}


def full_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Whole tensors from a state dict whose entries may be FSDP2 shards (DTensors). Gathering is a
    collective: under FSDP every rank calls this, in the same order, before one of them writes."""
    from torch.distributed.tensor import DTensor

    return {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in state.items()}


# --- memory levers ---------------------------------------------------------------------------

def set_dtypes(model: nn.Module, frozen: torch.dtype, trainable: torch.dtype = torch.float32) -> None:
    """Frozen weights in `frozen`, trainable ones in `trainable` (buffers such as RoPE's stay as they are).

    frozen bf16 + trainable fp32 is mixed precision with fp32 master weights: every SemVIE stack
    inside then computes under bf16 autocast with an fp32 residual stream (SemVIEModel.autocast).
    """
    if frozen != trainable and trainable != torch.float32:
        raise ValueError(f"frozen {frozen} beside trainable {trainable}: mixed precision keeps fp32 masters")
    for name, param in model.named_parameters():  # a tied embedding/head is one parameter, visited once
        param.data = param.data.to(trainable if is_trainable(name) else frozen)
    for module in model.modules():
        if isinstance(module, SemVIEModel):
            module.autocast_dtype = frozen if frozen != trainable else None


def configure_memory(model: nn.Module, memory: MemoryConfig) -> nn.Module:
    """Apply MemoryConfig to a MarsModel or any module holding one (a SuperResModel); returns it."""
    for module in model.modules():
        if isinstance(module, SemVIEModel):
            module.activation_checkpointing = memory.activation_checkpointing
        if isinstance(module, MarsModel):
            module.loss_chunk = memory.loss_chunk
    set_dtypes(model, getattr(torch, memory.frozen_dtype))
    return model


def _chunk_nll(head: nn.Module, hidden: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    if weights is None:
        return F.cross_entropy(head(hidden), targets, reduction="sum")
    return (F.cross_entropy(head(hidden), targets, reduction="none") * weights).sum()


def head_nll(head: nn.Module, hidden: Tensor, targets: Tensor, chunk: int = 0, weights: Tensor | None = None) -> Tensor:
    """Summed cross-entropy of head(hidden) (N, D) against targets (N,), each row times `weights` (N,) if given.

    chunk > 0: `chunk` rows at a time, each chunk's logits recomputed in backward (checkpoint), so
    at most (chunk, V) logits and their gradient exist at once instead of (N, V); 0: one piece.
    """
    if chunk <= 0 or len(hidden) <= chunk:
        return _chunk_nll(head, hidden, targets, weights)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(hidden), chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(_chunk_nll, head, hidden[piece], targets[piece],
                                   None if weights is None else weights[piece], use_reentrant=False)
    return total


def read_safetensors(path: Path, device: torch.device | str, saver: str) -> dict[str, Tensor]:
    """A safetensors state dict, or a one-line error naming the file and the function that writes it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: save the model with {saver}")
    try:
        return load_file(path, device=str(device))
    except Exception as error:  # safetensors raises several types for truncated/garbled files
        message = str(error).replace("\n", " ")
        raise ValueError(f"{path} is not a readable safetensors file ({message}); re-save the model") from None


def cast_floats(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """A state dict ready for save_file: contiguous, floating tensors in `dtype` (None: as they are)."""
    return {name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
            for name, t in state.items()}


def parameter_report(model: nn.Module) -> dict[str, int]:
    """{total, frozen, trainable} parameter counts (tied weights counted once)."""
    trainable = sum(p.numel() for name, p in model.named_parameters() if is_trainable(name))
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "frozen": total - trainable, "trainable": trainable}


def build_qwen(text_config: dict) -> PreTrainedModel:
    """A randomly initialised Qwen causal LM from config fields (tests, benchmarks, meta device)."""
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_config))


@dataclass
class MarsOutput:
    loss: Tensor | None = None  # mean over all labelled tokens, image and text
    image_loss: Tensor | None = None
    text_loss: Tensor | None = None
    logits: Tensor | None = None  # (B, T, V) frozen LM head; without labels only
    image_logits: Tensor | None = None  # (B, T, codebook)


class MarsModel(nn.Module):
    """Qwen embeddings + image embeddings -> SemVIE stack -> LM head (text) / image head (codes)."""

    def __init__(self, config: MarsConfig, qwen: PreTrainedModel):
        super().__init__()
        if not hasattr(qwen, "lm_head") or not hasattr(qwen, "model"):
            raise ValueError(f"got {type(qwen).__name__}: pass a causal LM (Qwen2ForCausalLM, Qwen3ForCausalLM)")
        self.config = config
        self.text_config = qwen.config
        self.model = SemVIEModel(qwen.model, visual_norms=config.visual_norms)  # HF names: model.layers.0...
        self.lm_head = qwen.lm_head
        text_embed = qwen.model.embed_tokens.weight  # (V, D)
        self.image_token_offset = text_embed.shape[0]
        width, init_std = text_embed.shape[1], self.text_config.initializer_range
        factory = dict(dtype=text_embed.dtype, device=text_embed.device)
        self.image_embed = nn.Embedding(config.image_vocab_size, width, **factory)
        self.image_head = nn.Linear(width, config.codebook_size, bias=False, **factory)
        self.image_row_embed = self.image_col_embed = None
        if config.image_pos_2d:
            self.image_row_embed = nn.Embedding(config.image_grid[0], width, **factory)
            self.image_col_embed = nn.Embedding(config.image_grid[1], width, **factory)
        self.loss_chunk = 0  # labelled positions per head chunk in the loss (configure_memory); 0: all at once
        with torch.no_grad():
            # The paper starts every image token at the mean text embedding: in-distribution for
            # the frozen layers; the row/column embeddings tell codes apart from the first step.
            self.image_embed.weight.copy_(text_embed.mean(0).expand_as(self.image_embed.weight))
            for module in (self.image_head, self.image_row_embed, self.image_col_embed):
                if module is not None:
                    module.weight.normal_(0.0, init_std)
        apply_trainable_filter(self)

    # --- construction and checkpoints -----------------------------------------------------------

    @classmethod
    def from_qwen(cls, path_or_model: str | Path | PreTrainedModel, config: MarsConfig | None = None,
                  dtype: torch.dtype | None = None, **overrides) -> MarsModel:
        """Wrap a Qwen2/2.5/3 causal LM: a local HF directory or a model object (shared, not copied).

        `overrides` are MarsConfig fields, e.g. `codebook_size=16384, image_grid=(16, 16)`.
        """
        config = dataclasses.replace(config or MarsConfig(), **overrides)
        if isinstance(path_or_model, PreTrainedModel):
            return cls(config, path_or_model)
        path = Path(path_or_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} not found: from_qwen needs a local Qwen directory "
                                    "in Hugging Face format (save_pretrained output; there is no hub access)")
        qwen = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        return cls(dataclasses.replace(config, text_model=str(path.resolve())), qwen)

    @classmethod
    def from_config(cls, config: MarsConfig) -> MarsModel:
        """The Qwen from `config.text_model` (a directory) or a random one from `config.text_config`."""
        if config.text_model is not None:
            return cls.from_qwen(config.text_model, config)
        if config.text_config is None:
            raise ValueError("MarsConfig has neither text_model (a Qwen directory) nor text_config: set one")
        return cls(config, build_qwen(config.text_config))

    def save_pretrained(self, directory: str | Path, store_text_model: bool | None = None,
                        dtype: torch.dtype | None = None, state: dict[str, Tensor] | None = None) -> None:
        """Write mars_config.json + mars_trainable.safetensors (experts only), in `dtype` if given
        (e.g. float16 to ship: loading casts back to the model's dtype).

        The frozen Qwen is referenced by its path, or stored in `text_model/` (HF format) when
        `store_text_model` is True or the model has no path (built from a config or an object).
        `state`: the trainable tensors to write instead of this model's own (FSDP: the gathered
        whole tensors, see full_tensors).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config
        if store_text_model or (store_text_model is None and config.text_model is None):
            self._save_text_model(directory / TEXT_MODEL_DIR, dtype)
            config = dataclasses.replace(config, text_model=TEXT_MODEL_DIR)
        elif config.text_model is None:
            raise ValueError("store_text_model=False but this model has no Qwen path to reference: store it")
        state = trainable_state_dict(self) if state is None else state
        save_file(cast_floats(state, dtype), directory / WEIGHTS_NAME)
        config.save(directory / CONFIG_NAME)

    def _save_text_model(self, directory: Path, dtype: torch.dtype | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.text_config.save_pretrained(directory)
        frozen, seen = {}, set()
        for name, tensor in self.state_dict().items():
            if not is_trainable(name) and tensor.data_ptr() not in seen:  # tied lm_head stored once
                seen.add(tensor.data_ptr())
                frozen[name] = tensor.contiguous()
        save_file(cast_floats(frozen, dtype), directory / "model.safetensors", metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> MarsModel:
        directory = Path(directory)
        config = MarsConfig.load(directory / CONFIG_NAME)
        if config.text_model is None:
            raise ValueError(f"{directory / CONFIG_NAME} has no text_model: re-save with MarsModel.save_pretrained")
        model = cls.from_qwen(directory / config.text_model, config, dtype=dtype)
        model.load_trainable(directory / WEIGHTS_NAME)
        return model

    def load_trainable(self, path: str | Path) -> None:
        """Load a trainable-only state dict strictly: every expert weight present, nothing else."""
        path = Path(path)
        state = read_safetensors(path, self.image_head.weight.device, "MarsModel.save_pretrained")
        expected = set(trainable_state_dict(self))
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{path} does not match this MarsConfig (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}): load it with the mars_config.json saved beside it")
        own = self.state_dict()
        # Same names, other shapes: a config edited or swapped (say another codebook_size) beside the weights.
        wrong = [name for name in sorted(expected) if state[name].shape != own[name].shape]
        if wrong:
            name = wrong[0]
            raise ValueError(f"{path} does not match its MarsConfig ({name} is {tuple(state[name].shape)} in the "
                             f"file, {tuple(own[name].shape)} for codebook_size={self.config.codebook_size}, "
                             f"image_grid={tuple(self.config.image_grid)}): load it with the mars_config.json "
                             "saved beside it")
        self.load_state_dict(state, strict=False)

    # --- token ids ------------------------------------------------------------------------------

    @property
    def boi_token_id(self) -> int:
        return self.image_token_offset + self.config.boi_index

    @property
    def eoi_token_id(self) -> int:
        return self.image_token_offset + self.config.eoi_index

    def codes_to_tokens(self, codes: Tensor) -> Tensor:
        return codes + self.image_token_offset

    def is_code(self, token_ids: Tensor) -> Tensor:
        return (token_ids >= self.image_token_offset) & (token_ids < self.image_token_offset + self.config.codebook_size)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return self.model.new_cache(batch_size, max_length)

    # --- forward --------------------------------------------------------------------------------

    def code_cells(self, input_ids: Tensor, codes_before: int = 0) -> Tensor:
        """(B, T) -> the raster cell of every code, -1 at every other token (<boi>/<eoi> take no cell).
        `codes_before`: codes of this image already in the cache."""
        is_code = self.is_code(input_ids)
        return torch.where(is_code, is_code.cumsum(1) - 1 + codes_before, -1)

    def embed(self, input_ids: Tensor, router: ModalityRouter, codes_before: int = 0) -> Tensor:
        """(B, T) -> (B, T, D). `codes_before`: codes of this image already in the cache."""
        offset = self.image_token_offset
        x = router(input_ids, self.model.embed_tokens, lambda ids: self.image_embed(ids - offset))
        if self.image_row_embed is None or router.all_text:
            return x
        cell = self.code_cells(input_ids, codes_before)  # (B, T)
        return x + self.grid_embedding(cell.clamp(min=0)) * (cell >= 0).unsqueeze(-1)

    def rotary(self, position_ids: Tensor, cells: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """RoPE cos, sin (B, T, hd) for 1-D position_ids (B or 1, T). With config.image_rope_2d, a position
        holding a code (`cells` (B or 1, T): its raster cell, -1 elsewhere) rotates by its row in the even
        RoPE frequencies and by its column in the odd ones, both counted from the image's first position
        (position - cell): codes attend by 2-D offset, and every other token keeps Qwen's rotation."""
        cos, sin = self.model.rotary(position_ids)
        if not self.config.image_rope_2d or cells is None or not bool((cells >= 0).any()):
            return cos, sin
        width = self.config.image_grid[1]
        cell = cells.clamp(min=0)
        start = position_ids - cell  # the position of the image's first code
        cos_row, sin_row = self.model.rotary(start + cell // width)
        cos_col, sin_col = self.model.rotary(start + cell % width)
        half = cos.shape[-1] // 2
        by_row = (torch.arange(cos.shape[-1], device=cos.device) % half) % 2 == 0  # (hd,) both halves alike
        is_code = (cells >= 0).unsqueeze(-1)  # (B, T, 1)
        return (torch.where(is_code, torch.where(by_row, cos_row, cos_col), cos),
                torch.where(is_code, torch.where(by_row, sin_row, sin_col), sin))

    def embed_codes(self, codes: Tensor, first_cell: int) -> Tensor:
        """Codes (B, T) at raster cells first_cell, first_cell + 1, ... -> (B, T, D): what `embed`
        gives them, without the modality and <boi>/<eoi> bookkeeping (a decode step's input)."""
        x = self.image_embed(codes)  # (B, T, D)
        if self.image_row_embed is None:
            return x
        if codes.shape[1] == 1:
            return x + self.grid_embedding(first_cell)
        return x + self.grid_embedding(torch.arange(first_cell, first_cell + codes.shape[1], device=codes.device))

    def grid_embedding(self, cell: Tensor | int) -> Tensor:
        """Learned row + column embedding of raster cell(s): (..., D), or (D,) for an int."""
        width = self.config.image_grid[1]
        if isinstance(cell, int):  # one decode step: two row views, no index tensors
            return self.image_row_embed.weight[cell // width] + self.image_col_embed.weight[cell % width]
        return self.image_row_embed(cell // width) + self.image_col_embed(cell % width)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, cache: KVCache | None = None,
                      codes_before: int = 0) -> Tensor:
        """Final normalised hidden states (B, T, D); see SemVIEModel.forward for the masks."""
        router = ModalityRouter(input_ids >= self.image_token_offset)
        x = self.embed(input_ids, router, codes_before)
        if not self.config.image_rope_2d or router.all_text:
            return self.model(x, router, position_ids, attention_mask, cache)
        if position_ids is None:
            padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            past = cache.length if cache is not None else 0
            position_ids = default_position_ids(padding, input_ids.shape[1], past, input_ids.device)
        rope = self.rotary(position_ids, self.code_cells(input_ids, codes_before))
        return self.model(x, router, attention_mask=attention_mask, cache=cache, rope=rope)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, cache: KVCache | None = None, codes_before: int = 0,
                cell_weights: Tensor | None = None) -> MarsOutput:
        """Without labels: text and image logits at every position. With labels (B, T), HF-style
        unshifted token ids with -100 for no loss: the loss only (heads run on labelled rows), its
        image part weighted by `cell_weights` (see `loss`)."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache, codes_before)
        with self.model.autocast():  # the frozen lm_head may be bf16 beside an fp32 hidden state
            if labels is None:
                return MarsOutput(logits=self.lm_head(hidden), image_logits=self.image_head(hidden))
            return self.loss(hidden, labels, cell_weights)

    def loss(self, hidden: Tensor, labels: Tensor, cell_weights: Tensor | None = None) -> MarsOutput:
        """Heads on labelled positions only: a (B, T, 151936) text-logit tensor never exists, only
        (caption positions, V), or (loss_chunk, V) at a time with `loss_chunk`.

        cell_weights (h*w,): how much the code of each raster cell counts; the image loss is then the
        weighted mean. An image's labelled codes are its cells in raster order."""
        hidden, targets = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
        code_rows, text_rows = self.is_code(targets), (targets >= 0) & (targets < self.image_token_offset)
        weights, num_codes = None, code_rows.sum()
        if cell_weights is not None:
            cells = code_rows.long().cumsum(1) - 1  # (B, T - 1): each code's raster cell
            weights = cell_weights.to(hidden.device, torch.float32)[cells[code_rows]]
            num_codes = weights.sum()
        image_nll = head_nll(self.image_head, hidden[code_rows], targets[code_rows] - self.image_token_offset,
                             self.loss_chunk, weights)
        text_nll = head_nll(self.lm_head, hidden[text_rows], targets[text_rows], self.loss_chunk)
        num_text = text_rows.sum()
        return MarsOutput(loss=(image_nll + text_nll) / (num_codes + num_text).clamp(min=1),
                          image_loss=image_nll / num_codes.clamp(min=1), text_loss=text_nll / num_text.clamp(min=1))


# --- batches ---------------------------------------------------------------------------------

def encode_texts(model: MarsModel, texts: Sequence[str] | Sequence[Sequence[int]], tokenizer=None) -> list[list[int]]:
    """Strings (through any PreTrainedTokenizer, no special tokens added) or token-id lists."""
    if any(isinstance(text, str) for text in texts):
        if tokenizer is None:
            raise ValueError("texts are strings: pass tokenizer=... (any transformers PreTrainedTokenizer), or token ids")
        token_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    else:
        token_ids = [[int(t) for t in text] for text in texts]
    too_large = [t for ids in token_ids for t in ids if not 0 <= t < model.image_token_offset]
    if too_large:
        raise ValueError(f"token id {too_large[0]} is outside the Qwen vocabulary [0, {model.image_token_offset}): "
                         "use the tokenizer that belongs to this Qwen")
    return token_ids


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """-> input_ids (B, T) and attention_mask (B, T) bool; `side="left"` for sampling."""
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = True
    return ids, mask


def concat_batches(parts: Sequence[dict[str, Tensor]], pad_id: int = 0) -> dict[str, Tensor]:
    """Stack build_batch outputs of different lengths (say t2i rows and i2t rows) into one batch,
    right-padding each to the longest: pad_id, attention 0, labels -100."""
    length = max(part["input_ids"].shape[1] for part in parts)
    fill = {"input_ids": pad_id, "attention_mask": False, "labels": IGNORE_INDEX}
    return {key: torch.cat([F.pad(part[key], (0, length - part[key].shape[1]), value=value) for part in parts])
            for key, value in fill.items()}


def build_batch(model: MarsModel, texts: Sequence[str] | Sequence[Sequence[int]], codes: Tensor, *,
                task: str = "t2i", loss_on: str | None = None, caption_dropout: float = 0.0,
                generator: torch.Generator | None = None, tokenizer=None, pad_id: int = 0) -> dict[str, Tensor]:
    """A training batch {input_ids, attention_mask, labels} (right-padded, labels -100 off-loss).

    task "t2i": [prompt][boi][codes][eoi]; "i2t": [boi][codes][eoi][caption][eos].
    loss_on "image" (t2i default), "text" (i2t default) or "both". caption_dropout (t2i) swaps a
    prompt for the empty one with that probability so the model learns the CFG unconditional.
    """
    if task not in ("t2i", "i2t"):
        raise ValueError(f"task={task!r}: use 't2i' (text-to-image) or 'i2t' (image-to-text)")
    loss_on = loss_on or ("image" if task == "t2i" else "text")
    if loss_on not in ("image", "text", "both"):
        raise ValueError(f"loss_on={loss_on!r}: use 'image', 'text' or 'both'")
    grid = tuple(model.config.image_grid)
    if codes.dim() != 3 or tuple(codes.shape[1:]) != grid or len(codes) != len(texts):
        raise ValueError(f"codes have shape {tuple(codes.shape)}: expected ({len(texts)}, {grid[0]}, {grid[1]})")
    if codes.min() < 0 or codes.max() >= model.config.codebook_size:
        raise ValueError(f"codes must lie in [0, {model.config.codebook_size}): is the VQ codebook size right?")
    token_ids = encode_texts(model, texts, tokenizer)
    if caption_dropout > 0 and task == "t2i":
        dropped = torch.rand(len(token_ids), generator=generator) < caption_dropout
        token_ids = [[] if drop else ids for ids, drop in zip(token_ids, dropped.tolist())]
    eos = model.text_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if task == "i2t" and eos is None:
        raise ValueError("the Qwen config has no eos_token_id: set one so captions learn to stop")
    trained = {"image", "text"} if loss_on == "both" else {loss_on}
    sequences, loss_masks = [], []
    for ids, image in zip(token_ids, model.codes_to_tokens(codes.flatten(1)).tolist()):
        # (tokens, kind) segments; <boi>/<eoi> carry no loss (their positions are fixed).
        boi, eoi = ([model.boi_token_id], None), ([model.eoi_token_id], None)
        if task == "t2i":
            segments = [(ids, "text"), boi, (image, "image"), eoi]
        else:
            segments = [boi, (image, "image"), eoi, (ids + [eos], "text")]
        sequences.append([token for tokens, _ in segments for token in tokens])
        loss_masks.append([int(kind in trained) for tokens, kind in segments for _ in tokens])
    input_ids, attention_mask = pad_sequences(sequences, pad_id)
    use_loss, _ = pad_sequences(loss_masks, 0)
    labels = input_ids.masked_fill(use_loss == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
