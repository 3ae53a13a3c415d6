"""The memorization audit: did the generative model copy training patients?

Method (Dar et al. 2024, "Unconditional latent diffusion models memorize patient imaging data"):
embed training, held-out and synthetic images with a copy detector; calibrate a threshold tau as
the `percentile`-th percentile of each training image's best Pearson correlation with the
held-out set (what "a different patient that looks alike" scores); flag a synthetic image as a
copy when its best correlation with the training set exceeds tau. Beside it: AuthPct
(dgm-eval), C_T (Meehan et al. 2020) and Carlini et al. 2023's relative l2 in pixel space.

`audit_images` computes on tensors; `run_audit` reads folders and writes the report directory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medgen.errors import DataError, RunError
from medgen.io import atomic_dir, atomic_write_json
from medgen.privacy.memorization import (
    SIMILARITIES,
    authpct,
    best_match,
    c_t_statistic,
    carlini_relative_l2,
    copy_threshold,
    expected_false_copy_pct,
)

log = logging.getLogger(__name__)

# Longest side of the images for Carlini's pixel-space criterion (area-downsampled beyond it).
PIXEL_MAX_SIZE = {2: 128, 3: 64}
SIMILARITY_SATURATED = 1.0 - 1e-6


@dataclass
class AuditResult:
    """Everything the report is written from. Per-sample tensors are on the CPU."""

    report: dict[str, Any]
    train_holdout_best: torch.Tensor  # (Nt,) best similarity of each training image to the holdout
    synthetic_best: torch.Tensor  # (Ns,) best similarity of each synthetic image to training
    synthetic_nearest: torch.Tensor  # (Ns,) index of that training image
    is_copy: torch.Tensor  # (Ns,) bool
    carlini_ratio: torch.Tensor  # (Ns,) relative l2 (Carlini et al. 2023)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- checks


def _name(names: Sequence[str] | None, i: int, what: str) -> str:
    return str(names[i]) if names is not None else f"{what}[{i}]"


def _check_images(x: torch.Tensor, what: str, names: Sequence[str] | None, min_count: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{what} images: expected a (N, C, H, W) or (N, C, D, H, W) tensor, got {shape}")
    if x.shape[0] < min_count:
        raise DataError(f"{what} set has {x.shape[0]} image(s); the audit needs at least {min_count}")
    bad = (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten()
    if len(bad):
        raise DataError(f"{what} image {_name(names, int(bad[0]), what)} holds NaN or Inf values ({len(bad)} such image(s))")


def _image_hashes(x: torch.Tensor) -> list[str]:
    return [hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest() for img in x.float().cpu()]


def _summary(v: torch.Tensor) -> dict[str, float]:
    a = v.double().numpy()
    return {k: round(float(f(a)), 6) for k, f in (("mean", np.mean), ("median", np.median), ("p05", lambda x: np.percentile(x, 5)), ("p95", lambda x: np.percentile(x, 95)), ("min", np.min), ("max", np.max))}


def _pixels(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *S') images for pixel-space measures, area-downsampled when the
    longest side exceeds PIXEL_MAX_SIZE (keeps 100k-image audits within memory)."""
    size = PIXEL_MAX_SIZE[spatial_dims]
    x = x.float()
    if max(x.shape[2:]) > size:
        factor = size / max(x.shape[2:])
        x = F.interpolate(x, size=[max(1, round(s * factor)) for s in x.shape[2:]], mode="area")
    return x


# ----------------------------------------------------------------------------- computation


def audit_images(
    train: torch.Tensor,
    holdout: torch.Tensor,
    synthetic: torch.Tensor,
    detector,
    *,
    similarity: str = "pearson",
    percentile: float = 95.0,
    max_copy_rate: float = 0.0,
    carlini_n: int = 50,
    carlini_alpha: float = 0.5,
    carlini_delta: float = 1 / 3,
    names: dict[str, Sequence[str]] | None = None,
    device=None,
    seed: int = 0,
) -> AuditResult:
    """Audit `synthetic` against `train` with `holdout` as the calibration set.

    Images are (N, C, *S) tensors in [-1, 1] with one shape across the three sets; `detector`
    has `embed(images) -> (N, D)` and `recipe` (see `medgen.privacy.detector`). `names` maps
    "train"/"holdout"/"synthetic" to per-image names used in messages.

    Degenerate input raises `DataError` (empty or non-finite sets, mismatched shapes, a holdout
    that is entirely the training set) or adds a warning to the result (duplicates between
    train and holdout, which are dropped from calibration; tiny sets; saturated similarities).
    """
    from medgen.privacy.detector import default_device

    names = names or {}
    device = default_device(device)  # nearest-neighbour searches run here (cuda when present)
    warnings: list[str] = []
    if similarity not in SIMILARITIES:
        raise DataError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if not 0 < percentile <= 100:
        raise DataError(f"--percentile must be in (0, 100], got {percentile}")
    if not 0 <= max_copy_rate <= 1:
        raise DataError(f"--max-copy-rate is a fraction of synthetic samples in [0, 1] (0.01 = 1%), got {max_copy_rate}")
    _check_images(train, "training", names.get("train"), 2)
    _check_images(holdout, "held-out", names.get("holdout"), 2)
    _check_images(synthetic, "synthetic", names.get("synthetic"), 1)
    shapes = {"train": tuple(train.shape[1:]), "holdout": tuple(holdout.shape[1:]), "synthetic": tuple(synthetic.shape[1:])}
    if len(set(shapes.values())) != 1:
        raise DataError(f"image shapes (C, *S) differ between sets: {shapes}; pass a data config with data.shape (and data.channels) so all sets are cropped/padded alike")
    spatial_dims = train.ndim - 2

    # A held-out image identical to a training image is not a "different patient": it would put
    # tau at 1 and hide every copy. Drop such images from calibration (and say so).
    train_hashes = set(_image_hashes(train))
    dup = [i for i, h in enumerate(_image_hashes(holdout)) if h in train_hashes]
    if dup:
        examples = ", ".join(_name(names.get("holdout"), i, "holdout") for i in dup[:3])
        if len(dup) > holdout.shape[0] - 2:
            raise DataError(f"the held-out set overlaps the training set: {len(dup)} of {holdout.shape[0]} held-out images are identical to training images (e.g. {examples}); the threshold must be calibrated on images of patients NOT used for training")
        warnings.append(f"{len(dup)} held-out image(s) are identical to training images (e.g. {examples}) and were left out of the threshold calibration; check that the held-out set holds only patients not used for training")
        dropped = set(dup)
        keep = torch.tensor([i for i in range(holdout.shape[0]) if i not in dropped])
        holdout = holdout[keep]
        if names.get("holdout") is not None:
            names = {**names, "holdout": [names["holdout"][int(i)] for i in keep]}
    n_t, n_h, n_s = train.shape[0], holdout.shape[0], synthetic.shape[0]
    if n_t * (1 - percentile / 100) < 5:
        warnings.append(f"only {n_t} training images: the {percentile:g}th percentile of {n_t} values rests on fewer than 5 values above it, so the threshold is noisy; use at least {int(np.ceil(500 / max(100 - percentile, 1e-9)))} training images")
    if n_h < 20:
        warnings.append(f"only {n_h} held-out images: each training image's best held-out match is a max over few candidates, so tau is low and more genuine samples get flagged; use 100+ held-out images")

    # Embeddings (N, D) on the CPU; similarities through the chunked kNN (GPU when present).
    e_t, e_h, e_s = (detector.embed(x, device=device).float().cpu() for x in (train, holdout, synthetic))
    for e, what in ((e_t, "train"), (e_h, "holdout"), (e_s, "synthetic")):
        bad = (~torch.isfinite(e)).any(1).nonzero().flatten()
        if len(bad):
            raise DataError(f"detector {getattr(detector, 'name', '?')} produced non-finite embeddings for {len(bad)} {what} image(s), e.g. {_name(names.get(what), int(bad[0]), what)}")
        centred = e - e.mean(1, keepdim=True) if similarity == "pearson" else e
        flat = (centred.norm(dim=1) <= 1e-8 * (1 + e.abs().amax(1))).nonzero().flatten()
        if len(flat):
            warnings.append(f"{len(flat)} {what} image(s) have a constant embedding (e.g. {_name(names.get(what), int(flat[0]), what)}; a blank image under the pixel detector): their {similarity} similarity is undefined and counted as 0")
    if e_t.shape[0] > 1 and (e_t - e_t[:1]).abs().max() <= 1e-6 * (1 + e_t.abs().max()):
        warnings.append("all training images have the same embedding (identical images?): the audit cannot tell training images apart and its result is meaningless")

    th_best, _ = best_match(e_t, e_h, similarity, device)  # (Nt,)
    tau = copy_threshold(th_best, percentile)
    s_best, s_idx = best_match(e_s, e_t, similarity, device)  # (Ns,)
    is_copy = s_best > tau
    if tau >= SIMILARITY_SATURATED:
        warnings.append(f"the threshold is at the maximum similarity ({tau:.6f}): held-out images match training images perfectly under this detector, so no synthetic image can exceed it; the held-out set likely duplicates the training set or the images are identical")

    n_copies = int(is_copy.sum())
    memorized = torch.unique(s_idx[is_copy])
    copy_rate = n_copies / n_s
    verdict = "pass" if copy_rate <= max_copy_rate else "fail"
    expected = expected_false_copy_pct(percentile, n_t, n_h)

    # Reference measures. AuthPct and C_T use Euclidean distances on features as dgm-eval does:
    # the detector's embedding for the pixel and registry detectors, but downsampled pixels for
    # the SSL detector, whose NT-Xent training spreads the *training* images apart (uniformity,
    # Wang & Isola 2020) and so biases train->train distances, which AuthPct compares against.
    # Carlini's criterion is defined in pixel space.
    if getattr(detector, "name", None) == "ssl":
        from medgen.privacy.detector import PixelDetector

        ref = PixelDetector(spatial_dims)
        r_t, r_h, r_s = (ref.embed(x) for x in (train, holdout, synthetic))
        reference_space = f"pixels downsampled to {ref.size} px (longest side)"
    else:
        r_t, r_h, r_s = e_t, e_h, e_s
        reference_space = f"{getattr(detector, 'name', 'detector')} embedding"
    auth = authpct(r_t, r_s, device=device)
    ct, ct_reason = c_t_statistic(r_t, r_h, r_s, seed=seed, device=device)
    if ct_reason:
        warnings.append(f"C_T not computed: {ct_reason}")
    p_s, p_t = _pixels(synthetic, spatial_dims), _pixels(train, spatial_dims)  # (N, C, *S')
    ratio, _ = carlini_relative_l2(p_s.flatten(1), p_t.flatten(1), n=carlini_n, alpha=carlini_alpha, device=device)
    extracted = ratio < carlini_delta

    for v, what in ((th_best, "train->holdout"), (s_best, "synthetic->train")):
        if not torch.isfinite(v).all():  # cannot happen with the guards above; never report NaN
            raise DataError(f"{what} similarities are not finite")

    report = {
        "threshold": round(tau, 6),
        "percentile": percentile,
        "similarity": similarity,
        "n_train": n_t,
        "n_holdout": n_h,
        "n_synthetic": n_s,
        "n_copies": n_copies,
        "n_copies_pct": round(100.0 * copy_rate, 4),
        "n_mem": int(len(memorized)),
        "n_mem_pct": round(100.0 * len(memorized) / n_t, 4),
        "max_copy_rate": max_copy_rate,
        "verdict": verdict,
        "expected_false_copy_pct": round(expected, 4),
        "detector": detector.recipe,
        "train_holdout_best": _summary(th_best),
        "synthetic_train_best": _summary(s_best),
        "authpct": round(auth, 4),
        "c_t": None if ct is None else round(ct, 4),
        "reference_space": reference_space,
        "carlini": {
            "n": min(carlini_n, n_t), "alpha": carlini_alpha, "delta": carlini_delta,
            "n_extracted": int(extracted.sum()), "extracted_pct": round(100.0 * float(extracted.double().mean()), 4),
            "median_ratio": round(float(ratio.median()), 6),
            "pixel_shape": list(p_s.shape[1:]),
        },
        "spatial_dims": spatial_dims,
        "image_shape": list(shapes["train"]),
        "warnings": warnings,
    }
    for w in warnings:
        log.warning("audit: %s", w)
    return AuditResult(report, th_best, s_best, s_idx, is_copy, ratio, warnings)


# ----------------------------------------------------------------------------- detector choice


def resolve_detector(detector, train: torch.Tensor, out_dir: Path | None, options: dict | None = None, device=None):
    """`detector` is an object with `embed`, or "ssl" (trained now on `train`, saved to
    `out_dir/detector`), "pixel", a folder written by `medgen audit train-detector`, or a name or
    TorchScript path of the evaluation feature registry."""
    from medgen.privacy import detector as det

    options = dict(options or {})
    spatial_dims = train.ndim - 2
    if hasattr(detector, "embed"):
        return detector
    if detector == "ssl":
        trained = det.train_detector(train, spatial_dims=spatial_dims, device=device, **options)
        if out_dir is not None:
            trained.save(out_dir / "detector")
        return trained
    if detector == "pixel":
        return det.PixelDetector(spatial_dims, options.get("image_size"))
    if Path(str(detector)).is_dir() and (det.is_detector_dir(detector) or det.is_detector_dir(Path(detector) / "detector")):
        loaded = det.load_detector(detector)
        if loaded.spatial_dims != spatial_dims:
            raise DataError(f"detector {detector} was trained on {loaded.spatial_dims}D images but the audit images are {spatial_dims}D")
        return loaded
    features = det.FeatureDetector(str(detector), weights=options.get("weights"), device=device)
    if getattr(features.extractor, "fit", None) is not None:  # in-domain extractors (pca) fit on the training set
        features.extractor.fit(train)
    return features


# ----------------------------------------------------------------------------- files


def _display_name(path: Path, root: Path | None) -> str:
    if root is not None and root.is_dir():
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def _root_of(spec) -> Path | None:
    """The folder an input lives in: the dataset folder, a manifest's folder, or the common
    folder of a list of samples (outputs must stay out of it; names in pairs.csv are relative to it)."""
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        return p if p.is_dir() else p.parent
    paths = [str(Path(s.path).resolve().parent) for s in spec] if spec else []
    return Path(os.path.commonpath(paths)) if paths else None


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


def _check_output(out: Path, inputs: dict[str, Path | None], what: str) -> None:
    for name, root in inputs.items():
        if root is not None and _inside(out, root):
            raise RunError(f"{what} {out} overlaps the {name} input folder {root}; inputs are never written, choose another folder")


def _pairs_csv(result: AuditResult, synth_names: Sequence[str], train_names: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["synthetic", "nearest_train", "similarity", "is_copy"])
    for i in range(len(synth_names)):
        w.writerow([synth_names[i], train_names[int(result.synthetic_nearest[i])], f"{float(result.synthetic_best[i]):.6f}", "true" if bool(result.is_copy[i]) else "false"])
    return buf.getvalue()


def _versions() -> dict[str, str]:
    import medgen

    return {"medgen": getattr(medgen, "__version__", "?"), "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


def filter_synthetic(samples: Sequence, is_copy: torch.Tensor, out: Path, root: Path | None, overwrite: bool = False) -> dict[str, Any]:
    """Copy (never move) the synthetic files NOT flagged as copies into `out`, keeping their paths
    relative to `root`; a `manifest.csv` of `root` is copied with the flagged rows removed.
    Atomic: `out` appears complete or not at all."""
    kept = [s for s, c in zip(samples, is_copy.tolist()) if not c]
    removed = [s for s, c in zip(samples, is_copy.tolist()) if c]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        rel_kept = set()
        for s in kept:
            src = Path(s.path)
            rel = Path(_display_name(src, root))
            if rel.is_absolute():  # outside the synthetic folder: keep just the file name
                rel = Path(src.name)
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():  # a DICOM series folder
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
            rel_kept.add(rel.as_posix())
        manifest = root / "manifest.csv" if root is not None else None
        if manifest is not None and manifest.is_file():
            with open(manifest, newline="") as f:
                reader = csv.DictReader(f)
                fields = reader.fieldnames or []
                rows = list(reader)
            key = "path" if "path" in fields else ("file" if "file" in fields else None)
            if key is not None:
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
                w.writeheader()
                w.writerows(r for r in rows if Path(r[key]).as_posix() in rel_kept)
                (tmp / "manifest.csv").write_text(buf.getvalue())
    return {"path": str(out), "kept": len(kept), "removed": len(removed)}


def _load(spec, data_cfg, what: str):
    from medgen.data import load_images

    try:
        images, samples = load_images(spec, data_cfg)
    except DataError as e:
        raise DataError(f"{what} set: {e}") from None
    return images, samples


def run_audit(
    train,
    holdout,
    synthetic,
    out: str | os.PathLike,
    *,
    detector: Any = "ssl",
    similarity: str = "pearson",
    percentile: float = 95.0,
    max_copy_rate: float = 0.0,
    filter_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    data_cfg: Any = None,
    detector_options: dict | None = None,
    top_k: int = 8,
    carlini_delta: float = 1 / 3,
    device=None,
    seed: int = 0,
) -> dict[str, Any]:
    """Audit a synthetic set and write AUDIT_DIR (`out`): report.json, pairs.csv, report.md,
    similarity_histogram.png, top_pairs.png, and detector/ when the SSL detector is trained here.

    `train`, `holdout`, `synthetic`: dataset folders, manifest.csv files or lists of
    `medgen.data.Sample`, read with `medgen.data.load_images(..., data_cfg)`. Returns the report
    dict (also in report.json). `filter_out`: a folder that receives copies of the synthetic
    files not flagged. Raises `DataError`/`RunError` for bad input or outputs that exist.
    """
    from medgen.privacy.report import write_figures, write_markdown

    out = Path(out)
    roots = {"train": _root_of(train), "holdout": _root_of(holdout), "synthetic": _root_of(synthetic)}
    _check_output(out, roots, "audit folder")
    if filter_out is not None:
        filter_out = Path(filter_out)
        _check_output(filter_out, roots, "--filter-out folder")
        if _inside(filter_out, out):
            raise RunError(f"--filter-out {filter_out} overlaps the audit folder {out}; choose a separate folder")
        if filter_out.exists() and not overwrite:
            raise RunError(f"{filter_out} already exists; pass --overwrite to replace it")
    if out.exists() and not overwrite:
        raise RunError(f"{out} already exists; pass --overwrite to replace it")

    x_t, s_t = _load(train, data_cfg, "training")
    x_h, s_h = _load(holdout, data_cfg, "held-out")
    x_s, s_s = _load(synthetic, data_cfg, "synthetic")
    n_t, n_h, n_s = ([_display_name(Path(s.path), roots[k]) for s in ss] for k, ss in (("train", s_t), ("holdout", s_h), ("synthetic", s_s)))
    subjects = {s.subject_id for s in s_t} & {s.subject_id for s in s_h}

    with atomic_dir(out, overwrite=overwrite) as tmp:
        det = resolve_detector(detector, x_t, tmp, detector_options, device)
        result = audit_images(
            x_t, x_h, x_s, det, similarity=similarity, percentile=percentile, max_copy_rate=max_copy_rate,
            carlini_delta=carlini_delta, names={"train": n_t, "holdout": n_h, "synthetic": n_s}, device=device, seed=seed,
        )
        if subjects:
            result.warnings.append(f"{len(subjects)} subject id(s) appear in both the training and the held-out set (e.g. {sorted(subjects)[:3]}); if these are the same patients, tau is inflated and copies can be missed")
        report = result.report
        report["inputs"] = {k: str(v) if isinstance(v, (str, os.PathLike)) else f"{len(v)} files under {roots[k]}" for k, v in (("train", train), ("holdout", holdout), ("synthetic", synthetic))}
        report["versions"] = _versions()
        if isinstance(detector, str) and detector == "ssl":
            report["detector"]["saved_to"] = "detector/"
        (tmp / "pairs.csv").write_text(_pairs_csv(result, n_s, n_t))
        figures = write_figures(result, x_t, x_s, n_t, n_s, tmp, top_k=top_k)
        report["figures"] = figures
        if filter_out is not None:
            report["filter_out"] = filter_synthetic(s_s, result.is_copy, filter_out, roots["synthetic"], overwrite=overwrite)
        atomic_write_json(tmp / "report.json", report)
        write_markdown(report, tmp / "report.md")
    log.info("audit: %s (%d of %d synthetic flagged, tau=%.4f) -> %s", report["verdict"], report["n_copies"], report["n_synthetic"], report["threshold"], out)
    return report


def load_report(audit_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(audit_dir) / "report.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: not a readable audit report ({e})") from None
