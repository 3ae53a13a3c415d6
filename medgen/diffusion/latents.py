"""Latent scaling: what the denoiser sees of the autoencoder's latents, and the way back to images.

The denoiser trains on z' = (z - shift) * scale_factor, z being what the frozen autoencoder
gives (a `medgen encode` cache). `latent.scaling` picks the recipe:

- `std`: scale_factor = 1 / std(z), shift 0, std over the training subjects' latents
  (Rombach et al. 2022, sec. 4.3 and appendix G). Unit variance, unbounded: samplers never clip.
- `codebook_minmax`: the codebook's smallest and largest entries map to -1 and 1:
  scale_factor = 2 / (max - min), shift = (max + min) / 2 (Khader et al. 2023, released code,
  `GaussianDiffusion.forward` and `.sample`). The latents are taken as bounded, so samplers clip
  their predicted x0 to [-1, 1] as the original's `p_mean_variance(clip_denoised=True)`. VQ only.
- `none`: scale_factor 1, shift 0 (Medfusion, Mueller-Franzes et al. 2023, trains on raw latents).

Training and sampling both import this module (the training previews decode too); it sits
below both so that neither stage imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from medgen.errors import ConfigError, RunError

SCALINGS = ("std", "codebook_minmax", "none")


@dataclass(frozen=True)
class LatentScaling:
    """z' = (z - shift) * scale_factor; `clip_x0`: samplers clip predicted x0 to [-1, 1]."""

    mode: str = "std"
    scale_factor: float = 1.0
    shift: float = 0.0

    @property
    def clip_x0(self) -> bool:
        return self.mode == "codebook_minmax"

    @classmethod
    def fit(cls, mode: str, latents: torch.Tensor, codebook_range: tuple[float, float] | None = None) -> "LatentScaling":
        """The scaling of `mode` for training latents (N, C, *S') (unscaled)."""
        if mode == "std":
            std = latents.float().std().item()
            if not std > 0:
                raise RunError("the training latents have zero variance; is the autoencoder trained?")
            return cls("std", 1.0 / std)
        if mode == "codebook_minmax":
            if codebook_range is None:
                raise ConfigError("latent.scaling=codebook_minmax needs a VQ autoencoder (its codebook's range); "
                                  "use latent.scaling=std for a KL autoencoder")
            lo, hi = (float(v) for v in codebook_range)
            if not hi > lo:
                raise RunError(f"the codebook's range [{lo}, {hi}] is empty; is the autoencoder trained?")
            return cls("codebook_minmax", 2.0 / (hi - lo), (hi + lo) / 2.0)
        if mode == "none":
            return cls("none")
        raise ConfigError(f"latent.scaling={mode!r}; use one of {', '.join(SCALINGS)}")

    @classmethod
    def from_dict(cls, latent: dict[str, Any]) -> "LatentScaling":
        """From a model config's `latent` entry (runs written before `shift` existed: std, shift 0)."""
        return cls(str(latent.get("scaling", "std")), float(latent["scale_factor"]), float(latent.get("shift", 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"scaling": self.mode, "scale_factor": self.scale_factor, "shift": self.shift, "clip_x0": self.clip_x0}

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents -> the denoiser's space."""
        return (z - self.shift) * self.scale_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The denoiser's space -> autoencoder latents."""
        return z / self.scale_factor + self.shift


@torch.no_grad()
def decode_latents(autoencoder, z: torch.Tensor, scaling: LatentScaling, batch_size: int = 8) -> torch.Tensor:
    """Denoiser-space latents (B, C, *S') -> images (B, C_img, *S) float32 through the frozen autoencoder."""
    p = next(autoencoder.parameters())
    out = [autoencoder.decode(scaling.denormalize(chunk).to(p.device, p.dtype)).float() for chunk in z.split(batch_size)]
    return torch.cat(out)


__all__ = ["SCALINGS", "LatentScaling", "decode_latents"]
