"""Speed of the MRI probe's reconstructions: images/s for each method, on the CPU and on a GPU when present.

    python eval/bench_probe.py [--size 32] [--batch 32] [--steps 20] [--devices cpu,cuda]

The prior is a medgen pixel UNet at the demo probe config's plan (configs/demo_probe_2d.yaml; random
weights: speed does not depend on them), the surrogate the demo's deepinv UNet. The anchor for the
diffusion methods is medgen's own unconditional DDPM sampler (`medgen.diffusion.sample_loop`, the same
network, steps and batch): `ratio` = method images/s / anchor images/s, i.e. the cost of the data
consistency (projection: deepinv's A and A^+ per step; DPS: a backward pass through the network per
step) and of running through deepinv's solver. `batched` is images/s at the full batch over images/s one
measurement at a time: the probe batches all eps values, posterior samples and images of a method.
Also: attack steps/s on the surrogate and white-box on TV (forward + backward per step, per image).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up (allocations, cuDNN autotuning, JIT of the coil maps)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - tic) / repeat


def bench(device: str, size: int, batch: int, steps: int) -> list[tuple[str, float, float | None, float | None]]:
    from medgen.diffusion import NoiseSchedule, generators, sample_loop
    from medgen.models.unet import build_denoiser
    from medgen.recon.attack import worst_case_perturbation
    from medgen.recon.baselines import tv_reconstruct
    from medgen.recon.kspace import apply_mask, fully_sampled, kspace_mask, magnitude, mri_physics, to_complex, zero_filled
    from medgen.recon.prior import DiscreteScheduleSDE, MedgenDenoiser
    from medgen.recon.sampling import dps_reconstruct, projection_reconstruct, sample_generators
    from medgen.recon.surrogate import Surrogate, build_network

    torch.manual_seed(0)
    schedule = NoiseSchedule(schedule="linear", beta_start=1e-4, beta_end=0.02)
    net = build_denoiser("medgen", spatial_dims=2, in_channels=1, channels=[16, 32, 32], num_res_blocks=1,
                         attention_levels=[False, False, True], head_channels=16, norm_groups=8, num_classes=0).to(device).eval()
    den, sde = MedgenDenoiser(net, schedule).to(device), DiscreteScheduleSDE(schedule)
    sur = Surrogate(build_network({"channels_per_scale": [16, 32, 64]}), {}).to(device).eval().requires_grad_(False)
    physics = mri_physics(kspace_mask((size, size), 8), 1, device)
    x = torch.rand(batch, 1, size, size, device=device)
    k = fully_sampled(physics).A(to_complex(x))
    y = apply_mask(k, physics.mask)
    rows = []

    def rate(fn, n: int, repeat: int = 1) -> float:
        return n / _timed(fn, repeat)

    anchor = rate(lambda: sample_loop(net, schedule, (1, size, size), generators(range(batch)), sampler="ddpm", steps=steps,
                                      clip_x0=True, device=device), batch)
    rows.append(("anchor: medgen DDPM, unconditional", anchor, 1.0, None))
    for name, run in (("projection", projection_reconstruct), ("dps", dps_reconstruct)):
        full = rate(lambda: run(den, sde, physics, y, sample_generators(range(batch)), steps=steps), batch)
        single = rate(lambda: run(den, sde, physics, y[:1], sample_generators([0]), steps=steps), 1)
        rows.append((name, full, full / anchor, full / single))
    with torch.no_grad():
        for name, fn in (("tv (FISTA 100 x prox 20)", lambda yy: tv_reconstruct(physics, yy, 1e-2, iterations=100)),
                         ("zero-filled", lambda yy: zero_filled(physics, yy)), ("surrogate", lambda yy: sur(physics, yy))):
            full = rate(lambda: fn(y), batch, repeat=3)
            single = rate(lambda: fn(y[:1]), 1, repeat=3)
            rows.append((name, full, None, full / single))
    for name, f in (("attack step, surrogate", lambda yy: sur(physics, yy)),
                    ("attack step, TV white-box", lambda yy: magnitude(tv_reconstruct(physics, yy, 1e-2, iterations=100)))):
        n_steps = 3
        per_image_step = rate(lambda: worst_case_perturbation(f, k, physics.mask, [0.02], steps=n_steps), batch * (n_steps + 1))
        rows.append((name, per_image_step, None, None))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--devices", default="cpu,cuda")
    args = ap.parse_args()
    import platform

    for device in args.devices.split(","):
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{device}: not available, skipped")
            continue
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else (platform.processor() or "cpu")
        print(f"\n{device} ({name}, torch threads {torch.get_num_threads()}): {args.size}x{args.size}, batch {args.batch}, "
              f"{args.steps} posterior steps, R=8")
        print(f"{'method':<38} {'images/s':>10} {'vs anchor':>10} {'batched':>9}")
        for method, ips, ratio, batched in bench(device, args.size, args.batch, args.steps):
            print(f"{method:<38} {ips:>10.2f} {'' if ratio is None else f'{ratio:.2f}x':>10} "
                  f"{'' if batched is None else f'{batched:.1f}x':>9}")


if __name__ == "__main__":
    main()
