"""Posterior sampling for MRI with a medgen prior: the projection sampler and DPS.

Both run on deepinv: the prior is `MedgenDenoiser` inside `DiscreteScheduleSDE` (deepinv's
`EDMDiffusionSDE` on the run's own alpha-bar table), and the prior's steps are deepinv's ancestral
DDPM steps (`DDPMSolver`; on that table they are exactly Ho et al. 2020's sampler).

- DPS (Chung et al. 2023) is deepinv's `PosteriorDiffusion` with `DPSDataFidelity` (guidance "norm":
  the gradient of ||A D(x_t) - y||, the step of the paper).
- The projection sampler of Song et al. 2022 ("Solving inverse problems in medical imaging with
  score-based generative models") is our own loop, because deepinv's `PosteriorDiffusion` only adds
  a likelihood *score* to the prior's drift: it cannot replace the measured k-space of the state
  after each prior step, which is what this method does. After every deepinv prior step to noise
  level (s, sigma) the measured lines of x are replaced by noised measurements
  y_t = s (y + sigma A n), i.e. x <- x + lambda A^+ (y_t - A x) (lambda = 1: full replacement; A^+ is
  deepinv's pseudo-inverse, A^H for single-coil masks, conjugate gradients for coils); the last step
  (sigma = 0, s = 1) is hard data consistency, A x = y. Song et al. alternate a reverse-diffusion
  predictor with Langevin correctors on a VE SDE; with a DDPM-trained prior we use its ancestral
  step as the predictor and no corrector.

Reproducibility: every batch element owns a `torch.Generator`, which draws its initial noise, the
prior steps' noise and the measurement noise. The same (image, posterior sample) seed therefore gives
the same reconstruction whatever else is in the batch: clean and perturbed measurements of one
image share their noise (common random numbers), so their difference is the perturbation's effect.
"""

from __future__ import annotations

from typing import Sequence

import torch

from medgen.recon.prior import DiscreteScheduleSDE

DIFFUSION_METHODS = ("projection", "dps")


def _per_sample_randn(gens: Sequence[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """(B, ...) standard normal noise, element i from gens[i] (drawn on the CPU, float64)."""
    noise = torch.stack([torch.randn(like.shape[1:], generator=g, dtype=torch.float64) for g in gens])
    return noise.to(device=like.device, dtype=like.dtype)


def _solver(timesteps: torch.Tensor, gens: Sequence[torch.Generator]):
    """deepinv's DDPMSolver whose noise comes from one generator per batch element."""
    from deepinv.sampling import DDPMSolver

    class PerSampleDDPMSolver(DDPMSolver):
        def randn_like(self, input: torch.Tensor, seed: int | None = None) -> torch.Tensor:
            return _per_sample_randn(gens, input)

    return PerSampleDDPMSolver(timesteps=timesteps)


def _initial_state(sde, tau: torch.Tensor, shape: Sequence[int], gens, device) -> torch.Tensor:
    """x_T ~ N(0, (s sigma)^2) at the first time, per-sample generators."""
    z = _per_sample_randn(gens, torch.empty(shape, dtype=torch.float64, device=device))
    return z * sde.sigma_t(tau) * sde.scale_t(tau)


def sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def projection_step(physics, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | float, sigma: torch.Tensor | float,
                    noise: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Song et al. 2022's data consistency at noise level (scale, sigma): move the measured
    k-space of x to y_t = scale (y + sigma A noise); lam = 1 replaces it."""
    y_t = scale * (y + sigma * physics.A(noise))
    return x + lam * physics.A_dagger(y_t - physics.A(x))


@torch.no_grad()
def projection_reconstruct(denoiser: torch.nn.Module, schedule_sde: DiscreteScheduleSDE, physics, y: torch.Tensor,
                           gens: Sequence[torch.Generator], *, steps: int = 100, lam: float = 1.0,
                           real: bool = False) -> torch.Tensor:
    """(B, 2, H, W) complex reconstructions in [0, 1] units from k-space y, one per generator.

    real: keep only the real part after each projection step, as Han et al.'s precursor code does
    (the default keeps the complex image; the prior denoises its imaginary part towards 0 anyway)."""
    device = y.device
    sde = schedule_sde.build(denoiser, device)
    taus = schedule_sde.timesteps(steps).to(device)
    solver = _solver(taus, gens)
    y = y.double()
    shape = physics.A_adjoint(y[:1]).shape[1:]
    x = _initial_state(sde, taus[0], (len(gens), *shape), gens, device)
    for t0, t1 in zip(taus[:-1], taus[1:]):
        x, _ = solver.step(sde, t0, t1, x)  # deepinv: ancestral prior step
        noise = _per_sample_randn(gens, x)
        x = projection_step(physics, x, y, sde.scale_t(t1), sde.sigma_t(t1), noise, lam)
        if real:
            x = torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], dim=1)
    return x.float()  # tau = 0: s = 1, sigma = 0, A x = y exactly (for real=False)


def dps_reconstruct(denoiser: torch.nn.Module, schedule_sde: DiscreteScheduleSDE, physics, y: torch.Tensor,
                    gens: Sequence[torch.Generator], *, steps: int = 100, weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """DPS through deepinv's PosteriorDiffusion + DPSDataFidelity: (B, 2, H, W) in [0, 1] units.

    weight: the guidance weight, a float or one per element (B,) (the "norm" guidance multiplies each
    element's residual norm by it, so elements stay independent)."""
    from deepinv.sampling import DPSDataFidelity, PosteriorDiffusion

    device = y.device
    if isinstance(weight, torch.Tensor):
        weight = weight.to(device=device, dtype=torch.float32)
    sde = schedule_sde.build(denoiser, device)
    taus = schedule_sde.timesteps(steps).to(device)
    model = PosteriorDiffusion(data_fidelity=DPSDataFidelity(denoiser=denoiser, weight=weight, guidance="norm"),
                               denoiser=denoiser, sde=sde, solver=_solver(taus, gens), minus_one_one=False,
                               dtype=torch.float64, device=device)
    shape = physics.A_adjoint(y[:1]).shape[1:]
    x_init = _initial_state(sde, taus[0], (len(gens), *shape), gens, device)
    return model(y, physics, x_init=x_init, timesteps=taus, denoise_output=False).float()


DPS_WEIGHT_GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def calibrate_dps_weight(denoiser: torch.nn.Module, schedule_sde: DiscreteScheduleSDE, physics, y: torch.Tensor,
                         truth: torch.Tensor, *, steps: int, seeds: Sequence[int], grid: Sequence[float] = DPS_WEIGHT_GRID) -> dict:
    """The DPS weight with the best mean PSNR of |DPS(y)| against `truth` (B, 1, H, W) on clean data,
    all grid values in one batch (image i uses seeds[i] for every value). deepinv's weight does not
    carry Chung et al.'s zeta over (its step scales with the schedule's noise levels), so it is chosen
    per prior and mask like TV's lambda."""
    from medgen.recon.kspace import magnitude
    from medgen.recon.metrics import psnr

    G, B = len(grid), y.shape[0]
    weights = torch.tensor([float(w) for w in grid]).repeat_interleave(B)  # (G*B,), grid-major
    x = dps_reconstruct(denoiser, schedule_sde, physics, y.repeat(G, *([1] * (y.ndim - 1))),
                        sample_generators(list(seeds) * G), steps=steps, weight=weights)
    scores = psnr(magnitude(x), truth.repeat(G, 1, 1, 1)).view(G, B).mean(1)
    scores = torch.nan_to_num(scores, nan=-1e9)
    best = int(scores.argmax())
    return {"weight": float(grid[best]), "grid": [float(w) for w in grid], "psnr": [round(float(v), 3) for v in scores],
            "n_images": int(B), "at_grid_edge": best in (0, G - 1)}
