"""`medgen probe`: surrogate training, eps = 0 exactness through the batched probe path, the end-to-end
report with a tiny prior trained on the built-in cohort, and every bad input's error line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medgen.cli import main as cli
from medgen.config import load_config
from medgen.train.diffusion import DEFAULTS, train_diffusion

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"method", "acceleration", "mask", "eps", "perturbation", "source", "psnr", "ssim", "nmse", "psnr_std", "n_images",
            "posterior_samples"}
TINY = ["--acceleration", "4", "--eps", "0,0.05", "--posterior-samples", "2", "--steps", "3", "--attack-steps", "3",
        "--n-images", "1", "--tv-iterations", "3", "--tv-white-box", "--device", "cpu"]


@pytest.fixture(scope="module")
def prior_run(cohort_2d, tmp_path_factory):
    """A tiny pixel-space prior trained for a few steps on the cohort (32x32)."""
    cfg = load_config(REPO / "configs" / "demo_diffusion_2d_pixel.yaml",
                      [f"data.path={cohort_2d}", "train.max_steps=3", "train.checkpoint_every=3", "train.preview_every=3",
                       "train.batch_size=4", "train.tracker=none", "sample.steps=2", "sample.n_preview=1", "model.channels=[8,16]",
                       "model.attention_levels=[false,false]", "model.head_channels=8", "model.norm_groups=4"], DEFAULTS)
    return train_diffusion(cfg, tmp_path_factory.mktemp("prior") / "run")


@pytest.fixture(scope="module")
def surrogate_dir(cohort_2d, tmp_path_factory):
    out = tmp_path_factory.mktemp("surrogate") / "s"
    assert cli(["probe", "train-surrogate", "--data", str(cohort_2d), "--out", str(out), "--acceleration", "4", "--device", "cpu",
                "train.max_steps=5", "train.batch_size=4", "network.channels_per_scale=[8,16]"]) == 0
    return out


def test_train_surrogate_writes_safetensors_and_json(surrogate_dir, cohort_2d):
    from medgen.recon.surrogate import load_surrogate

    config = json.loads((surrogate_dir / "config.json").read_text())
    assert (surrogate_dir / "model.safetensors").is_file()
    assert config["kind"] == "recon_surrogate" and config["acceleration"] == 4 and config["mask"] == "equispaced"
    assert config["params"]["channels_per_scale"] == [8, 16] and config["train"]["steps"] == 5
    assert config["image_shape"] == [32, 32] and config["center_fraction"] == 0.08
    train = {Path(f) for f in config["train"]["train_files"]}
    assert train and all(f.is_relative_to(Path(cohort_2d).resolve()) for f in train)
    sur = load_surrogate(surrogate_dir)
    y = torch.randn(2, 2, 32, 32)
    from medgen.recon.kspace import kspace_mask, mri_physics

    assert sur(mri_physics(kspace_mask((32, 32), 4)), y).shape == (2, 1, 32, 32)


def test_eps_zero_gives_back_the_clean_reconstruction_exactly(prior_run, surrogate_dir, cohort_2d):
    """Through the probe's batched path: a zero-budget worst-case delta is exactly 0 and every method
    (stochastic ones with the same seeds) returns its clean reconstruction bit for bit."""
    from medgen.recon.attack import worst_case_perturbation
    from medgen.recon.data import load_slices
    from medgen.recon.kspace import fully_sampled, kspace_mask, mri_physics, to_complex
    from medgen.recon.prior import PixelPrior
    from medgen.recon.probe import Condition, Reconstructors, reconstruct_all
    from medgen.recon.settings import METHODS, ProbeSettings
    from medgen.recon.surrogate import load_surrogate

    x, _ = load_slices(cohort_2d)
    x = x[:2]
    settings = ProbeSettings(accelerations=[4], posterior_samples=2, steps=3, tv_iterations=3, batch_size=8)
    physics = mri_physics(kspace_mask((32, 32), 4))
    k = fully_sampled(physics).A(to_complex(x))
    sur = load_surrogate(surrogate_dir)
    recons = Reconstructors(physics, settings, PixelPrior(prior_run), sur, tv_lambda=1e-3, dps_weight=3.0)
    delta, _ = worst_case_perturbation(recons.deterministic("surrogate"), k, physics.mask, [0.0], steps=3)
    assert torch.equal(delta, torch.zeros_like(delta))
    conditions = [Condition("none", None, 0.0, None), Condition("worst-case", "surrogate", 0.0, delta)]
    for method in METHODS:
        res = reconstruct_all(recons, method, k, physics.mask, conditions, x, settings)
        assert torch.equal(res.recon[0], res.recon[1]), method
        assert res.recon.shape[2] == (2 if method in ("projection", "dps") else 1)
        # smaller forward batches change the result by float rounding only
        split = reconstruct_all(recons, method, k, physics.mask, conditions, x, ProbeSettings(**{**vars(settings), "batch_size": 3}))
        torch.testing.assert_close(split.recon, res.recon, rtol=0, atol=1e-5)


def test_probe_mri_end_to_end_writes_every_file(prior_run, surrogate_dir, cohort_2d, tmp_path, capsys):
    out = tmp_path / "probe"
    assert cli(["probe", "mri", "--prior", str(prior_run), "--data", str(cohort_2d), "--out", str(out),
                "--surrogate", str(surrogate_dir), *TINY]) == 0
    assert "over 1 images: no evidence of transfer" in capsys.readouterr().out  # one image: no interval, no claim
    for name in ("report.json", "report.md", "psnr_vs_eps.png", "panels.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    assert rows and all(set(r) == ROW_KEYS for r in rows)
    methods = {"projection", "dps", "tv", "zero-filled", "surrogate"}
    assert {r["method"] for r in rows} == methods
    kinds = {(r["method"], r["perturbation"], r["source"]) for r in rows}
    for m in methods:
        assert (m, "none", None) in kinds and (m, "random", None) in kinds
        assert (m, "worst-case", "white-box" if m == "surrogate" else "surrogate") in kinds
    assert ("tv", "worst-case", "white-box") in kinds
    assert {r["eps"] for r in rows} == {0.0, 0.05}
    assert all(r["n_images"] == 1 and r["posterior_samples"] == (2 if r["method"] in ("projection", "dps") else 1) for r in rows)
    setup = report["setup"]
    assert setup["prior"]["sha256"] and len(setup["prior"]["sha256"]) == 64
    assert setup["physics"]["operator"] == "deepinv.physics.MRI" and setup["masks"]["4"]["center_fraction"] == 0.08
    assert setup["masks"]["4"]["kind"] == "equispaced-fixed" and setup["masks"]["4"]["center_columns"] == 2
    # calibration images are held out too: neither evaluated nor trained on
    assert setup["data"]["n_calibration"] == 1 and not set(setup["data"]["calibration_files"]) & set(setup["data"]["files"])
    assert "real part" in setup["differences_from_han"]["projection"]
    assert setup["attack"]["lr"] == 0.1 and setup["attack"]["steps"] == 3
    assert {"torch", "deepinv"} <= set(setup["versions"])
    assert setup["data"]["excluded_training_images"] > 0  # the prior's and surrogate's training images are not evaluated
    assert "Does the surrogate's perturbation transfer?" in (out / "report.md").read_text()
    # an existing report is not replaced without --overwrite
    assert cli(["probe", "mri", "--prior", str(prior_run), "--data", str(cohort_2d), "--out", str(out), *TINY]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def _fake_run(prior_run: Path, tmp_path: Path, name: str, **changes) -> Path:
    """A copy of the tiny prior whose model config says it is latent or 3D."""
    run = tmp_path / name
    shutil.copytree(prior_run / "model", run / "model")
    config = json.loads((run / "model" / "config.json").read_text())
    config.update(changes)
    (run / "model" / "config.json").write_text(json.dumps(config))
    return run


@pytest.mark.parametrize("case", ["latent", "3d", "size", "eps_one", "eps_negative", "acceleration", "empty"])
def test_bad_input_gets_one_error_line(case, prior_run, surrogate_dir, cohort_2d, tmp_path, capsys):
    prior, data, extra = prior_run, cohort_2d, []
    expected = {
        "latent": "the probe needs a 2D pixel-space prior; this run is latent",
        "3d": "the probe needs a 2D pixel-space prior; this run is 3D",
        "size": "generates 32x32 images but the slices",
        "eps_one": "must lie in [0, 1)",
        "eps_negative": "must lie in [0, 1)",
        "acceleration": "cannot be reached on images 32 px wide",
        "empty": "folder holds no images",
    }[case]
    if case == "latent":
        prior = _fake_run(prior_run, tmp_path, "latent", latent={"scale_factor": 1.0, "autoencoder_sha256": "x"})
    elif case == "3d":
        prior = _fake_run(prior_run, tmp_path, "vol", spatial_dims=3, sample_shape=[1, 16, 16, 16])
    elif case == "size":
        from medgen.data.cohort import synth_brain

        data = synth_brain(tmp_path / "small", n=3, dims=2, size=16, seed=0)
    elif case == "eps_one":
        extra = ["--eps", "0,0.02,1.0"]
    elif case == "eps_negative":
        extra = ["--eps=-0.1,0.02"]
    elif case == "acceleration":
        extra = ["--acceleration", "64"]
    elif case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    code = cli(["probe", "mri", "--prior", str(prior), "--data", str(data), "--out", str(tmp_path / "out"),
                "--surrogate", str(surrogate_dir), "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("medgen: error:") and expected in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "out").exists()


def test_demo_stage_skips_3d_with_a_message(tmp_path, capsys):
    from medgen.demo import DemoContext
    from medgen.recon.commands import demo_stage

    ctx = DemoContext(out=tmp_path, quick=True, dims=3)
    demo_stage(ctx)
    assert "probe: skipped" in capsys.readouterr().out
    assert "probe_report" not in ctx.state and not any(tmp_path.iterdir())


def test_surrogate_keys_are_checked_against_the_schema(cohort_2d, tmp_path, capsys):
    """A misspelt or out-of-range surrogate key is one error line naming it (with a suggestion),
    before any training; the `data:` keys of a training config the surrogate does not read are ignored."""
    from medgen.errors import ConfigError
    from medgen.recon.surrogate import surrogate_config, surrogate_data

    with pytest.raises(ConfigError, match=r"train\.step; did you mean train\.max_steps"):
        surrogate_config(["train.step=5"], data={"path": str(cohort_2d)})
    with pytest.raises(ConfigError, match="acceleration"):
        surrogate_config(["acceleration=1"], data={"path": str(cohort_2d)})
    cfg = surrogate_config(["train.max_steps=7"], acceleration=4, data={"path": str(cohort_2d)})
    assert (cfg["train"]["max_steps"], cfg["acceleration"], cfg["mask"], cfg["train"]["lr"]) == (7, 4, "equispaced", 1e-3)
    assert surrogate_data({"shape": [32, 32], "intensity": {"mode": "zscore"}, "channels": 1}) == {"shape": [32, 32]}
    code = cli(["probe", "train-surrogate", "--data", str(cohort_2d), "--out", str(tmp_path / "s"), "network.channel=[8]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("medgen: error:") and "unknown config key network.channel;" in err[-1] and "channels_per_scale" in err[-1], err
    assert not (tmp_path / "s").exists()


def test_probe_reports_per_image_rows_intervals_and_holm(prior_run, surrogate_dir, tmp_path):
    """Held-out subjects of another cohort: per-image rows for every condition, t intervals over
    images, Holm-adjusted p-values over every tested cell, verdicts that follow them; the control
    row "random" and the optional "random-full"."""
    from medgen.data.cohort import synth_brain
    from medgen.recon.stats import MIN_EFFECT_DB

    data = synth_brain(tmp_path / "more", n=10, dims=2, size=32, seed=5)
    out = tmp_path / "probe"
    assert cli(["probe", "mri", "--prior", str(prior_run), "--data", str(data), "--out", str(out), "--surrogate", str(surrogate_dir),
                "--acceleration", "4,8", "--eps", "0,0.04", "--n-images", "5", "--posterior-samples", "2", "--steps", "3",
                "--attack-steps", "5", "--tv-iterations", "5", "--methods", "projection,zero-filled,surrogate",
                "--full-kspace-control", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["setup"]["data"]["n_images"] == 5 and report["setup"]["data"]["n_calibration"] == 5
    images = report["images"]
    # 3 methods x 2 R x (clean, worst-case, random, random-full) x 5 images
    assert len(images) == 3 * 2 * 4 * 5 and {r["image"] for r in images} == set(range(5))
    assert {"random", "random-full"} <= {r["perturbation"] for r in images}
    for r in images:
        if r["perturbation"] != "none":
            assert {"rms_change", "unsampled_change", "measured_change", "measured_copy_psnr"} <= set(r)
    # the means in "results" are the means of the per-image rows
    for row in report["results"]:
        if row["eps"] == 0.04:
            mine = [r["psnr"] for r in images if (r["method"], r["acceleration"], r["perturbation"], r["eps"])
                    == (row["method"], row["acceleration"], row["perturbation"], 0.04)]
            assert len(mine) == 5 and abs(sum(mine) / 5 - row["psnr"]) < 1e-3
    transfer = report["transfer"]
    assert len(transfer) == 3 * 2 and all(t["family_size"] == 6 for t in transfer)
    for t in transfer:
        worst = [r["psnr"] for r in images if (r["method"], r["acceleration"], r["perturbation"]) == (t["method"], t["acceleration"], "worst-case")]
        control = [r["psnr"] for r in images if (r["method"], r["acceleration"], r["perturbation"]) == (t["method"], t["acceleration"], "random")]
        d = [c - w for c, w in zip(control, worst)]
        assert abs(t["difference"] - sum(d) / 5) < 1e-3
        lo, hi = t["ci95"]
        assert lo <= t["difference"] <= hi and t["ci_corrected"][0] <= lo and hi <= t["ci_corrected"][1]
        assert t["p_holm"] >= t["p_value"] - 1e-9
        assert t["transfers"] == (t["p_holm"] < 0.05 and t["difference"] >= MIN_EFFECT_DB)
        if t["method"] == "surrogate":  # its own worst case: the test says whether the direction matters, not transfer
            assert t["source"] == "white-box" and t["verdict"].endswith("(white-box)")
        else:
            assert t["verdict"] == ("transfers" if t["transfers"] else "no evidence of transfer")
        assert "psnr_drop_random_full" in t and "measured_copy_drop_worst_case" in t
    assert "Holm" in (out / "report.md").read_text()


@pytest.mark.parametrize("coils", [1, 4])
def test_probe_reads_fastmri_kspace(coils, prior_run, surrogate_dir, cohort_2d, tmp_path):
    """A fastMRI-format file written here (64x64 k-space of cohort slices, cropped to the prior's
    32x32): single-coil, and 4 coils with ESPIRiT maps; with measurement noise and a user mask."""
    import numpy as np

    from medgen.recon.data import load_slices
    from medgen.recon.fastmri import simulate_kspace, write_fastmri_h5
    from medgen.recon.kspace import birdcage_maps

    x, _ = load_slices(cohort_2d, {"shape": [32, 32]}, scaling="prior")
    big = torch.nn.functional.pad(x[:4], (16, 16, 16, 16))  # 64x64: the centre crop gives the slices back
    maps = birdcage_maps(coils, (64, 64)) if coils > 1 else None
    h5 = write_fastmri_h5(tmp_path / "file.h5", simulate_kspace(big, maps))
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps([0, 4, 8, 12, 15, 16, 17, 20, 24, 28]))
    out = tmp_path / "probe"
    assert cli(["probe", "mri", "--prior", str(prior_run), "--kspace", str(h5), "--surrogate", str(surrogate_dir), "--out", str(out),
                "--mask-file", str(mask), "--noise-sigma", "0.001", "--eps", "0,0.04", "--n-images", "3", "--posterior-samples", "1",
                "--steps", "3", "--attack-steps", "3", "--tv-iterations", "3", "--methods", "projection,zero-filled",
                "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    setup = report["setup"]
    assert setup["data"]["slices"] == [0, 1, 2] and setup["data"]["calibration_slices"] == [3] and setup["data"]["cropped"]
    assert setup["physics"]["coils"] == coils and setup["physics"]["noise_sigma"] == 0.001
    assert setup["masks"]["3"]["kind"] == "user" and setup["masks"]["3"]["columns"] == [0, 4, 8, 12, 15, 16, 17, 20, 24, 28]
    if coils > 1:
        assert setup["physics"]["operator"] == "deepinv.physics.MultiCoilMRI" and "ESPIRiT" in setup["physics"]["coil_maps"]
    # zero-filled of clean data is scored against the file's own reference: the slices, each scaled to max 1
    zf = next(r for r in report["results"] if r["method"] == "zero-filled" and r["perturbation"] == "none")
    assert 5 < zf["psnr"] < 40 and np.isfinite(zf["psnr"])


def _complex_run(prior_run: Path, tmp_path: Path, intensity: dict) -> Path:
    """A two-channel (real, imaginary) run: the tiny prior's recipe with 2 in/out channels, random weights."""
    from medgen.models.serialization import load_model_config, save_inference_model
    from medgen.models.unet import UNet

    config = load_model_config(prior_run / "model")
    config["params"].update(in_channels=2, out_channels=2)
    config.update(sample_shape=[2, 32, 32], image_shape=[2, 32, 32])
    config["data"] = {**config["data"], "channels": None, "intensity": intensity}
    torch.manual_seed(0)
    run = tmp_path / f"complex_{intensity['mode']}"
    save_inference_model(UNet(**config["params"]), run / "model", config)
    return run


def test_complex_denoiser_gives_back_the_clean_complex_image():
    """Closed form: with an oracle network that knows the clean image U (complex, |U| <= 1) and answers
    the v target, the complex denoiser returns x0 = U / 2 at every noise level, the imaginary part
    included; the magnitude denoiser maps its real channel with the [0, 1] offset instead."""
    from medgen.diffusion import NoiseSchedule
    from medgen.recon.prior import MedgenDenoiser

    schedule = NoiseSchedule.from_config({"schedule": "linear", "num_train_timesteps": 1000, "prediction": "v"})
    ab_table = schedule.alphas_cumprod().float()
    U = torch.rand(1, 2, 8, 8) * 1.2 - 0.6  # real and imaginary parts in [-0.6, 0.6]

    class Oracle(torch.nn.Module):
        """Answers the v target of the clean image u0 at the (integer, here) timestep t."""

        def forward(self, x_t, t):
            ab = ab_table[t.round().long()].view(-1, 1, 1, 1)
            eps = (x_t - ab.sqrt() * self.u0) / (1 - ab).sqrt()
            return ab.sqrt() * eps - (1 - ab).sqrt() * self.u0

    oracle = Oracle()
    oracle.u0 = U
    den = MedgenDenoiser(oracle, schedule, complex_prior=True)
    sigmas = (1 / ab_table[[0, 99, 499, 998]] - 1).sqrt() / 2  # noise levels of integer timesteps, [0, 1] units
    for sigma in sigmas:
        x = U / 2 + sigma * torch.randn_like(U)
        torch.testing.assert_close(den(x, float(sigma)), U / 2, atol=1e-4, rtol=0)

    class PassThrough(torch.nn.Module):
        """Takes its scaled input for the clean image (v target with eps = 0): the input's units come back."""

        def forward(self, x_t, t):
            ab = ab_table[t.round().long()].view(-1, 1, 1, 1)
            return -(1 - ab).sqrt() * x_t / ab.sqrt()

    x = U / 2  # any complex image of magnitude <= 0.5 (|u| <= 1)
    torch.testing.assert_close(MedgenDenoiser(PassThrough(), schedule, complex_prior=True)(x, float(sigmas[2])), x, atol=1e-5, rtol=0)
    oracle.u0 = U[:, :1]
    mag = MedgenDenoiser(oracle, schedule)
    x = (U[:, :1] + 1) / 2 + 0.1 * torch.randn(1, 1, 8, 8)
    out = mag(torch.cat([x, torch.zeros_like(x)], 1), float(sigmas[1]))
    torch.testing.assert_close(out[:, :1], (U[:, :1] + 1) / 2, atol=1e-4, rtol=0)
    assert torch.equal(out[:, 1:], torch.zeros_like(x))


def test_complex_prior_runs_on_measured_kspace_and_is_refused_otherwise(prior_run, surrogate_dir, cohort_2d, tmp_path, capsys):
    import numpy as np

    from medgen.recon.fastmri import simulate_kspace, write_fastmri_h5

    good = _complex_run(prior_run, tmp_path, {"mode": "fixed", "in_range": [-1000.0, 1000.0]})
    gen = np.random.default_rng(0)
    images = torch.rand(4, 1, 32, 32) * torch.exp(1j * torch.from_numpy(gen.uniform(-np.pi, np.pi, (4, 1, 32, 32))))
    h5 = write_fastmri_h5(tmp_path / "complex.h5", simulate_kspace(images))
    out = tmp_path / "probe"
    assert cli(["probe", "mri", "--prior", str(good), "--kspace", str(h5), "--surrogate", str(surrogate_dir), "--out", str(out),
                "--acceleration", "4", "--eps", "0,0.04", "--n-images", "3", "--posterior-samples", "1", "--steps", "3",
                "--attack-steps", "2", "--methods", "projection,dps,zero-filled", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["setup"]["prior"]["images"] == "complex (real, imaginary)" and "times 0.5" in report["setup"]["data"]["scaling"]
    assert all(np.isfinite(r["psnr"]) for r in report["results"])
    # a complex prior needs measured k-space; one trained with a mapping that moves 0 is refused
    assert cli(["probe", "mri", "--prior", str(good), "--data", str(cohort_2d), "--surrogate", str(surrogate_dir),
                "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "pass --kspace" in capsys.readouterr().err
    bad = _complex_run(prior_run, tmp_path, {"mode": "auto"})
    assert cli(["probe", "mri", "--prior", str(bad), "--kspace", str(h5), "--surrogate", str(surrogate_dir),
                "--out", str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert "keeps 0 at 0" in capsys.readouterr().err
