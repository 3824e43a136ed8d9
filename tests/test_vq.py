"""Tests for the VQ tokenizer (vq/) and its Lightning training (train/vq.py), on tiny configs.

    OMP_NUM_THREADS=1 python -m pytest tests/test_vq.py -q
"""

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from torchmetrics.image import StructuralSimilarityIndexMeasure

from train.__main__ import main as train_main
from train.modules import warmup_cosine
from train.vq import MixedSizeBatches, MixedSizeImages, VQLitModule
from vq.reconstruct import codebook_stats
from vq import VQConfig, VQTokenizer, images_to_tensor, tensor_to_images
from mars.eval import evaluate_tokenizer
from vq.__main__ import export_checkpoint
from vq.__main__ import main as vq_main
from vq.losses import LPIPS, VQLossConfig, edge_map, reconstruction_loss


def tiny(**overrides) -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(VQConfig.from_name("tiny", **overrides)).eval()


def images(batch=2, size=16, seed=0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_decode_shapes_and_dtypes():
    tok = tiny()
    assert tok.downsample == 4 and tok.codebook_size == 64
    codes = tok.encode(images(2, 16))
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64
    out = tok.decode(codes)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert tok.encode(images(1, 24)).shape == (1, 6, 6)  # any multiple of f, not only squares of 2


def test_shapes_preset_is_f16():
    tok = VQTokenizer(VQConfig.from_name("shapes-f16"))
    assert tok.downsample == 16
    assert tok.encode(images(1, 128)).shape == (1, 8, 8)
    assert tok.decode(torch.zeros(1, 16, 16, dtype=torch.long)).shape == (1, 3, 256, 256)


def test_patch_size_folds_pixels_into_the_downsampling():
    cfg = VQConfig(patch_size=4, channels=8, channel_mults=(1, 2), latent_dim=8, codebook_size=16, kmeans_init=False)
    assert cfg.downsample == 8
    tok = VQTokenizer(cfg).eval()
    codes = tok.encode(images(1, 32))
    assert codes.shape == (1, 4, 4) and tok.decode(codes).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_save_load_round_trip_is_exact(tmp_path, quantizer):
    tok = tiny(quantizer=quantizer, kmeans_init=True)
    x = images(3, 16)
    tok.train()
    tok(x)  # k-means initialisation and one EMA update: state a fresh model would not have
    tok.eval()
    tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = VQTokenizer.from_pretrained(tmp_path)
    assert loaded.config == tok.config
    codes = tok.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), tok.decode(codes))


def test_float16_storage_halves_the_file_and_loads_as_float32(tmp_path):
    tok = tiny(kmeans_init=True)
    x = images(2, 16)
    tok.encode(x)
    tok.save_pretrained(tmp_path / "fp32")
    tok.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "fp16")}
    assert size["fp16"] < 0.6 * size["fp32"]
    loaded = VQTokenizer.from_pretrained(tmp_path / "fp16")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(VQTokenizer.from_pretrained(tmp_path / "fp16").encode(x), loaded.encode(x))


def test_encode_does_not_change_the_codebook():
    tok = tiny(kmeans_init=True)
    tok.train()  # even in train mode the public API must not update the EMA codebook
    x = images(2, 16)
    first = tok.encode(x)
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    assert torch.equal(tok.encode(x), first)
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())


def test_gradients_reach_encoder_and_decoder_through_the_quantizer():
    tok = tiny().train()
    x = images(2, 16)
    out = tok(x)
    (reconstruction_loss(out.reconstruction, x, VQLossConfig()) + out.commitment).backward()
    for name, module in [("encoder", tok.encoder.layers[0]), ("decoder", tok.decoder.conv_out),
                         ("project_in", tok.quantizer.vq.project_in)]:
        grad = next(module.parameters()).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached the {name}"


def test_codes_are_chosen_in_float32_under_bf16_training():
    tok = tiny(kmeans_init=False).train()
    x = images(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = tok.encoder(x)
        _, q = tok.quantize(x, freeze_codebook=True)
    assert z.dtype == torch.bfloat16 and q.latents.dtype == torch.float32
    expected = tok.quantizer(z.float().flatten(2).transpose(1, 2), freeze_codebook=True)  # (B, h*w, D) in float32
    assert torch.equal(q.codes.flatten(1), expected.codes)


def test_validation_figures_are_computed_in_float32_under_bf16():
    """bf16 reconstructions fed to torchmetrics gave SSIM above 1; the metrics see float32 pixels."""
    torch.manual_seed(0)
    module = VQLitModule(VQConfig.from_name("tiny", kmeans_init=False), VQLossConfig(), val_verdicts=False).eval()
    x = images(2, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        module.validation_step({"image": x}, 0)
        reconstruction = module.tokenizer(x).reconstruction.clamp(-1, 1)
    assert reconstruction.dtype == torch.bfloat16
    figures = module.val_metrics["32"].compute()
    expected = StructuralSimilarityIndexMeasure(data_range=1.0)((reconstruction.float() + 1) / 2, (x + 1) / 2)
    assert torch.equal(figures["val/ssim_32"], expected)


def test_fsq_config():
    tok = tiny(quantizer="fsq", fsq_levels=(5, 4, 3))
    assert tok.codebook_size == 60
    codes = tok.encode(images(2, 16))
    assert codes.dtype == torch.long and codes.shape == (2, 4, 4) and codes.max() < 60
    assert tok.decode(codes).shape == (2, 3, 16, 16)
    tok.train()
    out = tok(images(2, 16))
    out.reconstruction.mean().backward()
    assert tok.encoder.layers[0].weight.grad.abs().sum() > 0


def test_bad_inputs_raise_one_line_errors(tmp_path):
    tok = tiny()
    cases = [
        (lambda: tok.encode(images(1, 18)), "not a multiple of the downsampling factor 4"),
        (lambda: tok.encode(torch.zeros(1, 1, 16, 16)), r"\(B, 3, H, W\)"),
        (lambda: tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), "dtype torch.uint8"),
        (lambda: tok.decode(torch.full((1, 4, 4), 64)), "codebook has 64 entries"),
        (lambda: tok.decode(torch.full((1, 4, 4), -1)), "codebook has 64 entries"),
        (lambda: tok.decode(torch.zeros(1, 4, 4)), "integer codes"),
        (lambda: VQConfig(quantizer="rvq"), "unknown"),
        (lambda: VQLossConfig(perceptual_weight=1.0), "lpips_path"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VQTokenizer.from_pretrained(tmp_path / "missing")
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        VQTokenizer.from_pretrained(tmp_path)
    tiny(codebook_size=32).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tok.config.to_dict()))  # 64 codes, weights hold 32
    with pytest.raises(ValueError, match="does not match"):
        VQTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "out")


def test_pil_tensor_helpers_round_trip():
    array = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    pil = [Image.fromarray(a) for a in array]
    x = images_to_tensor(pil)
    assert x.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert [np.asarray(i).tolist() for i in tensor_to_images(x)] == array.tolist()
    with pytest.raises(ValueError, match="several sizes"):
        images_to_tensor([pil[0], pil[0].resize((4, 4))])


def test_edge_weighting_targets_colour_changes():
    target = torch.ones(1, 3, 16, 16)
    target[:, :, 4:12, 4:12] = -1  # a black square on white
    edges = edge_map(target, radius=1)[0, 0]
    assert edges[8, 8] == 0 and edges[0, 0] == 0  # deep inside and far outside
    assert edges[4, 8] == 1 and edges[3, 8] == 1 and edges[8, 11] == 1  # along the border
    error = torch.zeros_like(target)
    error[:, :, 4, 8] = 0.5  # one wrong pixel on the edge
    plain = reconstruction_loss(target + error, target, VQLossConfig())
    weighted = reconstruction_loss(target + error, target, VQLossConfig(edge_weight=4.0, edge_radius=1))
    assert torch.allclose(weighted, 5 * plain)


def test_lpips_from_local_file(tmp_path):
    torch.manual_seed(0)
    weights = {k: v for k, v in LPIPS().state_dict().items() if k not in ("shift", "scale")}
    weights = {k.replace("lins.", "lin").replace(".weight", ".model.1.weight") if k.startswith("lins.") else k: v.abs()
               for k, v in weights.items()}  # the lpips package's names; heads are non-negative there
    save_file(weights, tmp_path / "lpips.safetensors")
    lpips = LPIPS.from_file(tmp_path / "lpips.safetensors")
    a, b = images(1, 32, 1), images(1, 32, 2).requires_grad_()
    assert lpips(a, a).item() == 0
    distance = lpips(a, b)
    distance.backward()
    assert distance > 0 and b.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LPIPS.from_file(tmp_path / "missing.pth")


def test_mixed_size_batches_alternate_and_are_seeded():
    data = MixedSizeBatches((32, 64), (4, 1), batches=4, seed=0)
    batches = list(data)
    assert [tuple(b["image"].shape) for b in batches] == [(4, 3, 32, 32), (1, 3, 64, 64)] * 2
    assert all(isinstance(c, str) for b in batches for c in b["caption"])
    assert not torch.equal(batches[0]["image"], batches[2]["image"])
    assert torch.equal(list(MixedSizeBatches((32, 64), (4, 1), 4, 0))[2]["image"], batches[2]["image"])
    data.start_batch = 4  # the next epoch: new scenes
    assert not torch.equal(next(iter(data))["image"], batches[0]["image"])


def test_mixed_size_batches_resume_with_the_uninterrupted_batches():
    def epochs(data, first_batch, count):
        """Batches first_batch..count-1, epoch by epoch (3 batches each), as VQLitModule's hooks set start_batch."""
        out = []
        for start in [first_batch] + list(range((first_batch // 3 + 1) * 3, count, 3)):
            data.start_batch = start
            out += list(DataLoader(data, batch_size=None, num_workers=2 if start == first_batch else 0))
        return out

    uninterrupted = epochs(MixedSizeBatches((32, 64), (2, 1), batches=3, seed=0), 0, 9)  # 3 epochs of 3
    resumed = epochs(MixedSizeBatches((32, 64), (2, 1), batches=3, seed=0), 4, 9)  # killed after batch 3
    assert len(uninterrupted) == 9 and len(resumed) == 5  # the rest of epoch 1, then epoch 2
    for expected, got in zip(uninterrupted[4:], resumed, strict=True):
        assert torch.equal(expected["image"], got["image"]) and expected["caption"] == got["caption"]
    images = [b["image"] for b in uninterrupted]
    assert all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 2::2])  # no repeats


def image_folder(root, n: int) -> str:
    """n distinct 40-px images listed in root/captions.jsonl."""
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 40), (20 * i, 255 - 20 * i, 128)).save(root / f"{i}.png")
    (root / "captions.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "caption": f"colour {i}"}) + "\n"
                                                 for i in range(n)))
    return str(root)


def test_folder_batches_show_every_image_once_a_pass_at_each_size(tmp_path):
    data = MixedSizeBatches((32, 16), (2, 3), batches=4, seed=0, folder=image_folder(tmp_path / "f", 6))
    batches = list(data)  # sizes alternate: 2 images at 32 px, then 3 at 16 px
    assert [tuple(b["image"].shape) for b in batches] == [(2, 3, 32, 32), (3, 3, 16, 16)] * 2
    big = [c for b in batches[0::2] for c in b["caption"]]
    small = [c for b in batches[1::2] for c in b["caption"]]
    assert len(set(big)) == 4 and sorted(small) == sorted(f"colour {i}" for i in range(6))  # one pass: no repeats
    again = MixedSizeBatches((32, 16), (2, 3), batches=4, seed=0, folder=str(tmp_path / "f"))
    again.start_batch = 2  # a resumed run: the same batches from there on
    assert [b["caption"] for b in again] == [b["caption"] for b in batches[2:]]
    assert torch.equal(next(iter(again))["image"], batches[2]["image"])


class BatchRecorder(L.Callback):
    def __init__(self):
        self.images = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images[trainer.global_step] = batch["image"].clone()


def fit_tiny_vq(checkpoints, max_steps, ckpt_path=None) -> dict[int, torch.Tensor]:
    """A tiny VQ run (3 batches an epoch, a checkpoint every 2 steps) -> the images of each step."""
    L.seed_everything(0)
    module = VQLitModule(VQConfig.from_name("tiny"), VQLossConfig(), warmup_steps=1, val_verdicts=False)
    data = MixedSizeImages(sizes=(32, 64), batch_sizes=(2, 1), batches_per_epoch=3, val_batches=1)
    recorder = BatchRecorder()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=[checkpoint, recorder],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return recorder.images


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_a_resumed_vq_fit_trains_on_the_uninterrupted_batches(tmp_path):
    uninterrupted = fit_tiny_vq(tmp_path, max_steps=7)
    mid_epoch = next(tmp_path.glob("*step=4.ckpt"))  # epoch 1 (batches 3-5) was one batch in
    resumed = fit_tiny_vq(tmp_path / "again", max_steps=7, ckpt_path=mid_epoch)
    assert sorted(uninterrupted) == list(range(7)) and sorted(resumed) == [4, 5, 6]  # 6 opens epoch 2
    assert all(torch.equal(resumed[step], uninterrupted[step]) for step in resumed)


def test_schedule_and_codebook_stats():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    stats = codebook_stats(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert stats == {"codebook_usage": 0.5, "perplexity": pytest.approx(2.0)}


def test_tiny_lightning_fit_exports_a_tokenizer(tmp_path):
    L.seed_everything(0)
    loss = VQLossConfig(edge_weight=2.0, gan_weight=0.5, gan_start_step=2, disc_channels=8, disc_layers=2)
    module = VQLitModule(VQConfig.from_name("tiny", kmeans_init=True), loss, warmup_steps=2,
                         export_dir=str(tmp_path / "tokenizer"))
    data = MixedSizeImages(sizes=(32, 64), batch_sizes=(4, 1), batches_per_epoch=2, val_batches=2, num_workers=0)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    disc_before = [p.clone() for p in module.discriminator.parameters()]
    trainer.fit(module, data)
    assert trainer.global_step == 4  # the discriminator's steps are not counted
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    logged = trainer.logged_metrics
    for key in ("train/codebook_usage", "train/perplexity", "val/psnr_32", "val/ssim_64", "val/agreement_64"):
        assert key in logged, key
    assert 0 < logged["train/codebook_usage"] <= 1
    exported = VQTokenizer.from_pretrained(tmp_path / "tokenizer")
    x = images(2, 32)
    module.tokenizer.eval()
    assert torch.equal(exported.encode(x), module.tokenizer.encode(x))
    # an interrupted run: the checkpoint alone gives the same tokenizer
    vq_main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "from_ckpt")])
    assert torch.equal(VQTokenizer.from_pretrained(tmp_path / "from_ckpt").encode(x), exported.encode(x))


def test_shipped_yaml_builds_an_f16_tokenizer():
    cli = train_main(["--config", "train/configs/shapes_vq.yaml", "--trainer.logger", "false"], run=False)
    assert isinstance(cli.model, VQLitModule) and isinstance(cli.datamodule, MixedSizeImages)
    assert cli.model.vq_config == VQConfig.from_name("shapes-f16")  # the preset names what the YAML trains
    assert cli.model.tokenizer.downsample == 16
    assert cli.datamodule.hparams.sizes == [128, 256]


def test_reconstruct_cli_and_tokenizer_evaluation(tmp_path, capsys):
    tok = tiny()
    tok.save_pretrained(tmp_path / "tok")
    source = tmp_path / "in"
    source.mkdir()
    for name in ("a.png", "b.png"):
        tensor_to_images(images(1, 32))[0].save(source / name)
    (source / "captions.jsonl").write_text('{"file": "a.png", "caption": "a circle"}\n')
    vq_main(["reconstruct", "--checkpoint", str(tmp_path / "tok"), "--images", str(source), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "captions.jsonl"]
    assert Image.open(tmp_path / "out" / "a.png").size == (32, 32)
    vq_main(["reconstruct", "--checkpoint", str(tmp_path / "tok"), "--images", str(source), "--out",
             str(tmp_path / "small"), "--size", "16"])  # the size a model trains at
    assert Image.open(tmp_path / "small" / "b.png").size == (16, 16)
    with pytest.raises(SystemExit):
        vq_main(["reconstruct", "--checkpoint", str(tmp_path / "tok"), "--images", str(source), "--out", "x",
                 "--size", "18"])
    assert "not a multiple of the tokenizer's downsampling f = 4" in capsys.readouterr().err
    figures = evaluate_tokenizer(tok, n=6, size=64, seed=0, progress=False)
    assert figures["n"] == 6 and 0 <= figures["agreement"] <= 1 and 0 < figures["codebook_usage"] <= 1
    assert figures["originals_passed"] == 1.0  # every evaluation image passes its own prompt
    with pytest.raises(SystemExit):
        vq_main(["reconstruct", "--checkpoint", str(tmp_path / "missing"), "--images", str(source), "--out", "x"])
    assert "error:" in capsys.readouterr().err


def test_mars_eval_vq_prints_the_tokenizer_figures(tmp_path, capsys):
    from mars import eval as mars_eval

    tiny().save_pretrained(tmp_path / "tok")
    assert mars_eval.main(["--vq", str(tmp_path / "tok"), "--n", "6", "--size", "64", "--seed", "3"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["n"] == 6 and figures["size"] == 64 and figures["seed"] == 3
    assert figures["originals_passed"] == 1.0 and 0 < figures["codebook_usage"] <= 1 and figures["psnr"] > 0
