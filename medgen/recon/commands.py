"""`medgen probe ...` and the demo's probe stage.

    medgen probe train-surrogate --data DIR --out SURR_DIR [--acceleration 8] [--mask equispaced] [key=value ...]
    medgen probe mri --prior RUN_DIR --data DIR --out REPORT_DIR [--surrogate SURR_DIR] [--acceleration 4,8] ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medgen.errors import ConfigError
from medgen.tracking import add_tracker_options, log_report, report_tracker


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    from medgen.recon.settings import MASK_KINDS, METHODS, SCALINGS, ProbeSettings

    d = ProbeSettings()
    p = sub.add_parser("probe", help="MRI reconstruction probe: a pixel prior under worst-case k-space perturbations",
                       description="Probe how MRI reconstructions with a medgen pixel-space prior react to worst-case k-space "
                                   "perturbations found on a supervised surrogate (Han et al. 2024).")
    actions = p.add_subparsers(dest="probe_action", metavar="ACTION", required=True)

    t = actions.add_parser("train-surrogate", help="train the supervised surrogate U-Net (zero-filled -> ground truth, L1)",
                           description="Train the surrogate (deepinv UNet) on the training split of --data; keys of "
                                       "medgen.recon.surrogate.SurrogateConfig as key=value, e.g. train.max_steps=500.")
    t.add_argument("--data", type=Path, required=True, help="2D images (folder or manifest.csv)")
    t.add_argument("--out", type=Path, required=True, help="surrogate folder to write (model.safetensors + config.json)")
    t.add_argument("--acceleration", type=int, default=None, help="R of the training masks (default 8)")
    t.add_argument("--mask", choices=MASK_KINDS, default=None, help="mask kind (default equispaced: a random offset per image)")
    t.add_argument("--coils", type=int, default=None, help="1 (default): single-coil; N: N simulated birdcage coils")
    t.add_argument("--config", type=Path, default=None, help="YAML whose data: section preprocesses the images (shape, spacing)")
    t.add_argument("--device", default="auto")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=500 network.channels_per_scale=[16,32,64]")
    t.set_defaults(func=_train_surrogate)

    m = actions.add_parser("mri", help="run the probe and write REPORT_DIR (report.json, report.md, figures)",
                           description="Reconstruct held-out slices from simulated k-space with the prior (projection sampler, "
                                       "DPS) and baselines (TV, zero-filled, surrogate), clean and under worst-case and random "
                                       "perturbations of relative norm eps.")
    m.add_argument("--prior", type=Path, required=True, help="a 2D pixel-space `medgen train diffusion` run")
    m.add_argument("--data", type=Path, default=None,
                   help="2D images; files the prior or surrogate trained on are skipped (with --kspace: only to train a surrogate)")
    m.add_argument("--kspace", type=Path, default=None,
                   help="measured k-space in the fastMRI format (.h5, dataset kspace: slices x [coils x] H x W, complex) "
                        "instead of images; centre-cropped to the prior's size")
    m.add_argument("--coil-maps", type=Path, default=None,
                   help="coil sensitivities for multi-coil --kspace (.h5 dataset coil_maps, or .npy); default: ESPIRiT estimates")
    m.add_argument("--noise-sigma", type=float, default=d.noise_sigma,
                   help="measurement noise: std per real/imaginary part of the measured k-space, images scaled to [0, 1] (default 0)")
    m.add_argument("--out", type=Path, required=True, help="report folder to write")
    m.add_argument("--surrogate", type=Path, default=None, help="folder from `medgen probe train-surrogate` (default: train one now into OUT/surrogate)")
    m.add_argument("--acceleration", type=_ints, default=list(d.accelerations), help="comma-separated R (default 4,8)")
    m.add_argument("--mask", choices=MASK_KINDS, default=d.mask,
                   help="equispaced-fixed (default): central lines plus every R-th column from the centre, the same for every "
                        "seed; equispaced: deepinv's, offset drawn from the seed; random: random outer columns")
    m.add_argument("--mask-file", type=Path, default=None,
                   help="your own mask (.npy, .h5 dataset mask, or .json list of sampled columns); replaces --mask and "
                        "--acceleration")
    m.add_argument("--eps", type=_floats, default=list(d.eps), help="relative perturbation norms in [0, 1) (default 0,0.01,0.02,0.04,0.08)")
    m.add_argument("--methods", type=_names, default=list(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    m.add_argument("--posterior-samples", type=int, default=d.posterior_samples, help="draws per measurement of each diffusion method (default 4)")
    m.add_argument("--steps", type=int, default=d.steps, help="posterior sampling steps (default 100)")
    m.add_argument("--attack-steps", type=int, default=d.attack_steps, help="Adam steps of the attack (default 200; Han et al.: 2000)")
    m.add_argument("--n-images", type=int, default=d.n_images,
                   help=f"held-out images to evaluate, the unit of the statistics (default {d.n_images}); up to 8 more held-out "
                        f"images calibrate TV and DPS")
    m.add_argument("--scaling", choices=SCALINGS, default=d.scaling,
                   help="prior (default): the intensities the prior was trained on; minmax: each image to [0, 1] (Han et al.)")
    m.add_argument("--full-kspace-control", action="store_true",
                   help="also the older control: Gaussian noise on the full k-space with the worst case's full norm")
    m.add_argument("--tv-white-box", action="store_true",
                   help="also attack TV with its own gradients (through every FISTA iteration; slow on a CPU)")
    m.add_argument("--projection-real", action="store_true",
                   help="keep only the real part after each projection step (Han et al.'s code); default: the complex image")
    m.add_argument("--coils", type=int, default=d.coils, help="1 (default): single-coil MRI; N: multi-coil with N birdcage coils")
    m.add_argument("--dps-weight", default=d.dps_weight, help="DPS guidance weight (deepinv DPSDataFidelity, norm guidance); "
                   "auto (default): the best of a grid on clean calibration images")
    m.add_argument("--projection-lambda", type=float, default=d.projection_lambda, help="Song et al. 2022's lambda (1: replace measured lines)")
    m.add_argument("--tv-iterations", type=int, default=d.tv_iterations)
    m.add_argument("--batch-size", type=int, default=d.batch_size, help="reconstructions per forward batch (memory only)")
    m.add_argument("--config", type=Path, default=None, help="YAML whose data: section preprocesses the images (shape, spacing)")
    m.add_argument("--seed", type=int, default=d.seed)
    m.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    m.add_argument("--overwrite", action="store_true")
    add_tracker_options(m, "--prior")
    m.add_argument("overrides", nargs="*", metavar="key=value",
                   help="surrogate keys (as train-surrogate) for the surrogate trained when --surrogate is not given")
    m.set_defaults(func=_probe_mri)


def _data_cfg(config: Path | None) -> dict | None:
    if config is None:
        return None
    from medgen.config import load_config, select, to_dict

    return dict(to_dict(select(load_config(config), "data")) or {}) or None


def _device(text: str):
    return None if text == "auto" else text


def _train_surrogate(args: argparse.Namespace) -> int:
    from medgen.io import ensure_new_output
    from medgen.recon.surrogate import save_surrogate, surrogate_config, surrogate_data, train_surrogate

    ensure_new_output(args.out, args.overwrite, "surrogate folder", inputs={"--data": args.data, "--config": args.config})
    data = {**surrogate_data(_data_cfg(args.config)), "path": str(args.data)}
    cfg = surrogate_config(args.overrides, acceleration=args.acceleration, mask=args.mask, coils=args.coils, data=data)
    model = train_surrogate(cfg, _device(args.device))
    save_surrogate(model, args.out, overwrite=args.overwrite)
    info = model.config["train"]
    val = info.get("val", {})
    print(f"trained surrogate on {info['n_train']} images (R={cfg['acceleration']}, {cfg['mask']}): L1 {info['initial_loss']:.4f} -> "
          f"{info['final_loss']:.4f} in {info['steps']} steps ({info['seconds']} s)"
          + (f"; validation PSNR {val['psnr_surrogate']:.2f} dB (zero-filled {val['psnr_zero_filled']:.2f})" if val else ""))
    print(f"surrogate: {args.out}")
    return 0


def _probe_mri(args: argparse.Namespace) -> int:
    from medgen.recon.probe import run_probe
    from medgen.recon.settings import ProbeSettings

    if args.overrides and args.surrogate is not None:
        raise ConfigError(f"key=value overrides {args.overrides} configure the surrogate trained when --surrogate is absent; "
                          f"drop them or --surrogate")
    tracker = report_tracker(args.tracker, args.prior)
    settings = ProbeSettings(accelerations=args.acceleration, mask=args.mask, eps=args.eps, methods=args.methods,
                             posterior_samples=args.posterior_samples, steps=args.steps, attack_steps=args.attack_steps,
                             n_images=args.n_images, coils=args.coils, dps_weight=args.dps_weight,
                             projection_lambda=args.projection_lambda, tv_iterations=args.tv_iterations,
                             batch_size=args.batch_size, seed=args.seed, scaling=args.scaling,
                             full_kspace_control=args.full_kspace_control, projection_real=args.projection_real,
                             tv_white_box=args.tv_white_box,
                             noise_sigma=args.noise_sigma)
    report = run_probe(args.prior, args.data, args.out, surrogate=args.surrogate, settings=settings,
                       data_cfg=_data_cfg(args.config), device=_device(args.device), overwrite=args.overwrite,
                       surrogate_overrides=args.overrides, kspace=args.kspace, coil_maps=args.coil_maps, mask_file=args.mask_file)
    print_summary(report)
    print(f"report: {args.out / 'report.md'}")
    log_report(args.out, tracker, args.tracker_dir, job="probe")
    return 0


def transfer_line(t: dict) -> str:
    """One transfer cell for a person: drops, the paired difference with its interval, the verdict."""
    ci = t.get("ci95")
    interval = f", 95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
    p = f", Holm p {t['p_holm']:.3g}" if t.get("p_holm") is not None else ""
    return (f"PSNR drop {t['psnr_drop_worst_case']:.2f} dB (worst-case) vs {t['psnr_drop_random']:.2f} dB (random, same measured "
            f"norm; copying the measured data alone: {t['measured_copy_drop_worst_case']:.2f}), difference "
            f"{t['difference']:+.2f} dB{interval}{p} over {t['n_images']} images: {t['verdict']}")


def print_summary(report: dict, indent: str = "") -> None:
    """One line per method and R: clean PSNR and the PSNR at the largest eps, worst-case vs random;
    then the transfer verdict of each diffusion method at the largest eps."""
    rows = report["results"]
    top = max((r["eps"] for r in rows), default=0.0)
    for r in rows:
        if r["perturbation"] != "none":
            continue
        same = [o for o in rows if o["method"] == r["method"] and o["acceleration"] == r["acceleration"] and o["eps"] == top]
        source = "white-box" if r["method"] == "surrogate" else "surrogate"  # the transferred one, the surrogate's own
        worst = next((o for o in same if o["perturbation"] == "worst-case" and o["source"] == source), None)
        rand = next((o for o in same if o["perturbation"] == "random"), None)
        line = f"{indent}{r['method']:>11} R={r['acceleration']}: clean {r['psnr']:.2f} dB"
        if worst and rand and top > 0:
            line += f", eps={top:g}: worst-case {worst['psnr']:.2f} / random {rand['psnr']:.2f} dB"
        print(line)
    for t in report.get("transfer", []):
        if t["method"] in ("projection", "dps") and t["eps"] == top:
            print(f"{indent}  {t['method']} R={t['acceleration']}, eps={top:g}: {transfer_line(t)}")


# ----------------------------------------------------------------------------- demo


# quick: the smoke run (~5 s on 2 cores); full: ~1.5 min on 2 cores (the prior and surrogate included), on the
# 64 px cohort resampled to 32 px
DEMO_SETTINGS = {
    True: {"prior": ["train.max_steps=30", "model.channels=[8,16]", "model.attention_levels=[false,false]",
                     "model.head_channels=8", "model.norm_groups=4", "train.batch_size=8", "sample.n_preview=2", "sample.steps=2"],
           "surrogate": ["train.max_steps=30", "train.batch_size=8", "network.channels_per_scale=[8,16]"],
           "probe": {"accelerations": [8], "eps": [0.0, 0.04, 0.08], "n_images": 2, "posterior_samples": 2, "steps": 5,
                     "attack_steps": 5, "tv_iterations": 5}},
    False: {"prior": [], "surrogate": ["train.max_steps=200", "network.channels_per_scale=[16,32,64]"],
            "probe": {"accelerations": [4, 8], "eps": [0.0, 0.08], "n_images": 24, "posterior_samples": 2,
                      "steps": 25, "attack_steps": 30, "tv_iterations": 100}},
}


def _demo_prior(ctx, data_cfg: dict) -> Path:
    """A 2D pixel-space run of this demo (the diffusion stage without an autoencoder), else a small
    one trained now with configs/demo_probe_2d.yaml."""
    from medgen.config import load_config
    from medgen.demo import demo_config
    from medgen.recon.prior import check_pixel_prior
    from medgen.train.diffusion import DEFAULTS, train_diffusion

    run = ctx.state.get("diffusion_run")
    if run is not None and not data_cfg:
        try:
            check_pixel_prior(run)
            return Path(run)
        except ConfigError:
            pass  # a latent run: train a pixel prior below
    overrides = [f"data.path={ctx.cohort}", "train.tracker=none", *DEMO_SETTINGS[bool(ctx.quick)]["prior"]]
    if data_cfg.get("spacing"):
        overrides.append(f"data.spacing={list(data_cfg['spacing'])}")
    steps = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.max_steps=")), None)
    if steps:
        overrides += [f"train.checkpoint_every={steps}", f"train.preview_every={steps}"]
    cfg = load_config(demo_config("demo_probe_2d.yaml"), overrides, DEFAULTS)
    return train_diffusion(cfg, Path(ctx.out) / "probe_prior")


def demo_stage(ctx) -> None:
    """Train a small pixel prior and a surrogate on the 2D cohort, then write the probe report
    (ctx.state["probe_report"]). 3D demos skip it: the probe reconstructs 2D slices."""
    from medgen.recon.probe import run_probe
    from medgen.recon.settings import ProbeSettings
    from medgen.recon.surrogate import save_surrogate, surrogate_config, train_surrogate

    if ctx.dims != 2:
        print("  probe: skipped (the MRI probe reconstructs 2D slices with a 2D pixel-space prior; run `medgen demo --dims 2`)")
        return
    if ctx.cohort is None:
        raise ConfigError("the probe stage needs the cohort stage first")
    settings = DEMO_SETTINGS[bool(ctx.quick)]
    size = ctx.cohort_settings()["size"]
    data_cfg = {"spacing": [size / 32, size / 32]} if size > 32 else {}  # probe 32 px slices
    prior = _demo_prior(ctx, data_cfg)
    cfg = surrogate_config(settings["surrogate"], acceleration=8, mask="equispaced", data={**data_cfg, "path": str(ctx.cohort)})
    surrogate = save_surrogate(train_surrogate(cfg), Path(ctx.out) / "probe_surrogate", overwrite=True)
    report = run_probe(prior, ctx.cohort, Path(ctx.out) / "probe", surrogate=surrogate, settings=ProbeSettings(**settings["probe"]),
                       data_cfg=data_cfg or None, overwrite=True)
    ctx.state["probe_report"] = Path(ctx.out) / "probe" / "report.json"
    print(f"  probe: prior {prior}, surrogate {surrogate}")
    print_summary(report, indent="    ")
    print(f"  report: {Path(ctx.out) / 'probe' / 'report.md'}")
    if ctx.quick:
        print("  (quick mode: a prior and surrogate trained for seconds; the numbers only show that the stage runs)")
