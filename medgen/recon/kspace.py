"""k-space simulation on deepinv's MRI operators, with fastMRI-convention Cartesian masks.

Tensors. deepinv's MRI physics work on complex images stored as two real channels
(B, 2, H, W) = (real, imaginary); medgen images are one real channel (B, 1, H, W) of magnitudes.
`to_complex` puts a magnitude image in the real channel (imaginary part 0), `magnitude` returns
|x|. k-space is (B, 2, H, W) single-coil and (B, 2, N, H, W) for N coils. Both operators are
centred FFTs with norm="ortho" (deepinv's `MRIMixin.fft`), so a fully sampled single-coil
operator is unitary; birdcage coil maps are normalised to sum_n |S_n|^2 = 1 so that the fully
sampled multi-coil operator is an isometry too.

Masks sample whole phase-encoding columns (the last axis, as deepinv and fastMRI do): a block of
`center_fraction * W` central columns plus equispaced (fastMRI's offset rule) or uniformly random
outer columns, `W / R` columns in all; the equispaced offset is drawn from the seed.
"equispaced-fixed" (`fixed_equispaced_mask`, the probe's default) has no randomness at all: a
stated number of central columns plus every R-th column counted from the centre, so every seed sees
the same mask and the effective acceleration is reported, not assumed. fastMRI's pairs are R=4 with
centre fraction 0.08 and R=8 with 0.04; other R keep their product, R * center_fraction = 0.32.
"""

from __future__ import annotations

from typing import Sequence

import torch

from medgen.errors import ConfigError
from medgen.recon.settings import MASK_KINDS, center_fraction_for, check_acceleration, check_coils  # torch-free, shared with the CLI


def kspace_mask(shape: Sequence[int], acceleration: int, kind: str = "equispaced", center_fraction: float | None = None,
                seed: int = 0) -> torch.Tensor:
    """A (H, W) 0/1 float mask of whole columns from deepinv's mask generators (seeded)."""
    from deepinv.physics.generator import EquispacedMaskGenerator, RandomMaskGenerator

    if kind not in MASK_KINDS:
        raise ConfigError(f"mask must be one of {', '.join(MASK_KINDS)}, got {kind!r}")
    H, W = (int(s) for s in shape)
    cf = center_fraction_for(acceleration) if center_fraction is None else float(center_fraction)
    check_acceleration(W, acceleration, cf)
    if kind == "equispaced-fixed":
        return fixed_equispaced_mask((H, W), acceleration, max(1, int(cf * W)))
    generator = {"equispaced": EquispacedMaskGenerator, "random": RandomMaskGenerator}[kind]
    return generator((H, W), acceleration=int(acceleration), center_fraction=cf).step(batch_size=1, seed=int(seed))["mask"][0, 0]


def fixed_equispaced_mask(shape: Sequence[int], acceleration: int, center_lines: int) -> torch.Tensor:
    """(H, W) 0/1 mask: `center_lines` contiguous columns around the k-space centre (column W // 2,
    fftshift's zero frequency) and every `acceleration`-th column from the centre outwards."""
    H, W = (int(s) for s in shape)
    R, n = int(acceleration), int(center_lines)
    if R < 1 or not 1 <= n <= W:
        raise ConfigError(f"a fixed equispaced mask needs acceleration >= 1 and 1 <= center lines <= {W}, got R={R}, {n} lines")
    columns = torch.zeros(W)
    columns[(W // 2) % R :: R] = 1.0
    start = W // 2 - n // 2
    columns[start : start + n] = 1.0
    return columns.expand(H, W).contiguous()


def birdcage_maps(n_coils: int, shape: Sequence[int]) -> torch.Tensor:
    """(N, H, W) complex64 birdcage sensitivities (sigpy, through deepinv), normalised so that
    sum_n |S_n|^2 = 1 at every pixel."""
    check_coils(n_coils)
    from deepinv.physics import MultiCoilMRI

    maps = MultiCoilMRI(img_size=(1, 2, *shape)).simulate_birdcage_csm(n_coils)
    return maps / maps.abs().square().sum(0, keepdim=True).sqrt().clamp_min(1e-8)


def mri_physics(mask: torch.Tensor, coils: int = 1, device: torch.device | str = "cpu", coil_maps: torch.Tensor | None = None):
    """deepinv's operator A = M F (single coil, `physics.MRI`) or A = M F S (`MultiCoilMRI` with
    simulated birdcage maps, or `coil_maps` (N, C, H, W) of real data, one set per image: bind the
    batch's with `bind_coil_maps`) for a (H, W) mask; the same mask for every image in a batch."""
    from deepinv.physics import MRI, MultiCoilMRI

    if coils < 1:
        raise ConfigError(f"coils must be >= 1, got {coils}")
    mask = mask.to(device=device, dtype=torch.float32)
    if coil_maps is not None:
        return MultiCoilMRI(mask=mask, coil_maps=coil_maps[:1].to(device), img_size=tuple(mask.shape), device=device)
    if coils == 1:
        return MRI(mask=mask, img_size=tuple(mask.shape), device=device)
    return MultiCoilMRI(mask=mask, coil_maps=birdcage_maps(coils, mask.shape).to(device), img_size=tuple(mask.shape),
                        device=device)


def bind_coil_maps(physics, coil_maps: torch.Tensor | None, index) -> object:
    """Give a multi-coil operator the maps of the images in a batch: coil_maps[index] (B, C, H, W).
    A no-op without per-image maps (single coil, or simulated maps shared by every image)."""
    if coil_maps is not None:
        physics.update_parameters(coil_maps=coil_maps[torch.as_tensor(list(index), dtype=torch.long)].to(physics.mask.device))
    return physics


def fully_sampled(physics):
    """The same operator with every column sampled: it gives the full k-space k = F S x."""
    from deepinv.physics import MRI

    ones = torch.ones_like(physics.mask[0, 0])
    if isinstance(physics, MRI):
        return type(physics)(mask=ones, img_size=tuple(ones.shape), device=ones.device)
    return type(physics)(mask=ones, coil_maps=physics.coil_maps, img_size=tuple(ones.shape), device=ones.device)


def apply_mask(kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """M k: full k-space (B, 2, H, W) or (B, 2, N, H, W) times a mask (H, W), (B, H, W) or
    (1 | B, 2, H, W), e.g. `physics.mask`."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 3:
        mask = mask[:, None]
    return kspace * (mask[:, :, None] if kspace.ndim == 5 else mask)


def to_complex(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) magnitude image -> (B, 2, H, W) complex image with zero imaginary part."""
    return torch.cat([x, torch.zeros_like(x)], dim=1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes: deepinv's `MRIMixin.fft`, fastMRI's `fft2c`."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of `fft2c`."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) complex image -> (B, 1, H, W) magnitude."""
    return x.square().sum(1, keepdim=True).sqrt()


def zero_filled(physics, y: torch.Tensor) -> torch.Tensor:
    """The zero-filled reconstruction A^H y (B, 2, H, W): deepinv's adjoint (coil-combined with
    conj(S) in the multi-coil case)."""
    return physics.A_adjoint(y)
