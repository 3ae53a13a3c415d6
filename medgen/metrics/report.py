"""`evaluate`: real vs synthetic folders -> metrics with 95% intervals, recipe, report folder.

2D images: FID, KID, precision/recall (k=3), density/coverage (k=5) on features of one 2D
extractor; MS-SSIM diversity on the pixels.
3D volumes: 2.5D FID (every slice along each of the three axes through the 2D extractor, one
FID per plane and their mean, as MAISI, Guo et al. 2025), and volume-level FID, KID, PR, DC on
a 3D extractor; MS-SSIM diversity on the volumes.

Report keys name the feature space: `fid`/`kid` on Inception features only, `fd_<extractor>`/
`kid_<extractor>` on any other (`fd_pca`, `fd_medicalnet`, ...; see `metric_keys`). KID is
reported x10^3. Intervals: `medgen.metrics.bootstrap`.

Real vs real (`holdout`): every metric again with held-out real images in the synthetic
images' place, at matched set sizes, and the ratio model / real vs real for FD and KID
(report["reference"]; `reference_sets`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from medgen.data import ImageSet
from medgen.errors import DataError
from medgen.figures import figure_png
from medgen.io import atomic_dir, atomic_write_json, atomic_write_text
from medgen.metrics import features as F
from medgen.metrics.bootstrap import (HALF_SAMPLE_METHOD, bootstrap_mean, fd_infinite_n, half_sample_interval, half_sample_two_sample,
                                      half_samples)
from medgen.metrics.fid import frechet_distance
from medgen.metrics.kid import kernel_inception_distance, kid_bootstrap
from medgen.metrics.msssim import msssim_diversity, random_pairs
from medgen.metrics.prdc import prdc_indicators
from medgen.metrics.utility import utility_markdown, utility_summary
from medgen.train.preview import grid_figure
from medgen.versions import software_versions

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

ALL_METRICS = ("fid", "kid", "prdc", "msssim")
K_PR, K_DC = 3, 5  # Kynkäänniemi et al. 2019; Naeem et al. 2020
PACKAGES = ("scipy", "monai", "clean-fid", "torchvision", "safetensors")  # in report.json "versions", with medgen.versions.CORE


# ----------------------------------------------------------------------------- inputs
READ_BATCH = {2: 64, 3: 4}  # images (volumes) read at a time: the sets are streamed, never loaded whole


def open_set(path, what: str) -> tuple[ImageSet, dict]:
    """The set, read in batches (`medgen.data.ImageSet`), and a summary (dir, n, shape, source dtypes).

    `path` may also be images already in memory, (N, C, *S) in [-1, 1] (the release evaluates
    the preprocessed sets it audits): no samples, so no feature cache; or a list of `Sample`s
    (the demo's training and held-out subjects of one cohort folder)."""
    from medgen.data import scan_dataset
    from medgen.data.readers import load

    if isinstance(path, torch.Tensor):
        if path.shape[0] < 2:
            raise DataError(f"{what} set: {path.shape[0]} image(s); the metrics need at least 2")
        return ImageSet(path), {"dir": None, "n": int(path.shape[0]), "shape": list(path.shape[1:]), "source_dtype": ["in memory"]}
    if isinstance(path, (list, tuple)):
        samples = list(path)
        path = Path(os.path.commonpath([s.path.parent for s in samples])) if samples else Path(f"(no {what} images)")
    else:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{what} folder {path} does not exist")
        samples = scan_dataset(path)
    if not samples:
        raise DataError(f"{what} folder {path} holds no images")
    images = ImageSet(samples)
    if len(images) < 2:
        raise DataError(f"{what} folder {path}: {len(images)} image(s); the metrics need at least 2 (use hundreds for stable numbers)")
    dtypes = sorted({str(load(s.path).source_dtype) for s in images.samples[: min(len(images), 4)]})
    summary = {"dir": str(path), "n": len(images), "shape": list(images.shape), "source_dtype": dtypes}
    return images, summary


def _stream(images: ImageSet, view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """The set's batches as read from disk, each through `view` (e.g. the slices of one plane)."""
    for x, _ in images.batches(READ_BATCH[len(images.shape) - 1]):
        yield x if view is None else view(x)


def _viewed_shape(images: ImageSet, view: Callable[[torch.Tensor], torch.Tensor] | None) -> list[int]:
    """The shape `view` gives the whole set, worked out without reading it (on a meta tensor)."""
    whole = torch.empty(len(images), *images.shape, device="meta")
    return list((whole if view is None else view(whole)).shape)


# ----------------------------------------------------------------------------- extractors
def choose_extractor(name: str, spatial_dims: int, weights=None, device=None) -> F.FeatureExtractor:
    """`auto`: Inception (2D) or MedicalNet (3D) when its weights are present locally (no
    download is attempted), otherwise the in-domain PCA extractor."""
    if name == "auto":
        pretrained = "inception" if spatial_dims == 2 else "medicalnet"
        name = pretrained if F.weights_present(pretrained, weights) else "pca"
        if name == "pca":
            log.info("features: in-domain PCA (no local %s weights)", pretrained)
    ex = F.get_extractor(name, weights=weights, device=device)
    if spatial_dims not in ex.spatial_dims:
        raise DataError(f"extractor {name!r} takes {' or '.join(f'{d}D' for d in ex.spatial_dims)} inputs but the images are {spatial_dims}D")
    return ex


def _features(ex: F.FeatureExtractor, images: ImageSet, mode: str, use_cache: bool, desc: str,
              view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(N, D) features of every image, or of every `view` of them, streamed from disk (cached
    per file list, extractor and mode)."""
    shape = _viewed_shape(images, view)

    def compute() -> torch.Tensor:
        return ex.extract(_stream(images, view), total=shape[0], desc=f"features {desc} ({ex.recipe.get('extractor')})")

    if not images.samples:  # images in memory: no file paths to key a cache on
        return compute()
    key = F.cache_key([s.path for s in images.samples], ex.recipe, {"mode": mode, "shape": shape})
    feats, hit = F.cached_features(key, lambda: {"features": compute()}, use_cache)
    log.info("features %s (%s): %s", ex.recipe.get("extractor"), mode, "cache hit" if hit else "computed")
    return feats["features"]


# ----------------------------------------------------------------------------- MS-SSIM inputs
# MS-SSIM diversity holds the images of its pairs (each read once) when they are at most HELD_IMAGES and HELD_BYTES:
# fixed bounds, so that a streamed eval's memory does not grow with the sample set (tests/test_streaming.py). Small
# sets gain most: an eval of 22 real and 22 synthetic images read 1,034 files before, 154 now.
HELD_IMAGES, HELD_BYTES = 64, 256 << 20


class _HeldImages:
    """The images of a set that MS-SSIM's pairs use, each read once and held: what
    `pairwise_msssim` asks of a set (len, shape (C, *S), take). Few images in many pairs (44
    images, 500 pairs) were otherwise read once per pair they are in."""

    def __init__(self, images: ImageSet, used: Sequence[int]):
        self.shape, self._n = images.shape, len(images)
        self._row = {int(i): r for r, i in enumerate(used)}
        self._held = images.take(used)  # (len(used), C, *S)

    def __len__(self) -> int:
        return self._n

    def take(self, indices: Sequence[int]) -> torch.Tensor:
        return self._held[[self._row[int(i)] for i in indices]]


def _held_for_pairs(images: ImageSet, n_pairs: int, seed: int) -> ImageSet | _HeldImages:
    """The set for `msssim_diversity(images, n_pairs, seed)` with the images of its pairs (the same
    `random_pairs`) read once, when they are at most HELD_IMAGES and HELD_BYTES; else the set itself (in memory, or read
    pair batch by pair batch: with that many images each is in about one pair, so little is read twice)."""
    used = random_pairs(len(images), n_pairs, seed).unique().tolist()
    if images.memory is not None or len(used) > HELD_IMAGES or len(used) * math.prod(images.shape) * 4 > HELD_BYTES:
        return images
    return _HeldImages(images, used)


# ----------------------------------------------------------------------------- metrics
KID_SCALE = 1000  # KID is reported x10^3, as in the papers that use it (Bińkowski et al. 2018, Karras et al. 2020)


def metric_keys(extractor: str) -> dict[str, str]:
    """Report keys of the Fréchet distance and KID on one extractor's features.

    `fid`/`kid` mean Inception features only (Heusel et al. 2017 define FID on them); any other
    extractor gives `fd_<name>`/`kid_<name>` (as FD_DINOv2, Stein et al. 2023), so that an
    in-domain PCA number is never read as an FID: `fd_pca`, `fd_medicalnet`, `fd_torchscript`.
    """
    if extractor == "inception":
        return {"fid": "fid", "kid": "kid"}
    tag = extractor.split(":")[0]  # "torchscript:net.pt" -> "torchscript"
    return {"fid": f"fd_{tag}", "kid": f"kid_{tag}"}


def _value(v: float, ci: dict | None, scale: float = 1.0, **extra) -> dict:
    """{"value", "ci95", **extra}, both multiplied by `scale` (then recorded as "scale")."""
    out = {"value": float(v) * scale, **({"scale": scale} if scale != 1 else {}), **extra}
    if ci is not None:
        out["ci95"] = [ci["low"] * scale, ci["high"] * scale]
    return out


def _fd_value(point: float, ci: dict | None) -> dict:
    """A Fréchet distance with its size-corrected half-sample interval and N -> infinity extrapolation."""
    return _value(point, ci, **({"infinite_n": fd_infinite_n(point, ci)} if ci else {}))


def feature_metrics(real_f: torch.Tensor, fake_f: torch.Tensor, metrics: Sequence[str], n_boot: int, seed: int, device,
                    keys: dict[str, str]) -> dict:
    """FD, KID (x10^3), PR (k=3), DC (k=5) on (N, D) and (M, D) features, each with a 95% interval;
    FD and KID under `keys` (see `metric_keys`)."""
    out: dict[str, Any] = {}
    real_f, fake_f = real_f.to(device, torch.float64), fake_f.to(device, torch.float64)
    if "fid" in metrics:
        point = frechet_distance(real_f, fake_f)
        halves_fit = min(len(real_f), len(fake_f)) >= 4  # a half-sample FD needs 2 rows per set
        ci = half_sample_two_sample(frechet_distance, real_f, fake_f, n_boot, seed, point=point) if n_boot and halves_fit else None
        out[keys["fid"]] = _fd_value(point, ci)
    if "kid" in metrics:
        kid = kernel_inception_distance(real_f, fake_f, seed=seed)
        ci = kid_bootstrap(real_f, fake_f, n_boot, seed=seed) if n_boot else None
        out[keys["kid"]] = _value(kid["kid"], ci, scale=KID_SCALE, std=kid["kid_std"] * KID_SCALE,
                                  subset_size=kid["subset_size"], num_subsets=100)
    if "prdc" in metrics:
        terms = prdc_indicators(real_f, fake_f, k_pr=K_PR, k_dc=K_DC, device=device)
        for name, t in terms.items():
            out[name] = _value(t.mean(), bootstrap_mean(t, n_boot, seed) if n_boot else None, k=K_PR if name in ("precision", "recall") else K_DC)
    return out


def fid_2p5d(ex, real: ImageSet, others: dict[str, ImageSet], n_boot: int, seed: int, slice_step: int, use_cache: bool,
             device) -> dict[str, dict]:
    """Per-plane FD over all slices (every `slice_step`-th) of the real set against each set of
    `others` (name -> set: the synthetic set, held-out images), and their mean; the intervals
    come from half-samples of whole volumes (slices of one volume are not independent)."""
    views = {plane: functools.partial(F.volume_slices, axis=axis, step=slice_step) for plane, axis in F.PLANES.items()}
    if isinstance(ex, F.PCAExtractor):  # one basis for all planes, fitted on the real slices
        ex.fit_batches([_stream(real, v) for v in views.values()], [_viewed_shape(real, v)[2:] for v in views.values()])

    def plane_features(images: ImageSet, desc: str) -> dict[str, torch.Tensor]:
        out = {}
        for plane, view in views.items():
            f = _features(ex, images, f"2.5d:{plane}:{slice_step}", use_cache, f"{desc} {plane} slices", view)
            # (N, slices, D), kept in float32: frechet_distance casts what it gets to float64 (same numbers, half the memory)
            out[plane] = f.reshape(len(images), -1, f.shape[1]).to(device)
        return out

    real_p = plane_features(real, "real")
    return {name: _fd_planes(real_p, plane_features(other, SET_NAMES[name]), n_boot, seed) for name, other in others.items()}


def _fd_planes(real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor], n_boot: int, seed: int) -> dict:
    """FD per plane and their mean from (N, slices, D) features per plane, with half-sample intervals."""
    point = {p: frechet_distance(real[p].flatten(0, 1), fake[p].flatten(0, 1)) for p in real}
    reps: dict[str, list[float]] = {p: [] for p in real}
    n, m = len(next(iter(real.values()))), len(next(iter(fake.values())))
    for ir, jf in half_samples(n, m, n_boot, seed):  # one volume per half at least: many slices
        for p in real:
            reps[p].append(frechet_distance(real[p][ir.to(real[p].device)].flatten(0, 1), fake[p][jf.to(fake[p].device)].flatten(0, 1)))
    out = {p: _fd_value(point[p], half_sample_interval(point[p], reps[p]) if n_boot else None) for p in real}
    mean = float(np.mean(list(point.values())))
    out["mean"] = _fd_value(mean, half_sample_interval(mean, np.mean([reps[p] for p in real], axis=0)) if n_boot else None)
    out["n_slices"] = {p: int(r.shape[1]) for p, r in real.items()}
    return out


# ----------------------------------------------------------------------------- real vs real
# What each set compared with the real set is called (progress lines); "metrics" is the model's row.
SET_NAMES = {"metrics": "synthetic", "reference": "held-out", "model_matched": "synthetic subset"}
REFERENCE_WHAT = ("the same metrics with held-out real images (patients the model never saw) in the synthetic images' place, "
                  "against the same real set: what a model whose samples were new patients would score at these set sizes")
NO_HOLDOUT = ("no real-vs-real reference: it needs real images of patients the model never saw (pass --holdout DIR); "
              "without it the numbers have nothing to be compared with")


def _fingerprints(images: ImageSet) -> set[str]:
    """sha256 per image: of its file, or of its pixels when in memory."""
    from medgen.data import content_sha256

    if images.memory is not None:
        return {hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest() for x in images.memory}
    return {content_sha256(s.path) for s in images.samples}


def _subset(images: ImageSet, k: int, seed: int) -> ImageSet:
    """k images of the set drawn at random (seeded), kept in their order; the set itself when k covers it."""
    if k >= len(images):
        return images
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:k].sort().values.tolist()
    return ImageSet(images.memory[keep]) if images.memory is not None else ImageSet([images.samples[i] for i in keep])


def reference_sets(holdout, real_set: ImageSet, fake_set: ImageSet, seed: int) -> tuple[dict[str, ImageSet], dict, list[str]]:
    """The sets compared with the real set besides the synthetic one, the held-out set's summary, notes.

    The real-vs-real reference puts k = min(synthetic, held-out) held-out images where the
    synthetic ones stand in the model's comparison; the real side is the same set, so only what
    stands in the model's place differs. With fewer held-out than synthetic images, the model is
    also scored on k random synthetic images ("model_matched"), the ratios' numerator: FD and KID
    depend on the set sizes (Chong & Forsyth 2020).
    """
    hold_set, info = open_set(holdout, "held-out")
    if hold_set.shape != real_set.shape:
        raise DataError(f"held-out images are {list(hold_set.shape)} (channels, size) ({holdout}) but real ones {list(real_set.shape)}; "
                        f"the reference compares real images of one kind")
    shared = _fingerprints(hold_set) & _fingerprints(real_set)
    if shared:
        raise DataError(f"--holdout {holdout}: {len(shared)} of its images are also in the real set; the reference needs "
                        f"patients the model never saw, none of them in the real (training) set")
    n_fake, k = len(fake_set), min(len(fake_set), len(hold_set))
    sets, notes = {"reference": _subset(hold_set, k, seed)}, []
    if k < n_fake:
        sets["model_matched"] = _subset(fake_set, k, seed)
        notes.append(f"reference: only {k} held-out images for {n_fake} synthetic ones, so it uses all {k}; the ratios divide the "
                     f"model's metrics on {k} random synthetic images (reference.model_matched) by it, at equal set sizes")
    elif k < len(hold_set):
        notes.append(f"reference: {k} of the {len(hold_set)} held-out images (as many as the synthetic ones), "
                     f"drawn at random (seed {seed})")
    return sets, {**info, "n_used": k}, notes


def _ratio(key: str, model: dict, reference: dict) -> float | None:
    """model / real-vs-real. KID is unbiased (0 on average for one distribution): its ratio needs a
    real-vs-real KID whose interval is above 0; a Fréchet distance is positive at any finite size."""
    floor = reference["ci95"][0] if key.startswith("kid") and "ci95" in reference else reference["value"]
    return round(model["value"] / reference["value"], 4) if floor > 0 else None


def reference_ratios(model: dict, reference: dict) -> dict[str, float | None]:
    """model / real-vs-real for each Fréchet distance and KID row (`fd_pca`, `kid_pca`, `fd_pca_2.5d/xy`, ...)."""
    ref = {key: m for key, _, m in _rows(reference)}
    return {key: _ratio(key, m, ref[key]) for key, _, m in _rows(model) if key in ref and _better(key) == "lower"}


# ----------------------------------------------------------------------------- evaluate
def evaluate(
    real,
    fake,
    out=None,
    holdout=None,
    features: str = "auto",
    features_3d: str = "auto",
    weights: str | None = None,
    metrics: Sequence[str] = ALL_METRICS,
    bootstrap: int = 200,
    seed: int = 0,
    slice_step: int = 1,
    msssim_pairs: int = 500,
    device=None,
    use_cache: bool = True,
    overwrite: bool = False,
    utility: dict | None = None,
) -> dict:
    """Evaluate a synthetic folder against a real one; write REPORT_DIR when `out` is given.

    `holdout`: real images of patients the model never saw (a folder, manifest, Samples or a
    tensor, as `real`); the same metrics are then computed for them in the synthetic images'
    place, the real-vs-real reference (`reference_sets`).
    `utility`: a `medgen.metrics.utility.synthetic_utility` result, recorded as report["utility"].

    Returns the report dict: {"metrics", "reference", "recipe", "versions", ...}. See the module docstring.
    """
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise DataError(f"unknown metric(s) {sorted(unknown)}; choose from {', '.join(ALL_METRICS)}")
    if out is not None and Path(out).exists() and not overwrite:
        from medgen.errors import RunError

        raise RunError(f"{out} already exists; pass --overwrite to replace it")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    real_set, real_info = open_set(real, "real")  # read in batches: neither set is ever held whole
    fake_set, fake_info = open_set(fake, "fake")
    dims, fake_dims = len(real_set.shape) - 1, len(fake_set.shape) - 1
    if dims != fake_dims:
        raise DataError(f"real images are {dims}D ({real}) but synthetic ones are {fake_dims}D ({fake}); compare like with like")
    if real_set.shape[0] != fake_set.shape[0]:
        raise DataError(f"real images have {real_set.shape[0]} channel(s), synthetic ones {fake_set.shape[0]}")
    notes = []
    if real_info["source_dtype"] != fake_info["source_dtype"]:
        notes.append(f"real files are {real_info['source_dtype']} and synthetic files {fake_info['source_dtype']}; both were mapped to [-1, 1] by their own range before feature extraction")
    sets = {"metrics": fake_set}  # report key -> the set compared with the real set
    hold_info = None
    if holdout is not None:
        more, hold_info, more_notes = reference_sets(holdout, real_set, fake_set, seed)
        sets.update(more)
        notes += more_notes

    tables: dict[str, dict[str, Any]] = {name: {} for name in sets}
    recipe: dict[str, Any] = {"n_real": real_info["n"], "n_fake": fake_info["n"], "spatial_dims": dims, "bootstrap": bootstrap,
                              "seed": seed, "device": str(device), "inputs": {"real": real_info, "fake": fake_info}}
    feature_based = [m for m in metrics if m != "msssim"]
    if feature_based:
        if dims == 3 and "fid" in metrics:
            ex2 = choose_extractor(features, 2, weights, device)
            key = metric_keys(ex2.recipe["extractor"])["fid"] + "_2.5d"
            for name, planes in fid_2p5d(ex2, real_set, sets, bootstrap, seed, slice_step, use_cache, device).items():
                tables[name][key] = planes
            recipe["features_2.5d"] = {**ex2.recipe, "slice_step": slice_step, "planes": list(F.PLANES)}
        ex = choose_extractor(features if dims == 2 else features_3d, dims, weights if dims == 2 else None, device)
        if isinstance(ex, F.PCAExtractor):
            ex.fit_batches([_stream(real_set)], [real_set.shape[1:]])
            notes.append("features: in-domain PCA of the real set, so the distances are fd_pca/kid_pca, not FID/KID; "
                         "they compare models on this real set only, not across datasets or papers")
        real_f = _features(ex, real_set, f"{dims}d", use_cache, "real")
        keys = metric_keys(ex.recipe["extractor"])
        few = hold_info is not None and hold_info["n_used"] <= K_DC and "prdc" in feature_based  # (the model's own row raises)
        if few:
            notes.append(f"reference: no precision/recall/density/coverage for {hold_info['n_used']} held-out images "
                         f"(k={K_DC} neighbours need {K_DC + 1})")
        for name, other in sets.items():
            wanted = [m for m in feature_based if not (few and name != "metrics" and m == "prdc")]
            other_f = _features(ex, other, f"{dims}d", use_cache, SET_NAMES[name])
            tables[name].update(feature_metrics(real_f, other_f, wanted, bootstrap, seed, device, keys))
        recipe["features"] = ex.recipe
        recipe["metric_keys"] = keys
        recipe["prdc"] = {"k_precision_recall": K_PR, "k_density_coverage": K_DC, "distance": "euclidean, float64"}
        if "kid" in metrics:
            recipe["kid"] = {"kernel": "(x.y/d + 1)^3", "estimator": "unbiased MMD^2", "scale": KID_SCALE, "num_subsets": 100,
                             "subset_size": tables["metrics"][keys["kid"]]["subset_size"]}
    if "msssim" in metrics:
        def diversity(x: ImageSet) -> dict:
            d = msssim_diversity(_held_for_pairs(x, msssim_pairs, seed), n_pairs=msssim_pairs, seed=seed, device=device)
            recipe["msssim"] = {**d["settings"], "pairs": "random distinct pairs within a set"}
            ci = bootstrap_mean(d["per_pair"], bootstrap, seed) if bootstrap else None
            return _value(d["msssim"], ci, pairs=int(d["per_pair"].numel()))

        tables["metrics"]["msssim_fake"] = diversity(fake_set)
        tables["metrics"]["msssim_real"] = diversity(real_set)
        if "reference" in tables:  # the held-out images' diversity: what the synthetic set's would be
            tables["reference"]["msssim_fake"] = diversity(sets["reference"])
    if bootstrap:
        recipe["intervals"] = {"fd": HALF_SAMPLE_METHOD, "kid": "two-sample bootstrap, distinct-pair U-statistic",
                               "prdc, msssim": "percentile bootstrap of per-sample terms"}
    if holdout is None:
        reference: dict[str, Any] = {"skipped": NO_HOLDOUT}
    else:
        matched = tables.get("model_matched")
        reference = {"what": REFERENCE_WHAT, "holdout": hold_info,
                     "n": {"real": real_info["n"], "held_out": hold_info["n_used"], "synthetic": fake_info["n"]},
                     "metrics": tables["reference"], **({"model_matched": matched} if matched is not None else {}),
                     "ratio": reference_ratios(matched if matched is not None else tables["metrics"], tables["reference"])}
    report = {"metrics": tables["metrics"], "reference": reference, "recipe": recipe, "versions": software_versions(*PACKAGES),
              "notes": notes, "seconds": round(time.perf_counter() - start, 2), **({"utility": utility} if utility else {})}
    if out is not None:
        shown = range(min(SHOWN[dims], len(real_set), len(fake_set)))  # samples.png: the first few of each set
        write_report(report, real_set.take(shown), fake_set.take(shown), Path(out), overwrite)
    return report


# ----------------------------------------------------------------------------- report folder
def _better(key: str) -> str:
    """Which way a metric is better: "lower" (distances), "closer to real" (MS-SSIM diversity),
    "~1" (density), "higher" (precision, recall, coverage)."""
    if key.startswith(("fid", "fd_", "kid")):
        return "lower"
    return "closer to real" if key.startswith("msssim") else ("~1" if key == "density" else "higher")


def _rows(metrics: dict) -> list[tuple[str, str, dict]]:
    """(key, label, entry) per table row: 2.5D planes unfolded (key `fd_pca_2.5d/xy`), scaled
    values labelled with their scale (`kid_pca (x1000)`)."""
    rows = []
    for name, m in metrics.items():
        if name.endswith("_2.5d"):
            rows += [(f"{name}/{p}", f"{name}/{p}", v) for p, v in m.items() if isinstance(v, dict) and "value" in v]
        else:
            rows.append((name, f"{name} (x{m['scale']:g})" if "scale" in m else name, m))
    return rows


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def _ci(m: dict | None) -> str | None:
    ci = (m or {}).get("ci95")
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else None


def metric_cells(metrics: dict) -> list[tuple[str, str, str | None]]:
    """(label, value, "[lo, hi]" or None) per row of `_rows`: one formatting for report.md, the
    CLI summary, the demo's summary table and the data card."""
    return [(label, _fmt(m["value"]), _ci(m)) for _, label, m in _rows(metrics)]


def reference_cells(metrics: dict, reference: dict | None) -> list[dict[str, str | None]]:
    """`metric_cells` beside the real-vs-real reference, per row: {"metric", "value", "ci",
    "reference", "reference_ci", "ratio" (FD and KID), "matched" (the model on as many images as
    the reference; only when there were fewer held-out than synthetic images), "better"}; "-"
    where a row has none. `reference` is report["reference"] (None or skipped: no reference columns)."""
    reference = reference if reference and "metrics" in reference else {}
    refs = {key: m for key, _, m in _rows(reference.get("metrics", {}))}
    matched = {key: m for key, _, m in _rows(reference["model_matched"])} if "model_matched" in reference else None
    ratios = reference.get("ratio", {})
    cells = []
    for key, label, m in _rows(metrics):
        row = {"metric": label, "value": _fmt(m["value"]), "ci": _ci(m), "better": _better(key)}
        if reference:
            row.update(reference=_fmt(refs[key]["value"]) if key in refs else "-", reference_ci=_ci(refs.get(key)),
                       ratio=_fmt(ratios[key]) if key in ratios else "-")
            if matched is not None:
                row["matched"] = _fmt(matched[key]["value"]) if key in matched else "-"
        cells.append(row)
    return cells


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(label, text) per metric for the CLI and demo summaries: the value and interval, then real
    vs real and the ratio when there is a reference; a row says what the reference was, a last one the
    utility (TSTR) when computed."""
    reference = report.get("reference") or {}
    rows = []
    for c in reference_cells(report["metrics"], reference):
        text = c["value"] + (f" {c['ci']}" if c["ci"] else "")
        if c.get("matched", "-") != "-":
            text += f"  | on {reference['n']['held_out']} images {c['matched']}"
        if c.get("reference", "-") != "-":
            text += f"  | real vs real {c['reference']}" + (f" {c['reference_ci']}" if c["reference_ci"] else "")
            text += f"  | ratio {c['ratio']}" if c["ratio"] != "-" else ""
        rows.append((c["metric"], text))
    if "skipped" in reference:
        rows.append(("real vs real", reference["skipped"]))
    elif reference:
        n = reference["n"]
        matched = f"; ratios use the model on {n['held_out']} of its images" if "model_matched" in reference else ""
        rows.append(("real vs real", f"{n['held_out']} held-out vs the {n['real']} real images{matched}"))
    if "utility" in report:
        rows.append(("utility", utility_summary(report["utility"])))
    return rows


def _explanations(report: dict) -> list[str]:
    """What the distances in this report are and how to read them (below the table)."""
    metrics, lines = report["metrics"], []
    fds = [(label, m) for _, label, m in _rows(metrics) if label.startswith(("fid", "fd_"))]
    if fds:
        lines.append("Fréchet distance between Gaussian fits of the two feature sets: `fid` on Inception features only, "
                     "`fd_<features>` on any other extractor. It falls as the sets grow (a small-sample bias ~1/N, "
                     "Chong & Forsyth 2020), so compare models at equal set sizes.")
        if any("ci95" in m for _, m in fds):
            lines.append("Its 95% interval is for the expected distance at these set sizes: half-samples without replacement, "
                         "whose spread equals the full-sample spread (finite-population correction), centred on their mean, "
                         "reversed percentiles. Extrapolated to infinite sets (2 FD_N - mean FD_N/2): "
                         + "; ".join(f"{n} {_fmt(m['infinite_n']['value'])} [{_fmt(m['infinite_n']['ci95'][0])}, "
                                     f"{_fmt(m['infinite_n']['ci95'][1])}]" for n, m in fds if "infinite_n" in m) + ".")
    kids = [(n, m) for n, m in metrics.items() if n.startswith("kid")]
    for name, m in kids:
        negative = m["value"] < 0
        lines.append(f"{name} is the unbiased MMD^2 estimate (cubic polynomial kernel, Bińkowski et al. 2018) x{m.get('scale', 1):g}. "
                     "It averages 0 when both sets come from one distribution, so it can be negative"
                     + (" (as here)" if negative else "") + ": a negative value means no difference detectable at this "
                     "sample size, not a synthetic set closer to the real one than real data.")
    if any(n.startswith("msssim") for n in metrics):
        lines.append("MS-SSIM diversity: mean MS-SSIM (images on [0, 1], data_range 1) of random pairs within a set; "
                     "the real-set value is the target.")
    reference = report.get("reference") or {}
    if "metrics" in reference:
        n = reference["n"]
        lines.append(f"Real vs real: {REFERENCE_WHAT} ({n['held_out']} held-out images, `{reference['holdout']['dir']}`, "
                     f"against the {n['real']} real images; the model: {n['synthetic']} synthetic images). A model is as close "
                     "to the real set as new patients are where its interval meets the real-vs-real one. Ratio = model / "
                     "real vs real for the Fréchet distances and KID: about 1 (within the intervals) is what a perfect model scores"
                     + (f"; the model's value in it is on {n['held_out']} random synthetic images (column `model, "
                        f"{n['held_out']} images`), so that both sides have the same sizes" if "model_matched" in reference else "")
                     + ". A KID ratio is given only when the real-vs-real KID's interval lies above 0 (otherwise it is noise around 0).")
    elif "skipped" in reference:
        lines.append(f"Real vs real: {reference['skipped']}.")
    return lines


def report_markdown(report: dict) -> str:
    r = report["recipe"]
    reference = report.get("reference") or {}
    lines = ["# medgen evaluation report", "",
             f"Real: `{r['inputs']['real']['dir']}` ({r['n_real']} images, shape {r['inputs']['real']['shape']}); "
             f"synthetic: `{r['inputs']['fake']['dir']}` ({r['n_fake']} images, shape {r['inputs']['fake']['shape']})"
             + (" - different sizes: the feature extractor resized both." if r['inputs']['real']['shape'] != r['inputs']['fake']['shape'] else "."), ""]
    cells = reference_cells(report["metrics"], reference)
    if "metrics" in reference:
        k = reference["n"]["held_out"]
        matched = [f"model, {k} images"] if "model_matched" in reference else []
        header = ["metric", "model", "95% CI", *matched, "real vs real", "95% CI", "ratio", "better"]
        body = [[c["metric"], c["value"], c["ci"] or "-", *([c["matched"]] if matched else []), c["reference"],
                 c["reference_ci"] or "-", c["ratio"], c["better"]] for c in cells]
    else:
        header = ["metric", "value", "95% CI", "better"]
        body = [[c["metric"], c["value"], c["ci"] or "-", c["better"]] for c in cells]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in body)]
    lines += [""] + [line for text in _explanations(report) for line in (text, "")]
    if "utility" in report:
        lines += utility_markdown(report["utility"])
    lines += ["## Recipe", ""]
    for key in ("features", "features_2.5d"):
        if key in r:
            lines.append(f"- **{key}**: " + ", ".join(f"{k}={v}" for k, v in r[key].items()))
    for key in ("prdc", "kid", "msssim"):
        if key in r:
            lines.append(f"- **{key}**: " + ", ".join(f"{k}={v}" for k, v in r[key].items()))
    lines.append(f"- intervals: {r['bootstrap']} replicates, seed {r['seed']}, device {r['device']}"
                 + "".join(f"; {k}: {v}" for k, v in r.get("intervals", {}).items()))
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


DIRECTION = {"lower": "↓ lower is better", "higher": "↑ higher is better", "~1": "best at 1 (dotted)",
             "closer to real": "best at the real set's (dashed)"}
UNIT_RANGE = ("precision", "recall", "coverage")  # metrics on [0, 1]: drawn on that whole axis


def _point(ax, x: float, entry: dict | None, color: str) -> bool:
    """One value with its 95% interval as an error bar, its number beside it; "not computed"
    where it has none (NaN included). Returns whether a value was drawn."""
    value = None if entry is None else entry.get("value")
    if value is None or not math.isfinite(value):
        ax.text(x, 0.5, "not\ncomputed", transform=ax.get_xaxis_transform(), ha="center", va="center", fontsize=8, color="0.4")
        return False
    ci = entry.get("ci95")
    err = [[max(0.0, value - ci[0])], [max(0.0, ci[1] - value)]] if ci and all(c is not None and math.isfinite(c) for c in ci) else None
    ax.errorbar([x], [value], yerr=err, fmt="o", ms=7, capsize=5, color=color)
    ax.annotate(_fmt(value), (x, value), xytext=(7, 0), textcoords="offset points", va="center", fontsize=8)
    return True


def metrics_figure(report: dict):
    """metrics.png as a matplotlib Figure: one panel per metric row (the 2.5D planes apart, the
    real set's MS-SSIM as the target line of the synthetic one), the model beside real vs real
    (and the model on as many images as the reference when there were fewer held-out images),
    95% intervals as error bars, the better direction under each name."""
    from medgen.figures import agg_figure

    reference = report.get("reference") or {}
    tables = {"model": report["metrics"], **({"matched": reference["model_matched"]} if "model_matched" in reference else {}),
              **({"reference": reference["metrics"]} if "metrics" in reference else {})}
    by_key = {name: {key: m for key, _, m in _rows(t)} for name, t in tables.items()}
    n = reference.get("n", {})
    names = {"model": f"model\n{report['recipe']['n_fake']} images" if "matched" in tables else "model",
             "matched": f"model\n{n.get('held_out')} images", "reference": "real\nvs real"}
    colors = {"model": "tab:blue", "matched": "tab:cyan", "reference": "0.35"}
    rows = [row for row in _rows(report["metrics"]) if row[0] != "msssim_real"]
    ncols = max(1, min(4, len(rows)))
    nrows = max(1, math.ceil(len(rows) / ncols))
    fig = agg_figure(figsize=((1.9 + 0.55 * len(tables)) * ncols, 2.9 * nrows + 0.7))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(rows):]:
        fig.delaxes(ax)
    for ax, (key, label, _) in zip(axes.flat, rows):
        shown = [t for t in tables if t != "matched" or key in by_key[t]]  # the model on fewer images: FD, KID, PRDC
        drawn = [_point(ax, x, by_key[name].get(key), colors[name]) for x, name in enumerate(shown)]
        ax.set_xticks(range(len(shown)), [names[t] for t in shown], fontsize=8)
        ax.set_xlim(-0.6, len(shown) - 0.2)
        ax.margins(y=0.12)
        ax.set_title(f"{label}\n{DIRECTION[_better(key)]}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        if key in UNIT_RANGE:
            ax.set_ylim(-0.05, 1.08)
        elif key == "density":
            ax.axhline(1, color="0.5", ls=":", lw=1)
        elif _better(key) == "lower":
            ax.axhline(0, color="0.75", lw=0.8, zorder=0)
        if key == "msssim_fake" and "msssim_real" in report["metrics"]:
            target = report["metrics"]["msssim_real"]["value"]
            ax.axhline(target, color="tab:red", ls="--", lw=1)
            ax.text(0.02, target, "real set", transform=ax.get_yaxis_transform(), va="bottom", fontsize=7, color="tab:red")
            lo, hi = ax.get_ylim()  # the target inside the panel, not on its edge
            lo, hi = min(lo, target), max(hi, target)
            ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        if key in reference.get("ratio", {}):
            ratio = reference["ratio"][key]
            ax.text(0.98, 0.98, f"ratio {ratio:.3g}" if ratio is not None else "no ratio:\nreal vs real ~ 0", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8, bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"})
        if not any(drawn):
            ax.set_yticks([])
    if "metrics" in reference:
        top = (f"model: {report['recipe']['n_fake']} synthetic vs {report['recipe']['n_real']} real images; real vs real: "
               f"{n['held_out']} held-out vs the same {n['real']}; bars: 95% intervals; ratio = model / real vs real")
    else:
        top = (f"model: {report['recipe']['n_fake']} synthetic vs {report['recipe']['n_real']} real images, 95% intervals; "
               "no real-vs-real reference (no held-out images: --holdout)")
    fig.suptitle(top, fontsize=9)
    fig.tight_layout()
    return fig


SHOWN = {2: 8, 3: 4}  # real and synthetic images (volumes, three planes each) side by side in samples.png, by spatial dims


def samples_figure(real: torch.Tensor, fake: torch.Tensor) -> "Figure":
    """samples.png: the first real images (N, C, *S) in [-1, 1] in a row labelled "real", as many
    synthetic ones under them; volumes as their three radiological mid-planes
    (`medgen.train.preview.grid_figure`, drawn as the training previews are)."""
    n = min(SHOWN[real.ndim - 2], len(real), len(fake))
    return grid_figure(torch.cat([real[:n], fake[:n]]), ncol=n, row_labels=["real", "synthetic"])


def write_figures(report: dict, real: torch.Tensor, fake: torch.Tensor, folder: Path) -> None:
    if report["metrics"]:
        metrics_figure(report).savefig(folder / "metrics.png", dpi=110)
    (folder / "samples.png").write_bytes(figure_png(samples_figure(real, fake)))


def write_report(report: dict, real: torch.Tensor, fake: torch.Tensor, out: Path, overwrite: bool = False) -> Path:
    """report.json, report.md, metrics.png, samples.png; the folder appears complete or not at all."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", report_markdown(report))
        write_figures(report, real, fake, tmp)
    return out
