"""Perceptual distance for autoencoder training: LPIPS (Zhang et al. 2018) and its unweighted
baseline, with torchvision backbones; volumes are scored on random 2D slices.

    d(x, y) = sum_l mean_hw sum_c w_lc (f_lc(x)/|f_l(x)| - f_lc(y)/|f_l(y)|)^2

over backbone layers l, with unit-normalised channel vectors (batch mean of the per-image
distances). Backbones (`PerceptualLoss(backbone=...)`):

- `lpips`: VGG16 relu1_2..relu5_3 with LPIPS v0.1's learned linear weights w_l, the loss of
  Medical Diffusion's VQ-GAN (taming-transformers' LPIPS; its `vgg.pth` is byte-identical,
  md5 d507d7349b931f0638a25a48a722f98a, to `lpips/weights/v0.1/vgg.pth` of the `lpips` package);
- `vgg16`: the same layers with w_l = 1, `lpips.LPIPS(net="vgg", lpips=False)`, the loss of
  Medfusion's VAE;
- `resnet18`, `resnet50`: unit weights after the stem and each stage.

The computation is ours, not `lpips.LPIPS`: one code path for every backbone, fp32 distances
under autocast, and volumes; tests check it against `lpips.LPIPS` on the same weights.

Where the weights come from (nothing else is tried; the first found is used):

1. backbone: `weights=PATH` (`loss.perceptual_weights`), a safetensors file holding torchvision's
   `state_dict` of the architecture; else `$MEDGEN_WEIGHTS_DIR/<arch>.safetensors` (default
   folder `~/.cache/medgen/weights/`, `<arch>` = vgg16 for `lpips`); else torchvision's own
   ImageNet checkpoint in torch.hub's cache (`$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`),
   which torchvision downloads there when online (not when MEDGEN_OFFLINE=1), exactly what
   `torchvision.models.vgg16(weights="DEFAULT")` does. Offline, place either file: e.g. on a
   machine with internet

       python -c "import torchvision, safetensors.torch as s; \
   s.save_file(torchvision.models.vgg16(weights='DEFAULT').state_dict(), 'vgg16.safetensors')"

   and copy `vgg16.safetensors` to `$MEDGEN_WEIGHTS_DIR/`, or copy torch.hub's
   `vgg16-397923af.pth` into `$TORCH_HOME/hub/checkpoints/`.
2. LPIPS linear weights (`lpips` only): tensors `lin.0` .. `lin.4` (shape (C_l,)) in the backbone's
   safetensors file when present; else the `lpips` package's `weights/v0.1/vgg.pth`, which ships
   inside the package (a dependency of medgen), so no download is ever needed for them.

Checkpoints in torch's pickle format (torch.hub's cache, the `lpips` package) are read with
`torch.load(weights_only=True)`; files a user passes must be safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medgen.errors import WeightsError
from medgen.models.discriminator import take_slices

# layer taps: VGG16 relu1_2..relu5_3 as in LPIPS; ResNets after the stem and each stage.
VGG16_TAPS = (3, 8, 15, 22, 29)
BACKBONES = ("lpips", "vgg16", "resnet18", "resnet50")
# LPIPS ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def weights_dir() -> Path:
    return Path(os.environ.get("MEDGEN_WEIGHTS_DIR", Path.home() / ".cache" / "medgen" / "weights"))


def architecture(backbone: str) -> str:
    """The torchvision architecture behind a backbone name (`lpips` is VGG16)."""
    return "vgg16" if backbone == "lpips" else backbone


def default_weights_path(backbone: str) -> Path:
    return weights_dir() / f"{architecture(backbone)}.safetensors"


def _offline() -> bool:
    # the switch medgen.metrics.features.offline() reads
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("MEDGEN_OFFLINE", "HF_HUB_OFFLINE"))


def torchvision_checkpoint(arch: str) -> Path:
    """Where torchvision keeps (and downloads) the ImageNet weights of `arch`: torch.hub's cache."""
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _torchvision_state(arch: str) -> tuple[dict | None, str]:
    """torchvision's ImageNet state_dict from torch.hub's cache, downloaded there when online;
    (None, why) when unavailable."""
    import torchvision

    cached = torchvision_checkpoint(arch)
    if not cached.is_file() and _offline():
        return None, f"{cached} does not exist and downloads are off (MEDGEN_OFFLINE)"
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        return weights.get_state_dict(progress=False, weights_only=True, map_location="cpu"), ""
    except Exception as e:  # no network, a corrupt cache file, ...
        return None, f"{cached} is not there and torchvision could not get it ({type(e).__name__}: {e})"


def _missing_message(backbone: str, path: Path, why: str) -> str:
    arch = architecture(backbone)
    return (f"perceptual loss '{backbone}' needs ImageNet {arch} weights: {path} does not exist, and {why}. "
            f"Either save torchvision's {arch} state_dict as safetensors at {path} (on a machine with internet: "
            f"`python -c \"import torchvision, safetensors.torch as s; "
            f"s.save_file(torchvision.models.{arch}(weights='DEFAULT').state_dict(), '{path.name}')\"`), "
            f"or copy torchvision's checkpoint to {torchvision_checkpoint(arch)}, "
            f"or pass loss.perceptual_weights=PATH, or set loss.perceptual=none.")


def _backbone_state(backbone: str, weights) -> tuple[dict, str]:
    """(state_dict, where it came from), per the lookup order of the module docstring."""
    from safetensors.torch import load_file

    if isinstance(weights, dict):  # an in-memory state_dict (benchmarks, memory estimates)
        return weights, "<state_dict>"
    path = Path(weights) if weights else default_weights_path(backbone)
    if path.is_file():
        try:
            return load_file(str(path)), str(path)
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
    if weights:
        raise WeightsError(_missing_message(backbone, path, "it was passed as loss.perceptual_weights"))
    state, why = _torchvision_state(architecture(backbone))
    if state is None:
        raise WeightsError(_missing_message(backbone, path, why))
    return state, str(torchvision_checkpoint(architecture(backbone)))


def lpips_linear_weights() -> dict[str, torch.Tensor]:
    """LPIPS v0.1 VGG linear weights from the `lpips` package: {"lin.l": (C_l,)}."""
    try:
        import lpips
    except ImportError:
        raise WeightsError("perceptual loss 'lpips' needs LPIPS's linear weights: `pip install lpips` (they ship "
                           "inside the package), or add tensors lin.0 .. lin.4 to the backbone's safetensors "
                           "file") from None
    path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)  # {"lin{l}.model.1.weight": (1, C_l, 1, 1)}
    return {f"lin.{i}": state[f"lin{i}.model.1.weight"].flatten() for i in range(len(VGG16_TAPS))}


def _headless(arch: str, device: str | torch.device = "meta") -> nn.Module:
    """torchvision `arch` without its classifier (unused here; VGG16's is 120M parameters),
    built on `device` ("meta": no memory, no initialisation)."""
    import torchvision

    with torch.device(device):
        net = getattr(torchvision.models, arch)(weights=None)
    setattr(net, "classifier" if arch == "vgg16" else "fc", nn.Identity())
    return net


def random_backbone_state(backbone: str) -> dict[str, torch.Tensor]:
    """Randomly initialised weights of `backbone` (same shapes and cost as the real ones): for
    memory estimates and benchmarks that must not depend on a weights file."""
    net = _headless(architecture(backbone)).to_empty(device="cpu")
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    state = net.state_dict()
    if backbone == "lpips":
        state.update({f"lin.{i}": torch.rand(c) for i, c in enumerate((64, 128, 256, 512, 512))})
    return state


class PerceptualLoss(nn.Module):
    """LPIPS-style distance, frozen; input (B, C, *S) in [-1, 1] with C in {1, 3}; returns a scalar.

    Args:
        backbone: lpips | vgg16 | resnet18 | resnet50 (see the module docstring).
        weights: safetensors file with the torchvision state_dict (+ optional `lin.{l}` LPIPS
            weights), or that state_dict itself; None: the default lookup.
        spatial_dims: 2 or 3. Volumes (B, C, D, H, W) are scored on `slices` random 2D slices per
            volume along each of `axes` (spatial axes: 0 = D), drawn per volume; Medical
            Diffusion: one slice along D (`axes=(0,)`, `slices=1`).
    """

    def __init__(self, backbone: str = "lpips", weights: str | os.PathLike | dict | None = None, spatial_dims: int = 2,
                 slices: int = 1, axes: tuple[int, ...] = (0,)):
        super().__init__()
        if backbone not in BACKBONES:
            raise WeightsError(f"unknown perceptual backbone {backbone!r}; use one of {BACKBONES} or none")
        if not axes or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"perceptual axes must be spatial axes among 0, 1, 2, got {list(axes)}")
        state, source = _backbone_state(backbone, weights)
        lin = {k: v for k, v in state.items() if k.startswith("lin.")}
        if backbone == "lpips" and not lin:
            lin = lpips_linear_weights()
        net = _headless(architecture(backbone))  # on "meta": the weights are assigned from `state`
        backbone_state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
                          if not k.startswith(("lin.", "fc.", "classifier."))}
        needed, _ = net.load_state_dict(backbone_state, strict=False, assign=True)
        if needed:
            raise WeightsError(f"{source} does not hold torchvision {architecture(backbone)} weights "
                               f"(missing e.g. {needed[:3]})")
        if architecture(backbone) == "vgg16":
            self.stages = nn.ModuleList()
            prev = 0
            for tap in VGG16_TAPS:
                self.stages.append(net.features[prev:tap + 1])
                prev = tap + 1
        else:
            self.stages = nn.ModuleList([nn.Sequential(net.conv1, net.bn1, net.relu),
                                         nn.Sequential(net.maxpool, net.layer1), net.layer2, net.layer3, net.layer4])
        # unit weights unless the backbone is lpips or the file brings learned ones
        self.lin = nn.ParameterList([nn.Parameter(lin[f"lin.{i}"].flatten().float(), requires_grad=False)
                                     for i in range(len(self.stages))]) if lin else None
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.backbone, self.source = backbone, source
        self.spatial_dims, self.slices, self.axes = spatial_dims, int(slices), tuple(int(a) for a in axes)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # BatchNorm statistics of the backbone stay frozen

    def _to_slices(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, D, H, W) -> (B * len(axes) * slices, C, *plane); the same slices of x and y."""
        xs, ys = [], []
        for axis in self.axes:
            xa, ya = x.movedim(2 + axis, 2), y.movedim(2 + axis, 2)  # sliced axis first
            idx = torch.randint(0, xa.shape[2], (xa.shape[0], self.slices), device=x.device)  # (B, k)
            xa, ya = take_slices(xa, idx), take_slices(ya, idx)
            if xs and xa.shape[-2:] != xs[0].shape[-2:]:  # anisotropic: resize planes to one size
                xa = F.interpolate(xa, size=xs[0].shape[-2:], mode="bilinear", align_corners=False)
                ya = F.interpolate(ya, size=xs[0].shape[-2:], mode="bilinear", align_corners=False)
            xs.append(xa)
            ys.append(ya)
        return torch.cat(xs), torch.cat(ys)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:
            x, y = self._to_slices(x, y)
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = x.new_zeros((), dtype=torch.float32)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            fx, fy = h.float().chunk(2)
            d = (F.normalize(fx, dim=1, eps=1e-10) - F.normalize(fy, dim=1, eps=1e-10)).pow(2)  # (B, C_l, h, w)
            d = d * self.lin[i].view(1, -1, 1, 1) if self.lin is not None else d
            total = total + d.sum(1).mean()
        return total
