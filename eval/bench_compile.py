"""Warm-up of `train.compile`: whole-network `torch.compile` vs regional compilation of the
UNet's repeated blocks (`UNet.compile_blocks`), one training step (forward, backward, AdamW).

Each variant runs in a fresh process with an empty inductor cache (no FX-graph or autograd
cache), so the first step pays the full compilation:

    python eval/bench_compile.py                       # Medical Diffusion 3D layout, 8 x 16^3 latents, CPU
    python eval/bench_compile.py --device cuda --size 32 --batch 4

Prints per variant: the first step (compilation + one step), the steady step time, and the
warm-up (first step minus one eager step) of regional relative to whole-network compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(args: argparse.Namespace) -> None:
    import torch

    from medgen.models.unet import UNet

    torch.manual_seed(0)
    device = torch.device(args.device)
    channels = [int(c) for c in args.channels.split(",")]
    attention = [i >= len(channels) - 2 for i in range(len(channels))]  # the two lowest levels
    net = UNet(spatial_dims=args.dims, in_channels=args.in_channels, channels=channels, num_res_blocks=2,
               attention_levels=attention, head_channels=64, norm_groups=32,
               channels_last=device.type == "cuda").to(device)
    fn = net
    if args.mode == "full":
        fn = torch.compile(net)
    elif args.mode == "regional":
        net.compile_blocks()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.in_channels, *[args.size] * args.dims, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)

    def step() -> float:
        start = time.perf_counter()
        loss = fn(x, t).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = step()
    times = [step() for _ in range(args.steps)]
    print(json.dumps({"mode": args.mode, "first_step_s": first, "step_s": sorted(times)[len(times) // 2]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dims", type=int, default=3)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--in-channels", type=int, default=8)
    p.add_argument("--channels", default="64,128,256,512")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mode", choices=("eager", "full", "regional"), default=None, help="(internal) run one variant")
    args = p.parse_args()
    if args.mode:
        return child(args)
    import torch

    print(f"torch {torch.__version__}, device {args.device}, UNet {args.dims}D channels {args.channels}, "
          f"{args.in_channels} x {args.size}^{args.dims}, batch {args.batch}", flush=True)
    results = {}
    for mode in ("eager", "full", "regional"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
                   "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", "PYTHONPATH": str(REPO)}
            argv = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:]]
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        results[mode] = r
        print(f"{mode:9s} first step {r['first_step_s']:8.1f} s   steady step {r['step_s']:.3f} s", flush=True)
    eager = results["eager"]["step_s"]
    warm = {m: results[m]["first_step_s"] - eager for m in ("full", "regional")}
    print(f"warm-up (first step - eager step): whole network {warm['full']:.1f} s, regional {warm['regional']:.1f} s "
          f"({warm['regional'] / warm['full']:.2f}x); steady step regional / whole network "
          f"{results['regional']['step_s'] / results['full']['step_s']:.2f}x, eager / whole network "
          f"{eager / results['full']['step_s']:.2f}x")


if __name__ == "__main__":
    main()
