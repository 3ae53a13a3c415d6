"""`medgen probe mri`: how a pixel-space prior's MRI reconstructions react to worst-case k-space
perturbations (Han et al. 2024, "On Instabilities of Unsupervised Denoising Diffusion Models in MRI
Reconstruction").

For each acceleration R: k-space of every evaluation image is simulated with deepinv's operator
(`kspace.py`); perturbations of relative norm eps are found on the supervised surrogate and
transferred to every method (the paper's setting), found white-box on TV and on the surrogate itself,
and matched by random perturbations of the same norm; every method reconstructs the clean and all
perturbed measurements in one batch per method (stochastic methods K times each, with the same seeds
for the clean and the perturbed measurements of an image); metrics follow fastMRI.

Rows of `report.json["results"]`: {method, acceleration, mask, eps, perturbation, source, psnr, ssim,
nmse, psnr_std, n_images, posterior_samples}; psnr, ssim and nmse are means over images and
posterior samples, psnr_std the spread of PSNR over the posterior samples of one image (mean over
images; 0 for deterministic methods), so sampling variability is reported apart from the attack.
eps = 0 rows of the perturbed kinds are the clean reconstruction: delta is exactly 0 there.
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
from medgen.recon.attack import random_perturbation, worst_case_perturbation
from medgen.recon.kspace import (
    apply_mask,
    center_fraction_for,
    fully_sampled,
    kspace_mask,
    magnitude,
    mask_lines,
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
from medgen.recon.settings import WHITE_BOX, ProbeSettings
from medgen.versions import software_versions

log = logging.getLogger(__name__)

N_CALIBRATION = 8  # clean images that choose TV's lambda
TRANSFER_MIN_DB = 0.1  # smaller PSNR differences do not count as a transferred attack, significant or not

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
                 dps_weight: float | None = None):
        self.physics, self.s, self.prior, self.surrogate, self.tv_lambda = physics, settings, prior, surrogate, tv_lambda
        self.dps_weight = settings.dps_weight if dps_weight is None else dps_weight

    def deterministic(self, method: str) -> Callable[[torch.Tensor], torch.Tensor]:
        from medgen.recon.baselines import tv_reconstruct

        p, s = self.physics, self.s
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
            x = projection_reconstruct(prior.denoiser, prior.sde, p, y, gens, steps=s.steps, lam=s.projection_lambda)
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


def _rows(method: str, R: int, mask_kind: str, eps_list: Sequence[float], result: MethodResult) -> list[dict]:
    """report rows of one method at one R (eps = 0 perturbed rows repeat the clean reconstruction)."""
    rows = []
    N, K = result.metrics["psnr"].shape[1:]
    clean_index = next(i for i, c in enumerate(result.conditions) if c.perturbation == "none")

    def row(c: Condition, i: int, eps: float) -> dict:
        m = result.metrics
        spread = m["psnr"][i].std(dim=1, unbiased=True).mean() if K > 1 else torch.tensor(0.0)
        return {"method": method, "acceleration": int(R), "mask": mask_kind, "eps": float(eps), "perturbation": c.perturbation,
                "source": c.source, "psnr": round(float(m["psnr"][i].mean()), 4), "ssim": round(float(m["ssim"][i].mean()), 5),
                "nmse": round(float(m["nmse"][i].mean()), 6), "psnr_std": round(float(spread), 4), "n_images": int(N),
                "posterior_samples": int(K)}

    rows.append(row(result.conditions[clean_index], clean_index, 0.0))
    kinds = sorted({(c.perturbation, c.source) for c in result.conditions if c.perturbation != "none"},
                   key=lambda ps: (ps[0] != "worst-case", str(ps[1])))
    for perturbation, source in kinds:
        if 0.0 in eps_list:
            rows.append(row(Condition(perturbation, source, 0.0, None), clean_index, 0.0))
        for i, c in enumerate(result.conditions):
            if (c.perturbation, c.source) == (perturbation, source):
                rows.append(row(c, i, c.eps))
    return rows


def _changes(method: str, R: int, result: MethodResult) -> list[dict]:
    """Per perturbed condition: the change against the clean reconstruction of the same seeds."""
    out = []
    m, recon = result.metrics, result.recon
    clean = next(i for i, c in enumerate(result.conditions) if c.perturbation == "none")
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
                    "psnr_vs_clean": round(float(psnr(x, ref).mean()), 4),
                    "hallucination": round(float((x - ref).abs().mean()), 6),
                    "posterior_spread": round(spread, 6)})
    return out


def _transfer(method: str, R: int, result: MethodResult) -> list[dict]:
    """Does the surrogate's perturbation hurt this method more than random ones of the same norm?
    Paired over (image, posterior sample): d = PSNR(random) - PSNR(worst-case); it transfers when the
    mean of d exceeds twice its standard error and `TRANSFER_MIN_DB` (a visible effect)."""
    out = []
    conds = result.conditions
    p = result.metrics["psnr"]
    clean = next(i for i, c in enumerate(conds) if c.perturbation == "none")
    for i, c in enumerate(conds):
        if c.perturbation != "worst-case" or c.source != "surrogate":
            continue
        j = next(j for j, o in enumerate(conds) if o.perturbation == "random" and o.eps == c.eps)
        d = (p[j] - p[i]).flatten()
        se = float(d.std(unbiased=True) / d.numel() ** 0.5) if d.numel() > 1 else float("inf")
        out.append({"method": method, "acceleration": int(R), "eps": c.eps, "psnr_drop_worst_case": round(float((p[clean] - p[i]).mean()), 4),
                    "psnr_drop_random": round(float((p[clean] - p[j]).mean()), 4), "difference": round(float(d.mean()), 4),
                    "stderr": round(se, 4) if se != float("inf") else None,
                    "transfers": bool(float(d.mean()) > max(2 * se, TRANSFER_MIN_DB))})
    return out


def _panel(result: MethodResult, eps: float) -> dict[str, torch.Tensor]:
    """First image: clean and worst-case (surrogate-transferred, else white-box) reconstruction at
    `eps`, their difference, and the posterior std of the clean reconstruction."""
    conds = result.conditions
    clean = next(i for i, c in enumerate(conds) if c.perturbation == "none")
    attacked = [i for i, c in enumerate(conds) if c.perturbation == "worst-case" and c.eps == eps]
    attacked.sort(key=lambda i: conds[i].source != "surrogate")
    r = result.recon
    out = {"clean": r[clean, 0, 0, 0], "std": r[clean, 0].std(dim=0, unbiased=True)[0] if r.shape[2] > 1 else torch.zeros_like(r[clean, 0, 0, 0])}
    if attacked:
        i = attacked[0]
        out.update(perturbed=r[i, 0, 0, 0], difference=(r[i, 0, 0, 0] - r[clean, 0, 0, 0]).abs(), source=conds[i].source)
    return out


def probe_acceleration(R: int, truth: torch.Tensor, x_cal: torch.Tensor, s: ProbeSettings, prior, surrogate,
                       device: torch.device) -> dict[str, Any]:
    """Everything at one acceleration: the mask, TV's lambda and the DPS weight on the calibration
    images' clean data, the perturbations (surrogate -> transferred, white-box TV, random control),
    every method's batched reconstructions, their rows, changes, transfer verdicts and panel."""
    from medgen.recon.baselines import calibrate_tv_lambda

    H, W = truth.shape[-2:]
    cf = center_fraction_for(R) if s.center_fraction is None else float(s.center_fraction)
    mask = kspace_mask((H, W), R, s.mask, cf, seed=s.mask_seed)
    physics = mri_physics(mask, s.coils, device)
    full = fully_sampled(physics)
    kspace = full.A(to_complex(truth))  # (N, *k) full k-space
    y_cal = apply_mask(full.A(to_complex(x_cal)), physics.mask)
    n_center, _ = mask_lines(W, R, cf)
    out: dict[str, Any] = {"mask": {"kind": s.mask, "acceleration": int(R), "center_fraction": cf, "center_columns": n_center,
                                    "sampled_columns": int(mask[0].sum()), "effective_acceleration": round(W / float(mask[0].sum()), 3),
                                    "seed": s.mask_seed},
                           "tv": None, "dps": None, "seconds": {}, "results": [], "changes": [], "transfer": []}
    if "tv" in s.methods:
        out["tv"] = calibrate_tv_lambda(physics, y_cal, x_cal, iterations=s.tv_iterations, prox_iterations=s.tv_prox_iterations)
    if "dps" in s.methods and s.dps_weight == "auto":
        out["dps"] = calibrate_dps_weight(prior.denoiser, prior.sde, physics, y_cal, x_cal, steps=s.steps,
                                          seeds=[_seed(s.seed + 1, i, 0) for i in range(len(x_cal))])
    recons = Reconstructors(physics, s, prior, surrogate, out["tv"] and out["tv"]["lambda"], out["dps"] and out["dps"]["weight"])

    # perturbations: found on the surrogate (transferred), white-box on TV, random control
    eps_pos = [e for e in s.eps if e > 0]
    gen = torch.Generator().manual_seed(s.seed * 7 + R)
    tic = time.perf_counter()
    deltas: dict[str, torch.Tensor] = {}
    if eps_pos:
        deltas["surrogate"] = worst_case_perturbation(recons.deterministic("surrogate"), kspace, physics.mask, eps_pos,
                                                      steps=s.attack_steps, lr=s.attack_lr, generator=gen,
                                                      desc=f"attack on the surrogate, R={R}")[0]
        deltas["random"] = random_perturbation(deltas["surrogate"], gen)
        if "tv" in s.methods:
            deltas["tv"] = worst_case_perturbation(recons.deterministic("tv"), kspace, physics.mask, eps_pos,
                                                   steps=s.attack_steps, lr=s.attack_lr, generator=gen, desc=f"attack on TV, R={R}")[0]
    out["seconds"][f"attack_R{R}"] = round(time.perf_counter() - tic, 2)
    N = kspace.shape[0]

    def conditions_for(method: str) -> list[Condition]:
        conds = [Condition("none", None, 0.0, None)]
        for j, e in enumerate(eps_pos):
            part = slice(j * N, (j + 1) * N)
            conds.append(Condition("worst-case", "white-box" if method == "surrogate" else "surrogate", e, deltas["surrogate"][part]))
            if method == "tv":
                conds.append(Condition("worst-case", "white-box", e, deltas["tv"][part]))
            conds.append(Condition("random", None, e, deltas["random"][part]))
        return conds

    eps_show = max(eps_pos) if eps_pos else 0.0
    out["panel"] = {"truth": truth[0, 0].cpu(), "eps": eps_show, "methods": {},
                    "zero_filled": magnitude(zero_filled(physics, apply_mask(kspace, physics.mask)))[0, 0].cpu()}
    for method in s.methods:
        res = reconstruct_all(recons, method, kspace, physics.mask, conditions_for(method), truth, s)
        out["seconds"][f"{method}_R{R}"] = round(res.seconds, 2)
        out["results"] += _rows(method, R, s.mask, s.eps, res)
        out["changes"] += _changes(method, R, res)
        out["transfer"] += _transfer(method, R, res)
        out["panel"]["methods"][method] = _panel(res, eps_show)
    return out


def run_probe(prior: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *, surrogate: str | os.PathLike | None = None,
              settings: ProbeSettings | None = None, data_cfg: dict | None = None, device: str | torch.device | None = None,
              overwrite: bool = False, surrogate_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the probe and write REPORT_DIR (report.json, report.md, psnr_vs_eps.png, panels.png);
    returns the report dict."""
    from medgen.data import scan_dataset
    from medgen.io import atomic_dir, atomic_write_json, ensure_new_output
    from medgen.privacy.detector import default_device
    from medgen.recon.data import load_slices
    from medgen.recon.prior import PixelPrior, check_pixel_prior
    from medgen.recon.report import write_figures, write_markdown
    from medgen.recon.surrogate import load_surrogate, save_surrogate, surrogate_config, surrogate_data, train_surrogate

    s = settings or ProbeSettings()
    out = Path(out)
    ensure_new_output(out, overwrite, "report folder", inputs={"--prior": prior, "--data": data, "--surrogate": surrogate})
    s.validate()
    prior_dir = Path(prior)
    prior_config = check_pixel_prior(prior_dir)
    if data_cfg is None and (prior_config.get("data") or {}).get("spacing"):
        data_cfg = {"spacing": prior_config["data"]["spacing"]}  # the prior's resolution
    dev = default_device(device)
    candidates = scan_dataset(data)
    x_all, samples = load_slices(candidates, data_cfg)
    n_blank = len(candidates) - len(samples)
    if not samples:
        raise DataError(f"all {n_blank} images of {data} are blank (constant intensity) after preprocessing "
                        f"({data_cfg or 'native size'}); the probe needs images with contrast")
    H, W = x_all.shape[-2:]
    prior_model = PixelPrior(prior_dir, dev)
    if prior_model.image_shape != (H, W):
        ph, pw = prior_model.image_shape
        raise ConfigError(f"--prior {prior_dir} generates {ph}x{pw} images but the slices of {data} are {H}x{W} after "
                          f"preprocessing ({data_cfg or 'native size'}); bring them to {ph}x{pw} with --config (a YAML whose data: "
                          f"section sets shape or spacing) or use a prior trained at {H}x{W}")
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

        # ---- evaluation images: not used to train the prior or the surrogate
        trained_on = _training_files(prior_dir, sur.config)
        unseen = [i for i, smp in enumerate(samples) if Path(smp.path).resolve() not in trained_on]
        if not unseen:
            blank = f"{n_blank} blank (constant intensity, dropped) and " if n_blank else ""
            raise DataError(f"no image of {data} is left to evaluate: {blank}{len(samples)} used to train the prior or "
                            f"the surrogate; pass held-out images")
        eval_idx = unseen[: s.n_images]
        calib_idx = [i for i in range(len(samples)) if i not in set(eval_idx)][:N_CALIBRATION]
        calibration_note = "clean images not evaluated"
        if not calib_idx:
            calib_idx, calibration_note = eval_idx[:N_CALIBRATION], "the evaluated images themselves (no other images)"
        truth = x_all[eval_idx].to(dev)
        log.info("probe: %d evaluation images (%d excluded as training images), %s, R=%s, eps=%s, methods %s",
                 len(eval_idx), len(samples) - len(unseen), dev, list(s.accelerations), s.eps, list(s.methods))

        x_cal = x_all[calib_idx].to(dev)
        per_R = {R: probe_acceleration(R, truth, x_cal, s, prior_model, sur, dev) for R in s.accelerations}
        for block in per_R.values():
            for key in ("tv", "dps"):
                if block[key]:
                    block[key]["images"] = calibration_note
        masks = {str(R): b["mask"] for R, b in per_R.items()}
        tv_calibration = {str(R): b["tv"] for R, b in per_R.items() if b["tv"]}
        dps_calibration = {str(R): b["dps"] for R, b in per_R.items() if b["dps"]}
        seconds = {k: v for b in per_R.values() for k, v in b["seconds"].items()}
        panels = {str(R): b["panel"] for R, b in per_R.items()}

        report = {
            "results": [r for b in per_R.values() for r in b["results"]],
            "changes": [r for b in per_R.values() for r in b["changes"]],
            "transfer": [r for b in per_R.values() for r in b["transfer"]],
            "setup": {
                "physics": {"operator": "deepinv.physics.MRI" if s.coils == 1 else "deepinv.physics.MultiCoilMRI",
                            "coils": s.coils, "coil_maps": None if s.coils == 1 else "birdcage (sigpy), sum |S|^2 = 1",
                            "fft": "centred, norm=ortho", "image_shape": [H, W],
                            "kspace": "simulated from magnitude images min-max scaled to [0, 1]; imaginary part 0"},
                "masks": masks,
                "attack": {"objective": "max ||f(M(k + delta)) - f(M k)||^2", "space": "full k-space before masking",
                           "norm": "||delta||_2 / ||k||_2 <= eps per image", "optimizer": "Adam", "lr": s.attack_lr,
                           "steps": s.attack_steps, "init": "Gaussian, ||delta_0|| = 1e-3 eps ||k||", "keep": "worst iterate",
                           "sources": {"surrogate": "transferred to every method", "white-box": list(m for m in WHITE_BOX if m in s.methods)},
                           "control": "Gaussian direction on full k-space with the worst-case delta's norm (per image, eps)"},
                "methods": list(s.methods),
                "posterior": {"samples": s.posterior_samples, "steps": s.steps, "sampler": "deepinv DDPMSolver on the prior's schedule",
                              "dps_weight": dps_calibration or s.dps_weight, "projection_lambda": s.projection_lambda, "seed": s.seed},
                "tv": {"solver": "deepinv.optim.PGD + L2 + TVPrior", "iterations": s.tv_iterations,
                       "prox_iterations": s.tv_prox_iterations, "lambda": tv_calibration},
                "prior": prior_model.recipe,
                "surrogate": {"path": str(surrogate_dir.resolve()), "acceleration": sur.config["acceleration"],
                              "mask": sur.config["mask"], "params": sur.config["params"],
                              "train": {k: v for k, v in sur.config.get("train", {}).items() if k != "train_files"},
                              "trained_now": surrogate is None},
                "data": {"path": str(Path(data).resolve()), "n_images": len(eval_idx), "n_available": len(samples),
                         "excluded_training_images": len(samples) - len(unseen),
                         "files": [str(samples[i].path) for i in eval_idx], "preprocessing": dict(data_cfg or {}),
                         "scaling": "per-image min-max to [0, 1]"},
                "metrics": {"psnr": "deepinv PSNR, data_range = max of the ground truth (fastMRI)",
                            "ssim": "fastMRI / scikit-image SSIM (7x7 uniform window), data_range = max of the ground truth",
                            "nmse": "deepinv NMSE ||x - g||^2 / ||g||^2", "on": "magnitude images"},
                "device": str(dev), "seconds": seconds, "settings": asdict(s), "versions": software_versions("deepinv", "sigpy"),
            },
        }
        atomic_write_json(tmp / "report.json", report)
        write_figures(report, panels, tmp)
        write_markdown(report, tmp / "report.md")
    return report
