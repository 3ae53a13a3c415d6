"""The denoiser and the diffusion math: shapes, closed forms, guidance, sampler determinism."""

from __future__ import annotations

import math

import pytest
import torch

from medgen.diffusion import (
    DiffusionLoss, NoiseSchedule, add_noise, generators, guided_prediction, min_snr_weight, predict_x0, sample_loop,
    target,
)
from medgen.errors import ConfigError
from medgen.models.unet import UNet, build_denoiser, denoiser_from_config, timestep_embedding

torch.set_num_threads(2)

TINY = dict(channels=(16, 32), num_res_blocks=1, attention_levels=(False, True), head_channels=8, norm_groups=8)


@pytest.mark.parametrize("dims,size", [(2, 16), (3, 8)])
@pytest.mark.parametrize("backbone", ["medgen", "monai"])
def test_forward_backward_shapes(dims, size, backbone):
    torch.manual_seed(0)
    net = build_denoiser(backbone, spatial_dims=dims, in_channels=3, out_channels=2, num_classes=2, **TINY)
    x = torch.randn(2, 3, *([size] * dims))
    y = net(x, torch.tensor([0, 999]), torch.tensor([1, -1]))
    assert y.shape == (2, 2, *([size] * dims))
    (y - 1).square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the zero-initialised output conv gets a gradient, so learning can start
    assert any(g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = UNet(spatial_dims=2, in_channels=1, num_classes=2, **TINY)
    for p in a.parameters():  # leave the zero init so gradients reach every block
        p.data.normal_(0, 0.05)
    b = UNet(spatial_dims=2, in_channels=1, num_classes=2, gradient_checkpointing=True, **TINY)
    b.load_state_dict(a.state_dict())
    x, t, lab = torch.randn(2, 1, 16, 16), torch.tensor([5, 700]), torch.tensor([0, 1])
    for net in (a, b):
        net.train()
        net(x, t, lab).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_is_a_layout_only_change():
    torch.manual_seed(0)
    a = UNet(spatial_dims=3, in_channels=2, channels_last=True, **TINY)
    for p in a.parameters():
        p.data.normal_(0, 0.05)
    b = UNet(spatial_dims=3, in_channels=2, channels_last=False, **TINY)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 2, 8, 8, 8), torch.tensor([1, 500])
    torch.testing.assert_close(a(x, t), b(x, t), rtol=1e-4, atol=1e-5)


def test_rebuild_from_config():
    net = UNet(spatial_dims=2, in_channels=1, num_classes=3, **TINY)
    again = denoiser_from_config(net.config)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in net.parameters())
    assert again.null_label == 3


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ref = get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 32), ref)


def test_null_class_and_unknown_labels_agree():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, num_classes=2, **TINY)
    t = torch.tensor([3, 3, 3])
    torch.testing.assert_close(net.embed(t, None), net.embed(t, torch.tensor([-1, 2, -5])))
    assert not torch.allclose(net.embed(t, torch.tensor([0, 0, 0])), net.embed(t, None))


# --------------------------------------------------------------------------- guidance


def test_cfg_guidance_one_is_conditional_prediction():
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, num_classes=2, **TINY).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    x, t, lab = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 1, 0])
    cond = net(x, t, lab)
    uncond = net(x, t, None)
    assert not torch.allclose(cond, uncond, atol=1e-4)  # the label matters
    torch.testing.assert_close(guided_prediction(net, x, t, lab, 1.0, net.null_label), cond)
    # the two-branch path computes u + g (c - u): g = 0 is unconditional, g = 3 extrapolates
    torch.testing.assert_close(guided_prediction(net, x, t, lab, 0.0, net.null_label), uncond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided_prediction(net, x, t, lab, 3.0, net.null_label), uncond + 3 * (cond - uncond), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- schedules and targets


def test_linear_and_scaled_linear_closed_forms():
    s = NoiseSchedule(schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    ref = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(s.alphas_cumprod().double(), ref, rtol=1e-5, atol=1e-7)
    s = NoiseSchedule(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    torch.testing.assert_close(s.alphas_cumprod().double(), ref, rtol=1e-5, atol=1e-7)


def test_cosine_closed_form():
    T = 1000
    ac = NoiseSchedule(schedule="cosine", num_train_timesteps=T).alphas_cumprod().double()
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal 2021
    ref = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    # diffusers clips beta at 0.999, which only touches the very last steps
    torch.testing.assert_close(ac[:-5], ref[:-5], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(schedule):
    plain = NoiseSchedule(schedule=schedule, prediction="v").alphas_cumprod()
    zt = NoiseSchedule(schedule=schedule, prediction="v", zero_terminal_snr=True).alphas_cumprod()
    assert zt[-1] == 0 and plain[-1] > 0
    torch.testing.assert_close(zt[0], plain[0])  # Lin et al. 2024 keep the first step
    assert (zt[1:] < zt[:-1]).all()


def test_zero_terminal_snr_needs_v_or_x0():
    with pytest.raises(ConfigError, match="prediction=v"):
        NoiseSchedule(zero_terminal_snr=True, prediction="eps").validate()
    with pytest.raises(ConfigError, match="unknown diffusion keys"):
        NoiseSchedule.from_config({"schedul": "linear"})


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_target_reconstructs_x0(prediction):
    torch.manual_seed(0)
    x0, noise = torch.randn(5, 2, 4, 4, 4), torch.randn(5, 2, 4, 4, 4)
    a = torch.tensor([0.999, 0.7, 0.3, 0.05, 0.001])
    x_t = add_noise(x0, noise, a)
    torch.testing.assert_close(predict_x0(prediction, target(prediction, x0, noise, a), x_t, a), x0, rtol=1e-4, atol=1e-4)
    if prediction == "v":  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022); |v|^2 = |eps|^2 for a=0.5
        v = target("v", x0, noise, torch.full((5,), 0.5))
        torch.testing.assert_close(v, (noise - x0) / math.sqrt(2))


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "x0"), torch.tensor([0.0, 0.5, 5.0, 5.0]))


def test_loss_is_zero_for_the_oracle_and_positive_otherwise():
    """For x0 = 0 the eps target is exactly recoverable from x_t: an oracle scores zero loss."""
    ac = NoiseSchedule().alphas_cumprod()

    def oracle(x_t, t, labels):  # x_t = sqrt(1-a) eps when x0 = 0
        return x_t / (1 - ac[t]).sqrt().view(-1, 1, 1, 1)

    x0 = torch.zeros(8, 1, 4, 4)
    for loss in ("l2", "l1"):
        for gamma in (None, 5.0):
            fn = DiffusionLoss(ac, prediction="eps", loss=loss, min_snr_gamma=gamma)
            assert fn(oracle, x0).item() < 1e-8
            assert fn(lambda x, t, lab: torch.zeros_like(x), x0).item() > 0.1


# --------------------------------------------------------------------------- samplers


def _gaussian_oracle(schedule: NoiseSchedule, mu: float, s: float):
    """Exact denoiser for data ~ N(mu, s^2) i.i.d. per voxel, returning the schedule's target."""
    ac = schedule.alphas_cumprod().double()
    T = len(ac)

    def model(x_t, t, labels=None):
        # continuous t (Euler) -> interpolate alpha_bar
        tf = t.double().clamp(0, T - 1)
        lo = tf.floor().long()
        hi = (lo + 1).clamp(max=T - 1)
        a = (ac[lo] + (tf - lo) * (ac[hi] - ac[lo])).view(-1, *([1] * (x_t.ndim - 1)))
        x = x_t.double()
        x0_hat = mu + a.sqrt() * s**2 * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)  # E[x0 | x_t]
        eps_hat = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
        out = {"eps": eps_hat, "x0": x0_hat, "v": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}[schedule.prediction]
        return out.float()

    return model


@pytest.mark.parametrize("sampler,steps", [("ddpm", 200), ("ddim", 50), ("dpmpp", 25), ("euler", 100)])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_samplers_reach_the_data_distribution_with_an_exact_denoiser(sampler, steps, prediction):
    """Data N(0.5, 1) per voxel: with the exact denoiser every sampler must land on it.

    Checks the wiring (target conversion, timestep scaling, per-step noise) rather than the
    solvers' accuracy, so each sampler gets enough steps for its order (DPM-Solver++ 2M: 25).
    """
    schedule = NoiseSchedule(schedule="linear", beta_start=1e-4, beta_end=0.02, prediction=prediction)
    mu, s = 0.5, 1.0
    x = sample_loop(_gaussian_oracle(schedule, mu, s), schedule, (1, 16, 16), generators(range(16)), sampler=sampler, steps=steps)
    assert abs(x.mean().item() - mu) < 0.05  # 4096 values: standard error 0.016
    assert abs(x.std().item() - s) < 0.05


def test_zero_terminal_snr_sampling_is_finite():
    schedule = NoiseSchedule(schedule="scaled_linear", prediction="v", zero_terminal_snr=True)
    oracle = _gaussian_oracle(schedule, 0.0, 0.5)
    for sampler in ("ddim", "dpmpp", "euler", "ddpm"):
        x = sample_loop(oracle, schedule, (1, 8, 8), generators(range(8)), sampler=sampler, steps=20)
        assert torch.isfinite(x).all(), sampler
        assert abs(x.std().item() - 0.5) < 0.1, sampler


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp", "euler"])
def test_sampler_determinism_across_batch_sizes(sampler):
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, num_classes=2, **TINY).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    schedule = NoiseSchedule()
    labels = torch.tensor([0, 1, 1])
    kw = dict(sampler=sampler, steps=6, guidance=2.0, null_label=net.null_label, eta=1.0)
    full = sample_loop(net, schedule, (1, 8, 8), generators([7, 8, 9]), labels=labels, **kw)
    one = sample_loop(net, schedule, (1, 8, 8), generators([7]), labels=labels[:1], **kw)
    two = sample_loop(net, schedule, (1, 8, 8), generators([8, 9]), labels=labels[1:], **kw)
    torch.testing.assert_close(torch.cat([one, two]), full, rtol=1e-4, atol=1e-4)
    other = sample_loop(net, schedule, (1, 8, 8), generators([1, 2, 3]), labels=labels, **kw)
    assert not torch.allclose(other, full)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_clip_x0_keeps_pixel_samples_in_range(sampler):
    """A denoiser that predicts eps = 0 claims x0 = x_t / sqrt(a): unbounded unless clipped."""
    schedule = NoiseSchedule(schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="eps")
    zero = lambda x, t, labels: torch.zeros_like(x)  # noqa: E731
    kw = dict(sampler=sampler, steps=10)
    wild = sample_loop(zero, schedule, (1, 8, 8), generators(range(4)), **kw)
    tame = sample_loop(zero, schedule, (1, 8, 8), generators(range(4)), clip_x0=True, **kw)
    assert wild.abs().max() > 5
    assert tame.abs().max() <= 1.0 + 1e-5


# --------------------------------------------------------------------------- sample quality (issue 16)


def test_gaussian_blur_matches_torchvision_and_is_shared_by_2d_and_3d():
    import torchvision.transforms.functional as TF

    from medgen.diffusion.quality import gaussian_blur

    torch.manual_seed(0)
    x = torch.randn(3, 2, 20, 24)
    torch.testing.assert_close(gaussian_blur(x, 1.0), TF.gaussian_blur(x, kernel_size=7, sigma=1.0), rtol=0, atol=1e-6)
    # a volume constant along depth blurs like each of its slices
    v = x[:, :, None].expand(3, 2, 5, 20, 24)
    torch.testing.assert_close(gaussian_blur(v, 1.0)[:, :, 2], gaussian_blur(x, 1.0), rtol=0, atol=1e-6)


def test_high_frequency_energy_closed_forms():
    """White noise N(0, 1): x - G*x is Gaussian with variance sum_k (delta_k - g_k)^2, so
    E|x - G*x| = sqrt(2/pi) sqrt(1 - 2 g_0 + sum g_k^2). A smooth image has almost none."""
    from medgen.diffusion.quality import high_frequency_energy, noisy_fraction

    k = torch.exp(-0.5 * torch.arange(-3, 4, dtype=torch.float64) ** 2)
    g = torch.outer(k, k) / k.sum() ** 2
    expected = math.sqrt(2 / math.pi * (1 - 2 * g[3, 3] + g.square().sum()).item())
    noise = torch.randn(8, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    hf = high_frequency_energy(noise)
    assert hf.shape == (8,)
    assert hf.mean().item() == pytest.approx(expected, rel=0.01)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    smooth = (-(xx**2 + yy**2) * 2).exp().expand(8, 1, 64, 64)
    assert high_frequency_energy(smooth).max().item() < 0.01 * expected
    mixed = torch.cat([smooth[:6], smooth[:2] + 0.5 * noise[:2]])  # 2 of 8 under noise
    assert noisy_fraction(mixed, reference_hf=high_frequency_energy(smooth).mean().item()) == 0.25


def test_noise_risk_names_eps_pixel_priors_with_deterministic_samplers():
    from medgen.diffusion.sampling import eps_error_gain, noise_risk

    eps = NoiseSchedule(schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="eps")
    a_T = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert eps_error_gain(eps) == pytest.approx(math.sqrt((1 - a_T) / a_T), rel=1e-3)  # 157
    for sampler in ("ddim", "dpmpp", "euler"):
        risk = noise_risk(sampler, eps, pixel=True)
        assert risk and "157" in risk and "prediction=v" in risk and "ddpm" in risk
    assert noise_risk("ddpm", eps, pixel=True) is None  # ancestral steps forget the error
    assert noise_risk("ddim", eps, pixel=True, eta=1.0) is None
    assert noise_risk("ddim", eps, pixel=True, eta=0.5)  # does not re-noise fully
    scaled = NoiseSchedule(schedule="scaled_linear", prediction="eps")  # gain 15: still noisy in 3D
    assert " 15 " in noise_risk("dpmpp", scaled, pixel=True)
    assert noise_risk("dpmpp", eps, pixel=False) is None  # latents: measured clean
    v = NoiseSchedule(schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="v")
    assert all(noise_risk(s, v, pixel=True) is None for s in ("ddim", "dpmpp", "euler"))


def test_pipeline_defaults_and_warns_once(caplog):
    from medgen.diffusion.sampling import DEFAULT_SAMPLER
    from medgen.sample.pipeline import DiffusionPipeline

    net = UNet(spatial_dims=2, in_channels=1, **TINY).eval()
    config = {"sample_shape": [1, 8, 8], "latent": None}
    eps = NoiseSchedule(schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="eps")
    pipe = DiffusionPipeline(net, eps, config)
    s = pipe.sampling_settings()  # a run saved before sample.sampler existed: the measured default
    assert (s["sampler"], s["steps"]) == DEFAULT_SAMPLER[("pixel", 2)]
    volume = DiffusionPipeline(UNet(spatial_dims=3, in_channels=1, **TINY).eval(), NoiseSchedule(prediction="v"),
                               {"sample_shape": [1, 8, 8, 8], "latent": None}).sampling_settings()
    assert (volume["sampler"], volume["steps"]) == DEFAULT_SAMPLER[("pixel", 3)] == ("ddpm", 25)  # measured per dimensionality
    own = DiffusionPipeline(net, eps, {**config, "sampling": {"sampler": "ddpm", "steps": 7}}).sampling_settings()
    assert (own["sampler"], own["steps"]) == ("ddpm", 7)  # the run's own choice wins over the default
    with caplog.at_level("WARNING", logger="medgen.sample.pipeline"):
        pipe.sample(3, sampler="dpmpp", steps=2, batch_size=1)
        pipe.sample(1, sampler="dpmpp", steps=2)
    assert len([r for r in caplog.records if "leaves noise" in r.getMessage()]) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="medgen.sample.pipeline"):
        pipe.sample(1, sampler="ddpm", steps=2)
        DiffusionPipeline(net, NoiseSchedule(prediction="v"), config).sample(1, sampler="dpmpp", steps=2)
    assert not caplog.records
