"""Worst-case k-space perturbations (Darestani et al. 2021; Han et al. 2024) and their random control.

A perturbation delta lives on the *full* k-space k (every column, every coil) and is added before
masking: y = M (k + delta). For a reconstruction f it maximises ||f(M(k + delta)) - f(M k)||^2 with
Adam (lr 0.1) from small Gaussian noise; after every step delta is projected back onto the ball
||delta||_2 <= eps ||k||_2, and the worst iterate seen is kept (the objective is not monotone under
projection). Gradients flow through f only (the surrogate, or TV for the white-box TV attack): the
diffusion reconstructions are never differentiated, they receive transferred perturbations.

Batching: all eps values and images are one batch of E x B independent problems. The objective is a
sum over the batch and Adam is coordinate-wise, so each problem follows exactly the trajectory it
would follow alone.

Controls (per image and eps). `random_measured_perturbation`, the probe's control: Gaussian noise on
the *sampled* k-space only, scaled so that its measured norm ||M delta_r|| equals the worst-case
delta's ||M delta||. The mask drops whatever lies off the sampled columns, and the worst-case delta
puts all of its budget on them, so only this control isolates the *direction* of the attack from its
measured energy. `random_perturbation`, the older control (row "random-full"): Gaussian noise on the
full k-space with the worst-case delta's full norm; at R=8 most of it is masked away, so it measures
the effect of the measured energy as much as of the direction.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from medgen.progress import progress
from medgen.recon.kspace import apply_mask
from medgen.recon.settings import check_eps

INIT_SCALE = 1e-3  # the start: Gaussian noise of norm 1e-3 * eps * ||k||


def _norms(x: torch.Tensor) -> torch.Tensor:
    """(B,) l2 norm of each element."""
    return x.flatten(1).norm(dim=1)


def project_ball(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Scale each delta_b into the l2 ball of radius_b (B,); radius 0 gives exactly 0."""
    norm = _norms(delta)
    factor = torch.where(norm > radius, radius / norm.clamp_min(1e-30), torch.ones_like(norm))
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def worst_case_perturbation(recon: Callable[[torch.Tensor], torch.Tensor], kspace: torch.Tensor, mask: torch.Tensor,
                            eps: Sequence[float], *, steps: int = 200, lr: float = 0.1,
                            generator: torch.Generator | None = None, desc: str = "attack") -> tuple[torch.Tensor, torch.Tensor]:
    """delta (E*B, *k) for full k-space `kspace` (B, *k), eps-major, and the objective (E*B,) it reaches.

    recon: measured k-space (n, *k) -> reconstruction (n, ...), differentiable in its input.
    desc: the progress line's name (`medgen.progress`, one unit per Adam step).
    """
    eps_t = torch.tensor(check_eps(eps), dtype=torch.float32, device=kspace.device)
    E, B = len(eps_t), kspace.shape[0]
    k = kspace.detach().repeat(E, *([1] * (kspace.ndim - 1)))  # (E*B, *k), eps-major
    radius = eps_t.repeat_interleave(B) * _norms(k)  # (E*B,)
    with torch.no_grad():
        reference = recon(apply_mask(kspace, mask)).detach()
    reference = reference.repeat(E, *([1] * (reference.ndim - 1)))

    def objective(d: torch.Tensor) -> torch.Tensor:
        return (recon(apply_mask(k + d, mask)) - reference).square().flatten(1).sum(1)

    noise = torch.randn(k.shape, generator=generator, dtype=torch.float32).to(k.device)
    start = noise * (INIT_SCALE * radius / _norms(noise).clamp_min(1e-30)).view(-1, *([1] * (k.ndim - 1)))
    delta = project_ball(start, radius).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    best = delta.detach().clone()
    best_value = torch.full((E * B,), -1.0, device=k.device)
    bar = progress(total=steps, desc=desc)
    for step in range(steps + 1):
        value = objective(delta)
        with torch.no_grad():  # keep the worst iterate so far
            better = value.detach() > best_value
            best[better] = delta.detach()[better]
            best_value = torch.where(better, value.detach(), best_value)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        (-value.sum()).backward()
        opt.step()
        with torch.no_grad():
            delta.copy_(project_ball(delta, radius))
        bar.update(1)
    bar.close()
    return best, best_value


def random_perturbation(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian directions with exactly the norms of `like`'s elements (the same layout)."""
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device)
    scale = _norms(like) / _norms(noise).clamp_min(1e-30)
    return noise * scale.view(-1, *([1] * (like.ndim - 1)))


def random_measured_perturbation(like: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise on the sampled k-space (zero elsewhere) with exactly the measured norms
    ||M like_b|| of `like`'s elements: the control that matches the energy the reconstruction sees."""
    noise = apply_mask(torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device), mask)
    scale = _norms(apply_mask(like, mask)) / _norms(noise).clamp_min(1e-30)
    return noise * scale.view(-1, *([1] * (like.ndim - 1)))
