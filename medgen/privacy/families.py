"""Copy families: ways a generative model can reproduce a training image without reproducing its
pixels, used to check a copy detector on copies it was never trained to ignore.

Two groups, kept apart on purpose (a family a detector trains on is no evidence that it finds copies):

- `TRAINING_AUGMENTATIONS`: what the SSL detector sees as positives while it trains
  (`medgen.privacy.detector.augment`): small affine (rotation within +-5 deg, shift <= 4% of the
  view and >= 1 px, scale within +-5%), axis flips, intensity x -> a x + b (a in 1 +- 0.1, b in
  +-0.1), Gaussian noise (std <= 0.03).
- `VALIDATION_FAMILIES`: never used in training; the harness (`eval/audit_harness.py`) and the
  audit's positive control draw from them. Each is set at a strength where the result is still
  plainly the same patient to a reader:

  | family | what it does | what it stands for |
  |---|---|---|
  | blur | Gaussian blur, sigma 1 px | an autoencoder's smoothing |
  | gamma | x -> x^g on [0, 1], g in [1.4, 1.6] or its inverse | a contrast change |
  | blend | 0.7 x + 0.3 y, y another training image | a model mixing two patients |
  | downup | area-downsample by 2, linear upsample back | a low-resolution copy |
  | autoencoder | decode(encode(x)) through a medgen autoencoder | a latent model's copy |
  | zoom | crop 85-90% of the view about the centre, resized back | a crop/zoom |
  | rotation | 10-15 deg (beyond the +-5 deg of training), random sign | a rotated copy |
  | elastic | smooth random displacement, up to 3% of the view | a deformed copy |

  With the latent model's own autoencoder (`RoundTrip`), three more (`LATENT_FAMILIES`):

  | family | what it does | what it stands for |
  |---|---|---|
  | autoencoder | decode(encode(x)) | a latent model that reproduces a training latent exactly |
  | latent-noise | decode(z + s * std(z) * e), s in [0.2, 0.3], e ~ N(0, I) | ... up to noise of a quarter of the latent's spread |
  | latent-blend | decode(0.7 z + 0.3 z'), z' another training image's latent | a latent model mixing two patients |

All functions take one image (C, *S) in [-1, 1] (2D or 3D alike) and a `torch.Generator`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

TRAINING_AUGMENTATIONS = ("shift", "flip", "scale", "intensity", "noise")
VALIDATION_FAMILIES = ("blur", "gamma", "blend", "downup", "autoencoder", "zoom", "rotation", "elastic")
LATENT_FAMILIES = ("autoencoder", "latent-noise", "latent-blend")  # need the model's own autoencoder
# The audit's positive control draws from these (its recall enters the privacy bound): pixel-space
# families the default detectors catch in 2D and 3D, and, for a latent model, the latent copies
# its `latent` detector is there for. eval/RESULTS.md.
CONTROL_FAMILIES = ("gamma", "blend", "elastic")
LATENT_CONTROL_FAMILIES = ("autoencoder", "latent-noise")


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=g))


def _sign(g: torch.Generator) -> float:
    return 1.0 if float(torch.rand(1, generator=g)) < 0.5 else -1.0


def _warp(x: torch.Tensor, theta: torch.Tensor | None = None, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample x (C, *S) on an affine grid `theta` (nd, nd + 1) plus an optional displacement
    field (*S, nd) in grid units; border values repeat outside the view."""
    nd = x.ndim - 1
    if theta is None:
        theta = torch.cat([torch.eye(nd), torch.zeros(nd, 1)], 1)
    grid = F.affine_grid(theta[None].to(x.dtype), [1, *x.shape], align_corners=False)  # (1, *S, nd)
    if displacement is not None:
        grid = grid + displacement[None].to(x.dtype)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, *S) with std `sigma` pixels, reflected edges."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = x[None]  # (1, C, *S)
    nd = x.ndim - 1
    conv = F.conv2d if nd == 2 else F.conv3d
    c = x.shape[0]
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = len(kernel)
        k = kernel.view(1, 1, *shape).repeat(c, 1, *([1] * nd))
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius  # F.pad lists the last axis first
        out = conv(F.pad(out, pad, mode="reflect"), k, groups=c)
    return out[0]


def _rotation_matrix(angle: float, nd: int, axis: int) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    if nd == 2:
        return torch.tensor([[c, -s], [s, c]])
    m = torch.eye(3)
    i, j = [a for a in range(3) if a != axis]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def flip(x: torch.Tensor, g: torch.Generator, **_) -> torch.Tensor:
    """Left-right mirror (last axis). A training augmentation of the SSL detector: the audit uses
    it only to check that detector is alive, never as evidence or inside the bound's recall."""
    return x.flip(-1)


def blur(x: torch.Tensor, g: torch.Generator, *, sigma: float = 1.0, **_) -> torch.Tensor:
    return gaussian_blur(x, sigma)


def gamma(x: torch.Tensor, g: torch.Generator, *, low: float = 1.4, high: float = 1.6, **_) -> torch.Tensor:
    value = _uniform(low, high, g)
    if _sign(g) < 0:
        value = 1 / value
    return ((x.clamp(-1, 1) + 1) / 2).pow(value) * 2 - 1


def blend(x: torch.Tensor, g: torch.Generator, *, other: torch.Tensor, weight: float = 0.7, **_) -> torch.Tensor:
    return weight * x + (1 - weight) * other


def downup(x: torch.Tensor, g: torch.Generator, *, factor: int = 2, **_) -> torch.Tensor:
    size = list(x.shape[1:])
    small = F.interpolate(x[None], size=[max(1, s // factor) for s in size], mode="area")
    mode = "bilinear" if x.ndim == 3 else "trilinear"
    return F.interpolate(small, size=size, mode=mode, align_corners=False)[0]


def zoom(x: torch.Tensor, g: torch.Generator, *, low: float = 0.85, high: float = 0.90, **_) -> torch.Tensor:
    nd = x.ndim - 1
    keep = _uniform(low, high, g)  # share of the view kept: grid coordinates shrink by it
    theta = torch.cat([torch.eye(nd) * keep, torch.zeros(nd, 1)], 1)
    return _warp(x, theta)


def rotation(x: torch.Tensor, g: torch.Generator, *, low: float = 10.0, high: float = 15.0, **_) -> torch.Tensor:
    nd = x.ndim - 1
    angle = math.radians(_uniform(low, high, g)) * _sign(g)
    axis = int(torch.randint(3, (1,), generator=g)) if nd == 3 else 0
    theta = torch.cat([_rotation_matrix(angle, nd, axis), torch.zeros(nd, 1)], 1)
    return _warp(x, theta)


def elastic(x: torch.Tensor, g: torch.Generator, *, max_displacement: float = 0.03, control_points: int = 4, **_) -> torch.Tensor:
    """Random displacement drawn on a coarse grid of control points and smoothly (cubic in 2D,
    linear in 3D) interpolated; `max_displacement` is the largest shift as a share of the view."""
    nd = x.ndim - 1
    coarse = torch.rand((1, nd) + (control_points,) * nd, generator=g) * 2 - 1  # (1, nd, *P)
    mode = "bicubic" if nd == 2 else "trilinear"
    field = F.interpolate(coarse, size=list(x.shape[1:]), mode=mode, align_corners=True)[0]  # (nd, *S)
    field = field / field.abs().amax().clamp_min(1e-8) * (2 * max_displacement)  # grid spans 2
    return _warp(x, displacement=field.movedim(0, -1))


class RoundTrip:
    """x -> decode(encode(x)) through a medgen autoencoder: what a latent model outputs when it
    reproduces a training image's latent. Batched, without gradients, on the autoencoder's
    device; images (N, C, *S) in [-1, 1] in and out (clamped), on the CPU.

    `encode` gives the continuous latent (the VQ encoder's output before the codebook, the KL
    posterior mean); `decode` re-quantizes VQ latents as the sampling pipeline does."""

    def __init__(self, autoencoder: torch.nn.Module, batch_size: int = 16):
        self.autoencoder = autoencoder.eval()
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.autoencoder.encode(x[i : i + self.batch_size].float().to(self.device), quantize=False).float().cpu()
                          for i in range(0, x.shape[0], self.batch_size)])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.autoencoder.decode(z[i : i + self.batch_size].to(self.device)).float().clamp(-1, 1).cpu()
                          for i in range(0, z.shape[0], self.batch_size)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @property
    def recipe(self) -> dict:
        ae = self.autoencoder
        return {"autoencoder": {"latent": getattr(ae, "latent", None), "downsample": list(getattr(ae, "downsample_factors", ()) or ()),
                                "latent_channels": getattr(ae, "latent_channels", None)}}


def run_roundtrip(path, device=None) -> RoundTrip | None:
    """The round trip of the autoencoder behind `path`: a latent diffusion run (its frozen
    `autoencoder/`), an autoencoder run or model folder. None when `path` holds no autoencoder
    (a pixel-space diffusion run); RunError when it holds nothing medgen can read."""
    from pathlib import Path

    from medgen.models.autoencoder import load_autoencoder
    from medgen.models.serialization import load_model_config

    path = Path(path)
    if (path / "autoencoder" / "config.json").is_file():
        return RoundTrip(load_autoencoder(path / "autoencoder", device or "cpu"))
    model_dir = path / "model" if (path / "model" / "config.json").is_file() else path
    if (model_dir / "config.json").is_file() and not str(load_model_config(model_dir).get("target", "")).endswith(".Autoencoder"):
        return None  # a pixel-space diffusion run (or a run folder without a model): no autoencoder
    return RoundTrip(load_autoencoder(path, device or "cpu"))


def latent_noise(z: torch.Tensor, g: torch.Generator, *, low: float = 0.2, high: float = 0.3, **_) -> torch.Tensor:
    """z (C', *S') + s std(z) e: a latent reproduced up to noise (s drawn in [low, high])."""
    return z + _uniform(low, high, g) * z.std() * torch.randn(z.shape, generator=g)


def latent_blend(z: torch.Tensor, g: torch.Generator, *, other: torch.Tensor, weight: float = 0.7, **_) -> torch.Tensor:
    return weight * z + (1 - weight) * other


LATENT_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"latent-noise": latent_noise, "latent-blend": latent_blend}


FAMILY_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "blur": blur, "gamma": gamma, "blend": blend, "downup": downup, "zoom": zoom, "rotation": rotation, "elastic": elastic, "flip": flip,
}


def make_copies(
    train: torch.Tensor,
    family: str,
    sources: Sequence[int],
    *,
    seed: int = 0,
    autoencoder: RoundTrip | None = None,
) -> torch.Tensor:
    """Copies of `train[sources]` (k, C, *S) of one family, clamped to [-1, 1].

    `blend` and `latent-blend` mix each source with another training image drawn at random; the
    latent families need `autoencoder`, a `RoundTrip` of the model's autoencoder (for
    `autoencoder` any callable batch -> reconstruction will do).
    """
    g = torch.Generator().manual_seed(seed)
    x = train[list(sources)].float()
    if family in LATENT_FAMILIES and autoencoder is None:
        raise ValueError(f"the {family} family needs autoencoder=RoundTrip(model autoencoder)")
    if family == "autoencoder":
        with torch.no_grad():
            return autoencoder(x).float().clamp(-1, 1).cpu()
    if family not in FAMILY_FUNCTIONS and family not in LATENT_FUNCTIONS:
        raise ValueError(f"unknown copy family {family!r}; one of {VALIDATION_FAMILIES + LATENT_FAMILIES[1:]}")
    others = []
    if family in ("blend", "latent-blend"):
        for src in sources:
            j = int(torch.randint(train.shape[0] - 1, (1,), generator=g))
            others.append(j + (j >= src))  # any training image but the source
    if family in LATENT_FUNCTIONS:
        fn = LATENT_FUNCTIONS[family]
        z, z_other = autoencoder.encode(x), autoencoder.encode(train[others].float()) if family == "latent-blend" else None
        latents = torch.stack([fn(z[i], g, other=None if z_other is None else z_other[i]) for i in range(len(sources))])
        return autoencoder.decode(latents)
    fn = FAMILY_FUNCTIONS[family]
    return torch.stack([fn(x[i], g, other=train[others[i]].float() if family == "blend" else None).clamp(-1, 1)
                        for i in range(len(sources))])
