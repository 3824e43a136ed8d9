"""Super-resolution tests: group mask, cached group decoding = full forward, k = 1 = next-token
prediction, sampler features, checkpoints, training (plain torch and the stage-3 Lightning YAML).

Tiny random Qwen2 / Qwen3 models (fp32, CPU); a 4x4 low grid -> 8x8 high grid (64 codes).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_superres.py -q
"""

import pytest
import torch
from transformers import ByT5Tokenizer

from mars import MarsConfig, MarsModel, is_trainable
from mars.model import pad_sequences
from mars.semvie import ModalityRouter
from mars.superres import (
    SUPERRES_WEIGHTS_NAME,
    SuperResConfig,
    SuperResModel,
    build_superres_batch,
    from_group_order,
    generate_groups,
    group_attention_mask,
    sequence_groups,
    slot_layout,
    to_group_order,
    upsample_codes,
)

ARCHS = ["tiny-qwen2", "tiny-qwen3"]
GROUP_SIZES = [1, 4, 16]
PROMPTS = [[5], [6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]  # different lengths: left padding


def tiny(group_size: int = 4, name: str = "tiny-qwen3", seed: int = 0) -> SuperResModel:
    """A tiny model that looks trained: codes told apart, a confident head, a non-trivial group projection."""
    torch.manual_seed(seed)
    model = SuperResModel.from_config(SuperResConfig(low_grid=(4, 4), group_size=group_size),
                                      MarsConfig.from_name(name)).eval()
    with torch.no_grad():
        model.mars.image_embed.weight.normal_()
        model.mars.image_head.weight.normal_(0.0, 0.5)
        model.image_group_proj.weight.normal_(0.0, 0.3)
        model.image_start_embed.normal_()
    return model


def codes(shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full_logits(model: SuperResModel, prompts, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    ids, mask = pad_sequences(prompts, pad_id=0, side="left")
    with torch.no_grad():
        return model(ids, mask, low, high).logits


# --- configuration and layout -----------------------------------------------------------------

def test_group_shapes_and_steps():
    assert SuperResConfig((8, 8), 1).group_shape == (1, 1) and SuperResConfig((8, 8), 1).num_groups == 256
    assert SuperResConfig((8, 8), 4).group_shape == (2, 2) and SuperResConfig((8, 8), 4).num_groups == 64
    assert SuperResConfig((8, 8), 16).group_shape == (2, 8) and SuperResConfig((8, 8), 16).num_groups == 16
    assert SuperResConfig((8, 8), 32).group_shape == (2, 16)  # a whole row of blocks
    for bad in (0, 2, 3, 12, 64):
        with pytest.raises(ValueError, match="does not tile"):
            SuperResConfig((8, 8), bad)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_group_order_round_trips_and_slots_sit_under_their_parent(group_size):
    config = SuperResConfig((4, 4), group_size)
    grid = codes((2, 8, 8))
    order = to_group_order(grid, config)
    assert torch.equal(from_group_order(order, config), grid)
    parent, sub, group = slot_layout(config)
    rows, cols = torch.arange(8)[:, None].expand(8, 8), torch.arange(8)[None].expand(8, 8)
    raster = to_group_order((rows * 8 + cols)[None], config)[0]  # high raster index of each slot
    assert torch.equal(parent, (raster // 8 // 2) * 4 + (raster % 8) // 2)
    assert torch.equal(sub, (raster // 8 % 2) * 2 + raster % 2)
    assert torch.equal(group, torch.arange(64) // group_size)
    if group_size == 4:  # group g is exactly the 2x2 block under low code g
        assert torch.equal(parent, torch.arange(16).repeat_interleave(4))
    if group_size == 1:  # k = 1 decodes in plain raster order
        assert torch.equal(raster, torch.arange(64))


# --- the mask ---------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_group_mask_shape_and_causality(group_size):
    config = SuperResConfig((4, 4), group_size)
    prompt_mask = torch.tensor([[False, False, True], [True, True, True]])  # row 0 left-padded
    prefix = 3 + 1 + 16
    valid = torch.cat([prompt_mask, torch.ones(2, 17 + 64, dtype=torch.bool)], dim=1)
    groups = sequence_groups(prefix, slot_layout(config)[2])
    mask = group_attention_mask(groups, valid, prefix + 64)
    assert mask.shape == (2, 1, prefix + 64, prefix + 64) and mask.dtype == torch.bool
    slots = mask[:, 0, prefix:]  # (2, 64, L + 64)
    slot_group = torch.arange(64) // group_size
    expected = (slot_group[None, :] < slot_group[:, None]) | torch.eye(64, dtype=torch.bool)
    assert torch.equal(slots[:, :, prefix:], expected.expand(2, 64, 64))  # earlier groups and itself only
    later = slot_group[None, :] > slot_group[:, None]
    assert not slots[:, :, prefix:][later.expand(2, 64, 64)].any()  # no slot sees a later group
    mates = (slot_group[None, :] == slot_group[:, None]) & ~torch.eye(64, dtype=torch.bool)
    assert not slots[:, :, prefix:][mates.expand(2, 64, 64)].any()  # group-mates never see each other
    assert torch.equal(slots[:, :, :prefix], valid[:, None, :prefix].expand(2, 64, prefix))  # all real prefix
    prefix_rows = mask[1, 0, :prefix, :prefix]
    assert torch.equal(prefix_rows, torch.ones(prefix, prefix, dtype=torch.bool).tril())  # causal prefix
    assert not mask[:, 0, :prefix, prefix:].any()  # the prefix never reads the high-resolution codes
    # The cached decoder asks for the last k rows over the keys so far: the same rows.
    step = group_attention_mask(groups[:prefix + 2 * group_size], valid[:, :prefix + 2 * group_size], group_size)
    assert torch.equal(step, mask[:, :, prefix + group_size:prefix + 2 * group_size, :prefix + 2 * group_size])


def test_k1_mask_is_the_causal_triangle():
    groups = sequence_groups(20, slot_layout(SuperResConfig((4, 4), 1))[2])
    mask = group_attention_mask(groups, torch.ones(1, 84, dtype=torch.bool), 84)
    assert torch.equal(mask[0, 0], torch.ones(84, 84, dtype=torch.bool).tril())


# --- k = 1 is next-token prediction; outputs only read earlier groups ---------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_k1_is_ordinary_next_token_prediction(name):
    """With k = 1 the model is a causal LM over [prompt][boi][low][sep][c_0 .. c_{N-2}]: the same
    embeddings through the stack's built-in causal path give the same logits and loss."""
    model = tiny(1, name)
    prompt, low, high = torch.tensor([[3, 4, 5, 6]]), codes((1, 4, 4)), codes((1, 8, 8), seed=1)
    with torch.no_grad():
        out = model(prompt, None, low, high)
        x_prefix, prefix_is_image, low_embeddings = model.embed_prefix(prompt, low)
        queries = model.slot_queries(low_embeddings)  # (1, 64, D)
        flat = high.flatten(1)  # k = 1 decodes in raster order
        previous = torch.cat([model.image_start_embed.expand(1, 1, -1),  # [sep], then code t - 1 at slot t
                              model.image_group_proj(model.mars.image_embed(flat[:, :-1]))], dim=1)
        x = torch.cat([x_prefix, queries + previous], dim=1)
        is_image = torch.cat([prefix_is_image, torch.ones(1, 64, dtype=torch.bool)], dim=1)
        hidden = model.mars.model(x, ModalityRouter(is_image))  # no mask: SDPA's own is_causal path
        logits = model.mars.image_head(hidden[:, -64:])
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits[0], flat[0]))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_a_code_only_reaches_later_groups(group_size):
    model = tiny(group_size)
    low, high = codes((1, 4, 4)), codes((1, 8, 8), seed=1)
    before = full_logits(model, [[5, 6]], low, high)
    order = to_group_order(high, model.config)
    slot = 2 * group_size + group_size // 2  # inside group 2
    order[0, slot] = (order[0, slot] + 1) % 64
    after = full_logits(model, [[5, 6]], low, from_group_order(order, model.config))
    unchanged = 3 * group_size  # groups 0..2, the changed slot's own group included
    assert torch.equal(before[:, :unchanged], after[:, :unchanged])
    assert not torch.allclose(before[:, unchanged:unchanged + group_size], after[:, unchanged:unchanged + group_size])


# --- cached decoding --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_cached_group_decoding_equals_the_full_forward(name, group_size, guidance_scale):
    model = tiny(group_size, name)
    low = codes((3, 4, 4))
    sampled, logits = generate_groups(model, PROMPTS, low, guidance_scale=guidance_scale or 1.0,
                                      generator=seeded(), return_logits=True)
    assert sampled.shape == (3, 64) and logits.shape == (3, 64, 64)
    high = from_group_order(sampled, model.config)
    expected = full_logits(model, PROMPTS, low, high)
    if guidance_scale:
        uncond = full_logits(model, [[]] * 3, low, high)
        expected = expected + (guidance_scale - 1.0) * (expected - uncond)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # Each row alone gives the same logits: batch-mates and their padding do not matter.
    alone = full_logits(model, PROMPTS[1:2], low[1:2], high[1:2])
    torch.testing.assert_close(full_logits(model, PROMPTS, low, high)[1:2], alone, rtol=1e-4, atol=1e-4)


def test_decoding_steps_are_groups():
    for group_size, steps in ((1, 64), (4, 16), (16, 4)):
        model, seen = tiny(group_size), []
        upsample_codes(model, [[5]], codes((1, 4, 4)), callback=lambda step, total, grid: seen.append(total))
        assert seen == [steps] * steps


# --- sampler features -------------------------------------------------------------------------

def test_guidance_scale_one_equals_conditional_and_seeds_repeat():
    model, low = tiny(), codes((3, 4, 4))
    plain = upsample_codes(model, PROMPTS, low, generator=seeded(1))
    assert torch.equal(upsample_codes(model, PROMPTS, low, guidance_scale=1.0, generator=seeded(1)), plain)
    assert not torch.equal(upsample_codes(model, PROMPTS, low, generator=seeded(2)), plain)
    guided = upsample_codes(model, PROMPTS, low, guidance_scale=3.0, top_k=5, top_p=0.9, generator=seeded(1))
    assert torch.equal(upsample_codes(model, PROMPTS, low, guidance_scale=3.0, top_k=5, top_p=0.9,
                                      generator=seeded(1)), guided)
    greedy = upsample_codes(model, PROMPTS, low, temperature=0.0)
    assert torch.equal(greedy, upsample_codes(model, PROMPTS, low, temperature=0.0, generator=seeded(5)))
    assert torch.equal(upsample_codes(model, PROMPTS, low, top_k=1, generator=seeded(3)), greedy)


def test_callback_grids_fill_group_by_group_from_the_parents():
    model, low = tiny(4), codes((2, 4, 4))
    grids = []
    result = upsample_codes(model, [[5], [6]], low, generator=seeded(),
                            callback=lambda step, total, grid: grids.append(grid.clone()))
    assert len(grids) == 16 and all(g.shape == (2, 8, 8) for g in grids)
    parents = low.repeat_interleave(2, 1).repeat_interleave(2, 2)  # nearest-neighbour upsampling
    assert torch.equal(grids[-1], result)
    order = to_group_order(grids[5], model.config)
    assert torch.equal(order[:, :24], to_group_order(result, model.config)[:, :24])  # groups 0..5 decoded
    assert torch.equal(order[:, 24:], to_group_order(parents, model.config)[:, 24:])  # the rest: parents


def test_string_prompts_in_english_and_chinese():
    model = tiny()
    out = upsample_codes(model, ["a red circle", "一个红色的圆形"], codes((2, 4, 4)), ByT5Tokenizer(),
                         guidance_scale=2.0, generator=seeded())
    assert out.shape == (2, 8, 8) and out.dtype == torch.long and 0 <= out.min() and out.max() < 64


def test_bad_input_gets_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"expected integer codes \(B, 4, 4\)"):
        upsample_codes(model, [[5]], codes((1, 8, 8)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 64\)"):
        upsample_codes(model, [[5]], codes((1, 4, 4)) + 64)
    with pytest.raises(ValueError, match="one prompt per grid"):
        upsample_codes(model, [[5], [6]], codes((1, 4, 4)))
    with pytest.raises(ValueError, match="pass tokenizer"):
        upsample_codes(model, ["a circle"], codes((1, 4, 4)))
    with pytest.raises(ValueError, match="image_grid"):
        SuperResModel(SuperResConfig((4, 4)), MarsModel.from_config(MarsConfig.from_name("tiny-qwen2")))


# --- checkpoints ------------------------------------------------------------------------------

def test_save_load_round_trip_and_only_trainable_weights(tmp_path):
    from safetensors.torch import load_file

    model, low, high = tiny(16, "tiny-qwen2"), codes((3, 4, 4)), codes((3, 8, 8))
    model.save_pretrained(tmp_path / "sr")
    loaded = SuperResModel.from_pretrained(tmp_path / "sr").eval()
    assert loaded.config == model.config
    assert torch.equal(full_logits(loaded, PROMPTS, low, high), full_logits(model, PROMPTS, low, high))
    own = load_file(tmp_path / "sr" / SUPERRES_WEIGHTS_NAME)
    assert set(own) == {"image_sub_embed.weight", "image_group_proj.weight", "image_start_embed"}
    assert all(is_trainable(name) for name in own)
    from transformers import AutoModelForCausalLM  # a shared, already loaded frozen Qwen

    qwen = AutoModelForCausalLM.from_pretrained(tmp_path / "sr" / "text_model")
    shared = SuperResModel.from_pretrained(tmp_path / "sr", qwen=qwen).eval()
    assert shared.mars.model.layers[0].self_attn is qwen.model.layers[0].self_attn
    assert torch.equal(full_logits(shared, PROMPTS, low, high), full_logits(model, PROMPTS, low, high))


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="superres_config.json not found"):
        SuperResModel.from_pretrained(tmp_path / "missing")
    tiny(4).save_pretrained(tmp_path / "k4")
    config_path = tmp_path / "k4" / "superres_config.json"
    config_path.write_text(config_path.read_text().replace('"group_size": 4', '"group_size": 16'))
    with pytest.raises(ValueError, match="does not match group_size=16"):
        SuperResModel.from_pretrained(tmp_path / "k4")
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid SuperResConfig"):
        SuperResModel.from_pretrained(tmp_path / "k4")


# --- training ---------------------------------------------------------------------------------

def test_batch_builder_noise_and_caption_dropout():
    model, low, high = tiny(), codes((8, 4, 4)), codes((8, 8, 8))
    texts = [[5, 6]] * 8
    clean = build_superres_batch(model, texts, low, high)
    assert torch.equal(clean["low_codes"], low) and clean["prompt_mask"].all()
    noisy = build_superres_batch(model, texts, low, high, low_code_noise=0.5, caption_dropout=0.5,
                                 generator=seeded())
    changed = (noisy["low_codes"] != low).float().mean()
    assert 0.3 < changed < 0.6 and torch.equal(noisy["high_codes"], high)  # targets are never corrupted
    kept = noisy["prompt_mask"].any(1)
    assert 0 < kept.sum() < 8
    again = build_superres_batch(model, texts, low, high, low_code_noise=0.5, caption_dropout=0.5, generator=seeded())
    assert all(torch.equal(noisy[key], again[key]) for key in noisy)


def test_history_noise_corrupts_what_groups_read_never_the_targets():
    model, low, high = tiny().eval(), codes((4, 4, 4)), codes((4, 8, 8))
    texts = [[5, 6]] * 4
    clean = build_superres_batch(model, texts, low, high)
    assert "history_codes" not in clean  # forward reads the targets themselves
    noisy = build_superres_batch(model, texts, low, high, history_noise=0.5, generator=seeded())
    changed = (noisy["history_codes"] != high).float().mean()
    assert 0.3 < changed < 0.6 and torch.equal(noisy["high_codes"], high) and torch.equal(noisy["low_codes"], low)
    with torch.no_grad():
        exact, same = model(**clean), model(**clean, history_codes=high)
        corrupted = model(**noisy)
    assert torch.equal(exact.logits, same.logits)
    # Group 0 reads the start embedding, not a predecessor: only later groups see the corruption.
    k = model.config.group_size
    assert torch.equal(corrupted.logits[:, :k], exact.logits[:, :k])
    assert not torch.allclose(corrupted.logits[:, k:], exact.logits[:, k:])


def test_backward_reaches_only_the_trainable_parts():
    model = tiny().train()
    batch = build_superres_batch(model, PROMPTS, codes((3, 4, 4)), codes((3, 8, 8)))
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if is_trainable(name):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


@pytest.mark.parametrize("group_size", [1, 4])
def test_tiny_model_overfits_and_greedy_group_decoding_returns_the_targets(group_size):
    torch.manual_seed(0)
    model = SuperResModel.from_config(SuperResConfig((4, 4), group_size), MarsConfig.from_name("tiny-qwen3"))
    low, high = codes((2, 4, 4)), codes((2, 8, 8), seed=1)
    batch = build_superres_batch(model, [[5, 6], [7]], low, high)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.eval()
    assert torch.equal(upsample_codes(model, [[5, 6], [7]], low, temperature=0.0), high)


def _stage_dirs(tmp_path):
    """Real inputs of the superres stage at tiny sizes: a Qwen directory with tokenizer files, a stage-2 export
    and a codes directory from a tiny VQ (f = 4: 16 px -> 4x4, 32 px -> 8x8 codes)."""
    from mars.model import build_qwen
    from train.codes import extract_codes
    from vq import VQConfig, VQTokenizer

    torch.manual_seed(0)
    text = tmp_path / "text"
    build_qwen(MarsConfig.from_name("tiny-qwen2").text_config).save_pretrained(text)
    ByT5Tokenizer().save_pretrained(text)  # ids < 384 fit the tiny vocabulary
    stage2 = MarsModel.from_qwen(text, MarsConfig(codebook_size=64, image_grid=(4, 4)))
    with torch.no_grad():
        stage2.image_embed.weight.normal_()
    stage2.save_pretrained(tmp_path / "stage2", store_text_model=False)
    VQTokenizer(VQConfig.from_name("tiny")).save_pretrained(tmp_path / "vq")
    extract_codes(tmp_path / "vq", tmp_path / "codes", n=12, sizes=(16, 32), batch_size=12)
    return text, tmp_path / "stage2", tmp_path / "codes"


def test_superres_yaml_fits_from_stage2_and_exports(tmp_path):
    from train.__main__ import main as train_main

    text, stage2, codes_dir = _stage_dirs(tmp_path)
    overrides = ["--model.init_args.text_model", str(text), "--model.init_args.init_from", str(stage2),
                 "--model.init_args.codebook_size", "64", "--model.init_args.low_grid", "[4, 4]",
                 "--model.init_args.optim", "{lr: 0.003, warmup_steps: 1}",
                 "--model.init_args.export_dir", str(tmp_path / "export"),
                 "--data.init_args.path", str(codes_dir), "--data.init_args.low_size", "16",
                 "--data.init_args.high_size", "32", "--data.init_args.batch_size", "4",
                 "--data.init_args.val_items", "4", "--data.init_args.val_batches", "1",
                 "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.precision", "32",
                 "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.callbacks", "[]",
                 "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path)]
    start = MarsModel.from_pretrained(stage2)
    cli = train_main(["fit", "--config", "train/configs/shapes_superres.yaml", *overrides])
    assert cli.trainer.global_step == 3 and "val/token_accuracy" in cli.trainer.callback_metrics
    trained = cli.model.model.eval()
    # Started from stage 2: the frozen Qwen is the same, the trained code embeddings moved away from stage 2's.
    frozen = trained.mars.model.layers[0].mlp.up_proj.weight
    assert not frozen.requires_grad and torch.equal(frozen, start.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(trained.mars.image_embed.weight, start.image_embed.weight)
    assert (trained.mars.image_embed.weight - start.image_embed.weight).abs().max() < 0.1
    exported = SuperResModel.from_pretrained(tmp_path / "export").eval()
    assert exported.config == SuperResConfig((4, 4), 4)
    low, high = codes((2, 4, 4)), codes((2, 8, 8))
    assert torch.equal(full_logits(exported, [[5], [6, 7]], low, high), full_logits(trained, [[5], [6, 7]], low, high))


def test_superres_checkpoint_holds_only_trainable_weights_and_resumes(tmp_path):
    import lightning as L

    from train.superres import SuperResCodesDataModule, SuperResLitModule

    text, _, codes_dir = _stage_dirs(tmp_path)
    data = dict(path=str(codes_dir), low_size=16, high_size=32, batch_size=4, val_items=4, val_batches=1)
    module = dict(text_model=str(text), codebook_size=64, low_grid=(4, 4), group_size=16)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(SuperResLitModule(**module), SuperResCodesDataModule(**data))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(is_trainable(name) for name in state) and "model.image_group_proj.weight" in state
    # Resuming at the saved step trains nothing more: the weights must be the checkpoint's.
    resumed = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    fresh = SuperResLitModule(**module)
    assert not torch.equal(fresh.model.image_group_proj.weight, state["model.image_group_proj.weight"])
    resumed.fit(fresh, SuperResCodesDataModule(**data), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 2
    assert all(torch.equal(fresh.state_dict()[name], tensor) for name, tensor in state.items())
    # The same checkpoint also starts a new run (init_from a .ckpt).
    started = SuperResLitModule(**module, init_from=str(tmp_path / "last.ckpt"))
    assert torch.equal(started.model.image_group_proj.weight, state["model.image_group_proj.weight"])
    with pytest.raises(ValueError, match="another group_size"):
        SuperResLitModule(**{**module, "group_size": 4}, init_from=str(tmp_path / "last.ckpt"))
    with pytest.raises(ValueError, match="not twice"):
        SuperResCodesDataModule(**{**data, "low_size": 32, "high_size": 16}).setup("fit")
    with pytest.raises(FileNotFoundError, match="init_from="):
        SuperResLitModule(**module, init_from=str(tmp_path / "nowhere"))
