"""Benchmark: one full 3D VQ-GAN training step (Medical Diffusion setting), and medgen's
autoencoder against MONAI's `VQVAE` at the same channel plan.

Variants (batch 1 volume of 128^3 on a GPU with bf16 autocast, 32^3 fp32 on CPU):
- `medgen:gan`  the whole step the trainer runs once the GAN is on, through the trainer's own
  builders and step functions (`medgen.train.autoencoder.generator_loss` / `discriminator_loss`)
  with the networks and loss weights of configs/medical_diffusion_vqgan_3d.yaml: encoder, EMA
  quantizer (16384 x 8-d codes), decoder, L1 + LPIPS (VGG16) on a depth slice + commitment +
  hinge GAN + feature matching against a 3D PatchGAN (volume) and a 2D PatchGAN (random slices),
  backward, generator Adam step; then the discriminator hinge step and its Adam step;
- `medgen:ae`   generator only (encoder, quantizer, decoder, L1 + commitment, backward, Adam);
- `monai:ae`    MONAI `VQVAE` with the same widths, code size and codebook, the same loss/step.
`:ckpt` after a medgen variant turns on gradient checkpointing, `:cf` keeps channels-first activations
(default: channels-last, as the trainer uses on GPU); `--compile` compiles the networks.

Reports volumes/s, peak memory (CUDA: max allocated; CPU: process peak RSS, cumulative),
achieved TFLOP/s (FLOPs of one step counted by torch's FlopCounterMode) and the ratios
medgen:ae / monai:ae. Ends with one JSON line.

    python eval/bench_autoencoder.py                  # auto device (cuda if available)
    python eval/bench_autoencoder.py --device cpu --size 32
    python eval/bench_autoencoder.py --variants medgen:gan,medgen:gan:ckpt,medgen:ae,monai:ae
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgen.config import load_config  # noqa: E402
from medgen.models.autoencoder import to_channels_last  # noqa: E402
from medgen.train.autoencoder import (  # noqa: E402
    DEFAULTS,
    LossWeights,
    build_autoencoder,
    build_discriminator,
    build_perceptual,
    plain_train_step,
)
from medgen.train.losses import reconstruction_loss  # noqa: E402

# Medical Diffusion's VQ-GAN: the networks and loss weights of this config, built by the trainer's
# own builders and run through the trainer's own step functions
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "medical_diffusion_vqgan_3d.yaml"


def vqgan_config(ckpt: bool = False):
    return load_config(CONFIG, [f"model.gradient_checkpointing={ckpt}"], DEFAULTS)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_monai(device):
    from monai.networks.nets import VQVAE

    # Same plan: two stride-2 stages to 1/4 resolution at the config's two coarser widths, one
    # residual layer per stage, the same code size and codebook, EMA quantizer.
    m = vqgan_config().model
    widths = tuple(int(c) for c in m.channels)[1:]
    return VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=widths, num_res_layers=1,
                 num_res_channels=widths, downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                 upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=int(m.num_codes),
                 embedding_dim=int(m.latent_channels), decay=float(m.ema_decay), ddp_sync=False).to(device)


def make_step(variant: str, size: int, device, amp_dtype, compile_: bool):
    """Return (step_fn, modules) for one variant; step_fn() runs one full training step."""
    name, _, opts = variant.partition(":")
    kind = opts.split(":")[0]
    flags = opts.split(":")[1:]
    ckpt = "ckpt" in flags
    channels_last = "cf" not in flags  # the trainer's layout on GPU; on CPU too, so CPU runs test that path
    x = torch.rand(1, 1, size, size, size, device=device) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    if name == "monai":
        net = build_monai(device)
        opt = torch.optim.Adam(net.parameters(), lr=3e-4, betas=(0.5, 0.9))
        fwd = torch.compile(net) if compile_ else net

        def step():
            with autocast:
                recon, qloss = fwd(x)
                loss = reconstruction_loss(recon, x) + qloss.float()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, [net]

    cfg = vqgan_config(ckpt)
    ae = build_autoencoder(cfg.model, 3, 1).to(device)
    if channels_last:
        to_channels_last(ae)
    opt_g = torch.optim.Adam(ae.parameters(), lr=3e-4, betas=(0.5, 0.9))
    fwd = torch.compile(ae) if compile_ else ae
    weights = LossWeights.from_config(cfg.loss, is_vq=True)
    if kind == "ae":
        weights = dataclasses.replace(weights, rec=1.0)
        return plain_train_step(fwd, x, weights, opt_g, autocast), [ae]

    from medgen.models.perceptual import random_backbone_state

    disc = build_discriminator(cfg.discriminator, 3, 1).to(device)
    if channels_last:
        to_channels_last(disc)  # 3D volume convs and 2D slice convs
    # random-init LPIPS: same cost as the pretrained one, nothing to download
    perceptual = build_perceptual(cfg.loss, 3, random_backbone_state(str(cfg.loss.perceptual))).to(device)
    opt_d = torch.optim.Adam(disc.parameters(), lr=3e-4, betas=(0.5, 0.9))
    dfwd = torch.compile(disc) if compile_ else disc
    step = plain_train_step(fwd, x, weights, opt_g, autocast, perceptual, dfwd, opt_d, ae.last_layer)
    return step, [ae, disc, perceptual]


def count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def run_variant(variant, size, device, amp_dtype, steps, warmup, compile_):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    step, modules = make_step(variant, size, device, amp_dtype, compile_)
    for _ in range(warmup):
        step()
    sync(device)
    flops = count_flops(step) if not compile_ else float("nan")
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, cumulative
    params = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)  # trained ones
    del step, modules
    return {"variant": variant + ("+compile" if compile_ else ""), "volumes_per_s": 1.0 / seconds,
            "step_ms": seconds * 1e3, "peak_mem_gb": peak_gb, "tflops": flops / seconds / 1e12,
            "gflop_per_step": flops / 1e9, "params_m": params / 1e6}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=None, help="volume edge (default 128 on cuda, 32 on cpu)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--variants", default="medgen:gan,medgen:ae,monai:ae")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default bf16 on cuda, fp32 on cpu)")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    size = args.size or (128 if cuda else 32)
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup or (5 if cuda else 1)
    amp_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    if cuda:
        torch.backends.cudnn.benchmark = True
    machine = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    print(f"device {device} ({machine}), volume {size}^3 batch 1, {amp_dtype}, {steps} timed steps")
    results = []
    for variant in args.variants.split(","):
        r = run_variant(variant, size, device, amp_dtype, steps, warmup, args.compile)
        results.append(r)
        print(f"{r['variant']:>20}: {r['volumes_per_s']:8.2f} vol/s  {r['step_ms']:9.1f} ms/step  "
              f"peak {r['peak_mem_gb']:6.2f} GB  {r['tflops']:6.2f} TFLOP/s  ({r['gflop_per_step']:.0f} GFLOP/step, "
              f"{r['params_m']:.2f} M params)")
    by = {r["variant"].replace("+compile", ""): r for r in results}
    ratios = {}
    if "medgen:ae" in by and "monai:ae" in by:
        ratios = {"speed_medgen_over_monai": by["medgen:ae"]["volumes_per_s"] / by["monai:ae"]["volumes_per_s"],
                  "memory_medgen_over_monai": by["medgen:ae"]["peak_mem_gb"] / by["monai:ae"]["peak_mem_gb"]}
        print(f"medgen:ae / monai:ae: speed x{ratios['speed_medgen_over_monai']:.2f}, "
              f"peak memory x{ratios['memory_medgen_over_monai']:.2f}")
    print(json.dumps({"bench": "autoencoder", "device": str(device), "machine": machine, "size": size,
                      "dtype": str(amp_dtype), "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
