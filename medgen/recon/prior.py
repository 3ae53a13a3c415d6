"""A medgen pixel-space diffusion run as a deepinv denoiser and a deepinv diffusion SDE.

medgen trains a discrete DDPM (Ho et al. 2020): x_t = sqrt(ab_t) u0 + sqrt(1 - ab_t) eps on images
u0 in [-1, 1], t = 0..T-1, with an eps / v / x0 target. deepinv's posterior samplers speak the
EDM language instead (Karras et al. 2022): a state x = s(tau) (x0 + sigma(tau) n) with x0 in
[0, 1], and a denoiser D(x0 + sigma n, sigma) -> x0. The two are the same process:

    u = 2 x - 1,  sigma' = 2 sigma  (the [-1, 1] noise level),  ab = 1 / (1 + sigma'^2),  s = sqrt(ab),

so `MedgenDenoiser` turns (x, sigma) into the network's (x_t, t) and its output back into an x0
estimate, and `DiscreteScheduleSDE` is deepinv's `EDMDiffusionSDE` with sigma(tau), s(tau) read
from the run's own alpha-bar table (any of medgen's schedules, zero terminal SNR included), on the
time axis tau = k / T, k = 0..T: k = t + 1 is the network's timestep t and tau = 0 is the clean
image (sigma = 0). On that grid deepinv's ancestral solver is exactly DDPM / DDIM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from medgen.diffusion import NoiseSchedule, predict_x0
from medgen.errors import ConfigError, RunError


def _sigma_table(schedule: NoiseSchedule) -> torch.Tensor:
    """sigma'_t = sqrt((1 - ab_t) / ab_t), t = 0..T-1, float64 ([-1, 1] units; inf at zero SNR)."""
    ab = schedule.alphas_cumprod().double()
    return ((1 - ab) / ab).sqrt()


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (numpy.interp) of increasing `xp`, clamped at both ends."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    lo, hi = xp[idx - 1], xp[idx]
    w = ((x - lo) / (hi - lo).clamp_min(1e-30)).clamp(0, 1)
    return fp[idx - 1] + w * (fp[idx] - fp[idx - 1])


def _deepinv_denoiser_base():
    from deepinv.models import Denoiser

    return Denoiser


class MedgenDenoiser(_deepinv_denoiser_base()):
    """A medgen pixel UNet as a `deepinv.models.Denoiser`: D(x0 + sigma n, sigma) -> x0 in [0, 1].

    Input (B, 2, H, W) complex images (deepinv's MRI layout) or (B, 1, H, W). medgen priors have
    one real channel: the real channel goes through the network, and the imaginary channel is
    denoised to 0, which is what a prior of real (magnitude) images says about it. sigma: a float
    or (B,), in [0, 1] image units. The network's timestep for sigma is interpolated in log sigma on
    the training table (fractional timesteps feed its sinusoidal embedding); at the table's values
    it is the exact integer timestep. `clip` clips the x0 estimate to [0, 1] as medgen's pixel
    samplers do (an eps prediction at high noise overshoots by 1/sqrt(ab)).

    complex_prior: a two-channel (real, imaginary) prior trained on complex images with a
    zero-preserving intensity mapping (`check_pixel_prior`). Both channels go through the network
    with u = 2 x (no offset: a complex image is not in [0, 1]); sigma' = 2 sigma as for magnitude
    priors, so the SDE is the same. The probe hands it images of magnitude <= 0.5 (|u| <= 1).
    """

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule, clip: bool = True, complex_prior: bool = False):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.prediction = schedule.prediction
        self.clip = clip
        self.complex_prior = bool(complex_prior)
        sigma = _sigma_table(schedule)
        finite = torch.isfinite(sigma)
        self.register_buffer("log_sigma", sigma[finite].log(), persistent=False)  # increasing in t
        self.register_buffer("timesteps", torch.arange(len(sigma), dtype=torch.float64)[finite], persistent=False)

    def timestep(self, sigma_pm1: torch.Tensor) -> torch.Tensor:
        """The network's (fractional) timestep whose training noise level is sigma' ([-1, 1] units)."""
        v = sigma_pm1.double().clamp_min(1e-30).log()
        return _interp(v, self.log_sigma.to(v.device), self.timesteps.to(v.device))

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        B = x.shape[0]
        sigma = self._handle_sigma(sigma, batch_size=B, device=x.device, dtype=torch.float32)  # (B,)
        sigma_pm1 = 2 * sigma  # [-1, 1] units
        ab = 1 / (1 + sigma_pm1.double().square())  # (B,)
        if self.complex_prior:
            if x.shape[1] != 2:
                raise ValueError(f"a complex prior denoises (B, 2, H, W) complex images, got {tuple(x.shape)}")
            u = 2 * x.float()  # (B, 2, H, W): real and imaginary channels, zero stays zero
        else:
            u = 2 * x[:, :1].float() - 1  # (B, 1, H, W): the real channel, [0, 1] -> [-1, 1]
        x_t = u * ab.sqrt().float().view(B, 1, 1, 1)  # medgen's x_t
        out = self.net(x_t, self.timestep(sigma_pm1).float()).float()
        u0 = predict_x0(self.prediction, out, x_t, ab.float())
        if self.clip:
            u0 = u0.clamp(-1, 1)
        if self.complex_prior:
            return u0 / 2
        x0 = (u0 + 1) / 2  # (B, 1, H, W) in [0, 1]
        return torch.cat([x0, torch.zeros_like(x0)], 1) if x.shape[1] == 2 else x0


class DiscreteScheduleSDE:
    """Factory for deepinv's `EDMDiffusionSDE` on a medgen schedule (see the module docstring)."""

    def __init__(self, schedule: NoiseSchedule):
        sigma = _sigma_table(schedule) / 2  # [0, 1] units
        self.T = len(sigma)
        # k = 0 is the clean image; k = t + 1 the network's timestep t
        self.sigma = torch.cat([torch.zeros(1, dtype=torch.float64), sigma])
        finite = torch.isfinite(self.sigma).nonzero().flatten()
        self.k_max = int(finite.max())  # T, or T - 1 under zero terminal SNR (sigma = inf at k = T)

    def sigma_t(self, tau: torch.Tensor | float) -> torch.Tensor:
        tau = torch.as_tensor(tau, dtype=torch.float64)
        k = torch.arange(self.T + 1, dtype=torch.float64, device=tau.device)
        return _interp(tau.reshape(-1) * self.T, k, self.sigma.to(tau.device)).reshape(tau.shape)

    def scale_t(self, tau: torch.Tensor | float) -> torch.Tensor:
        return 1 / (1 + 4 * self.sigma_t(tau).square()).sqrt()  # sqrt(ab)

    def timesteps(self, steps: int) -> torch.Tensor:
        """`steps` + 1 decreasing times: trailing spacing over the network's timesteps (as medgen's
        samplers, Lin et al. 2024) from the noisiest finite level, then tau = 0."""
        if steps < 1 or steps > self.k_max:
            raise ConfigError(f"posterior sampling steps must be in [1, {self.k_max}], got {steps}")
        k = torch.round(self.k_max - torch.arange(steps, dtype=torch.float64) * self.k_max / steps)
        return torch.cat([k, torch.zeros(1, dtype=torch.float64)]) / self.T

    def build(self, denoiser: torch.nn.Module, device: torch.device | str = "cpu"):
        """deepinv's EDMDiffusionSDE with this schedule, on [0, 1] images (`minus_one_one` off:
        `denoiser` speaks [0, 1] itself)."""
        from deepinv.sampling import EDMDiffusionSDE

        return EDMDiffusionSDE(sigma_t=self.sigma_t, scale_t=self.scale_t, denoiser=denoiser, minus_one_one=False,
                               device=torch.device(device), dtype=torch.float64)


def check_pixel_prior(run_dir: str | os.PathLike) -> dict:
    """The run's model config, or a ConfigError when it cannot serve as an MRI prior."""
    from medgen.sample.pipeline import diffusion_model

    try:
        _, config = diffusion_model(run_dir)
    except RunError as e:
        raise RunError(f"--prior: {e}") from None
    kinds = [name for name, bad in (("latent", bool(config.get("latent"))), ("3D", int(config.get("spatial_dims", 2)) != 2)) if bad]
    if kinds:
        raise ConfigError(f"--prior {run_dir}: the probe needs a 2D pixel-space prior; this run is {'/'.join(kinds)} "
                          f"(train one with `medgen train diffusion` without autoencoder.run, on 2D images)")
    channels = int(config["sample_shape"][0])
    if channels not in (1, 2):
        raise ConfigError(f"--prior {run_dir}: the probe needs a one-channel (magnitude) or two-channel (real, imaginary) "
                          f"prior; this run has {channels} channels")
    if channels == 2:
        intensity = (config.get("data") or {}).get("intensity") or {"mode": "auto"}
        lo, hi = (intensity.get("in_range") or [None, None]) if intensity.get("mode") == "fixed" else (None, None)
        if not (intensity.get("mode") == "none" or (lo is not None and float(lo) == -float(hi))):
            raise ConfigError(f"--prior {run_dir}: a two-channel prior is read as complex (real, imaginary) images, which needs "
                              f"an intensity mapping that keeps 0 at 0; this run used data.intensity {intensity}. Train it with "
                              f"data.intensity.mode=fixed and a symmetric in_range [-a, a] (or mode none)")
    return config


def is_complex_prior(config: dict) -> bool:
    """A two-channel run: (real, imaginary) images (checked by `check_pixel_prior`)."""
    return int(config["sample_shape"][0]) == 2


class PixelPrior:
    """A loaded pixel-space run: `denoiser` (deepinv convention), `sde` factory, and what the
    report records (run path, sha256 of the weights, image shape, schedule)."""

    def __init__(self, run_dir: str | os.PathLike, device: torch.device | str = "cpu", clip: bool = True):
        from medgen.sample.pipeline import DiffusionPipeline

        self.run_dir = Path(run_dir)
        self.config = check_pixel_prior(run_dir)
        pipe = DiffusionPipeline.from_run(run_dir, device)
        self.schedule = pipe.schedule
        self.complex = is_complex_prior(self.config)
        self.denoiser = MedgenDenoiser(pipe.denoiser, pipe.schedule, clip=clip, complex_prior=self.complex).to(device)
        self.sde = DiscreteScheduleSDE(pipe.schedule)
        self.sha256 = pipe.checkpoint_sha256
        self.image_shape = tuple(int(s) for s in self.config["sample_shape"][1:])  # (H, W)

    @property
    def recipe(self) -> dict[str, Any]:
        return {"run": str(self.run_dir.resolve()), "sha256": self.sha256, "image_shape": list(self.image_shape),
                "images": "complex (real, imaginary)" if self.complex else "magnitude",
                "schedule": self.schedule.to_dict(), "backbone": self.config.get("backbone"), "step": self.config.get("step")}
