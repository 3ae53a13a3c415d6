"""torchio preprocessing for 2D and 3D alike, set from the `data:` section of a config.

Order: canonical orientation (3D) -> resample to target spacing -> centre crop/pad to the target
shape (or, with `data.resize`, resize to it: the whole field of view, antialiased) -> channel
conversion -> intensity normalisation to [-1, 1] (or z-score).

2D images go through the same torchio transforms as (C, H, W, 1) volumes, so one code path
serves both.
"""

from __future__ import annotations

import numpy as np
import torch

from medgen.data.config import DataConfig  # noqa: F401  (re-exported: the data API)
from medgen.data.readers import Loaded
from medgen.errors import DataError

# Cropping more than this fraction of an axis is reported (check_samples warns once per dataset).
CROP_WARN_FRACTION = 0.1


def _intensity_transform(cfg: DataConfig, source_dtype: np.dtype):
    import torchio as tio

    spec = cfg.intensity
    mode = spec.mode
    if mode == "auto":  # integer sources (8/16-bit PNG) by their dtype range, float sources by percentiles
        if np.issubdtype(source_dtype, np.integer) and np.iinfo(source_dtype).bits <= 16 and not np.issubdtype(source_dtype, np.signedinteger):
            info = np.iinfo(source_dtype)
            return tio.RescaleIntensity(out_min_max=(-1, 1), in_min_max=(float(info.min), float(info.max)))
        mode = "percentile"
    if mode == "percentile":
        return tio.RescaleIntensity(out_min_max=(-1, 1), percentiles=(float(spec.lower), float(spec.upper)))
    if mode == "minmax":
        return tio.RescaleIntensity(out_min_max=(-1, 1))
    if mode == "fixed":
        lo, hi = (float(v) for v in spec.in_range)
        return tio.Compose([tio.Clamp(lo, hi), tio.RescaleIntensity(out_min_max=(-1, 1), in_min_max=(lo, hi))])
    if mode == "ct":  # HU window, e.g. [-1000, 1000] for whole-body CT, [-160, 240] soft tissue
        lo, hi = (float(v) for v in spec.window)
        return tio.Compose([tio.Clamp(lo, hi), tio.RescaleIntensity(out_min_max=(-1, 1), in_min_max=(lo, hi))])
    if mode == "zscore":
        return tio.ZNormalization()
    return None


def intensity_range(spec) -> tuple[float, float] | None:
    """The source values `_intensity_transform` sends to -1 and 1 when one linear map serves every
    image (`data.intensity`): the HU window (ct), `in_range` (fixed), (-1, 1) kept as they are
    (none). None for the per-image mappings (percentile, minmax, zscore) and for auto, which maps
    8/16-bit files by their type's range but float files per image: no single map inverts them."""
    if spec.mode == "ct":
        return float(spec.window[0]), float(spec.window[1])
    if spec.mode == "fixed":
        return float(spec.in_range[0]), float(spec.in_range[1])
    if spec.mode == "none":
        return -1.0, 1.0
    return None


def to_source_units(x, value_range: tuple[float, float]):
    """The inverse of the linear intensity mapping (source [lo, hi] -> [-1, 1]): [-1, 1] -> [lo, hi]
    (tensor or array). Source values the mapping clipped (outside a CT window) cannot come back."""
    lo, hi = value_range
    return lo + (x + 1) * ((hi - lo) / 2)


def _resize(image, target_shape: tuple[int, ...]):
    """Resize a torchio image to `target_shape`, keeping the field of view (tio.Resize's
    arithmetic), antialiased when shrinking: torchio's Gaussian-prefiltered resampling for
    volumes; torch's antialiased bilinear for 2D images, (C, H, W, 1) here, whose singleton
    axis ITK's smoothing filter cannot take (it needs 4 voxels along every axis)."""
    import torch.nn.functional as F
    import torchio as tio

    source = image.spatial_shape[: len(target_shape)]
    spacing = [float(sp) * n / t for sp, n, t in zip(image.spacing, source, target_shape)]
    if len(target_shape) == 3:
        return tio.Resample(spacing, antialias=min(source) >= 4)(image)  # off-by-one rounding: CropOrPad next
    x = image.data[..., 0].float()[None]  # (1, C, H, W)
    y = F.interpolate(x, size=target_shape, mode="bilinear", antialias=True, align_corners=False)
    return tio.ScalarImage(tensor=y[0, ..., None], affine=np.diag([*spacing, 1.0, 1.0]))


def preprocess(loaded: Loaded, cfg: DataConfig, *, report: dict | None = None) -> torch.Tensor:
    """Loaded image -> float32 tensor (C, *spatial) ready for a network.

    `report`, when given, receives `cropped`: the largest fraction of a spatial axis that
    centre-cropping to `data.shape` removed (0 when resizing or padding).
    """
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
    if transforms:
        image = tio.Compose(transforms)(image)
    transforms = []
    if cfg.shape is not None:
        target_shape = tuple(int(s) for s in cfg.shape)
        source_shape = image.spatial_shape[:spatial_dims]
        if cfg.resize and tuple(source_shape) != target_shape:
            image = _resize(image, target_shape)
        elif report is not None:
            report["cropped"] = max(0.0, *(1 - t / n for n, t in zip(source_shape, target_shape)))
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
    """Voxel size of `preprocess(loaded, cfg)` (resizing to `data.shape` scales it)."""
    spacing = tuple(float(s) for s in cfg.spacing) if cfg.spacing is not None else tuple(loaded.spacing)
    if not (cfg.resize and cfg.shape is not None):
        return spacing
    extent = [n * s for n, s in zip(loaded.shape, loaded.spacing)]  # field of view in mm, kept by resizing
    return tuple(e / int(t) for e, t in zip(extent, cfg.shape))
