"""PatchGAN discriminators (Isola et al. 2017) for 2D slices and 3D volumes.

Medical Diffusion (Khader et al. 2023) trains a 3D PatchGAN on whole volumes and a 2D PatchGAN
on random slices of the same volumes. MONAI's `PatchDiscriminator` defaults to BatchNorm, whose
running statistics differ per process under DDP; here normalisation is GroupNorm (default) or
InstanceNorm, both per-sample, so every process computes the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from medgen.models.autoencoder import conv_nd, normalization


class PatchDiscriminator(nn.Module):
    """n-layer PatchGAN; forward returns the list of intermediate features, logits last.

    x (B, C, *S) -> [..., logits (B, 1, *S / 2^num_layers)]. The features feed the feature-matching
    loss (Wang et al. 2018, pix2pixHD).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, channels: int = 64, num_layers: int = 3,
                 norm: str = "group"):
        super().__init__()
        if norm not in ("group", "instance"):
            raise ValueError(f"discriminator norm must be 'group' or 'instance', got {norm!r}")

        def norm_layer(ch):
            if norm == "group":
                return normalization(ch, 32)
            return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(ch, affine=True)

        layers = [nn.Sequential(conv_nd(spatial_dims, in_channels, channels, 4, stride=2, padding=1),
                                nn.LeakyReLU(0.2, inplace=True))]
        ch = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers.append(nn.Sequential(conv_nd(spatial_dims, ch, out, 4, stride=stride, padding=1, bias=False),
                                        norm_layer(out), nn.LeakyReLU(0.2, inplace=True)))
            ch = out
        layers.append(conv_nd(spatial_dims, ch, 1, 4, stride=1, padding=1))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


def take_slices(volume: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Slices along the first spatial axis: (B, C, D, H, W), index (B, k) -> (B*k, C, H, W)."""
    b, c, d, h, w = volume.shape
    k = index.shape[1]
    gather = index.view(b, 1, k, 1, 1).expand(b, c, k, h, w)
    return volume.gather(2, gather).transpose(1, 2).reshape(b * k, c, h, w)


class GANDiscriminator(nn.Module):
    """The discriminators of a VQ-GAN run, in one module (one DDP wrapper, one optimizer).

    2D data: one 2D PatchGAN on the images. 3D data: a 3D PatchGAN on the volume (`volume=True`)
    and/or a 2D PatchGAN on `slices_per_volume` random slices per volume (`slices=True`).
    `forward(x, slice_index)` -> {name: feature list}; pass the same `slice_index` for real and
    fake (draw it with `draw_slices`).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, channels: int = 64, num_layers: int = 3,
                 norm: str = "group", volume: bool = True, slices: bool = True, slices_per_volume: int = 1):
        super().__init__()
        self.spatial_dims, self.slices_per_volume = spatial_dims, int(slices_per_volume)
        if spatial_dims == 2:
            volume, slices = False, True
        if not (volume or slices):
            raise ValueError("a 3D GAN discriminator needs volume=True and/or slices=True")
        self.volume = PatchDiscriminator(3, in_channels, channels, num_layers, norm) if volume else None
        self.slice = PatchDiscriminator(2, in_channels, channels, num_layers, norm) if slices else None

    def draw_slices(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.spatial_dims == 2 or self.slice is None:
            return None
        return torch.randint(0, x.shape[2], (x.shape[0], self.slices_per_volume), device=x.device)

    def forward(self, x: torch.Tensor, slice_index: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
        out = {}
        if self.volume is not None:
            out["volume"] = self.volume(x)
        if self.slice is not None:
            out["slice"] = self.slice(x if self.spatial_dims == 2 else take_slices(x, slice_index))
        return out
