"""Noise schedules, one source of truth for training and every sampler.

A schedule is a small config (`NoiseSchedule`); `scheduler_kwargs()` turns it into the keyword
arguments of diffusers' schedulers, so the training objective (which reads `alphas_cumprod` from
diffusers' `DDPMScheduler`) and the samplers (DDPM, DDIM, DPM-Solver++, Euler) see identical
betas.

- linear: beta_t linear in t (Ho et al. 2020).
- scaled_linear: sqrt(beta_t) linear in t (Rombach et al. 2022, latent diffusion).
- cosine: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008 (Nichol & Dhariwal 2021).
- zero_terminal_snr: rescale sqrt(alpha_bar) so that alpha_bar_T = 0 exactly (Lin et al. 2024,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed"); needs the v or x0 target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from medgen.errors import ConfigError

# our names -> diffusers' `beta_schedule`
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
# our target names -> diffusers' `prediction_type`
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


@dataclass
class NoiseSchedule:
    schedule: str = "scaled_linear"  # linear | scaled_linear | cosine
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # Rombach et al. 2022 (scaled_linear); DDPM linear uses 1e-4
    beta_end: float = 0.012  # Rombach et al. 2022 (scaled_linear); DDPM linear uses 0.02
    zero_terminal_snr: bool = False
    prediction: str = "v"  # v | eps | x0; eps in pixel space: deterministic samplers leave noise (sampling.py)

    @classmethod
    def from_config(cls, cfg: Any) -> "NoiseSchedule":
        from medgen.config import to_dict

        raw = dict(to_dict(cfg) or {})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown diffusion keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        out = cls(**raw)
        out.validate()
        return out

    def validate(self) -> None:
        if self.schedule not in _BETA_SCHEDULES:
            raise ConfigError(f"diffusion.schedule must be one of {sorted(_BETA_SCHEDULES)}, got {self.schedule!r}")
        if self.prediction not in PREDICTION_TYPES:
            raise ConfigError(f"diffusion.prediction must be one of {sorted(PREDICTION_TYPES)}, got {self.prediction!r}")
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ConfigError(
                "diffusion.zero_terminal_snr=true needs diffusion.prediction=v (or x0): at zero SNR the noise "
                "target carries no information about the image (Lin et al. 2024)"
            )
        if self.num_train_timesteps < 2:
            raise ConfigError(f"diffusion.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by all diffusers schedulers we use."""
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=_BETA_SCHEDULES[self.schedule],
            rescale_betas_zero_snr=self.zero_terminal_snr,
            prediction_type=PREDICTION_TYPES[self.prediction],
            timestep_spacing="trailing",  # includes t = T-1 (Lin et al. 2024, Sec. 3.3)
        )

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t for t = 0..T-1 (float32), exactly as the samplers see it."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.scheduler_kwargs()).alphas_cumprod.clone()


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021)."""
    return alphas_cumprod / (1.0 - alphas_cumprod)
