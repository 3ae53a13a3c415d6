"""Sample files as they leave medgen: their format, their intensity units, and the marks that say
they are synthetic.

A sample leaves the model as (C, *S) in [-1, 1]: the image the data config's intensity mapping
(`medgen.data.preprocess`) made of a training file. `SampleFormat` writes it in the units the model
was trained on (`units="source"`, the default), through the inverse of that mapping where one
linear map served every image: Hounsfield units for a CT window (mode ct), the source range for
mode fixed, the values as they are for mode none. Per-image mappings (percentile, minmax, zscore,
and auto, which maps float files per image) cannot be inverted globally: those samples are written
in [0, 1], which spans the model's [-1, 1]. `units="raw"` keeps the model's [-1, 1].

Formats (`value_range` [lo, hi] = the file values of the model's -1 and 1):

- PNG (2D, 8/16-bit grayscale or 8-bit RGB): the type's range is the value range, pixel 0 = lo,
  255 (65535) = hi; a PNG cannot hold negative or fractional values, so its text says what they are.
- NIfTI (3D, `.nii.gz`, affine diag(spacing) as training resampled them): HU as int16 with
  scl_slope 1 / scl_inter 0 (whole HU, CT's own resolution); anything else float32 values that
  are the units themselves (scl_slope 1, scl_inter 0 written out: nothing to rescale).
- DICOM: 2D one file, 3D one series per volume (a folder of one file per slice along the third
  axis; ImagePositionPatient/ImageOrientationPatient place voxel (i, j, k) where the NIfTI affine
  does, in DICOM's LPS). 16-bit pixels: int16 HU with RescaleSlope 1 (CT Image Storage, Modality
  CT, for a ct-mode run), otherwise uint16 with RescaleSlope/RescaleIntercept mapping 0..65535 to
  the value range (Secondary Capture, Modality OT, ConversionType SYN: medgen does not know the
  modality of the training data). Explicit VR little endian, a full file meta.

Every file says it is synthetic and which release (or sample set) it belongs to: PNG text chunks
(Description, Software, Release ID), NIfTI `descrip` and `intent_name`, DICOM ImageType
DERIVED\\SECONDARY\\SYNTHETIC, a SeriesDescription, BurnedInAnnotation NO, PatientName and
PatientID SYNTHETIC^<release id> and no other patient data. The release id never holds a path or
a name; DICOM UIDs are made by `pydicom.uid.generate_uid` from it and the sample's seed, so every
process of a sharded run writes the same UIDs and a study holds the whole set.

`reading_config` is the data config that reads the files back to the model's [-1, 1] within
quantization (the run's own HU window for HU; a fixed range otherwise); `medgen release` audits its
files through it, so what is audited is what leaves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medgen.errors import ConfigError

FORMATS = ("png", "nifti", "dicom")  # = medgen.sample.commands.FORMATS (kept torch-free there)
UNITS = ("source", "raw")
DEFAULT_FORMAT = {2: "png", 3: "nifti"}
SUFFIXES = {("png", 2): ".png", ("nifti", 3): ".nii.gz", ("dicom", 2): ".dcm", ("dicom", 3): ""}  # "": a series folder
RAW_UNITS = "[-1, 1] (raw)"
PER_IMAGE_UNITS = "[0, 1] (per-image normalization cannot be inverted)"
AUTO_UNITS = "[0, 1] (mode auto: the training files' type range or per-image normalization, not recorded)"
DICOM_LEVELS = 65535  # uint16 pixel values spanning the value range
NIFTI_DESCRIP, NIFTI_INTENT = 80, 16  # bytes the NIfTI-1 header holds
PATIENT_DIRECTION = {(1, 0, 0): "L", (-1, 0, 0): "R", (0, 1, 0): "P", (0, -1, 0): "A"}  # LPS axis -> DICOM PatientOrientation
SYNTHETIC = "synthetic"


def sample_set_id(*parts: Any) -> str:
    """A sample set's id, the same for the same inputs (every process of a sharded run, and a rerun,
    write the same bytes): 'smp-' and 16 hex digits of a sha256 over `parts` (never a path)."""
    return "smp-" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def new_release_id() -> str:
    """A release attempt's id: 'rel-' and 16 random hex digits (no path, no name)."""
    import uuid

    return "rel-" + uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class SampleFormat:
    """How samples are written: `format`, the `units` and `value_range` their values are in, the
    markers. Build with `sample_format`; write with `write`."""

    format: str  # png | nifti | dicom
    spatial_dims: int
    units: str  # for a person: "HU", "source range [0, 4095]", PER_IMAGE_UNITS, RAW_UNITS, ...
    value_range: tuple[float, float]  # the file values of the model's -1 and 1
    mode: str  # the data config's intensity mode, or "raw"
    release_id: str
    bit_depth: int = 8  # PNG only
    spacing: tuple[float, ...] | None = None  # mm per spatial axis (None: 1 mm)

    @property
    def hu(self) -> bool:
        return self.mode == "ct"

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.format, self.spatial_dims]

    def _spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.spacing) if self.spacing else (1.0,) * self.spatial_dims

    # ------------------------------------------------------------------------- reading back

    def reading_intensity(self) -> dict[str, Any]:
        """The `data.intensity` section that maps the files back to the model's [-1, 1]."""
        if self.format == "png":
            return {"mode": "fixed", "in_range": [0.0, float(2**self.bit_depth - 1)]}
        if self.hu:
            return {"mode": "ct", "window": list(self.value_range)}
        return {"mode": "fixed", "in_range": list(self.value_range)}

    def reading_config(self, data_cfg: Any):
        """`data_cfg` (the run's) with `reading_intensity`: reads the files back as the model made them."""
        from medgen.data.config import DataConfig, IntensityConfig

        return dataclasses.replace(DataConfig.from_any(data_cfg), intensity=IntensityConfig(**self.reading_intensity()))

    # ------------------------------------------------------------------------- what a person reads

    def _range_text(self) -> str:
        lo, hi = self.value_range
        unit = " HU" if self.hu else ""
        return f"{lo:g}{unit} and {hi:g}{unit}"

    def storage(self) -> str:
        lo, hi = self.value_range
        if self.format == "png":
            top = 2**self.bit_depth - 1
            return f"{self.bit_depth}-bit PNG: pixel value p is {lo:g} + p * {hi - lo:g} / {top} (0 = {lo:g}, {top} = {hi:g})"
        if self.format == "nifti":
            return ("int16 Hounsfield units (scl_slope 1, scl_inter 0)" if self.hu else
                    "float32 values in these units (scl_slope 1, scl_inter 0: nothing to rescale)")
        return ("DICOM int16 Hounsfield units (RescaleSlope 1, RescaleIntercept 0)" if self.hu else
                f"DICOM uint16 pixels; RescaleSlope and RescaleIntercept map 0..{DICOM_LEVELS} to [{lo:g}, {hi:g}]")

    def intensity_sentence(self) -> str:
        why = {
            "raw": "the model's own [-1, 1] (--units raw)",
            "ct": f"Hounsfield units: the model's -1 and 1 are the training window's {self._range_text()} "
                  f"(values outside the window were clipped in training and do not occur)",
            "fixed": f"the training files' units: the model's -1 and 1 are data.intensity.in_range's {self._range_text()}",
            "none": "the values the model was trained on (data.intensity.mode none: no mapping), within [-1, 1]",
            "auto": "[0, 1], spanning the model's [-1, 1]: data.intensity.mode auto mapped 8/16-bit training files by their "
                    "type's range and float files per image, and the run does not record which",
        }.get(self.mode, f"[0, 1], spanning the model's [-1, 1]: data.intensity.mode {self.mode} normalized every training "
                         f"image by its own statistics, which no single map inverts")
        return f"Values are {why}. Storage: {self.storage()}."

    def markers(self) -> dict[str, str]:
        """What every file carries to say it is synthetic (PNG text chunks, NIfTI header fields,
        DICOM attributes), as name -> value."""
        from medgen import __version__

        lo, hi = self.value_range
        if self.format == "png":
            return {"Description": f"synthetic image generated by medgen {__version__} (a diffusion model's sample); not a patient. "
                                   f"Release {self.release_id}. {self.storage()} ({self.units}).",
                    "Software": f"medgen {__version__}", "Release ID": self.release_id}
        if self.format == "nifti":
            descrip = f"{SYNTHETIC}, not a patient; medgen {__version__}; {self.release_id}"
            unit = "; HU" if self.hu else f"; [{lo:g}, {hi:g}]"
            if len(descrip) + len(unit) <= NIFTI_DESCRIP:
                descrip += unit
            return {"descrip": descrip[:NIFTI_DESCRIP], "intent_name": SYNTHETIC[:NIFTI_INTENT]}
        who = f"SYNTHETIC^{self.release_id}"
        return {"ImageType": "DERIVED\\SECONDARY\\SYNTHETIC", "SeriesDescription": f"SYNTHETIC medgen {__version__}, not a patient",
                "BurnedInAnnotation": "NO", "PatientName": who, "PatientID": who,
                "ImageComments": f"synthetic image generated by medgen {__version__}; not a patient. Release {self.release_id}. "
                                 f"{self.intensity_sentence()}"}

    def description(self) -> dict[str, Any]:
        """What the files are, for the data card and the manifest (`output_description`)."""
        marks = self.markers()
        where = {"png": "PNG text chunks", "nifti": "NIfTI header", "dicom": "DICOM attributes"}[self.format]
        lines = [f"{where} {k}: {v}" for k, v in marks.items() if k != "ImageComments"]
        if self.format == "dicom":
            lines.append(f"DICOM: {'CT Image Storage, Modality CT' if self.hu else 'Secondary Capture, Modality OT, ConversionType SYN'}; "
                         f"new UIDs; no patient data")
        return {"format": self.format, "units": self.units, "intensity": self.intensity_sentence(),
                "value_range": list(self.value_range), "release_id": self.release_id, "markers": lines,
                "read_with": {"intensity": self.reading_intensity()}}

    # ------------------------------------------------------------------------- writing

    def write(self, path: str | os.PathLike, img, seed: int) -> None:
        """Write one sample, (C, *S) in [-1, 1], to `path` (a series folder for 3D DICOM, written
        under a hidden name and renamed when complete). `seed` (the sample's) makes its DICOM UIDs."""
        from medgen.io import atomic_write_bytes

        path = Path(path)
        x = img.detach().float().clamp(-1, 1).cpu().numpy()
        if self.format == "png":
            atomic_write_bytes(path, self._png(x))
        elif self.format == "nifti":
            self._nifti(path, x)
        elif self.spatial_dims == 2:
            atomic_write_bytes(path, self._dicom_slice(x[0], seed, 0, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), self._spacing()))
        else:
            self._dicom_series(path, x[0], seed)

    def _values(self, x: np.ndarray) -> np.ndarray:
        from medgen.data.preprocess import to_source_units

        return to_source_units(x.astype(np.float64), self.value_range)

    def _png(self, x: np.ndarray) -> bytes:
        """(C, H, W) -> PNG (grayscale 8/16-bit, or RGB 8-bit) with the marker text chunks."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        f = (x + 1) / 2  # the share of the value range
        if x.shape[0] == 1 and self.bit_depth == 16:
            image = Image.fromarray((f[0] * 65535).round().astype(np.uint16))
        else:
            arr = (f * 255).round().astype(np.uint8)
            image = Image.fromarray(arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr[:3].transpose(1, 2, 0)))
        info = PngInfo()
        for key, value in self.markers().items():
            info.add_text(key, value)
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()

    def _nifti(self, path: Path, x: np.ndarray) -> None:
        """(C, D, H, W) -> NIfTI, affine diag(spacing) (torchio's axis order, RAS+), units as `storage`."""
        import nibabel as nib

        v = self._values(x)
        v = v[0] if v.shape[0] == 1 else np.moveaxis(v, 0, -1)  # channels last for nibabel
        data = np.clip(np.round(v), -32768, 32767).astype(np.int16) if self.hu else v.astype(np.float32)
        image = nib.Nifti1Image(data, np.diag([*self._spacing(), 1.0]))
        header = image.header
        header.set_xyzt_units("mm")
        header.set_slope_inter(1.0, 0.0)  # written as given (nibabel rescales only NaN slopes)
        for key, value in self.markers().items():
            header[key] = value.encode("ascii", "replace")
        nib.save(image, str(path))

    def _dicom_pixels(self, values: np.ndarray) -> tuple[np.ndarray, str, str]:
        """Source values -> (16-bit pixels, RescaleSlope, RescaleIntercept) as DICOM DS strings."""
        from pydicom.valuerep import format_number_as_ds

        if self.hu:
            return np.clip(np.round(values), -32768, 32767).astype(np.int16), "1", "0"
        lo, hi = self.value_range
        slope, intercept = format_number_as_ds((hi - lo) / DICOM_LEVELS), format_number_as_ds(lo)  # DS: 16 characters
        pixels = np.clip(np.round((values - float(intercept)) / float(slope)), 0, DICOM_LEVELS).astype(np.uint16)
        return pixels, slope, intercept

    def _uid(self, *parts: Any) -> str:
        from pydicom.uid import generate_uid

        return generate_uid(entropy_srcs=[self.release_id, *map(str, parts)])

    def _dicom_slice(self, values2d: np.ndarray, seed: int, k: int, position: Sequence[float], orientation: Sequence[float],
                     spacing: Sequence[float]) -> bytes:
        """One DICOM file: `values2d` (rows, columns) in [-1, 1], slice `k` of sample `seed`'s
        series at `position` (mm, LPS); `spacing` (between rows, between columns[, slices])."""
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
        from pydicom.valuerep import format_number_as_ds as ds_text

        from medgen import __version__

        pixels, slope, intercept = self._dicom_pixels(self._values(values2d))
        sop_class = CTImageStorage if self.hu else SecondaryCaptureImageStorage
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = self._uid(seed, "slice", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        for key, value in self.markers().items():
            setattr(ds, key, value.split("\\") if key == "ImageType" else value)
        ds.PatientBirthDate = ds.PatientSex = ""  # type 2: present, empty (there is no patient)
        ds.StudyInstanceUID = self._uid("study")  # the whole set: one study
        ds.StudyDescription = f"synthetic data set {self.release_id}"
        ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
        ds.Modality = "CT" if self.hu else "OT"
        ds.SeriesInstanceUID = self._uid(seed, "series")  # one series per sample
        ds.SeriesNumber = ds.AcquisitionNumber = None  # type 2, empty
        ds.Laterality = ""  # type 2C, empty: no body part
        ds.FrameOfReferenceUID = self._uid(seed, "frame")
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer, ds.SoftwareVersions = "medgen", __version__
        ds.DerivationDescription = "generated by a diffusion model; not derived from one patient's image"
        if self.hu:
            ds.KVP, ds.PatientPosition = None, ""  # type 2 / 2C, empty: no acquisition, no patient
        else:  # Secondary Capture: a synthetic image; its rows and columns point where ImageOrientationPatient says
            ds.ConversionType = "SYN"
            ds.PatientOrientation = [PATIENT_DIRECTION[tuple(orientation[:3])], PATIENT_DIRECTION[tuple(orientation[3:])]]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [ds_text(float(p)) for p in position]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = [ds_text(float(s)) for s in spacing[:2]]
        if len(spacing) == 3:
            ds.SliceThickness = ds.SpacingBetweenSlices = ds_text(float(spacing[2]))
        elif self.hu:
            ds.SliceThickness = None  # type 2 in CT Image Storage, unknown for a 2D sample
        ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=16, generate_instance_uid=False)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU" if self.hu else "US"
        lo, hi = self.value_range
        ds.WindowCenter, ds.WindowWidth = ds_text((lo + hi) / 2), ds_text(hi - lo)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    def _dicom_series(self, folder: Path, vol: np.ndarray, seed: int) -> None:
        """(X, Y, Z) -> a folder of Z files, slice k = vol[:, :, k] with rows along Y and columns
        along X: pixel (row j, column i) of slice k is at LPS (-i sx, -j sy, k sz), which is the
        NIfTI affine diag(sx, sy, sz) (RAS) at voxel (i, j, k)."""
        import shutil

        sx, sy, sz = self._spacing()
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for k in range(vol.shape[2]):
            data = self._dicom_slice(np.ascontiguousarray(vol[:, :, k].T), seed, k, (0.0, 0.0, k * sz),
                                     (-1, 0, 0, 0, -1, 0), (sy, sx, sz))
            (partial / f"slice_{k:04d}.dcm").write_bytes(data)
        os.replace(partial, folder)


def sample_format(source: Any, fmt: str | None = None, units: str = "source", release_id: str = "", *, bit_depth: int = 8,
                  spatial_dims: int | None = None, spacing: Sequence[float] | None = None) -> SampleFormat:
    """The `SampleFormat` of a pipeline (`DiffusionPipeline`: its data config, dimensions, spacing
    and channels) or of a data config (dict, DataConfig; `spatial_dims` from it or given). `fmt`
    None: PNG for 2D, NIfTI for 3D. ConfigError for a format the samples cannot take."""
    from medgen.data.config import DataConfig
    from medgen.data.preprocess import intensity_range

    channels = None
    if hasattr(source, "sample_shape"):  # a DiffusionPipeline
        data, spatial_dims, spacing = source.config.get("data") or {}, source.spatial_dims, source.spacing
        channels = source.autoencoder.in_channels if source.autoencoder is not None else source.sample_shape[0]
    else:
        data = source
    data = dataclasses.asdict(data) if isinstance(data, DataConfig) else dict(data or {})
    # only the intensity section is read: a run's other keys (its data path) need not exist any more
    intensity = DataConfig.from_any({"intensity": data.get("intensity") or {}}).intensity
    spatial_dims = spatial_dims or data.get("spatial_dims") or (len(data["shape"]) if data.get("shape") else None)
    if spatial_dims not in (2, 3):
        raise ConfigError("the samples' dimensions are unknown: give spatial_dims (2 or 3) or data.spatial_dims")
    fmt = fmt or DEFAULT_FORMAT[spatial_dims]
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if (fmt, spatial_dims) not in SUFFIXES:
        fits = " or ".join(f for f in FORMATS if (f, spatial_dims) in SUFFIXES)
        raise ConfigError(f"--format {fmt} writes {'volumes' if fmt == 'nifti' else '2D images'}, but this model makes "
                          f"{spatial_dims}D samples: use --format {fits}")
    if fmt == "dicom" and channels not in (None, 1):
        raise ConfigError(f"--format dicom writes one-channel images, but this model makes {channels}-channel samples: use --format png")
    if units not in UNITS:
        raise ConfigError(f"--units {units}: expected one of {', '.join(UNITS)}")
    if bit_depth not in (8, 16):
        raise ConfigError(f"bit depth must be 8 or 16, got {bit_depth}")
    if channels == 3:
        bit_depth = 8  # RGB PNG is 8-bit
    mode, value_range, unit = "raw", (-1.0, 1.0), RAW_UNITS
    if units == "source":
        mode = intensity.mode
        value_range = intensity_range(intensity) or (0.0, 1.0)
        unit = {"ct": "HU", "fixed": f"source range [{value_range[0]:g}, {value_range[1]:g}]",
                "none": "source values (no intensity mapping), [-1, 1]", "auto": AUTO_UNITS}.get(mode, PER_IMAGE_UNITS)
    return SampleFormat(fmt, spatial_dims, unit, value_range, mode, release_id, bit_depth,
                        tuple(float(s) for s in spacing) if spacing else None)


def output_description(pipe_or_data_cfg: Any, fmt: str | None, units: str, release_id: str, **kwargs: Any) -> dict[str, Any]:
    """What the files of a release or sample set are (format, units, a sentence on their
    intensities, value range, release id, markers, the data.intensity that reads them back);
    keyword arguments as `sample_format`."""
    return sample_format(pipe_or_data_cfg, fmt, units, release_id, **kwargs).description()
