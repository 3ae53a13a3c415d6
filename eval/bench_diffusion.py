"""Benchmark: medgen's UNet against MONAI's DiffusionModelUNet at the same channel plan.

Reports, per plan and network: parameters, training samples/s (fwd + bwd + AdamW step on the
eps objective), peak memory, achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode on one
training step) and its share of the card's bf16 peak, and sampling seconds per volume at 25
DPM-Solver++(2M) steps and at 1000 DDPM steps. Ratios are ours / MONAI. One JSON line at the end.

Plans (issue 4):
- 3D: 8x32^3 latents, channels (64,128,256,512), attention at the two lowest levels, 2 res
  blocks, batch 16 (sampling batch 8);
- 2D: 8x32^2 latents, channels (128,256,256,512), same layout, batch 64 (sampling batch 8).
On CPU the same layouts at small sizes (16^3 / 32^2, quarter channels), fp32.

    python eval/bench_diffusion.py                       # auto device; bf16 autocast on cuda
    python eval/bench_diffusion.py --compile             # also torch.compile'd variants
    python eval/bench_diffusion.py --dims 3 --variants medgen,medgen:cl,monai,monai:noflash

Variants: `medgen` (eager default: channels-first), `medgen:cl` (channels-last activations),
`medgen:ckpt` (gradient checkpointing), `monai` (use_flash_attention=True, MONAI's fastest
setting), `monai:noflash` (MONAI's default attention); `+compile` after a name compiles it
(medgen compiled runs channels-last, its best compiled layout).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgen.diffusion import DiffusionLoss, NoiseSchedule, generators, make_scheduler  # noqa: E402
from medgen.models.unet import build_denoiser  # noqa: E402
from medgen.versions import cpu_name  # noqa: E402

# dense bf16 tensor-core peaks from the vendor datasheets (TFLOP/s)
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}

PLANS = {
    "cuda": {
        3: dict(latent=(8, 32, 32, 32), channels=(64, 128, 256, 512), batch=16, sample_batch=8),
        2: dict(latent=(8, 32, 32), channels=(128, 256, 256, 512), batch=64, sample_batch=8),
    },
    "cpu": {
        3: dict(latent=(8, 16, 16, 16), channels=(32, 32, 64, 128), batch=2, sample_batch=2),
        2: dict(latent=(8, 32, 32), channels=(32, 64, 64, 128), batch=8, sample_batch=4),
    },
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(variant: str, dims: int, plan: dict, device: torch.device) -> tuple[torch.nn.Module, bool]:
    name, _, rest = variant.partition("+")
    backbone, _, option = name.partition(":")
    kw = dict(spatial_dims=dims, in_channels=plan["latent"][0], channels=plan["channels"], num_res_blocks=2,
              attention_levels=(False, False, True, True), head_channels=64, norm_groups=32 if plan["channels"][0] >= 32 else 8)
    if backbone == "medgen":
        kw.update(channels_last=option == "cl" or rest == "compile", gradient_checkpointing=option == "ckpt")
    elif backbone == "monai":
        kw.update(use_flash_attention=option != "noflash")
    else:
        raise SystemExit(f"unknown variant {variant}")
    torch.manual_seed(0)
    return build_denoiser(backbone, **kw).to(device), rest == "compile"


def count_flops(model, loss_fn, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        loss_fn(model, x).backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def make_train_step(model, compiled: bool, plan: dict, device, amp_dtype, count: bool = True):
    """One training step of the eps objective (fwd + bwd + AdamW) at the plan's batch size.
    Returns (step, FLOPs of one step or None)."""
    model.train()
    schedule = NoiseSchedule()
    loss_fn = DiffusionLoss(schedule.alphas_cumprod().to(device), prediction="eps")
    x = torch.randn(plan["batch"], *plan["latent"], device=device)
    flops = count_flops(model, loss_fn, x) if count else None
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(net, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, flops


def bench_train(model, compiled: bool, plan: dict, device, amp_dtype, iters: int, warmup: int) -> dict:
    step, flops = make_train_step(model, compiled, plan, device, amp_dtype)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if device.type == "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        dt = (time.perf_counter() - t0) / iters
    else:  # a shared CPU is noisy: the median step
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        dt = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(samples_per_s=plan["batch"] / dt, step_ms=dt * 1e3, tflops=flops / dt / 1e12,
                gflop_per_sample=flops / plan["batch"] / 1e9, peak_mem_gib=peak, warmup_s=warm_s)


@torch.no_grad()
def time_sampler(net, sampler: str, total_steps: int, timed_steps: int, plan: dict, device, amp_dtype) -> float:
    """Seconds per volume for `total_steps` steps, timing the first `timed_steps` (per-step cost is constant)."""
    from diffusers.utils.torch_utils import randn_tensor

    B = plan["sample_batch"]
    scheduler = make_scheduler(sampler, NoiseSchedule())
    scheduler.set_timesteps(total_steps, device=device)
    gens = generators(range(B), device)
    x = randn_tensor((B, *plan["latent"]), generator=gens, device=device)
    kw = {"generator": gens} if sampler == "ddpm" else {}
    t0 = time.perf_counter()
    for t in scheduler.timesteps[:timed_steps]:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = net(scheduler.scale_model_input(x, t), t.expand(B))
        x = scheduler.step(out.float(), t, x, **kw).prev_sample
    sync(device)
    return (time.perf_counter() - t0) * total_steps / timed_steps / B


def bench_sample(model, compiled: bool, plan: dict, device, amp_dtype, ddpm_timed: int) -> dict:
    model.eval()
    net = torch.compile(model) if compiled else model
    time_sampler(net, "dpmpp", 25, 3, plan, device, amp_dtype)  # warm-up (autotune / compile)
    dpm = time_sampler(net, "dpmpp", 25, 25, plan, device, amp_dtype)
    ddpm = time_sampler(net, "ddpm", 1000, ddpm_timed, plan, device, amp_dtype)
    return dict(dpmpp25_s_per_volume=dpm, ddpm1000_s_per_volume=ddpm)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dims", default="3,2", help="plans to run: 3, 2 or 3,2")
    p.add_argument("--variants", default=None, help="comma list (default: medgen,monai [+compile variants with --compile])")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd variants of both networks")
    p.add_argument("--iters", type=int, default=None, help="timed training steps (default 20 cuda / 3 cpu)")
    p.add_argument("--ddpm-timed-steps", type=int, default=None,
                   help="DDPM steps actually timed out of 1000 (default 1000 on cuda, 20 on cpu; scaled to 1000)")
    p.add_argument("--no-sample", action="store_true", help="skip the sampling timings")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the card (auto for H100/H200/A100)")
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda else None
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for k, v in BF16_PEAK.items() if k in name), None)
    else:
        name = cpu_name()
        peak = args.peak_tflops
    iters = args.iters or (20 if cuda else 3)
    warmup = 5 if cuda else 1
    ddpm_timed = args.ddpm_timed_steps or (1000 if cuda else 20)
    variants = args.variants.split(",") if args.variants else (["medgen", "monai"] + (["medgen+compile", "monai+compile"] if args.compile else []))
    print(f"device: {name} ({device}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{'bf16 autocast' if amp_dtype else 'fp32'}; bf16 peak {peak} TFLOP/s", flush=True)

    results: dict = {"device": name, "torch": torch.__version__, "dtype": "bf16" if amp_dtype else "fp32", "plans": {}}
    for dims in [int(d) for d in args.dims.split(",")]:
        plan = PLANS["cuda" if cuda else "cpu"][dims]
        rows = {}
        for variant in variants:
            model, compiled = build(variant, dims, plan, device)
            row = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
            row.update(bench_train(model, compiled, plan, device, amp_dtype, iters, warmup))
            if peak:
                row["pct_bf16_peak"] = 100 * row["tflops"] / peak
            if not args.no_sample:
                row.update(bench_sample(model, compiled, plan, device, amp_dtype, ddpm_timed))
            rows[variant] = row
            print(f"{dims}D {variant:>16}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
        ratios = {}
        for variant in rows:
            base = "monai+compile" if variant.endswith("+compile") and "monai+compile" in rows else "monai"
            if variant.startswith("medgen") and base in rows:
                a, b = rows[variant], rows[base]
                ratios[f"{variant}/{base}"] = {
                    "train_speed": a["samples_per_s"] / b["samples_per_s"],
                    "peak_mem": (a["peak_mem_gib"] / b["peak_mem_gib"]) if a["peak_mem_gib"] else None,
                    "params": a["params_m"] / b["params_m"],
                    **({"dpmpp25_speed": b["dpmpp25_s_per_volume"] / a["dpmpp25_s_per_volume"]} if "dpmpp25_s_per_volume" in a else {}),
                }
                print(f"{dims}D {variant} vs {base}: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios[f'{variant}/{base}'].items() if v is not None), flush=True)
        results["plans"][f"{dims}d"] = {"plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()}, "results": rows, "ratios": ratios}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
