"""Multi-token super-resolution: a second SemVIE model turns an h x w code grid into 2h x 2w.

The model is a MarsModel (frozen Qwen + visual experts + image embeddings/head, held by
composition) plus three small trainable parts. One sequence per image:

    [prompt][boi][low codes (h*w)][group 0][group 1] ... [group G-1]

The N = 4hw high-resolution codes are decoded in G = N / k groups of k codes. Group sizes:
k = 1 (code by code), k = 4 (the 2x2 block under one low-resolution code, the default) or
k = 4m (a row of m blocks, 2 x 2m codes). Groups run in raster order over the group grid, the
codes inside a group in raster order too (`to_group_order`).

Design ("shift by one group"), chosen so that both properties below are exact, not approximate:

* The input at each high-resolution slot is a query plus its group's predecessor:
  `image_embed(parent low code) + low row/col embedding` (the parent's own prefix embedding:
  locality is given, not learned) `+ image_sub_embed(position in the parent's 2x2 block)`
  `+ image_group_proj(the k codes of the previous group)` (`image_start_embed` for group 0, the
  [sep] of the hint). The output at a slot predicts the code of that slot.
* Attention is causal between groups and diagonal inside one (`group_attention_mask`): a slot
  sees the prompt, the low codes, every earlier group and itself, never a group-mate, so the k
  codes of a group are predicted in parallel and are conditionally independent given the past.
  Nothing is lost by that: every slot's own input already carries the whole previous group.
* k = 1 is ordinary next-token prediction: the mask is the causal triangle and the input at slot
  t carries code t - 1, i.e. a causal LM over [prefix][sep][c_0 .. c_{N-2}] predicting c_0 .. c_{N-1}
  (tests prove equality with the stack's built-in causal path).
* Cached decoding is exact: a group's inputs depend only on the previous group's sampled codes,
  so step g writes group g's k keys/values into the KVCache once and they never change; the
  first forward runs the prefix and group 0 together. Steps: N / k instead of N.
A query-stream design (placeholder tokens beside real-code tokens) would also decode exactly but
doubles the training sequence and makes k = 1 differ from next-token prediction.

    sr = SuperResModel.from_config(SuperResConfig(low_grid=(8, 8), group_size=4), MarsConfig.from_name("tiny-qwen3"))
    high = upsample_codes(sr, ["a red circle"], low_codes, tokenizer=tok, guidance_scale=3.0)  # (B, 16, 16)
    sr.save_pretrained("out/sr"); SuperResModel.from_pretrained("out/sr")

Training: train/superres.py (the superres stage). Tests: `pytest tests/test_superres.py`; speed and
accuracy per k: `python benchmarks/superres.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from mars.config import JsonConfig, MarsConfig
from mars.model import (CONFIG_NAME, WEIGHTS_NAME, MarsModel, apply_trainable_filter, cast_floats, encode_texts,
                        is_trainable, pad_sequences, read_safetensors)
from mars.sampling import StepCallback, guided, sample_logits
from mars.semvie import ModalityRouter

BLOCK = 2  # a low-resolution code covers BLOCK x BLOCK high-resolution codes
SUPERRES_CONFIG_NAME = "superres_config.json"
SUPERRES_WEIGHTS_NAME = "superres_trainable.safetensors"


@dataclass
class SuperResConfig(JsonConfig):
    saved_by = "SuperResModel.save_pretrained"  # a class attribute, not a field (no annotation)
    low_grid: tuple[int, int] = (8, 8)  # (h, w) of the input grid; the base MarsConfig's image_grid
    group_size: int = 4  # k codes per decoding step: 1, 4 (a 2x2 block) or 4m (a row of m blocks)

    high_grid: tuple[int, int] = field(init=False)  # (2h, 2w)
    group_shape: tuple[int, int] = field(init=False)  # (rows, cols) of high-resolution codes in a group
    num_low_tokens: int = field(init=False)
    num_high_tokens: int = field(init=False)
    num_groups: int = field(init=False)  # decoding steps

    def __post_init__(self) -> None:
        self.low_grid = tuple(int(n) for n in self.low_grid)
        if len(self.low_grid) != 2 or min(self.low_grid) < 1:
            raise ValueError(f"low_grid={self.low_grid}: give two positive ints (h, w), e.g. (8, 8)")
        h, w = self.low_grid
        k = int(self.group_size)
        if k == 1:
            self.group_shape = (1, 1)
        elif k == BLOCK * BLOCK:
            self.group_shape = (BLOCK, BLOCK)
        elif k > 0 and k % (BLOCK * BLOCK) == 0 and w % (k // (BLOCK * BLOCK)) == 0:
            self.group_shape = (BLOCK, k // BLOCK)  # m = k/4 neighbouring blocks of one block row
        else:
            choices = sorted({1, 4, *(4 * m for m in range(2, w + 1) if w % m == 0)})
            raise ValueError(f"group_size={self.group_size} does not tile a {h}x{w} low grid: use one of {choices}")
        self.high_grid = (BLOCK * h, BLOCK * w)
        self.num_low_tokens = h * w
        self.num_high_tokens = self.high_grid[0] * self.high_grid[1]
        self.num_groups = self.num_high_tokens // k


# --- grid layout ------------------------------------------------------------------------------

def to_group_order(grid: Tensor, config: SuperResConfig) -> Tensor:
    """(B, 2h, 2w) high-resolution grid -> (B, N) in decoding order (group by group)."""
    gh, gw = config.group_shape
    return rearrange(grid, "b (gy gh) (gx gw) -> b (gy gx gh gw)", gh=gh, gw=gw)


def from_group_order(codes: Tensor, config: SuperResConfig) -> Tensor:
    """(B, N) in decoding order -> (B, 2h, 2w)."""
    (gh, gw), (height, _) = config.group_shape, config.high_grid
    return rearrange(codes, "b (gy gx gh gw) -> b (gy gh) (gx gw)", gy=height // gh, gh=gh, gw=gw)


def slot_layout(config: SuperResConfig) -> tuple[Tensor, Tensor, Tensor]:
    """For each of the N slots in decoding order: parent low-res raster index, position in the
    parent's block (0..3, raster), group index. Three LongTensors (N,)."""
    height, width = config.high_grid
    rows, cols = torch.arange(height)[:, None].expand(height, width), torch.arange(width)[None].expand(height, width)
    parent = (rows // BLOCK) * config.low_grid[1] + cols // BLOCK  # (2h, 2w)
    sub = (rows % BLOCK) * BLOCK + cols % BLOCK
    group = torch.arange(config.num_high_tokens) // config.group_size
    return to_group_order(parent[None], config)[0], to_group_order(sub[None], config)[0], group


def sequence_groups(prefix_length: int, slot_groups: Tensor) -> Tensor:
    """Attention group of every position (L + N,): each prefix token alone (causal), then the slot groups."""
    return torch.cat([torch.arange(prefix_length, device=slot_groups.device), prefix_length + slot_groups])


def group_attention_mask(groups: Tensor, key_valid: Tensor, num_queries: int) -> Tensor:
    """Block-causal mask for the last `num_queries` of the positions `groups` covers.

    groups (S,) attention group of each position, key_valid (B, S) bool (False: padding) ->
    (B, 1, T, S) bool, True attends: a query sees real keys of earlier groups and itself only.
    """
    length = groups.shape[0]
    query = torch.arange(length - num_queries, length, device=groups.device)  # (T,) absolute positions
    earlier = groups[None, :] < groups[query][:, None]  # (T, S)
    itself = torch.arange(length, device=groups.device)[None, :] == query[:, None]
    return ((earlier[None] & key_valid[:, None, :]) | itself[None])[:, None]


# --- the model --------------------------------------------------------------------------------

@dataclass
class SuperResOutput:
    logits: Tensor  # (B, N, codebook) in decoding order
    loss: Tensor | None = None  # mean cross-entropy over all high-resolution codes


class SuperResModel(nn.Module):
    """A MarsModel over the low grid (`self.mars`) + slot embeddings; trainable parts named `image_*`."""

    def __init__(self, config: SuperResConfig, mars: MarsModel):
        super().__init__()
        if tuple(mars.config.image_grid) != config.low_grid:
            raise ValueError(f"the MarsModel's image_grid {tuple(mars.config.image_grid)} differs from the low_grid "
                             f"{config.low_grid}: build it with MarsConfig(image_grid={config.low_grid})")
        self.config, self.mars = config, mars
        reference = mars.image_embed.weight  # (codebook + 2, D)
        width, factory = reference.shape[1], dict(dtype=reference.dtype, device=reference.device)
        k = config.group_size
        self.image_sub_embed = nn.Embedding(BLOCK * BLOCK, width, **factory)
        self.image_group_proj = nn.Linear(k * width, width, bias=False, **factory)
        self.image_start_embed = nn.Parameter(torch.zeros(width, **factory))
        with torch.no_grad():
            self.image_sub_embed.weight.normal_(0.0, mars.text_config.initializer_range)
            # Starts as the mean of the previous group's code embeddings: in distribution for the
            # frozen layers, like MarsModel's mean-embedding start; training learns the binding.
            self.image_group_proj.weight.copy_(torch.eye(width, **factory).repeat(1, k) / k)
        parent, sub, group = slot_layout(config)
        self.register_buffer("slot_parent", parent.to(reference.device), persistent=False)
        self.register_buffer("slot_sub", sub.to(reference.device), persistent=False)
        self.register_buffer("slot_group", group.to(reference.device), persistent=False)
        apply_trainable_filter(self)

    # --- construction and checkpoints -----------------------------------------------------------

    @classmethod
    def from_config(cls, config: SuperResConfig, base: MarsConfig) -> SuperResModel:
        """A new model: the Qwen from `base` (directory or random config), image_grid set to low_grid."""
        return cls(config, MarsModel.from_config(dataclasses.replace(base, image_grid=config.low_grid)))

    def save_pretrained(self, directory: str | Path, store_text_model: bool | None = None,
                        dtype: torch.dtype | None = None) -> None:
        """MarsModel.save_pretrained (config, experts, Qwen by path or stored) + superres_config.json
        + superres_trainable.safetensors (the slot embeddings), weights in `dtype` if given.
        A SR directory is a MarsModel directory too."""
        directory = Path(directory)
        self.mars.save_pretrained(directory, store_text_model, dtype)
        own = {name: t for name, t in self.state_dict().items() if not name.startswith("mars.")}
        save_file(cast_floats(own, dtype), directory / SUPERRES_WEIGHTS_NAME)
        self.config.save(directory / SUPERRES_CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                        qwen: PreTrainedModel | None = None) -> SuperResModel:
        """Load a save_pretrained directory. `qwen`: an already loaded frozen Qwen to share (e.g. the
        base stage's; nothing is copied), instead of loading the one the directory names."""
        directory = Path(directory)
        config = SuperResConfig.load(directory / SUPERRES_CONFIG_NAME)
        if qwen is None:
            mars = MarsModel.from_pretrained(directory, dtype=dtype)
        else:
            mars = MarsModel.from_qwen(qwen, MarsConfig.load(directory / CONFIG_NAME))
            mars.load_trainable(directory / WEIGHTS_NAME)
        model = cls(config, mars)
        model.load_superres_trainable(directory / SUPERRES_WEIGHTS_NAME)
        return model

    def load_superres_trainable(self, path: str | Path) -> None:
        """Load superres_trainable.safetensors strictly (the MarsModel part loads with load_trainable)."""
        path = Path(path)
        state = read_safetensors(path, self.image_start_embed.device, "SuperResModel.save_pretrained")
        expected = {name for name in self.state_dict() if not name.startswith("mars.")}
        if set(state) != expected or any(state[n].shape != self.state_dict()[n].shape for n in expected):
            raise ValueError(f"{path} does not match group_size={self.config.group_size} and this MarsConfig: "
                             f"load it with the {SUPERRES_CONFIG_NAME} saved beside it")
        self.load_state_dict(state, strict=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for name, param in self.named_parameters() if is_trainable(name)]

    # --- embeddings -----------------------------------------------------------------------------

    def embed_prefix(self, prompt_ids: Tensor, low_codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[prompt][boi][low codes] -> embeddings (B, L, D), image mask (B, L), low-code embeddings (B, n, D)."""
        boi = prompt_ids.new_full((len(prompt_ids), 1), self.mars.boi_token_id)
        ids = torch.cat([prompt_ids, boi, self.mars.codes_to_tokens(low_codes.flatten(1))], dim=1)  # (B, L)
        is_image = ids >= self.mars.image_token_offset
        x = self.mars.embed(ids, ModalityRouter(is_image))  # codes get their low-grid row/col embeddings
        return x, is_image, x[:, -self.config.num_low_tokens:]

    def slot_queries(self, low_embeddings: Tensor) -> Tensor:
        """(B, n, D) -> (B, N, D): each slot's parent embedding + its position inside the parent's block."""
        return low_embeddings[:, self.slot_parent] + self.image_sub_embed(self.slot_sub)

    def group_summaries(self, codes: Tensor) -> Tensor:
        """Codes of whole groups (B, G, k) -> (B, G, D): what the following group reads."""
        return self.image_group_proj(self.mars.image_embed(codes).flatten(-2))

    def group_inputs(self, queries: Tensor, previous: Tensor | None, first_group: int) -> Tensor:
        """Inputs of groups first_group.. (as many as `previous` holds, or group 0 alone when None).

        queries (B, N, D); previous (B, G', k) codes of each of those groups' predecessor -> (B, G'*k, D).
        """
        k = self.config.group_size
        if previous is None:
            summary = self.image_start_embed.expand(len(queries), 1, -1)  # (B, 1, D)
        else:
            summary = self.group_summaries(previous)  # (B, G', D)
        span = slice(first_group * k, (first_group + summary.shape[1]) * k)
        return queries[:, span] + summary.repeat_interleave(k, dim=1)

    # --- forward --------------------------------------------------------------------------------

    def forward(self, prompt_ids: Tensor, prompt_mask: Tensor | None, low_codes: Tensor,
                high_codes: Tensor, history_codes: Tensor | None = None) -> SuperResOutput:
        """Teacher-forced logits of every high-resolution code, and their mean cross-entropy.

        prompt_ids (B, P) left-padded, prompt_mask (B, P) bool (None: no padding), low_codes
        (B, h, w), high_codes (B, 2h, 2w) -> logits (B, N, codebook) in decoding order.
        history_codes (B, 2h, 2w): what each group reads as its predecessor's codes (default
        high_codes; a corrupted copy in training, see build_superres_batch).
        """
        self.check_codes(low_codes, self.config.low_grid, "low_codes")
        self.check_codes(high_codes, self.config.high_grid, "high_codes")
        k, batch = self.config.group_size, len(prompt_ids)
        x_prefix, prefix_is_image, low_embeddings = self.embed_prefix(prompt_ids, low_codes)
        targets = to_group_order(high_codes, self.config)  # (B, N)
        history = targets if history_codes is None else to_group_order(history_codes, self.config)
        groups = history.view(batch, self.config.num_groups, k)
        queries = self.slot_queries(low_embeddings)
        x_start = self.group_inputs(queries, None, 0)
        x_rest = self.group_inputs(queries, groups[:, :-1], 1)  # shift by one group
        x = torch.cat([x_prefix, x_start, x_rest], dim=1)  # (B, L + N, D)
        prefix_length = x_prefix.shape[1]
        valid = real_tokens(prompt_mask, prompt_ids, x.shape[1] - prompt_ids.shape[1])
        is_image = torch.cat([prefix_is_image, prefix_is_image.new_ones(batch, self.config.num_high_tokens)], dim=1)
        mask = group_attention_mask(sequence_groups(prefix_length, self.slot_group), valid, x.shape[1])
        hidden = self.mars.model(x, ModalityRouter(is_image), positions_of(valid), mask)
        logits = self.mars.image_head(hidden[:, prefix_length:])  # (B, N, codebook)
        return SuperResOutput(logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))

    def check_codes(self, codes: Tensor, grid: tuple[int, int], name: str) -> None:
        wrong = not torch.is_tensor(codes) or codes.dim() != 3 or codes.is_floating_point()
        if wrong or tuple(codes.shape[1:]) != grid:
            shape = tuple(codes.shape) if torch.is_tensor(codes) else type(codes).__name__
            raise ValueError(f"{name} has shape {shape}: expected integer codes (B, {grid[0]}, {grid[1]})")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.mars.config.codebook_size):
            raise ValueError(f"{name} must lie in [0, {self.mars.config.codebook_size}): "
                             "were they made by the VQ tokenizer this model was trained with?")


def real_tokens(prompt_mask: Tensor | None, prompt_ids: Tensor, extra: int) -> Tensor:
    """(B, P + extra) bool: False at prompt padding only."""
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    return torch.cat([prompt_mask.bool(), prompt_mask.new_ones(len(prompt_ids), extra, dtype=torch.bool)], dim=1)


def positions_of(valid: Tensor) -> Tensor:
    """(B, S) bool -> RoPE positions counting real tokens only, so left padding shifts nothing."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


# --- batches ----------------------------------------------------------------------------------

def build_superres_batch(model: SuperResModel, texts: Sequence[str] | Sequence[Sequence[int]], low_codes: Tensor,
                         high_codes: Tensor, *, tokenizer=None, caption_dropout: float = 0.0,
                         low_code_noise: float = 0.0, history_noise: float = 0.0,
                         generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Forward's keyword arguments for a training batch.

    caption_dropout: a prompt becomes empty with this probability (the CFG unconditional).
    low_code_noise: each low code is replaced by a uniformly random one with this probability, so
    the stage learns to correct the base stage's mistakes instead of copying them.
    history_noise: the same for the high codes each group reads as its predecessor's (the targets
    stay exact), so one wrong code is not copied block after block: the parent code decides.
    """
    token_ids = encode_texts(model.mars, texts, tokenizer)
    if caption_dropout > 0:
        dropped = torch.rand(len(token_ids), generator=generator) < caption_dropout
        token_ids = [[] if drop else ids for ids, drop in zip(token_ids, dropped.tolist())]
    low_codes = replace_at_random(low_codes, low_code_noise, model.mars.config.codebook_size, generator)
    prompt_ids, prompt_mask = pad_sequences(token_ids, pad_id=0, side="left")
    device = low_codes.device
    batch = {"prompt_ids": prompt_ids.to(device), "prompt_mask": prompt_mask.to(device),
             "low_codes": low_codes, "high_codes": high_codes}
    if history_noise > 0:
        size = model.mars.config.codebook_size
        batch["history_codes"] = replace_at_random(high_codes, history_noise, size, generator)
    return batch


def replace_at_random(codes: Tensor, rate: float, codebook_size: int, generator: torch.Generator | None) -> Tensor:
    """Each code replaced by a uniformly random one with probability `rate` (0: `codes` itself)."""
    if rate <= 0:
        return codes
    noisy = torch.rand(codes.shape, generator=generator) < rate
    random_codes = torch.randint(0, codebook_size, codes.shape, generator=generator)
    return torch.where(noisy.to(codes.device), random_codes.to(codes), codes)


# --- sampling ---------------------------------------------------------------------------------

@torch.inference_mode()
def generate_groups(model: SuperResModel, prompts: Sequence[Sequence[int]], low_codes: Tensor, *,
                    guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float = 1.0, generator: torch.Generator | None = None,
                    callback: StepCallback | None = None,
                    return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Sample the high-resolution codes, one group of k per step -> (B, N) in decoding order.

    prompts: token ids without <boi>. guidance_scale != 1 adds the empty prompt's rows (with the
    same low codes) and guides as the base stage does: cond + (scale - 1) * (cond - uncond).
    callback(step, num_groups, grid (B, 2h, 2w)): decoded slots hold their codes, the rest their
    parent's low code, so every step's grid decodes to a preview. `return_logits` also returns
    the guided logits (B, N, codebook).
    """
    config, k = model.config, model.config.group_size
    model.check_codes(low_codes, config.low_grid, "low_codes")
    if len(prompts) != len(low_codes):
        raise ValueError(f"{len(prompts)} prompts for {len(low_codes)} low-resolution grids: give one prompt per grid")
    batch, guidance = len(prompts), guidance_scale != 1.0
    rows = [list(p) for p in prompts] + ([[]] * batch if guidance else [])
    copies = len(rows) // batch
    device = model.image_start_embed.device
    prompt_ids, prompt_mask = pad_sequences(rows, pad_id=0, side="left")
    prompt_ids, low = prompt_ids.to(device), low_codes.to(device).repeat(copies, 1, 1)  # (R, P), (R, h, w)
    x_prefix, prefix_is_image, low_embeddings = model.embed_prefix(prompt_ids, low)
    queries = model.slot_queries(low_embeddings)  # (R, N, D)
    prefix_length = x_prefix.shape[1]
    extra = prefix_length - prompt_ids.shape[1] + config.num_high_tokens  # <boi>, low and high codes
    valid = real_tokens(prompt_mask.to(device), prompt_ids, extra)
    positions = positions_of(valid)  # (R, L + N)
    groups = sequence_groups(prefix_length, model.slot_group)
    cache = model.mars.new_cache(len(rows), prefix_length + config.num_high_tokens)

    def run(x: Tensor, is_image: Tensor) -> Tensor:
        """x (R, T, D), the next T positions -> guided logits of the last k (B, k, codebook)."""
        end = cache.length + x.shape[1]
        mask = group_attention_mask(groups[:end], valid[:, :end], x.shape[1])
        hidden = model.mars.model(x, ModalityRouter(is_image), positions[:, end - x.shape[1]:end], mask, cache)
        logits = model.mars.image_head(hidden[:, -k:])  # (R, k, codebook)
        return guided(logits, batch, guidance_scale) if guidance else logits

    codes = low.flatten(1)[:batch, model.slot_parent].clone()  # (B, N): parents until decoded
    first = torch.cat([x_prefix, model.group_inputs(queries, None, 0)], dim=1)  # prefix + group 0 in one forward
    logits = run(first, torch.cat([prefix_is_image, prefix_is_image.new_ones(len(rows), k)], dim=1))
    all_logits, all_image = [], torch.ones(len(rows), k, dtype=torch.bool, device=device)
    for step in range(config.num_groups):
        if return_logits:
            all_logits.append(logits)
        sampled = sample_logits(logits.flatten(0, 1), temperature, top_k, top_p, generator)  # (B*k,)
        codes[:, step * k:(step + 1) * k] = sampled.view(batch, k)
        if callback is not None:
            callback(step, config.num_groups, from_group_order(codes, config))
        if step + 1 == config.num_groups:
            break
        previous = codes[:, None, step * k:(step + 1) * k].repeat(copies, 1, 1)  # (R, 1, k)
        logits = run(model.group_inputs(queries, previous, step + 1), all_image)
    return (codes, torch.cat(all_logits, dim=1)) if return_logits else codes


def upsample_codes(sr_model: SuperResModel, prompts: Sequence[str] | Sequence[Sequence[int]], low_codes: Tensor,
                   tokenizer=None, *, guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float = 1.0, generator: torch.Generator | None = None,
                   callback: StepCallback | None = None) -> Tensor:
    """Prompts (strings + tokenizer, or token-id lists) and low codes (B, h, w) -> codes (B, 2h, 2w).

    Decodes in num_groups = 4hw / k steps; see generate_groups for guidance and the callback.
    """
    prompt_ids = encode_texts(sr_model.mars, prompts, tokenizer)
    codes = generate_groups(sr_model, prompt_ids, low_codes, guidance_scale=guidance_scale, temperature=temperature,
                            top_k=top_k, top_p=top_p, generator=generator, callback=callback)
    return from_group_order(codes, sr_model.config)
