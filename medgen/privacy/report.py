"""Audit figures (similarity histogram, most similar pairs) and the human-readable report.md."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from medgen.figures import agg_figure, figure_png
from medgen.io import atomic_write_text
from medgen.privacy.calibration import Scores
from medgen.privacy.verdict import AuditResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HISTOGRAM = "similarity_histogram.png"
TOP_PAIRS = "top_pairs.png"


def _display(img: torch.Tensor) -> np.ndarray:
    """(C, *S) in [-1, 1] -> 2D array in [0, 1]: channel mean; for 3D the axial mid-plane in
    radiological orientation (`medgen.figures.radiological_planes`)."""
    from medgen.figures import radiological_planes

    x = ((img.float().mean(0).clamp(-1, 1) + 1) / 2).numpy()
    return radiological_planes(x)[0] if x.ndim == 3 else x


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def _headline(rep: dict[str, Any]) -> str:
    """One line for figure titles: the bound against the policy, and the verdict."""
    b = rep.get("bound")
    if not b:
        return f"{rep['verdict'].upper()}: no bound (no positive control)"
    return (f"{rep['verdict'].upper()}: at {100 * b['confidence']:.4g}% confidence at most {b['upper_pct']:.2f}% copies "
            f"(policy {100 * rep['policy']['max_copy_rate']:.4g}%); {rep['n_copies']} of {rep['n_synthetic']} samples above tau")


def write_figures(result: AuditResult, train: torch.Tensor, synthetic: torch.Tensor, train_names: Sequence[str], synth_names: Sequence[str], out: Path, top_k: int = 8) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep, sc = result.report, result.scores
    audit = result.audit
    fits = audit.fits if audit is not None else []
    control = audit.control if audit is not None else None

    # One panel per detector: what the verdict tests. The null (each held-out patient's best
    # similarity with the training set: how a new patient scores) beside the anatomical samples'
    # best similarity with the training set, tau, and where the positive control's copies score.
    k = max(1, len(fits))
    fig, axes = plt.subplots(1, k, figsize=(5.2 * k, 3.9), squeeze=False)
    keep = sc.anatomical
    series = {}
    for j, f in enumerate(fits):
        ax = axes[0, j]
        null, synth = f.holdout_train_best.numpy(), sc.similarity[keep, j].numpy()
        copies = control.scores.similarity[:, j].numpy() if control is not None else np.zeros(0)
        both = np.concatenate([null, synth, copies])
        lo, hi = float(both.min()), float(both.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 40)
        ax.hist(null, bins=bins, alpha=0.55, density=True, label=f"held-out -> train: the null (n={len(null)})")
        if synth.size:
            ax.hist(synth, bins=bins, alpha=0.55, density=True, label=f"synthetic -> train (n={len(synth)})")
        if copies.size:
            ax.hist(copies, bins=bins, density=True, histtype="step", color="red", lw=1.2, label=f"control copies -> train (n={len(copies)})")
        ax.axvline(f.threshold, color="k", ls="--", lw=1, label=f"tau = {f.threshold:.4f} (new patient above it: <= {100 * f.attained_level:.1f}%)")
        series[f.name] = {"null_holdout_to_train": len(null), "synthetic_to_train": len(synth), "control_copies": len(copies), "tau": f.threshold}
        ax.set_xlabel(f"best {rep['similarity']} similarity with a training image, {f.name} detector")
        ax.set_ylabel("density")
        ax.legend(fontsize=6.5)
    fig.suptitle(_headline(rep), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / HISTOGRAM, dpi=110)
    plt.close(fig)

    examples = control.examples(min(top_k, len(sc))) if control is not None else []
    (out / TOP_PAIRS).write_bytes(figure_png(top_pairs_figure(sc, examples, _headline(rep), train, synthetic, train_names, synth_names, top_k)))
    return {"histogram": HISTOGRAM, "top_pairs": TOP_PAIRS, "title": _headline(rep), "histogram_series": series,
            "pairs": {"closest_samples": min(top_k, len(sc)), "control_examples": len(examples)}}


def top_pairs_figure(sc: Scores, examples: Sequence[tuple[torch.Tensor, int, str, float]], headline: str, train: torch.Tensor,
                     synthetic: torch.Tensor, train_names: Sequence[str], synth_names: Sequence[str], top_k: int = 8) -> "Figure":
    """top_pairs.png. Top: the samples closest to a copy (largest margin above a detector's tau)
    over their nearest training image, marked "above tau" (a flag, not a confirmed copy). Bottom:
    copies the positive control made and the detectors caught (`examples`: image, source index,
    family, similarity) over their source: what a found copy looks like. Each image's file name
    is in its title, above it, so no label reaches into the row below."""
    n = min(top_k, len(sc))
    order = torch.argsort(sc.margin.max(1).values, descending=True)[:n].tolist()
    cols = max(n, len(examples), 1)
    rows = 4 if examples else 2
    fig = agg_figure(figsize=(1.9 * cols, 2.3 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def panel(ax, img, name, score=None, color="black"):
        ax.axis("on")
        ax.imshow(_display(img), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(_short(name, 22) if score is None else f"{score}\n{_short(name, 22)}", fontsize=6.5, color=color)

    for col, i in enumerate(order):
        above = bool(sc.is_copy[i])
        label = sc.detectors[int(sc.deciding[i])]
        panel(axes[0, col], synthetic[i], synth_names[i], f"{float(sc.best[i]):.4f} {label}" + (" above tau" if above else ""),
              "darkorange" if above else "black")
        panel(axes[1, col], train[int(sc.nearest_train[i])], train_names[int(sc.nearest_train[i])])
    axes[0, 0].set_ylabel("synthetic", fontsize=8)
    axes[1, 0].set_ylabel("nearest train", fontsize=8)
    for col, (img, source, family, sim) in enumerate(examples):
        panel(axes[2, col], img, f"control: {family}", f"{sim:.4f} caught", "red")
        panel(axes[3, col], train[source], train_names[source])
    if examples:
        axes[2, 0].set_ylabel("control copy", fontsize=8)
        axes[3, 0].set_ylabel("its source", fontsize=8)
    lines = [f"Rows 1-2: the {n} samples closest to tau and their nearest training image ('above tau' is a flag, not a proven copy).",
             *(["Rows 3-4: copies the positive control made and the detectors caught."] if examples else []), headline]
    fig.suptitle("\n".join(textwrap.fill(line, 30 * cols) for line in lines), fontsize=8)  # ~30 characters of 8 pt per column
    return fig


VERDICT_TEXT = {
    "pass": "the privacy bound holds: at the stated confidence, at most the policy's share of the model's outputs are copies of training patients as the detectors see them, and the audit's checks show it could have seen copies",
    "fail": "synthetic samples exceed tau significantly more often than new patients do: the model reproduces training patients",
    "inconclusive": "the audit can neither bound the share of copies under the policy nor show an excess; the reasons below say what would decide it",
}


def _detector_line(name: str, recipe: dict[str, Any]) -> str:
    if name == "ssl":
        enc = recipe.get("encoder", {})
        return f"self-supervised contrastive encoder trained on the training set (NT-Xent, Dar et al. 2024), input {recipe.get('image_size')} px, {enc.get('embed_dim')}-d embedding"
    if name == "pixel-rank":
        return f"Spearman rank correlation of the images downsampled to {recipe.get('size')} px (unchanged by monotone intensity changes)"
    if name == "pixel":
        return f"Pearson correlation of the images downsampled to {recipe.get('size')} px"
    if name == "latent":
        return f"Pearson correlation at native resolution (up to {recipe.get('size')} px) with the training images decoded through the model's autoencoder (a latent model's copy is a decoded training latent)"
    return f"evaluation features `{recipe.get('features', name)}`"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    r = report
    t, b, pol = r["test"], r.get("bound"), r["policy"]
    ct = "not computed" if r.get("c_t") is None else f"{r['c_t']:.3f}"
    lines = ["# Memorization audit", "", f"**Verdict: {r['verdict'].upper()}** - {VERDICT_TEXT[r['verdict']]}.", ""]
    if b:
        lines += [f"**The bound:** {b['sentence']}.", ""]
    lines += [
        f"{r['n_copies']} of {r['n_synthetic']} synthetic samples ({r['n_copies_pct']:.2f}%) are above tau; new patients (held-out images, leave-one-out) "
        f"are above it {t['null_rate_pct']:.2f}% of the time ({t['null_flagged']} of {t['null_n']}). One-sided Fisher exact test of the excess: p = {t['p_value']:.4g} "
        f"(alpha {pol['alpha_used']:.4g}" + (f", attempt {pol['attempt']} of this model: alpha {pol['alpha']:g} / 2^{pol['attempt']}" if pol.get("attempt") else "") + ").",
    ]
    if r["reasons"]:
        lines += ["", "Why inconclusive:", ""] + [f"- {x}" for x in r["reasons"]]
    lines += ["", "## How the verdict is reached", ""]
    lines += [
        f"- **pass** when the upper confidence bound on the share of the model's outputs that are copies is at most the policy ({100 * pol['max_copy_rate']:.4g}%). "
        "The bound is the flagged share of the samples (upper Clopper-Pearson bound) divided by the detectors' recall on the positive control "
        "(lower bound), each at half the error level: it assumes nothing about how often the model's non-copies exceed tau, and a copy the detectors "
        "miss is still counted through the recall." if pol["bound_method"] == "conservative" else
        f"- **pass** when the null-adjusted upper bound (flagged share minus the held-out null, over recall minus null; each at a third of the error level) "
        f"is at most the policy ({100 * pol['max_copy_rate']:.4g}%). Valid only if the model's non-copies exceed tau at least as often as new patients do.",
        "- **fail** when the samples exceed tau significantly more often than new patients (the held-out null).",
        "- **inconclusive** when the audit could not have seen copies, or when neither holds; the reasons then say how many samples would decide.",
        "",
        "## How copies are detected",
        "",
    ]
    for name, d in r["detectors"].items():
        lines.append(f"- `{name}`: {_detector_line(name, d['recipe'])}; tau = **{d['threshold']:.4f}**, effective rank {d['effective_rank']:.1f} of {d['embedding_dim']}.")
    decoded = " decoded through the model's autoencoder (what the model would output for them)" if r.get("decoded_calibration") else ""
    lines += [
        f"- tau of each detector: a conformal quantile of each held-out image's best {r['similarity']} similarity with the {r['n_train']} training images "
        f"({r['n_holdout']} held-out images{decoded}): a patient the model never saw exceeds it with probability at most "
        f"{100 * max(r['null_level'], 1 / (r['n_holdout'] + 1)):.2g}%. A sample is above tau when its best similarity with the training images exceeds the tau of at least one detector. "
        f"Dar et al. 2024's tau (the {r['dar']['percentile']:g}th percentile of train -> held-out similarity) is reported as a measure: "
        f"{r['dar']['above_pct']:.2f}% of the samples are above it.",
        f"- Samples that are no anatomy (blank, noise, unlike any patient; floors from the held-out set: rank similarity {r['anatomy_gate']['rank_similarity_floor']:.3f}, "
        f"smoothness {r['anatomy_gate']['smoothness_floor']:.3f}) are counted apart, never as copies: {r['not_anatomy']}.",
    ]
    c = r.get("control")
    if c:
        per_det = "; ".join(f"{d}: {100 * v['recall']:.0f}% of {', '.join(v['own_families'])}" for d, v in c["by_detector"].items())
        lines.append(f"- Positive control: {c['n']} copies of training images ({', '.join(c['by_family'])}), scored like samples: "
                     f"**{c['caught']} caught ({100 * c['recall']:.0f}%)**, the recall inside the bound. Per family: {c['by_family']}. "
                     f"Each detector on its own families (at least {100 * c['min_detector_recall']:.0f}% needed): {per_det}.")
    lines += [
        "",
        "## Results",
        "",
        "| measure | value | reading |",
        "|---|---|---|",
    ]
    if b:
        lines.append(f"| copy share, upper bound | {b['upper_pct']:.2f}% | at {100 * b['confidence']:.4g}% confidence; estimate {b['estimate_pct']:.2f}%; policy {100 * pol['max_copy_rate']:.4g}% |")
    lines += [
        f"| samples above tau (n_copies_pct) | {r['n_copies_pct']:.2f}% ({r['n_copies']}) | Dar et al.: synthetic samples whose best training match exceeds tau |",
        f"| memorized training images (n_mem_pct) | {r['n_mem_pct']:.2f}% ({r['n_mem']}) | Dar et al.: training images whose best synthetic match exceeds tau |",
        f"| training images copied (n_copy_sources_pct) | {r['n_copy_sources_pct']:.2f}% ({r['n_copy_sources']}) | training images that are the nearest neighbour of a flagged sample |",
        f"| null rate | {t['null_rate_pct']:.2f}% | held-out images above tau (leave-one-out) |",
        f"| excess over the null | {t['excess_pct']:.2f}% | synthetic rate (anatomical samples) minus null rate; p = {t['p_value']:.4g} |",
        f"| above Dar et al.'s tau | {r['dar']['above_pct']:.2f}% ({r['dar']['n_above']}) | p{r['dar']['percentile']:g} of train -> held-out similarity: a measure, not the decision |",
        f"| not anatomy | {r['n_not_anatomy']} | {r['not_anatomy']} |",
        f"| AuthPct (dgm-eval) | {r['authpct']:.2f}% | share of samples farther from their nearest training image than that image's own nearest training neighbour; low = copying |",
        f"| C_T (Meehan et al. 2020) | {ct} | Z-score; strongly negative (< -3) = data copying, positive = underfitting |",
        f"| relative l2 < {r['carlini']['delta']:.3g} (Carlini et al. 2023, pixel space) | {r['carlini']['extracted_pct']:.2f}% ({r['carlini']['n_extracted']}) | median ratio {r['carlini']['median_ratio']:.3f}; n = {r['carlini']['n']}, alpha = {r['carlini']['alpha']} |",
        "",
        "| detector | tau | null rate | flagged samples | n_mem_pct | held-out -> train best (median / max) | synthetic -> train best (median / max) | Dar's tau |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in r["detectors"].items():
        hb, st = d["holdout_train_best"], d["synthetic_train_best"]
        lines.append(f"| {name} | {d['threshold']:.4f} | {d['null_pct']:.2f}% | {d['n_copies_pct']:.2f}% ({d['n_flagged']}) | {d['n_mem_pct']:.2f}% | "
                     f"{hb['median']:.4f} / {hb['max']:.4f} | {st.get('median', float('nan')):.4f} / {st.get('max', float('nan')):.4f} | {d['dar_threshold']:.4f} |")
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
        "`pairs.csv` lists every synthetic sample with its nearest training image and similarity (under the detector closest to flagging it), the above-tau flag, "
        "which detectors flagged it, why it is not anatomy if so, and every detector's similarity and nearest image.",
    ]
    if r.get("filter_out"):
        f = r["filter_out"]
        lines += ["", "## Filtered set", "", f"`{f['path']}` holds copies of the {f['kept']} synthetic files not flagged ({f['removed']} removed). The input folder is unchanged."]
    if r.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r["warnings"]]
    lines += ["", "## Inputs", ""] + [f"- {k}: `{v}`" for k, v in r.get("inputs", {}).items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
