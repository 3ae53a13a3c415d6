"""Autoencoder losses: reconstruction, 1 - SSIM, hinge GAN, adaptive GAN weight, feature matching.

Small pure functions, each a mean over the batch; the trainer combines them with the weights and
the reduction of the `loss:` config (`medgen.train.autoencoder.generator_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error, in fp32."""
    diff = recon.float() - target.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "l2":
        return diff.pow(2).mean()
    raise ValueError(f"loss.reconstruction must be l1 or l2, got {kind!r}")


def ssim_loss(recon: torch.Tensor, target: torch.Tensor, win_size: int = 11) -> torch.Tensor:
    """Mean over the batch of 1 - SSIM (Wang et al. 2004) on images mapped from [-1, 1] to [0, 1].

    As Medfusion's VAE (pytorch_msssim's `ssim(..., nonnegative_ssim=True)`): an 11-tap Gaussian
    window (sigma 1.5) over the valid region, SSIM averaged per channel and clamped at 0 there,
    then averaged over channels; the reconstruction is clamped to [0, 1], the target is not.
    The window shrinks to the smallest axis (odd) on small images. SSIM itself is MONAI's.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    spatial_dims = recon.ndim - 2
    win = min(win_size, *recon.shape[2:])
    win -= 1 - win % 2  # odd
    x = ((recon.float() + 1) / 2).clamp(0, 1)
    y = (target.float() + 1) / 2
    ssim_map, _ = compute_ssim_and_cs(x, y, spatial_dims, [win] * spatial_dims, [1.5] * spatial_dims, data_range=1.0)
    per_channel = ssim_map.flatten(2).mean(2).clamp_min(0)  # (B, C)
    return 1 - per_channel.mean(1).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017): E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], halved as in Esser et al. 2021."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[D(G(z))]."""
    return -logits_fake.float().mean()


def feature_matching_loss(feats_fake: list[torch.Tensor], feats_real: list[torch.Tensor]) -> torch.Tensor:
    """L1 between discriminator features of fake and (detached) real inputs, summed over the layers
    except the logits (Wang et al. 2018, pix2pixHD; Medical Diffusion sums the layers with weight
    4 / (3 + 1) = 1)."""
    pairs = zip(feats_fake[:-1], feats_real[:-1])
    return sum((F.l1_loss(f.float(), r.detach().float()) for f, r in pairs), torch.zeros((), device=feats_fake[0].device))


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4) (Esser et al. 2021, eq. 7).

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer;
    detached, clamped to [0, max_weight].
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
