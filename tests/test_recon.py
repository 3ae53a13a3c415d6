"""MRI probe building blocks: deepinv operators and masks on our tensors, the prior as a deepinv
denoiser/SDE, data consistency, the attack's projection and control, metrics, posterior seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.diffusion import NoiseSchedule
from medgen.errors import ConfigError
from medgen.models.unet import build_denoiser
from medgen.recon.attack import project_ball, random_perturbation, worst_case_perturbation
from medgen.recon.kspace import (
    apply_mask,
    center_fraction_for,
    check_acceleration,
    fully_sampled,
    kspace_mask,
    magnitude,
    mri_physics,
    to_complex,
    zero_filled,
)
from medgen.recon.prior import DiscreteScheduleSDE, MedgenDenoiser
from medgen.recon.sampling import dps_reconstruct, projection_reconstruct, projection_step, sample_generators

SCHEDULE = NoiseSchedule(schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="eps")


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth positive (n, 1, size, size) images in [0, 1] with a bright blob (brain-like support)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        c = torch.rand(2, generator=g) * 0.4 - 0.2
        r = 0.5 + 0.2 * torch.rand(1, generator=g)
        blob = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < r**2).float()
        out.append(blob * (0.6 + 0.4 * torch.rand(size, size, generator=g)))
    x = torch.stack(out)[:, None]
    return x / x.amax(dim=(1, 2, 3), keepdim=True)


def _tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_denoiser("medgen", spatial_dims=2, in_channels=1, channels=[8, 16], num_res_blocks=1,
                          attention_levels=[False, False], head_channels=8, norm_groups=4, num_classes=0).eval()


# ----------------------------------------------------------------------------- operators and masks


@pytest.mark.parametrize("coils", [1, 4])
def test_operators_unitary_and_adjoint_consistent(coils):
    """Fully sampled A is an isometry with A^H A = I; masked A is adjoint-consistent and A A^H = M."""
    x = to_complex(_images(2, 32))
    g = torch.Generator().manual_seed(1)
    full = fully_sampled(mri_physics(torch.ones(32, 32), coils))
    k = full.A(x)
    assert k.shape == ((2, 2, 32, 32) if coils == 1 else (2, 2, coils, 32, 32))
    torch.testing.assert_close(k.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(full.A_adjoint(k), x, rtol=0, atol=1e-5)

    physics = mri_physics(kspace_mask((32, 32), 4), coils)
    u = torch.randn(x.shape, generator=g)
    v = torch.randn(physics.A(u).shape, generator=g)
    lhs = (physics.A(u) * v).sum()  # <A u, v> (real inner product of the 2-channel layout)
    rhs = (u * physics.A_adjoint(v)).sum()  # <u, A^H v>
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)
    if coils == 1:  # single coil: A A^H y = M y, so A^H is the zero-filled pseudo-inverse
        torch.testing.assert_close(physics.A(physics.A_adjoint(v)), apply_mask(v, physics.mask), rtol=0, atol=1e-5)
    # y = M (F S x) from the full k-space equals deepinv's masked operator
    torch.testing.assert_close(apply_mask(k, physics.mask), physics.A(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["equispaced", "random"])
@pytest.mark.parametrize("width", [32, 64, 128, 320])
@pytest.mark.parametrize("R", [4, 8])
def test_masks_reach_acceleration_and_centre_fraction(kind, width, R):
    mask = kspace_mask((width // 2, width), R, kind, seed=3)
    assert mask.shape == (width // 2, width)
    assert torch.equal(mask, mask[:1].expand_as(mask))  # whole phase-encoding columns
    cols = mask[0]
    assert set(cols.unique().tolist()) <= {0.0, 1.0}
    cf = center_fraction_for(R)
    assert cf == {4: 0.08, 8: 0.04}[R]  # fastMRI's pairs
    n_center = int(cf * width)
    pad = (width - n_center + 1) // 2
    assert cols[pad : pad + n_center].all(), "the central block is sampled"
    sampled = int(cols.sum().item())
    if kind == "random":
        assert sampled == width // R  # exactly W / R columns
    else:  # fastMRI's equispaced rule: outer columns every ~R' from a random offset, some may land in the centre
        assert abs(sampled - width / R) <= 1, f"{sampled} columns of {width} for R={R}"
        assert not torch.equal(mask, kspace_mask((width // 2, width), R, kind, seed=4))


def test_acceleration_the_width_cannot_reach_is_refused():
    check_acceleration(32, 8)  # 4 columns: 1 central + 3 outer
    with pytest.raises(ConfigError, match="cannot be reached on images 16 px wide"):
        check_acceleration(16, 8)  # 2 columns, 0 central
    with pytest.raises(ConfigError, match="cannot be reached"):
        kspace_mask((32, 32), 32)


# ----------------------------------------------------------------------------- the prior in deepinv's language


class _OracleEps(torch.nn.Module):
    """Returns the exact noise of x_t for a known clean image u0 (so x0 estimates must be exact)."""

    def __init__(self, u0: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.u0, self.ab = u0, schedule.alphas_cumprod().double()

    def forward(self, x_t, t, labels=None):
        ab = self.ab[t.round().long()].view(-1, 1, 1, 1)
        return ((x_t.double() - ab.sqrt() * self.u0) / (1 - ab).sqrt()).float()


def test_denoiser_wrapper_maps_units_and_timesteps_exactly():
    """deepinv's (x0 + sigma n, sigma) in [0, 1] -> medgen's (x_t, t) in [-1, 1] and back: an oracle
    network gives x0 back, the timestep of a table sigma is that integer, the SDE reads the table."""
    x0 = _images(2, 16)
    u0 = 2 * x0 - 1
    den = MedgenDenoiser(_OracleEps(u0, SCHEDULE), SCHEDULE, clip=False)
    ab = SCHEDULE.alphas_cumprod().double()
    sde = DiscreteScheduleSDE(SCHEDULE)
    for t in (0, 17, 500, 999):
        sigma = float(((1 - ab[t]) / ab[t]).sqrt() / 2)  # [0, 1] units
        assert den.timestep(torch.tensor([2 * sigma], dtype=torch.float64)).item() == pytest.approx(t, abs=1e-6)
        noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        out = den(to_complex(noisy), sigma)
        torch.testing.assert_close(out[:, :1], x0, rtol=0, atol=2e-3 if t == 999 else 2e-5)
        assert torch.equal(out[:, 1:], torch.zeros_like(x0))  # the prior's imaginary part is 0
        tau = torch.tensor((t + 1) / SCHEDULE.num_train_timesteps, dtype=torch.float64)
        assert sde.sigma_t(tau).item() == pytest.approx(sigma, rel=1e-9)
        assert sde.scale_t(tau).item() == pytest.approx(float(ab[t].sqrt()), rel=1e-9)
    assert sde.sigma_t(torch.tensor(0.0, dtype=torch.float64)).item() == 0.0


def test_deepinv_ddim_on_our_sde_equals_diffusers_ddim():
    """deepinv's DDIM solver on DiscreteScheduleSDE + MedgenDenoiser is diffusers' DDIM sampler of the
    same network (trailing spacing, final alpha 1), up to float rounding."""
    from diffusers import DDIMScheduler

    from deepinv.sampling import DDIMSolver

    net = _tiny_unet(1)
    steps, shape = 8, (2, 1, 16, 16)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    # diffusers / medgen: x_T = z in [-1, 1] units
    sched = DDIMScheduler(**SCHEDULE.scheduler_kwargs(), clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x, t.expand(shape[0])), t, x, eta=0.0).prev_sample
    ours = DiscreteScheduleSDE(SCHEDULE)
    taus = ours.timesteps(steps)
    assert (taus[:-1] * SCHEDULE.num_train_timesteps - 1).round().long().tolist() == sched.timesteps.tolist()
    sde = ours.build(MedgenDenoiser(net, SCHEDULE, clip=False))
    state = to_complex((z.double() + ours.scale_t(taus[0])) / 2)  # x = s (x0 + sigma n) = (u_t + s) / 2, imaginary 0
    out = DDIMSolver(timesteps=taus).sample(sde, state).sample
    torch.testing.assert_close(out[:, :1].float(), (x + 1) / 2, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- data consistency


@pytest.mark.parametrize("coils", [1, 4])
def test_projection_step_reduces_kspace_residual(coils):
    g = torch.Generator().manual_seed(0)
    physics = mri_physics(kspace_mask((32, 32), 4), coils)
    y = physics.A(to_complex(_images(2)))
    x = torch.randn(2, 2, 32, 32, generator=g)
    noise = torch.randn(2, 2, 32, 32, generator=g)
    scale, sigma = 0.7, 0.3
    target = scale * (y + sigma * physics.A(noise))
    before = (physics.A(x) - target).norm()
    for lam in (1.0, 0.5):
        after = (physics.A(projection_step(physics, x, y, scale, sigma, noise, lam)) - target).norm()
        assert after < before
        if coils == 1:  # exact line replacement: residual scaled by (1 - lambda)
            assert after.item() == pytest.approx((1 - lam) * before.item(), abs=1e-4)


def test_dps_and_tv_data_terms_reduce_kspace_residual():
    """The DPS likelihood term deepinv's PosteriorDiffusion adds (through our denoiser) and the TV
    solver's data-fidelity step both point towards the measurements."""
    from deepinv.optim import L2
    from deepinv.sampling import DPSDataFidelity, PosteriorDiffusion

    physics = mri_physics(kspace_mask((16, 16), 4), 1)
    y = physics.A(to_complex(_images(2, 16)))
    den = MedgenDenoiser(_tiny_unet(2), SCHEDULE)
    ours = DiscreteScheduleSDE(SCHEDULE)
    sde = ours.build(den)
    post = PosteriorDiffusion(data_fidelity=DPSDataFidelity(denoiser=den), denoiser=den, sde=sde, solver=_dummy_solver(),
                              minus_one_one=False, dtype=torch.float64)
    tau = torch.tensor(0.3, dtype=torch.float64)
    s = sde.scale_t(tau)
    sigma = sde.sigma_t(tau)
    x = s * (to_complex(_images(2, 16, seed=5)).double() + sigma * torch.randn(2, 2, 16, 16, dtype=torch.float64))
    likelihood = post.score(y, physics, x, tau) - sde.score(x, tau)  # the data term's share of the score

    def residual(state):
        return (physics.A(den(state / s, sigma)) - y).flatten(1).norm(dim=1)

    step = 1e-3 / likelihood.flatten(1).norm(dim=1).max()
    assert (residual(x + step * likelihood) < residual(x)).all()

    x_img = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    moved = x_img - L2().grad(x_img, y, physics)  # PGD's data step with stepsize 1
    assert (physics.A(moved) - y).norm() < 1e-4 * (physics.A(x_img) - y).norm()


def _dummy_solver():
    from deepinv.sampling import DDPMSolver

    return DDPMSolver(timesteps=torch.linspace(1, 0, 3))


# ----------------------------------------------------------------------------- attack


def test_projection_keeps_relative_norm_and_eps_zero_is_exactly_zero():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(5, 2, 8, 8, generator=g) * torch.tensor([0.05, 1, 10, 100, 0.0]).view(-1, 1, 1, 1)
    radius = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    p = project_ball(d, radius)
    norms = p.flatten(1).norm(dim=1)
    assert (norms <= radius * (1 + 1e-6)).all()
    torch.testing.assert_close(p[0], d[0])  # inside: untouched
    torch.testing.assert_close(norms[1:3], torch.ones(2))  # outside: onto the sphere
    assert torch.equal(p[3], torch.zeros_like(p[3]))

    physics = fully_sampled(mri_physics(torch.ones(16, 16)))
    k = physics.A(to_complex(_images(3, 16)))
    mask = kspace_mask((16, 16), 4)
    net = torch.nn.Conv2d(2, 2, 3, padding=1)
    eps = [0.0, 0.01, 0.05, 0.3]
    delta, value = worst_case_perturbation(lambda y: net(zero_filled(physics, y)), k, mask, eps, steps=15,
                                           generator=torch.Generator().manual_seed(1))
    rel = (delta.flatten(1).norm(dim=1) / k.repeat(4, 1, 1, 1).flatten(1).norm(dim=1)).view(4, 3)
    assert (rel <= torch.tensor(eps).view(-1, 1) * (1 + 1e-5)).all()
    assert torch.equal(delta[:3], torch.zeros_like(delta[:3]))  # eps = 0: exactly no perturbation
    assert (rel[1:] > torch.tensor(eps[1:]).view(-1, 1) * 0.9).all()  # the worst case sits on the ball


def test_worst_case_hurts_surrogate_more_than_random_of_same_norm(cohort_2d):
    from medgen.recon.data import load_slices
    from medgen.recon.metrics import psnr
    from medgen.recon.surrogate import surrogate_config, train_surrogate

    cfg = surrogate_config(["train.max_steps=120", "train.batch_size=8", "network.channels_per_scale=[8,16]"],
                           acceleration=4, data={"path": str(cohort_2d)})
    sur = train_surrogate(cfg, "cpu").requires_grad_(False)
    val = sur.config["train"]["val"]  # the surrogate must have learned something for "hurt" to mean anything
    assert val["psnr_surrogate"] > val["psnr_zero_filled"] + 3, val
    x, _ = load_slices(cohort_2d)
    x = x[:4]
    physics = mri_physics(kspace_mask((32, 32), 4))
    k = fully_sampled(physics).A(to_complex(x))

    def f(y):
        return sur(physics, y)

    delta, _ = worst_case_perturbation(f, k, physics.mask, [0.05], steps=20, generator=torch.Generator().manual_seed(0))
    rand = random_perturbation(delta, torch.Generator().manual_seed(1))
    torch.testing.assert_close(rand.flatten(1).norm(dim=1), delta.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    with torch.no_grad():
        clean = f(apply_mask(k, physics.mask))
        attacked, randomised = f(apply_mask(k + delta, physics.mask)), f(apply_mask(k + rand, physics.mask))
    change = (attacked - clean).flatten(1).norm(dim=1)
    assert (change > 3 * (randomised - clean).flatten(1).norm(dim=1)).all()  # the attack's objective
    assert (psnr(attacked, x) < psnr(randomised, x) - 0.5).all(), (psnr(attacked, x), psnr(randomised, x))


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_scikit_image_and_fastmri():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from medgen.recon.metrics import recon_metrics

    truth = _images(3, 48) * torch.tensor([1.0, 0.7, 0.4]).view(-1, 1, 1, 1)  # maxima differ: data_range = g.max()
    noisy = (truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    m = recon_metrics(noisy, truth)
    for i in range(3):
        g, x = truth[i, 0].double().numpy(), noisy[i, 0].double().numpy()
        assert m["psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(g, x, data_range=g.max()), abs=1e-3)
        assert m["ssim"][i].item() == pytest.approx(structural_similarity(g, x, data_range=g.max()), abs=1e-4)
        assert m["nmse"][i].item() == pytest.approx(np.sum((g - x) ** 2) / np.sum(g**2), rel=1e-4)


# ----------------------------------------------------------------------------- posterior samples


@pytest.mark.parametrize("method", ["projection", "dps"])
def test_posterior_samples_differ_reproduce_and_ignore_the_batch(method):
    den = MedgenDenoiser(_tiny_unet(3), SCHEDULE)
    sde = DiscreteScheduleSDE(SCHEDULE)
    physics = mri_physics(kspace_mask((16, 16), 4))
    y = physics.A(to_complex(_images(1, 16))).repeat(3, 1, 1, 1)
    run = projection_reconstruct if method == "projection" else dps_reconstruct
    a = run(den, sde, physics, y, sample_generators([10, 11, 12]), steps=4)
    b = run(den, sde, physics, y, sample_generators([10, 11, 12]), steps=4)
    alone = run(den, sde, physics, y[1:2], sample_generators([11]), steps=4)
    assert torch.equal(a, b)
    torch.testing.assert_close(alone[0], a[1], rtol=0, atol=1e-6)  # seed of the element, not of the batch
    spread = (a[0] - a[1]).abs().mean()
    assert spread > 1e-3, "different seeds give different posterior samples"
    if method == "projection":  # the last step is hard data consistency
        torch.testing.assert_close(physics.A(a), y, rtol=0, atol=1e-5)
    assert magnitude(a).shape == (3, 1, 16, 16)


def test_projection_real_keeps_only_the_real_part():
    """--projection-real (Han et al.'s code): after every projection step the imaginary part is 0, so
    the output is real; the default keeps the complex image, whose last step is exact data consistency."""
    den = MedgenDenoiser(_tiny_unet(3), SCHEDULE)
    sde = DiscreteScheduleSDE(SCHEDULE)
    physics = mri_physics(kspace_mask((32, 32), 4, "equispaced-fixed"))  # central columns 15, 16: not conjugate-symmetric
    y = physics.A(to_complex(_images(2, 32)))
    complex_ = projection_reconstruct(den, sde, physics, y, sample_generators([1, 2]), steps=4)
    real = projection_reconstruct(den, sde, physics, y, sample_generators([1, 2]), steps=4, real=True)
    assert torch.equal(real[:, 1], torch.zeros_like(real[:, 1]))
    assert complex_[:, 1].abs().max() > 1e-3  # A^+ of an asymmetric mask's residual has an imaginary part
    torch.testing.assert_close(physics.A(complex_), y, rtol=0, atol=1e-5)
