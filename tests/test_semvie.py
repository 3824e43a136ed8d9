"""SemVIE layer tests on tiny random Qwen2 / Qwen3 models (fp32, CPU).

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_semvie.py -q
"""

import copy

import pytest
import torch
from torch import nn

from mars import KVCache, MarsConfig, MarsModel, ModalityRouter, build_qwen, is_trainable

ARCHS = ["tiny-qwen2", "tiny-qwen3"]


def tiny(name: str, **overrides) -> tuple[nn.Module, MarsModel]:
    """(an untouched copy of the Qwen, the MarsModel wrapping the original)."""
    torch.manual_seed(0)
    config = MarsConfig.from_name(name, **overrides)
    qwen = build_qwen(config.text_config)
    return copy.deepcopy(qwen).eval(), MarsModel.from_qwen(qwen, config).eval()


def mixed_sequence(model: MarsModel, prompt: list[int], codes: list[int], caption: list[int]) -> torch.Tensor:
    image = [model.boi_token_id, *model.codes_to_tokens(torch.tensor(codes)).tolist(), model.eoi_token_id]
    return torch.tensor([prompt + image + caption])


@pytest.mark.parametrize("name", ARCHS)
def test_qwen_checkpoint_loads_strictly_and_experts_mirror_it(name):
    qwen, model = tiny(name)
    result = model.load_state_dict(qwen.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(k for k in model.state_dict() if is_trainable(k))
    params = dict(model.named_parameters())
    for text_name in [k for k in params if ".self_attn." in k or ".mlp." in k]:
        visual_name = text_name.replace(".self_attn.", ".visual_attn.").replace(".mlp.", ".visual_mlp.")
        assert torch.equal(params[visual_name], params[text_name])  # initialised from the text weights
        assert params[visual_name].data_ptr() != params[text_name].data_ptr()  # ...but their own
    has_bias, has_qk_norm = name == "tiny-qwen2", name == "tiny-qwen3"
    assert ("model.layers.0.visual_attn.q_proj.bias" in params) == has_bias
    assert ("model.layers.0.visual_attn.q_norm.weight" in params) == has_qk_norm
    assert "model.layers.1.visual_mlp.gate_proj.weight" in params


def test_router_equals_running_both_paths_and_selecting():
    torch.manual_seed(0)
    text_fn, image_fn = nn.Linear(8, 5), nn.Linear(8, 5)
    x = torch.randn(3, 7, 8)
    image_mask = torch.rand(3, 7) > 0.5
    expected = torch.where(image_mask[..., None], image_fn(x), text_fn(x))
    router = ModalityRouter(image_mask)
    assert torch.allclose(router(x, text_fn, image_fn), expected, atol=1e-6)
    pair = router(x, lambda h: (text_fn(h), -text_fn(h)), lambda h: (image_fn(h), -image_fn(h)))
    assert torch.allclose(pair[1], -expected, atol=1e-6)
    assert torch.equal(ModalityRouter(torch.zeros(3, 7, dtype=torch.bool))(x, text_fn, image_fn), text_fn(x))
    assert torch.equal(ModalityRouter(torch.ones(3, 7, dtype=torch.bool))(x, text_fn, image_fn), image_fn(x))


@pytest.mark.parametrize("name", ARCHS)
def test_one_attention_image_reads_text_and_later_text_reads_image(name):
    _, model = tiny(name)
    with torch.no_grad():  # as after training: at init every code has the same (mean) embedding
        model.image_embed.weight.normal_()
    codes = list(range(64))
    base = mixed_sequence(model, [5, 6, 7], codes, [9, 10, 11])
    other_prompt = mixed_sequence(model, [5, 6, 8], codes, [9, 10, 11])
    other_code = mixed_sequence(model, [5, 6, 7], codes[:30] + [63] + codes[31:], [9, 10, 11])
    with torch.no_grad():
        h, h_prompt, h_code = (model.hidden_states(ids)[0] for ids in (base, other_prompt, other_code))
    changed_code_at = 3 + 1 + 30  # prompt + <boi> + 30 codes
    assert not torch.allclose(h[4:], h_prompt[4:])  # image positions read the prompt
    assert torch.equal(h[:changed_code_at], h_code[:changed_code_at])  # causal: the past is untouched
    assert not torch.allclose(h[-3:], h_code[-3:])  # later text reads the image


@pytest.mark.parametrize("name", ARCHS)
def test_explicit_bool_and_additive_masks_equal_default_causal(name):
    _, model = tiny(name)
    ids = mixed_sequence(model, [5, 6, 7], list(range(64)), [9])
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)
    additive = torch.zeros(1, 1, length, length).masked_fill(~causal, float("-inf"))
    with torch.no_grad():
        default = model.hidden_states(ids)
        assert torch.allclose(model.hidden_states(ids, attention_mask=causal), default, atol=1e-5)
        assert torch.allclose(model.hidden_states(ids, attention_mask=additive), default, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_cache_serves_multi_token_steps_under_a_block_causal_mask(name):
    """What group-parallel (super-resolution) decoding needs: 4-token steps through the cache."""
    _, model = tiny(name)
    prefix, group, groups = 5, 4, 3
    ids = mixed_sequence(model, [5, 6, 7, 8], list(range(group * groups)), [])[:, :prefix + group * groups]
    length = ids.shape[1]
    position = torch.arange(length)
    block = torch.where(position < prefix, position, prefix + (position - prefix) // group)  # prefix: causal
    mask = (block[None, :] <= block[:, None])[None, None]  # (1, 1, T, T) block-causal
    with torch.no_grad():
        full = model.hidden_states(ids, attention_mask=mask)
        cache = model.new_cache(1, length)
        steps = [model.hidden_states(ids[:, :prefix], cache=cache)]
        for start in range(prefix, length, group):
            rows = mask[:, :, start:start + group, :start + group]
            steps.append(model.hidden_states(ids[:, start:start + group], attention_mask=rows, cache=cache,
                                             position_ids=torch.arange(start, start + group)[None],
                                             codes_before=start - prefix))
    assert not torch.allclose(full, model.hidden_states(ids))  # the group mask matters
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_left_padded_rows_equal_unpadded_ones(name):
    _, model = tiny(name)
    short = mixed_sequence(model, [5], list(range(64)), [])
    long = mixed_sequence(model, [5, 6, 7, 8, 9], list(range(64)), [])
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[0, :pad] = False
    with torch.no_grad():
        padded = model.hidden_states(batch, attention_mask=mask)
        assert torch.allclose(padded[0, pad:], model.hidden_states(short)[0], atol=1e-5)
        assert torch.allclose(padded[1], model.hidden_states(long)[0], atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_visual_norms_switch_adds_trainable_norms_and_keeps_text_exact(name):
    qwen, model = tiny(name, visual_norms=True)
    params = dict(model.named_parameters())
    for norm in ["model.layers.0.visual_input_layernorm.weight",
                 "model.layers.1.visual_post_attention_layernorm.weight", "model.visual_norm.weight"]:
        assert params[norm].requires_grad
    ids = mixed_sequence(model, [5, 6], list(range(64)), [7])
    with torch.no_grad():
        params["model.visual_norm.weight"].mul_(2.0)  # now the visual norm differs from the shared one
        text = torch.randint(0, 512, (2, 9))
        assert torch.allclose(model(text).logits, qwen(text).logits, atol=1e-5)
    model.hidden_states(ids)[0, 3:].pow(2).mean().backward()
    assert params["model.layers.0.visual_input_layernorm.weight"].grad.abs().sum() > 0
    assert model.model.norm.weight.grad is None


def test_cache_overflow_and_sliding_window_are_clear_errors():
    cache = KVCache(1, 1, 2, 4, max_length=3)
    cache.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    cache.advance(3)
    with pytest.raises(ValueError, match="larger max_length"):
        cache.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    config = MarsConfig.from_name("tiny-qwen2")
    sliding = dict(config.text_config, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding-window"):
        MarsModel.from_qwen(build_qwen(sliding), config)
