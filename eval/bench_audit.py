"""Benchmark: the privacy audit's two costs, against their anchors.

1. SSL copy-detector training speed (images/s; each image is two augmented views through the
   encoder, NT-Xent, backward, AdamW step). Anchor: the same step with a standard ResNet-18 at
   the same input and embedding size (torchvision in 2D, MONAI's MedicalNet ResNet-18 in 3D).
2. Nearest-neighbour search: for every synthetic embedding its most correlated training
   embedding (Pearson), 100k training x 10k synthetic 128-d embeddings (issue 6) on GPU, and
   100k x 100k to show memory stays bounded. Ours: `medgen.metrics.knn.pairwise_topk` (chunked).
   Anchor: the full similarity matrix in one matmul, then max. Time and peak memory (CUDA:
   max_memory_allocated above the inputs; CPU: peak RSS above the inputs, each variant in its
   own process).

3. Calibration of the null rate: each held-out image scored against the tau of the others
   (leave-one-out, `medgen.privacy.memorization.leave_one_out_exceedances`: conformal quantile
   and Gaussian tail of the Fisher z-scores, in closed form), 20k held-out images. Anchor: the
   direct recomputation of `calibrated_threshold` without every held-out image.

On CPU the same at small sizes (2D 32^2 batch 32, 3D 16^3 batch 16; 100k x 2k embeddings against the full-matrix anchor, 100k x 10k chunked only).

    python eval/bench_audit.py                  # auto device; bf16 autocast on cuda
    python eval/bench_audit.py --device cpu --threads 1 --parts train
    python eval/bench_audit.py --parts calibration

Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgen.metrics.knn import pairwise_topk  # noqa: E402
from medgen.privacy.detector import CopyEncoder, augment, nt_xent_loss  # noqa: E402
from medgen.privacy.memorization import calibrated_threshold, leave_one_out_exceedances  # noqa: E402
from medgen.versions import cpu_name  # noqa: E402

SIZES = {
    "cuda": {"train": {2: (64, 256), 3: (32, 64)}, "steps": 20, "nn": [(100_000, 10_000), (100_000, 100_000)], "dim": 128},
    "cpu": {"train": {2: (32, 32), 3: (16, 16)}, "steps": 5, "nn": [(100_000, 2_000), (100_000, 10_000)], "dim": 128},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def anchor_encoder(dims: int, embed_dim: int) -> torch.nn.Module:
    if dims == 2:
        import torchvision

        net = torchvision.models.resnet18(num_classes=embed_dim)
        net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        return net
    from monai.networks.nets import resnet18

    return resnet18(spatial_dims=3, n_input_channels=1, num_classes=embed_dim)


def train_speed(net: torch.nn.Module, dims: int, size: int, batch: int, steps: int, device: torch.device) -> dict:
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand((batch, 1) + (size,) * dims, device=device) * 2 - 1
    bf16 = device.type == "cuda"

    def step():
        views = torch.cat([augment(x, gen), augment(x, gen)])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z = net(views)
        loss = nt_xent_loss(z[:batch], z[batch:], 0.07)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t) / steps
    return {"images_per_s": round(batch / dt, 1), "step_ms": round(1000 * dt, 2), "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3)}


def embeddings(n_train: int, n_synth: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n_train, dim, generator=g).to(device), torch.randn(n_synth, dim, generator=g).to(device)


def naive_best(synth: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor: the whole (Ns, Nt) Pearson matrix at once, float64 like ours."""
    s = synth.double() - synth.double().mean(1, keepdim=True)
    t = train.double() - train.double().mean(1, keepdim=True)
    sim = torch.nn.functional.normalize(s, dim=1) @ torch.nn.functional.normalize(t, dim=1).T  # (Ns, Nt)
    return sim.max(1)


def chunked_best(synth: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v, i = pairwise_topk(synth, train, k=1, metric="pearson")
    return v[:, 0], i[:, 0]


def _peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's
    high-water mark into a forked-and-exec'd child, so ru_maxrss starts at the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_child(variant: str, n_train: int, n_synth: int, dim: int, queue) -> None:
    train, synth = embeddings(n_train, n_synth, dim, torch.device("cpu"))
    base = _peak_rss_kib()
    t = time.perf_counter()
    v, i = (naive_best if variant == "naive" else chunked_best)(synth, train)
    seconds = time.perf_counter() - t
    peak = _peak_rss_kib()
    queue.put({"seconds": seconds, "peak_mib": (peak - base) / 1024, "checksum": float(v.sum()), "indices": i[:100].tolist()})


def nn_search(n_train: int, n_synth: int, dim: int, device: torch.device, naive: bool = True) -> dict:
    out: dict = {"n_train": n_train, "n_synthetic": n_synth, "dim": dim}
    variants = ["chunked", "naive"] if naive else ["chunked"]
    if device.type == "cpu":
        ctx = mp.get_context("spawn")
        for variant in variants:
            q = ctx.Queue()
            p = ctx.Process(target=_cpu_child, args=(variant, n_train, n_synth, dim, q))
            p.start()
            r = q.get()
            p.join()
            out[variant] = {"seconds": round(r["seconds"], 3), "peak_mib": round(r["peak_mib"], 1)}
            out[f"_{variant}_check"] = (r["checksum"], r["indices"])
    else:
        train, synth = embeddings(n_train, n_synth, dim, device)
        for variant in variants:
            fn = naive_best if variant == "naive" else chunked_best
            fn(synth[:256], train)  # warm up kernels
            sync(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            t = time.perf_counter()
            v, i = fn(synth, train)
            sync(device)
            seconds = time.perf_counter() - t
            out[variant] = {"seconds": round(seconds, 3), "peak_mib": round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)}
            out[f"_{variant}_check"] = (float(v.sum()), i[:100].tolist())
            del v, i
    if naive:
        (c_sum, c_idx), (n_sum, n_idx) = out.pop("_chunked_check"), out.pop("_naive_check")
        out["same_result"] = c_idx == n_idx and abs(c_sum - n_sum) <= 1e-6 * abs(n_sum)
        out["time_ratio_naive_over_chunked"] = round(out["naive"]["seconds"] / max(out["chunked"]["seconds"], 1e-9), 2)
        out["memory_ratio_naive_over_chunked"] = round(out["naive"]["peak_mib"] / max(out["chunked"]["peak_mib"], 1e-3), 2)
    else:
        out.pop("_chunked_check")
    return out


def loo_naive(scores: torch.Tensor, level: float) -> torch.Tensor:
    """Anchor: drop each held-out image in turn and recalibrate tau on the others."""
    return torch.tensor([bool(scores[j] > calibrated_threshold(torch.cat([scores[:j], scores[j + 1 :]]), level)[0]) for j in range(len(scores))])


def calibration(n_holdout: int, level: float = 0.005) -> dict:
    g = torch.Generator().manual_seed(0)
    scores = torch.tanh(1.5 + 0.3 * torch.randn(n_holdout, generator=g, dtype=torch.float64))  # best correlations of held-out images
    out = {"n_holdout": n_holdout, "level": level}
    results = {}
    leave_one_out_exceedances(scores[:100], level)  # imports (scipy.stats) outside the timing
    for name, fn in (("ours", leave_one_out_exceedances), ("naive", loo_naive)):
        t = time.perf_counter()
        results[name] = fn(scores, level)
        out[name] = {"seconds": round(time.perf_counter() - t, 3)}
    out["same_result"] = bool(torch.equal(results["ours"], results["naive"]))
    out["time_ratio_naive_over_ours"] = round(out["naive"]["seconds"] / max(out["ours"]["seconds"], 1e-9), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dims", default="2,3")
    ap.add_argument("--parts", default="train,nn,calibration", help="train (detector speed), nn (nearest-neighbour search), calibration (leave-one-out null), comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    sizes = SIZES["cuda" if device.type == "cuda" else "cpu"]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    results: dict = {"bench": "audit", "device": device.type, "machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(), "detector_training": {}, "nn_search": [], "calibration": None}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    for dims in (int(d) for d in args.dims.split(",")) if "train" in parts else ():
        size, batch = sizes["train"][dims]
        embed = 128 if dims == 2 else 32
        ours = train_speed(CopyEncoder(dims), dims, size, batch, sizes["steps"], device)
        anchor = train_speed(anchor_encoder(dims, embed), dims, size, batch, sizes["steps"], device)
        entry = {"input": [size] * dims, "batch": batch, "ours": ours, "anchor_resnet18": anchor, "speed_ratio_ours_over_anchor": round(ours["images_per_s"] / anchor["images_per_s"], 2)}
        results["detector_training"][f"{dims}d"] = entry
        print(f"detector {dims}D {size}^{dims} batch {batch}: ours {ours['images_per_s']} img/s, ResNet-18 {anchor['images_per_s']} img/s (x{entry['speed_ratio_ours_over_anchor']})", flush=True)

    for n_train, n_synth in sizes["nn"] if "nn" in parts else ():
        naive = n_train * n_synth * 8 <= (torch.cuda.get_device_properties(device).total_memory // 4 if device.type == "cuda" else 2 << 30)
        r = nn_search(n_train, n_synth, sizes["dim"], device, naive=naive)
        results["nn_search"].append(r)
        msg = f"NN {n_train} x {n_synth}: chunked {r['chunked']['seconds']} s, {r['chunked']['peak_mib']} MiB"
        if naive:
            msg += f"; full matrix {r['naive']['seconds']} s, {r['naive']['peak_mib']} MiB; same result: {r['same_result']}"
        print(msg, flush=True)
    if "calibration" in parts:
        r = results["calibration"] = calibration(20_000)
        print(f"leave-one-out null, {r['n_holdout']} held-out images: ours {r['ours']['seconds']} s, recompute every tau {r['naive']['seconds']} s "
              f"(x{r['time_ratio_naive_over_ours']}); same result: {r['same_result']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
