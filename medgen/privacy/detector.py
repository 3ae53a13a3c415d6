"""Copy detectors: map images (N, C, *S) in [-1, 1] to embeddings (N, D) whose correlation says
"same image" rather than "same anatomy".

Four kinds share one interface (`embed(images) -> (N, D)`, `recipe`, `name`):

- `SSLCopyDetector`: a contrastive encoder trained on the training set itself, following
  Dar et al. 2024 ("Unconditional latent diffusion models memorize patient imaging data"):
  SimCLR-style NT-Xent (Chen et al. 2020) with temperature 0.07, positives = two augmented views
  of one image (small affine within +-5 degrees, flips, intensity jitter). 2D: a ResNet-style
  encoder (He et al. 2016) with 1-channel input and a 128-d embedding; 3D: a convolutional
  encoder with a 32-d embedding. The network is ours (it is the product here: a small
  GroupNorm ResNet that runs 2D and 3D from one definition and trains on a few hundred images);
  augmentations are batched on the device with `affine_grid`/`grid_sample`, which is what makes
  training fast enough to run on the fly.
- `PixelDetector`: correlation on area-downsampled images: Pearson ("pixel", the baseline) or
  Spearman on pixel ranks ("pixel-rank", the SSL detector's partner in the default union).
- `LatentDetector` ("latent"): Pearson correlation at native resolution, for a latent model,
  whose audit compares samples with the training images *decoded through its own autoencoder*
  (`CopyAudit.fit(..., autoencoder=)`). A latent model's copy is a decoded training latent; the
  demo's VQ-GANs move a round trip as far from its source image as another subject is (every
  pixel detector missed them in 3D), but not from the decoded source, and at native resolution
  that match is exact.
- `FeatureDetector`: any extractor of the evaluation registry (`medgen.metrics.features`).

`build_detectors("ssl,pixel-rank", train)` builds them from names.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medgen.errors import DataError, TrainingError, WeightsError

log = logging.getLogger(__name__)

DETECTOR_KIND = "medgen-ssl-copy-detector"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Defaults per spatial_dims (Dar et al. 2024: 128-d embedding in 2D, 32-d in 3D). Narrow widths:
# on the built-in cohort (30 training images) a (16..128) encoder separated copies from other
# subjects better than a (32..256) one, which over-fits the training images. 3D needs a lower
# learning rate: at 2e-3 NT-Xent collapsed to a constant embedding (loss log(2B - 1)).
# Input resolution: Dar et al. embed 512^2 X-rays (ResNet-50, ImageNet weights, 10k images) and
# 3D volumes at native size; trained on the fly on tens to hundreds of images, a finer input
# makes the encoder key on fine detail it never saw perturbed: on the 64^2 cohort an encoder at
# 64^2 flagged 0% of blurred / resampled copies and 33% of rotated ones, at 32^2 83-92%
# (eval/RESULTS.md). Images are area-downsampled to this longest side.
ENCODER_DEFAULTS = {
    2: {"widths": (16, 32, 64, 128), "blocks": (1, 1, 1, 1), "embed_dim": 128, "image_size": 32, "lr": 2e-3},
    3: {"widths": (16, 32, 64, 128), "blocks": (1, 1, 1, 1), "embed_dim": 32, "image_size": 32, "lr": 5e-4},
}


# Longest side of the pixel detectors' images: the Pearson baseline keeps more detail; the rank
# detector works at a coarser scale, where blur, resampling and small deformations barely move
# a copy while other patients still differ (chosen on the 2D cohort, eval/RESULTS.md).
PIXEL_SIZE = {2: 32, 3: 16}
PIXEL_RANK_SIZE = {2: 16, 3: 12}
# The latent detector works at native resolution, area-downsampled beyond this longest side so
# that 100k-image audits of 256^2 / 128^3 data stay in memory (an embedding is the image itself).
LATENT_MAX_SIZE = {2: 128, 3: 64}
# Gaussian sigma (input pixels) before the rank detector downsamples. 3D: ranks of flat background
# are ranks of noise, and 16^3 -> 12^3 barely averages it, so any smooth volume ranked like the
# least noisy training volume rather than its source (blurred copies "flagged" against the wrong
# volume, blurred other subjects flagged too); 1 voxel fixes that. 2D (32^2 -> 16^2 averages 4
# pixels): smoothing gained nothing and cost blends (100% -> 89%). eval/RESULTS.md.
RANK_SMOOTH = {2: 0.0, 3: 1.0}


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------- network


class ResidualBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016) with GroupNorm: works for batch sizes of 2."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        conv = _conv(spatial_dims)
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, bias=False)
        self.skip = conv(in_ch, out_ch, 1, stride=stride, bias=False) if (stride != 1 or in_ch != out_ch) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class CopyEncoder(nn.Module):
    """ResNet-style encoder, 1-channel input -> `embed_dim` embedding; 2D and 3D from one code.

    (B, 1, *S) -> stem (B, w0, *S/2) -> stages, each after the first halving S -> global mean (B, w_last)
    -> MLP projection head (B, embed_dim). The head output is the embedding (as in Dar et al.
    2024, where similarity is measured on the contrastive embedding itself).
    """

    def __init__(self, spatial_dims: int = 2, embed_dim: int | None = None, widths: Sequence[int] | None = None, blocks: Sequence[int] | None = None, in_channels: int = 1):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        d = ENCODER_DEFAULTS[spatial_dims]
        widths = tuple(widths or d["widths"])
        blocks = tuple(blocks or d["blocks"])
        embed_dim = int(embed_dim or d["embed_dim"])
        if len(blocks) != len(widths):
            raise ValueError(f"widths {widths} and blocks {blocks} must have the same length")
        self.config = {"spatial_dims": spatial_dims, "embed_dim": embed_dim, "widths": list(widths), "blocks": list(blocks), "in_channels": in_channels}
        self.spatial_dims = spatial_dims
        # stride-2 stem as in ResNet: halves the cost of every later layer; copies differ from
        # other subjects at the scale of anatomy, not of single pixels
        self.stem = _conv(spatial_dims)(in_channels, widths[0], 3, stride=2, padding=1, bias=False)
        layers: list[nn.Module] = []
        ch = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(ResidualBlock(spatial_dims, ch, w, stride=2 if (i > 0 and j == 0) else 1))
                ch = w
        self.stages = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.head = nn.Sequential(nn.Linear(ch, ch), nn.SiLU(), nn.Linear(ch, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.stages(self.stem(x))))  # (B, C, *S')
        h = h.flatten(2).mean(-1)  # (B, C)
        return self.head(h)  # (B, embed_dim)


# ----------------------------------------------------------------------------- loss


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """NT-Xent, the normalized temperature-scaled cross entropy of SimCLR (Chen et al. 2020, eq. 1).

    For 2B embeddings (two views per image), with sim = cosine similarity:
        l(i, j) = -log( exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t) ),
    averaged over all 2B anchors i with j the other view of the same image.

    z1, z2: (B, D) embeddings of view 1 and view 2 (row b of both is the same image).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    logits = z @ z.T / temperature  # (2B, 2B)
    logits.fill_diagonal_(float("-inf"))  # k != i
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, targets)


# ----------------------------------------------------------------------------- augmentation


def _rotation(angles: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """(B, 1) or (B, 3) angles in radians -> (B, nd, nd) rotation matrices."""
    c, s = torch.cos(angles), torch.sin(angles)
    if spatial_dims == 2:
        return torch.stack([torch.stack([c[:, 0], -s[:, 0]], -1), torch.stack([s[:, 0], c[:, 0]], -1)], 1)
    b = angles.shape[0]
    mats = []
    for axis in range(3):  # rotation in each of the three coordinate planes
        m = torch.eye(3, device=angles.device, dtype=angles.dtype).repeat(b, 1, 1)
        i, j = [a for a in range(3) if a != axis]
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c[:, axis], -s[:, axis], s[:, axis], c[:, axis]
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


def augment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    max_rotation_deg: float = 5.0,
    max_shift: float = 0.04,
    min_shift_px: float = 1.0,
    max_scale: float = 0.05,
    flip_prob: float = 0.5,
    intensity: float = 0.1,
    max_noise: float = 0.03,
) -> torch.Tensor:
    """A random view of each image: small affine (rotation within +-`max_rotation_deg`, shift up
    to `max_shift` of the field of view but at least `min_shift_px` pixels, isotropic scale
    within +-`max_scale`), a flip of each spatial axis with probability `flip_prob`, intensity
    jitter x -> a*x + b (a in 1 +- `intensity`, b in +-`intensity`) and Gaussian noise with std
    up to `max_noise`.

    Batched on x's device: one `affine_grid`/`grid_sample` for the whole batch, 2D and 3D alike.
    x: (B, C, *S) in [-1, 1] -> (B, C, *S).
    """
    b, nd = x.shape[0], x.ndim - 2
    dev = x.device

    def rand(*shape):  # U[-1, 1)
        return torch.rand(*shape, generator=generator, device=dev) * 2 - 1

    n_angles = 1 if nd == 2 else 3
    rot = _rotation(rand(b, n_angles) * math.radians(max_rotation_deg), nd)  # (B, nd, nd)
    scale = 1 + rand(b, 1, 1) * max_scale
    flips = torch.where(torch.rand(b, nd, generator=generator, device=dev) < flip_prob, -1.0, 1.0)
    linear = rot * scale @ torch.diag_embed(flips)  # reflection folded into the affine
    # shift up to max_shift of the view, and at least min_shift_px pixels: on a 16^3 volume a
    # one-voxel shift is 6% of the view, the smallest shift a copy can show
    frac = torch.tensor([max(max_shift, min_shift_px / s) for s in reversed(x.shape[2:])], device=dev)  # grid order x, y, z
    shift = rand(b, nd, 1) * (2 * frac[:, None])  # grid coordinates span [-1, 1]: 2 = full view
    theta = torch.cat([linear, shift], 2)  # (B, nd, nd + 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    view = (b,) + (1,) * (x.ndim - 1)
    gain = 1 + rand(*view) * intensity
    bias = rand(*view) * intensity
    sigma = torch.rand(view, generator=generator, device=dev) * max_noise
    noise = torch.randn(out.shape, generator=generator, device=dev, dtype=out.dtype)
    return out * gain + bias + noise * sigma


# ----------------------------------------------------------------------------- preprocessing


def to_detector_input(images: torch.Tensor, spatial_dims: int, size: int | None) -> torch.Tensor:
    """(N, C, *S) -> (N, 1, *S'): channel mean (the encoder takes 1 channel), area-resized so the
    longest spatial side is `size` (aspect kept; no resizing when `size` is None or not smaller)."""
    if images.ndim != spatial_dims + 2:
        raise DataError(f"expected {spatial_dims}D images of shape (N, C, {', '.join('S' * spatial_dims)}), got shape {tuple(images.shape)}")
    x = images.float().mean(1, keepdim=True)
    if size is not None and max(x.shape[2:]) > size:
        factor = size / max(x.shape[2:])
        target = [max(1, round(s * factor)) for s in x.shape[2:]]
        x = F.interpolate(x, size=target, mode="area")
    return x


# ----------------------------------------------------------------------------- detectors


def flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """All 2^spatial_dims combinations of spatial-axis flips of a (B, C, *S) tensor, () first."""
    axes = range(2, 2 + spatial_dims)
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


class SSLCopyDetector:
    """A trained `CopyEncoder` plus the preprocessing it was trained with.

    With `flip_invariant` (default) the embedding is the mean of the encoder's embeddings of all
    axis flips of the image (4 in 2D, 8 in 3D). Flips are positives in training, so the encoder
    is only approximately flip-invariant after a short training on a small set; averaging over
    the flip group makes it exact at 4-8x the (small) embedding cost. On the built-in cohort
    this lifted the similarity of left-right flipped copies from ~0.97-0.995 to 1.0 (see
    eval/RESULTS.md).
    """

    name = "ssl"

    def __init__(self, encoder: CopyEncoder, image_size: int | None, train_info: dict | None = None, flip_invariant: bool = True):
        self.encoder = encoder.eval()
        self.spatial_dims = encoder.spatial_dims
        self.image_size = image_size
        self.flip_invariant = flip_invariant
        self.train_info = dict(train_info or {})
        self.source: str | None = None  # the folder it was loaded from; None: trained in this process

    @property
    def recipe(self) -> dict[str, Any]:
        return {"detector": "ssl", "source": self.source, "encoder": self.encoder.config, "image_size": self.image_size, "flip_invariant": self.flip_invariant, "training": self.train_info}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256, device: str | torch.device | None = None) -> torch.Tensor:
        """(N, C, *S) in [-1, 1] -> (N, embed_dim) float32 on CPU."""
        dev = default_device(device)
        enc = self.encoder.to(dev)
        flips = flip_sets(self.spatial_dims) if self.flip_invariant else [()]
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = to_detector_input(images[start : start + batch_size], self.spatial_dims, self.image_size).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                z = sum(enc(x.flip(f) if f else x).float() for f in flips) / len(flips)  # (B, D)
            out.append(z.cpu())
        return torch.cat(out)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `model.safetensors` + `config.json` into `out_dir` (created; caller makes it atomic)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"kind": DETECTOR_KIND})
        config = {"kind": DETECTOR_KIND, "encoder": self.encoder.config, "image_size": self.image_size, "flip_invariant": self.flip_invariant, "training": self.train_info}
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return out


def is_detector_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        return False
    try:
        return json.loads((p / CONFIG_FILE).read_text()).get("kind") == DETECTOR_KIND
    except (OSError, ValueError):
        return False


def load_detector(path: str | os.PathLike) -> SSLCopyDetector:
    """Rebuild a saved SSL detector from `config.json` + `model.safetensors` (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if (p / "detector").is_dir() and not (p / CONFIG_FILE).is_file():
        p = p / "detector"  # an audit folder: the detector trained on the fly lives in detector/
    try:
        config = json.loads((p / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{p / CONFIG_FILE}: cannot read the detector config ({e}); point --detector at a folder written by `medgen audit train-detector`") from None
    if config.get("kind") != DETECTOR_KIND:
        raise WeightsError(f"{p / CONFIG_FILE}: not a medgen copy detector (kind={config.get('kind')!r})")
    encoder = CopyEncoder(**config["encoder"])
    try:
        state = load_file(str(p / WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"{p / WEIGHTS_FILE}: cannot read detector weights ({e})") from None
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"{p / WEIGHTS_FILE}: weights do not match {p / CONFIG_FILE} ({str(e).splitlines()[0]})") from None
    detector = SSLCopyDetector(encoder, config.get("image_size"), config.get("training"), flip_invariant=bool(config.get("flip_invariant", True)))
    detector.source = str(p)
    return detector


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) float ranks 0..D-1 within each row, ties sharing their mean rank (the
    convention of Spearman's rho and `scipy.stats.rankdata`)."""
    s = x.contiguous().sort(1).values
    lo = torch.searchsorted(s, x.contiguous(), right=False)  # elements strictly below
    hi = torch.searchsorted(s, x.contiguous(), right=True)  # elements below or equal
    return (lo + hi - 1).float() / 2


class PixelDetector:
    """Pixel-space detector: the embedding is the area-downsampled image itself (longest side
    `size`), so Pearson correlation between embeddings is image correlation at low resolution.

    With `ranks` (the "pixel-rank" detector) each embedding is replaced by its pixels' ranks, so
    the similarity is Spearman's rank correlation: unchanged by any monotone intensity change
    (gamma, contrast, windowing) and, at low resolution, by blur and resampling. It complements
    the SSL detector, which is only invariant to what it was trained on (eval/RESULTS.md).
    """

    def __init__(self, spatial_dims: int, size: int | None = None, ranks: bool = False, smooth: float | None = None):
        self.spatial_dims = spatial_dims
        self.ranks = ranks
        self.name = "pixel-rank" if ranks else "pixel"
        default = PIXEL_RANK_SIZE if ranks else PIXEL_SIZE
        self.size = size if size is not None else default[spatial_dims]
        self.smooth = (RANK_SMOOTH[spatial_dims] if ranks else 0.0) if smooth is None else smooth  # sigma, input pixels

    @property
    def recipe(self) -> dict[str, Any]:
        return {"detector": self.name, "size": self.size, "ranks": self.ranks, "smooth": self.smooth}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256, device=None) -> torch.Tensor:
        from medgen.privacy.families import gaussian_blur

        out = []
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].float().mean(1, keepdim=True)  # (B, 1, *S)
            if self.smooth > 0:
                x = gaussian_blur(x[:, 0], self.smooth)[:, None]  # the batch as channels: one blur each
            e = to_detector_input(x, self.spatial_dims, self.size).flatten(1)  # (B, S'^d)
            out.append(average_ranks(e) if self.ranks else e)
        return torch.cat(out)


class LatentDetector:
    """Native-resolution Pearson correlation (images larger than LATENT_MAX_SIZE area-downsampled
    to it), for the audit of a latent model: there every image compared is decoded through the
    model's autoencoder (`roundtrip`, a `RoundTrip`, recorded in the recipe), so an exact latent
    copy matches its decoded source with similarity 1."""

    name = "latent"

    def __init__(self, roundtrip, spatial_dims: int, size: int | None = None):
        self.roundtrip = roundtrip
        self.spatial_dims = spatial_dims
        self.size = size if size is not None else LATENT_MAX_SIZE[spatial_dims]

    @property
    def recipe(self) -> dict[str, Any]:
        return {"detector": self.name, "size": self.size, "space": "images decoded through the model's autoencoder", **self.roundtrip.recipe}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256, device=None) -> torch.Tensor:
        return torch.cat([to_detector_input(images[s : s + batch_size], self.spatial_dims, self.size).flatten(1)
                          for s in range(0, images.shape[0], batch_size)])


class FeatureDetector:
    """Any extractor of the evaluation registry (`medgen.metrics.features.get_extractor`)."""

    def __init__(self, name_or_path: str, weights: str | None = None, device=None):
        from medgen.metrics.features import get_extractor

        self.name = str(name_or_path)
        self.extractor: Callable[[torch.Tensor], torch.Tensor] = get_extractor(name_or_path, weights=weights, device=device)

    @property
    def recipe(self) -> dict[str, Any]:
        return {"detector": "features", "features": self.name, "recipe": dict(getattr(self.extractor, "recipe", {}) or {})}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 64, device=None) -> torch.Tensor:
        out = [torch.as_tensor(self.extractor(images[s : s + batch_size])).float().cpu() for s in range(0, images.shape[0], batch_size)]
        return torch.cat(out)


# ----------------------------------------------------------------------------- training


def default_steps(n_images: int, batch_size: int) -> int:
    """Enough passes for the encoder to separate individual images: 400 epochs, 400..4000 steps."""
    return int(min(4000, max(400, math.ceil(400 * n_images / batch_size))))


def train_detector(
    images: torch.Tensor,
    *,
    spatial_dims: int | None = None,
    steps: int | None = None,
    batch_size: int = 128,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    temperature: float = 0.07,
    image_size: int | None = None,
    embed_dim: int | None = None,
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    mixed_precision: str | None = None,
    augmentation: dict | None = None,
    progress: bool = True,
) -> SSLCopyDetector:
    """Train the SSL copy detector on `images` (N, C, *S) in [-1, 1] (the training set).

    NT-Xent (Chen et al. 2020) at `temperature` with two augmented views per image as positives
    and the other images of the batch as negatives (Dar et al. 2024). AdamW (lr default 2e-3 in
    2D, 5e-4 in 3D) with a short warm-up and cosine decay; bf16 autocast on CUDA unless
    `mixed_precision="no"`. `augmentation` overrides `augment`'s keyword defaults.
    """
    from medgen.progress import progress as progress_bar  # `progress` is this function's switch

    spatial_dims = spatial_dims or images.ndim - 2
    if images.ndim != spatial_dims + 2:
        raise DataError(f"training images have shape {tuple(images.shape)}, not (N, C, *S) with {spatial_dims} spatial axes")
    n = images.shape[0]
    if n < 2:
        raise DataError(f"the SSL copy detector needs at least 2 training images (NT-Xent contrasts each image with the others); got {n}")
    image_size = image_size if image_size is not None else ENCODER_DEFAULTS[spatial_dims]["image_size"]
    lr = lr if lr is not None else ENCODER_DEFAULTS[spatial_dims]["lr"]
    batch_size = max(2, min(batch_size, n))
    steps = steps or default_steps(n, batch_size)
    dev = default_device(device)
    mp = mixed_precision or ("bf16" if dev.type == "cuda" else "no")
    if mp not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {mp!r}")

    aug = dict(augmentation or {})
    torch.manual_seed(seed)
    encoder = CopyEncoder(spatial_dims, embed_dim, widths, blocks).to(dev)
    data = to_detector_input(images, spatial_dims, image_size)  # (N, 1, *S'), resized once
    if data.flatten(1).std(1).max() == 0:
        raise DataError("all training images are constant; the SSL copy detector cannot learn from them")
    data = data.to(dev) if data.numel() * 4 < (1 << 31) or dev.type == "cpu" else data.pin_memory()
    gen = torch.Generator(device=dev).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    encoder.train()
    order = torch.randperm(n, generator=cpu_gen)
    cursor = 0
    losses: list[float] = []
    start = time.perf_counter()
    bar = progress_bar(range(steps), desc="copy detector", enabled=progress)  # a bar on a terminal, lines in a log
    for step in bar:
        if cursor + batch_size > n:  # a new epoch: every image is seen once per pass
            order, cursor = torch.randperm(n, generator=cpu_gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        x = data[idx.to(data.device)].to(dev, non_blocking=True)  # (B, 1, *S')
        views = torch.cat([augment(x, gen, **aug), augment(x, gen, **aug)])  # (2B, 1, *S')
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mp == "bf16"):
            z = encoder(views)  # (2B, D)
        loss = nt_xent_loss(z[: len(idx)], z[len(idx) :], temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        if step % 20 == 0 or step == steps - 1:  # host sync only every 20 steps
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingError(f"copy detector: non-finite NT-Xent loss {value} at step {step}; lower --lr (now {lr})")
            bar.set_postfix(loss=f"{value:.3f}")
    seconds = time.perf_counter() - start
    losses = torch.stack(losses).float().cpu().tolist()
    if not all(math.isfinite(v) for v in losses):
        raise TrainingError(f"copy detector: non-finite NT-Xent loss during training; lower --lr (now {lr})")
    tail = losses[-max(1, steps // 10) :]
    info = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "temperature": temperature,
        "seed": seed, "n_images": n, "augmentation": aug, "mixed_precision": mp, "device": dev.type,
        "final_loss": sum(tail) / len(tail), "initial_loss": losses[0], "seconds": round(seconds, 2),
        "images_per_second": round(steps * batch_size / seconds, 1),
    }
    log.info("copy detector: %d steps, NT-Xent %.3f -> %.3f, %.0f images/s", steps, info["initial_loss"], info["final_loss"], info["images_per_second"])
    return SSLCopyDetector(encoder.cpu(), image_size, info)


# ----------------------------------------------------------------------------- choice


def build_detectors(spec: Any, train: torch.Tensor, *, options: dict | None = None, device=None, seed: int = 0, autoencoder=None) -> list:
    """Detectors from `spec`: an object with `embed`, a list, or a comma-separated string of

    - "ssl": the SSL detector, trained now on `train` (`options`: `train_detector` keywords);
    - "pixel-rank": Spearman correlation at low resolution; "pixel": Pearson correlation;
    - "latent": native-resolution correlation with the decoded training images (needs
      `autoencoder`, a `RoundTrip` of the latent model's autoencoder);
    - a folder written by `medgen audit train-detector` (or an audit folder holding detector/);
    - a name or TorchScript path of the evaluation feature registry (`options["weights"]`).
    """
    options = dict(options or {})
    spatial_dims = train.ndim - 2
    parts = spec if isinstance(spec, (list, tuple)) else [spec] if hasattr(spec, "embed") else [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise DataError(f"no detector in {spec!r}; use e.g. ssl,pixel-rank")
    out = []
    for part in parts:
        if hasattr(part, "embed"):
            out.append(part)
        elif part == "ssl":
            ssl_options = {k: v for k, v in options.items() if k != "weights"}
            ssl_options.setdefault("seed", seed)
            out.append(train_detector(train, spatial_dims=spatial_dims, device=device, **ssl_options))
        elif part in ("pixel", "pixel-rank"):
            out.append(PixelDetector(spatial_dims, ranks=part == "pixel-rank"))
        elif part == "latent":
            if autoencoder is None:
                raise DataError("the latent detector compares samples with training images decoded through the model's autoencoder: "
                                "audit a latent run (--run RUN_DIR) or pass --autoencoder RUN_DIR")
            out.append(LatentDetector(autoencoder, spatial_dims))
        elif Path(str(part)).is_dir() and (is_detector_dir(part) or is_detector_dir(Path(part) / "detector")):
            loaded = load_detector(part)
            if loaded.spatial_dims != spatial_dims:
                raise DataError(f"detector {part} was trained on {loaded.spatial_dims}D images but the audit images are {spatial_dims}D")
            out.append(loaded)
        else:
            features = FeatureDetector(str(part), weights=options.get("weights"), device=device)
            if getattr(features.extractor, "fit", None) is not None:  # in-domain extractors (pca) fit on the training set
                features.extractor.fit(train)
            out.append(features)
    return out
