"""Sample quality per sampler on a trained prior (issue 16): residual noise, FD_pca, time per sample.

For each sampler (and each variant of the scheduler settings) it draws `--n` samples with seeds
`seed .. seed + n - 1` and reports

- noisy: the share of samples whose high-frequency energy, mean |x - GaussianBlur(x, sigma=1)|,
  is more than twice the training images' mean (medgen.diffusion.quality);
- hf: the samples' median high-frequency energy over the training images' mean;
- FD_pca: the Fréchet distance to the training images on the in-domain PCA features
  (medgen.metrics.features.PCAExtractor fitted on the training images; comparable only
  between rows of one run);
- s/sample: wall time per sample (noisy on a shared machine: compare rows of one process).

Rows:
- `ours:SAMPLER@STEPS` — `medgen.load_pipeline(run).sample(...)`, what `medgen sample` writes;
- `real:heldout` — the run's val + holdout images (the floor of FD_pca at this n);
- `diffusers:SCHEDULER@STEPS` — diffusers' own sampling loop on the same weights and the same
  initial noise, with diffusers' default settings for that scheduler (the loop of
  `DDPMPipeline`/`DDIMPipeline`, plus `init_noise_sigma`/`scale_model_input` for Euler as in
  diffusers' Stable Diffusion pipelines); `diffusers:SCHEDULER[key=value,...]@STEPS` overrides
  scheduler settings (the ablations of issue 16).

    python eval/sampler_quality.py --run runs/dm2d --n 32 --steps 25
    python eval/sampler_quality.py --run runs/dm2d --rows ours:ddpm@1000,ours:dpmpp@25,diffusers:dpmpp@25
    python eval/sampler_quality.py --run runs/dm2d --ablation           # the settings of issue 16, one by one

The run's own `split.json` picks the training images (its data folder must still exist).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgen.diffusion import generators  # noqa: E402
from medgen.diffusion.quality import high_frequency_energy  # noqa: E402
from medgen.diffusion.schedule import PREDICTION_TYPES  # noqa: E402
from medgen.versions import cpu_name  # noqa: E402


# ----------------------------------------------------------------------------- real images


def split_images(run: Path, part: str = "train") -> torch.Tensor:
    """The run's training (or val + holdout: part="heldout") images, preprocessed as in training:
    (N, C, *S) in [-1, 1]."""
    from medgen.data import load_images
    from medgen.data.dataset import scan_dataset

    config = json.loads((run / "model" / "config.json").read_text())
    split = json.loads((run / "split.json").read_text())
    subjects = split["subjects"]
    keep = set(subjects["train"]) if part == "train" else set(subjects["val"]) | set(subjects["holdout"])
    samples = [s for s in scan_dataset(split["data"]) if s.subject_id in keep]
    images, _ = load_images(samples, config["data"])
    return images


# ----------------------------------------------------------------------------- diffusers' loop

_SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp": "DPMSolverMultistepScheduler",
               "euler": "EulerDiscreteScheduler"}


def diffusers_scheduler(name: str, schedule, overrides: dict):
    """diffusers' scheduler `name` on the run's betas and target, otherwise diffusers' defaults.

    Returns (scheduler, step_kwargs): overrides named in `scheduler.step`'s signature (eta,
    use_clipped_model_output) go to every step, the rest to the scheduler's config.
    """
    import inspect

    import diffusers

    cls = getattr(diffusers, _SCHEDULERS[name])
    step_keys = set(inspect.signature(cls.step).parameters)
    step_kwargs = {k: v for k, v in overrides.items() if k in step_keys}
    overrides = {k: v for k, v in overrides.items() if k not in step_keys}
    kw = dict(num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
              beta_end=schedule.beta_end, beta_schedule=schedule.scheduler_kwargs()["beta_schedule"],
              prediction_type=PREDICTION_TYPES[schedule.prediction])
    if schedule.zero_terminal_snr:
        kw["rescale_betas_zero_snr"] = True
    kw.update(overrides)
    return cls(**kw), step_kwargs


@torch.no_grad()
def diffusers_loop(pipe, scheduler, steps: int, seeds: list[int], step_kwargs: dict | None = None) -> torch.Tensor:
    """diffusers' pipeline loop (DDPMPipeline + init_noise_sigma/scale_model_input) on our weights."""
    from diffusers.utils.torch_utils import randn_tensor

    gens = generators(seeds, pipe.device)
    x = randn_tensor((len(seeds), *pipe.sample_shape), generator=gens, device=pipe.device, dtype=torch.float32)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=pipe.device)
    for t in scheduler.timesteps:
        out = pipe.denoiser(scheduler.scale_model_input(x, t), t.expand(len(seeds)), None)
        x = scheduler.step(out, t, x, generator=gens, **(step_kwargs or {})).prev_sample
    return x.clamp(-1, 1).cpu()


@torch.no_grad()
def ddim_probe(pipe, steps: int, seeds: list[int], clip: tuple[int, int] | None = None,
               eta: tuple[int, int] | None = None) -> torch.Tensor:
    """DDIM (trailing spacing, final alpha 1, float64 updates) that clips x0 to [-1, 1] only for
    clip[0] <= t <= clip[1] and is ancestral (eta = 1) only for eta[0] <= t <= eta[1]: where along
    the trajectory does the noise come from? (Song et al. 2021, Eq. 12.)"""

    def within(t: int, span) -> bool:
        return span is not None and span[0] <= t <= span[1]

    from diffusers.utils.torch_utils import randn_tensor

    from medgen.diffusion import predict_x0

    ac = pipe.schedule.alphas_cumprod().double()
    T = len(ac)
    ts = [T - 1 - i * (T // steps) for i in range(steps)]  # trailing: 999, 959, ..., 39
    gens = generators(seeds, pipe.device)
    x = randn_tensor((len(seeds), *pipe.sample_shape), generator=gens, dtype=torch.float32).double()
    for i, t in enumerate(ts):
        a, a_prev = ac[t], (ac[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64))
        out = pipe.denoiser(x.float(), torch.full((len(seeds),), t), None).double()
        x0 = predict_x0(pipe.schedule.prediction, out, x, a.expand(len(seeds)))
        if within(t, clip):
            x0 = x0.clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt() if pipe.schedule.prediction != "eps" else out
        var = float(within(t, eta)) * (1 - a_prev) / (1 - a) * (1 - a / a_prev)  # sigma_t^2 of Song et al. 2021
        x = a_prev.sqrt() * x0 + (1 - a_prev - var).clamp(min=0).sqrt() * eps
        if var > 0:
            x = x + var.sqrt() * randn_tensor(x.shape, generator=gens, dtype=torch.float32).double()
    return x.float().clamp(-1, 1).cpu()


# ----------------------------------------------------------------------------- rows


def split_top(text: str) -> list[str]:
    """Split on the commas outside brackets: 'a[x=1,y=[2,3]]@5,b@5' -> ['a[x=1,y=[2,3]]@5', 'b@5']."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts + [text[start:]] if p.strip()]


def parse_row(spec: str) -> tuple[str, str, dict, int]:
    """'ours:dpmpp@25' | 'diffusers:dpmpp[lower_order_final=false]@25' -> (kind, sampler, overrides, steps)."""
    kind, rest = spec.split(":", 1)
    rest, steps = rest.rsplit("@", 1)
    overrides = {}
    if "[" in rest:
        rest, kv = rest[:-1].split("[", 1)
        for item in split_top(kv):
            key, value = item.split("=", 1)
            try:
                overrides[key] = json.loads(value)  # numbers, true/false, null
            except json.JSONDecodeError:
                overrides[key] = value  # plain words: trailing, sigma_min
    return kind, rest, overrides, int(steps)


def draw(pipe, spec: str, n: int, seed: int, batch_size: int) -> torch.Tensor:
    if spec == "real:heldout":  # the floor: real images the model never saw
        return split_images(pipe.run_dir, "heldout")[:n]
    kind, sampler, overrides, steps = parse_row(spec)
    if kind == "ours":
        return pipe.sample(n, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size, **overrides)
    if kind == "diffusers":
        if pipe.autoencoder is not None:
            raise SystemExit("diffusers rows are for pixel-space runs")
        out = []
        for i in range(0, n, batch_size):
            scheduler, step_kwargs = diffusers_scheduler(sampler, pipe.schedule, overrides)
            seeds = list(range(seed + i, seed + min(n, i + batch_size)))
            out.append(diffusers_loop(pipe, scheduler, steps, seeds, step_kwargs))
        return torch.cat(out)
    if kind == "probe":
        return torch.cat([ddim_probe(pipe, steps, list(range(seed + i, seed + min(n, i + batch_size))), **overrides)
                          for i in range(0, n, batch_size)])
    raise SystemExit(f"unknown row kind {kind!r} in {spec!r}")


def measure(samples: torch.Tensor, real: torch.Tensor, real_hf: float, extractor, real_feats) -> dict:
    from medgen.metrics import frechet_distance

    hf = high_frequency_energy(samples)
    return {
        "noisy": int((hf > 2 * real_hf).sum()), "n": len(samples),
        "hf_median_ratio": round(float(hf.median()) / real_hf, 3),
        "fd_pca": round(frechet_distance(real_feats, extractor(samples)), 3),
        "min": round(float(samples.min()), 3), "max": round(float(samples.max()), 3),
    }


@torch.no_grad()
def denoiser_profile(pipe, real: torch.Tensor, timesteps=(0, 9, 19, 39, 79, 159, 319, 639, 999), seed: int = 0) -> list[dict]:
    """How well the denoiser removes noise from the training images at each timestep.

    eps_mse: E|eps_hat - eps|^2 (the unweighted training loss of an eps model);
    x0_rmse: E|x0_hat - x0|^2 ^ 1/2 (in [-1, 1] intensities);
    gain: <eps_hat, eps> / <eps, eps>, the share of the true noise that the prediction recognises
    (1 for a perfect denoiser; < 1 leaves noise in x0_hat).
    """
    from medgen.diffusion import add_noise, predict_x0

    ac = pipe.schedule.alphas_cumprod()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in timesteps:
        noise = torch.randn(real.shape, generator=g)
        a = ac[t].expand(len(real))
        x_t = add_noise(real, noise, a)
        out = torch.cat([pipe.denoiser(x_t[i:i + 64], torch.full((len(x_t[i:i + 64]),), t), None).float()
                         for i in range(0, len(x_t), 64)])
        x0 = predict_x0(pipe.schedule.prediction, out, x_t, a)
        ab = a.view(-1, *([1] * (real.ndim - 1)))
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        rows.append({"t": t, "snr": round(float(ac[t] / (1 - ac[t])), 4),
                     "eps_mse": round(float((eps - noise).square().mean()), 4),
                     "x0_rmse": round(float((x0 - real).square().mean().sqrt()), 4),
                     "gain": round(float((eps * noise).sum() / noise.square().sum()), 4)})
    return rows


ABLATION = [
    # diffusers' own defaults (leading/linspace spacing, DDPM/DDIM clip, no DPM++ thresholding)
    "diffusers:ddpm@25", "diffusers:ddim@25", "diffusers:dpmpp@25", "diffusers:euler@25",
    # our settings through diffusers' loop (must equal ours:SAMPLER@25), then one change at a time
    "diffusers:dpmpp[timestep_spacing=trailing,thresholding=true,sample_max_value=1.0]@25",
    "diffusers:dpmpp[timestep_spacing=trailing]@25",
    "diffusers:dpmpp[thresholding=true,sample_max_value=1.0]@25",
    "diffusers:dpmpp[timestep_spacing=trailing,thresholding=true,sample_max_value=1.0,lower_order_final=false]@25",
    "diffusers:dpmpp[timestep_spacing=trailing,thresholding=true,sample_max_value=1.0,final_sigmas_type=sigma_min]@25",
    "diffusers:dpmpp[timestep_spacing=trailing,thresholding=true,sample_max_value=1.0,euler_at_final=true]@25",
    "diffusers:dpmpp[timestep_spacing=trailing,thresholding=true,sample_max_value=1.0,solver_order=1]@25",
    "diffusers:dpmpp[timestep_spacing=trailing,thresholding=true,sample_max_value=1.0,algorithm_type=sde-dpmsolver++]@25",
    "diffusers:ddim[timestep_spacing=trailing,set_alpha_to_one=true]@25",
    "diffusers:ddim[timestep_spacing=trailing,set_alpha_to_one=true,clip_sample=false]@25",
    "diffusers:ddim[timestep_spacing=trailing,set_alpha_to_one=true,use_clipped_model_output=true]@25",
    "diffusers:euler[timestep_spacing=trailing]@25",
    "diffusers:ddpm[timestep_spacing=trailing,clip_sample=false]@25",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a finished `medgen train diffusion` run")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows", default=None, help="comma-separated row specs, e.g. ours:dpmpp@25,diffusers:ddim[clip_sample=false]@25 (default: ours:SAMPLER@STEPS per sampler + ours:ddpm@1000)")
    p.add_argument("--ablation", action="store_true", help="the scheduler settings of issue 16, one at a time")
    p.add_argument("--profile", action="store_true", help="print the denoiser's error per timestep on the training images (alone unless --rows/--ablation)")
    p.add_argument("--grids", type=Path, default=None, help="write one PNG grid per row into this folder")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per row here")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import medgen
    from medgen.diffusion import SAMPLERS
    from medgen.metrics.features import PCAExtractor

    pipe = medgen.load_pipeline(args.run, device="cpu")
    pipe.run_dir = args.run
    if args.ablation:
        rows = ABLATION
    elif args.rows:
        rows = split_top(args.rows)
    else:
        rows = [f"ours:{s}@{args.steps}" for s in SAMPLERS] + ["ours:ddpm@1000"]
    real = split_images(args.run, "train")
    real_hf = float(high_frequency_energy(real).mean())
    extractor = PCAExtractor().fit(real)
    real_feats = extractor(real)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"run {args.run}: {len(real)} training images, hf mean {real_hf:.4f}; {args.n} samples per row, seed {args.seed}; {machine}")
    if args.profile:
        print("| t | SNR | eps MSE | x0 RMSE | noise gain |")
        print("|---|---|---|---|---|")
        if pipe.autoencoder is not None:  # the denoiser's data are the scaled latents
            from medgen.train.encode import load_latent_cache

            z, _ = load_latent_cache(args.run / "latents")
            profile_data = z[:160] * float(pipe.config["latent"]["scale_factor"])
        else:
            profile_data = real
        for r in denoiser_profile(pipe, profile_data):
            print(f"| {r['t']} | {r['snr']:.4g} | {r['eps_mse']:.4f} | {r['x0_rmse']:.4f} | {r['gain']:.3f} |", flush=True)
        if not args.rows and not args.ablation:
            return
    print("| row | noisy | median hf / training | FD_pca | range | s/sample |")
    print("|---|---|---|---|---|---|")
    for spec in rows:
        t0 = time.perf_counter()
        x = draw(pipe, spec, args.n, args.seed, args.batch_size)
        dt = (time.perf_counter() - t0) / args.n
        m = measure(x, real, real_hf, extractor, real_feats)
        print(f"| `{spec}` | {m['noisy']} / {m['n']} | {m['hf_median_ratio']:.2f} | {m['fd_pca']:.2f} | "
              f"[{m['min']:.2f}, {m['max']:.2f}] | {dt:.3f} |", flush=True)
        if args.grids:
            from medgen.train.preview import grid_png

            args.grids.mkdir(parents=True, exist_ok=True)
            name = spec.replace(":", "_").replace("@", "_").replace("[", "_").replace("]", "").replace(",", "_").replace("=", "-")
            (args.grids / f"{name}.png").write_bytes(grid_png(x.clamp(-1, 1)))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"row": spec, "run": str(args.run), "seed": args.seed, "s_per_sample": round(dt, 4),
                                    "machine": machine, **m}) + "\n")


if __name__ == "__main__":
    main()
