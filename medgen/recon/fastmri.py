"""Real MRI k-space in the fastMRI HDF5 format for the probe (`medgen probe mri --kspace FILE.h5`).

A fastMRI file (facebookresearch/fastMRI) holds `kspace`, complex64 (slices, H, W) single-coil or
(slices, coils, H, W) multi-coil, and optionally the 320 x 320 reference `reconstruction_esc`
(single-coil) or `reconstruction_rss` (multi-coil), the sampling `mask` (W,) of test files, and
attrs such as `acquisition`, `max` and `norm`. Its k-space is fftshift(fft2(ifftshift(image),
norm="ortho")) over the last two axes, the same centred orthonormal FFT as deepinv's
`MRIMixin.fft` and sigpy's `fft`, so the data go into deepinv's operators unchanged (the tests
check this against `physics.MRI`).

`read_kspace` returns k-space in deepinv's layout (see kspace.py) with the reference magnitude the
probe scores against: |IFFT k| for one coil, the root-sum-of-squares (RSS) of the coil images for
several; each slice is divided by its reference's max. Raw fastMRI data are readout-oversampled
(640 x 368 knee, 640 x 320 brain): `image_shape=(320, 320)` centre-crops the coil images (fastMRI's
crop) and transforms back, as fastMRI does to make its own references.

Coil maps come from a file (`read_coil_maps`) or from ESPIRiT on the fully sampled k-space
(`estimate_coil_maps`). ESPIRiT's `crop` zeroes the maps where the calibration eigenvalue is
below it; we use crop=0 (keep every pixel) and normalise sum_c |S_c|^2 = 1, so that the fully
sampled operator F S is an isometry, as with the birdcage maps, and |S^H F^H k| equals the RSS
reference wherever the maps explain the data. A threshold (sigpy's default 0.95) cuts into the
object where the eigenvalue dips, e.g. at its edges with a narrow calibration region, and leaves
the operator blind there; in the background unthresholded maps are arbitrary, but the reference
is ~0 there.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medgen.errors import ConfigError, DataError
from medgen.recon.kspace import apply_mask, fft2c, ifft2c
from medgen.versions import require_extra

log = logging.getLogger(__name__)

COIL_MAP_DATASETS = ("coil_maps", "sens_maps")
ESPIRIT_CROP = 0.0  # keep the maps at every pixel (module docstring)
ESPIRIT_KERNEL = 6  # sigpy's EspiritCalib kernel width: the calibration region must be wider


@dataclass
class KspaceSlices:
    """Slices of one fastMRI file in deepinv's layout, each scaled so that its reference has max 1."""

    kspace: torch.Tensor  # float32 (N, 2, H, W) single-coil or (N, 2, C, H, W) multi-coil
    truth: torch.Tensor  # float32 (N, 1, H, W) reference magnitude: |IFFT k| or RSS of the coil images
    coils: int
    scale: torch.Tensor  # (N,) what each slice's raw k-space was divided by
    path: Path
    slices: list[int]  # slice indices in the file
    cropped: bool  # the coil images were centre-cropped to image_shape


def _center_crop(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The central shape of the last two axes, with fastMRI's offsets ((H - h) // 2, (W - w) // 2)."""
    h, w = shape
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


def _h5py(path: Path):
    try:
        import h5py
    except ImportError:
        raise DataError(f"{path}: fastMRI HDF5 files need the h5py package: pip install h5py") from None
    return h5py


def _open_h5(path: Path):
    """The file opened read-only, or DataError when it is missing or not HDF5."""
    h5py = _h5py(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist (expected an HDF5 file such as a fastMRI .h5 file)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path} is not a readable HDF5 file ({e}); give a fastMRI .h5 file") from None


def _datasets(f) -> list[str]:
    """Names of every dataset in an open HDF5 file (groups walked)."""
    import h5py

    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _dataset(f, path: Path, names: Sequence[str], what: str):
    """The first of `names` present as a dataset, or DataError listing what the file holds."""
    found = _datasets(f)
    for name in names:
        if name in found:
            return f[name]
    raise DataError(f"{path} has no {' or '.join(repr(n) for n in names)} dataset for the {what} "
                    f"(datasets found: {', '.join(found) or 'none'}); write the {what} under {names[0]!r}")


def _slice_indices(slices: Sequence[int] | None, n: int, path: Path) -> list[int]:
    if slices is None:
        return list(range(n))
    idx = [int(s) for s in slices]
    if not idx:
        raise ConfigError(f"no slices selected from {path}; give slice indices 0 to {n - 1} or none for all")
    bad = [s for s in idx if not 0 <= s < n]
    if bad:
        raise DataError(f"{path}: slice index(es) {bad} out of range; the file has {n} slice(s), numbered 0 to {n - 1}")
    return idx


def _check_image_shape(image_shape: tuple[int, int] | None) -> tuple[int, int] | None:
    if image_shape is None:
        return None
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ConfigError(f"image_shape must be two positive integers (H, W), got {image_shape}")
    return shape  # type: ignore[return-value]


def read_kspace(path: str | Path, *, slices: Sequence[int] | None = None,
                image_shape: tuple[int, int] | None = None) -> KspaceSlices:
    """Fully sampled k-space and reference images of a fastMRI file, per slice scaled to reference max 1;
    `image_shape` centre-crops the coil images (e.g. (320, 320) for raw fastMRI data). Blank slices are
    dropped with a warning."""
    path = Path(path)
    shape = _check_image_shape(image_shape)
    with _open_h5(path) as f:
        ds = _dataset(f, path, ("kspace",), "k-space")
        if ds.ndim not in (3, 4):
            raise DataError(f"{path}: 'kspace' has shape {ds.shape}; fastMRI stores (slices, H, W) single-coil or "
                            f"(slices, coils, H, W) multi-coil k-space")
        if ds.dtype.kind != "c":
            raise DataError(f"{path}: 'kspace' is {ds.dtype}, not complex; fastMRI stores complex64 k-space. Combine "
                            f"real and imaginary parts (re + 1j * im) and save with medgen.recon.fastmri.write_fastmri_h5")
        if "mask" in _datasets(f) and not np.all(np.asarray(f["mask"][()]) != 0):
            raise DataError(f"{path} is undersampled (its 'mask' leaves columns out: a fastMRI test or challenge file); "
                            f"the probe needs fully sampled k-space for its reference and its own masks: use train or val files")
        H, W = ds.shape[-2:]
        if shape is not None and (shape[0] > H or shape[1] > W):
            raise DataError(f"{path}: the images are {H}x{W}, smaller than image_shape {shape[0]}x{shape[1]}; "
                            f"choose an image_shape of at most {H}x{W}")
        crop = shape is not None and shape != (H, W)
        idx = _slice_indices(slices, ds.shape[0], path)
        kept = []
        for i in idx:
            raw = ds[i]
            if not np.isfinite(raw).all():
                raise DataError(f"{path}: slice {i} of 'kspace' contains NaN or inf values; leave it out with slices= "
                                f"or repair the file")
            k = torch.from_numpy(np.asarray(raw, dtype=np.complex64))
            kept.append(fft2c(_center_crop(ifft2c(k), shape)) if crop else k)
    k = torch.stack(kept)  # (N, [C,] H, W) complex64
    multi = k.ndim == 4
    truth = ifft2c(k).abs()
    if multi:
        truth = truth.square().sum(1).sqrt()
    scale = truth.amax(dim=(-2, -1))
    blank = scale <= 0
    if blank.all():
        raise DataError(f"{path}: every selected slice is blank (all-zero k-space); choose other slices")
    if blank.any():
        log.warning("%s: dropping %d blank slice(s) (all-zero reference image): %s", path, int(blank.sum()),
                    [i for i, b in zip(idx, blank.tolist()) if b])
    keep = (~blank).nonzero().flatten()
    k, truth, scale = k[keep], truth[keep], scale[keep]
    k = k / scale.view(-1, *[1] * (k.ndim - 1))
    return KspaceSlices(kspace=torch.view_as_real(k).movedim(-1, 1).contiguous(),
                        truth=(truth / scale[:, None, None])[:, None].contiguous(),
                        coils=int(k.shape[1]) if multi else 1, scale=scale, path=path,
                        slices=[idx[i] for i in keep.tolist()], cropped=crop)


def estimate_coil_maps(kspace: torch.Tensor, *, calib_width: int = 24) -> torch.Tensor:
    """(N, C, H, W) complex64 ESPIRiT maps (sigpy, crop=0) of fully sampled multi-coil k-space
    (N, 2, C, H, W), normalised to sum_c |S_c|^2 = 1 wherever they are nonzero. The central
    calib_width x calib_width block is the calibration region."""
    require_extra("sigpy.mri.app", "estimating coil maps (ESPIRiT) of multi-coil k-space without --coil-maps")
    from sigpy.mri.app import EspiritCalib

    if kspace.ndim != 5 or kspace.shape[1] != 2:
        raise ConfigError(f"coil maps are estimated from multi-coil k-space (N, 2, C, H, W), got shape {tuple(kspace.shape)}")
    H, W = kspace.shape[-2:]
    if not ESPIRIT_KERNEL < int(calib_width) <= min(H, W):
        raise ConfigError(f"calib_width={calib_width} must lie between {ESPIRIT_KERNEL + 1} (wider than ESPIRiT's "
                          f"{ESPIRIT_KERNEL}x{ESPIRIT_KERNEL} kernel) and {min(H, W)} (the k-space is {H}x{W})")
    k = torch.view_as_complex(kspace.detach().to("cpu", torch.float32).movedim(1, -1).contiguous()).numpy()
    maps = torch.from_numpy(np.stack([
        EspiritCalib(ks, calib_width=int(calib_width), crop=ESPIRIT_CROP, show_pbar=False).run() for ks in k
    ])).to(torch.complex64)
    norm = maps.abs().square().sum(1, keepdim=True).sqrt()
    return (maps * torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))).to(kspace.device)


def _read_array(path: Path, names: Sequence[str], what: str) -> np.ndarray:
    """An array from a .npy file (no pickles) or an HDF5 file (the first dataset of `names`)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if not path.is_file():
            raise DataError(f"{path} does not exist (expected a .npy file with the {what})")
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable .npy array of {what} ({e}); save a plain numeric array "
                            f"with numpy.save") from None
    if suffix in (".h5", ".hdf5"):
        with _open_h5(path) as f:
            return np.asarray(_dataset(f, path, names, what)[()])
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'} for the {what}; use .npy or .h5")


def read_coil_maps(path: str | Path, n_slices: int, coils: int, shape: tuple[int, int]) -> torch.Tensor:
    """(n_slices, coils, H, W) complex64 coil maps from .h5 (`coil_maps` or `sens_maps`) or .npy;
    maps of shape (coils, H, W) serve every slice. Used as given (not renormalised)."""
    path = Path(path)
    arr = _read_array(path, COIL_MAP_DATASETS, "coil maps")
    one, per_slice = (int(coils), *shape), (int(n_slices), int(coils), *shape)
    if tuple(arr.shape) not in (one, per_slice):
        raise DataError(f"{path}: coil maps have shape {arr.shape}; expected {one} (all slices) or {per_slice} "
                        f"(per slice) for {coils} coil(s) on {shape[0]}x{shape[1]} images")
    if arr.dtype.kind not in "biufc":
        raise DataError(f"{path}: coil maps are {arr.dtype}; expected complex (or real) numbers")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: coil maps contain NaN or inf values; re-estimate or repair them")
    maps = torch.from_numpy(np.asarray(arr, dtype=np.complex64))
    return maps.expand(per_slice).clone()


def _json_mask(path: Path, width: int) -> np.ndarray:
    """A (W,) 0/1 mask from a JSON list of W 0/1 values or of sampled column indices."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable JSON file ({e})") from None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise DataError(f"{path}: expected a JSON list of sampled column indices or of {width} 0/1 values")
    if len(values) == width and set(values) <= {0, 1}:
        return np.asarray(values, dtype=np.float32)
    bad = [v for v in values if isinstance(v, bool) or not float(v).is_integer() or not 0 <= v < width]
    if bad:
        raise DataError(f"{path}: {bad[:5]} are not column indices 0 to {width - 1} (and the list is not {width} "
                        f"0/1 values); give sampled column indices or one 0/1 value per column")
    mask = np.zeros(width, dtype=np.float32)
    mask[np.asarray(values, dtype=np.int64)] = 1
    return mask


def read_mask(path: str | Path, shape: tuple[int, int]) -> torch.Tensor:
    """(H, W) float32 0/1 mask from .npy, .h5 (`mask`) or .json; a (W,) mask samples whole columns
    (phase-encoding lines on the last axis)."""
    path = Path(path)
    H, W = (int(s) for s in shape)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise DataError(f"{path} does not exist (expected a JSON mask)")
        arr = _json_mask(path, W)
    else:
        arr = _read_array(path, ("mask",), "mask")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: the mask is {arr.dtype}; expected 0/1 numbers or booleans")
    if arr.shape == (W,):
        arr = np.broadcast_to(arr, (H, W))
    elif arr.shape != (H, W):
        raise DataError(f"{path}: the mask has shape {arr.shape}; expected ({W},) (sampled columns) or ({H}, {W})")
    arr = arr.astype(np.float32)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise DataError(f"{path}: mask values must be 0 or 1, found {np.unique(arr[~np.isin(arr, (0.0, 1.0))])[:5].tolist()}")
    if not arr.any():
        raise DataError(f"{path}: the mask samples nothing; mark at least one column with 1")
    return torch.from_numpy(np.ascontiguousarray(arr))


def add_measurement_noise(y: torch.Tensor, mask: torch.Tensor, sigma: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """y plus complex white Gaussian noise, std `sigma` per real and imaginary part, on the measured
    entries only (mask (H, W) as in `apply_mask`); unmeasured entries keep their value (0 in M k).
    The FFT is unitary, so sigma is also the image-domain noise level of the zero-filled image."""
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"measurement noise sigma must be a finite number >= 0, got {sigma}")
    if sigma == 0:
        return y
    noise = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)  # CPU generator, any device
    return y + apply_mask(sigma * noise, mask.to(y))


def write_fastmri_h5(path: str | Path, kspace: np.ndarray, *, reconstruction: np.ndarray | None = None,
                     mask: np.ndarray | None = None, attrs: dict[str, Any] | None = None) -> Path:
    """Write k-space (slices, [coils,] H, W) as a fastMRI file: `kspace` complex64, the reference in
    `reconstruction_esc` (single-coil) or `reconstruction_rss` (multi-coil) with fastMRI's `max` and
    `norm` attrs, an optional `mask`, and `attrs`."""
    path = Path(path)
    h5py = _h5py(path)
    k = np.asarray(kspace)
    if k.ndim not in (3, 4) or k.dtype.kind != "c":
        raise DataError(f"cannot write {path}: kspace must be a complex array (slices, H, W) or (slices, coils, H, W), "
                        f"got {k.dtype} of shape {k.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=k.astype(np.complex64, copy=False))
        if reconstruction is not None:
            rec = np.asarray(reconstruction, dtype=np.float32)
            f.create_dataset("reconstruction_esc" if k.ndim == 3 else "reconstruction_rss", data=rec)
            f.attrs["max"] = float(rec.max())
            f.attrs["norm"] = float(np.linalg.norm(rec))
        if mask is not None:
            f.create_dataset("mask", data=np.asarray(mask))
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


def simulate_kspace(images: torch.Tensor, coil_maps: torch.Tensor | None = None) -> np.ndarray:
    """fastMRI-layout k-space (N, H, W), or (N, C, H, W) with coil maps (C, H, W), of (N, 1, H, W)
    images (magnitudes, or complex), with the centred orthonormal FFT."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ConfigError(f"images must be (N, 1, H, W), got shape {tuple(images.shape)}")
    x = images.detach().cpu()[:, 0].to(torch.complex64)
    if coil_maps is not None:
        if coil_maps.ndim != 3 or tuple(coil_maps.shape[-2:]) != tuple(x.shape[-2:]):
            raise ConfigError(f"coil maps must be (C, {x.shape[-2]}, {x.shape[-1]}), got shape {tuple(coil_maps.shape)}")
        x = coil_maps.detach().cpu().to(torch.complex64)[None] * x[:, None]
    return fft2c(x).numpy()
