"""Stage-1 training end to end: overfit, resume, NaN guard, CLI + encode, 2-process DDP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from medgen.cli import main
from medgen.config import load_config
from medgen.errors import TrainingError
from medgen.models.autoencoder import load_autoencoder
from medgen.train import autoencoder as ae_train
from medgen.train.common import CheckpointManager, read_metrics

REPO = Path(__file__).resolve().parents[1]
DEMO_2D = REPO / "configs" / "demo_autoencoder_2d.yaml"
DEMO_3D = REPO / "configs" / "demo_autoencoder_3d.yaml"

# tiny 3D VQ-GAN: both discriminators on from step 2, log every step
TINY_3D = ["model.channels=[4,8]", "model.downsample=2", "model.num_codes=16", "model.norm_groups=4",
           "discriminator.channels=4", "discriminator.num_layers=1", "train.batch_size=2", "loss.disc_start=1",
           "loss.feature_matching_weight=0.5", "train.log_every=1", "train.val_every=1000", "train.val_batches=1",
           "train.preview_every=1000", "train.checkpoint_every=3", "train.grad_clip=1.0", "train.cpu=true"]


def _train(cfg_path, out, overrides, resume=None):
    cfg = load_config(cfg_path, overrides, ae_train.DEFAULTS)
    return ae_train.train_autoencoder(cfg, out, resume)


def _losses(run, keys=("loss/total", "loss/d", "codebook/perplexity", "grad_norm", "grad_norm_d")):
    return {r["step"]: tuple(r.get(k) for k in keys) for r in read_metrics(run) if "loss/total" in r}


def test_overfits_eight_images(cohort_2d, tmp_path):
    """A tiny VQ autoencoder must reconstruct 8 training images past 24 dB PSNR."""
    lines = (cohort_2d / "manifest.csv").read_text().splitlines()
    manifest = tmp_path / "eight.csv"
    manifest.write_text("\n".join([lines[0]] + [f"{cohort_2d}/{ln}" for ln in lines[1:9]]) + "\n")
    run = _train(DEMO_2D, tmp_path / "run", [
        f"data.path={manifest}", "data.split.val=0", "data.split.holdout=0", "discriminator.enabled=false",
        "model.channels=[8,16]", "model.downsample=2", "model.num_codes=256", "model.latent_channels=8",
        "train.max_steps=100", "train.lr=3e-3", "train.log_every=50", "train.checkpoint_every=1000",
        "train.preview_every=1000", "train.cpu=true"])
    from medgen.data import load_images

    images, _ = load_images(manifest, load_config(run / "config.yaml").data)
    model = load_autoencoder(run)
    with torch.no_grad():
        recon = model.decode(model.encode(images))
    mse = ((recon.clamp(-1, 1) - images) / 2).pow(2).mean().item()  # on the [0, 1] scale
    psnr = -10 * torch.log10(torch.tensor(mse)).item()
    print(f"overfit PSNR {psnr:.2f} dB")
    assert images.shape[0] == 8
    assert psnr > 24.0, psnr


def _loss_weights(is_vq: bool, *overrides: str) -> ae_train.LossWeights:
    return ae_train.LossWeights.from_config(load_config(None, list(overrides), ae_train.DEFAULTS).loss, is_vq)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kl_vae_loss_closed_form(reduction):
    """Medfusion's KL-VAE objective, term by term: MSE + LPIPS-style + (1 - SSIM) on the output and
    on the deep-supervision output, summed over each image's pixels (`sum`, as LDM/Medfusion) or
    averaged (`mean`), plus 1e-6 x KL summed over latent elements, from a posterior set to
    N(a, e^b) everywhere: KL = 0.5 (a^2 + e^b - 1 - b) per latent element."""
    from pytorch_msssim import ssim

    from medgen.models.autoencoder import Autoencoder
    from medgen.models.perceptual import PerceptualLoss, random_backbone_state

    torch.manual_seed(0)
    model = Autoencoder(2, 3, 4, channels=(8, 16), downsample=2, latent="kl", norm_groups=4, deep_supervision=1)
    torch.nn.init.normal_(model.decoder.aux_out[0].weight, std=0.3)  # a deep output that is not 0
    a, b = 0.7, -0.4
    head = model.encoder.net.blocks[-1]  # the encoder's output conv: (B, 2 x 4, 8, 8) = [mean, log-variance]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([a] * 4 + [b] * 4))
    perceptual = PerceptualLoss("resnet18", random_backbone_state("resnet18"))
    w = _loss_weights(False, "loss.reconstruction=l2", "loss.perceptual=resnet18", "loss.perceptual_weight=0.5",
                      "loss.ssim_weight=1.0", f"loss.reduction={reduction}")
    assert (w.reconstruction, w.rec, w.perceptual, w.ssim, w.latent) == ("l2", 1.0, 0.5, 1.0, 1e-6)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    loss, recon, aux, logs, _ = ae_train.generator_loss(model, x, w, perceptual)
    torch.manual_seed(1)
    with torch.no_grad():
        recon2, aux2 = model(x)  # the same posterior draw
    assert torch.equal(recon2, recon)
    deep, deep_target = aux2["deep"][0], torch.nn.functional.interpolate(x, size=(8, 8), mode="nearest-exact")

    def image_terms(out, target):  # per-element mean squared error, batch-mean LPIPS-style and 1 - SSIM
        win = 11 if out.shape[-1] >= 11 else 7  # the 8x8 deep output: the largest odd window that fits
        one_minus_ssim = 1 - ssim(((out + 1) / 2).clamp(0, 1), (target + 1) / 2, data_range=1, win_size=win,
                                  size_average=False, nonnegative_ssim=True).mean()
        return (out - target).pow(2).mean() + 0.5 * perceptual(out, target) + one_minus_ssim

    kl = 2 * 4 * 8 * 8 * 0.5 * (a**2 + math.exp(b) - 1 - b) / 2  # summed over (B, 4, 8, 8), mean over B
    assert aux["latent_loss"].item() == pytest.approx(kl, rel=1e-5)
    pixels, deep_pixels = (3 * 16 * 16, 3 * 8 * 8) if reduction == "sum" else (1, 1)
    expected = pixels * image_terms(recon2, x) + deep_pixels * image_terms(deep, deep_target) + 1e-6 * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert logs["loss/total"].item() == loss.item()


@pytest.mark.parametrize("adaptive", [False, True])
def test_vqgan_generator_loss_composition(adaptive):
    """Medical Diffusion's generator objective on a 3D VQ-GAN, term by term: 4 L1 + commitment
    + w_adv lambda (hinge G of the volume and the slice discriminator) + 4 x feature matching
    summed over the 4 feature layers of both discriminators."""
    from medgen.models.autoencoder import Autoencoder
    from medgen.models.discriminator import GANDiscriminator, take_slices

    torch.manual_seed(0)
    model = Autoencoder(3, 1, 4, channels=(8, 16), downsample=2, num_codes=16, norm_groups=4).eval()  # codebook fixed
    disc = GANDiscriminator(3, 1, channels=4, num_layers=3)
    w = _loss_weights(True, "loss.reconstruction_weight=4", "loss.latent_weight=1", "loss.adversarial_weight=0.7",
                      "loss.feature_matching_weight=4", f"loss.adaptive_weight={adaptive}")
    assert w.reduction == "mean"  # auto: the VQ-GAN convention
    x = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    torch.manual_seed(1)
    loss, recon, aux, logs, slice_index = ae_train.generator_loss(model, x, w, None, disc, model.last_layer)
    torch.manual_seed(1)
    assert torch.equal(disc.draw_slices(x), slice_index)
    h = model.encoder(x)
    z_q = model.quantizer.lookup(model.quantizer.indices(h))
    recon2 = model.decoder(z_q)
    assert torch.allclose(recon2, recon, atol=1e-5)  # z + (z_q - z) rounds differently from z_q
    l1 = (recon2 - x).abs().mean()
    commitment = 0.25 * (h - z_q).pow(2).mean()
    adv, fm = 0.0, 0.0
    for net, real, fake in [(disc.volume, x, recon2),
                            (disc.slice, take_slices(x, slice_index), take_slices(recon2, slice_index))]:
        feats_fake, feats_real = net(fake), net(real)
        assert len(feats_fake) == 5  # 4 feature layers + logits
        adv = adv - feats_fake[-1].mean()
        fm = fm + sum((f - r).abs().mean() for f, r in zip(feats_fake[:-1], feats_real[:-1]))
    lam = torch.tensor(1.0)
    if adaptive:  # Esser et al. 2021 eq. 7 at the decoder's output conv
        g_rec = torch.autograd.grad(4 * l1, model.last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, model.last_layer, retain_graph=True)[0]
        lam = g_rec.norm() / (g_adv.norm() + 1e-4)
    expected = 4 * l1 + commitment + 0.7 * lam * adv + 4 * fm
    assert logs["gan_weight"].item() == pytest.approx(lam.item(), rel=1e-4)
    assert logs["loss/feature_matching"].item() == pytest.approx(fm.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_resume_reproduces_uninterrupted_run(cohort_3d, tmp_path):
    """Stop at step 3, resume to 6: the same losses (G, D, codebook) as 6 uninterrupted steps."""
    common = [f"data.path={cohort_3d}", *TINY_3D]
    full = _train(DEMO_3D, tmp_path / "full", common + ["train.max_steps=6"])
    part = _train(DEMO_3D, tmp_path / "part", common + ["train.max_steps=3"])
    assert CheckpointManager(part).latest().name == "step_3"
    cfg = load_config(part / "config.yaml", ["train.max_steps=6"], ae_train.DEFAULTS)
    ae_train.train_autoencoder(cfg, part, resume="latest")
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s][1] is not None for s in (2, 5))  # the GAN was on
    assert all(a[s][4] is not None for s in (2, 5))  # and the discriminator's gradients were clipped too
    for step in range(1, 7):
        assert a[step] == b[step], (step, a[step], b[step])  # bit-identical on CPU
    wa = load_autoencoder(full).state_dict()
    wb = load_autoencoder(part).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_accumulation_counts_optimizer_steps(cohort_3d, tmp_path):
    """2 micro-batches per step for both networks: after 3 steps each Adam has made exactly 3 updates."""
    run = _train(DEMO_3D, tmp_path / "run", [f"data.path={cohort_3d}", *TINY_3D, "train.batch_size=1",
                                             "train.gradient_accumulation_steps=2", "train.max_steps=3"])
    for name in ("optimizer.bin", "optimizer_1.bin"):  # generator, discriminator
        state = torch.load(run / "checkpoints" / "step_3" / name, weights_only=True)["state"]
        steps = {float(v["step"]) for v in state.values()}
        assert steps == ({3.0} if name == "optimizer.bin" else {2.0}), (name, steps)  # D starts after step 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cohort_3d, tmp_path, monkeypatch):
    real = ae_train.reconstruction_loss
    calls = {"n": 0}

    def poisoned(recon, target, kind="l1"):
        calls["n"] += 1
        loss = real(recon, target, kind)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(ae_train, "reconstruction_loss", poisoned)
    common = [f"data.path={cohort_3d}", *TINY_3D, "train.checkpoint_every=2", "train.max_steps=8"]
    with pytest.raises(TrainingError, match=r"generator loss is not finite \(\[nan\]\) at step 5.*--resume latest"):
        _train(DEMO_3D, tmp_path / "run", common)
    ckpt = CheckpointManager(tmp_path / "run")
    assert [s for s, _ in ckpt.list()] == [2, 4]
    assert json.loads((ckpt.latest() / "extra.json").read_text())["step"] == 4
    assert not (tmp_path / "run" / "model").exists()  # no inference weights from a failed run
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))
    monkeypatch.setattr(ae_train, "reconstruction_loss", real)  # fixed: the run resumes from step 4
    cfg = load_config(tmp_path / "run" / "config.yaml", [], ae_train.DEFAULTS)
    ae_train.train_autoencoder(cfg, tmp_path / "run", resume="latest")
    assert sorted(_losses(tmp_path / "run")) == list(range(1, 9))
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_cli_train_resume_and_encode(cohort_2d, tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = ["train", "autoencoder", "--config", str(DEMO_2D), "--out", str(run), f"data.path={cohort_2d}",
            "train.max_steps=3", "loss.disc_start=1", "train.val_every=3", "train.cpu=true",
            "model.channels=[8,16,16]", "discriminator.channels=8"]
    assert main(args) == 0
    for name in ("config.yaml", "split.json", "metrics.jsonl", "model/config.json", "model/model.safetensors",
                 "checkpoints/step_3/extra.json", "samples/recon_step_3.png"):
        assert (run / name).exists(), name
    val = [r for r in read_metrics(run) if "val/psnr" in r]
    assert val and {"val/psnr", "val/ssim", "val/ms_ssim", "val/perplexity"} <= set(val[-1])
    # a new run refuses the existing folder; --resume latest (no --config) continues it
    assert main(args) == 2 and "--resume latest" in capsys.readouterr().err
    assert main(["train", "autoencoder", "--out", str(run), "--resume", "latest", "train.max_steps=4"]) == 0
    assert max(r["step"] for r in read_metrics(run)) == 4
    assert json.loads((run / "model" / "config.json").read_text())["step"] == 4

    assert main(["encode", "--autoencoder", str(run), "--data", str(cohort_2d), "--out", str(cache), "--device", "cpu"]) == 0
    from medgen.data import load_images
    from medgen.train.encode import load_latent_cache

    latents, meta = load_latent_cache(cache)
    model = load_autoencoder(run)
    images, samples = load_images(cohort_2d, load_config(run / "config.yaml").data)
    with torch.no_grad():
        expected = model.encode(images)
    assert latents.shape == (12, 4, 8, 8) and torch.allclose(latents, expected, atol=1e-5)
    # the scale factor against the latents encoded here, independently of the cache
    assert meta["scale_factor"] == pytest.approx(1.0 / expected.double().std().item(), rel=1e-4)
    assert meta["labels"] == [s.label for s in samples] and meta["subject_ids"] == [s.subject_id for s in samples]
    from medgen.io import sha256_file

    assert meta["autoencoder_sha256"] == sha256_file(run / "model" / "model.safetensors")
    assert meta["spatial_dims"] == 2 and meta["data"]["shape"] == [32, 32]
    assert main(["encode", "--autoencoder", str(run), "--data", str(cohort_2d), "--out", str(cache)]) == 2  # exists


def test_cli_config_errors_are_clear(cohort_2d, tmp_path, capsys):
    def base(out):
        return ["train", "autoencoder", "--config", str(DEMO_2D), "--out", str(tmp_path / out),
                f"data.path={cohort_2d}", "train.cpu=true"]

    assert main(base("a") + ["model.downsample=64", "model.channels=[8,8,8,8,8,8,8]"]) == 2
    assert "not divisible by model.downsample" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # a run that never started leaves no folder behind
    assert main(base("b") + ["loss.perceptual=vgg16", f"loss.perceptual_weights={tmp_path}/none.safetensors"]) == 2
    assert "none.safetensors does not exist" in capsys.readouterr().err
    assert main(["train", "autoencoder", "--out", str(tmp_path / "c")]) == 2
    assert "--config is required" in capsys.readouterr().err


def test_estimate_memory_closed_forms(tmp_path, capsys, monkeypatch):
    over = ["data.shape=[32,32,32]"]

    def estimate(*extra):
        return ae_train.estimate_memory(load_config(DEMO_3D, over + list(extra), ae_train.DEFAULTS))

    b2, b4, b6 = (estimate(f"train.batch_size={b}") for b in (2, 4, 6))
    # persistent = parameters + Adam's two fp32 moments of every trained parameter (+ 4-byte step counters)
    cfg = load_config(DEMO_3D, over, ae_train.DEFAULTS)
    trained = sum(p.numel() * 4 for m in (ae_train.build_autoencoder(cfg.model, 3, 1),
                                           ae_train.build_discriminator(cfg.discriminator, 3, 1))
                  for p in m.parameters())
    gib = 2**30
    assert (b2["persistent_gib"] - b2["parameters_gib"]) * gib == pytest.approx(2 * trained, rel=0.01)
    assert b4["persistent_gib"] == b2["persistent_gib"]
    # the peak is affine in the batch: activations per volume, plus batch-independent gradients
    assert b6["peak_gib"] - b4["peak_gib"] == pytest.approx(b4["peak_gib"] - b2["peak_gib"], rel=1e-3)
    assert b4["peak_gib"] - b2["peak_gib"] > 0
    assert estimate("train.batch_size=4", "model.gradient_checkpointing=true")["peak_gib"] < b4["peak_gib"]
    # a perceptual backbone whose weights file is absent is replaced by a random one of the same size
    monkeypatch.setenv("MEDGEN_WEIGHTS_DIR", str(tmp_path))
    vgg = estimate("train.batch_size=2", "data.shape=[16,16,16]", "loss.perceptual=vgg16", "loss.perceptual_slices=1")
    features = sum(p.numel() * 4 for p in torchvision.models.vgg16(weights=None).features.parameters())
    assert (vgg["parameters_gib"] - b2["parameters_gib"]) * gib == pytest.approx(features, rel=0.01)
    # CLI: no --out needed, nothing written
    assert main(["train", "autoencoder", "--config", str(DEMO_3D), "--estimate-memory", *over]) == 0
    assert "peak tensor memory of a training step at batch 2 x 1 x 32x32x32, fp32" in capsys.readouterr().out
    assert main(["train", "autoencoder", "--config", str(DEMO_3D), "--estimate-memory", "data.shape=null"]) == 2
    assert "needs data.shape" in capsys.readouterr().err
    assert main(["train", "autoencoder", "--config", str(DEMO_3D)]) == 2
    assert "--out is required" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes(cohort_3d, tmp_path):
    """2-process CPU DDP (torchrun via `accelerate launch --multi_gpu`, gloo, `train.cpu=true`; plain
    `--cpu --num_processes 2` starts one process without mpirun) trains a few VQ-GAN steps."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "medgen", "train", "autoencoder", "--config", str(DEMO_3D), "--out", str(run),
           f"data.path={cohort_3d}", "train.max_steps=3", "train.batch_size=1", *TINY_3D]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = _losses(run)
    assert sorted(steps) == [1, 2, 3] and steps[3][1] is not None  # D loss logged: GAN ran under DDP
    assert (run / "model" / "model.safetensors").is_file() and CheckpointManager(run).latest().name == "step_3"
    assert len(list((run / "checkpoints" / "step_3").glob("random_states_*.pkl"))) == 2  # both processes saved
