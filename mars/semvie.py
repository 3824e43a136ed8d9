"""SemVIE: visual experts inside a frozen Qwen2 / Qwen2.5 / Qwen3 decoder (MARS, He et al. 2024).

Each Hugging Face decoder layer is wrapped, not forked. Its own modules keep their names
(`self_attn.q_proj`, `mlp.gate_proj`, ...), so a Qwen checkpoint loads strictly, and serve the
text positions; mirror-named copies initialised from them (`visual_attn.q_proj`,
`visual_mlp.gate_proj`, ...) serve the image positions. Queries, keys and values of both
modalities meet in one attention over the whole sequence with Qwen's RoPE, so image tokens read
the prompt and later text reads the image.

    ModalityRouter   splits positions by modality once per forward; every layer reuses it
                     (`uniform`: a decode step of known modality, nothing to split)
    KVCache          preallocated keys/values; writes of any number of tokens per step
    rope_tables      Qwen's RoPE cos/sin in the form every layer applies, made once per forward
    SemVIELayer      shared norms -> routed q/k/v -> one attention -> routed o_proj and FFN
    SemVIEModel      the stack: rotary, default causal+padding mask or an explicit one, layers;
                     two memory levers (mars.model.configure_memory sets them): activation
                     checkpointing per layer, and bf16 autocast when the frozen weights are bf16

Used by mars/model.py; tests: `pytest tests/test_semvie.py`.
"""

from __future__ import annotations

import contextlib
import copy
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def mirror(module: nn.Module) -> nn.Module:
    """A copy with its own parameters, initialised from `module`; the HF config object stays shared."""
    memo = {id(module.config): module.config} if hasattr(module, "config") else {}
    return copy.deepcopy(module, memo)


class ModalityRouter:
    """Sends text positions to the Qwen modules and image positions to the visual experts.

    A pure-text or pure-image input (every decode step) calls one path on the whole tensor;
    a mixed one gathers each modality's rows, runs its path and scatters the results back.
    """

    def __init__(self, image_mask: Tensor):  # (B, T) bool
        self.shape = image_mask.shape
        flat = image_mask.reshape(-1)
        num_image = int(flat.sum())
        self.all_text, self.all_image = num_image == 0, num_image == flat.numel()
        self.text_index = None if self.all_image else (~flat).nonzero().squeeze(1)
        self.image_index = None if self.all_text else flat.nonzero().squeeze(1)

    @classmethod
    def uniform(cls, shape: tuple[int, int], image: bool) -> ModalityRouter:
        """Every position of a (B, T) input is one modality, known to the caller (a decode step):
        no mask to build, no host sync."""
        router = cls.__new__(cls)
        router.shape, router.all_text, router.all_image = torch.Size(shape), not image, image
        router.text_index = router.image_index = None
        return router

    def __call__(self, x: Tensor, text_fn: Callable, image_fn: Callable):
        """x (B, T, ...) -> fn(x) (B, T, ...), or a tuple of such when the fns return tuples."""
        if self.all_text:
            return text_fn(x)
        if self.all_image:
            return image_fn(x)
        flat = x.flatten(0, 1)  # (B*T, ...)
        from_text, from_image = text_fn(flat[self.text_index]), image_fn(flat[self.image_index])
        if isinstance(from_text, tuple):
            return tuple(self._scatter(a, b) for a, b in zip(from_text, from_image))
        return self._scatter(from_text, from_image)

    def _scatter(self, from_text: Tensor, from_image: Tensor) -> Tensor:
        # The two paths may differ in dtype (a bf16 text embedding beside fp32 image embeddings when
        # the frozen Qwen is held in bf16): the result takes the wider one, as `a + b` would.
        dtype = torch.promote_types(from_text.dtype, from_image.dtype)
        out = from_text.new_empty(self.shape.numel(), *from_text.shape[1:], dtype=dtype)  # every row is written below
        # index_put_, not index_copy_: autograd keeps only the indices, where index_copy_ keeps both
        # sources, i.e. every q, k, v, attention and MLP output of every layer (about 10 % of the
        # activations); it is also faster on the CPU.
        out.index_put_((self.text_index,), from_text.to(dtype))
        out.index_put_((self.image_index,), from_image.to(dtype))
        return out.view(*self.shape, *from_text.shape[1:])


class KVCache:
    """Keys/values of every layer in one preallocated buffer (no concatenation per step).

    `update` writes any number of new tokens at `length` (one code per step for the base
    sampler, a whole group for block-causal decoding) and returns the filled prefix;
    SemVIEModel calls `advance` once all layers have written.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer views made once: a decode step then writes and reads with two narrows each.
        self.layer_keys, self.layer_values = self.keys.unbind(0), self.values.unbind(0)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def update(self, layer_idx: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """keys, values (B, Hkv, T, hd) -> all keys/values so far (B, Hkv, length + T, hd)."""
        start, num_new = self.length, keys.shape[2]
        if start + num_new > self.max_length:
            raise ValueError(f"KVCache holds {self.max_length} tokens, {start + num_new} needed: "
                             "create it with a larger max_length")
        layer_keys, layer_values = self.layer_keys[layer_idx], self.layer_values[layer_idx]
        layer_keys.narrow(2, start, num_new).copy_(keys)
        layer_values.narrow(2, start, num_new).copy_(values)
        return layer_keys.narrow(2, 0, start + num_new), layer_values.narrow(2, 0, start + num_new)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


def project_qkv(attn: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One attention module's q, k, v for `hidden` (..., D): (..., H, hd), (..., Hkv, hd) twice."""
    heads = (*hidden.shape[:-1], -1, attn.head_dim)
    q, k, v = attn.q_proj(hidden).view(heads), attn.k_proj(hidden).view(heads), attn.v_proj(hidden).view(heads)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def routed_norm(x: Tensor, router: ModalityRouter, shared: nn.Module, visual: nn.Module | None) -> Tensor:
    """The shared frozen norm everywhere, or (visual_norms) the visual one at image positions."""
    return shared(x) if visual is None else router(x, shared, visual)


def rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Qwen's cos, sin (B, T, hd) -> (B, 1, T, hd) tables for `apply_rope`, made once per forward.

    The sine's first half is negated, so that rotate_half(x) * sin == swap_halves(x) * table:
    one negation per forward instead of one per layer and tensor; (-a) * b == a * (-b) exactly.
    """
    half = sin.shape[-1] // 2
    return cos.unsqueeze(1), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x (B, H, T, hd) rotated as Hugging Face's apply_rotary_pos_emb does, bit for bit."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin


class SemVIELayer(nn.Module):
    """One Qwen decoder layer plus its visual attention and FFN experts."""

    def __init__(self, layer: nn.Module, layer_idx: int, visual_norms: bool = False):
        super().__init__()
        if getattr(layer.self_attn, "sliding_window", None):
            raise ValueError(f"layer {layer_idx} uses sliding-window attention: load the Qwen with use_sliding_window=False")
        self.layer_idx = layer_idx
        # The wrapped Qwen modules under their Hugging Face names (frozen, text positions).
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        # The experts (trainable, image positions), initialised from the text weights.
        self.visual_attn = mirror(layer.self_attn)
        self.visual_mlp = mirror(layer.mlp)
        # The paper shares the frozen norms; `visual_norms` gives the image path its own.
        self.visual_input_layernorm = mirror(layer.input_layernorm) if visual_norms else None
        self.visual_post_attention_layernorm = mirror(layer.post_attention_layernorm) if visual_norms else None
        self.num_heads = layer.self_attn.config.num_attention_heads
        self.num_kv_heads = layer.self_attn.config.num_key_value_heads

    def forward(self, x: Tensor, router: ModalityRouter, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                is_causal: bool, cache: KVCache | None = None) -> Tensor:
        """x (B, T, D); rope: `rope_tables` (B, 1, T, hd) twice; mask, is_causal: for SDPA."""
        h = routed_norm(x, router, self.input_layernorm, self.visual_input_layernorm)
        x = x + self._attention(h, router, rope, mask, is_causal, cache)
        h = routed_norm(x, router, self.post_attention_layernorm, self.visual_post_attention_layernorm)
        return x + router(h, self.mlp, self.visual_mlp)

    def _attention(self, h: Tensor, router: ModalityRouter, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                   is_causal: bool, cache: KVCache | None) -> Tensor:
        B, T, _ = h.shape
        q, k, v = router(h, partial(project_qkv, self.self_attn), partial(project_qkv, self.visual_attn))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd)
        dropout = self.self_attn.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                             scale=self.self_attn.scaling,
                                             enable_gqa=self.num_kv_heads != self.num_heads)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return router(out, self.self_attn.o_proj, self.visual_attn.o_proj)


def default_position_ids(padding_mask: Tensor | None, num_new: int, past: int, device: torch.device) -> Tensor:
    """(B or 1, T) RoPE positions: counted over real tokens only, so left padding shifts nothing."""
    if padding_mask is None:
        return torch.arange(past, past + num_new, device=device)[None]
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -num_new:]


def resolve_attention_mask(attention_mask: Tensor | None, num_new: int, past: int,
                           device: torch.device) -> tuple[Tensor | None, bool]:
    """The (mask, is_causal) pair for scaled_dot_product_attention.

    `attention_mask` is (B, S) with 1 for real tokens (S = past + new, HF convention), or an
    explicit (B, 1, T, S) mask (bool: True attends; float: added to the scores) used as given,
    e.g. a block-causal group mask. Without padding the cheaper built-in causal path is used.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False
    total = past + num_new
    if attention_mask is not None:
        if attention_mask.shape[-1] != total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected past + new = {total}")
        if bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None and (past == 0 or num_new == 1):
        return None, past == 0 and num_new > 1
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None]  # (1, 1, T, S) causal
    if attention_mask is not None:
        # A padded query sees nothing else; letting it see itself keeps its unused output finite.
        allowed = (allowed & attention_mask[:, None, None, :].bool()) | (key_pos == query_pos)
    return allowed, False


class SemVIEModel(nn.Module):
    """The SemVIE stack over a Qwen base model (`qwen.model`): same names, experts added.

    It takes embeddings (MarsModel owns the text/image embedding split) and returns the final
    hidden states, normalised by the shared norm (or, with `visual_norms`, a visual one at image
    positions).
    """

    def __init__(self, qwen_model: nn.Module, visual_norms: bool = False):
        super().__init__()
        self.config = qwen_model.config
        self.embed_tokens = qwen_model.embed_tokens  # frozen text embedding, kept for its HF name
        self.layers = nn.ModuleList(SemVIELayer(layer, i, visual_norms) for i, layer in enumerate(qwen_model.layers))
        self.norm = qwen_model.norm
        self.visual_norm = mirror(qwen_model.norm) if visual_norms else None
        self.rotary_emb = qwen_model.rotary_emb
        # Memory levers, set by mars.model.configure_memory; neither changes the result beyond rounding.
        # Recompute each layer in backward, keeping only its input: activations shrink from a few
        # dozen (B, T, D)-sized tensors per layer to one.
        self.activation_checkpointing = False
        # The dtype of frozen weights held below the experts' fp32 (bf16): the stack then runs under
        # autocast to it, with an fp32 residual stream. None: one dtype throughout, no autocast.
        self.autocast_dtype: torch.dtype | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to `autocast_dtype` (frozen bf16 weights beside fp32 experts), else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.norm.weight.device.type, dtype=self.autocast_dtype)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        attn = self.layers[0].self_attn
        weight = attn.k_proj.weight
        return KVCache(len(self.layers), batch_size, self.config.num_key_value_heads, attn.head_dim, max_length,
                       dtype=weight.dtype, device=weight.device)

    def rotary(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE cos, sin (B, T, hd) for position_ids (B or 1, T): a sampler computes every step's
        once and passes slices as `rope` (each entry depends on its position only, so it is exact)."""
        return self.rotary_emb(self.norm.weight, position_ids)  # the tensor only lends dtype and device

    def forward(self, inputs_embeds: Tensor, router: ModalityRouter, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, cache: KVCache | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """`rope`: precomputed cos, sin (B, T, hd) for these positions; position_ids are then unused."""
        with self.autocast():
            return self._forward(inputs_embeds, router, position_ids, attention_mask, cache, rope)

    def _forward(self, inputs_embeds: Tensor, router: ModalityRouter, position_ids: Tensor | None,
                 attention_mask: Tensor | None, cache: KVCache | None, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = inputs_embeds  # (B, T, D)
        if self.autocast_dtype is not None:
            x = x.float()  # mixed precision: the residual stream stays fp32, matmuls run in bf16
        num_new = x.shape[1]
        past = cache.length if cache is not None else 0
        if rope is None:
            if position_ids is None:
                padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
                position_ids = default_position_ids(padding, num_new, past, x.device)
            rope = self.rotary(position_ids)  # cos, sin (B, T, hd)
        rope = rope_tables(*rope)  # (B, 1, T, hd) twice, shared by every layer
        mask, is_causal = resolve_attention_mask(attention_mask, num_new, past, x.device)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # non-reentrant: takes the router and the mask as they are, keeps autocast and RNG
                x = checkpoint(layer, x, router, rope, mask, is_causal, cache, use_reentrant=False)
            else:
                x = layer(x, router, rope, mask, is_causal, cache)
        if cache is not None:
            cache.advance(num_new)
        return routed_norm(x, router, self.norm, self.visual_norm)
