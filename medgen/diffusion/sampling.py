"""Sampling: a pure loop over diffusers' schedulers, with classifier-free guidance.

Samplers (all with trailing timestep spacing, Lin et al. 2024):
- ddpm: ancestral sampling (Ho et al. 2020);
- ddim: DDIM with configurable eta (Song et al. 2021; eta=0 deterministic, eta=1 ~ DDPM);
- dpmpp: DPM-Solver++(2M), multistep second order (Lu et al. 2022), deterministic;
- euler: Euler discretisation of the probability-flow ODE (Karras et al. 2022), deterministic.

Which sampler for which prior (issue 16, measured with eval/sampler_quality.py, eval/RESULTS.md):
an eps-prediction prior in pixel space recovers x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), which
multiplies the network's error by sqrt((1 - a) / a), 157 at t = T - 1 on the linear schedule.
Ancestral sampling re-noises every step and forgets that error; the deterministic samplers (DDIM
at eta 0, DPM-Solver++, Euler) integrate it, and on the demo prior a third of their samples came
out as brains under noise, made in the top fifth of the schedule (clipping x0 at t >= 800 alone
removes it). A v-prediction prior (Salimans & Ho 2022) recovers x0 = sqrt(a) x_t - sqrt(1 - a) v,
with no such gain: every sampler is clean on it at 25 steps. `noise_risk` says when a
combination is expected to leave noise; `default_sampler` is the measured choice per space.

Reproducibility: every sample owns a `torch.Generator` seeded with `seed + index`; the initial
noise and every stochastic step draw each sample's noise from its own generator (diffusers'
`randn_tensor` accepts a list of generators), so the same seed gives the same samples whatever
the batch size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from medgen.diffusion.schedule import NoiseSchedule
from medgen.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpmpp", "euler")

# Default sampler and step count per space: the fastest whose FD_pca stays within 10 % of 1000
# ancestral steps on the demo priors (eval/RESULTS.md, "Samplers").
# 3D pixel: on a 16^3 v prior trained 1600 steps, DDPM at 25 steps matched 1000 ancestral steps
# while the deterministic samplers sat ~1.3x above them (clean, but farther from the data); 3D
# latent priors were not measured and keep the 2D latent choice.
DEFAULT_SAMPLER = {("pixel", 2): ("dpmpp", 25), ("pixel", 3): ("ddpm", 25),
                   ("latent", 2): ("dpmpp", 25), ("latent", 3): ("dpmpp", 25)}


def default_sampler(latent: bool, spatial_dims: int = 2) -> tuple[str, int]:
    """(sampler, steps) measured best per space (pixel or latent) and dimensionality."""
    return DEFAULT_SAMPLER[("latent" if latent else "pixel", 3 if spatial_dims == 3 else 2)]


def renoises(sampler: str, eta: float = 0.0) -> bool:
    """Whether `sampler` re-noises fully at every step (DDPM; DDIM at eta 1), forgetting the x0 error."""
    return sampler == "ddpm" or (sampler == "ddim" and eta >= 1)


def eps_error_gain(schedule: NoiseSchedule) -> float:
    """sqrt((1 - a_T) / a_T): how much an eps-prediction's error grows in x0 at the noisiest step."""
    a = float(schedule.alphas_cumprod()[-1])
    return float("inf") if a <= 0 else ((1 - a) / a) ** 0.5


def noise_risk(sampler: str, schedule: NoiseSchedule, *, pixel: bool, eta: float = 0.0) -> str | None:
    """Why `sampler` is expected to leave noise in this prior's samples, or None when it is not.

    Every eps-prediction prior in pixel space with a sampler that does not re-noise fully: measured
    noisy on the linear schedule (gain 157, 2D) and on scaled_linear (gain 15, 3D); v and
    latent priors were clean with every sampler (eval/RESULTS.md "Samplers").
    """
    if not pixel or schedule.prediction != "eps" or renoises(sampler, eta):
        return None
    return (f"the {sampler} sampler on an eps-prediction pixel-space prior leaves noise in the samples: x0 = "
            f"(x_t - sqrt(1 - a) eps) / sqrt(a) multiplies the network's error by up to "
            f"{eps_error_gain(schedule):.0f} at the noisiest step, and a sampler that does not re-noise carries that "
            f"error into the image (eval/RESULTS.md \"Samplers\": up to half of the samples noisy). Use --sampler "
            f"ddpm (ancestral steps forget the error), or train the prior with diffusion.prediction=v")


def make_scheduler(sampler: str, schedule: NoiseSchedule, clip_x0: bool = False):
    """A fresh diffusers scheduler for `sampler` on `schedule`.

    clip_x0: clip each step's predicted x0 to [-1, 1] (pixel data, whose range is known; Ho et al.
    2020). At high noise an eps-prediction divides the network's error by sqrt(alpha_bar) ~ 0.01,
    and a few-step solver carries that overshoot into the image. Latents are not clipped. Euler
    has no clipping in diffusers.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    kw = schedule.scheduler_kwargs()
    if sampler == "ddpm":
        return DDPMScheduler(**kw, clip_sample=clip_x0, clip_sample_range=1.0)
    if sampler == "ddim":
        return DDIMScheduler(**kw, clip_sample=clip_x0, clip_sample_range=1.0, set_alpha_to_one=True)
    if sampler == "dpmpp":
        # dynamic thresholding (Saharia et al. 2022) with max 1.0 is a clip of x0 to [-1, 1]
        return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2, thresholding=clip_x0,
                                           sample_max_value=1.0)
    if sampler == "euler":
        return EulerDiscreteScheduler(**kw)
    raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def guided_prediction(model: Callable, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: float, null_label: int | None) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2021): out = u + g (c - u).

    g = 1 (or no labels) is the plain conditional prediction and costs one forward pass; other g
    run the conditional and the null-class batch together in one forward pass.
    """
    if labels is None or null_label is None or guidance == 1.0:
        return model(x, t, labels)
    null = torch.full_like(labels, null_label)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_loop(
    model: Callable,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    gens: list[torch.Generator],
    *,
    sampler: str = "dpmpp",
    steps: int = 25,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    null_label: int | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate len(gens) samples of per-sample `shape` (C, *S); returns float32 (B, C, *S).

    `model(x, t, labels)` returns the network's target (eps, v or x0 as set in `schedule`).
    """
    device = torch.device(device)
    scheduler = make_scheduler(sampler, schedule, clip_x0)
    if steps < 1 or steps > schedule.num_train_timesteps:
        raise ConfigError(f"steps must be in [1, {schedule.num_train_timesteps}], got {steps}")
    scheduler.set_timesteps(steps, device=device)
    B = len(gens)
    from diffusers.utils.torch_utils import randn_tensor

    x = randn_tensor((B, *shape), generator=gens, device=device, dtype=torch.float32)
    x = x * scheduler.init_noise_sigma
    if labels is not None:
        labels = labels.to(device)
    step_kwargs: dict = {"generator": gens} if sampler in ("ddpm", "ddim", "euler") else {}
    if sampler == "ddim":
        step_kwargs["eta"] = float(eta)
    use_autocast = autocast_dtype is not None and device.type in ("cuda", "cpu")
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        t_batch = t.to(device).expand(B)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=use_autocast):
            out = guided_prediction(model, x_in, t_batch, labels, guidance, null_label)
        x = scheduler.step(out.float(), t, x, **step_kwargs).prev_sample
    return x
