"""Benchmark the evaluation metrics against their usual implementations, in one process.

1. FID trace term Tr((S1 S2)^1/2) at D dims: ours (eigenvalues of S1 S2 in torch, float64,
   Cholesky-symmetric route and general `eigvals` route) vs `scipy.linalg.sqrtm` (clean-fid,
   pytorch-fid); time and the difference of the results.
2. Precision/recall (k=3) + density/coverage (k=5) at N x N, D dims: our chunked single pass
   vs the full-matrix algorithm of the reference code (torch.cdist on the same device);
   time and peak memory.
3. Feature extraction, images/s: the Inception pipeline (clean-fid resize + TorchScript; the
   real weights when present, else torchvision's Inception-V3 trunk with random weights as a
   same-FLOPs stand-in) and the in-domain PCA extractor.
4. `--parts msssim`: MS-SSIM diversity of the built-in cohort (2D: 200 x 64^2, 3D: 80 x 32^3,
   as `make demo`) scored on [0, 1] with data_range=1 (ours) and on [-1, 1] with data_range=2
   (medgen before issue 11), with the number of pairs that MONAI's clamp puts at exactly 0.
5. `--parts coverage`: coverage of the Fréchet-distance intervals on Gaussians with a
   closed-form FD: ours (half-samples without replacement, size-corrected; and its N -> infinity
   extrapolation) against the two-sample percentile bootstrap medgen used before, for the
   expected FD at the sample sizes (E[FD_N], from 3000 draws) and for the closed-form FD_inf.

    python eval/bench_metrics.py                      # auto: cuda if available
    python eval/bench_metrics.py --device cpu --n 4000 --dim 1024
    python eval/bench_metrics.py --device cpu --parts msssim,coverage

Sizes default to the issue's (D=2048, N=10k) on CUDA and smaller ones on CPU. bf16 autocast is
on for CUDA by default (`--no-autocast` to disable): extraction runs fp32 inside it and the
float64 metric math is not eligible for autocast, so numbers do not change. Prints one JSON
line at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medgen.metrics import features as F  # noqa: E402
from medgen.metrics.bootstrap import fd_infinite_n, half_sample_two_sample, percentile_interval  # noqa: E402
from medgen.metrics.fid import frechet_distance, gaussian_statistics, trace_sqrt_product  # noqa: E402
from medgen.metrics.prdc import prdc  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return out, best


def _rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn, device):
    """(result, seconds, peak MiB above the start) on CUDA (peak allocated bytes)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, t = timed(fn, device)
    return out, t, (torch.cuda.max_memory_allocated() - base) / 2**20


def measured_cpu_child(which: str, n: int, dim: int):
    """On CPU, peak memory needs a fresh process per measurement (ru_maxrss only grows, and
    fork after OpenMP can deadlock): rerun this script as a child for one PR/DC variant."""
    import subprocess

    cmd = [sys.executable, __file__, "--device", "cpu", "--child", which, "--n", str(n), "--dim", str(dim)]
    line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    out = json.loads(line)
    return out["result"], out["seconds"], out["peak_mib"]


def _prdc_data(n, dim, device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, dim, generator=g).to(device), (torch.randn(n, dim, generator=g) * 1.05).to(device)


def run_child(which: str, n: int, dim: int) -> None:
    real, fake = _prdc_data(n, dim, torch.device("cpu"))
    rss0 = _rss_bytes()
    fn = (lambda: prdc(real, fake, k_pr=3, k_dc=5)) if which == "ours" else (lambda: reference_prdc_full(real, fake))
    out, t = timed(fn, torch.device("cpu"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"result": out, "seconds": t, "peak_mib": (peak - rss0) / 2**20}))


def reference_prdc_full(real, fake, k_pr=3, k_dc=5):
    """Reference algorithm (Naeem et al.'s `prdc`, Kynkäänniemi et al.) with full matrices."""
    d_rr, d_ff, d_rf = torch.cdist(real, real), torch.cdist(fake, fake), torch.cdist(real, fake)
    r_pr = d_rr.kthvalue(k_pr + 1, 1).values
    r_dc = d_rr.kthvalue(k_dc + 1, 1).values
    f_pr = d_ff.kthvalue(k_pr + 1, 1).values
    return {
        "precision": float((d_rf <= r_pr[:, None]).any(0).float().mean()),
        "recall": float((d_rf <= f_pr[None, :]).any(1).float().mean()),
        "density": float((d_rf < r_dc[:, None]).sum(0).float().mean() / k_dc),
        "coverage": float((d_rf.min(1).values < r_dc).float().mean()),
    }


def bench_fid(dim, n, device):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    x = (torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix).to(device)
    y = (torch.randn(n, dim, generator=g, dtype=torch.float64) @ (mix + 0.05 * torch.eye(dim, dtype=torch.float64))).to(device)
    _, s1 = gaussian_statistics(x)
    _, s2 = gaussian_statistics(y)
    ours, t_ours = timed(lambda: float(trace_sqrt_product(s1, s2)), device, repeat=2)
    general, t_general = timed(lambda: float(torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()), device)
    a, b = s1.cpu().numpy(), s2.cpu().numpy()
    ref, t_ref = timed(lambda: float(np.trace(scipy.linalg.sqrtm(a @ b)).real), torch.device("cpu"))
    return {
        "fid_trace_dim": dim, "fid_trace_ours_s": round(t_ours, 4), "fid_trace_eigvals_s": round(t_general, 4),
        "fid_trace_scipy_sqrtm_s": round(t_ref, 4), "fid_trace_speedup_vs_sqrtm": round(t_ref / t_ours, 1),
        "fid_trace_rel_diff_vs_sqrtm": abs(ours - ref) / abs(ref), "fid_trace_rel_diff_eigvals": abs(general - ref) / abs(ref),
    }


def bench_prdc(n, dim, device, anchor=True):
    if device.type == "cuda":
        real, fake = _prdc_data(n, dim, device)
        run = lambda which: measured((lambda: prdc(real, fake, k_pr=3, k_dc=5)) if which == "ours" else (lambda: reference_prdc_full(real, fake)), device)  # noqa: E731
    else:
        run = lambda which: measured_cpu_child(which, n, dim)  # noqa: E731
    ours, t_ours, m_ours = run("ours")
    out = {"prdc_n": n, "prdc_dim": dim, "prdc_ours_s": round(t_ours, 3), "prdc_ours_peak_mib": round(m_ours, 1), "prdc_values": ours}
    if anchor:
        ref, t_ref, m_ref = run("full")
        out.update({"prdc_full_matrix_s": round(t_ref, 3), "prdc_full_matrix_peak_mib": round(m_ref, 1),
                    "prdc_time_ratio_full_over_ours": round(t_ref / t_ours, 2),
                    "prdc_memory_ratio_full_over_ours": round(m_ref / max(m_ours, 1e-9), 2),
                    "prdc_max_abs_diff_vs_full_matrix_fp32": max(abs(ours[k] - ref[k]) for k in ours)})
    return out


def _stand_in_inception(folder: Path) -> Path:
    """torchvision Inception-V3 trunk (random weights) with clean-fid's TorchScript interface."""
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(*[m for name, m in net.named_children() if name not in ("AuxLogits", "dropout", "fc")], torch.nn.Flatten())

        def forward(self, x, return_features: bool = False):
            return self.layers(x)

    path = folder / F.INCEPTION_FILE
    torch.jit.script(Base().eval()).save(str(path))
    return path


def bench_extraction(n_images, size, device):
    images = torch.rand(n_images, 1, size, size) * 2 - 1
    out = {"extract_images": n_images, "extract_size": size}
    with tempfile.TemporaryDirectory() as tmp:
        real = F.weights_present("inception")
        ex = F.get_extractor("inception", device=device) if real else F.InceptionExtractor(_stand_in_inception(Path(tmp)), device)
        ex(images[:4])  # warm-up
        _, t = timed(lambda: ex(images), device)
        out.update({"inception_weights": "clean-fid" if real else "random-weight stand-in", "inception_images_per_s": round(n_images / t, 1)})
    pca = F.PCAExtractor().fit(images)
    _, t = timed(lambda: pca(images), device)
    out["pca_images_per_s"] = round(n_images / t, 1)
    return out


def bench_msssim_cohort(n_pairs: int) -> dict:
    """MS-SSIM diversity of the demo cohort, today's convention against the old one."""
    from monai.metrics import MultiScaleSSIMMetric

    from medgen.data import load_images
    from medgen.data.cohort import synth_brain
    from medgen.metrics.msssim import msssim_diversity, msssim_settings, random_pairs

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dims, n, size in ((2, 200, 64), (3, 80, 32)):
            images, _ = load_images(synth_brain(Path(tmp) / f"c{dims}d", n=n, dims=dims, size=size, seed=0))
            t = time.perf_counter()
            new = msssim_diversity(images, n_pairs=n_pairs, seed=0)
            seconds = time.perf_counter() - t
            old_metric = MultiScaleSSIMMetric(spatial_dims=dims, data_range=2.0, reduction="none", **msssim_settings(images.shape[2:]))
            pairs = random_pairs(n, n_pairs, seed=0)
            old = torch.cat([old_metric(images[p[:, 0]], images[p[:, 1]]).reshape(-1) for p in pairs.split(16)]).double()
            out[f"{dims}d"] = {"shape": list(images.shape), "pairs": int(pairs.shape[0]), "msssim_01_range1": round(new["msssim"], 4),
                               "zero_pairs_01": int((new["per_pair"] == 0).sum()), "msssim_pm1_range2_old": round(float(old.mean()), 4),
                               "zero_pairs_old": int((old == 0).sum()), "seconds": round(seconds, 2)}
    return {"msssim_cohort": out}


def bench_fd_coverage(trials: int, n_sub: int) -> dict:
    """Coverage and width of the FD intervals on Gaussians: ours vs the old percentile bootstrap."""
    settings = {  # name: (D, n real, m synthetic, mean shift, largest variance of the synthetic set)
        "8-d, 100 vs 100": (8, 100, 100, 1.0, 2.0), "16-d, 100 vs 80": (16, 100, 80, 0.8, 3.0),
        "32-d, 200 vs 150": (32, 200, 150, 1.0, 2.0), "8-d, same distribution": (8, 100, 100, 0.0, 1.0),
        "4-d, 500 vs 500": (4, 500, 500, 0.5, 2.0),
    }
    rows = {}
    for name, (d, n, m, shift, var) in settings.items():
        rng = np.random.default_rng(0)
        mu2, var2 = shift * np.eye(d)[0], np.linspace(1, var, d)
        fd_inf = shift**2 + ((1 - np.sqrt(var2)) ** 2).sum()  # N(0, I) vs N(mu2, diag(var2))

        def draw():
            return torch.from_numpy(rng.normal(size=(n, d))), torch.from_numpy(rng.normal(size=(m, d)) * np.sqrt(var2) + mu2)

        draws = np.array([frechet_distance(*draw()) for _ in range(3000)])
        expected, spread = draws.mean(), np.diff(np.quantile(draws, [0.025, 0.975]))[0]
        hits = {k: [0, 0, 0.0] for k in ("ours", "ours_infinite_n", "old_bootstrap")}
        for t in range(trials):
            x, y = draw()
            point = frechet_distance(x, y)
            ci = half_sample_two_sample(frechet_distance, x, y, n_sub=n_sub, seed=t, point=point)
            g = torch.Generator().manual_seed(t)
            boot = percentile_interval([frechet_distance(x[torch.randint(n, (n,), generator=g)], y[torch.randint(m, (m,), generator=g)])
                                        for _ in range(n_sub)])
            for k, (lo, hi) in (("ours", (ci["low"], ci["high"])), ("ours_infinite_n", fd_infinite_n(point, ci)["ci95"]), ("old_bootstrap", boot)):
                hits[k][0] += (lo <= expected <= hi) / trials
                hits[k][1] += (lo <= fd_inf <= hi) / trials
                hits[k][2] += (hi - lo) / spread / trials
        rows[name] = {"fd_inf": round(fd_inf, 3), "expected_fd_n": round(float(expected), 3),
                      **{f"{k}_{w}": round(v, 3) for k, vals in hits.items() for w, v in zip(("covers_expected", "covers_fd_inf", "width_over_true"), vals)}}
        r = rows[name]
        print(f"  {name}: FD_inf {r['fd_inf']}, E[FD_N] {r['expected_fd_n']}; covers E[FD_N] / FD_inf / width: "
              + "; ".join(f"{k} {r[k + '_covers_expected']:.3f} / {r[k + '_covers_fd_inf']:.3f} / {r[k + '_width_over_true']:.2f}x" for k in hits), flush=True)
    return {"fd_coverage": {"trials": trials, "replicates": n_sub, "rows": rows}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dim", type=int, default=None, help="feature dimension (default 2048 on cuda, 1024 on cpu)")
    p.add_argument("--n", type=int, default=None, help="PR/DC set size (default 10000 on cuda, 4000 on cpu)")
    p.add_argument("--images", type=int, default=None, help="images for the extraction benchmark")
    p.add_argument("--no-autocast", action="store_true")
    p.add_argument("--parts", default="speed", help="comma-separated: speed (1-3), msssim (4), coverage (5)")
    p.add_argument("--pairs", type=int, default=500, help="MS-SSIM pairs per cohort (msssim part)")
    p.add_argument("--trials", type=int, default=200, help="draws per setting (coverage part)")
    p.add_argument("--child", choices=("ours", "full"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args.child, args.n, args.dim)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    dim = args.dim or (2048 if cuda else 1024)
    n = args.n or (10_000 if cuda else 4000)
    n_images = args.images or (512 if cuda else 64)
    os.environ.setdefault("MEDGEN_OFFLINE", "1")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if (cuda and not args.no_autocast) else contextlib.nullcontext()
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads(), "autocast_bf16": cuda and not args.no_autocast}
    parts = set(args.parts.split(","))
    if "speed" in parts:
        with autocast:
            r = bench_fid(dim, max(2 * dim, 4096), device)
            results.update(r)
            print(f"FID trace term, {dim}-d: ours {r['fid_trace_ours_s']} s, eigvals(S1 S2) {r['fid_trace_eigvals_s']} s, "
                  f"scipy sqrtm {r['fid_trace_scipy_sqrtm_s']} s -> {r['fid_trace_speedup_vs_sqrtm']}x; rel. diff {r['fid_trace_rel_diff_vs_sqrtm']:.1e}", flush=True)
            r = bench_prdc(n, dim, device)
            results.update(r)
            print(f"PR+DC {n}x{n}, {dim}-d: ours {r['prdc_ours_s']} s / {r['prdc_ours_peak_mib']} MiB; full-matrix reference "
                  f"{r['prdc_full_matrix_s']} s / {r['prdc_full_matrix_peak_mib']} MiB", flush=True)
            r = bench_extraction(n_images, 64, device)
            results.update(r)
            print(f"extraction 64x64: inception ({r['inception_weights']}) {r['inception_images_per_s']} img/s, pca {r['pca_images_per_s']} img/s", flush=True)
    if "msssim" in parts:
        r = bench_msssim_cohort(args.pairs)
        results.update(r)
        for k, v in r["msssim_cohort"].items():
            print(f"MS-SSIM diversity, {k} cohort {v['shape']}, {v['pairs']} pairs: [0, 1] data_range 1 -> {v['msssim_01_range1']} "
                  f"({v['zero_pairs_01']} pairs at 0); [-1, 1] data_range 2 (old) -> {v['msssim_pm1_range2_old']} ({v['zero_pairs_old']} at 0)", flush=True)
    if "coverage" in parts:
        torch.set_num_threads(1)  # thousands of tiny FDs
        print(f"FD interval coverage on Gaussians ({args.trials} draws per setting):", flush=True)
        results.update(bench_fd_coverage(args.trials, n_sub=100))
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
