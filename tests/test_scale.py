"""Scale: the memory levers (mars.config.MemoryConfig), the planner (train/plan.py) against the model and
against what autograd saves, a reduced-depth full-size run (benchmarks/scale.py: full width, the full
151,936-token vocabulary) and the GPU check's CPU mode.

    OMP_NUM_THREADS=1 python -m pytest tests/test_scale.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mars.config import MODEL_PRESETS, MarsConfig, MemoryConfig
from mars.model import (MarsModel, build_batch, build_qwen, concat_batches, configure_memory, head_nll,
                        is_trainable, parameter_report, trainable_parameters)
from mars.sampling import caption_images, generate_images
from train.plan import TABLE_MODELS, Plan, RunSpec, architecture, main as plan_main, table

REPO = Path(__file__).resolve().parents[1]


def tiny(name: str = "tiny-qwen3", **overrides) -> MarsModel:
    torch.manual_seed(0)
    config = MarsConfig.from_name(name, image_grid=(4, 4), **overrides)
    return MarsModel.from_qwen(build_qwen(config.text_config), config).train()


def mixed_batch(model: MarsModel, seed: int = 0) -> dict:
    """Text-to-image and image-to-text rows of different lengths (padding included): both heads run."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.config.codebook_size, (4, *model.config.image_grid), generator=generator)
    texts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18, 19, 20, 21]]
    return concat_batches([build_batch(model, texts[:2], codes[:2], task="t2i"),
                           build_batch(model, texts[2:], codes[2:], task="i2t")])


def loss_and_grads(model: MarsModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_tensor_bytes(fn, exclude: set[int] = frozenset()) -> int:
    """Bytes autograd keeps for backward while `fn` runs (storages counted once; `exclude`: data
    pointers not to count, e.g. the parameters)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def parameter_pointers(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


# --- the memory levers -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(name):
    model = tiny(name)
    batch = mixed_batch(model)
    plain_loss, plain = loss_and_grads(model, batch)
    kept = saved_tensor_bytes(lambda: model(**batch), parameter_pointers(model))
    configure_memory(model, MemoryConfig(activation_checkpointing=True))
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain.keys() and all(is_trainable(n) for n in grads)
    for name_, grad in grads.items():
        torch.testing.assert_close(grad, plain[name_], msg=name_)
    assert saved_tensor_bytes(lambda: model(**batch), parameter_pointers(model)) < 0.5 * kept


def test_frozen_bf16_beside_fp32_master_experts_trains_and_samples():
    model = tiny("tiny-qwen2")
    batch = mixed_batch(model)
    reference = model(**batch).loss.item()
    configure_memory(model, MemoryConfig(frozen_dtype="bfloat16"))
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if is_trainable(name) else torch.bfloat16), name
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers stay as they are
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    out = model(**batch)  # the model enters bf16 autocast itself: no caller context needed
    assert torch.isfinite(out.loss) and abs(out.loss.item() - reference) < 0.02 * reference
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in trainable_parameters(model))
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in trainable_parameters(model))  # fp32 masters after the step
    model.eval()
    codes = generate_images(model, [[5, 6]], guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (1, 4, 4)
    assert len(caption_images(model, codes, max_new_tokens=4)) == 1  # the bf16 text head under the sampler


def test_chunked_loss_equals_one_piece_and_holds_one_chunk_of_logits():
    model = tiny("tiny-qwen3")
    batch = mixed_batch(model)
    plain_loss, plain = loss_and_grads(model, batch)
    plain_out = model(**batch)
    configure_memory(model, MemoryConfig(loss_chunk=5))  # several chunks on both heads
    loss, grads = loss_and_grads(model, batch)
    out = model(**batch)
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(out.text_loss, plain_out.text_loss)
    torch.testing.assert_close(out.image_loss, plain_out.image_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], msg=name)
    # A 151,936-wide head over 64 caption positions: one chunk of 8 rows held, not all 64.
    head = torch.nn.Linear(32, 151936, bias=False)
    hidden = torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(0, 151936, (64,))
    whole = saved_tensor_bytes(lambda: head_nll(head, hidden, targets), parameter_pointers(head))
    chunked = saved_tensor_bytes(lambda: head_nll(head, hidden, targets, chunk=8), parameter_pointers(head))
    assert whole >= 64 * 151936 * 4 and chunked < whole / 6


def test_memory_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="frozen_dtype"):
        MemoryConfig(frozen_dtype="float16")
    with pytest.raises(ValueError, match="loss_chunk"):
        MemoryConfig(loss_chunk=-1)


# --- the planner -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TABLE_MODELS)
def test_planner_counts_parameters_as_the_model_built_on_the_meta_device(name):
    config = MODEL_PRESETS[name]
    with torch.device("meta"):
        model = MarsModel.from_qwen(build_qwen(config.text_config), config)
    report = parameter_report(model)
    plan = Plan(architecture(config.text_config), RunSpec(grid=16, codebook=16384))
    assert (plan.frozen, plan.trainable) == (report["frozen"], report["trainable"])
    published = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "qwen3-0.6b": 596_049_920}
    if name in published:
        assert plan.frozen == published[name]


@pytest.mark.parametrize("autocast", [False, True])
def test_planner_activations_match_what_autograd_saves(autocast):
    """The per-token formula against the tensors autograd keeps (fp32 on the CPU; bf16 autocast as on a GPU)."""
    text = dict(MarsConfig.from_name("tiny-qwen2").text_config, hidden_size=256, intermediate_size=1024,
                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    config = MarsConfig(codebook_size=64, image_grid=(8, 8), text_config=text)
    model = MarsModel.from_qwen(build_qwen(text), config).train()
    if autocast:  # the GPU configuration: frozen bf16, fp32 experts, the model under bf16 autocast
        configure_memory(model, MemoryConfig(frozen_dtype="bfloat16"))
    codes = torch.randint(0, 64, (4, 8, 8))
    batch = build_batch(model, [[5 + i] * 12 for i in range(4)], codes)  # no padding: 4 rows x 78 positions
    # The layers alone; the heads are the planner's separate term.
    measured = saved_tensor_bytes(lambda: model.hidden_states(batch["input_ids"]), parameter_pointers(model))
    spec = RunSpec(batch=4, grid=8, codebook=64, card="h100" if autocast else "cpu", i2t_ratio=0.0, text_tokens=12)
    plan = Plan(architecture(text), spec)
    estimate = plan.activation_bytes(checkpointing=False) + plan.autocast_copies(checkpointing=False)
    assert abs(estimate - measured) / measured < 0.1, (estimate, measured)


def test_planner_report_sharding_and_table(capsys):
    text = plan_main(["--qwen", "qwen2.5-7b", "--gpus", "8", "--gpu-memory", "80", "--strategy", "fsdp",
                      "--batch", "32", "--grid", "16"])
    for needle in ("frozen 7,615,616,512", "trainable", "gradients", "optimizer", "activations", "peak", "fits",
                   "step time at 40% MFU of 989 TFLOP/s"):
        assert needle in text, needle
    _, arch = "qwen2.5-7b", architecture(MODEL_PRESETS["qwen2.5-7b"].text_config)
    ddp, fsdp = (Plan(arch, RunSpec(gpus=8, strategy=s, batch=4)) for s in ("ddp", "fsdp"))
    assert fsdp.optimizer * 8 == ddp.optimizer and fsdp.weights_frozen * 8 == ddp.weights_frozen
    assert not ddp.fits() and fsdp.fits(checkpointing=True)  # 7B with AdamW replicated exceeds 80 GB
    assert fsdp.activation_bytes(True) < fsdp.activation_bytes(False) / 5
    chunked = Plan(arch, RunSpec(batch=32, loss_chunk=1024))
    assert chunked.head_bytes < Plan(arch, RunSpec(batch=32)).head_bytes
    assert table().count("\n") == len(TABLE_MODELS) + 1


# --- full width, full vocabulary, reduced depth ------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Where the random one-layer Qwen2.5-0.5B checkpoint is written once for both tests below."""
    return tmp_path_factory.mktemp("qwen-cache")


@pytest.mark.slow
def test_reduced_depth_full_size_run_through_every_stage(cache, tmp_path, capsys):
    """benchmarks/scale.py end to end at one decoder layer of Qwen2.5-0.5B's width and vocabulary:
    the random checkpoint written and loaded by path, stage 1 (both heads), stage 2, super-resolution,
    the trainable-only round trip (checked equal inside), sampling with KV cache and CFG."""
    from benchmarks.scale import planner_comparison, run

    result = run("qwen2.5-0.5b", layers=1, batch=2, cache=cache, out=tmp_path / "out")
    assert [p.name for p in result.phases] == ["checkpoint", "load", "stage1", "stage2", "superres", "save",
                                               "reload", "sample", "upsample"]
    printed = capsys.readouterr().out
    assert "vocabulary 151,936" in printed and "through the 151,936-way text head" in printed
    assert "weights equal to the saved ones: True" in printed
    assert all(p.tokens > 0 for p in result.phases if p.name in ("stage1", "stage2", "superres", "sample"))
    assert result.params["frozen"] == 151936 * 896 + (896 * 896 * 2 + 896 * 128 * 2 + 896 + 256 + 3 * 896 * 4864
                                                      + 2 * 896) + 896
    assert "stage-1 peak" in planner_comparison(result, 2)


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(cache):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tiny",
                             "--cache", str(cache)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for needle in ("stage-1 bf16", "MFU", "planner", "sampler batch 1", "sampler batch 16", "bandwidth bound",
                   "FSDP"):
        assert needle in result.stdout, needle
