"""Audit figures (similarity histogram, most similar pairs) and the human-readable report.md."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from medgen.io import atomic_write_text

if TYPE_CHECKING:
    from medgen.privacy.audit import AuditResult

HISTOGRAM = "similarity_histogram.png"
TOP_PAIRS = "top_pairs.png"


def _display(img: torch.Tensor) -> np.ndarray:
    """(C, *S) in [-1, 1] -> 2D array in [0, 1]: channel mean, middle slice of the first axis for 3D."""
    x = img.float().mean(0)
    while x.ndim > 2:
        x = x[x.shape[0] // 2]
    return ((x.clamp(-1, 1) + 1) / 2).numpy()


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def write_figures(result: "AuditResult", train: torch.Tensor, synthetic: torch.Tensor, train_names: Sequence[str], synth_names: Sequence[str], out: Path, top_k: int = 8) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = result.report
    tau = rep["threshold"]
    sim = rep["similarity"].capitalize()

    # Histogram: train->holdout best similarity (what a different patient scores) against
    # synthetic->train best similarity; copies sit right of tau.
    fig, ax = plt.subplots(figsize=(6.4, 4))
    a, b = result.train_holdout_best.numpy(), result.synthetic_best.numpy()
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 40)
    ax.hist(a, bins=bins, alpha=0.55, density=True, label=f"train -> held-out (n={len(a)})")
    ax.hist(b, bins=bins, alpha=0.55, density=True, label=f"synthetic -> train (n={len(b)})")
    ax.axvline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:.4f} (p{rep['percentile']:g})")
    ax.set_xlabel(f"best {sim} similarity ({rep['detector']['detector']} detector)")
    ax.set_ylabel("density")
    ax.set_title(f"{rep['n_copies_pct']:.2f}% of synthetic samples above tau: {rep['verdict']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / HISTOGRAM, dpi=110)
    plt.close(fig)

    # Side-by-side panels of the k most similar (synthetic, nearest training) pairs.
    k = min(top_k, len(result.synthetic_best))
    order = torch.argsort(result.synthetic_best, descending=True)[:k]
    fig, axes = plt.subplots(2, k, figsize=(1.9 * k, 4.3), squeeze=False)
    for col, i in enumerate(order.tolist()):
        j = int(result.synthetic_nearest[i])
        flagged = bool(result.is_copy[i])
        for row, (img, name) in enumerate(((synthetic[i], synth_names[i]), (train[j], train_names[j]))):
            ax = axes[row, col]
            ax.imshow(_display(img), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(_short(name, 22), fontsize=6)
            if row == 0:
                ax.set_title(f"{float(result.synthetic_best[i]):.4f}" + (" COPY" if flagged else ""), fontsize=8, color="red" if flagged else "black")
                for spine in ax.spines.values():
                    spine.set_edgecolor("red" if flagged else "black")
                    spine.set_linewidth(2 if flagged else 0.5)
    axes[0, 0].set_ylabel("synthetic", fontsize=8)
    axes[1, 0].set_ylabel("nearest train", fontsize=8)
    fig.suptitle(f"{k} most similar synthetic/training pairs ({sim}; tau = {tau:.4f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / TOP_PAIRS, dpi=110)
    plt.close(fig)
    return {"histogram": HISTOGRAM, "top_pairs": TOP_PAIRS}


def write_markdown(report: dict[str, Any], path: Path) -> None:
    r = report
    det = r["detector"]
    det_line = {"ssl": "self-supervised contrastive encoder trained on the training set (NT-Xent, Dar et al. 2024)", "pixel": f"pixel correlation on images downsampled to {det.get('size')} px (baseline)"}.get(det["detector"], f"evaluation features `{det.get('features')}`")
    verdict = "PASS" if r["verdict"] == "pass" else "FAIL"
    ct = "not computed" if r["c_t"] is None else f"{r['c_t']:.3f}"
    lines = [
        "# Memorization audit",
        "",
        f"**Verdict: {verdict}** - {r['n_copies']} of {r['n_synthetic']} synthetic samples ({r['n_copies_pct']:.2f}%) are flagged as copies of training images; the allowed rate is {100 * r['max_copy_rate']:.2f}%.",
        "",
        "## How copies are detected",
        "",
        f"- Detector: {det_line}.",
        f"- Similarity: {'Pearson correlation' if r['similarity'] == 'pearson' else 'cosine similarity'} between embeddings.",
        f"- Threshold tau = **{r['threshold']:.4f}**: the {r['percentile']:g}th percentile of each training image's best similarity with the {r['n_holdout']} held-out images (patients not used for training). A synthetic sample is a copy when its best similarity with the {r['n_train']} training images exceeds tau.",
        f"- By construction about {100 - r['percentile']:g}% of training images already have a held-out look-alike above tau, so even a model that memorizes nothing is expected to have roughly **{r['expected_false_copy_pct']:.1f}%** of its samples flagged (for these set sizes, assuming exchangeable pairs). Inspect the flagged pairs (`top_pairs.png`, `pairs.csv`) before concluding; raise `--percentile` for a stricter detector.",
        "",
        "## Results",
        "",
        "| measure | value | reading |",
        "|---|---|---|",
        f"| copies among synthetic samples (n_copies_pct) | {r['n_copies_pct']:.2f}% | share of synthetic samples above tau |",
        f"| memorized training images (n_mem_pct) | {r['n_mem_pct']:.2f}% | share of training images with at least one flagged copy |",
        f"| best similarity, train -> held-out (median / p95) | {r['train_holdout_best']['median']:.4f} / {r['train_holdout_best']['p95']:.4f} | genuine look-alikes |",
        f"| best similarity, synthetic -> train (median / max) | {r['synthetic_train_best']['median']:.4f} / {r['synthetic_train_best']['max']:.4f} | |",
        f"| AuthPct (dgm-eval) | {r['authpct']:.2f}% | share of samples farther from their nearest training image than that image's own nearest training neighbour; low = copying |",
        f"| C_T (Meehan et al. 2020) | {ct} | Z-score; strongly negative (< -3) = data copying, positive = underfitting |",
        f"| relative l2 < {r['carlini']['delta']:.3g} (Carlini et al. 2023, pixel space) | {r['carlini']['extracted_pct']:.2f}% ({r['carlini']['n_extracted']}) | median ratio {r['carlini']['median_ratio']:.3f}; n = {r['carlini']['n']}, alpha = {r['carlini']['alpha']} |",
        "",
        f"AuthPct and C_T are computed with Euclidean distances in: {r.get('reference_space', 'the detector embedding')}.",
        "",
        "## Figures",
        "",
        "![similarity histogram](similarity_histogram.png)",
        "",
        "![most similar pairs](top_pairs.png)",
        "",
        "`pairs.csv` lists every synthetic sample with its nearest training image, the similarity and the copy flag.",
    ]
    if r.get("filter_out"):
        f = r["filter_out"]
        lines += ["", "## Filtered set", "", f"`{f['path']}` holds copies of the {f['kept']} synthetic files not flagged ({f['removed']} removed). The input folder is unchanged."]
    if r.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r["warnings"]]
    lines += ["", "## Inputs", ""] + [f"- {k}: `{v}`" for k, v in r.get("inputs", {}).items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
