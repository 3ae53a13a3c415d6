"""The training objective: noise the data, predict the target, weight the loss.

Forward process (Ho et al. 2020): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, a_t = alpha_bar_t.
Targets:
- eps (Ho et al. 2020);
- v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho 2022, "Progressive Distillation");
- x0, the clean sample.
Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy"): the per-sample loss is scaled so that it equals min(SNR, gamma) times the x0-space
error: w = min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0.
Classifier-free guidance training (Ho & Salimans 2021): labels are replaced by the null class
with probability `cond_drop_prob`, each label on its own (`cond_drop_mode="sample"`, Ho & Salimans)
or the whole batch at once (`"batch"`, Medfusion's released `DiffusionPipeline._step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medgen.errors import ConfigError


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching x's rank (2D and 3D alike)."""
    return a.view(-1, *([1] * (x.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alpha_bar_t of shape (B,)."""
    a = _bcast(a, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        a = _bcast(a, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ConfigError(f"unknown prediction target {prediction!r}; use eps, v or x0")


def predict_x0(prediction: str, model_out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Recover x0 from a network output (inverse of `target` given x_t)."""
    ab = _bcast(a, x_t)
    if prediction == "eps":
        return (x_t - (1 - ab).sqrt() * model_out) / ab.sqrt()
    if prediction == "x0":
        return model_out
    if prediction == "v":
        return ab.sqrt() * x_t - (1 - ab).sqrt() * model_out
    raise ConfigError(f"unknown prediction target {prediction!r}; use eps, v or x0")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample loss weight of Hang et al. 2023; finite at SNR = 0 (zero terminal SNR)."""
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, = 1 at SNR = 0
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    raise ConfigError(f"unknown prediction target {prediction!r}; use eps, v or x0")


COND_DROP_MODES = ("sample", "batch")


def drop_labels(labels: torch.Tensor | None, p: float, null_label: int, generator: torch.Generator | None = None,
                mode: str = "sample") -> torch.Tensor | None:
    """Condition dropout: labels become `null_label` with probability p, each on its own
    (`mode="sample"`) or all of the batch together (`mode="batch"`)."""
    if labels is None:
        return None
    labels = torch.where(labels < 0, null_label, labels)  # unlabelled samples train the null class
    if p <= 0:
        return labels
    shape = labels.shape if mode == "sample" else ()
    drop = torch.rand(shape, generator=generator, device=labels.device) < p
    return torch.where(drop, null_label, labels)


@dataclass
class DiffusionLoss:
    """`loss = DiffusionLoss(...)(model, x0, labels)`; one calling convention for all targets."""

    alphas_cumprod: torch.Tensor  # (T,)
    prediction: str = "v"
    loss: str = "l2"  # l2 | l1
    min_snr_gamma: float | None = None  # e.g. 5.0
    cond_drop_prob: float = 0.1
    cond_drop_mode: str = "sample"  # sample | batch

    def __post_init__(self) -> None:
        if self.cond_drop_mode not in COND_DROP_MODES:
            raise ConfigError(f"loss.cond_drop_mode must be 'sample' or 'batch', got {self.cond_drop_mode!r}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ConfigError(f"loss.cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if self.loss not in ("l2", "l1"):
            raise ConfigError(f"diffusion loss must be 'l2' or 'l1', got {self.loss!r}")
        if self.prediction not in ("eps", "v", "x0"):
            raise ConfigError(f"diffusion prediction must be eps, v or x0, got {self.prediction!r}")

    def __call__(self, model, x0: torch.Tensor, labels: torch.Tensor | None = None, null_label: int | None = None) -> torch.Tensor:
        B = x0.shape[0]
        ac = self.alphas_cumprod.to(x0.device)
        t = torch.randint(0, ac.shape[0], (B,), device=x0.device)
        noise = torch.randn_like(x0)
        a = ac[t]
        x_t = add_noise(x0, noise, a)
        if labels is not None and null_label is not None:
            labels = drop_labels(labels, self.cond_drop_prob, null_label, mode=self.cond_drop_mode)
        out = model(x_t, t, labels).float()
        tgt = target(self.prediction, x0, noise, a).float()
        err = (out - tgt).abs() if self.loss == "l1" else (out - tgt).square()
        per_sample = err.flatten(1).mean(1)  # (B,)
        if self.min_snr_gamma:
            per_sample = per_sample * min_snr_weight(a / (1 - a), self.min_snr_gamma, self.prediction)
        return per_sample.mean()
