"""MarsModel tests: frozen text path, what trains, batches, checkpoints, parameter counts.

Tiny random Qwen2 / Qwen3 models built here with transformers (fp32, CPU).
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_model.py -q
"""

import copy

import pytest
import torch
from transformers import ByT5Tokenizer

from mars import (
    MODEL_PRESETS,
    MarsConfig,
    MarsModel,
    apply_trainable_filter,
    build_batch,
    build_qwen,
    is_trainable,
    parameter_report,
    trainable_parameters,
    trainable_state_dict,
)
from mars.model import CONFIG_NAME, IGNORE_INDEX, TEXT_MODEL_DIR, WEIGHTS_NAME

ARCHS = ["tiny-qwen2", "tiny-qwen3"]


def tiny(name: str, **overrides):
    """(an untouched copy of the Qwen, the MarsModel wrapping the original)."""
    torch.manual_seed(0)
    config = MarsConfig.from_name(name, **overrides)
    qwen = build_qwen(config.text_config)
    return copy.deepcopy(qwen).eval(), MarsModel.from_qwen(qwen, config)


def t2i_batch(model: MarsModel, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.config.codebook_size, (3, *model.config.image_grid), generator=generator)
    return build_batch(model, [[5, 6, 7], [8], [9, 10]], codes)


def mixed_ids(model: MarsModel) -> torch.Tensor:
    image = model.codes_to_tokens(torch.arange(model.config.num_image_tokens) % model.config.codebook_size)
    return torch.cat([torch.tensor([5, 6, model.boi_token_id]), image, torch.tensor([model.eoi_token_id, 9])])[None]


@pytest.mark.parametrize("name", ARCHS)
def test_text_logits_equal_qwen_before_and_after_training_on_images(name):
    qwen, model = tiny(name)
    text = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = qwen(text).logits
        assert (model(text).logits - reference).abs().max() <= 1e-5
    expert_before = model.model.layers[0].visual_mlp.up_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        model(**t2i_batch(model, seed=step)).loss.backward()
        optimizer.step()
    assert not torch.equal(model.model.layers[0].visual_mlp.up_proj.weight, expert_before)  # it trained
    with torch.no_grad():
        assert (model(text).logits - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("name,visual_norms", [("tiny-qwen2", False), ("tiny-qwen3", False), ("tiny-qwen3", True)])
def test_backward_reaches_visual_experts_and_never_the_qwen(name, visual_norms):
    _, model = tiny(name, visual_norms=visual_norms)
    model(**t2i_batch(model)).loss.backward()
    experts = 0
    for param_name, param in model.named_parameters():
        if not is_trainable(param_name):
            assert param.grad is None, param_name
        elif ".visual_" in param_name:
            assert param.grad is not None and param.grad.abs().sum() > 0, param_name
            experts += 1
    assert experts == len(model.model.layers) * (10 if name == "tiny-qwen2" else 9) + (5 if visual_norms else 0)


def test_one_filter_serves_requires_grad_optimizer_and_checkpoint(tmp_path):
    _, model = tiny("tiny-qwen2", visual_norms=True)
    names = {name for name, _ in model.named_parameters()}
    trainable = {name for name in names if is_trainable(name)}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert set(trainable_state_dict(model)) == trainable
    assert {"image_embed.weight", "image_head.weight", "image_row_embed.weight", "model.visual_norm.weight"} <= trainable
    assert not any(n.startswith(("model.embed_tokens", "lm_head", "model.norm")) for n in trainable)
    for param in model.parameters():  # the filter also restores a model someone unfroze
        param.requires_grad_(True)
    apply_trainable_filter(model)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    model.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as saved:
        assert set(saved.keys()) == trainable


def test_image_embedding_starts_at_the_mean_text_embedding():
    _, model = tiny("tiny-qwen3")
    mean = model.model.embed_tokens.weight.mean(0)
    assert model.image_embed.weight.shape == (64 + 2, 64)
    assert torch.allclose(model.image_embed.weight, mean.expand(66, -1))


def trained_copy(model: MarsModel) -> MarsModel:
    """Give the experts non-initial values so a round trip has something to lose."""
    with torch.no_grad():
        for param in trainable_parameters(model):
            param.add_(torch.randn_like(param) * 0.1)
    return model


def test_round_trip_with_the_qwen_stored(tmp_path):
    _, model = tiny("tiny-qwen3")
    trained_copy(model).eval()
    model.save_pretrained(tmp_path / "mars")
    assert (tmp_path / "mars" / TEXT_MODEL_DIR / "config.json").is_file()
    loaded = MarsModel.from_pretrained(tmp_path / "mars").eval()
    ids = mixed_ids(model)
    with torch.no_grad():
        before, after = model(ids), loaded(ids)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.image_logits, after.image_logits)


def test_round_trip_with_the_qwen_referenced_by_path(tmp_path):
    torch.manual_seed(0)
    config = MarsConfig.from_name("tiny-qwen2", image_grid=(4, 4))
    build_qwen(config.text_config).save_pretrained(tmp_path / "qwen")
    model = trained_copy(MarsModel.from_qwen(tmp_path / "qwen", config)).eval()
    assert model.config.text_model == str((tmp_path / "qwen").resolve())
    model.save_pretrained(tmp_path / "mars")
    assert not (tmp_path / "mars" / TEXT_MODEL_DIR).exists()  # only the experts were written
    loaded = MarsModel.from_pretrained(tmp_path / "mars").eval()
    ids = mixed_ids(model)
    with torch.no_grad():
        assert torch.equal(model(ids).image_logits, loaded(ids).image_logits)


def one_line_error(error_type, call, file_name: str) -> None:
    with pytest.raises(error_type) as raised:
        call()
    assert file_name in str(raised.value) and "\n" not in str(raised.value)


def test_missing_or_corrupt_checkpoint_gives_a_one_line_error_naming_the_file(tmp_path):
    one_line_error(FileNotFoundError, lambda: MarsModel.from_pretrained(tmp_path / "nowhere"), CONFIG_NAME)
    _, model = tiny("tiny-qwen2", image_grid=(4, 4))
    model.save_pretrained(tmp_path / "mars")
    weights = tmp_path / "mars" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    one_line_error(ValueError, lambda: MarsModel.from_pretrained(tmp_path / "mars"), str(weights))
    weights.unlink()
    one_line_error(FileNotFoundError, lambda: MarsModel.from_pretrained(tmp_path / "mars"), str(weights))
    (tmp_path / "mars" / CONFIG_NAME).write_text("{not json")
    one_line_error(ValueError, lambda: MarsModel.from_pretrained(tmp_path / "mars"), CONFIG_NAME)
    one_line_error(FileNotFoundError, lambda: MarsModel.from_qwen(tmp_path / "no-qwen"), "config.json")


def test_checkpoint_of_another_config_is_refused(tmp_path):
    _, model = tiny("tiny-qwen2", image_grid=(4, 4))
    model.save_pretrained(tmp_path / "mars")
    _, other = tiny("tiny-qwen2", image_grid=(4, 4), visual_norms=True)
    one_line_error(ValueError, lambda: other.load_trainable(tmp_path / "mars" / WEIGHTS_NAME), WEIGHTS_NAME)


def test_parameter_report_matches_qwen2_5_0_5b_arithmetic():
    config = MODEL_PRESETS["qwen2.5-0.5b"]
    text = config.text_config
    with torch.device("meta"):
        model = MarsModel.from_qwen(build_qwen(text), config)
    report = parameter_report(model)
    print("\nQwen2.5-0.5B-shaped MARS parameter report:", report)
    d, layers, ffn, vocab = text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"], text["vocab_size"]
    head_dim = d // text["num_attention_heads"]
    q, kv = text["num_attention_heads"] * head_dim, text["num_key_value_heads"] * head_dim
    attention = (d * q + q) + 2 * (d * kv + kv) + q * d  # Qwen2: q/k/v with bias, o without
    ffn_params = 3 * d * ffn  # gate, up, down
    qwen = vocab * d + layers * (attention + ffn_params + 2 * d) + d  # tied head; 2 norms a layer + final
    height, width = config.image_grid
    image = (config.codebook_size + 2) * d + (height + width) * d + config.codebook_size * d  # embed, row/col, head
    trainable = layers * (attention + ffn_params) + image
    assert qwen == 494_032_768  # Qwen2.5-0.5B's published size
    assert report == {"total": qwen + trainable, "frozen": qwen, "trainable": trainable}


def test_cell_weights_weigh_each_raster_cell_of_the_image_loss():
    _, model = tiny("tiny-qwen2", image_grid=(2, 2))
    codes = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    batch = build_batch(model, [[5, 6, 7], [8]], codes)
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    targets = batch["labels"][:, 1:]
    rows = model.is_code(targets)
    per_code = torch.nn.functional.cross_entropy(model.image_head(hidden[:, :-1][rows]),
                                                 targets[rows] - model.image_token_offset, reduction="none").view(2, 4)
    plain = model.loss(hidden, batch["labels"])
    torch.testing.assert_close(model.loss(hidden, batch["labels"], torch.ones(4)).image_loss, plain.image_loss)
    weights = torch.tensor([3.0, 1.0, 0.0, 2.0])  # cell 0 thrice, cell 2 not at all
    weighted = model.loss(hidden, batch["labels"], weights)
    torch.testing.assert_close(weighted.image_loss, (per_code * weights).sum() / (2 * weights.sum()))
    model.loss_chunk = 3  # chunked heads weigh the same rows alike
    torch.testing.assert_close(model.loss(hidden, batch["labels"], weights).image_loss, weighted.image_loss)
    model.loss_chunk = 0
    out = model(**batch, cell_weights=weights)
    torch.testing.assert_close(out.image_loss, weighted.image_loss)


def test_build_batch_sequences_labels_and_caption_dropout():
    _, model = tiny("tiny-qwen2", image_grid=(2, 2))
    codes = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    boi, eoi, eos = model.boi_token_id, model.eoi_token_id, model.text_config.eos_token_id
    image = model.codes_to_tokens(codes.flatten(1)).tolist()
    t2i = build_batch(model, [[5, 6, 7], [8]], codes)
    assert t2i["input_ids"][0].tolist() == [5, 6, 7, boi, *image[0], eoi]
    assert t2i["input_ids"][1].tolist() == [8, boi, *image[1], eoi, 0, 0]
    assert t2i["attention_mask"][1].tolist() == [True] * 7 + [False] * 2
    assert t2i["labels"][0].tolist() == [IGNORE_INDEX] * 4 + image[0] + [IGNORE_INDEX]
    i2t = build_batch(model, [[5, 6, 7], [8]], codes, task="i2t")
    assert i2t["input_ids"][1].tolist() == [boi, *image[1], eoi, 8, eos, 0, 0]
    assert i2t["labels"][1].tolist() == [IGNORE_INDEX] * 6 + [8, eos] + [IGNORE_INDEX] * 2
    both = build_batch(model, [[5, 6, 7], [8]], codes, task="i2t", loss_on="both")
    assert both["labels"][0].tolist() == [IGNORE_INDEX, *image[0], IGNORE_INDEX, 5, 6, 7, eos]
    out = model(**both)
    num_codes, num_text = 2 * 4, 4 + 2  # codes, caption + eos
    assert torch.allclose(out.loss * (num_codes + num_text), out.image_loss * num_codes + out.text_loss * num_text)
    dropped = build_batch(model, [[5, 6, 7], [8]], codes, caption_dropout=1.0)
    assert dropped["input_ids"][:, 0].tolist() == [boi, boi]
    prompts = [[5 + i] for i in range(16)]
    many = torch.zeros(16, 2, 2, dtype=torch.long)
    draw = [build_batch(model, prompts, many, caption_dropout=0.5, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(draw[0]["input_ids"], draw[1]["input_ids"])  # seeded
    kept = (draw[0]["input_ids"][:, 0] != boi).sum()
    assert 0 < kept < 16


def test_english_and_chinese_prompts_through_a_pretrained_tokenizer():
    _, model = tiny("tiny-qwen3", image_grid=(2, 2))
    tokenizer = ByT5Tokenizer()  # a real PreTrainedTokenizer that needs no files (bytes)
    prompts = ["a red circle to the left of a blue square", "一个红色的圆形在一个蓝色的正方形的左边"]
    codes = torch.randint(0, 64, (2, 2, 2))
    from_strings = build_batch(model, prompts, codes, tokenizer=tokenizer)
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    assert torch.equal(from_strings["input_ids"], build_batch(model, ids, codes)["input_ids"])
    assert len(ids[1]) == len("一个红色的圆形在一个蓝色的正方形的左边".encode())
    assert torch.isfinite(model(**build_batch(model, prompts, codes, task="i2t", tokenizer=tokenizer)).loss)


def test_a_16x16_grid_learns_its_codes():
    _, model = tiny("tiny-qwen2", image_grid=(16, 16))
    assert model.image_row_embed.weight.shape[0] == 16 and model.config.num_image_tokens == 256
    batch = t2i_batch(model)
    assert batch["input_ids"].shape == (3, 3 + 256 + 2)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert model.image_col_embed.weight.grad.abs().sum() > 0  # the 2-D position reaches every column
    assert losses[-1] < 0.5 * losses[0]  # ln(64) = 4.16 at the start


def test_bad_input_gets_clear_errors():
    _, model = tiny("tiny-qwen2", image_grid=(2, 2))
    codes = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="tokenizer="):
        build_batch(model, ["a red circle"], codes)
    with pytest.raises(ValueError, match=r"expected \(1, 2, 2\)"):
        build_batch(model, [[5]], torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook size"):
        build_batch(model, [[5]], codes + 64)
    with pytest.raises(ValueError, match="outside the Qwen vocabulary"):
        build_batch(model, [[512]], codes)
    with pytest.raises(ValueError, match="tiny-qwen2"):
        MarsConfig.from_name("qwen-7b")
    with pytest.raises(ValueError, match="image_grid"):
        MarsConfig(image_grid=(0, 8))


def test_config_json_round_trip(tmp_path):
    config = MarsConfig.from_name("tiny-qwen3", image_grid=(16, 8), visual_norms=True)
    config.save(tmp_path / "c.json")
    loaded = MarsConfig.load(tmp_path / "c.json")
    assert loaded == config and loaded.num_image_tokens == 128 and loaded.eoi_index == 65


def test_2d_rope_makes_code_attention_depend_on_the_2d_offset_only():
    """image_rope_2d: q.k between two codes is the same for every pair at one (row, column) offset, wherever
    the image starts; text positions keep Qwen's rotation; a code's tables are the 1-D ones of start + row
    (even frequencies) and start + column (odd ones)."""
    from mars.semvie import apply_rope, rope_tables

    model = MarsModel.from_config(MarsConfig.from_name("tiny-qwen3", image_grid=(4, 4), image_rope_2d=True))
    cells = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])  # two text tokens first
    positions = torch.arange(18)[None]
    cos, sin = model.rotary(positions, cells)
    plain_cos, plain_sin = model.model.rotary(positions)
    assert torch.equal(cos[:, :2], plain_cos[:, :2]) and torch.equal(sin[:, :2], plain_sin[:, :2])
    row_cos, _ = model.model.rotary(torch.tensor([[2 + 2]]))  # cell 9 = row 2, column 1; the image starts at 2
    col_cos, _ = model.model.rotary(torch.tensor([[2 + 1]]))
    half = cos.shape[-1] // 2
    even = torch.arange(0, half, 2)
    odd = torch.arange(1, half, 2)
    assert torch.equal(cos[0, 11, even], row_cos[0, 0, even]) and torch.equal(cos[0, 11, odd], col_cos[0, 0, odd])

    tables = rope_tables(cos, sin)
    q, k = torch.randn(1, 1, 1, cos.shape[-1]), torch.randn(1, 1, 1, cos.shape[-1])  # one query, one key vector

    def score(query_cell: int, key_cell: int) -> torch.Tensor:
        i, j = 2 + query_cell, 2 + key_cell  # their positions
        rotated_q = apply_rope(q, tables[0][:, :, i:i + 1], tables[1][:, :, i:i + 1])
        return (rotated_q * apply_rope(k, tables[0][:, :, j:j + 1], tables[1][:, :, j:j + 1])).sum()

    # (0,0)->(1,1), (2,2)->(3,3) and (0,2)->(1,3): one 2-D offset; (0,3)->(2,0): the same raster distance, 5
    assert torch.allclose(score(5, 0), score(15, 10), atol=1e-5) and torch.allclose(score(5, 0), score(7, 2), atol=1e-5)
    assert not torch.allclose(score(8, 3), score(5, 0), atol=1e-3)
    model.config.image_rope_2d = False  # off: the 1-D tables everywhere
    off_cos, _ = model.rotary(positions, cells)
    assert torch.equal(off_cos, plain_cos)
