"""Diffusion training (pixel and latent), resume, DDP, the sampling pipeline and `medgen sample`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medgen.cli import main as cli
from medgen.config import load_config
from medgen.errors import RunError
from medgen.train.common import read_metrics
from medgen.train.diffusion import DEFAULTS, train_diffusion

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.channels=[16,32]", "model.num_res_blocks=1", "model.attention_levels=[false,true]",
              "model.head_channels=16", "model.norm_groups=8"]


def _cfg(config: str, *overrides: str):
    base = ["train.tracker=none", "train.log_every=1", "train.batch_size=4", "sample.steps=4", "sample.n_preview=2"]
    return load_config(REPO / "configs" / config, base + TINY_MODEL + list(overrides), DEFAULTS)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def pixel_run(cohort_2d, tmp_path_factory):
    out = tmp_path_factory.mktemp("dm") / "run"
    cfg = _cfg("demo_diffusion_2d_pixel.yaml", f"data.path={cohort_2d}", "train.max_steps=4",
               "train.checkpoint_every=2", "train.preview_every=4")
    return train_diffusion(cfg, out)


def test_pixel_run_layout(pixel_run):
    for name in ("config.yaml", "split.json", "metrics.jsonl", "model/model.safetensors", "samples/step_4.png",
                 "checkpoints/step_4/ema.safetensors", "checkpoints/step_4/model.safetensors"):
        assert (pixel_run / name).is_file(), name
    # EMA state lives in safetensors + JSON; accelerate's own RNG/optimizer files aside, no extra pickle
    assert not list((pixel_run / "checkpoints" / "step_4").glob("custom_checkpoint_*"))
    cfg = json.loads((pixel_run / "model" / "config.json").read_text())
    assert cfg["kind"] == "diffusion" and cfg["sample_shape"] == [1, 32, 32] and cfg["latent"] is None
    assert cfg["num_classes"] == 2 and cfg["spacing"] == [1.0, 1.0] or len(cfg["spacing"]) == 2
    steps = [r["step"] for r in read_metrics(pixel_run)]
    assert steps == [1, 2, 3, 4]


def test_resume_reproduces_uninterrupted_run(cohort_2d, tmp_path, pixel_run):
    """Stop at step 2, resume to 4: the same losses and the same final (EMA) weights."""
    out = tmp_path / "run"
    common = (f"data.path={cohort_2d}", "train.checkpoint_every=2", "train.preview_every=4")
    train_diffusion(_cfg("demo_diffusion_2d_pixel.yaml", *common, "train.max_steps=2"), out)
    train_diffusion(_cfg("demo_diffusion_2d_pixel.yaml", *common, "train.max_steps=4"), out, resume="latest")
    a = {r["step"]: r["loss"] for r in read_metrics(pixel_run)}
    b = {r["step"]: r["loss"] for r in read_metrics(out)}
    assert list(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step
    wa, wb = _weights(pixel_run / "model" / "model.safetensors"), _weights(out / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    ea = _weights(pixel_run / "checkpoints" / "step_4" / "ema.safetensors")
    eb = _weights(out / "checkpoints" / "step_4" / "ema.safetensors")
    assert all(torch.allclose(ea[k], eb[k], rtol=1e-5, atol=1e-6) for k in ea)


def test_new_run_refuses_existing_dir(pixel_run, cohort_2d):
    with pytest.raises(RunError, match="already holds files"):
        train_diffusion(_cfg("demo_diffusion_2d_pixel.yaml", f"data.path={cohort_2d}", "train.max_steps=1"), pixel_run)


# --------------------------------------------------------------------------- sampling


def test_pipeline_same_seed_same_samples_whatever_the_batch(pixel_run):
    import medgen

    pipe = medgen.load_pipeline(pixel_run, device="cpu")
    a = pipe.sample(3, steps=4, seed=5, batch_size=3, label=1, guidance=2.0)
    b = pipe.sample(3, steps=4, seed=5, batch_size=1, label=1, guidance=2.0)
    assert a.shape == (3, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    c = pipe.sample(1, steps=4, seed=6, label=1, guidance=2.0)  # sample 1 of seed 5 is seed 6
    torch.testing.assert_close(c[0], a[1], rtol=1e-4, atol=1e-4)


def test_sample_cli_png_manifest_and_overwrite(pixel_run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "samples"
    args = ["sample", "--run", str(pixel_run), "--n", "3", "--out", str(out), "--steps", "3", "--batch-size", "2",
            "--label", "0", "--guidance", "1.5", "--seed", "10", "--bit-depth", "16"]
    assert cli(args) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert list(rows[0]) == ["file", "label", "seed", "sampler", "steps", "guidance", "checkpoint_sha256"]
    assert [r["seed"] for r in rows] == ["10", "11", "12"] and {r["label"] for r in rows} == {"0"}
    from medgen.io import sha256_file

    assert rows[0]["checkpoint_sha256"] == sha256_file(pixel_run / "model" / "model.safetensors")
    img = Image.open(out / rows[0]["file"])
    assert img.size == (32, 32) and np.asarray(img).dtype == np.uint16
    assert (out / "grid.png").is_file()
    before = (out / rows[0]["file"]).read_bytes()
    assert cli(args) == 2  # a non-empty output folder is refused...
    assert "already holds files" in capsys.readouterr().err
    assert (out / rows[0]["file"]).read_bytes() == before  # ...and left alone
    assert cli(args[:-2] + ["--bit-depth", "8", "--overwrite"]) == 0
    assert np.asarray(Image.open(out / rows[0]["file"])).dtype == np.uint8
    assert cli(["sample", "--run", str(pixel_run), "--n", "1", "--out", str(tmp_path / "x"), "--label", "7"]) == 2


def test_3d_pixel_run_writes_nifti_with_training_spacing(cohort_3d, tmp_path):
    import nibabel as nib

    cfg = _cfg("demo_diffusion_3d.yaml", f"data.path={cohort_3d}", "data.shape=[16,16,16]", "data.spacing=[2.0,2.0,2.0]",
               "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=2", "train.preview_every=2")
    run = train_diffusion(cfg, tmp_path / "run3d")
    assert (run / "samples" / "step_2.png").is_file()  # three orthogonal mid slices per volume
    out = tmp_path / "s3d"
    assert cli(["sample", "--run", str(run), "--n", "2", "--out", str(out), "--steps", "2", "--sampler", "ddim"]) == 0
    img = nib.load(str(out / "sample_00000.nii.gz"))
    assert img.shape == (16, 16, 16)
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 2.0, 2.0))


# --------------------------------------------------------------------------- latent mode


@pytest.fixture(scope="module")
def tiny_autoencoder(cohort_2d, tmp_path_factory):
    """An (untrained) 2D autoencoder model folder with the data section a stage-1 run would save."""
    from medgen.models.autoencoder import Autoencoder
    from medgen.models.serialization import save_inference_model

    torch.manual_seed(0)
    ae = Autoencoder(spatial_dims=2, in_channels=1, latent_channels=4, channels=[8, 16, 16], downsample=4,
                     num_res_blocks=1, attention=False, latent="kl", norm_groups=8)
    out = tmp_path_factory.mktemp("ae") / "ae_run"
    data = {"path": str(cohort_2d), "spatial_dims": 2, "channels": 1, "shape": [32, 32], "cache": True,
            "split": {"val": 0.1, "holdout": 0.1, "seed": 0}}
    save_inference_model(ae, out / "model", {**ae.config(), "data": data})
    return out


def test_latent_mode_end_to_end(tiny_autoencoder, tmp_path):
    from medgen.models.autoencoder import load_autoencoder
    from medgen.train.encode import load_latent_cache

    cfg = _cfg("demo_diffusion_2d.yaml", f"autoencoder.run={tiny_autoencoder}", "train.max_steps=2",
               "train.checkpoint_every=2", "train.preview_every=2", "model.channels=[16]", "model.attention_levels=[true]")
    run = train_diffusion(cfg, tmp_path / "ldm")
    conf = json.loads((run / "model" / "config.json").read_text())
    latents, meta = load_latent_cache(run / "latents")
    assert conf["sample_shape"] == [4, 8, 8] and conf["image_shape"] == [1, 32, 32]
    assert conf["latent"]["scale_factor"] == pytest.approx(meta["scale_factor"])
    assert (latents * meta["scale_factor"]).std().item() == pytest.approx(1.0, rel=1e-3)  # unit-variance latents
    # only training subjects were used (holdout subjects never reach the denoiser)
    split = json.loads((run / "split.json").read_text())["subjects"]
    assert set(split["holdout"]).isdisjoint(split["train"])
    assert (run / "autoencoder" / "model.safetensors").is_file() and (run / "samples" / "step_2.png").is_file()

    import medgen
    from medgen.diffusion import generators, sample_loop

    pipe = medgen.load_pipeline(run, device="cpu")
    x = pipe.sample(2, steps=3, seed=0)
    assert x.shape == (2, 1, 32, 32)
    # the pipeline decodes z / scale_factor through the run's own copy of the autoencoder
    z = sample_loop(pipe.denoiser, pipe.schedule, (4, 8, 8), generators([0, 1]), steps=3)
    ae = load_autoencoder(tiny_autoencoder)
    ref = ae.decode(z / meta["scale_factor"]).clamp(-1, 1)
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- learning


def _intensity_w1(a: torch.Tensor, b: torch.Tensor, quantiles: int = 1000) -> float:
    """1-Wasserstein distance between the intensity distributions of a and b (mean gap of their quantiles)."""
    q = torch.linspace(0, 1, quantiles)
    return (torch.quantile(a.float().flatten(), q) - torch.quantile(b.float().flatten(), q)).abs().mean().item()


def _learn(cohort, out, steps: int):
    cfg = _cfg("demo_diffusion_2d_pixel.yaml", f"data.path={cohort}", f"train.max_steps={steps}", "train.batch_size=8",
               "train.lr=2e-3", f"train.checkpoint_every={steps}", f"train.preview_every={steps}", "ema.decay=0.99",
               "model.channels=[16,32,32]", "model.attention_levels=[false,false,true]")
    return train_diffusion(cfg, out)


def test_estimate_memory_closed_forms(tiny_autoencoder, tmp_path, capsys):
    from medgen.train.diffusion import build_model_from_config, estimate_memory

    def estimate(*extra):
        return estimate_memory(_cfg("demo_diffusion_2d.yaml", "autoencoder.run=null", "data.shape=[16,16]",
                                    "data.channels=4", "model.num_classes=2", *extra))

    b4, b8, b12 = (estimate(f"train.batch_size={b}") for b in (4, 8, 12))
    net = build_model_from_config(_cfg("demo_diffusion_2d.yaml"), 4, 2, 2)
    param_bytes = sum(p.numel() * 4 for p in net.parameters())
    gib = 2**30
    assert b4["parameters_gib"] * gib == param_bytes
    # what stays between steps: parameters, AdamW's two moments, the EMA copy (+ 4-byte step counters)
    assert b4["persistent_gib"] * gib == pytest.approx(4 * param_bytes, rel=0.01)
    # the peak is affine in the batch: activations per sample, plus batch-independent gradients
    assert b12["peak_gib"] - b8["peak_gib"] == pytest.approx(b8["peak_gib"] - b4["peak_gib"], rel=1e-3)
    assert b8["peak_gib"] - b4["peak_gib"] > 0
    assert estimate("train.batch_size=8", "model.gradient_checkpointing=true")["peak_gib"] < b8["peak_gib"]
    # latent mode: the latent shape comes from the autoencoder (x4 downsampling, 4 channels)
    latent = estimate_memory(_cfg("demo_diffusion_2d.yaml", f"autoencoder.run={tiny_autoencoder}", "data.shape=[64,64]"))
    assert latent["shape"] == [16, 16] and latent["channels"] == 4
    assert cli(["train", "diffusion", "--config", str(REPO / "configs" / "demo_diffusion_2d.yaml"), "--estimate-memory",
                "autoencoder.run=null", "data.shape=[16,16]", "data.channels=4"]) == 0
    assert "peak tensor memory of a training step at batch" in capsys.readouterr().out


def test_tiny_model_lowers_its_loss(cohort_2d, tmp_path):
    run = _learn(cohort_2d, tmp_path / "learn", 30)
    losses = [r["loss"] for r in read_metrics(run)]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


@pytest.fixture(scope="module")
def learned_prior(cohort_2d, tmp_path_factory):
    """The demo pixel prior at test size: 150 CPU steps on the 12-subject cohort."""
    return _learn(cohort_2d, tmp_path_factory.mktemp("learn") / "run", 150)


@pytest.mark.slow
def test_tiny_model_samples_move_towards_the_data(cohort_2d, learned_prior):
    """150 CPU steps: the samples' intensities are at most 0.25x as far (1-Wasserstein) from the
    data's as clipped Gaussian noise's are, and their spread matches the data's. Measured with the
    default sampler: v prior 0.049 vs 0.414 (0.12x); the eps prior of issue 16 0.144 vs 0.416
    (0.35x, fails). (A 32-bin histogram L1 was used before; it counted a background 0.03 off the
    data's as wholly wrong and ranked the noisy eps samples above the clean v ones.)"""
    from medgen.data import load_images

    run = learned_prior
    losses = [r["loss"] for r in read_metrics(run)]
    assert np.mean(losses[-30:]) < 0.2 * np.mean(losses[:5])
    real, _ = load_images(cohort_2d, json.loads((run / "model" / "config.json").read_text())["data"])
    import medgen

    fake = medgen.load_pipeline(run, device="cpu").sample(16, steps=25, seed=0)
    noise = torch.randn_like(fake).clamp(-1, 1)
    d_fake, d_noise = _intensity_w1(fake, real), _intensity_w1(noise, real)
    assert d_fake < 0.25 * d_noise, (d_fake, d_noise)
    assert abs(fake.std().item() - real.std().item()) < 0.15


@pytest.mark.slow
def test_every_sampler_gives_clean_samples_on_the_demo_pixel_prior(cohort_2d, learned_prior):
    """Issue 16: each sampler at 25 steps against 200 ancestral steps, same prior, same seeds.

    Per sampler: at most 10 % noisy samples (high-frequency energy, mean |x - blur(x)|, above
    twice the training images' mean), median high-frequency energy at most 1.25x the training
    images', and FD on the in-domain PCA features at most 1.5x the ancestral sampler's. Measured
    on this prior with the demo config's eps target before the fix: dpmpp 4/16 noisy and 2.4x
    the FD, euler 5/16 and 21x, ddim median energy 1.7x and 4.5x the FD; with v: 0/16 noisy
    and at most 1.2x the FD for all four.
    """
    import medgen
    from medgen.data import load_images
    from medgen.diffusion import SAMPLERS
    from medgen.diffusion.quality import high_frequency_energy
    from medgen.metrics import frechet_distance
    from medgen.metrics.features import PCAExtractor

    real, _ = load_images(cohort_2d, json.loads((learned_prior / "model" / "config.json").read_text())["data"])
    real_hf = high_frequency_energy(real).mean().item()
    pca = PCAExtractor(n_components=16).fit(real)
    real_feats = pca(real)
    pipe = medgen.load_pipeline(learned_prior, device="cpu")
    reference = pipe.sample(16, sampler="ddpm", steps=200, seed=0)
    fd_reference = frechet_distance(real_feats, pca(reference))
    report = {}
    for sampler in SAMPLERS:
        x = pipe.sample(16, sampler=sampler, steps=25, seed=0)
        hf = high_frequency_energy(x) / real_hf
        report[sampler] = {"noisy": (hf > 2).float().mean().item(), "hf": hf.median().item(),
                           "fd_ratio": frechet_distance(real_feats, pca(x)) / fd_reference}
    for sampler, r in report.items():
        assert r["noisy"] <= 0.1 and r["hf"] <= 1.25 and r["fd_ratio"] <= 1.5, (sampler, report)


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_process_ddp(cohort_2d, tmp_path):
    out = tmp_path / "ddp"
    """2 CPU processes (torchrun via `accelerate launch --multi_gpu` + `train.cpu=true`, gloo): accelerate's
    `--cpu --num_processes 2` alone starts a single process without mpirun."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "medgen", "train", "diffusion",
           "--config", str(REPO / "configs" / "demo_diffusion_2d_pixel.yaml"), "--out", str(out),
           f"data.path={cohort_2d}", "train.max_steps=3", "train.batch_size=2", "train.checkpoint_every=3",
           "train.preview_every=3", "train.tracker=none", "train.cpu=true", "train.log_every=1", "sample.steps=2", "sample.n_preview=2", *TINY_MODEL]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints" / "step_3").glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # one writer: the main process
