"""The built-in cohort: reproducible pseudo-subjects from the MNI152 T1 template.

`synth_brain` needs no network: nilearn (the extra `medgen[cohort]`) ships the ICBM 2009a
symmetric MNI152 T1 template and its grey/white-matter probability maps (Fonov et al. 2011). Each
pseudo-subject is the template, resampled to an isotropic `size`^3 cube centred on the brain, then

  label 1 only  simulated atrophy: the lateral ventricles grow by a random 3-7 mm (a soft
                dilation, filled with the template's ventricular CSF intensity), the hallmark of
                ageing and neurodegeneration on T1 MRI;
  spatial       a random affine (small rotation, scale, shift) and a B-spline elastic
                deformation, applied in one resampling (torchio `RandomAffineElasticDeformation`);
  intensity     a smooth polynomial bias field (torchio `RandomBiasField`, the MRI receive-coil
                inhomogeneity), a gamma contrast change (`RandomGamma`), a global gain, and
                Rician noise.

Randomness is drawn per subject from `SeedSequence([seed, index])`: a subject does not depend
on `n`, and the same seed gives byte-identical files (gzip and PNG carry no timestamps).
Output: `sub-0000.nii.gz` (3D, float32, affine in mm) or `sub-0000.png` (2D, an 8-bit axial
slice through the lateral ventricles, near the centre) plus `manifest.csv` (`path,label,subject_id`).
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgen.errors import ConfigError, DataError
from medgen.io import atomic_dir, atomic_write_bytes
from medgen.versions import require_extra

FOV_MM = 192.0  # side of the output cube: the brain (145 x 181 x 155 mm) plus room for rotation
# Points inside the left and right lateral-ventricle bodies of the 2009a symmetric template (MNI mm).
VENTRICLE_SEEDS_MM = ((-14.0, -15.0, 21.0), (14.0, -15.0, 21.0))
WARP_MM = 5.0  # elastic displacement; far below half the 48 mm control-point spacing: no folding
ATROPHY_MM = (3.0, 7.0)  # range of the ventricular enlargement of label-1 subjects
PROXIMITY_MM = 20.0  # the ventricle distance map is kept up to this far (beyond: "far")
PNG_WHITE = 1.3  # intensity written as 255 in PNGs (template white matter is ~0.85)
SLICE_JITTER_MM = 6.0  # 2D: the axial slice moves up to this far from the ventricle level
LABEL_NAMES = {0: "healthy", 1: "atrophy"}


@dataclass(frozen=True)
class _Template:
    """The template on the output grid: arrays (X, Y, Z) = (size,)*3, RAS+ voxel axes."""

    t1: np.ndarray  # float32 in [0, 1]
    proximity: np.ndarray  # float32: PROXIMITY_MM - distance to the lateral ventricles (mm), >= 0
    interior: np.ndarray  # float32 in [0, 1]: 1 deeper than 6 mm inside the brain (atrophy stays there)
    affine: np.ndarray  # 4x4 voxel -> world (mm)
    csf: float  # template intensity of ventricular CSF
    ventricle_z: float  # axial voxel index (fractional) of the ventricles' centroid


def require_template():
    """nilearn's import spec (its package folder holds the template); a ConfigError naming the extra
    `medgen[cohort]` when nilearn is not installed. Called before any output exists."""
    return require_extra("nilearn", "the built-in cohort (medgen data synth-brain, medgen demo)")


def _mni152(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One 1 mm MNI152 2009a map bundled with nilearn (kind t1|gm|wm) in [0, 1], and its affine.

    The files are read from nilearn's package folder (what `nilearn.datasets.load_mni152_template`
    reads) with nibabel: no nilearn code runs, so nilearn is the optional extra `medgen[cohort]`.
    """
    import nibabel as nib

    spec = require_template()
    name = f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    path = Path(spec.origin or "").parent / "datasets" / "data" / name
    if not path.is_file():
        raise DataError(f"the MNI152 template that ships with nilearn is missing ({path}); reinstall nilearn: "
                        f"pip install --force-reinstall --no-deps 'nilearn>=0.10'")
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return data / data.max(), np.asarray(img.affine, dtype=np.float64)


@functools.lru_cache(maxsize=1)
def _template_mni() -> dict:
    """The MNI152 T1 template at 1 mm, and 2 mm maps of the lateral ventricles."""
    from scipy import ndimage as ndi

    t1, affine = _mni152("t1")  # (197, 233, 189), 1 mm, skull-stripped
    # Anatomy is found on a 2 mm grid (every other voxel): 8x less work, ample for a distance map.
    coarse = (slice(None, None, 2),) * 3
    affine2 = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    tissue = _mni152("gm")[0][coarse] + _mni152("wm")[0][coarse]  # grey + white matter probability

    brain = t1[coarse] > 0  # the template is skull-stripped
    depth = ndi.distance_transform_edt(brain, sampling=2.0)  # mm to the brain surface
    # CSF = brain voxels that are neither grey nor white matter; deeper than 10 mm excludes the sulci.
    components, _ = ndi.label(brain & (tissue < 0.5) & (depth > 10.0))
    ids = set()
    for point in VENTRICLE_SEEDS_MM:  # the deep-CSF component most present within 4 mm of each seed
        x, y, z = np.round(np.linalg.solve(affine2, (*point, 1.0))[:3]).astype(int)
        near = components[x - 2 : x + 3, y - 2 : y + 3, z - 2 : z + 3]
        if near.any():
            ids.add(int(np.bincount(near[near > 0]).argmax()))
    ventricles = np.isin(components, sorted(ids)) if ids else np.zeros_like(brain)
    volume_ml = ventricles.sum() * 8.0 / 1000.0
    if not 5.0 < volume_ml < 60.0:
        raise DataError(
            f"could not find the lateral ventricles near MNI {VENTRICLE_SEEDS_MM} in nilearn's MNI152 template "
            f"({volume_ml:.1f} ml); synth-brain expects the ICBM 2009a symmetric template of nilearn >= 0.10"
        )
    distance = ndi.distance_transform_edt(~ventricles, sampling=2.0)
    voxels = np.argwhere(ventricles)
    bounds = np.argwhere(t1 > 0)
    return {
        "t1": t1,
        "affine": affine,
        "proximity": np.clip(PROXIMITY_MM - distance, 0.0, None).astype(np.float32),
        "interior": np.clip((depth - 3.0) / 3.0, 0.0, 1.0).astype(np.float32),
        "affine2": affine2,
        "csf": float(np.median(t1[coarse][ventricles])),
        "brain_centre": (affine @ (*((bounds.min(0) + bounds.max(0)) / 2.0), 1.0))[:3],
        "ventricle_z_mm": float((affine2 @ (*voxels.mean(0), 1.0))[2]),
    }


@functools.lru_cache(maxsize=4)
def _template(size: int) -> _Template:
    """Resample the template to a `size`^3 isotropic cube of side FOV_MM centred on the brain."""
    import torch
    import torchio as tio

    src = _template_mni()
    spacing = FOV_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = src["brain_centre"] - spacing * (size - 1) / 2.0  # voxel centres straddle the brain centre
    # antialias: Gaussian smoothing before downsampling (Cardoso et al. 2015), no aliasing.
    resample = tio.Resample(((size,) * 3, affine), antialias=True)

    def on_grid(array: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
        image = tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(array))[None], affine=source_affine)
        return resample(image).data[0].numpy().astype(np.float32)  # (size, size, size)

    return _Template(
        t1=np.clip(on_grid(src["t1"], src["affine"]), 0.0, 1.0),
        proximity=np.clip(on_grid(src["proximity"], src["affine2"]), 0.0, None),  # padding 0 = far away
        interior=np.clip(on_grid(src["interior"], src["affine2"]), 0.0, 1.0),
        affine=affine,
        csf=src["csf"],
        ventricle_z=(src["ventricle_z_mm"] - affine[2, 3]) / spacing,
    )


def subject_labels(n: int, seed: int = 0, atrophy_fraction: float = 0.5) -> list[int]:
    """Label of each subject: 1 (atrophy) for about `atrophy_fraction` of them.

    Subject i gets 1 when frac(u + i * phi) < atrophy_fraction (phi the golden ratio, u drawn
    from the seed): a low-discrepancy sequence, so every prefix of the cohort holds close to the
    requested fraction and a subject's label does not depend on `n`.
    """
    u = np.random.default_rng(np.random.SeedSequence([seed, 2**32 - 1])).random()
    phi = (math.sqrt(5.0) - 1.0) / 2.0
    return [int((u + i * phi) % 1.0 < atrophy_fraction) for i in range(n)]


def _anatomy(tpl: _Template, grow_mm: float, z: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The template, ventricles grown by `grow_mm` (0: healthy), as a volume (X, Y, Z) or, at
    fractional axial index `z`, a slice (X, Y, 1); returns (image, its affine)."""
    t1, proximity, interior, affine = tpl.t1, tpl.proximity, tpl.interior, tpl.affine
    if z is not None:  # 2D: only the slice is needed; linear interpolation between the two nearest
        k = min(int(np.floor(z)), t1.shape[2] - 2)
        w = float(np.clip(z - k, 0.0, 1.0))
        t1, proximity, interior = ((1.0 - w) * a[:, :, k : k + 1] + w * a[:, :, k + 1 : k + 2] for a in (t1, proximity, interior))
        affine = affine.copy()
        affine[2, 3] += (k + w) * affine[2, 2]
    if grow_mm <= 0:
        return t1.astype(np.float32), affine
    # Soft dilation: voxels within grow_mm of the ventricles become CSF, with a one-voxel ramp.
    distance = PROXIMITY_MM - proximity  # mm from the ventricles (capped at PROXIMITY_MM)
    voxel = float(affine[0, 0])
    weight = np.clip((grow_mm - distance) / voxel + 0.5, 0.0, 1.0) * interior
    return (t1 * (1.0 - weight) + tpl.csf * weight).astype(np.float32), affine


def _augment(image: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Spatial and intensity jitter of one subject, (X, Y, Z) -> (X, Y, Z) float32; a 2D slice
    is (X, Y, 1) and gets in-plane transforms only (torchio treats size-1 Z as 2D)."""
    import torch
    import torchio as tio

    flat = image.shape[2] == 1
    shift = (4.0, 4.0, 0.0 if flat else 4.0)  # mm; a slice must not move out of its own plane
    transform = tio.Compose(
        [
            tio.RandomAffineElasticDeformation(
                affine_kwargs={"scales": 0.06, "degrees": 6, "translation": shift, "default_pad_value": 0.0},
                elastic_kwargs={"num_control_points": 7, "max_displacement": (WARP_MM, WARP_MM, 0.0 if flat else WARP_MM)},
                copy=False,
            ),
            tio.RandomBiasField(coefficients=0.2, order=3, copy=False),
            tio.RandomGamma(log_gamma=0.2, copy=False),
        ],
        copy=False,
    )
    with torch.random.fork_rng(devices=[]):  # torchio draws from torch's global generator
        torch.manual_seed(int(rng.integers(0, 2**63 - 1)))
        out = transform(tio.ScalarImage(tensor=torch.from_numpy(image)[None], affine=affine)).data[0].numpy()
    out = out.astype(np.float64) * rng.uniform(0.9, 1.1)  # global gain
    # Magnitude MRI noise is Rician (Gudbjartsson & Patz 1995): |signal + complex Gaussian|.
    # torchio's RandomNoise is real Gaussian and would leave a negative background, hence own code.
    sigma = rng.uniform(0.01, 0.03)
    real = np.clip(out, 0.0, None) + rng.normal(0.0, sigma, out.shape)
    imag = rng.normal(0.0, sigma, out.shape)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def _nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """A .nii.gz file's bytes with no gzip timestamp, so equal volumes give equal bytes."""
    import nibabel as nib

    img = nib.Nifti1Image(volume.astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"medgen synth-brain"
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _png_bytes(slice_xy: np.ndarray) -> bytes:
    """8-bit grayscale PNG of an axial slice (X, Y): anterior up, subject's left on the left."""
    from PIL import Image

    pixels = np.flipud(slice_xy.T)  # (X, Y) -> (H, W) rows from anterior to posterior
    gray = np.round(np.clip(pixels / PNG_WHITE, 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG", optimize=False)  # no text chunks or time
    return buf.getvalue()


def synth_subject(index: int, seed: int = 0, label: int = 0, dims: int = 3, size: int = 64) -> np.ndarray:
    """Pseudo-subject `index` of the cohort `seed`: a float32 volume (X, Y, Z) = (size,)*3 for
    dims=3, an axial slice (X, Y) through the lateral ventricles (+- SLICE_JITTER_MM) for dims=2."""
    tpl = _template(size)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    grow_mm = rng.uniform(*ATROPHY_MM)  # drawn for every subject: label 0 and 1 differ only in atrophy
    z = tpl.ventricle_z + rng.uniform(-SLICE_JITTER_MM, SLICE_JITTER_MM) / (FOV_MM / size) if dims == 2 else None
    image, affine = _anatomy(tpl, grow_mm if label == 1 else 0.0, z)
    image = _augment(image, affine, rng)
    return image if dims == 3 else image[:, :, 0]


def synth_brain(
    out: str | os.PathLike,
    n: int = 200,
    dims: int = 3,
    size: int = 64,
    seed: int = 0,
    atrophy_fraction: float = 0.5,
    overwrite: bool = False,
) -> Path:
    """Write the built-in brain MRI cohort to `out` and return its path.

    `n` pseudo-subjects `sub-0000...` as `.nii.gz` (dims=3: float32 `size`^3 volume, isotropic
    FOV_MM/size mm voxels, background ~0, white matter ~0.85) or `.png` (dims=2: 8-bit axial
    slice `size` x `size`), plus `manifest.csv` with `path,label,subject_id`; label 1 (about
    `atrophy_fraction` of subjects) has enlarged lateral ventricles. The folder appears complete
    or not at all; an existing `out` raises RunError unless `overwrite`.
    """
    if dims not in (2, 3):
        raise ConfigError(f"synth-brain: dims must be 2 or 3, got {dims}")
    if n < 1:
        raise ConfigError(f"synth-brain: n must be at least 1, got {n}")
    if seed < 0:
        raise ConfigError(f"synth-brain: seed must be a non-negative integer, got {seed}")
    if not 8 <= size <= 256:
        raise ConfigError(f"synth-brain: size must be between 8 and 256 voxels, got {size}")
    if not 0.0 <= atrophy_fraction <= 1.0:
        raise ConfigError(f"synth-brain: atrophy_fraction must be in [0, 1], got {atrophy_fraction}")
    require_template()
    out = Path(out)
    labels = subject_labels(n, seed, atrophy_fraction)
    suffix = ".nii.gz" if dims == 3 else ".png"
    with atomic_dir(out, overwrite=overwrite, what="cohort folder") as tmp:
        rows = []
        for index, label in enumerate(labels):
            name = f"sub-{index:04d}"
            image = synth_subject(index, seed=seed, label=label, dims=dims, size=size)
            data = _nifti_bytes(image, _template(size).affine) if dims == 3 else _png_bytes(image)
            (tmp / f"{name}{suffix}").write_bytes(data)
            rows.append((f"{name}{suffix}", label, name))
        with open(tmp / "manifest.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("path", "label", "subject_id"))
            writer.writerows(rows)
    return out


def preview_figure(folder: str | os.PathLike, out_png: str | os.PathLike, n: int = 8) -> Path:
    """Draw the first `n` subjects of a cohort folder as a grid (`medgen.figures.image_grid`): 2D
    images, or each 3D volume's axial, coronal and sagittal mid-planes in radiological orientation;
    captions give subject and label. Intensities share one scale (0 to the 99.5th percentile)."""
    from medgen.data.dataset import scan_dataset
    from medgen.data.readers import read_image
    from medgen.figures import figure_png, image_grid

    samples = scan_dataset(folder)[:n]
    images = [read_image(s.path)[0][0] for s in samples]  # (H, W) or (X, Y, Z) in RAS+, first channel
    vmax = float(np.percentile(np.concatenate([v.ravel() for v in images]), 99.5)) or 1.0
    captions = [s.subject_id + ("" if s.label is None else f", label {s.label} ({LABEL_NAMES.get(s.label, s.label_name)})")
                for s in samples]
    volumetric = images[0].ndim == 3
    fig = image_grid([np.clip(v / vmax, 0.0, 1.0) for v in images], volumes=volumetric, ncol=2 if volumetric else 4, captions=captions)
    out_png = Path(out_png)
    atomic_write_bytes(out_png, figure_png(fig))
    return out_png
