"""Readers for 2D images and 3D volumes.

Every reader returns a `Loaded` image: a float32 array of shape (C, H, W) for 2D or
(C, X, Y, Z) for 3D (torchio's axis order, RAS+ after canonical reorientation), the
spacing per spatial axis, a 4x4 affine and the source dtype (integer sources such as 8/16-bit
PNG are rescaled by their dtype range; float sources by percentiles).

Formats:
  2D  PNG / JPEG / TIFF (8 or 16 bit, grayscale or RGB) via Pillow; single-frame DICOM via
      pydicom with RescaleSlope/RescaleIntercept applied.
  3D  NIfTI (.nii, .nii.gz) via nibabel, NRRD / MHA / MHD via torchio (SimpleITK underneath),
      a folder holding one DICOM series (SimpleITK's series reader through torchio),
      multi-frame DICOM, and .npy (loaded with allow_pickle=False).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from medgen.errors import DataError

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".npy")
SUPPORTED_SUFFIXES = IMAGE_2D_SUFFIXES + DICOM_SUFFIXES + VOLUME_SUFFIXES


@dataclass
class Loaded:
    array: np.ndarray  # float32, (C, *spatial)
    spacing: tuple[float, ...]
    affine: np.ndarray  # 4x4; for 2D images the in-plane spacing on the diagonal
    source_dtype: np.dtype
    path: Path

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])


def suffix_of(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_dicom_series_dir(path: Path) -> bool:
    return path.is_dir() and any(suffix_of(p) in DICOM_SUFFIXES for p in path.iterdir() if p.is_file())


def is_supported(path: Path) -> bool:
    return suffix_of(path) in SUPPORTED_SUFFIXES or is_dicom_series_dir(path)


def _affine_2d(spacing: tuple[float, float]) -> np.ndarray:
    return np.diag([spacing[0], spacing[1], 1.0, 1.0])


def _read_pil(path: Path) -> Loaded:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.array(im)
            dtype = np.dtype(np.uint16) if im.mode.startswith("I;16") or arr.max(initial=0) < 65536 else np.dtype(np.int32)
            arr = arr[None]
        elif im.mode in ("L", "P", "1", "LA"):
            arr = np.array(im.convert("L"))[None]
            dtype = np.dtype(np.uint8)
        elif im.mode == "F":
            arr = np.array(im)[None]
            dtype = np.dtype(np.float32)
        else:  # RGB, RGBA, CMYK, YCbCr -> RGB
            arr = np.moveaxis(np.array(im.convert("RGB")), -1, 0)
            dtype = np.dtype(np.uint8)
    return Loaded(arr.astype(np.float32), (1.0, 1.0), _affine_2d((1.0, 1.0)), dtype, path)


def _read_dicom_file(path: Path) -> Loaded:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        # DICOM written without the preamble and 'DICM' prefix (ACR-NEMA style) still reads when
        # forced; anything else (a misnamed text file) has no pixel data and is called what it is
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            ds = None
        if ds is None or "PixelData" not in ds:
            raise DataError(f"{path}: not a DICOM file (no DICOM header, no pixel data); remove it or fix its name") from None
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    arr = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    arr = arr * slope + intercept
    rescaled = slope != 1.0 or intercept != 0.0
    dtype = np.dtype(np.float32) if rescaled else np.dtype(ds.pixel_array.dtype)
    pixel_spacing = tuple(float(s) for s in getattr(ds, "PixelSpacing", (1.0, 1.0)))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if getattr(ds, "SamplesPerPixel", 1) == 3:  # colour: (H, W, 3) or (F, H, W, 3)
        arr = np.moveaxis(arr, -1, 0)
        if frames > 1:
            raise DataError(f"{path}: multi-frame colour DICOM is not supported")
        return Loaded(arr, pixel_spacing, _affine_2d(pixel_spacing), dtype, path)
    if frames > 1:  # (F, H, W) -> (1, H, W, F): frames along the last axis
        thickness = float(getattr(ds, "SliceThickness", 1.0) or 1.0)
        spacing = (*pixel_spacing, thickness)
        return Loaded(np.moveaxis(arr, 0, -1)[None], spacing, np.diag([*spacing, 1.0]), dtype, path)
    return Loaded(arr[None], pixel_spacing, _affine_2d(pixel_spacing), dtype, path)


def _check_dicom_series(folder: Path) -> None:
    """One series per folder, and every .dcm file part of it (GDCM silently drops unreadable
    slices, which would shift the volume's geometry)."""
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) > 1:
        raise DataError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
    used = {Path(f).name for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])} if series else set()
    dropped = sorted(p.name for p in folder.iterdir() if p.is_file() and suffix_of(p) in DICOM_SUFFIXES and p.name not in used)
    if dropped:
        raise DataError(f"{folder}: DICOM series with {len(dropped)} unreadable or foreign file(s): {', '.join(dropped[:5])}; "
                        f"remove or replace them")


@contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK prints warnings straight to stderr; medgen reports problems as errors instead."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_torchio(path: Path) -> Loaded:
    import torchio as tio

    with _quiet_itk():
        if path.is_dir():
            _check_dicom_series(path)
        image = tio.ScalarImage(path)
        image.load()
    arr = image.data.numpy()
    dtype = np.dtype(arr.dtype)
    return Loaded(arr.astype(np.float32, copy=False), tuple(float(s) for s in image.spacing), np.asarray(image.affine, dtype=np.float64), dtype, path)


def _read_nifti(path: Path) -> Loaded:
    # nibabel directly: SimpleITK (torchio's first choice) silently replaces NaN voxels, and we
    # must report them. nibabel's voxel order and RAS+ affine match torchio's convention.
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim == 4:  # (X, Y, Z, C) -> (C, X, Y, Z)
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise DataError(f"{path}: NIfTI with {arr.ndim} dimensions (shape {arr.shape}) is not supported; expected 3D or 4D")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    return Loaded(np.ascontiguousarray(arr), spacing, np.asarray(img.affine, dtype=np.float64), np.dtype(img.get_data_dtype()), path)


def _read_npy(path: Path) -> Loaded:
    arr = np.load(path, allow_pickle=False)
    dtype = np.dtype(arr.dtype)
    if arr.ndim == 2:  # (H, W)
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[0] in (1, 3) and min(arr.shape[1:]) > 4:
        pass  # (C, H, W)
    elif arr.ndim == 3:  # (X, Y, Z) volume
        arr = arr[None]
    elif arr.ndim != 4:
        raise DataError(f"{path}: .npy array has shape {arr.shape}; expected (H, W), (C, H, W), (X, Y, Z) or (C, X, Y, Z)")
    spacing = (1.0,) * (arr.ndim - 1)
    affine = np.diag([*spacing, 1.0]) if arr.ndim == 4 else _affine_2d((1.0, 1.0))
    return Loaded(arr.astype(np.float32), spacing, affine, dtype, path)


def load(path: str | os.PathLike) -> Loaded:
    """Read one image or volume; raise `DataError` naming the file on any problem."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    suffix = suffix_of(path)
    try:
        if path.is_dir():
            if not is_dicom_series_dir(path):
                raise DataError(f"{path}: folder holds no DICOM series (.dcm files)")
            loaded = _read_torchio(path)
        elif suffix in IMAGE_2D_SUFFIXES:
            loaded = _read_pil(path)
        elif suffix in DICOM_SUFFIXES:
            loaded = _read_dicom_file(path)
        elif suffix == ".npy":
            loaded = _read_npy(path)
        elif suffix in (".nii", ".nii.gz"):
            loaded = _read_nifti(path)
        elif suffix in VOLUME_SUFFIXES:
            loaded = _read_torchio(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)} or a DICOM series folder")
    except DataError:
        raise
    except Exception as e:  # corrupt / truncated files surface as many library-specific errors
        raise DataError(f"{path}: could not be read ({type(e).__name__}: {e})") from None
    if loaded.array.size == 0 or min(loaded.shape) == 0:
        raise DataError(f"{path}: image is empty (shape {loaded.array.shape})")
    if not np.isfinite(loaded.array).all():
        n_bad = int((~np.isfinite(loaded.array)).sum())
        raise DataError(f"{path}: contains {n_bad} NaN/Inf voxels; fix or remove the file (or pass --on-bad-file skip)")
    return loaded


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read one file: float32 array (C, *spatial) and the spacing per spatial axis."""
    loaded = load(path)
    return loaded.array, loaded.spacing
