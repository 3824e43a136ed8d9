"""Sampler tests: KV-cached decoding equals full recompute, CFG, seeds, batch-mates, captions, overfit.

Tiny random Qwen2 / Qwen3 models built here with transformers (fp32, CPU).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_sampling.py -q
"""

import pytest
import torch
from transformers import ByT5Tokenizer

from mars import (
    MarsConfig,
    MarsModel,
    build_batch,
    caption_images,
    caption_nll,
    generate,
    generate_images,
    sample_logits,
    trainable_parameters,
)

ARCHS = ["tiny-qwen2", "tiny-qwen3"]
PROMPTS = [[5], [6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]  # different lengths: left padding


def tiny(name: str = "tiny-qwen3", **overrides) -> MarsModel:
    """A tiny model that looks trained: codes told apart (at init all share the mean embedding)
    and a confident image head (at init its logits are near zero)."""
    torch.manual_seed(0)
    model = MarsModel.from_config(MarsConfig.from_name(name, **overrides)).eval()
    with torch.no_grad():
        model.image_embed.weight.normal_()
        model.image_head.weight.normal_(0.0, 0.5)
    return model


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full_forward_image_logits(model: MarsModel, prefix: list[int], codes: torch.Tensor) -> torch.Tensor:
    """Image logits that predicted each code, from one uncached forward: (h*w, codebook)."""
    ids = torch.tensor([prefix + model.codes_to_tokens(codes).tolist()])
    with torch.no_grad():
        image_logits = model(ids).image_logits[0]
    return image_logits[len(prefix) - 1:len(prefix) - 1 + len(codes)]


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("guidance_scale", [None, 3.0])
@pytest.mark.parametrize("rope_2d", [False, True])
def test_cached_decoding_reproduces_full_forward_logits(name, guidance_scale, rope_2d):
    model = tiny(name, image_rope_2d=rope_2d)
    prefixes = [p + [model.boi_token_id] for p in PROMPTS]
    uncond = [[model.boi_token_id]] * len(prefixes) if guidance_scale else None
    codes, logits = generate(model, prefixes, uncond_prefixes=uncond, guidance_scale=guidance_scale or 1.0,
                             generator=seeded(), return_logits=True)
    assert codes.shape == (3, 64) and logits.shape == (3, 64, 64)
    for row, prefix in enumerate(prefixes):
        expected = full_forward_image_logits(model, prefix, codes[row])
        if guidance_scale:
            unconditional = full_forward_image_logits(model, uncond[row], codes[row])
            expected = expected + (guidance_scale - 1) * (expected - unconditional)
        assert (logits[row] - expected).abs().max() <= 1e-4


def test_cached_decoding_of_a_16x16_grid():
    model = tiny("tiny-qwen2", image_grid=(16, 16))
    prefix = [5, 6, model.boi_token_id]
    codes, logits = generate(model, [prefix], generator=seeded(), return_logits=True)
    assert codes.shape == (1, 256)
    assert (logits[0] - full_forward_image_logits(model, prefix, codes[0])).abs().max() <= 1e-4


def test_guidance_scale_one_equals_the_conditional_result():
    model = tiny()
    prefixes = [p + [model.boi_token_id] for p in PROMPTS]
    conditional, cond_logits = generate(model, prefixes, generator=seeded(), return_logits=True)
    guided, guided_logits = generate(model, prefixes, uncond_prefixes=[[model.boi_token_id]] * 3,
                                     guidance_scale=1.0, generator=seeded(), return_logits=True)
    assert torch.equal(guided, conditional)
    assert (guided_logits - cond_logits).abs().max() <= 1e-5
    strong = generate(model, prefixes, uncond_prefixes=[[model.boi_token_id]] * 3, guidance_scale=5.0,
                      generator=seeded())
    assert not torch.equal(strong, conditional)  # guidance does something


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_same_seed_same_codes_and_batch_mates_do_not_matter(guidance_scale):
    model = tiny()
    kwargs = dict(guidance_scale=guidance_scale, top_k=32, top_p=0.95)
    first = generate_images(model, PROMPTS[1:2], generator=seeded(7), **kwargs)
    assert first.shape == (1, 8, 8)
    assert torch.equal(generate_images(model, PROMPTS[1:2], generator=seeded(7), **kwargs), first)
    assert not torch.equal(generate_images(model, PROMPTS[1:2], generator=seeded(8), **kwargs), first)
    # Same seed, same row, a shorter or a longer batch-mate: the row's image does not change.
    with_short = generate_images(model, [PROMPTS[1], PROMPTS[0]], generator=seeded(7), **kwargs)
    with_long = generate_images(model, [PROMPTS[1], PROMPTS[2]], generator=seeded(7), **kwargs)
    assert torch.equal(with_short[0], with_long[0])
    greedy = dict(guidance_scale=guidance_scale, temperature=0.0)
    alone = generate_images(model, PROMPTS[2:], **greedy)
    assert torch.equal(generate_images(model, PROMPTS, **greedy)[2], alone[0])


def test_sample_logits_greedy_top_k_top_p_and_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    best = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, temperature=0.0), best)
    assert torch.equal(sample_logits(logits, top_k=1, generator=seeded(1)), best)
    assert torch.equal(sample_logits(logits, top_p=1e-6, generator=seeded(2)), best)
    top3 = logits.topk(3, dim=-1).indices
    draws = torch.stack([sample_logits(logits, top_k=3, generator=seeded(s)) for s in range(50)], dim=1)
    assert (draws[:, :, None] == top3[:, None, :]).any(-1).all()
    two_way = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]]).expand(4000, 2)  # p = (0.25, 0.75)
    assert abs(sample_logits(two_way, generator=seeded(3)).float().mean().item() - 0.75) < 0.03


def test_callback_sees_every_step_with_the_codes_so_far():
    model = tiny()
    seen = []
    codes = generate_images(model, PROMPTS[:2], generator=seeded(),
                            callback=lambda step, total, so_far: seen.append((step, total, so_far.clone())))
    assert [(step, total) for step, total, _ in seen] == [(i, 64) for i in range(64)]
    for step, _, so_far in seen:
        assert torch.equal(so_far, codes.flatten(1)[:, :step + 1])


def test_prompts_as_english_and_chinese_strings_through_a_pretrained_tokenizer():
    model = tiny()
    tokenizer = ByT5Tokenizer()  # a real PreTrainedTokenizer that needs no files (bytes)
    prompts = ["two blue squares", "两个蓝色的正方形"]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    from_strings = generate_images(model, prompts, tokenizer, guidance_scale=2.0, generator=seeded())
    assert torch.equal(from_strings, generate_images(model, ids, guidance_scale=2.0, generator=seeded()))


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("rope_2d", [False, True])
def test_greedy_caption_equals_full_recompute_and_stops_at_eos(name, rope_2d):
    model = tiny(name, image_grid=(4, 4), image_rope_2d=rope_2d)
    codes = torch.randint(0, 64, (2, 4, 4), generator=seeded())
    captions = caption_images(model, codes, max_new_tokens=6, eos_token_id=[])
    for row in range(2):
        ids = [model.boi_token_id, *model.codes_to_tokens(codes[row].flatten()).tolist(), model.eoi_token_id]
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert captions[row] == ids[-6:]
    stop = captions[0][2]
    first_stop = captions[0].index(stop)
    stopped = caption_images(model, codes, max_new_tokens=6, eos_token_id=stop)
    assert stopped[0] == captions[0][:first_stop]


def test_caption_nll_is_the_teacher_forced_caption_loss_of_each_row_alone():
    model = tiny("tiny-qwen3", image_grid=(4, 4))
    codes = torch.randint(0, 64, (3, 4, 4), generator=seeded(2))
    nll = caption_nll(model, codes, PROMPTS)  # captions of three lengths: right padding
    assert nll.shape == (3,)
    for row, caption in enumerate(PROMPTS):
        batch = build_batch(model, [caption], codes[row:row + 1], task="i2t")
        with torch.no_grad():
            mean = model(**batch).text_loss  # over the caption and its eos
        torch.testing.assert_close(nll[row], mean * (len(caption) + 1), rtol=1e-5, atol=1e-5)


def test_tiny_model_overfits_fixed_grids_and_greedy_sampling_returns_them():
    torch.manual_seed(0)
    model = MarsModel.from_config(MarsConfig.from_name("tiny-qwen3"))
    prompts = [[5, 6], [7], [8, 9, 10], [11, 12]]
    grids = torch.randint(0, 64, (4, 8, 8), generator=seeded(1))
    batch = build_batch(model, prompts, grids)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=3e-3)
    for _ in range(300):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05
    model.eval()
    assert torch.equal(generate_images(model, prompts, temperature=0.0), grids)


def test_bad_sampler_input_gets_clear_errors():
    model = tiny()
    boi = model.boi_token_id
    with pytest.raises(ValueError, match="end with <boi>"):
        generate(model, [[5, 6]])
    with pytest.raises(ValueError, match="one per prefix"):
        generate(model, [[5, boi], [6, boi]], uncond_prefixes=[[boi]], guidance_scale=2.0)
    with pytest.raises(ValueError, match="tokenizer="):
        generate_images(model, ["a red circle"])
