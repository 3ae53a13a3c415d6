"""LPIPS-style perceptual distance (Zhang et al. 2018) with a backbone from a local weights file.

d(x, y) = sum_l mean_hw || w_l * (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|) ||^2 over backbone layers l,
with unit-normalised channel vectors. `w_l` are LPIPS's learned linear weights when the weights
file holds them (keys `lin.{l}`, shape (C_l,)), else 1 (LPIPS "baseline"). Volumes are scored on
random 2D slices along each axis (as Medical Diffusion does along depth).

Nothing is downloaded. The backbone is a torchvision ImageNet model whose `state_dict` the user
saves as safetensors, e.g. on a machine with internet::

    python -c "import torchvision, safetensors.torch as s; m = torchvision.models.vgg16(weights='DEFAULT'); \
s.save_file(m.state_dict(), 'vgg16.safetensors')"

and places at `$MEDGEN_WEIGHTS_DIR/vgg16.safetensors` (default `~/.cache/medgen/weights/`) or
passes with `loss.perceptual_weights=PATH`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medgen.errors import WeightsError

# layer taps: VGG16 relu1_2..relu5_3 as in LPIPS; ResNets after the stem and each stage.
VGG16_TAPS = (3, 8, 15, 22, 29)
BACKBONES = ("vgg16", "resnet18", "resnet50")
# LPIPS ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def weights_dir() -> Path:
    return Path(os.environ.get("MEDGEN_WEIGHTS_DIR", Path.home() / ".cache" / "medgen" / "weights"))


def default_weights_path(backbone: str) -> Path:
    return weights_dir() / f"{backbone}.safetensors"


def _missing_message(backbone: str, path: Path) -> str:
    return (f"perceptual loss '{backbone}' needs backbone weights, and {path} does not exist (nothing is "
            f"downloaded). Save torchvision's ImageNet {backbone} state_dict as safetensors there, e.g. "
            f"`python -c \"import torchvision, safetensors.torch as s; "
            f"s.save_file(torchvision.models.{backbone}(weights='DEFAULT').state_dict(), '{path.name}')\"`, "
            f"or pass loss.perceptual_weights=PATH, or set loss.perceptual=none.")


class PerceptualLoss(nn.Module):
    """LPIPS-style distance, frozen; input (B, C, *S) in [-1, 1] with C in {1, 3}; returns a scalar.

    Args:
        backbone: vgg16 | resnet18 | resnet50 (torchvision architectures).
        weights: safetensors file with the torchvision state_dict (+ optional `lin.{l}` LPIPS weights),
            or that state_dict itself.
        spatial_dims: 2 or 3; volumes are scored on `slices` random slices per axis.
    """

    def __init__(self, backbone: str = "vgg16", weights: str | os.PathLike | dict | None = None, spatial_dims: int = 2,
                 slices: int = 2):
        super().__init__()
        import torchvision
        from safetensors.torch import load_file

        if backbone not in BACKBONES:
            raise WeightsError(f"unknown perceptual backbone {backbone!r}; use one of {BACKBONES} or none")
        if isinstance(weights, dict):  # an in-memory state_dict (benchmarks, tests)
            state, path = weights, Path("<state_dict>")
        else:
            path = Path(weights) if weights else default_weights_path(backbone)
            if not path.is_file():
                raise WeightsError(_missing_message(backbone, path))
            try:
                state = load_file(str(path))
            except Exception as e:  # safetensors raises its own error types
                raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
        lin = {k: v for k, v in state.items() if k.startswith("lin.")}
        net = getattr(torchvision.models, backbone)(weights=None)
        missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("lin.")}, strict=False)
        needed = [k for k in missing if not k.startswith("fc.") and not k.startswith("classifier.")]
        if needed:
            raise WeightsError(f"{path} does not hold torchvision {backbone} weights (missing e.g. {needed[:3]})")
        if backbone == "vgg16":
            self.stages = nn.ModuleList()
            prev = 0
            for tap in VGG16_TAPS:
                self.stages.append(net.features[prev:tap + 1])
                prev = tap + 1
        else:
            self.stages = nn.ModuleList([nn.Sequential(net.conv1, net.bn1, net.relu),
                                         nn.Sequential(net.maxpool, net.layer1), net.layer2, net.layer3, net.layer4])
        self.lin = nn.ParameterList([nn.Parameter(lin[f"lin.{i}"].flatten(), requires_grad=False)
                                     for i in range(len(self.stages))]) if lin else None
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.spatial_dims, self.slices = spatial_dims, int(slices)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # BatchNorm statistics of the backbone stay frozen

    def _to_slices(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, D, H, W) -> (B * 3 * slices, C, *plane) for each axis; same slices for x and y."""
        xs, ys = [], []
        for axis in (2, 3, 4):
            idx = torch.randint(0, x.shape[axis], (self.slices,), device=x.device)
            xa = x.index_select(axis, idx).movedim(axis, 1).flatten(0, 1)
            ya = y.index_select(axis, idx).movedim(axis, 1).flatten(0, 1)
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
