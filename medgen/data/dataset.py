"""Datasets: scanning a folder or manifest, validating files, subject-level splits.

A dataset is a folder of image files (searched recursively; a sub-folder holding a DICOM series
counts as one volume) or a `manifest.csv` with a `path` column plus optional `label` (class
name or integer) and `subject_id` columns. Paths in a manifest are relative to its folder.
A folder that holds a `manifest.csv` is read through it; a sample directory's manifest
(`file,label,seed,...`, written by `medgen sample`) is read the same way.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from medgen.data.preprocess import CROP_WARN_FRACTION, DataConfig, preprocess
from medgen.data.readers import DICOM_SUFFIXES, is_dicom_series_dir, is_supported, load, suffix_of
from medgen.errors import DataError
from medgen.io import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
SPLITS = ("train", "val", "holdout")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int | None
    label_name: str | None
    subject_id: str


def _subject_from_path(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    name = rel.as_posix()
    for suffix in (".nii.gz", rel.suffix):
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _scan_folder(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames.sort()
        dicoms = sorted(f for f in filenames if suffix_of(f) in DICOM_SUFFIXES)
        if d != root and len(dicoms) > 1 and is_dicom_series_dir(d):
            found.append(d)  # one DICOM series = one volume
            dirnames.clear()
            continue
        for f in sorted(filenames):
            p = d / f
            if not f.startswith(".") and f != MANIFEST and is_supported(p):
                found.append(p)
    return found


def _label_mapping(names: Sequence[str], manifest: Path) -> dict[str, int]:
    unique = sorted(set(names))
    try:
        return {n: int(n) for n in unique}
    except ValueError:
        pass
    if any(n.lstrip("-").isdigit() for n in unique):
        raise DataError(f"{manifest}: label column mixes integers and class names ({unique[:6]}); use one or the other")
    return {n: i for i, n in enumerate(unique)}


def _read_manifest(manifest: Path) -> list[Sample]:
    root = manifest.parent
    try:
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{manifest}: could not be read as CSV ({e})") from None
    if not rows:
        raise DataError(f"{manifest}: manifest has no rows")
    columns = set(rows[0].keys())
    # `file` is the column of a sample directory's manifest (medgen sample); `path` of a dataset's.
    path_col = "path" if "path" in columns else "file" if "file" in columns else None
    if path_col is None:
        raise DataError(f"{manifest}: needs a 'path' column (found {sorted(c for c in columns if c)})")
    # A label column that is empty on every row (unconditional samples) means: no labels.
    has_label = "label" in columns and any((r.get("label") or "").strip() for r in rows)
    seen: dict[Path, int] = {}
    paths, names, subjects = [], [], []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        raw = (row.get(path_col) or "").strip()
        if not raw:
            raise DataError(f"{manifest}: line {i} has an empty path")
        p = Path(raw) if os.path.isabs(raw) else root / raw
        key = p.resolve()
        if key in seen:
            raise DataError(f"{manifest}: duplicate path {raw!r} on lines {seen[key]} and {i}")
        seen[key] = i
        if not p.exists():
            raise DataError(f"{manifest}: line {i}: file {p} does not exist")
        label = (row.get("label") or "").strip() if has_label else ""
        if has_label and not label:
            raise DataError(f"{manifest}: line {i}: label missing for {raw}; label the row or leave the label column empty on every row")
        subject = (row.get("subject_id") or "").strip() or _subject_from_path(p, root)
        paths.append(p)
        names.append(label)
        subjects.append(subject)
    if not has_label:
        return [Sample(p, None, None, s) for p, s in zip(paths, subjects)]
    mapping = _label_mapping(names, manifest)
    return [Sample(p, mapping[n], n, s) for p, n, s in zip(paths, names, subjects)]


def scan_dataset(path: str | os.PathLike) -> list[Sample]:
    """List the samples of a dataset folder or manifest.csv (files are not read yet)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset path does not exist")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return _read_manifest(path)
        if is_supported(path):
            return [Sample(path, None, None, _subject_from_path(path, path.parent))]
        raise DataError(f"{path}: not a dataset folder, manifest.csv or supported image file")
    if (path / MANIFEST).is_file():
        return _read_manifest(path / MANIFEST)
    files = _scan_folder(path)
    if not files:
        raise DataError(f"{path}: folder holds no images (looked for {', '.join(('.png', '.jpg', '.tif', '.dcm', '.nii.gz', '.nrrd', '.mha', '.npy'))} or DICOM series folders)")
    return [Sample(p, None, None, _subject_from_path(p, path)) for p in files]


def check_samples(samples: Sequence[Sample], cfg: DataConfig, require_same_shape: bool = True) -> tuple[list[Sample], list[tuple[Sample, str]], dict[str, Any]]:
    """Read every file once: returns (good samples, [(bad sample, reason)], summary).

    With `cfg.on_bad_file == "error"` the first bad file raises `DataError` naming it.
    Shapes must agree after preprocessing when batching needs one shape (no `data.shape` set).
    """
    good, bad = [], []
    shapes: dict[tuple[int, ...], Path] = {}
    spacings, channels, dims = [], set(), set()
    lo, hi = np.inf, -np.inf
    raw_lo, raw_hi = np.inf, -np.inf
    most_cropped: tuple[float, Sample | None, tuple[int, ...]] = (0.0, None, ())
    for s in samples:
        try:
            loaded = load(s.path)
            report: dict[str, float] = {}
            tensor = preprocess(loaded, cfg, report=report)
            if require_same_shape and shapes and tuple(tensor.shape[1:]) not in shapes:
                other_shape, other = next(iter(shapes.items()))
                raise DataError(f"{s.path}: shape {tuple(tensor.shape[1:])} differs from {other_shape} of {other}; set data.shape to crop/pad all images to one shape")
        except DataError as e:
            if cfg.on_bad_file == "error":
                raise
            log.warning("skipping bad file: %s", e)
            bad.append((s, str(e)))
            continue
        if dims and tensor.ndim - 1 not in dims:
            err = DataError(f"{s.path}: {tensor.ndim - 1}D image in a {next(iter(dims))}D dataset")
            if cfg.on_bad_file == "error":
                raise err
            bad.append((s, str(err)))
            continue
        dims.add(tensor.ndim - 1)
        shapes.setdefault(tuple(tensor.shape[1:]), s.path)
        spacings.append(tuple(round(float(v), 4) for v in loaded.spacing))
        channels.add(int(tensor.shape[0]))
        lo, hi = min(lo, float(tensor.min())), max(hi, float(tensor.max()))
        raw_lo, raw_hi = min(raw_lo, float(loaded.array.min())), max(raw_hi, float(loaded.array.max()))
        if report.get("cropped", 0.0) > most_cropped[0]:
            most_cropped = (report["cropped"], s, loaded.shape)
        good.append(s)
    if not good:
        raise DataError(f"no readable images among {len(samples)} file(s); first problem: {bad[0][1] if bad else 'none'}")
    labels: dict[str, int] = {}
    for s in good:
        if s.label is not None:
            labels[str(s.label_name)] = labels.get(str(s.label_name), 0) + 1
    summary = {
        "count": len(good),
        "skipped": len(bad),
        "spatial_dims": sorted(dims)[0],
        "channels": sorted(channels),
        "shapes": sorted(shapes),
        "spacings": sorted(set(spacings)),
        "raw_intensity_range": [raw_lo, raw_hi],
        "intensity_range": [lo, hi],
        "labels": labels,
        "subjects": len({s.subject_id for s in good}),
        "cropped": round(most_cropped[0], 4),
    }
    fraction, sample, source_shape = most_cropped
    if fraction > CROP_WARN_FRACTION:
        log.warning("data.shape %s crops %s (%s) to its central %d%% along an axis; set data.resize=true to resize "
                    "instead, or data.shape to the image size", list(cfg.shape), sample.path,
                    "x".join(map(str, source_shape)), round(100 * (1 - fraction)))
    return good, bad, summary


def make_splits(samples: Sequence[Sample], val: float = 0.1, holdout: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
    """Split by subject, seeded and deterministic: a subject's files all go to one split.

    Returns subject ids per split. The result depends only on the set of subject ids, the
    fractions and the seed (not on file order), so stage 1 and stage 2 agree on the holdout.
    """
    if not 0 <= val < 1 or not 0 <= holdout < 1 or val + holdout >= 1:
        raise DataError(f"split fractions val={val}, holdout={holdout} must be in [0, 1) and sum below 1")
    subjects = sorted({s.subject_id for s in samples})
    n = len(subjects)
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(holdout * n)) if holdout > 0 else 0
    n_val = int(round(val * n)) if val > 0 else 0
    if holdout > 0 and n >= 3:
        n_hold = max(n_hold, 1)
    if val > 0 and n >= 3:
        n_val = max(n_val, 1)
    if n - n_hold - n_val < 1:
        raise DataError(f"only {n} subject(s): too few to split into train/val/holdout with val={val}, holdout={holdout}")
    shuffled = [subjects[i] for i in order]
    return {
        "holdout": sorted(shuffled[:n_hold]),
        "val": sorted(shuffled[n_hold : n_hold + n_val]),
        "train": sorted(shuffled[n_hold + n_val :]),
    }


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a DICOM series folder (its files' names and contents, sorted)."""
    import hashlib

    from medgen.io import sha256_file

    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


def save_split(split: dict[str, list[str]], samples: Sequence[Sample], path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write split.json: subject ids per split, their files, and every file's content hash, so that
    what later claims to be the run's training or held-out data can be checked by content, not names."""
    by_subject: dict[str, list[str]] = {}
    for s in samples:
        by_subject.setdefault(s.subject_id, []).append(str(s.path))
    files = {name: sorted(f for subj in subjects for f in by_subject.get(subj, [])) for name, subjects in split.items()}
    hashes = {f: content_sha256(f) for group in files.values() for f in group}
    atomic_write_json(path, {**(meta or {}), "subjects": split, "files": files, "sha256": hashes})


def split_content_mismatch(split_file: str | os.PathLike, split_name: str, samples: Sequence[Sample]) -> tuple[list[str], list[str]] | None:
    """Compare the contents of `samples` with the files of `split_name` in split.json: (files of
    the run whose content is not among `samples`, files of `samples` whose content the run does
    not have), by sha256. None when the split.json predates content hashes (names only)."""
    data = json.loads(Path(split_file).read_text())
    hashes = data.get("sha256")
    if not hashes:
        return None
    recorded = {hashes[f]: f for f in data.get("files", {}).get(split_name, []) if f in hashes}
    given = {content_sha256(s.path): str(s.path) for s in samples}
    return ([f for h, f in recorded.items() if h not in given], [f for h, f in given.items() if h not in recorded])


def load_split(path: str | os.PathLike) -> dict[str, list[str]]:
    try:
        data = json.loads(Path(path).read_text())
        return {k: list(v) for k, v in data["subjects"].items()}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a valid split.json ({e})") from None


class MedicalDataset(torch.utils.data.Dataset):
    """Preprocessed images: item = {"image": (C, *S) float32, "label": long (-1 if none),
    "subject_id": str, "path": str}."""

    def __init__(self, samples: Sequence[Sample] | str | os.PathLike, data_cfg: Any = None):
        self.cfg = DataConfig.from_any(data_cfg)
        self.samples = list(scan_dataset(samples) if isinstance(samples, (str, os.PathLike)) else samples)
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> torch.Tensor:
        if i in self._cache:
            return self._cache[i]
        tensor = preprocess(load(self.samples[i].path), self.cfg)
        if self.cfg.cache:
            self._cache[i] = tensor
        return tensor

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {
            "image": self.image(i),
            "label": torch.tensor(-1 if s.label is None else s.label, dtype=torch.long),
            "subject_id": s.subject_id,
            "path": str(s.path),
        }

    @property
    def num_classes(self) -> int:
        labels = {s.label for s in self.samples if s.label is not None}
        return max(labels) + 1 if labels else 0


def datasets_from_config(data_cfg: Any, run_dir: str | os.PathLike | None = None) -> dict[str, MedicalDataset]:
    """Scan, validate and split `data.path` by subject; write `run_dir/split.json`.

    An existing `run_dir/split.json` (a resumed run) is reused as is.
    """
    cfg = DataConfig.from_any(data_cfg)
    if not cfg.path:
        raise DataError("data.path is not set; pass data.path=DIR (a dataset folder or manifest.csv)")
    samples = scan_dataset(cfg.path)
    good, bad, summary = check_samples(samples, cfg, require_same_shape=True)
    split_file = Path(run_dir) / "split.json" if run_dir is not None else None
    if split_file is not None and split_file.exists():
        split = load_split(split_file)
    else:
        split = make_splits(good, cfg.split.val, cfg.split.holdout, cfg.split.seed)
        if split_file is not None:
            save_split(split, good, split_file, {"seed": cfg.split.seed, "data": str(cfg.path), "skipped": [str(s.path) for s, _ in bad]})
    out = {}
    for name in SPLITS:
        members = set(split.get(name, []))
        out[name] = MedicalDataset([s for s in good if s.subject_id in members], cfg)
    out["train"].summary = summary  # type: ignore[attr-defined]
    return out


class ImageSet:
    """A dataset read in batches: scanned and checked once (every file is read, one at a time),
    then read again batch by batch, so that memory holds one batch, not the set. Images are
    preprocessed as `load_images` does; all share one shape (C, *S).

    `source`: a folder, a manifest.csv or a list of `Sample`s; or images already in memory,
    (N, C, *S) in [-1, 1] (then `samples` is empty).
    """

    def __init__(self, source: str | os.PathLike | Iterable[Sample] | torch.Tensor, data_cfg: Any = None):
        self.cfg = DataConfig.from_any(data_cfg)
        self.memory: torch.Tensor | None = None
        if isinstance(source, torch.Tensor):
            self.memory, self.samples, self.shape = source.float(), [], tuple(source.shape[1:])
            return
        samples = scan_dataset(source) if isinstance(source, (str, os.PathLike)) else list(source)
        if not samples:
            raise DataError(f"{source}: no images")
        self.samples, _, summary = check_samples(samples, self.cfg, require_same_shape=True)
        self.shape = (summary["channels"][0], *summary["shapes"][0])  # (C, *S) after preprocessing

    def __len__(self) -> int:
        return len(self.samples) if self.memory is None else len(self.memory)

    def take(self, indices: Iterable[int]) -> torch.Tensor:
        """The images at `indices`, (len(indices), C, *S), read now."""
        indices = [int(i) for i in indices]
        if self.memory is not None:
            return self.memory[indices]
        if not indices:
            return torch.empty(0, *self.shape)
        return torch.stack([preprocess(load(self.samples[i].path), self.cfg) for i in indices])

    def batches(self, batch_size: int = 32) -> Iterator[tuple[torch.Tensor, list[Sample]]]:
        """(images (B, C, *S), their samples) for consecutive batches, in order."""
        for start in range(0, len(self), batch_size):
            stop = min(len(self), start + batch_size)
            yield self.take(range(start, stop)), self.samples[start:stop]


def iter_images(path: str | os.PathLike | Iterable[Sample], data_cfg: Any = None,
                batch_size: int = 32) -> Iterator[tuple[torch.Tensor, list[Sample]]]:
    """Read a dataset in batches of (images (B, C, *S), samples), preprocessed as `load_images`
    does, holding one batch in memory (the streaming reader of eval and release). Every file is
    checked before the first batch, so a bad file stops the read before any work is done."""
    return ImageSet(path, data_cfg).batches(batch_size)


def load_images(path: str | os.PathLike | Iterable[Sample], data_cfg: Any = None) -> tuple[torch.Tensor, list[Sample]]:
    """Load a whole folder as one tensor (N, C, *S) (for the audit; `iter_images` reads in batches).

    Without `data_cfg` intensities are mapped to [-1, 1] by dtype range (8/16-bit files) or
    percentiles (float files). All images must share one shape after preprocessing.
    """
    images = ImageSet(path, data_cfg)
    return images.take(range(len(images))), images.samples
