"""`evaluate`: real vs synthetic folders -> metrics with 95% intervals, recipe, report folder.

2D images: FID, KID, precision/recall (k=3), density/coverage (k=5) on features of one 2D
extractor; MS-SSIM diversity on the pixels.
3D volumes: 2.5D FID (every slice along each of the three axes through the 2D extractor, one
FID per plane and their mean, as MAISI, Guo et al. 2025), and volume-level FID, KID, PR, DC on
a 3D extractor; MS-SSIM diversity on the volumes.

Report keys name the feature space: `fid`/`kid` on Inception features only, `fd_<extractor>`/
`kid_<extractor>` on any other (`fd_pca`, `fd_medicalnet`, ...; see `metric_keys`). KID is
reported x10^3. Intervals: `medgen.metrics.bootstrap`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from medgen.data import ImageSet
from medgen.errors import DataError
from medgen.io import atomic_dir, atomic_write_json, atomic_write_text
from medgen.metrics import features as F
from medgen.metrics.bootstrap import (HALF_SAMPLE_METHOD, bootstrap_mean, fd_infinite_n, half_sample_interval, half_sample_two_sample,
                                      half_samples)
from medgen.metrics.fid import frechet_distance
from medgen.metrics.kid import kernel_inception_distance, kid_bootstrap
from medgen.metrics.msssim import msssim_diversity
from medgen.metrics.prdc import prdc_indicators
from medgen.versions import software_versions

log = logging.getLogger(__name__)

ALL_METRICS = ("fid", "kid", "prdc", "msssim")
K_PR, K_DC = 3, 5  # Kynkäänniemi et al. 2019; Naeem et al. 2020
PACKAGES = ("scipy", "monai", "clean-fid", "torchvision", "safetensors")  # in report.json "versions", with medgen.versions.CORE


# ----------------------------------------------------------------------------- inputs
READ_BATCH = {2: 64, 3: 4}  # images (volumes) read at a time: the sets are streamed, never loaded whole


def open_set(path, what: str) -> tuple[ImageSet, dict]:
    """The set, read in batches (`medgen.data.ImageSet`), and a summary (dir, n, shape, source dtypes).

    `path` may also be images already in memory, (N, C, *S) in [-1, 1] (the release evaluates
    the preprocessed sets it audits): no samples, so no feature cache."""
    from medgen.data import scan_dataset
    from medgen.data.readers import load

    if isinstance(path, torch.Tensor):
        if path.shape[0] < 2:
            raise DataError(f"{what} set: {path.shape[0]} image(s); the metrics need at least 2")
        return ImageSet(path), {"dir": None, "n": int(path.shape[0]), "shape": list(path.shape[1:]), "source_dtype": ["in memory"]}
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


def fid_2p5d(ex, real: ImageSet, fake: ImageSet, n_boot: int, seed: int, slice_step: int, use_cache: bool, device) -> dict:
    """Per-plane FD over all slices (every `slice_step`-th) and their mean; the interval comes
    from half-samples of whole volumes (slices of one volume are not independent)."""
    views = {plane: functools.partial(F.volume_slices, axis=axis, step=slice_step) for plane, axis in F.PLANES.items()}
    if isinstance(ex, F.PCAExtractor):  # one basis for all planes, fitted on the real slices
        ex.fit_batches([_stream(real, v) for v in views.values()], [_viewed_shape(real, v)[2:] for v in views.values()])
    feats = {}
    for plane, view in views.items():
        r = _features(ex, real, f"2.5d:{plane}:{slice_step}", use_cache, f"real {plane} slices", view)
        f = _features(ex, fake, f"2.5d:{plane}:{slice_step}", use_cache, f"synthetic {plane} slices", view)
        # (N, slices, D), kept in float32: frechet_distance casts what it gets to float64 (same numbers, half the memory)
        feats[plane] = (r.reshape(len(real), -1, r.shape[1]).to(device), f.reshape(len(fake), -1, f.shape[1]).to(device))
    point = {p: frechet_distance(r.flatten(0, 1), f.flatten(0, 1)) for p, (r, f) in feats.items()}
    reps: dict[str, list[float]] = {p: [] for p in feats}
    for ir, jf in half_samples(len(real), len(fake), n_boot, seed):  # one volume per half at least: many slices
        for p, (r, f) in feats.items():
            reps[p].append(frechet_distance(r[ir.to(device)].flatten(0, 1), f[jf.to(device)].flatten(0, 1)))
    out = {p: _fd_value(point[p], half_sample_interval(point[p], reps[p]) if n_boot else None) for p in feats}
    mean = float(np.mean(list(point.values())))
    out["mean"] = _fd_value(mean, half_sample_interval(mean, np.mean([reps[p] for p in feats], axis=0)) if n_boot else None)
    out["n_slices"] = {p: int(r.shape[1]) for p, (r, _) in feats.items()}
    return out


# ----------------------------------------------------------------------------- evaluate
def evaluate(
    real,
    fake,
    out=None,
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
) -> dict:
    """Evaluate a synthetic folder against a real one; write REPORT_DIR when `out` is given.

    Returns the report dict: {"metrics", "recipe", "versions", ...}. See the module docstring.
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

    results: dict[str, Any] = {}
    recipe: dict[str, Any] = {"n_real": real_info["n"], "n_fake": fake_info["n"], "spatial_dims": dims, "bootstrap": bootstrap,
                              "seed": seed, "device": str(device), "inputs": {"real": real_info, "fake": fake_info}}
    feature_based = [m for m in metrics if m != "msssim"]
    if feature_based:
        if dims == 3 and "fid" in metrics:
            ex2 = choose_extractor(features, 2, weights, device)
            key = metric_keys(ex2.recipe["extractor"])["fid"] + "_2.5d"
            results[key] = fid_2p5d(ex2, real_set, fake_set, bootstrap, seed, slice_step, use_cache, device)
            recipe["features_2.5d"] = {**ex2.recipe, "slice_step": slice_step, "planes": list(F.PLANES)}
        ex = choose_extractor(features if dims == 2 else features_3d, dims, weights if dims == 2 else None, device)
        if isinstance(ex, F.PCAExtractor):
            ex.fit_batches([_stream(real_set)], [real_set.shape[1:]])
            notes.append("features: in-domain PCA of the real set, so the distances are fd_pca/kid_pca, not FID/KID; "
                         "they compare models on this real set only, not across datasets or papers")
        real_f = _features(ex, real_set, f"{dims}d", use_cache, "real")
        fake_f = _features(ex, fake_set, f"{dims}d", use_cache, "synthetic")
        keys = metric_keys(ex.recipe["extractor"])
        results.update(feature_metrics(real_f, fake_f, feature_based, bootstrap, seed, device, keys))
        recipe["features"] = ex.recipe
        recipe["metric_keys"] = keys
        recipe["prdc"] = {"k_precision_recall": K_PR, "k_density_coverage": K_DC, "distance": "euclidean, float64"}
        if "kid" in metrics:
            recipe["kid"] = {"kernel": "(x.y/d + 1)^3", "estimator": "unbiased MMD^2", "scale": KID_SCALE, "num_subsets": 100,
                             "subset_size": results[keys["kid"]]["subset_size"]}
    if "msssim" in metrics:
        for name, x in (("fake", fake_set), ("real", real_set)):
            d = msssim_diversity(x, n_pairs=msssim_pairs, seed=seed, device=device)
            ci = bootstrap_mean(d["per_pair"], bootstrap, seed) if bootstrap else None
            results[f"msssim_{name}"] = _value(d["msssim"], ci, pairs=int(d["per_pair"].numel()))
        recipe["msssim"] = {**d["settings"], "pairs": "random distinct pairs within a set"}
    if bootstrap:
        recipe["intervals"] = {"fd": HALF_SAMPLE_METHOD, "kid": "two-sample bootstrap, distinct-pair U-statistic",
                               "prdc, msssim": "percentile bootstrap of per-sample terms"}
    report = {"metrics": results, "recipe": recipe, "versions": software_versions(*PACKAGES), "notes": notes,
              "seconds": round(time.perf_counter() - start, 2)}
    if out is not None:
        shown = range(min(SHOWN, len(real_set), len(fake_set)))  # samples.png: the first few of each set
        write_report(report, real_set.take(shown), fake_set.take(shown), Path(out), overwrite)
    return report


# ----------------------------------------------------------------------------- report folder
def _lower_is_better(name: str) -> bool:
    return name.startswith(("fid", "fd_", "kid"))


def _rows(metrics: dict) -> list[tuple[str, dict]]:
    """(label, entry) per table row: 2.5D planes unfolded, scaled values labelled with their scale."""
    rows = []
    for name, m in metrics.items():
        if name.endswith("_2.5d"):
            rows += [(f"{name}/{p}", v) for p, v in m.items() if isinstance(v, dict) and "value" in v]
        else:
            rows.append((f"{name} (x{m['scale']:g})" if "scale" in m else name, m))
    return rows


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def metric_cells(metrics: dict) -> list[tuple[str, str, str | None]]:
    """(label, value, "[lo, hi]" or None) per row of `_rows`: one formatting for report.md, the
    CLI summary, the demo's summary table and the data card."""
    out = []
    for name, m in _rows(metrics):
        ci = m.get("ci95")
        out.append((name, _fmt(m["value"]), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else None))
    return out


def _explanations(report: dict) -> list[str]:
    """What the distances in this report are and how to read them (below the table)."""
    metrics, lines = report["metrics"], []
    fds = [(n, m) for n, m in _rows(metrics) if n.startswith(("fid", "fd_"))]
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
    return lines


def report_markdown(report: dict) -> str:
    r = report["recipe"]
    lines = ["# medgen evaluation report", "",
             f"Real: `{r['inputs']['real']['dir']}` ({r['n_real']} images, shape {r['inputs']['real']['shape']}); "
             f"synthetic: `{r['inputs']['fake']['dir']}` ({r['n_fake']} images, shape {r['inputs']['fake']['shape']})"
             + (" - different sizes: the feature extractor resized both." if r['inputs']['real']['shape'] != r['inputs']['fake']['shape'] else "."), "",
             "| metric | value | 95% CI | better |", "|---|---|---|---|"]
    for name, value, ci in metric_cells(report["metrics"]):
        better = "lower" if _lower_is_better(name) else ("closer to real" if name.startswith("msssim") else ("~1" if name == "density" else "higher"))
        lines.append(f"| {name} | {value} | {ci or '-'} | {better} |")
    lines += [""] + [line for text in _explanations(report) for line in (text, "")]
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


SHOWN = 8  # real and synthetic images side by side in samples.png


def _display(x: torch.Tensor) -> np.ndarray:
    """(C, *S) in [-1, 1] -> 2D array for display (first channel, middle slice of volumes)."""
    img = x[0]
    while img.ndim > 2:
        img = img[img.shape[0] // 2]
    return ((img.float().numpy() + 1) / 2).clip(0, 1)


def write_figures(report: dict, real: torch.Tensor, fake: torch.Tensor, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(report["metrics"])
    if rows:
        fig, axes = plt.subplots(1, len(rows), figsize=(1.9 * len(rows), 3.0), squeeze=False)
        for ax, (name, m) in zip(axes[0], rows):
            ci = m.get("ci95")
            err = None if not ci or any(c is None for c in ci) else [[max(0.0, m["value"] - ci[0])], [max(0.0, ci[1] - m["value"])]]
            ax.bar([0], [m["value"]], yerr=err, capsize=6, color="tab:red" if "real" in name else "tab:blue")
            ax.set_xticks([])
            ax.set_title(name, fontsize=8)
        fig.suptitle("metrics with 95% intervals", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=110)
        plt.close(fig)
    n = min(SHOWN, real.shape[0], fake.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.0), squeeze=False)
    for row, (name, x) in enumerate((("real", real), ("synthetic", fake))):
        for i in range(n):
            axes[row, i].imshow(_display(x[i]), cmap="gray", vmin=0, vmax=1)
            axes[row, i].axis("off")
        axes[row, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(folder / "samples.png", dpi=110)
    plt.close(fig)


def write_report(report: dict, real: torch.Tensor, fake: torch.Tensor, out: Path, overwrite: bool = False) -> Path:
    """report.json, report.md, metrics.png, samples.png; the folder appears complete or not at all."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", report_markdown(report))
        write_figures(report, real, fake, tmp)
    return out
