"""The memorization audit: did the generative model copy training patients?

Method (Dar et al. 2024, "Unconditional latent diffusion models memorize patient imaging data",
code Cardio-AI/memorization-ldm): embed training, held-out and synthetic images with copy
detectors; a synthetic sample is above tau when its best correlation with the training set
exceeds a threshold calibrated on the held-out set. medgen makes the verdict a statement a data
steward can sign (`medgen.privacy.calibration`, `medgen.privacy.bound`, `medgen.privacy.verdict`):
tau calibrated in the samples' direction (held-out -> train, conformal), a union of detectors
(with a latent model's own autoencoder for its copies), a positive control whose recall enters
an upper confidence bound on the share of copies, an anatomy gate, the null rate of new patients
and a significance test, and `inconclusive` whenever the audit could not have seen copies.
Beside it: Dar et al.'s own tau, AuthPct (dgm-eval), C_T (Meehan et al. 2020) and Carlini et
al. 2023's relative l2 in pixel space.

`audit_images` computes on tensors; `run_audit` reads folders (or a run's split) and writes the
report directory.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from medgen.errors import DataError, RunError
from medgen.io import atomic_dir, atomic_write_json
from medgen.privacy.calibration import DAR_PERCENTILE, NULL_LEVEL, CopyAudit
from medgen.privacy.memorization import authpct, c_t_statistic, carlini_relative_l2
from medgen.privacy.report import write_figures, write_markdown
from medgen.privacy.verdict import ALPHA, MAX_COPY_RATE, AuditResult, judge
from medgen.versions import software_versions

log = logging.getLogger(__name__)

# Longest side of the images for Carlini's pixel-space criterion (area-downsampled beyond it).
PIXEL_MAX_SIZE = {2: 128, 3: 64}


# ----------------------------------------------------------------------------- computation


def _pixels(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *S') images for pixel-space measures, area-downsampled when the
    longest side exceeds PIXEL_MAX_SIZE (keeps 100k-image audits within memory)."""
    size = PIXEL_MAX_SIZE[spatial_dims]
    x = x.float()
    if max(x.shape[2:]) > size:
        factor = size / max(x.shape[2:])
        x = F.interpolate(x, size=[max(1, round(s * factor)) for s in x.shape[2:]], mode="area")
    return x


def reference_measures(train: torch.Tensor, holdout: torch.Tensor, synthetic: torch.Tensor, *, carlini_n: int = 50,
                       carlini_alpha: float = 0.5, carlini_delta: float = 1 / 3, device=None, seed: int = 0) -> tuple[dict[str, Any], torch.Tensor, list[str]]:
    """AuthPct and C_T (Euclidean distances on downsampled pixels, as dgm-eval computes them on
    features; the SSL embedding is not used because NT-Xent spreads the *training* images apart,
    Wang & Isola 2020, which biases the train->train distances AuthPct compares against) and
    Carlini et al. 2023's relative l2 in pixel space. Returns (report part, ratios (Ns,), warnings)."""
    from medgen.privacy.detector import PixelDetector

    spatial_dims = train.ndim - 2
    ref = PixelDetector(spatial_dims)
    r_t, r_h, r_s = (ref.embed(x) for x in (train, holdout, synthetic))
    auth = authpct(r_t, r_s, device=device)
    ct, ct_reason = c_t_statistic(r_t, r_h, r_s, seed=seed, device=device)
    p_s, p_t = _pixels(synthetic, spatial_dims), _pixels(train, spatial_dims)  # (N, C, *S')
    ratio, _ = carlini_relative_l2(p_s.flatten(1), p_t.flatten(1), n=carlini_n, alpha=carlini_alpha, device=device)
    extracted = ratio < carlini_delta
    part = {
        "authpct": round(auth, 4),
        "c_t": None if ct is None else round(ct, 4),
        "reference_space": f"pixels downsampled to {ref.size} px (longest side)",
        "carlini": {
            "n": min(carlini_n, train.shape[0]), "alpha": carlini_alpha, "delta": carlini_delta,
            "n_extracted": int(extracted.sum()), "extracted_pct": round(100.0 * float(extracted.double().mean()), 4),
            "median_ratio": round(float(ratio.median()), 6), "pixel_shape": list(p_s.shape[1:]),
        },
    }
    return part, ratio, [f"C_T not computed: {ct_reason}"] if ct_reason else []


def audit_images(
    train: torch.Tensor,
    holdout: torch.Tensor,
    synthetic: torch.Tensor,
    detector: Any = "auto",
    *,
    similarity: str = "pearson",
    null_level: float = NULL_LEVEL,
    percentile: float = DAR_PERCENTILE,
    alpha: float = ALPHA,
    max_copy_rate: float = MAX_COPY_RATE,
    bound_method: str = "conservative",
    attempt: int | None = None,
    min_control_recall: float | None = None,
    control_families: Sequence[str] | None = None,
    autoencoder=None,
    detector_options: dict | None = None,
    carlini_delta: float = 1 / 3,
    subjects: dict[str, Sequence[str]] | None = None,
    names: dict[str, Sequence[str]] | None = None,
    device=None,
    seed: int = 0,
) -> AuditResult:
    """Audit `synthetic` against `train` with `holdout` as the calibration set.

    Images are (N, C, *S) tensors in [-1, 1] with one shape across the three sets. `detector`:
    "auto" (ssl,pixel-rank, and latent with an autoencoder), detector names, an object with
    `embed(images) -> (N, D)` and `recipe`, or a list (see
    `medgen.privacy.detector.build_detectors`). `autoencoder`: a latent model's
    `medgen.privacy.families.RoundTrip`. `subjects`/`names` map "train"/"holdout"/"synthetic"
    to per-image subject ids / names used in checks and messages. Returns the judged result
    with AuthPct, C_T and Carlini's measure in its report.

    Bad input raises `DataError` (empty or non-finite sets, mismatched shapes, a held-out set that
    is entirely the training set); everything that makes the audit blind gives `inconclusive`.
    """
    names = names or {}
    shapes = {k: tuple(v.shape[1:]) for k, v in (("train", train), ("holdout", holdout), ("synthetic", synthetic)) if isinstance(v, torch.Tensor)}
    if len(set(shapes.values())) > 1:  # before any detector is trained
        raise DataError(f"image shapes (C, *S) differ between sets: {shapes}; pass a data config with data.shape (and data.channels) so all sets are cropped/padded alike")
    extra = {} if min_control_recall is None else {"min_control_recall": min_control_recall}
    audit = CopyAudit.fit(
        train, holdout, detector, null_level=null_level, percentile=percentile, similarity=similarity, detector_options=detector_options,
        autoencoder=autoencoder, control_families=control_families, subjects=subjects, names=names, device=device, seed=seed, **extra,
    )
    result = judge(audit, synthetic, alpha=alpha, max_copy_rate=max_copy_rate, bound_method=bound_method, attempt=attempt,
                   names=names.get("synthetic"), device=device)
    part, ratio, warnings = reference_measures(train, holdout, synthetic, carlini_delta=carlini_delta, device=device, seed=seed)
    result.report.update(part)
    result.report["warnings"] += warnings
    result.warnings += warnings
    result.carlini_ratio = ratio
    for w in result.warnings:
        log.warning("audit: %s", w)
    return result


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
    """One row per synthetic sample: the contract columns (synthetic, nearest_train, similarity,
    is_copy; nearest image and similarity under the deciding detector), which detector(s) flagged
    it, why it is not anatomy if so, and every detector's similarity and nearest image."""
    sc = result.scores
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["synthetic", "nearest_train", "similarity", "is_copy", "flagged_by", "not_anatomy"]
               + [c for d in sc.detectors for c in (f"similarity_{d}", f"nearest_train_{d}")])
    best, nearest, is_copy = sc.best, sc.nearest_train, sc.is_copy
    for i in range(len(synth_names)):
        per = [v for k in range(len(sc.detectors)) for v in (f"{float(sc.similarity[i, k]):.6f}", train_names[int(sc.nearest[i, k])])]
        w.writerow([synth_names[i], train_names[int(nearest[i])], f"{float(best[i]):.6f}", "true" if bool(is_copy[i]) else "false",
                    sc.flagged_by(i), sc.not_anatomy[i]] + per)
    return buf.getvalue()


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


def run_split(run: str | os.PathLike, holdout_splits: Sequence[str] = ("holdout",), data: str | os.PathLike | None = None) -> tuple[list, list, dict | None]:
    """The training and held-out samples of a training run, from its `split.json`, and the run's
    data config (from `model/config.json`) so all sets are preprocessed as in training.

    `holdout_splits`: which unseen splits calibrate tau ("holdout", and "val" when the run did
    not select checkpoints on it). `data`: the dataset folder when it moved since training.
    """
    from medgen.data import load_split, scan_dataset

    run = Path(run)
    split_file = run / "split.json"
    if not split_file.is_file():
        raise RunError(f"{run} has no split.json; --run expects a folder written by `medgen train autoencoder|diffusion`")
    split = load_split(split_file)
    meta = json.loads(split_file.read_text())
    data_cfg = None
    model_cfg = run / "model" / "config.json"
    if model_cfg.is_file():
        data_cfg = json.loads(model_cfg.read_text()).get("data")
    source = Path(data) if data is not None else Path(str(meta.get("data") or (data_cfg or {}).get("path") or ""))
    if not str(source) or not source.exists():
        raise RunError(f"{run}: the run's dataset {str(source) or '(not recorded)'} is not there; pass --data DIR with the dataset it was trained on")
    unknown = [s for s in holdout_splits if s not in ("holdout", "val")]
    if unknown:
        raise RunError(f"--holdout-splits takes holdout and/or val, got {unknown}")
    samples = scan_dataset(source)
    by_subject = {}
    for s in samples:
        by_subject.setdefault(s.subject_id, []).append(s)
    train_ids = split.get("train", [])
    holdout_ids = [i for name in holdout_splits for i in split.get(name, [])]
    missing = [i for i in train_ids + holdout_ids if i not in by_subject]
    if missing:
        raise DataError(f"{len(missing)} subject(s) of {split_file} are not in {source} (e.g. {missing[:3]}); pass --data DIR with the dataset the run was trained on")
    pick = lambda ids: [s for i in ids for s in by_subject[i]]  # noqa: E731
    train, holdout = pick(train_ids), pick(holdout_ids)
    check_split_content(split_file, {"train": train, **{name: pick(split.get(name, [])) for name in holdout_splits}}, source)
    if data_cfg is not None:
        data_cfg = {**data_cfg, "path": str(source)}
    return train, holdout, data_cfg


def check_split_content(split_file: Path, sets: dict[str, list], where) -> None:
    """Refuse files whose content is not what the run recorded in split.json for that split
    (matching names are not enough: another cohort can reuse subject ids and file names)."""
    from medgen.data import split_content_mismatch

    for name, samples in sets.items():
        mismatch = split_content_mismatch(split_file, name, samples)
        if mismatch is None:
            log.warning("%s predates content hashes: the %s files are matched by subject and name only", split_file, name)
            return
        missing, unknown = mismatch
        if missing or unknown:
            shown = ", ".join(Path(f).name for f in (unknown or missing)[:3])
            raise DataError(f"{where}: the {name} files are not the ones the run recorded in {split_file} (content sha256): "
                            f"{len(unknown)} file(s) the run never saw, {len(missing)} of its files missing (e.g. {shown}); "
                            f"pass the data the run was trained on")


def _check_outputs(out: Path, filter_out: Path | None, roots: dict[str, Path | None], overwrite: bool) -> None:
    _check_output(out, roots, "audit folder")
    if filter_out is not None:
        _check_output(filter_out, roots, "--filter-out folder")
        if _inside(filter_out, out):
            raise RunError(f"--filter-out {filter_out} overlaps the audit folder {out}; choose a separate folder")
        if filter_out.exists() and not overwrite:
            raise RunError(f"{filter_out} already exists; pass --overwrite to replace it")
    if out.exists() and not overwrite:
        raise RunError(f"{out} already exists; pass --overwrite to replace it")


def run_audit(
    train=None,
    holdout=None,
    synthetic=None,
    out: str | os.PathLike | None = None,
    *,
    run: str | os.PathLike | None = None,
    holdout_splits: Sequence[str] = ("holdout",),
    data: str | os.PathLike | None = None,
    detector: Any = "auto",
    similarity: str = "pearson",
    null_level: float = NULL_LEVEL,
    percentile: float = DAR_PERCENTILE,
    alpha: float = ALPHA,
    max_copy_rate: float = MAX_COPY_RATE,
    bound_method: str = "conservative",
    min_control_recall: float | None = None,
    autoencoder: Any = None,
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
    `medgen.data.Sample`, read with `medgen.data.load_images(..., data_cfg)`. Or `run`: a training
    run whose split.json gives the training and held-out (`holdout_splits`) subjects and whose
    data config preprocesses all three sets (unless `data_cfg` is given); a latent run's
    autoencoder joins the audit, and the audit is recorded in the run's attempt log
    (`medgen.privacy.attempts`). `autoencoder`: a latent model's autoencoder (a run folder or a
    `RoundTrip`) for folder audits. Returns the report dict (also in report.json;
    `report["verdict"]` is pass, fail or inconclusive). `filter_out`: a folder that receives
    copies of the synthetic files not flagged, whatever the verdict. Raises
    `DataError`/`RunError` for bad input or outputs that exist.
    """
    from medgen.privacy.attempts import attempt_entry, check_writable, record_attempt
    from medgen.privacy.families import RoundTrip, run_roundtrip

    if out is None or synthetic is None:
        raise RunError("run_audit needs synthetic= and out=")
    run_info = None
    if run is not None:
        if train is not None or holdout is not None:
            raise RunError("pass either --run or --train/--holdout, not both")
        train, holdout, run_cfg = run_split(run, holdout_splits, data)
        data_cfg = data_cfg if data_cfg is not None else run_cfg
        run_info = {"run": str(run), "holdout_splits": list(holdout_splits)}
        check_writable(run)
        if autoencoder is None:
            autoencoder = run_roundtrip(run, device)
    elif train is None or holdout is None:
        raise RunError("pass --train and --holdout, or --run RUN_DIR")
    out = Path(out)
    filter_out = Path(filter_out) if filter_out is not None else None
    roots = {"train": _root_of(train), "holdout": _root_of(holdout), "synthetic": _root_of(synthetic)}
    _check_outputs(out, filter_out, roots, overwrite)

    x_t, s_t = _load(train, data_cfg, "training")
    x_h, s_h = _load(holdout, data_cfg, "held-out")
    x_s, s_s = _load(synthetic, data_cfg, "synthetic")
    if autoencoder is not None and not isinstance(autoencoder, RoundTrip):
        given, autoencoder = autoencoder, run_roundtrip(autoencoder, device)
        if autoencoder is None:
            raise RunError(f"--autoencoder {given} holds no autoencoder (a pixel-space diffusion run has none: leave --autoencoder out)")
    n_t, n_h, n_s = ([_display_name(Path(s.path), roots[k]) for s in ss] for k, ss in (("train", s_t), ("holdout", s_h), ("synthetic", s_s)))

    with atomic_dir(out, overwrite=overwrite) as tmp:
        result = audit_images(
            x_t, x_h, x_s, detector, similarity=similarity, null_level=null_level, percentile=percentile, alpha=alpha,
            max_copy_rate=max_copy_rate, bound_method=bound_method, min_control_recall=min_control_recall, autoencoder=autoencoder,
            detector_options=detector_options, carlini_delta=carlini_delta,
            subjects={"train": [s.subject_id for s in s_t], "holdout": [s.subject_id for s in s_h]},
            names={"train": n_t, "holdout": n_h, "synthetic": n_s}, device=device, seed=seed,
        )
        report = result.report
        for fit in result.audit.fits:
            if getattr(fit.detector, "name", None) == "ssl" and getattr(fit.detector, "source", "") is None:
                fit.detector.save(tmp / "detector")  # trained here: keep it for re-use with --detector
                report["detectors"][fit.name]["saved_to"] = "detector/"
        report["inputs"] = {k: str(v) if isinstance(v, (str, os.PathLike)) else f"{len(v)} files under {roots[k]}" for k, v in (("train", train), ("holdout", holdout), ("synthetic", synthetic))}
        if run_info is not None:
            report["inputs"].update(run_info)
        report["versions"] = software_versions()
        (tmp / "pairs.csv").write_text(_pairs_csv(result, n_s, n_t))
        report["figures"] = write_figures(result, x_t, x_s, n_t, n_s, tmp, top_k=top_k)
        if filter_out is not None:
            report["filter_out"] = filter_synthetic(s_s, result.is_copy, filter_out, roots["synthetic"], overwrite=overwrite)
        atomic_write_json(tmp / "report.json", report)
        write_markdown(report, tmp / "report.md")
        if run is not None:  # on the record before the report appears
            record_attempt(run, attempt_entry("audit", result, seed=seed, n=len(x_s), policy=report["policy"], out=out))
    log.info("audit: %s (%d of %d synthetic flagged, p = %.3g) -> %s", report["verdict"], report["n_copies"], report["n_synthetic"], report["test"]["p_value"], out)
    return report


def load_report(audit_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(audit_dir) / "report.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: not a readable audit report ({e})") from None
