"""Probe figures (PSNR against eps, reconstruction panels) and the human-readable report.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medgen.figures import agg_figure, figure_png
from medgen.io import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES = "psnr_vs_eps.png"
PANELS = "panels.png"
KIND_STYLES = {"worst-case": ("tab:red", "o"), "worst-case (white-box)": ("tab:purple", "D"), "random": ("tab:blue", "s"),
               "random-full": ("tab:gray", "^")}  # (colour, marker)
KIND_LABELS = {"worst-case": "worst-case, found on the surrogate", "worst-case (white-box)": "worst-case, white-box on the method",
               "random": "random, same measured norm (control)", "random-full": "random, full k-space"}
R_STYLES = ["-", "--", ":", "-."]  # line style per acceleration
PANEL_TITLES = ["ground truth", "zero-filled", "clean recon", "perturbed recon", "|perturbed - clean|", "posterior std (clean)"]


def _curve_kind(row: dict) -> str:
    """The kind of perturbation of a curve (a key of KIND_STYLES and KIND_LABELS)."""
    if row["perturbation"] == "worst-case" and row["source"] == "white-box" and row["method"] != "surrogate":
        return "worst-case (white-box)"
    return row["perturbation"]


def _psnr_changes(report: dict[str, Any]) -> dict[tuple, list[float]]:
    """Per (method, R, perturbation, source, eps): each image's PSNR change against its own clean
    reconstruction (report["images"]; posterior samples averaged first, as in `stats.py`)."""
    images = report.get("images", [])
    clean = {(r["method"], r["acceleration"], r["image"]): r["psnr"] for r in images if r["perturbation"] == "none"}
    out: dict[tuple, list[float]] = {}
    for r in images:
        if r["perturbation"] != "none":
            key = (r["method"], r["acceleration"], r["perturbation"], r["source"], float(r["eps"]))
            out.setdefault(key, []).append(r["psnr"] - clean[(r["method"], r["acceleration"], r["image"])])
    return out


def _interval(changes: list[float] | None, eps: float) -> tuple[float, float] | None:
    """95% Student t interval of the mean change over images; at eps 0 the change is 0 exactly."""
    from medgen.recon.stats import paired_summary

    if eps == 0:
        return 0.0, 0.0
    ci = paired_summary(changes)["ci"] if changes else None
    return None if ci is None else (ci[0], ci[1])


def psnr_figure(report: dict[str, Any]) -> Figure:
    """PSNR change against eps, one panel per method (each its own y scale; the clean PSNR in the
    title): a colour and marker per kind of perturbation, a line style per acceleration R, the band
    the 95% t interval of the mean change over images (paired with the clean reconstruction of the
    same image), the legend to the right of the panels."""
    from matplotlib.lines import Line2D

    rows = report["results"]
    clean = {(r["method"], r["acceleration"]): r["psnr"] for r in rows if r["perturbation"] == "none"}
    rows = [r for r in rows if r["perturbation"] != "none"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    accelerations = sorted({r["acceleration"] for r in rows})
    changes = _psnr_changes(report)
    ncol = min(len(methods), 3)
    nrow = math.ceil(len(methods) / ncol)
    fig = agg_figure(figsize=(3.4 * ncol + 2.8, 2.9 * nrow + 0.7), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False, sharex=True).ravel()
    for ax in axes[len(methods):]:
        fig.delaxes(ax)
    kinds: list[str] = []
    for ax, method in zip(axes, methods):
        curves: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["method"] == method:
                curves.setdefault((r["acceleration"], r["perturbation"], str(r["source"])), []).append(r)
        for (R, _, _), curve in sorted(curves.items()):
            curve.sort(key=lambda r: r["eps"])
            kind = _curve_kind(curve[0])
            kinds += [kind] if kind not in kinds else []
            color, eps = KIND_STYLES[kind][0], [r["eps"] for r in curve]
            ax.plot(eps, [r["psnr"] - clean[(method, R)] for r in curve], color=color, marker=KIND_STYLES[kind][1],
                    ls=R_STYLES[accelerations.index(R) % len(R_STYLES)], ms=4, lw=1.4)
            bands = [_interval(changes.get((method, R, r["perturbation"], r["source"], r["eps"])), r["eps"]) for r in curve]
            if all(b is not None for b in bands):
                ax.fill_between(eps, [b[0] for b in bands], [b[1] for b in bands], color=color, alpha=0.15, lw=0)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_title(f"{method}: clean " + ", ".join(f"{clean[(method, R)]:.2f} dB" + (f" (R={R})" if len(accelerations) > 1 else "")
                                                    for R in accelerations if (method, R) in clean), fontsize=9)
        ax.tick_params(labelbottom=True, labelsize=8)
        ax.grid(alpha=0.3)
    fig.supxlabel("relative perturbation norm eps = ||delta|| / ||k||", fontsize=9)
    fig.supylabel("PSNR change vs the clean reconstruction (dB)", fontsize=9)
    handles = [Line2D([], [], color=KIND_STYLES[k][0], marker=KIND_STYLES[k][1], ms=4, label=KIND_LABELS[k]) for k in kinds]
    if len(accelerations) > 1:
        handles += [Line2D([], [], color="black", ls=R_STYLES[i % len(R_STYLES)], label=f"R={R}") for i, R in enumerate(accelerations)]
    n_images = max((r["n_images"] for r in rows), default=0)
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title_fontsize=8,
               title=f"band: 95% t interval of the mean\nchange over {n_images} images" + (f", R={accelerations[0]}" if len(accelerations) == 1 else ""))
    fig.suptitle("PSNR under k-space perturbations of relative norm eps, paired per image with the clean reconstruction", fontsize=10)
    return fig


def panels_figure(panels: dict[str, Any]) -> Figure:
    """First evaluation image, one row per (R, method): ground truth, zero-filled, clean and perturbed
    reconstructions (grey, 0 to 1), then |perturbed - clean| and the posterior std on one colour
    scale per row, with its colourbar (columns as in Han et al.'s figures)."""
    entries = [(R, m, p) for R, block in panels.items() for m, p in block["methods"].items() if m != "zero-filled"]
    if not entries:
        entries = [(R, m, p) for R, block in panels.items() for m, p in block["methods"].items()]
    fig = agg_figure(figsize=(2.0 * len(PANEL_TITLES) + 1.0, 2.0 * len(entries) + 0.5), layout="constrained")
    axes = fig.subplots(len(entries), len(PANEL_TITLES), squeeze=False)
    for row, (R, method, p) in enumerate(entries):
        block = panels[R]
        diff, std = p.get("difference"), p["std"]
        vmax = max(float(diff.max()) if diff is not None else 0.0, float(std.max()), 1e-6)
        images = [(block["truth"], "gray", 1.0), (block["zero_filled"], "gray", 1.0), (p["clean"], "gray", 1.0),
                  (p.get("perturbed"), "gray", 1.0), (diff, "magma", vmax), (std if float(std.max()) > 0 else None, "magma", vmax)]
        scale = None
        for col, (img, cmap, top) in enumerate(images):
            a = axes[row, col]
            a.set_xticks([])
            a.set_yticks([])
            if img is None:
                a.text(0.5, 0.5, "deterministic" if col == 5 else "no attack", ha="center", va="center", fontsize=8, transform=a.transAxes)
            else:
                shown = a.imshow(torch.as_tensor(img).numpy(), cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
                scale = shown if cmap == "magma" else scale
            if row == 0:
                a.set_title(PANEL_TITLES[col], fontsize=8)
        if scale is not None:
            fig.colorbar(scale, ax=axes[row, 4:].tolist(), shrink=0.9, pad=0.02).ax.tick_params(labelsize=7)
        source = p.get("source")
        axes[row, 0].set_ylabel(f"{method}\nR={R}, eps={block['eps']:g}" + (f"\n({source})" if source else ""), fontsize=8)
    fig.suptitle("First evaluation image; |perturbed - clean| and the posterior std share one colour scale per row (image units)", fontsize=9)
    return fig


def write_figures(report: dict[str, Any], panels: dict[str, Any], out: Path) -> None:
    """psnr_vs_eps.png and panels.png into the report folder `out` (a staging folder)."""
    (out / CURVES).write_bytes(figure_png(psnr_figure(report)))
    (out / PANELS).write_bytes(figure_png(panels_figure(panels)))


def transfer_table(transfer: list[dict]) -> list[str]:
    """Markdown: one row per transfer cell (drops, copy baseline, difference with its 95% interval,
    Holm's p, absolute changes, verdict); report.md and eval/probe_table.py print the same table."""
    lines = ["| method | R | eps | drop, worst-case | drop, random | drop, copy | difference [95% CI] | Holm p | NMSE +, worst / random "
             "| RMS change, worst / random | unsampled change, worst / random | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in transfer:
        ci = "n/a" if not t.get("ci95") else f"[{t['ci95'][0]:+.2f}, {t['ci95'][1]:+.2f}]"
        p = "n/a" if t.get("p_holm") is None else f"{t['p_holm']:.3g}"
        lines.append(f"| {t['method']} | {t['acceleration']} | {t['eps']:g} | {t['psnr_drop_worst_case']:.2f} | "
                     f"{t['psnr_drop_random']:.2f} | {t['measured_copy_drop_worst_case']:.2f} | {t['difference']:+.2f} {ci} | {p} | "
                     f"{t['nmse_increase_worst_case']:.4f} / {t['nmse_increase_random']:.4f} | "
                     f"{t['rms_change_worst_case']:.4f} / {t['rms_change_random']:.4f} | "
                     f"{t['unsampled_change_worst_case']:.4f} / {t['unsampled_change_random']:.4f} | {t['verdict']} |")
    return lines


def psnr_table(rows: list[dict], R: int) -> list[str]:
    """Markdown: PSNR per method against eps, worst-case / random (and white-box where there is one)."""
    eps = sorted({r["eps"] for r in rows if r["acceleration"] == R})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["acceleration"] == R))
    lines = ["| method | perturbation | " + " | ".join(f"eps={e:g}" for e in eps) + " |", "|---|---|" + "---|" * len(eps)]
    for m in methods:
        mine = [r for r in rows if r["acceleration"] == R and r["method"] == m and r["perturbation"] != "none"]
        for kind in sorted({(r["perturbation"], r["source"]) for r in mine}, key=lambda k: (k[0] != "worst-case", k[0], str(k[1]))):
            cells = []
            for e in eps:
                hit = [r for r in mine if (r["perturbation"], r["source"]) == kind and r["eps"] == e]
                cells.append(f"{hit[0]['psnr']:.2f}" + (f" ± {hit[0]['psnr_std']:.2f}" if hit and hit[0]["psnr_std"] else "") if hit else "")
            label = kind[0] + (f" ({kind[1]})" if kind[1] else "")
            lines.append(f"| {m} | {label} | " + " | ".join(cells) + " |")
    return lines


def _dps_weight(value: Any) -> str:
    if not isinstance(value, dict):
        return f"{value:g}" if isinstance(value, (int, float)) else str(value)
    return "; ".join(f"R={k}: {v['weight']:g} (chosen on {v['images']}" + (", at the edge of the grid" if v.get("at_grid_edge") else "")
                     + ")" for k, v in value.items())


def write_markdown(report: dict[str, Any], path: Path) -> None:
    setup = report["setup"]
    rows = report["results"]
    accelerations = sorted({r["acceleration"] for r in rows})
    lines = [
        "# MRI reconstruction probe",
        "",
        f"Prior `{setup['prior']['run']}` (sha256 `{setup['prior']['sha256']}`), {setup['data']['n_images']} held-out images "
        f"of `{setup['data'].get('path') or setup['data'].get('kspace')}` ({setup['physics']['image_shape'][0]}x{setup['physics']['image_shape'][1]}, "
        f"{setup['physics']['operator']}, {setup['masks'][str(accelerations[0])]['kind']} masks).",
        "",
        "Worst-case perturbations delta of the full k-space (y = M(k + delta), ||delta|| / ||k|| <= eps) are found on the "
        "supervised surrogate and transferred to every method (Han et al. 2024); attacked white-box too: "
        f"{', '.join(setup['attack']['sources']['white-box']) or 'none'}. The control (*random*) is Gaussian noise on the sampled k-space with the same measured norm ||M delta|| as "
        "the worst case, so that the two differ only in direction. PSNR in dB against the ground truth (data range = its max); "
        "± is the spread over posterior samples of one image. Per-image rows are in report.json (\"images\").",
        "",
        "## Clean reconstructions",
        "",
        "| method | R | PSNR | SSIM | NMSE | posterior samples |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["perturbation"] == "none":
            lines.append(f"| {r['method']} | {r['acceleration']} | {r['psnr']:.2f}" + (f" ± {r['psnr_std']:.2f}" if r["psnr_std"] else "")
                         + f" | {r['ssim']:.4f} | {r['nmse']:.4f} | {r['posterior_samples']} |")
    for R in accelerations:
        lines += ["", f"## PSNR against eps, R={R}", ""] + psnr_table(rows, R)
    transfer = report.get("transfer", [])
    if transfer:
        family = transfer[0].get("family_size", len(transfer))
        lines += ["", "## Does the surrogate's perturbation transfer?", "",
                  "Per image (posterior samples averaged): d = PSNR(random, same measured norm) - PSNR(worst-case). Mean over "
                  f"images with a Student t 95% interval; one-sided p-values adjusted by Holm over all {family} cells. "
                  f"*transfers* only when the adjusted p < {transfer[0].get('alpha', 0.05):g} and the mean is at least "
                  f"{transfer[0].get('min_effect_db', 0.1):g} dB; otherwise *no evidence of transfer*. "
                  "*Copy* is the drop of a reconstruction that only copies the measured data (clean reconstruction + A^H M delta): "
                  "a drop near it is the measured energy, not the prior. RMS change in image units; unsampled change = "
                  "||(1 - M) F (perturbed - clean)|| / ||k||, what moved where nothing was measured.", "",
                  ] + transfer_table(transfer)
    hall = [c for c in report.get("changes", []) if c["perturbation"] == "worst-case" and c["posterior_spread"] > 0]
    if hall:
        lines += ["", "## Hallucination against sampling spread", "",
                  "Mean |recon(perturbed) - recon(clean)| (same seeds) next to the mean posterior std of the clean reconstruction.", "",
                  "| method | R | eps | source | mean abs change | posterior std | PSNR vs clean recon |", "|---|---|---|---|---|---|---|"]
        for c in hall:
            lines.append(f"| {c['method']} | {c['acceleration']} | {c['eps']:g} | {c['source']} | {c['hallucination']:.4f} | "
                         f"{c['posterior_spread']:.4f} | {c['psnr_vs_clean']:.2f} |")
    tv = setup["tv"]["lambda"]
    lines += ["", "## Setup", "",
              "- Masks: " + "; ".join(f"R={k}: {v['kind']}"
                                         + (f", centre fraction {v['center_fraction']:g} ({v['center_columns']} central columns)"
                                            if v.get("center_fraction") is not None else "")
                                         + f", {v['sampled_columns']} columns sampled (effective R {v['effective_acceleration']:g})"
                                         for k, v in setup["masks"].items()),
              f"- Attack: Adam lr {setup['attack']['lr']}, {setup['attack']['steps']} steps, keep the worst iterate.",
              f"- Posterior sampling: {setup['posterior']['samples']} samples per measurement, {setup['posterior']['steps']} steps; "
              f"DPS weight {_dps_weight(setup['posterior']['dps_weight'])}, projection lambda {setup['posterior']['projection_lambda']}.",
              f"- Data: {setup['data']['n_images']} evaluation images, {setup['data']['n_calibration']} calibration images; "
              f"k-space {setup['physics']['kspace']}; measurement noise sigma {setup['physics']['noise_sigma']:g}.",
              "- Differences from Han et al. 2024: " + "; ".join(f"{k}: {v}" for k, v in setup.get("differences_from_han", {}).items()) + ".",
              "- TV lambda (chosen on clean data): " + ("; ".join(f"R={k}: {v['lambda']:g} (on {v['images']}"
                                                    + (", at the edge of the grid" if v.get("at_grid_edge") else "") + ")"
                                                    for k, v in tv.items()) or "n/a"),
              f"- Surrogate: `{setup['surrogate']['path']}` (trained at R={setup['surrogate']['acceleration']}, {setup['surrogate']['mask']} masks"
              + (", trained by this probe" if setup["surrogate"]["trained_now"] else "") + ").",
              f"- Device: {setup['device']}; versions: " + ", ".join(f"{k} {v}" for k, v in setup["versions"].items()) + ".",
              "", "## Figures", "", f"![PSNR against eps]({CURVES})", "", f"![panels]({PANELS})", ""]
    atomic_write_text(path, "\n".join(lines))
