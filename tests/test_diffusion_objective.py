"""The training objective's label dropout and min-SNR weighting, against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from medgen.diffusion import DiffusionLoss, drop_labels

NULL = 7


def _binomial_bound(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_per_sample_label_dropout_rate():
    """Each label is dropped on its own with probability p; batches mix kept and dropped labels."""
    g = torch.Generator().manual_seed(0)
    p, n = 0.3, 200_000
    out = drop_labels(torch.zeros(n, dtype=torch.long), p, NULL, generator=g)
    rate = (out == NULL).float().mean().item()
    assert abs(rate - p) < _binomial_bound(p, n)
    per_batch = (out.view(-1, 16) == NULL).sum(1)
    assert ((per_batch > 0) & (per_batch < 16)).float().mean() > 0.9  # within-batch mixing
    assert set(out.unique().tolist()) == {0, NULL}


def test_whole_batch_label_dropout_rate():
    """Medfusion's dropout: the whole batch loses its labels together, with probability p."""
    g = torch.Generator().manual_seed(0)
    p, n = 0.5, 4000
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    dropped = []
    for _ in range(n):
        out = drop_labels(labels, p, NULL, generator=g, mode="batch")
        assert (out == NULL).all() or torch.equal(out, labels)
        dropped.append(bool((out == NULL).all()))
    assert abs(sum(dropped) / n - p) < _binomial_bound(p, n)


def test_unlabelled_samples_train_the_null_class():
    out = drop_labels(torch.tensor([-1, 0, -1, 1]), 0.0, NULL)
    assert out.tolist() == [NULL, 0, NULL, 1]


@pytest.mark.parametrize("mode,p", [("sample", 0.1), ("batch", 0.5)])
def test_loss_passes_the_dropout_mode_to_the_denoiser(mode, p):
    """What the denoiser receives through DiffusionLoss: per-sample or all-or-nothing dropout at rate p."""
    seen = []

    def model(x_t, t, labels):
        seen.append(labels.clone())
        return torch.zeros_like(x_t)

    torch.manual_seed(0)
    fn = DiffusionLoss(torch.linspace(0.99, 0.01, 100), cond_drop_prob=p, cond_drop_mode=mode)
    x0, labels = torch.randn(8, 1, 4, 4), torch.tensor([0, 1] * 4)
    for _ in range(1000):
        fn(model, x0, labels, NULL)
    seen = torch.stack(seen)  # (calls, B)
    null = seen == NULL
    assert torch.equal(seen[~null], labels.expand_as(seen)[~null])  # kept labels are untouched
    if mode == "batch":
        assert (null.all(1) | ~null.any(1)).all()
        assert abs(null.all(1).float().mean().item() - p) < _binomial_bound(p, 1000)
    else:
        assert (null.any(1) & ~null.all(1)).any()
        assert abs(null.float().mean().item() - p) < _binomial_bound(p, null.numel())


def _linear_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """alpha_bar_t of DDPM's linear betas 1e-4 .. 0.02 (Ho et al. 2020), in float64."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_loss_is_min_snr_times_the_x0_error(prediction):
    """Hang et al. 2023: whatever the target, the min-SNR-gamma loss of a sample is
    min(SNR_t, gamma) * mean (x0_hat - x0)^2 with SNR_t = alpha_bar_t / (1 - alpha_bar_t), x0_hat
    being the network's implied clean sample. Checked on data far from zero (x0 ~ N(1, 1)), a
    network with an arbitrary output, and timesteps on both sides of SNR = gamma."""
    gamma = 5.0
    ac = _linear_alphas_cumprod().float()  # the loss's table; the check below computes in float64 from it
    record = {}
    g = torch.Generator().manual_seed(1)

    def model(x_t, t, labels):
        record["x_t"], record["t"] = x_t.double(), t
        record["out"] = torch.randn(x_t.shape, generator=g)
        return record["out"]

    torch.manual_seed(0)
    x0 = 1.0 + torch.randn(64, 1, 6, 6)
    loss = DiffusionLoss(ac, prediction=prediction, loss="l2", min_snr_gamma=gamma)(model, x0)

    a = ac.double()[record["t"]].view(-1, 1, 1, 1)
    x_t, out = record["x_t"], record["out"].double()
    x0_hat = {"eps": (x_t - (1 - a).sqrt() * out) / a.sqrt(),
              "v": a.sqrt() * x_t - (1 - a).sqrt() * out,
              "x0": out}[prediction]
    snr = (a / (1 - a)).flatten()
    assert (snr > gamma).any() and (snr < gamma).any()
    expected = (snr.clamp(max=gamma) * (x0_hat - x0.double()).square().flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
