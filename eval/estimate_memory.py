"""Peak tensor memory of the benchmarked training steps, measured without a GPU.

Runs the exact steps of `eval/bench_autoencoder.py` and `eval/bench_diffusion.py` on the CPU
under bf16 autocast, inside `medgen.profiling.TensorMemory`, for two steps (the second holds the
optimizer state), and prints the high-water mark of live tensor bytes per variant. This is the
number `torch.cuda.max_memory_allocated` reports on a GPU, less cuDNN/cuBLAS workspaces and
allocator rounding; compare a GPU run of the same step to see that gap (eval/RESULTS.md does,
for the diffusion UNet on an H200).

    python eval/estimate_memory.py autoencoder                    # 128^3 VQ-GAN step, batch 1
    python eval/estimate_memory.py autoencoder --size 64 --variants medgen:ae:cf
    python eval/estimate_memory.py diffusion --dims 3             # 8x32^3 latents, batch 16

Variant names are those of the two benchmarks (`medgen:gan`, `medgen:gan:ckpt`, `medgen:ae:cf`,
`monai:ae`, ...; `medgen`, `medgen:cl`, `medgen:ckpt`, `monai`). MONAI's networks call
`nn.GroupNorm`, which CUDA autocast runs in fp32 and CPU autocast in bf16, so their CPU figure
is a lower bound of their GPU one; medgen's norms run in the activation dtype on both devices.
One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_autoencoder  # noqa: E402
import bench_diffusion  # noqa: E402

from medgen.profiling import measure_steps  # noqa: E402



def measure(step, modules, steps: int) -> dict:
    """Peak live tensor bytes over `steps` calls of `step`, parameters included."""
    t0 = time.perf_counter()
    mem = measure_steps(step, modules, steps=steps)
    return {"peak_gib": mem["peak_gib"], "params_gib": mem["parameters_gib"], "after_step_gib": mem["persistent_gib"],
            "cpu_seconds": time.perf_counter() - t0}


def run_autoencoder(args) -> dict:
    rows = {}
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        step, modules = bench_autoencoder.make_step(variant, args.size, torch.device("cpu"), torch.bfloat16, False)
        rows[variant] = measure(step, modules, args.steps)
        print(f"autoencoder {args.size}^3 {variant:>18}: " + fmt(rows[variant]), flush=True)
        del step, modules
    return {"size": args.size, "batch": 1, "results": rows}


def run_diffusion(args) -> dict:
    plan = dict(bench_diffusion.PLANS["cuda"][args.dims])
    if args.batch:
        plan["batch"] = args.batch
    rows = {}
    for variant in args.variants.split(","):
        model, _ = bench_diffusion.build(variant, args.dims, plan, torch.device("cpu"))
        step, _ = bench_diffusion.make_train_step(model, False, plan, torch.device("cpu"), torch.bfloat16, count=False)
        rows[variant] = measure(step, [model], args.steps)
        print(f"diffusion {args.dims}D batch {plan['batch']} {variant:>12}: " + fmt(rows[variant]), flush=True)
        del step, model
    return {"dims": args.dims, "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
            "results": rows}


def fmt(row: dict) -> str:
    return (f"peak {row['peak_gib']:.2f} GiB (parameters {row['params_gib']:.2f}, after the step "
            f"{row['after_step_gib']:.2f}), {row['cpu_seconds']:.0f} s on CPU")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=["autoencoder", "diffusion"])
    p.add_argument("--variants", default=None)
    p.add_argument("--size", type=int, default=128, help="autoencoder volume edge")
    p.add_argument("--dims", type=int, default=3, help="diffusion plan: 3 or 2")
    p.add_argument("--batch", type=int, default=None, help="diffusion batch (default: the plan's)")
    p.add_argument("--steps", type=int, default=2, help="training steps measured (2: the second holds Adam state)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.target == "autoencoder":
        args.variants = args.variants or "medgen:gan:cf,medgen:gan,medgen:gan:ckpt:cf,medgen:ae:cf,monai:ae"
        out = run_autoencoder(args)
    else:
        args.variants = args.variants or "medgen,monai"
        out = run_diffusion(args)
    print(json.dumps({"estimate": args.target, "device": "cpu", "dtype": "bf16 autocast", "steps": args.steps,
                      "torch": torch.__version__, **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
