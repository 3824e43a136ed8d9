"""Sampling from MarsModel: KV-cached image generation (CFG, top-k/p, seeds) and captioning.

Small functions in the gpt-fast manner: `sample_logits`, `prefill`, `decode_one_token`, then
`generate` (image codes) and `generate_text` (tokens after an image). Prompts of different
lengths are left-padded; the attention mask hides the padding and RoPE positions count real
tokens only, so a row's result does not depend on its batch-mates. Classifier-free guidance
runs the conditional and unconditional (empty prompt) rows in one batch.

    codes = generate_images(model, ["a red circle", "两个蓝色的正方形"], tokenizer=tok,
                            guidance_scale=3.0, generator=torch.Generator().manual_seed(0))  # (B, h, w)
    captions = caption_images(model, codes)  # token ids, stopped at eos
    nll = caption_nll(model, codes, prompt_ids)  # (B,) -log p(prompt | image): self-reranking

Tests: `pytest tests/test_sampling.py`; speed: `python -m benchmarks.sampling`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mars.model import IGNORE_INDEX, MarsModel, build_batch, encode_texts, pad_sequences
from mars.semvie import KVCache, ModalityRouter

StepCallback = Callable[[int, int, Tensor], None]  # (step, total, codes so far (B, step + 1))


def guided(logits: Tensor, batch: int, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: rows [:batch] conditional, [batch:] unconditional -> (batch, ...) logits
    pushed away from the unconditional ones (guidance_scale 1 returns the conditional rows)."""
    cond, uncond = logits[:batch], logits[batch:]
    return cond + (guidance_scale - 1.0) * (cond - uncond)


def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> token (B,). temperature <= 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the top token always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(-1)
    # Exponential race: argmax p/E with E ~ Exp(1) is a categorical draw (-log U is Exp(1) and
    # several times cheaper than exponential_ on CPU); only `generator` supplies randomness.
    noise = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
    return (probs / noise).argmax(-1)


def prefill(model: MarsModel, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache,
            head: nn.Module) -> Tensor:
    """Run the (left-padded) prefixes through the model into `cache`; -> last-position logits (B, V)."""
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask, cache=cache)
    with model.model.autocast():  # a bf16 frozen lm_head beside the fp32 hidden state (MemoryConfig)
        return head(hidden[:, -1])


def decode_one_token(model: MarsModel, tokens: Tensor, rope: tuple[Tensor, Tensor], attention_mask: Tensor | None,
                     cache: KVCache, head: nn.Module, cell: int | None = None) -> Tensor:
    """One token per row -> next-token logits (B, V).

    tokens (B, 1): image codes at raster `cell`, or text token ids when `cell` is None. The
    modality is known, so the step builds no modality mask; rope: cos, sin (B, 1, hd) of this
    position; attention_mask: None or this step's slice of DecodePlan's additive mask.
    """
    if cell is None:
        x, router = model.model.embed_tokens(tokens), ModalityRouter.uniform(tokens.shape, image=False)
    else:
        x, router = model.embed_codes(tokens, cell), ModalityRouter.uniform(tokens.shape, image=True)
    hidden = model.model(x, router, attention_mask=attention_mask, cache=cache, rope=rope)
    with model.model.autocast():
        return head(hidden[:, -1])


class DecodePlan:
    """What the decode steps of one sampling call share, computed once: the left-padded prefix,
    RoPE cos/sin of every new position and the additive key-padding mask (None without padding,
    so single-token steps take SDPA's mask-free path)."""

    def __init__(self, model: MarsModel, rows: list[list[int]], num_new: int, device: torch.device,
                 codes: bool = False):
        """codes: the new tokens are an image's codes, raster cells 0, 1, ... (else text)."""
        input_ids, key_mask = pad_sequences(rows, pad_id=0, side="left")  # (R, T) twice
        self.input_ids, self.prefix_length = input_ids.to(device), input_ids.shape[1]
        next_position = key_mask.sum(1, keepdim=True).to(device)  # (R, 1): RoPE counts real tokens only
        new = torch.arange(num_new, device=device)
        self.cos, self.sin = model.rotary(next_position + new, new[None] if codes else None)  # (R, N, hd)
        self.prefill_mask = self.decode_mask = None
        if not bool(key_mask.all()):
            self.prefill_mask = key_mask.to(device)  # prefill builds causal & padding from it
            blocked = torch.cat([~key_mask, key_mask.new_zeros(len(rows), num_new)], dim=1)  # (R, T + N) bool
            # What SDPA would make of the bool mask at every layer of every step, made once.
            additive = torch.zeros(blocked.shape, dtype=self.cos.dtype).masked_fill_(blocked, float("-inf"))
            self.decode_mask = additive.to(device)[:, None, None, :]  # (R, 1, 1, T + N)

    def step(self, index: int) -> tuple[tuple[Tensor, Tensor], Tensor | None]:
        """(rope, attention mask) of new token `index` (0 = the first after the prefix)."""
        rope = (self.cos[:, index:index + 1], self.sin[:, index:index + 1])  # (R, 1, hd) twice
        mask = None if self.decode_mask is None else self.decode_mask[..., :self.prefix_length + index + 1]
        return rope, mask


@torch.inference_mode()
def generate(model: MarsModel, prefixes: Sequence[Sequence[int]], *, uncond_prefixes: Sequence[Sequence[int]] | None = None,
             guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
             generator: torch.Generator | None = None, callback: StepCallback | None = None,
             return_logits: bool = False, first_codes: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Sample one image grid per prefix (token ids ending in <boi>) -> codes (B, h*w).

    With `uncond_prefixes` the unconditional rows join the batch and the logits are guided:
    cond + (scale - 1) * (cond - uncond), which is exactly `cond` at scale 1. `return_logits`
    also returns the guided logits of every step (B, h*w, codebook). `first_codes` (B, k): the
    image's first k codes in raster order, taken as given; the rest are sampled to follow them.
    """
    if uncond_prefixes is not None and len(uncond_prefixes) != len(prefixes):
        raise ValueError(f"{len(uncond_prefixes)} uncond_prefixes for {len(prefixes)} prefixes: give one per prefix")
    rows = [list(p) for p in prefixes] + [list(p) for p in (uncond_prefixes or [])]
    if any(not row or row[-1] != model.boi_token_id for row in rows):
        raise ValueError(f"every prefix must end with <boi> (token id {model.boi_token_id}); "
                         "generate_images adds it to plain prompts")
    batch, num_codes = len(prefixes), model.config.num_image_tokens
    given = 0 if first_codes is None else first_codes.shape[1]
    if first_codes is not None and (first_codes.shape[0] != batch or given > num_codes):
        raise ValueError(f"first_codes has shape {tuple(first_codes.shape)}: give (batch {batch}, at most {num_codes})")
    copies = len(rows) // batch
    device = model.image_head.weight.device
    plan = DecodePlan(model, rows, num_codes, device, codes=True)
    cache = model.new_cache(len(rows), plan.prefix_length + num_codes)
    logits = prefill(model, plan.input_ids, plan.prefill_mask, cache, model.image_head)
    codes = torch.empty(batch, num_codes, dtype=torch.long, device=device)
    all_logits = []
    for step in range(num_codes):
        if uncond_prefixes is not None:
            logits = guided(logits, batch, guidance_scale)
        if return_logits:
            all_logits.append(logits)
        codes[:, step] = first_codes[:, step] if step < given else sample_logits(logits, temperature, top_k, top_p,
                                                                                   generator)
        if callback is not None:
            callback(step, num_codes, codes[:, :step + 1])
        if step + 1 == num_codes:
            break
        step_codes = codes[:, step:step + 1]  # (B, 1); CFG rows take the same code
        rope, mask = plan.step(step)
        logits = decode_one_token(model, step_codes.repeat(copies, 1) if copies > 1 else step_codes, rope, mask,
                                  cache, model.image_head, cell=step)
    return (codes, torch.stack(all_logits, dim=1)) if return_logits else codes


def generate_images(model: MarsModel, prompts: Sequence[str] | Sequence[Sequence[int]], tokenizer=None, *,
                    guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float = 1.0, generator: torch.Generator | None = None,
                    callback: StepCallback | None = None, first_codes: Tensor | None = None) -> Tensor:
    """Prompts (strings + tokenizer, or token-id lists) -> image codes (B, h, w) for the VQ decoder.

    guidance_scale != 1 turns on classifier-free guidance against the empty prompt; first_codes (B, k)
    fixes the first k codes (generate).
    """
    prompt_ids = encode_texts(model, prompts, tokenizer)
    prefixes = [ids + [model.boi_token_id] for ids in prompt_ids]
    uncond = [[model.boi_token_id]] * len(prefixes) if guidance_scale != 1.0 else None
    codes = generate(model, prefixes, uncond_prefixes=uncond, guidance_scale=guidance_scale,
                     temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, callback=callback,
                     first_codes=first_codes)
    return codes.view(len(prefixes), *model.config.image_grid)


@torch.inference_mode()
def generate_text(model: MarsModel, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                  generator: torch.Generator | None = None, eos_token_id: int | Sequence[int] | None = None
                  ) -> list[list[int]]:
    """Continue each prefix with text from the frozen LM head; a row stops at eos (not returned)."""
    eos = model.text_config.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    device = model.lm_head.weight.device
    rows = [list(p) for p in prefixes]
    plan = DecodePlan(model, rows, max_new_tokens, device)
    cache = model.new_cache(len(rows), plan.prefix_length + max_new_tokens)
    logits = prefill(model, plan.input_ids, plan.prefill_mask, cache, model.lm_head)
    tokens = torch.empty(len(rows), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    eos_tensor = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        tokens[:, step] = sample_logits(logits, temperature, top_k, top_p, generator)
        finished |= torch.isin(tokens[:, step], eos_tensor)
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        rope, mask = plan.step(step)
        logits = decode_one_token(model, tokens[:, step:step + 1], rope, mask, cache, model.lm_head)
    captions = []
    for row in tokens[:, :step + 1].tolist():
        stops = [i for i, token in enumerate(row) if token in eos_ids]
        captions.append(row[:stops[0]] if stops else row)
    return captions


def caption_images(model: MarsModel, codes: Tensor, **kwargs) -> list[list[int]]:
    """codes (B, h, w) -> caption token ids per image ([boi][codes][eoi] -> text). kwargs: generate_text's."""
    image = model.codes_to_tokens(codes.flatten(1))  # (B, h*w)
    boi = torch.full((len(codes), 1), model.boi_token_id, dtype=torch.long, device=codes.device)
    eoi = torch.full_like(boi, model.eoi_token_id)
    return generate_text(model, torch.cat([boi, image, eoi], dim=1).tolist(), **kwargs)


@torch.no_grad()
def image_nll(model: MarsModel, token_ids: Sequence[Sequence[int]], codes: Tensor) -> Tensor:
    """One caption per image and codes (B, h, w) -> (B, h*w): -log p(code | caption, the codes before it)
    of every cell under the text-to-image direction, teacher-forced in one forward pass."""
    batch = build_batch(model, [list(ids) for ids in token_ids], codes.cpu(), task="t2i")  # right-padded
    batch = {key: value.to(codes.device) for key, value in batch.items()}
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T-1, D)
    targets = batch["labels"][:, 1:]
    on_codes = model.is_code(targets)  # (B, T-1): h*w cells a row
    with model.model.autocast():
        logits = model.image_head(hidden[on_codes]).float()  # (B*h*w, codebook)
    nll = nn.functional.cross_entropy(logits, targets[on_codes] - model.image_token_offset, reduction="none")
    return nll.view(len(codes), -1)


@torch.no_grad()
def caption_nll(model: MarsModel, codes: Tensor, token_ids: Sequence[Sequence[int]]) -> Tensor:
    """codes (B, h, w) and one caption per image -> (B,) -log p(caption, eos | image) under the
    image-to-text direction ([boi][codes][eoi][caption][eos], teacher-forced, one forward pass).

    Lower means the image fits the caption better: sampling several images per prompt and keeping
    the one whose caption is likeliest is self-reranking (CogView), with no other model involved.
    """
    batch = build_batch(model, [list(ids) for ids in token_ids], codes.cpu(), task="i2t")  # right-padded
    batch = {key: value.to(codes.device) for key, value in batch.items()}
    logits = model(batch["input_ids"], batch["attention_mask"]).logits[:, :-1].float()  # (B, T-1, V)
    targets = batch["labels"][:, 1:]  # (B, T-1): the caption and its eos, -100 elsewhere
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                      reduction="none")  # (B, T-1)
    return nll.sum(dim=1)
