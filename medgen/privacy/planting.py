"""Planted copies: synthetic sets with known answers, to check that an audit catches copies.

`plant_copies` mixes genuine non-copies (e.g. held-out images of other patients) with K exact
copies and K lightly transformed copies of training images (a small shift, a left-right flip,
noise, an intensity scaling: the SSL detector's own training augmentations, so these show the
pipeline works, not that copies are found). `family_copies` makes copies of one validation
family (`medgen.privacy.families`, never used in training), the protocol of the harness
(`eval/audit_harness.py`) and of the tests that hold the audit to its reported recall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

TRANSFORMS = ("shift", "flip", "noise", "intensity")


def light_transform(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """One light perturbation of an image (C, *S) in [-1, 1], within the SSL detector's training
    augmentations: shift, flip, noise, intensity (a x + b) or scale (geometric, +-5%)."""
    if kind == "shift":  # 1-2 px (about 3% of the field of view), edge values repeated
        s = max(1, round(0.03 * max(x.shape[1:])))
        axis = 1 + int(torch.randint(x.ndim - 1, (1,), generator=generator))
        sign = 1 if torch.rand(1, generator=generator) < 0.5 else -1
        shifted = torch.roll(x, sign * s, dims=axis)
        edge = [slice(None)] * x.ndim
        edge[axis] = slice(0, s) if sign > 0 else slice(-s, None)
        src = [slice(None)] * x.ndim
        src[axis] = slice(s, s + 1) if sign > 0 else slice(-s - 1, -s)
        shifted[tuple(edge)] = shifted[tuple(src)]
        return shifted
    if kind == "flip":  # left-right (last axis)
        from medgen.privacy.families import flip

        return flip(x, generator)
    if kind == "noise":  # Gaussian, std 0.04 on the [-1, 1] range (~2% of it)
        return x + 0.04 * torch.randn(x.shape, generator=generator)
    if kind == "intensity":  # intensity scaling by 0.9..1.1 around the background
        a = 0.9 + 0.2 * float(torch.rand(1, generator=generator))
        return (x + 1) * a - 1
    if kind == "scale":  # geometric zoom within +-5%, the SSL augmentation's range
        from medgen.privacy.families import zoom

        return zoom(x, generator, low=0.95, high=1.05)
    raise ValueError(f"unknown transform {kind!r}; one of {TRANSFORMS + ('scale',)}")


def plant_copies(train: torch.Tensor, genuine: torch.Tensor, k: int, seed: int = 0, transforms: Sequence[str] = TRANSFORMS) -> tuple[torch.Tensor, list[str], list[int]]:
    """Return (images (len(genuine) + 2k, C, *S), kinds, source) where kinds[i] is "genuine",
    "exact" or "transformed:<kind>" and source[i] the training index copied (-1 for genuine).
    Exact and transformed copies come from 2k distinct training images (k <= len(train) // 2)."""
    if 2 * k > train.shape[0]:
        raise ValueError(f"k={k} needs {2 * k} distinct training images, have {train.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(train.shape[0], generator=g)[: 2 * k].tolist()
    exact = [train[i] for i in pick[:k]]
    kinds_t = [transforms[i % len(transforms)] for i in range(k)]
    transformed = [light_transform(train[i].float(), kind, g).clamp(-1, 1) for i, kind in zip(pick[k:], kinds_t)]
    images = torch.cat([genuine.float(), torch.stack(exact).float(), torch.stack(transformed)])
    kinds = ["genuine"] * genuine.shape[0] + ["exact"] * k + [f"transformed:{t}" for t in kinds_t]
    source = [-1] * genuine.shape[0] + pick
    return images, kinds, source


def family_copies(train: torch.Tensor, family: str, k: int, seed: int = 0, autoencoder=None) -> tuple[torch.Tensor, list[int]]:
    """k copies of one copy family from k distinct training images (or all, if fewer): the
    sources are drawn from a generator seeded by (seed, family), so each family's draw does not
    depend on which other families are tested. Returns (copies (k, C, *S), sources)."""
    from medgen.privacy.families import LATENT_FAMILIES, TRAINING_AUGMENTATIONS, VALIDATION_FAMILIES, make_copies

    families = VALIDATION_FAMILIES + TRAINING_AUGMENTATIONS + LATENT_FAMILIES[1:]
    g = torch.Generator().manual_seed(1000 * seed + families.index(family))
    sources = torch.randperm(train.shape[0], generator=g)[:k].tolist()
    if family in TRAINING_AUGMENTATIONS:
        return torch.stack([light_transform(train[i].float(), family, g).clamp(-1, 1) for i in sources]), sources
    return make_copies(train, family, sources, seed=seed, autoencoder=autoencoder), sources


def train_roundtrip_autoencoder(train_files: Sequence[Path], dims: int, size: int, steps: int, out: Path):
    """Train the demo VQ-GAN (configs/demo_autoencoder_{dims}d.yaml) for `steps` on the given
    training files only (the discriminator starting half-way, as the demo configs do) and return
    its `RoundTrip` (x -> decode(encode(x)), eval mode): a latent model's own autoencoder, for
    the latent copy families and the latent detector."""
    from medgen.config import load_config
    from medgen.demo import demo_config
    from medgen.models.autoencoder import load_autoencoder
    from medgen.train.autoencoder import DEFAULTS, train_autoencoder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "train_manifest.csv"
    manifest.write_text("path\n" + "\n".join(str(Path(f).resolve()) for f in train_files) + "\n")
    overrides = [f"data.path={manifest}", f"data.shape={[size] * dims}", "data.split.val=0.0", "data.split.holdout=0.0", "train.tracker=none",
                 f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.val_every={steps}", f"train.preview_every={steps}",
                 f"loss.disc_start={steps // 2}"]
    cfg = load_config(demo_config(f"demo_autoencoder_{dims}d.yaml"), overrides, DEFAULTS)
    from medgen.privacy.families import RoundTrip

    return RoundTrip(load_autoencoder(train_autoencoder(cfg, out / "autoencoder")))


def write_images(images: torch.Tensor, out: str | Path, names: Sequence[str]) -> list[Path]:
    """Write (N, C, *S) images in [-1, 1]: 2D as 16-bit grayscale PNG, 3D as NIfTI (channel 0)."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, name in zip(images, names):
        a = ((img.float().clamp(-1, 1) + 1) / 2).numpy()
        if img.ndim == 3:
            p = out / f"{name}.png"
            Image.fromarray(np.round(a.mean(0) * 65535).astype(np.uint16)).save(p)
        else:
            import nibabel as nib

            p = out / f"{name}.nii.gz"
            nib.save(nib.Nifti1Image(a[0].astype(np.float32), np.eye(4)), str(p))
        paths.append(p)
    return paths
