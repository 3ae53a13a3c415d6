"""`medgen probe mri`: how a pixel-space prior's MRI reconstructions react to worst-case k-space
perturbations (Han et al. 2024, "On Instabilities of Unsupervised Denoising Diffusion Models in MRI
Reconstruction").

For each acceleration R: k-space of every evaluation image is simulated with deepinv's operator
(`kspace.py`), or read from a fastMRI file (`--kspace`, `fastmri.py`); perturbations of relative norm
eps are found on the supervised surrogate and transferred to every method (the paper's setting), and
found white-box on the surrogate itself (and on TV with --tv-white-box). The control is Gaussian
noise on the *sampled* k-space with the same measured norm as the worst-case delta
(`attack.random_measured_perturbation`),
so that worst-case against control isolates the direction of the attack from the energy the
reconstruction receives; the older full-k-space control is an option (row "random-full"). Every
method reconstructs the clean and all perturbed measurements in one batch per method (stochastic
methods K times each, with the same seeds for the clean and the perturbed measurements of an image);
metrics follow fastMRI.

Report (`report.json`):
- "results": {method, acceleration, mask, eps, perturbation, source, psnr, ssim, nmse, psnr_std,
  n_images, posterior_samples}; means over images (each image's posterior samples averaged first),
  psnr_std the spread of PSNR over the posterior samples of one image (mean over images; 0 for
  deterministic methods). eps = 0 rows of the perturbed kinds are the clean reconstruction.
- "images": the same per image, with the absolute changes against the clean reconstruction of the
  same seeds: rms_change (image units), unsampled_change and measured_change (the change's k-space
  norm off and on the sampled columns, relative to ||k||: the prior acts off them), and
  measured_copy_psnr, the PSNR of the clean reconstruction plus A^H M delta, i.e. what a
  reconstruction that only copies the measured data would give.
- "changes": per condition, means of those changes and delta_psnr / delta_nmse against clean.
- "transfer": per (method, R, eps), paired over images (`stats.py`): d_i = PSNR_i(control) -
  PSNR_i(worst-case), its t interval, the one-sided p-value, Holm's adjustment over all cells of
  the probe, and "transfers" only when that is significant and the mean is >= 0.1 dB.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from medgen.errors import ConfigError, DataError
from medgen.recon.attack import random_measured_perturbation, random_perturbation, worst_case_perturbation
from medgen.recon.kspace import (
    apply_mask,
    bind_coil_maps,
    fft2c,
    fully_sampled,
    kspace_mask,
    magnitude,
    mri_physics,
    to_complex,
    zero_filled,
)
from medgen.recon.metrics import psnr, recon_metrics
from medgen.recon.sampling import (
    DIFFUSION_METHODS,
    calibrate_dps_weight,
    dps_reconstruct,
    projection_reconstruct,
    sample_generators,
)
from medgen.recon.settings import WHITE_BOX, ProbeSettings, center_fraction_for, mask_lines
from medgen.recon.stats import ALPHA, MIN_EFFECT_DB, holm, paired_summary, verdict
from medgen.versions import software_versions

log = logging.getLogger(__name__)

N_CALIBRATION = 8  # held-out images, neither evaluated nor trained on, that choose TV's lambda and the DPS weight
CONTROLS = {"random": "Gaussian noise on the sampled k-space with the worst-case delta's measured norm ||M delta|| (per image, eps)",
            "random-full": "Gaussian noise on the full k-space with the worst-case delta's norm ||delta|| (most of it is masked away)"}
# the same test says "transfers" of a perturbation found on the surrogate, and only that the direction
# matters of the surrogate's own (white-box) worst case
VERDICTS = {"surrogate": {True: "transfers", False: "no evidence of transfer"},
            "white-box": {True: "worst case beats the control (white-box)", False: "no evidence against the control (white-box)"}}
DIFFERENCES_FROM_HAN = {
    "data": "the built-in cohort's magnitude slices (MNI152-based), k-space simulated with zero phase; Han et al.: fastMRI "
            "knee/brain k-space (medgen reads it with --kspace)",
    "size": "32-64 px on CPU; Han et al.: 320 px",
    "mask": "equispaced-fixed: central lines plus every R-th column from the centre; Han et al.: fastMRI's equispaced mask",
    "steps": "posterior sampling --steps (default 100; 1000 as Han et al. with --steps 1000, on a GPU)",
    "projection": "the complex image is kept after each projection step; Han et al.'s precursor code keeps the real part "
                  "(--projection-real)",
    "surrogate": "a small deepinv UNet trained for minutes (zero-filled -> truth, L1); Han et al.: an end-to-end VarNet / U-Net",
    "attack_steps": "--attack-steps (default 200); Han et al.: 2000",
    "scaling": "the prior's own intensity mapping to [0, 1] (--scaling prior); Han et al.: per-slice normalisation (--scaling minmax)",
}

def _seed(base: int, image: int, sample: int) -> int:
    """Seed of posterior sample `sample` of evaluation image `image` (shared by all its measurements)."""
    return (int(base) * 1_000_003 + 7_919 * image + sample) % (2**63)


def _training_files(prior_dir: Path, surrogate_config: dict | None) -> set[Path]:
    """Files the prior (its run's split.json) or the surrogate trained on, resolved."""
    import json

    files: set[Path] = set()
    split = prior_dir / "split.json"
    if split.is_file():
        try:
            files |= {Path(f).resolve() for f in json.loads(split.read_text()).get("files", {}).get("train", [])}
        except (OSError, ValueError):
            log.warning("could not read %s; no image is excluded as a training image of the prior", split)
    if surrogate_config:
        files |= {Path(f).resolve() for f in surrogate_config.get("train", {}).get("train_files", [])}
    return files


@dataclass
class Condition:
    """One set of measurements every image gets: clean, or perturbed by one delta per image."""

    perturbation: str  # none | worst-case | random
    source: str | None  # surrogate | white-box | None
    eps: float
    delta: torch.Tensor | None  # (N, *k) or None (clean)


@dataclass
class MethodResult:
    recon: torch.Tensor  # (C, N, K, 1, H, W) magnitudes on the CPU
    metrics: dict[str, torch.Tensor]  # each (C, N, K)
    seconds: float
    conditions: list[Condition] = field(default_factory=list)


class Reconstructors:
    """measured k-space (n, *k) -> (n, 1, H, W) magnitude reconstructions, one function per method;
    stochastic ones take the per-element seeds too."""

    def __init__(self, physics, settings: ProbeSettings, prior=None, surrogate=None, tv_lambda: float | None = None,
                 dps_weight: float | None = None, extra: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 coil_maps: torch.Tensor | None = None):
        self.physics, self.s, self.prior, self.surrogate, self.tv_lambda = physics, settings, prior, surrogate, tv_lambda
        self.dps_weight = settings.dps_weight if dps_weight is None else dps_weight
        self.extra = dict(extra or {})  # more deterministic methods: measured k-space -> magnitudes
        self.coil_maps = coil_maps  # (N, C, H, W) per evaluation image (real multi-coil data), else None

    def deterministic(self, method: str) -> Callable[[torch.Tensor], torch.Tensor]:
        from medgen.recon.baselines import tv_reconstruct

        p, s = self.physics, self.s
        if method in self.extra:
            return self.extra[method]
        if method == "zero-filled":
            return lambda y: magnitude(zero_filled(p, y))
        if method == "tv":
            return lambda y: magnitude(tv_reconstruct(p, y, self.tv_lambda, iterations=s.tv_iterations,
                                                      prox_iterations=s.tv_prox_iterations))
        if method == "surrogate":
            return lambda y: self.surrogate(p, y)
        raise ValueError(method)

    def stochastic(self, method: str, y: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        p, s, prior = self.physics, self.s, self.prior
        gens = sample_generators(seeds)
        if method == "projection":
            x = projection_reconstruct(prior.denoiser, prior.sde, p, y, gens, steps=s.steps, lam=s.projection_lambda,
                                       real=s.projection_real)
        else:
            x = dps_reconstruct(prior.denoiser, prior.sde, p, y, gens, steps=s.steps, weight=self.dps_weight)
        return magnitude(x)


def reconstruct_all(recons: Reconstructors, method: str, kspace: torch.Tensor, mask: torch.Tensor,
                    conditions: Sequence[Condition], truth: torch.Tensor, settings: ProbeSettings) -> MethodResult:
    """All conditions x images (x posterior samples) of one method, batched; metrics against `truth`."""
    N = kspace.shape[0]
    stochastic = method in DIFFUSION_METHODS
    K = settings.posterior_samples if stochastic else 1
    ys = torch.cat([apply_mask(kspace if c.delta is None else kspace + c.delta, mask) for c in conditions])  # (C*N, *k)
    ys = ys.repeat_interleave(K, dim=0)  # (C*N*K, *k): condition-major, then image, then sample
    seeds = [_seed(settings.seed, i, k) for _ in conditions for i in range(N) for k in range(K)]
    tic = time.perf_counter()
    out = []
    fn = None if stochastic else recons.deterministic(method)
    for start in range(0, len(ys), settings.batch_size):
        y = ys[start : start + settings.batch_size]
        bind_coil_maps(recons.physics, recons.coil_maps, [(e // K) % N for e in range(start, start + len(y))])
        with torch.no_grad():
            x = recons.stochastic(method, y, seeds[start : start + len(y)]) if stochastic else fn(y)
        out.append(x.float().cpu())
    seconds = time.perf_counter() - tic
    C = len(conditions)
    recon = torch.cat(out).view(C, N, K, *out[0].shape[1:])
    gt = truth.cpu()[None, :, None].expand(C, N, K, *truth.shape[1:]).reshape(-1, *truth.shape[1:])
    metrics = {k: v.view(C, N, K) for k, v in recon_metrics(recon.reshape(-1, *recon.shape[3:]), gt).items()}
    log.info("  %s: %d reconstructions in %.1f s (%.2f images/s)", method, len(ys), seconds, len(ys) / max(seconds, 1e-9))
    return MethodResult(recon, metrics, seconds, list(conditions))


def _kinds(conditions: Sequence[Condition]) -> list[tuple[str, str | None]]:
    """The perturbed (perturbation, source) kinds, worst-case first, in a fixed order."""
    return sorted({(c.perturbation, c.source) for c in conditions if c.perturbation != "none"},
                  key=lambda ps: (ps[0] != "worst-case", ps[0], str(ps[1])))


def _clean_index(conditions: Sequence[Condition]) -> int:
    return next(i for i, c in enumerate(conditions) if c.perturbation == "none")


def _rows(method: str, R: int, mask_kind: str, eps_list: Sequence[float], result: MethodResult) -> list[dict]:
    """report rows of one method at one R (eps = 0 perturbed rows repeat the clean reconstruction)."""
    rows = []
    N, K = result.metrics["psnr"].shape[1:]
    clean_index = _clean_index(result.conditions)

    def row(c: Condition, i: int, eps: float) -> dict:
        m = result.metrics
        spread = m["psnr"][i].std(dim=1, unbiased=True).mean() if K > 1 else torch.tensor(0.0)
        return {"method": method, "acceleration": int(R), "mask": mask_kind, "eps": float(eps), "perturbation": c.perturbation,
                "source": c.source, "psnr": round(float(m["psnr"][i].mean()), 4), "ssim": round(float(m["ssim"][i].mean()), 5),
                "nmse": round(float(m["nmse"][i].mean()), 6), "psnr_std": round(float(spread), 4), "n_images": int(N),
                "posterior_samples": int(K)}

    rows.append(row(result.conditions[clean_index], clean_index, 0.0))
    for perturbation, source in _kinds(result.conditions):
        if 0.0 in eps_list:
            rows.append(row(Condition(perturbation, source, 0.0, None), clean_index, 0.0))
        for i, c in enumerate(result.conditions):
            if (c.perturbation, c.source) == (perturbation, source):
                rows.append(row(c, i, c.eps))
    return rows


def image_stats(result: MethodResult, physics, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per condition and image (C, N): psnr, ssim, nmse (posterior samples averaged); and against the
    clean reconstruction of the same seeds: rms_change, unsampled_change, measured_change (the
    change's k-space norm off / on the sampled columns over ||k|| = ||truth||, ortho FFT) and
    measured_copy_psnr (clean reconstruction + A^H M delta: a reconstruction that only copies the
    measured data; NaN for the clean condition). Reconstructions are kept as magnitudes, so the
    clean one enters as a real image: for a reconstruction with a phase this is approximate
    (0.06 dB in the planted test)."""
    recon, conds = result.recon, result.conditions
    C, N, K, _, H, W = recon.shape
    out = {k: v.mean(2) for k, v in result.metrics.items()}
    clean = _clean_index(conds)
    diff = recon - recon[clean][None]  # (C, N, K, 1, H, W)
    out["rms_change"] = diff.square().mean(dim=(3, 4, 5)).sqrt().mean(2)
    sampled = physics.mask.reshape(-1, H, W)[0].float().cpu()
    spectrum = fft2c(diff[:, :, :, 0].double())
    norm_k = truth.cpu().double().flatten(1).norm(dim=1).clamp_min(1e-12)  # (N,)
    for name, weight in (("measured_change", sampled), ("unsampled_change", 1 - sampled)):
        out[name] = ((spectrum * weight).abs().square().sum(dim=(-2, -1)).sqrt().mean(2) / norm_k).float()
    copy = torch.full((C, N), float("nan"))
    gt = truth.cpu().float()
    for i, c in enumerate(conds):
        if c.delta is None:
            continue
        with torch.no_grad():
            image = zero_filled(physics, apply_mask(c.delta, physics.mask)).float().cpu()  # (N, 2, H, W): A^H M delta
        x0 = recon[clean]  # (N, K, 1, H, W)
        pred = ((x0 + image[:, None, :1]).square() + image[:, None, 1:].square()).sqrt()
        copy[i] = psnr(pred.reshape(N * K, 1, H, W), gt.repeat_interleave(K, dim=0)).view(N, K).mean(1)
    out["measured_copy_psnr"] = copy
    return out


def _image_rows(method: str, R: int, result: MethodResult, stats: dict[str, torch.Tensor]) -> list[dict]:
    """report["images"]: one row per condition and evaluation image."""
    rows = []
    clean = _clean_index(result.conditions)
    for i, c in enumerate(result.conditions):
        for n in range(stats["psnr"].shape[1]):
            row = {"method": method, "acceleration": int(R), "eps": float(c.eps), "perturbation": c.perturbation, "source": c.source,
                   "image": n, "psnr": round(float(stats["psnr"][i, n]), 4), "ssim": round(float(stats["ssim"][i, n]), 5),
                   "nmse": round(float(stats["nmse"][i, n]), 6)}
            if i != clean:
                row.update({k: round(float(stats[k][i, n]), 6) for k in
                            ("rms_change", "unsampled_change", "measured_change", "measured_copy_psnr")})
            rows.append(row)
    return rows


def _changes(method: str, R: int, result: MethodResult, stats: dict[str, torch.Tensor]) -> list[dict]:
    """Per perturbed condition: absolute and relative changes against the clean reconstruction of the
    same seeds, means over images."""
    out = []
    m, recon = result.metrics, result.recon
    clean = _clean_index(result.conditions)
    K = recon.shape[2]
    spread = float(recon[clean].std(dim=1, unbiased=True).mean()) if K > 1 else 0.0
    ref = recon[clean].reshape(-1, *recon.shape[3:])
    for i, c in enumerate(result.conditions):
        if i == clean:
            continue
        x = recon[i].reshape(-1, *recon.shape[3:])
        out.append({"method": method, "acceleration": int(R), "eps": c.eps, "perturbation": c.perturbation, "source": c.source,
                    "delta_psnr": round(float((m["psnr"][i] - m["psnr"][clean]).mean()), 4),
                    "delta_ssim": round(float((m["ssim"][i] - m["ssim"][clean]).mean()), 5),
                    "delta_nmse": round(float((m["nmse"][i] - m["nmse"][clean]).mean()), 6),
                    "measured_copy_delta_psnr": round(float((stats["measured_copy_psnr"][i] - stats["psnr"][clean]).mean()), 4),
                    "rms_change": round(float(stats["rms_change"][i].mean()), 6),
                    "unsampled_change": round(float(stats["unsampled_change"][i].mean()), 6),
                    "measured_change": round(float(stats["measured_change"][i].mean()), 6),
                    "psnr_vs_clean": round(float(psnr(x, ref).mean()), 4),
                    "hallucination": round(float((x - ref).abs().mean()), 6),
                    "posterior_spread": round(spread, 6)})
    return out


def _transfer(method: str, R: int, result: MethodResult, stats: dict[str, torch.Tensor]) -> list[dict]:
    """Per eps: the surrogate's worst-case perturbation (white-box for the surrogate itself) against
    the control of the same measured norm, paired over images (posterior samples averaged first).
    The rows keep their per-image differences under "_d" until `finalize_transfer` adds the
    intervals, Holm's adjustment over all cells and the verdict."""
    out = []
    conds = result.conditions
    p = stats["psnr"]
    clean = _clean_index(conds)
    source = "white-box" if method == "surrogate" else "surrogate"

    def mean(name: str, i: int) -> float:
        return round(float(stats[name][i].mean()), 6)

    for i, c in enumerate(conds):
        if c.perturbation != "worst-case" or c.source != source:
            continue
        j = next(j for j, o in enumerate(conds) if o.perturbation == "random" and o.eps == c.eps)
        row = {"method": method, "acceleration": int(R), "eps": c.eps, "source": source, "control": "random",
               "n_images": int(p.shape[1]),
               "psnr_drop_worst_case": round(float((p[clean] - p[i]).mean()), 4),
               "psnr_drop_random": round(float((p[clean] - p[j]).mean()), 4),
               "measured_copy_drop_worst_case": round(float((p[clean] - stats["measured_copy_psnr"][i]).mean()), 4),
               "measured_copy_drop_random": round(float((p[clean] - stats["measured_copy_psnr"][j]).mean()), 4),
               "nmse_increase_worst_case": round(float((stats["nmse"][i] - stats["nmse"][clean]).mean()), 6),
               "nmse_increase_random": round(float((stats["nmse"][j] - stats["nmse"][clean]).mean()), 6),
               "rms_change_worst_case": mean("rms_change", i), "rms_change_random": mean("rms_change", j),
               "unsampled_change_worst_case": mean("unsampled_change", i), "unsampled_change_random": mean("unsampled_change", j),
               "_d": (p[j] - p[i]).tolist()}
        full = next((j for j, o in enumerate(conds) if o.perturbation == "random-full" and o.eps == c.eps), None)
        if full is not None:
            row["psnr_drop_random_full"] = round(float((p[clean] - p[full]).mean()), 4)
        out.append(row)
    return out


def finalize_transfer(rows: list[dict], *, alpha: float = ALPHA, min_effect_db: float = MIN_EFFECT_DB) -> list[dict]:
    """Intervals, one-sided p-values, Holm's adjustment over all the rows (one family: every method,
    R and eps tested) and the verdicts; drops the per-image differences "_d"."""
    family = sum(len(r["_d"]) > 1 for r in rows)  # a cell with one image has no p-value
    summaries = [paired_summary(r.pop("_d"), alpha=alpha, family_size=family) for r in rows]
    adjusted = holm([s["p_value"] for s in summaries])

    def rounded(v):
        return None if v is None else [round(float(a), 4) for a in v] if isinstance(v, list) else round(float(v), 6)

    for r, s, p_holm in zip(rows, summaries, adjusted):
        transfers = verdict(s["mean"], p_holm, alpha=alpha, min_effect_db=min_effect_db)
        r.update({"difference": round(s["mean"], 4), "stderr": rounded(s["stderr"]), "ci95": rounded(s["ci"]),
                  "ci_corrected": rounded(s["ci_corrected"]), "p_value": rounded(s["p_value"]), "p_holm": rounded(p_holm),
                  "family_size": family, "alpha": alpha, "min_effect_db": min_effect_db, "transfers": transfers,
                  "verdict": VERDICTS[r["source"]][transfers]})
    return rows


def _panel(result: MethodResult, eps: float) -> dict[str, torch.Tensor]:
    """First image: clean and worst-case (surrogate-transferred, else white-box) reconstruction at
    `eps`, their difference, and the posterior std of the clean reconstruction."""
    conds = result.conditions
    clean = _clean_index(conds)
    attacked = [i for i, c in enumerate(conds) if c.perturbation == "worst-case" and c.eps == eps]
    attacked.sort(key=lambda i: conds[i].source != "surrogate")
    r = result.recon
    out = {"clean": r[clean, 0, 0, 0], "std": r[clean, 0].std(dim=0, unbiased=True)[0] if r.shape[2] > 1 else torch.zeros_like(r[clean, 0, 0, 0])}
    if attacked:
        i = attacked[0]
        out.update(perturbed=r[i, 0, 0, 0], difference=(r[i, 0, 0, 0] - r[clean, 0, 0, 0]).abs(), source=conds[i].source)
    return out


@dataclass
class Measurements:
    """Images the probe reconstructs: ground truth (N, 1, H, W) in [0, 1]; their full k-space (N, *k)
    when it was measured (`--kspace`), else None (simulated from the truth); per-image coil maps
    (N, C, H, W) of real multi-coil data, else None."""

    truth: torch.Tensor
    kspace: torch.Tensor | None = None
    coil_maps: torch.Tensor | None = None

    def to(self, device) -> "Measurements":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Measurements(move(self.truth), move(self.kspace), move(self.coil_maps))

    def scaled(self, factor: float) -> "Measurements":
        """Images and k-space times `factor` (the operator is linear; PSNR, NMSE and eps are scale-free)."""
        return Measurements(self.truth * factor, None if self.kspace is None else self.kspace * factor, self.coil_maps)


def _attack_fn(fn: Callable[[torch.Tensor], torch.Tensor], physics, coil_maps: torch.Tensor | None, n: int):
    """fn for the attack's batches (B or E*B elements, eps-major): binds each element's coil maps."""
    if coil_maps is None:
        return fn

    def call(y: torch.Tensor) -> torch.Tensor:
        bind_coil_maps(physics, coil_maps, [i % n for i in range(len(y))])
        return fn(y)

    return call


def probe_acceleration(R: int, data: Measurements, cal: Measurements, s: ProbeSettings, prior, surrogate,
                       device: torch.device, mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Everything at one acceleration: the mask (`mask` when the user gave one), TV's lambda and the
    DPS weight on the calibration images' clean data, the perturbations (surrogate -> transferred,
    white-box TV, the measured-norm control), every method's batched reconstructions, their rows,
    per-image statistics, changes, transfer cells (finished by `finalize_transfer`) and panel."""
    from medgen.recon.baselines import calibrate_tv_lambda

    truth, x_cal = data.truth, cal.truth
    H, W = truth.shape[-2:]
    cf = center_fraction_for(R) if s.center_fraction is None else float(s.center_fraction)
    user_mask = mask is not None
    if mask is None:
        mask = kspace_mask((H, W), R, s.mask, cf, seed=s.mask_seed)
    coils = s.coils if data.coil_maps is None else int(data.coil_maps.shape[1])
    physics = mri_physics(mask, coils, device, coil_maps=data.coil_maps)
    full = fully_sampled(physics)
    gen = torch.Generator().manual_seed(s.seed * 7 + R)

    def measured(m: Measurements) -> torch.Tensor:
        """Full k-space, with measurement noise (fixed per image: clean and perturbed share it)."""
        k = m.kspace if m.kspace is not None else full.A(to_complex(m.truth))  # simulated: no per-image maps
        if s.noise_sigma > 0:
            from medgen.recon.fastmri import add_measurement_noise

            k = add_measurement_noise(k, physics.mask, float(s.noise_sigma), gen)
        return k

    kspace = measured(data)
    k_cal = measured(cal)
    y_cal = apply_mask(k_cal, physics.mask)
    columns = mask[0] > 0
    out: dict[str, Any] = {"mask": {"kind": "user" if user_mask else s.mask, "acceleration": int(R),
                                    "center_fraction": None if user_mask else cf,
                                    "center_columns": None if user_mask else mask_lines(W, R, cf)[0],
                                    "sampled_columns": int(columns.sum()), "columns": columns.nonzero().flatten().tolist(),
                                    "effective_acceleration": round(W / float(columns.sum()), 3), "seed": s.mask_seed},
                           "tv": None, "dps": None, "seconds": {}, "results": [], "images": [], "changes": [], "transfer": []}
    if "tv" in s.methods:
        bind_coil_maps(physics, cal.coil_maps, range(len(x_cal)))
        out["tv"] = calibrate_tv_lambda(physics, y_cal, x_cal, iterations=s.tv_iterations, prox_iterations=s.tv_prox_iterations)
    if "dps" in s.methods and s.dps_weight == "auto":
        from medgen.recon.sampling import DPS_WEIGHT_GRID

        bind_coil_maps(physics, cal.coil_maps, list(range(len(x_cal))) * len(DPS_WEIGHT_GRID))
        out["dps"] = calibrate_dps_weight(prior.denoiser, prior.sde, physics, y_cal, x_cal, steps=s.steps,
                                          seeds=[_seed(s.seed + 1, i, 0) for i in range(len(x_cal))])
    recons = Reconstructors(physics, s, prior, surrogate, out["tv"] and out["tv"]["lambda"], out["dps"] and out["dps"]["weight"],
                            coil_maps=data.coil_maps)
    N = kspace.shape[0]

    # perturbations: found on the surrogate (transferred), white-box on TV, controls of the same norm
    eps_pos = [e for e in s.eps if e > 0]
    tic = time.perf_counter()
    deltas: dict[str, torch.Tensor] = {}
    if eps_pos:
        deltas["surrogate"] = worst_case_perturbation(_attack_fn(recons.deterministic("surrogate"), physics, data.coil_maps, N),
                                                      kspace, physics.mask, eps_pos, steps=s.attack_steps, lr=s.attack_lr,
                                                      generator=gen, desc=f"attack on the surrogate, R={R}")[0]
        deltas["random"] = random_measured_perturbation(deltas["surrogate"], physics.mask, gen)
        if s.full_kspace_control:
            deltas["random-full"] = random_perturbation(deltas["surrogate"], gen)
        if "tv" in s.methods and s.tv_white_box:
            deltas["tv"] = worst_case_perturbation(_attack_fn(recons.deterministic("tv"), physics, data.coil_maps, N), kspace,
                                                   physics.mask, eps_pos, steps=s.attack_steps, lr=s.attack_lr, generator=gen,
                                                   desc=f"attack on TV, R={R}")[0]
    out["seconds"][f"attack_R{R}"] = round(time.perf_counter() - tic, 2)

    def conditions_for(method: str) -> list[Condition]:
        conds = [Condition("none", None, 0.0, None)]
        for j, e in enumerate(eps_pos):
            part = slice(j * N, (j + 1) * N)
            conds.append(Condition("worst-case", "white-box" if method == "surrogate" else "surrogate", e, deltas["surrogate"][part]))
            if method == "tv" and "tv" in deltas:
                conds.append(Condition("worst-case", "white-box", e, deltas["tv"][part]))
            for control in ("random", "random-full"):
                if control in deltas:
                    conds.append(Condition(control, None, e, deltas[control][part]))
        return conds

    eps_show = max(eps_pos) if eps_pos else 0.0
    bind_coil_maps(physics, data.coil_maps, range(N))
    out["panel"] = {"truth": truth[0, 0].cpu(), "eps": eps_show, "methods": {},
                    "zero_filled": magnitude(zero_filled(physics, apply_mask(kspace, physics.mask)))[0, 0].cpu()}
    for method in s.methods:
        res = reconstruct_all(recons, method, kspace, physics.mask, conditions_for(method), truth, s)
        bind_coil_maps(physics, data.coil_maps, range(N))
        stats = image_stats(res, physics, truth)
        out["seconds"][f"{method}_R{R}"] = round(res.seconds, 2)
        out["results"] += _rows(method, R, "user" if user_mask else s.mask, s.eps, res)
        out["images"] += _image_rows(method, R, res, stats)
        out["changes"] += _changes(method, R, res, stats)
        out["transfer"] += _transfer(method, R, res, stats)
        out["panel"]["methods"][method] = _panel(res, eps_show)
    return out


def split_unseen(n_unseen: int, n_images: int, what: str) -> tuple[list[int], list[int]]:
    """Positions in the unseen images: evaluation first, then calibration (TV's lambda, the DPS weight)
    from images that are neither evaluated nor trained on. With fewer than n_images + N_CALIBRATION,
    calibration keeps a quarter (1 to N_CALIBRATION) and evaluation gets the rest."""
    if n_unseen < 2:
        raise DataError(f"{what}: {n_unseen} held-out image(s) left; the probe needs at least 2 (evaluation and calibration "
                        f"images that neither the prior nor the surrogate trained on); pass more held-out images")
    n_cal = min(N_CALIBRATION, n_unseen - n_images) if n_unseen > n_images else min(N_CALIBRATION, max(1, n_unseen // 4))
    n_eval = min(n_images, n_unseen - n_cal)
    if n_eval < n_images:
        log.warning("%s: %d held-out images for %d requested evaluation images and %d calibration images; evaluating %d",
                    what, n_unseen, n_images, n_cal, n_eval)
    return list(range(n_eval)), list(range(n_eval, n_eval + n_cal))


def _read_measurements(kspace_file: Path, coil_maps_file: Path | None, shape: tuple[int, int], s: ProbeSettings,
                       ) -> tuple[Measurements, Measurements, dict]:
    """fastMRI k-space: evaluation and calibration slices, per-slice coil maps (given or ESPIRiT)."""
    from medgen.recon.fastmri import estimate_coil_maps, read_coil_maps, read_kspace

    ks = read_kspace(kspace_file, image_shape=shape)
    n = ks.kspace.shape[0]
    eval_pos, cal_pos = split_unseen(n, s.n_images, f"--kspace {kspace_file}")
    maps, maps_note = None, None
    if ks.coils > 1:
        if coil_maps_file is not None:
            maps = read_coil_maps(coil_maps_file, n, ks.coils, shape)
            maps_note = f"given: {coil_maps_file}"
        else:
            maps = estimate_coil_maps(ks.kspace)
            maps_note = "ESPIRiT (sigpy), estimated per slice from the fully sampled centre"
    pick = lambda t, pos: None if t is None else t[pos]  # noqa: E731
    info = {"kspace": str(Path(kspace_file).resolve()), "slices": [ks.slices[i] for i in eval_pos],
            "calibration_slices": [ks.slices[i] for i in cal_pos], "coils": ks.coils, "coil_maps": maps_note,
            "cropped": ks.cropped, "scaling": "each slice's k-space divided by its reference image's max (RSS for multi-coil)"}
    return (Measurements(ks.truth[eval_pos], ks.kspace[eval_pos], pick(maps, eval_pos)),
            Measurements(ks.truth[cal_pos], ks.kspace[cal_pos], pick(maps, cal_pos)), info)


def run_probe(prior: str | os.PathLike, data: str | os.PathLike | None, out: str | os.PathLike, *,
              surrogate: str | os.PathLike | None = None, settings: ProbeSettings | None = None, data_cfg: dict | None = None,
              device: str | torch.device | None = None, overwrite: bool = False, surrogate_overrides: Sequence[str] = (),
              kspace: str | os.PathLike | None = None, coil_maps: str | os.PathLike | None = None,
              mask_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the probe and write REPORT_DIR (report.json, report.md, psnr_vs_eps.png, panels.png);
    returns the report dict. Images come from `data` (a folder medgen reads; k-space simulated) or
    from `kspace` (a fastMRI-format .h5; `data` then only trains a surrogate when none is given);
    `mask_file` replaces the generated masks with the user's."""
    from medgen.data import scan_dataset
    from medgen.io import atomic_dir, atomic_write_json, ensure_new_output
    from medgen.privacy.detector import default_device
    from medgen.recon.data import load_slices
    from medgen.recon.prior import PixelPrior, check_pixel_prior
    from medgen.recon.report import write_figures, write_markdown
    from medgen.recon.surrogate import load_surrogate, save_surrogate, surrogate_config, surrogate_data, train_surrogate

    s = settings or ProbeSettings()
    out = Path(out)
    ensure_new_output(out, overwrite, "report folder", inputs={"--prior": prior, "--data": data, "--surrogate": surrogate,
                                                              "--kspace": kspace, "--coil-maps": coil_maps, "--mask-file": mask_file})
    s.validate()
    if data is None and (kspace is None or surrogate is None):
        raise ConfigError("the probe needs --data (images, or the images a surrogate is trained on), unless --kspace and "
                          "--surrogate are both given")
    if coil_maps is not None and kspace is None:
        raise ConfigError("--coil-maps goes with --kspace (multi-coil k-space); simulated k-space uses --coils")
    prior_dir = Path(prior)
    prior_config = check_pixel_prior(prior_dir)
    prior_data = prior_config.get("data") or {}
    if data_cfg is None and prior_data.get("spacing"):
        data_cfg = {"spacing": prior_data["spacing"]}  # the prior's resolution
    dev = default_device(device)
    prior_model = PixelPrior(prior_dir, dev)
    ph, pw = prior_model.image_shape
    if prior_model.complex and kspace is None:
        raise ConfigError(f"--prior {prior_dir} is a complex (real, imaginary) prior: it reconstructs measured k-space with "
                          f"its phase; pass --kspace FILE.h5 (magnitude images have none)")

    samples: list = []
    n_blank = 0
    if kspace is not None:
        data_eval, data_cal, kspace_info = _read_measurements(Path(kspace), None if coil_maps is None else Path(coil_maps), (ph, pw), s)
        if prior_model.complex:  # |x| <= 0.5 is |u| <= 1 in the complex prior's units (MedgenDenoiser)
            data_eval, data_cal = data_eval.scaled(0.5), data_cal.scaled(0.5)
            kspace_info["scaling"] += "; times 0.5 for the complex prior (magnitude 1 is its intensity 1)"
        H, W = ph, pw
    else:
        candidates = scan_dataset(data)
        x_all, samples = load_slices(candidates, data_cfg, scaling=s.scaling, intensity=prior_data.get("intensity"))
        n_blank = len(candidates) - len(samples)
        if not samples:
            raise DataError(f"all {n_blank} images of {data} are blank (constant intensity) after preprocessing "
                            f"({data_cfg or 'native size'}); the probe needs images with contrast")
        H, W = x_all.shape[-2:]
        if (ph, pw) != (H, W):
            raise ConfigError(f"--prior {prior_dir} generates {ph}x{pw} images but the slices of {data} are {H}x{W} after "
                              f"preprocessing ({data_cfg or 'native size'}); bring them to {ph}x{pw} with --config (a YAML whose "
                              f"data: section sets shape or spacing) or use a prior trained at {H}x{W}")
    user_mask = None
    if mask_file is not None:
        from medgen.recon.fastmri import read_mask

        user_mask = read_mask(Path(mask_file), (H, W))
        s.accelerations = [max(1, round(W / float((user_mask[0] > 0).sum())))]  # a label: the mask is used as given
    else:
        s.validate(width=W)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        # ---- surrogate: given, or trained now on the data's training split
        if surrogate is None:
            log.info("no --surrogate given: training one on the training split of %s (medgen probe train-surrogate)", data)
            cfg = surrogate_config(list(surrogate_overrides), acceleration=max(s.accelerations), mask=s.mask, coils=s.coils,
                                   data={**surrogate_data(data_cfg), "path": str(data)})
            model = train_surrogate(cfg, dev)
            save_surrogate(model, tmp / "surrogate", overwrite=True)
            surrogate_dir = out / "surrogate"
            sur = model.to(dev).requires_grad_(False)
        else:
            surrogate_dir = Path(surrogate)
            sur = load_surrogate(surrogate_dir, dev)
        if tuple(sur.config["image_shape"]) != (H, W):
            raise ConfigError(f"--surrogate {surrogate_dir} was trained on {sur.config['image_shape']} images, the data are {H}x{W}")

        if kspace is None:
            # ---- evaluation and calibration images: neither trained on by the prior or the surrogate
            trained_on = _training_files(prior_dir, sur.config)
            unseen = [i for i, smp in enumerate(samples) if Path(smp.path).resolve() not in trained_on]
            if not unseen:
                blank = f"{n_blank} blank (constant intensity, dropped) and " if n_blank else ""
                raise DataError(f"no image of {data} is left to evaluate: {blank}{len(samples)} used to train the prior or "
                                f"the surrogate; pass held-out images")
            eval_pos, cal_pos = split_unseen(len(unseen), s.n_images, f"--data {data}")
            eval_idx, calib_idx = [unseen[i] for i in eval_pos], [unseen[i] for i in cal_pos]
            data_eval, data_cal = Measurements(x_all[eval_idx]), Measurements(x_all[calib_idx])
            files = [str(samples[i].path) for i in eval_idx]
            source = {"path": str(Path(data).resolve()), "n_available": len(samples), "excluded_training_images": len(samples) - len(unseen),
                      "files": files, "calibration_files": [str(samples[i].path) for i in calib_idx],
                      "preprocessing": dict(data_cfg or {}),
                      "scaling": {"prior": f"the prior's intensity mapping ({prior_data.get('intensity') or 'auto'}) to [0, 1]",
                                  "minmax": "per-image min-max to [0, 1]"}[s.scaling],
                      "kspace": "simulated from the magnitude images; imaginary part 0"}
        else:
            source = {**kspace_info, "files": [f"{kspace_info['kspace']}#slice{i}" for i in kspace_info["slices"]]}
        log.info("probe: %d evaluation and %d calibration images, %s, R=%s, eps=%s, methods %s", len(data_eval.truth),
                 len(data_cal.truth), dev, list(s.accelerations), s.eps, list(s.methods))

        per_R = {R: probe_acceleration(R, data_eval.to(dev), data_cal.to(dev), s, prior_model, sur, dev, mask=user_mask)
                 for R in s.accelerations}
        for block in per_R.values():
            for key in ("tv", "dps"):
                if block[key]:
                    block[key]["images"] = "held-out images neither evaluated nor trained on"
        masks = {str(R): b["mask"] for R, b in per_R.items()}
        tv_calibration = {str(R): b["tv"] for R, b in per_R.items() if b["tv"]}
        dps_calibration = {str(R): b["dps"] for R, b in per_R.items() if b["dps"]}
        seconds = {k: v for b in per_R.values() for k, v in b["seconds"].items()}
        panels = {str(R): b["panel"] for R, b in per_R.items()}
        coils = s.coils if data_eval.coil_maps is None else int(data_eval.coil_maps.shape[1])

        report = {
            "results": [r for b in per_R.values() for r in b["results"]],
            "transfer": finalize_transfer([r for b in per_R.values() for r in b["transfer"]]),
            "changes": [r for b in per_R.values() for r in b["changes"]],
            "images": [r for b in per_R.values() for r in b["images"]],
            "setup": {
                "physics": {"operator": "deepinv.physics.MRI" if coils == 1 else "deepinv.physics.MultiCoilMRI",
                            "coils": coils, "coil_maps": None if coils == 1 else (source.get("coil_maps") or "birdcage (sigpy), sum |S|^2 = 1"),
                            "fft": "centred, norm=ortho", "image_shape": [H, W], "kspace": source["kspace"],
                            "noise_sigma": s.noise_sigma},
                "masks": masks,
                "attack": {"objective": "max ||f(M(k + delta)) - f(M k)||^2", "space": "full k-space before masking",
                           "norm": "||delta||_2 / ||k||_2 <= eps per image", "optimizer": "Adam", "lr": s.attack_lr,
                           "steps": s.attack_steps, "init": "Gaussian, ||delta_0|| = 1e-3 eps ||k||", "keep": "worst iterate",
                           "sources": {"surrogate": "transferred to every method", "white-box": [m for m in WHITE_BOX if m in s.methods and (m != "tv" or s.tv_white_box)]},
                           "controls": {k: v for k, v in CONTROLS.items() if k == "random" or s.full_kspace_control}},
                "statistics": {"unit": "image (posterior samples averaged first)", "difference": "PSNR(control) - PSNR(worst-case)",
                               "interval": "Student t over images, 95% and Bonferroni alpha / family size",
                               "p_value": "one-sided t test of mean difference <= 0", "correction": "Holm over every (method, R, eps) cell",
                               "transfers": f"Holm-adjusted p < {ALPHA} and mean difference >= {MIN_EFFECT_DB} dB"},
                "methods": list(s.methods),
                "posterior": {"samples": s.posterior_samples, "steps": s.steps, "sampler": "deepinv DDPMSolver on the prior's schedule",
                              "dps_weight": dps_calibration or s.dps_weight, "projection_lambda": s.projection_lambda,
                              "projection_real": s.projection_real, "seed": s.seed},
                "tv": {"solver": "deepinv.optim.FISTA + L2 + TVPrior", "iterations": s.tv_iterations,
                       "prox_iterations": s.tv_prox_iterations, "lambda": tv_calibration},
                "prior": prior_model.recipe,
                "surrogate": {"path": str(surrogate_dir.resolve()), "acceleration": sur.config["acceleration"],
                              "mask": sur.config["mask"], "params": sur.config["params"],
                              "train": {k: v for k, v in sur.config.get("train", {}).items() if k != "train_files"},
                              "trained_now": surrogate is None},
                "data": {**source, "n_images": len(data_eval.truth), "n_calibration": len(data_cal.truth)},
                "differences_from_han": DIFFERENCES_FROM_HAN,
                "metrics": {"psnr": "deepinv PSNR, data_range = max of the ground truth (fastMRI)",
                            "ssim": "fastMRI / scikit-image SSIM (7x7 uniform window), data_range = max of the ground truth",
                            "nmse": "deepinv NMSE ||x - g||^2 / ||g||^2", "on": "magnitude images",
                            "rms_change": "RMS over pixels of perturbed - clean reconstruction (same seeds), image units",
                            "unsampled_change": "||(1 - M) F (perturbed - clean)|| / ||k||: what the prior changed off the samples",
                            "measured_copy": "PSNR of |clean reconstruction + A^H M delta|: a reconstruction that only copies "
                                             "the measured data"},
                "device": str(dev), "seconds": seconds, "settings": asdict(s), "versions": software_versions("deepinv", "sigpy"),
            },
        }
        atomic_write_json(tmp / "report.json", report)
        write_figures(report, panels, tmp)
        write_markdown(report, tmp / "report.md")
    return report
