"""Utility of a synthetic set: does a classifier trained on it work on real images?

TSTR, train on synthetic and test on real (Esteban et al. 2017): a small MONAI ResNet learns the
synthetic set's labels and is tested on labelled real images the generative model never saw.
Beside it, the same recipe trained on as many real training images (TRTR: the reference a
synthetic set should reach) and, when asked, on both (mixed: those real images plus as many
synthetic ones, synthetic data used as augmentation). Fidelity metrics (FID, PRDC) do not answer
this: a set can look right and still miss what separates the classes (a conditional model that
ignores its label).

Numbers, per setting: AUROC (macro one-vs-rest over the test classes, the Mann-Whitney closed
form with average ranks for ties) and balanced accuracy (mean per-class recall of the argmax),
each the mean over the recipe's classifier seeds, with
- a 95% percentile interval over test images: a class-stratified bootstrap of the test set,
  every seed's predictions resampled together (the interval of the seed mean);
- the seeds' spread (standard deviation of the per-seed values);
- the paired difference to TRTR on the same resamples, with its interval.
The intervals cover test-set sampling only, not the choice of the training subset or of the
synthetic samples; the seed spread shows the classifier's own variance.

The recipe (`UTILITY_RECIPE`) is fixed and recorded in the report, so that numbers compare across
models evaluated against one test set. Each setting trains for the same number of steps on
class-balanced batches, on the same number of images (`n_train`: the smaller of the synthetic
and the real training sets, a seeded random subset of the larger). Images are held in memory
(the training subsets and the test set), preprocessed as `medgen eval` reads them.

`synthetic_utility` returns a JSON-able dict (or {"skipped": reason} for unlabelled or
single-class samples); `utility_rows` / `utility_markdown` / `utility_summary` format it for the
eval report, the CLI, the demo summary and the data card.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from medgen.data import ImageSet, Sample, content_sha256, scan_dataset
from medgen.errors import DataError
from medgen.metrics.bootstrap import percentile_interval
from medgen.progress import progress as progress_bar

UTILITY_RECIPE: dict[str, Any] = {
    "network": "monai.networks.nets.ResNet",
    "block": "basic",
    "layers": [1, 1, 1, 1],  # ResNet-10 ...
    "block_inplanes": [16, 32, 64, 128],  # ... at a quarter of its width: trains in seconds on a CPU
    "conv1_t_size": 7,
    "conv1_t_stride": 2,  # a 7-wide stride-2 stem conv then a max-pool, as torchvision's ResNet: /4 before the blocks
    "optimizer": "AdamW",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "steps": 100,
    "batch_size": 32,  # or n_train when smaller (a bigger batch of a few images only repeats them)
    "batches": "class-balanced: images drawn with replacement, each with probability 1 / its class count",
    "loss": "cross-entropy",
    "augmentation": "none (the comparison is of what each training set teaches, not of augmentations)",
    "seeds": [0, 1, 2],  # classifier seeds (initialisation and batches); the numbers are their mean
    "subset_seed": 0,  # the random subset of the larger training set
    "n_train": "min(n synthetic, n real training); mixed: that many of each",
    "bootstrap": 1000,  # class-stratified resamples of the test images
}

SETTINGS = {"tstr": "synthetic (TSTR)", "trtr": "real (TRTR)", "mixed": "real + synthetic"}
HOW_TO_LABEL = "sample a class-conditional model with `medgen sample --label all` (labels cycle over the samples)"


# ----------------------------------------------------------------------------- metrics
def auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUROC over the classes present in `labels`.

    scores (..., N, K) class probabilities, labels (..., N) ints; every leading index must hold
    the same classes (a stratified bootstrap does). AUROC_c = (R_c - n_c (n_c + 1) / 2) / (n_c
    (N - n_c)), R_c the sum of the ranks of class c's scores for c (Mann & Whitney 1947), ties
    at their average rank. Binary: both classes give the same value, the AUROC of p(1).
    """
    present = np.unique(labels.reshape(-1, labels.shape[-1])[0])
    n = labels.shape[-1]
    values = []
    for c in present:
        positive = labels == c
        n_c = positive.sum(-1)
        ranks = rankdata(scores[..., c], axis=-1)
        values.append(((ranks * positive).sum(-1) - n_c * (n_c + 1) / 2) / (n_c * (n - n_c)))
    return np.mean(values, axis=0)


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean over the classes present in `labels` of their recall, predictions the argmax;
    shapes as `auroc`."""
    predicted = scores.argmax(-1)
    present = np.unique(labels.reshape(-1, labels.shape[-1])[0])
    return np.mean([((predicted == c) & (labels == c)).sum(-1) / (labels == c).sum(-1) for c in present], axis=0)


METRIC_FUNCTIONS = {"auroc": auroc, "balanced_accuracy": balanced_accuracy}


def stratified_bootstrap(labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) test indices, each class resampled with replacement within itself, so every
    replicate holds the test set's class counts (AUROC needs both classes in each)."""
    rng = np.random.default_rng(seed)
    columns = [rng.choice(np.flatnonzero(labels == c), size=(n_boot, int((labels == c).sum())))
               for c in np.unique(labels)]
    return np.concatenate(columns, axis=1)


# ----------------------------------------------------------------------------- classifier
def build_classifier(spatial_dims: int, in_channels: int, num_classes: int, recipe: dict = UTILITY_RECIPE) -> torch.nn.Module:
    from monai.networks.nets import ResNet

    return ResNet(recipe["block"], list(recipe["layers"]), list(recipe["block_inplanes"]), spatial_dims=spatial_dims,
                  n_input_channels=in_channels, num_classes=num_classes, conv1_t_size=recipe["conv1_t_size"],
                  conv1_t_stride=recipe["conv1_t_stride"])


def train_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, device,
                     recipe: dict = UTILITY_RECIPE) -> torch.nn.Module:
    """The recipe's classifier fitted to images (N, C, *S) and labels (N,); deterministic for a
    seed on the CPU (torch's global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_classifier(x.ndim - 2, x.shape[1], num_classes, recipe).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    weights = 1.0 / torch.bincount(y, minlength=num_classes).double()[y]  # class-balanced batches
    g = torch.Generator().manual_seed(seed)
    batch = min(recipe["batch_size"], len(x))
    net.train()
    for _ in range(recipe["steps"]):
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx].to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: torch.nn.Module, x: torch.Tensor, device, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, K) as float64."""
    return torch.cat([net(x[i : i + batch_size].to(device)).softmax(-1).double().cpu()
                      for i in range(0, len(x), batch_size)]).numpy()


# ----------------------------------------------------------------------------- inputs
def _source_name(source) -> str:
    """The file that holds a set's labels (its manifest.csv), its folder, or the folder its samples share."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        return str(path / "manifest.csv" if path.is_dir() and (path / "manifest.csv").is_file() else path)
    paths = [str(s.path.parent) for s in source]
    return f"{os.path.commonpath(paths)} ({len(paths)} images)" if paths else "an empty set"


def _samples(source) -> list[Sample]:
    return scan_dataset(source) if isinstance(source, (str, Path)) else list(source)


def _require_labels(samples: list[Sample], source, what: str) -> None:
    """DataError naming the file when a real set is unlabelled or holds one class only."""
    name = _source_name(source)
    if any(s.label is None for s in samples):
        raise DataError(f"{name}: the {what} images have no labels; utility needs a manifest.csv with a `label` "
                        f"column (`path,label`) for the {what} set")
    if len({s.label for s in samples}) < 2:
        raise DataError(f"{name}: the {what} images all have label {samples[0].label_name}; utility needs at least two classes")


def skip_reason(samples: list[Sample], name: str) -> str | None:
    """Why a synthetic set (`samples`, read from `name`) cannot be scored: unlabelled or a single class; else None."""
    if any(s.label is None for s in samples):
        return f"utility needs labelled samples, but {name} has no labels (an unconditional model?); {HOW_TO_LABEL}"
    classes = {s.label for s in samples}
    if len(classes) < 2:
        return (f"utility needs samples of at least two classes, but every sample in {name} has label "
                f"{samples[0].label_name}; {HOW_TO_LABEL}")
    return None


def _without(train: list[Sample], test: list[Sample]) -> tuple[list[Sample], int]:
    """The training samples whose content is not among the test images (by sha256), and how many were dropped."""
    held_out = {content_sha256(s.path) for s in test}
    kept = [s for s in train if content_sha256(s.path) not in held_out]
    return kept, len(train) - len(kept)


def _subset(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:n]
    return [samples[i] for i in sorted(order.tolist())]


def _read(samples: list[Sample], data_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    images = ImageSet(samples, data_cfg)
    return images.take(range(len(images))), torch.tensor([s.label for s in images.samples])


def _class_counts(labels: torch.Tensor | np.ndarray) -> dict[str, int]:
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


# ----------------------------------------------------------------------------- utility
def _entry(per_seed: np.ndarray, replicates: np.ndarray) -> dict:
    """{"value", "ci95", "seeds", "seed_sd"} from per-seed values (S,) and bootstrap values (S, B)."""
    return {"value": float(per_seed.mean()), "ci95": list(percentile_interval(replicates.mean(0))),
            "seeds": [float(v) for v in per_seed], "seed_sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0}


def score_settings(probabilities: dict[str, list[np.ndarray]], labels: np.ndarray, n_boot: int, seed: int = 0) -> tuple[dict, dict]:
    """Per setting, each metric's entry (`_entry`) from its seeds' test probabilities (N, K);
    and per setting other than trtr, its difference to trtr on the same resamples."""
    idx = stratified_bootstrap(labels, n_boot, seed)  # (B, N)
    per_seed, boot = {}, {}
    for name, probs in probabilities.items():
        for metric, fn in METRIC_FUNCTIONS.items():
            per_seed[name, metric] = np.array([fn(p, labels) for p in probs])  # (S,)
            boot[name, metric] = np.stack([fn(p[idx], labels[idx]) for p in probs])  # (S, B)
    results = {name: {metric: _entry(per_seed[name, metric], boot[name, metric]) for metric in METRIC_FUNCTIONS}
               for name in probabilities}
    difference = {}
    if "trtr" in probabilities:
        for name in (n for n in probabilities if n != "trtr"):
            difference[name] = {}
            for metric in METRIC_FUNCTIONS:
                d = per_seed[name, metric] - per_seed["trtr", metric]
                lo, hi = _entry(d, boot[name, metric] - boot["trtr", metric])["ci95"]
                difference[name][metric] = {"value": float(d.mean()), "ci95": [lo, hi]}
    return results, difference


def synthetic_utility(synthetic, real_train, test, mixed: bool = False, data_cfg=None, device=None,
                      recipe: dict = UTILITY_RECIPE, seeds: Sequence[int] | None = None, progress: bool = True,
                      synthetic_cfg=None) -> dict:
    """TSTR against TRTR (and mixed) on the labelled `test` images: see the module docstring.

    `synthetic`, `real_train`, `test`: folders / manifest.csv paths, or lists of `medgen.data.Sample`.
    Returns a JSON-able dict; {"skipped": reason} when the synthetic set is unlabelled or of one
    class. Unlabelled or single-class real sets are a DataError naming the file. Real training
    images that are also test images (same content) are left out of training. `synthetic_cfg`:
    how to read the synthetic files when not as the real ones (`data_cfg`): a release's files in
    their own units (`medgen.sample.formats.SampleFormat.reading_config`).
    """
    start = time.perf_counter()
    syn = _samples(synthetic)
    reason = skip_reason(syn, _source_name(synthetic))
    if reason:
        return {"skipped": reason}
    real, held = _samples(real_train), _samples(test)
    _require_labels(real, real_train, "real training")
    _require_labels(held, test, "held-out (test)")
    real, overlap = _without(real, held)
    if len({s.label for s in real}) < 2:
        raise DataError(f"{_source_name(real_train)}: after leaving out the test images, fewer than two classes remain to train on")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seeds = list(recipe["seeds"] if seeds is None else seeds)
    n = min(len(syn), len(real))
    x_syn, y_syn = _read(_subset(syn, n, recipe["subset_seed"]), data_cfg if synthetic_cfg is None else synthetic_cfg)
    x_real, y_real = _read(_subset(real, n, recipe["subset_seed"]), data_cfg)
    x_test, y_test = _read(held, data_cfg)
    if not x_syn.shape[1:] == x_real.shape[1:] == x_test.shape[1:]:
        raise DataError(f"utility trains on one image shape, but synthetic images are {list(x_syn.shape[1:])}, real training "
                        f"images {list(x_real.shape[1:])} and test images {list(x_test.shape[1:])}; sample at the real size")
    train_sets = {"tstr": (x_syn, y_syn), "trtr": (x_real, y_real)}
    if mixed:
        train_sets["mixed"] = (torch.cat([x_real, x_syn]), torch.cat([y_real, y_syn]))
    num_classes = int(max(y_syn.max(), y_real.max(), y_test.max())) + 1
    bar = progress_bar(total=len(train_sets) * len(seeds), desc="utility classifiers", unit="classifier", enabled=progress)
    probabilities: dict[str, list[np.ndarray]] = {}
    for name, (x, y) in train_sets.items():
        for seed in seeds:
            probabilities.setdefault(name, []).append(predict(train_classifier(x, y, num_classes, seed, device, recipe), x_test, device))
            bar.update(1)
    bar.close()
    results, difference = score_settings(probabilities, y_test.numpy(), recipe["bootstrap"], seed=0)
    for name, (x, y) in train_sets.items():
        results[name] = {"n_train": len(x), "train_classes": _class_counts(y), **results[name]}
    notes = [f"{overlap} real training image(s) were also test images and were left out of training"] if overlap else []
    names = {str(s.label): s.label_name for s in held + real}

    def summary(source, samples: list[Sample]) -> dict:
        return {"source": _source_name(source), "n": len(samples), "classes": _class_counts([s.label for s in samples])}

    return {"settings": results, "difference_to_trtr": difference,
            "test": {**summary(test, held), "label_names": names},
            "inputs": {"synthetic": summary(synthetic, syn), "real_train": summary(real_train, real)},
            "recipe": {**recipe, "seeds": seeds, "device": str(device), "image_shape": list(x_test.shape[1:])},
            "notes": notes, "seconds": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------- formatting
def _cell(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def utility_rows(result: dict) -> list[str]:
    """A markdown table: one row per setting, then each setting's difference to TRTR."""
    rows = ["| trained on | n train | AUROC [95% CI] | balanced accuracy [95% CI] | seed sd (AUROC) |", "|---|---|---|---|---|"]
    for name, r in result["settings"].items():
        spread = f"{r['auroc']['seed_sd']:.3f}" if len(r["auroc"]["seeds"]) > 1 else "- (one seed)"
        rows.append(f"| {SETTINGS[name]} | {r['n_train']} | {_cell(r['auroc'])} | {_cell(r['balanced_accuracy'])} | {spread} |")
    for name, d in result["difference_to_trtr"].items():
        rows.append(f"| {SETTINGS[name]} - real | | {_cell(d['auroc'])} | {_cell(d['balanced_accuracy'])} | |")
    return rows


def utility_markdown(result: dict) -> list[str]:
    """The eval report's utility section (lines, no trailing newline)."""
    lines = ["## Utility: train on synthetic, test on real", ""]
    if "skipped" in result:
        return lines + [f"Skipped: {result['skipped']}.", ""]
    r, t = result["recipe"], result["test"]
    lines += utility_rows(result) + [
        "",
        f"Tested on {t['n']} labelled real images the model never saw (`{t['source']}`, classes "
        + ", ".join(f"{k}: {v}" for k, v in t["classes"].items()) + "). Each value is the mean over "
        f"{len(r['seeds'])} classifier seed(s); the 95% interval is a class-stratified bootstrap over the test images "
        f"({r['bootstrap']} resamples), so it does not cover the choice of training images; the seed sd is the classifier's "
        "own spread. A synthetic set is as useful as real data for this task when its row matches the real one "
        "(the difference's interval holds 0).",
        "",
        f"Recipe: {r['network']} ({r['block']} blocks {r['layers']}, widths {r['block_inplanes']}), {r['optimizer']} lr {r['lr']:g}, "
        f"weight decay {r['weight_decay']:g}, {r['steps']} steps of {r['batch_size']} ({r['batches']}), augmentation {r['augmentation']}, "
        f"seeds {r['seeds']}, device {r['device']}.",
        "",
    ]
    return lines + [f"- {n}" for n in result["notes"]] + ([""] if result["notes"] else [])


def utility_summary(result: dict) -> str:
    """One line: each setting's AUROC with its interval (or why utility was skipped)."""
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    cells = (f"{name.upper()} AUROC {_cell(r['auroc'])}" for name, r in result["settings"].items())
    return "; ".join(cells) + f" (n_test={result['test']['n']})"
