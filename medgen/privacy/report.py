"""Audit figures (similarity histogram, most similar pairs) and the human-readable report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medgen.io import atomic_write_text
from medgen.privacy.verdict import AuditResult

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


def write_figures(result: AuditResult, train: torch.Tensor, synthetic: torch.Tensor, train_names: Sequence[str], synth_names: Sequence[str], out: Path, top_k: int = 8) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep, sc = result.report, result.scores
    fits = result.audit.fits if result.audit is not None else []

    # Histograms, one panel per detector: train->held-out best similarity (what a different patient
    # scores) against synthetic->train best similarity of the anatomical samples; copies sit right of tau.
    k = max(1, len(fits))
    fig, axes = plt.subplots(1, k, figsize=(5.2 * k, 3.8), squeeze=False)
    keep = sc.anatomical
    for j, f in enumerate(fits):
        ax = axes[0, j]
        a, b = f.train_holdout_best.numpy(), sc.similarity[keep, j].numpy()
        both = np.concatenate([a, b]) if b.size else a
        lo, hi = float(both.min()), float(both.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 40)
        ax.hist(a, bins=bins, alpha=0.55, density=True, label=f"train -> held-out (n={len(a)})")
        if b.size:
            ax.hist(b, bins=bins, alpha=0.55, density=True, label=f"synthetic -> train (n={len(b)})")
        ax.axvline(f.threshold, color="k", ls="--", lw=1, label=f"tau = {f.threshold:.4f} (p{rep['percentile']:g})")
        ax.set_xlabel(f"best {rep['similarity']} similarity, {f.name} detector")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.suptitle(f"{rep['n_copies_pct']:.2f}% of synthetic samples above tau (null {rep['test']['null_rate_pct']:.1f}%, p = {rep['test']['p_value']:.3g}): {rep['verdict']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / HISTOGRAM, dpi=110)
    plt.close(fig)

    # Side-by-side panels of the k samples closest to a copy (largest margin above a detector's tau).
    n = min(top_k, len(sc))
    order = torch.argsort(sc.margin.max(1).values, descending=True)[:n]
    nearest, best = sc.nearest_train, sc.best
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.3), squeeze=False)
    for col, i in enumerate(order.tolist()):
        j = int(nearest[i])
        flagged = bool(sc.is_copy[i])
        label = sc.detectors[int(sc.deciding[i])]
        for row, (img, name) in enumerate(((synthetic[i], synth_names[i]), (train[j], train_names[j]))):
            ax = axes[row, col]
            ax.imshow(_display(img), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(_short(name, 22), fontsize=6)
            if row == 0:
                ax.set_title(f"{float(best[i]):.4f} {label}" + (" COPY" if flagged else ""), fontsize=7, color="red" if flagged else "black")
                for spine in ax.spines.values():
                    spine.set_edgecolor("red" if flagged else "black")
                    spine.set_linewidth(2 if flagged else 0.5)
    axes[0, 0].set_ylabel("synthetic", fontsize=8)
    axes[1, 0].set_ylabel("nearest train", fontsize=8)
    fig.suptitle(f"{n} synthetic samples closest to a copy, with their nearest training image", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / TOP_PAIRS, dpi=110)
    plt.close(fig)
    return {"histogram": HISTOGRAM, "top_pairs": TOP_PAIRS}


VERDICT_TEXT = {
    "pass": "synthetic samples do not exceed tau more often than genuinely new images of unseen patients do, and the audit's checks show it could have seen copies",
    "fail": "synthetic samples exceed tau significantly more often than genuinely new images of unseen patients do: the model reproduces training patients",
    "inconclusive": "the audit could not have seen copies reliably, so it neither passes nor fails the set; fix what the reasons below name and audit again",
}


def _detector_line(name: str, recipe: dict[str, Any]) -> str:
    if name == "ssl":
        enc = recipe.get("encoder", {})
        return f"self-supervised contrastive encoder trained on the training set (NT-Xent, Dar et al. 2024), input {recipe.get('image_size')} px, {enc.get('embed_dim')}-d embedding"
    if name == "pixel-rank":
        return f"Spearman rank correlation of the images downsampled to {recipe.get('size')} px (unchanged by monotone intensity changes)"
    if name == "pixel":
        return f"Pearson correlation of the images downsampled to {recipe.get('size')} px"
    return f"evaluation features `{recipe.get('features', name)}`"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    r = report
    t = r["test"]
    ct = "not computed" if r.get("c_t") is None else f"{r['c_t']:.3f}"
    detectable = "none up to 100%" if t["min_detectable_rate"] is None else f"{100 * t['min_detectable_rate']:.0f}%"
    lines = [
        "# Memorization audit",
        "",
        f"**Verdict: {r['verdict'].upper()}** - {VERDICT_TEXT[r['verdict']]}.",
        "",
        f"{r['n_copies']} of {r['n_synthetic']} synthetic samples ({r['n_copies_pct']:.2f}%) are above tau; genuinely new images (held-out patients) "
        f"are above it {t['null_rate_pct']:.2f}% of the time ({t['null_flagged']} of {t['null_n']}). One-sided Fisher exact test: p = {t['p_value']:.4g} (alpha = {t['alpha']:g}).",
    ]
    if r["reasons"]:
        lines += ["", "Why inconclusive:", ""] + [f"- {x}" for x in r["reasons"]]
    if r.get("max_copy_rate") is not None:
        lines += ["", f"Policy: the excess rate above the null ({t['excess_pct']:.2f}%) may be at most {100 * r['max_copy_rate']:.2f}%."]
    lines += ["", "## How copies are detected", ""]
    for name, d in r["detectors"].items():
        lines.append(f"- `{name}`: {_detector_line(name, d['recipe'])}; tau = **{d['threshold']:.4f}**, effective rank {d['effective_rank']:.1f} of {d['embedding_dim']}.")
    lines += [
        f"- tau of each detector: the {r['percentile']:g}th percentile of each training image's best {r['similarity']} similarity with the {r['n_holdout']} held-out images (patients not used for training), as Dar et al. 2024. "
        f"A synthetic sample is a copy when its best similarity with the {r['n_train']} training images exceeds the tau of at least one detector.",
        "- Null rate: each held-out image scored against the training set, with a tau calibrated without it (leave-one-out). About "
        f"{100 - r['percentile']:g}% of look-alikes per detector score above tau by construction, so this, not zero, is what a model that memorizes nothing gets.",
        f"- Samples that are no anatomy (blank, noise, unlike any patient; floors from the held-out set: rank similarity {r['anatomy_gate']['rank_similarity_floor']:.3f}, "
        f"smoothness {r['anatomy_gate']['smoothness_floor']:.3f}) are counted apart, never as copies: {r['not_anatomy']}.",
    ]
    c = r.get("control")
    if c:
        lines.append(f"- Positive control: {c['n']} transformed copies of training images (families never used to train the detectors: {', '.join(c['by_family'])}), scored like samples: "
                     f"**{100 * c['recall']:.0f}% flagged** (needed: {100 * c['min_recall']:.0f}%). Per family: {c['by_family']}.")
    lines += [
        "",
        "## Results",
        "",
        "| measure | value | reading |",
        "|---|---|---|",
        f"| copies among synthetic samples (n_copies_pct) | {r['n_copies_pct']:.2f}% ({r['n_copies']}) | Dar et al.: synthetic samples whose best training match exceeds tau |",
        f"| memorized training images (n_mem_pct) | {r['n_mem_pct']:.2f}% ({r['n_mem']}) | Dar et al.: training images whose best synthetic match exceeds tau |",
        f"| training images copied (n_copy_sources_pct) | {r['n_copy_sources_pct']:.2f}% ({r['n_copy_sources']}) | training images that are the nearest neighbour of a flagged sample |",
        f"| null rate | {t['null_rate_pct']:.2f}% | held-out images above tau (leave-one-out) |",
        f"| excess over the null | {t['excess_pct']:.2f}% | synthetic rate (anatomical samples) minus null rate |",
        f"| p-value | {t['p_value']:.4g} | one-sided Fisher exact test; with {100 * t['detectable_rate']:.0f}% copies it would be {t['p_at_detectable_rate']:.3g} |",
        f"| smallest detectable copy rate | {detectable} | the share of copies at which this test (these sample and held-out sizes, this null) becomes significant |",
        f"| not anatomy | {r['n_not_anatomy']} | {r['not_anatomy']} |",
        f"| AuthPct (dgm-eval) | {r['authpct']:.2f}% | share of samples farther from their nearest training image than that image's own nearest training neighbour; low = copying |",
        f"| C_T (Meehan et al. 2020) | {ct} | Z-score; strongly negative (< -3) = data copying, positive = underfitting |",
        f"| relative l2 < {r['carlini']['delta']:.3g} (Carlini et al. 2023, pixel space) | {r['carlini']['extracted_pct']:.2f}% ({r['carlini']['n_extracted']}) | median ratio {r['carlini']['median_ratio']:.3f}; n = {r['carlini']['n']}, alpha = {r['carlini']['alpha']} |",
        "",
        "| detector | tau | null rate | flagged samples | n_mem_pct | train -> held-out best (median / p95) | synthetic -> train best (median / max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in r["detectors"].items():
        th, st = d["train_holdout_best"], d["synthetic_train_best"]
        lines.append(f"| {name} | {d['threshold']:.4f} | {d['null_pct']:.2f}% | {d['n_copies_pct']:.2f}% ({d['n_flagged']}) | {d['n_mem_pct']:.2f}% | "
                     f"{th['median']:.4f} / {th['p95']:.4f} | {st.get('median', float('nan')):.4f} / {st.get('max', float('nan')):.4f} |")
    lines += [
        "",
        f"AuthPct and C_T are computed with Euclidean distances in: {r.get('reference_space', 'the detector embedding')}.",
        "",
        "## Figures",
        "",
        "![similarity histogram](similarity_histogram.png)",
        "",
        "![most similar pairs](top_pairs.png)",
        "",
        "`pairs.csv` lists every synthetic sample with its nearest training image and similarity (under the detector closest to flagging it), the copy flag, "
        "which detectors flagged it, why it is not anatomy if so, and every detector's similarity and nearest image.",
    ]
    if r.get("filter_out"):
        f = r["filter_out"]
        lines += ["", "## Filtered set", "", f"`{f['path']}` holds copies of the {f['kept']} synthetic files not flagged ({f['removed']} removed). The input folder is unchanged."]
    if r.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r["warnings"]]
    lines += ["", "## Inputs", ""] + [f"- {k}: `{v}`" for k, v in r.get("inputs", {}).items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
