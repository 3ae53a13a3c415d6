"""torchio preprocessing for 2D and 3D alike, set from the `data:` section of a config.

Order: canonical orientation (3D) -> resample to target spacing -> crop/pad to target shape ->
channel conversion -> intensity normalisation to [-1, 1] (or z-score).

2D images go through the same torchio transforms as (C, H, W, 1) volumes, so one code path
serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from medgen.data.readers import Loaded
from medgen.errors import ConfigError, DataError

INTENSITY_MODES = ("auto", "percentile", "minmax", "fixed", "ct", "zscore", "none")


@dataclass
class DataConfig:
    """Typed view of the `data:` config section (unknown keys are ignored)."""

    path: str | None = None
    spatial_dims: int | None = None  # 2 or 3; None: infer from the first file
    channels: int | None = None  # 1 or 3; None: keep
    shape: Sequence[int] | None = None  # crop/pad target per spatial axis
    spacing: Sequence[float] | None = None  # resample target (mm); None keeps
    canonical: bool = True  # reorient 3D volumes to RAS+
    intensity: dict[str, Any] = field(default_factory=lambda: {"mode": "auto"})
    split: dict[str, Any] = field(default_factory=lambda: {"val": 0.1, "holdout": 0.1, "seed": 0})
    on_bad_file: str = "error"
    cache: bool = False  # keep preprocessed tensors in memory after the first read
    num_workers: int = 0

    @classmethod
    def from_any(cls, cfg: Any) -> "DataConfig":
        if cfg is None:
            return cls()
        if isinstance(cfg, DataConfig):
            return cfg
        from medgen.config import to_dict

        raw = dict(to_dict(cfg))
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        out = cls(**known)
        out.validate()
        return out

    def validate(self) -> None:
        if self.spatial_dims not in (None, 2, 3):
            raise ConfigError(f"data.spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels!r}")
        if self.on_bad_file not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_file must be 'error' or 'skip', got {self.on_bad_file!r}")
        mode = self.intensity.get("mode", "auto")
        if mode not in INTENSITY_MODES:
            raise ConfigError(f"data.intensity.mode must be one of {INTENSITY_MODES}, got {mode!r}")
        if mode == "ct" and len(self.intensity.get("window", ())) != 2:
            raise ConfigError("data.intensity.mode=ct needs data.intensity.window: [low, high] in HU, e.g. [-1000, 1000]")
        if mode == "fixed" and len(self.intensity.get("in_range", ())) != 2:
            raise ConfigError("data.intensity.mode=fixed needs data.intensity.in_range: [low, high], e.g. [0, 255]")
        for name in ("shape", "spacing"):
            value = getattr(self, name)
            if value is not None and self.spatial_dims is not None and len(value) != self.spatial_dims:
                raise ConfigError(f"data.{name}={list(value)} has {len(value)} entries but data.spatial_dims={self.spatial_dims}")


def _intensity_transform(cfg: DataConfig, source_dtype: np.dtype):
    import torchio as tio

    spec = cfg.intensity
    mode = spec.get("mode", "auto")
    if mode == "auto":  # integer sources (8/16-bit PNG) by their dtype range, float sources by percentiles
        if np.issubdtype(source_dtype, np.integer) and np.iinfo(source_dtype).bits <= 16 and not np.issubdtype(source_dtype, np.signedinteger):
            info = np.iinfo(source_dtype)
            return tio.RescaleIntensity(out_min_max=(-1, 1), in_min_max=(float(info.min), float(info.max)))
        mode = "percentile"
    if mode == "percentile":
        lower, upper = float(spec.get("lower", 0.5)), float(spec.get("upper", 99.5))
        return tio.RescaleIntensity(out_min_max=(-1, 1), percentiles=(lower, upper))
    if mode == "minmax":
        return tio.RescaleIntensity(out_min_max=(-1, 1))
    if mode == "fixed":
        lo, hi = (float(v) for v in spec["in_range"])
        return tio.Compose([tio.Clamp(lo, hi), tio.RescaleIntensity(out_min_max=(-1, 1), in_min_max=(lo, hi))])
    if mode == "ct":  # HU window, e.g. [-1000, 1000] for whole-body CT, [-160, 240] soft tissue
        lo, hi = (float(v) for v in spec["window"])
        return tio.Compose([tio.Clamp(lo, hi), tio.RescaleIntensity(out_min_max=(-1, 1), in_min_max=(lo, hi))])
    if mode == "zscore":
        return tio.ZNormalization()
    return None


def preprocess(loaded: Loaded, cfg: DataConfig) -> torch.Tensor:
    """Loaded image -> float32 tensor (C, *spatial) ready for a network."""
    import torchio as tio

    arr = loaded.array
    spatial_dims = cfg.spatial_dims or loaded.spatial_dims
    if spatial_dims == 2 and arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]  # a one-slice volume is a 2D image
    if arr.ndim - 1 != spatial_dims:
        raise DataError(f"{loaded.path}: has {arr.ndim - 1} spatial dimensions (shape {tuple(arr.shape)}) but the dataset is {spatial_dims}D")
    affine = loaded.affine
    tensor = torch.from_numpy(np.ascontiguousarray(arr))
    if spatial_dims == 2:
        tensor = tensor[..., None]  # (C, H, W) -> (C, H, W, 1)
        affine = np.diag([loaded.spacing[0], loaded.spacing[1], 1.0, 1.0])
    image = tio.ScalarImage(tensor=tensor, affine=affine)
    transforms = []
    if spatial_dims == 3 and cfg.canonical:
        transforms.append(tio.ToCanonical())
    if cfg.spacing is not None:
        target = tuple(float(s) for s in cfg.spacing)
        transforms.append(tio.Resample(target if spatial_dims == 3 else (*target, 1.0)))
    if cfg.shape is not None:
        target_shape = tuple(int(s) for s in cfg.shape)
        transforms.append(tio.CropOrPad(target_shape if spatial_dims == 3 else (*target_shape, 1)))
    intensity = _intensity_transform(cfg, loaded.source_dtype)
    if intensity is not None:
        transforms.append(intensity)
    if transforms:
        image = tio.Compose(transforms)(image)
    out = image.data.float()
    if spatial_dims == 2:
        out = out[..., 0]
    if cfg.channels is not None and out.shape[0] != cfg.channels:
        if cfg.channels == 1 and out.shape[0] == 3:
            out = out.mean(0, keepdim=True)  # RGB -> gray
        elif cfg.channels == 3 and out.shape[0] == 1:
            out = out.expand(3, *out.shape[1:]).clone()
        else:
            raise DataError(f"{loaded.path}: has {out.shape[0]} channels; cannot convert to data.channels={cfg.channels}")
    return out.contiguous()


def output_spacing(loaded: Loaded, cfg: DataConfig) -> tuple[float, ...]:
    return tuple(float(s) for s in cfg.spacing) if cfg.spacing is not None else loaded.spacing
