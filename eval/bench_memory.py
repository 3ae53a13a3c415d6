"""Benchmark: peak memory of `medgen sample` and `medgen eval` against the number of samples N
(issue 22: streaming means memory flat in N).

Every measurement is a fresh process that runs `medgen ARGS` (through `medgen.cli.main`). Two
numbers per run:

- peak RSS: the kernel's peak resident set size of the whole process (`ru_maxrss` of that child,
  from `os.wait4`), what `/usr/bin/time -v` shows a user;
- work peak: the peak resident set size while the command runs, after torch and medgen are
  imported (VmHWM, reset through /proc/self/clear_refs once the imports are done). Start-up
  alone peaks near 0.9 GiB and can hide a whole 2D set of 32^2 images (78 MiB at 20k).

The script builds what it measures:

- 2D: a cohort of 200 32^2 slices and a tiny pixel-space run on it (UNet [8, 16], one training
  step: the weights are as good as random, which does not matter for memory);
  `medgen sample --n N` for N in --n2d (default 1k and 20k), then `medgen eval` of each set
  against the cohort (a fixed real set; features pca, as offline users get).
- 3D: the same with 50 volumes of 32^3 and N in --n3d (default 100 and 1,000).

Sampling uses 1 DDIM step (the number of denoising steps changes time, not memory) in batches of
16 images (the default) / 4 volumes. "the set" is what N samples take as float32, what a
whole-set implementation holds at least once; "growth" is (work peak at the larger N - at the
smaller N) / (difference in N): what each extra sample costs.

    python eval/bench_memory.py                                    # this checkout
    python eval/bench_memory.py --medgen-src /tmp/medgen-main --label main
        # another source tree of medgen, e.g. `git archive main | tar -x -C /tmp/medgen-main`
    python eval/bench_memory.py --n2d 500,2000 --n3d 20,100        # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medgen.versions import cpu_name  # noqa: E402

TINY = ["model.channels=[8,16]", "model.attention_levels=[false,false]", "model.head_channels=8", "model.norm_groups=8",
        "train.max_steps=1", "train.tracker=none", "sample.n_preview=1", "sample.steps=1", "train.checkpoint_every=1",
        "train.preview_every=1"]
SETUP = {  # dims -> cohort size, image size, training config and extra overrides, sampling batch
    2: dict(subjects=200, size=32, config="demo_diffusion_2d_pixel.yaml", overrides=["train.batch_size=4"], batch=16),
    3: dict(subjects=50, size=32, config="demo_diffusion_3d.yaml", overrides=["train.batch_size=2", "data.shape=[32,32,32]"],
            batch=4),
}
# The measured process: imports first, then the peak is reset, then the command runs.
MEASURED = """import re, sys
import torch, medgen.cli, medgen.data, medgen.metrics.report, medgen.sample.pipeline  # start-up: the libraries
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on is the command's own peak
code = medgen.cli.main(sys.argv[1:])
print("WORK_PEAK_KIB", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1), file=sys.stderr)
sys.exit(code)
"""


def measure(args: list[str], env: dict, log: Path) -> dict:
    """Peak RSS and work peak (MiB) and wall seconds of `medgen ARGS` in a fresh process, run in the
    folder of `log` (not in a source tree, which Python would import first); output to `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", MEASURED, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed (exit {os.waitstatus_to_exitcode(status)}): medgen {' '.join(args)}\n{text[-2000:]}")
    work = int(re.search(r"WORK_PEAK_KIB (\d+)", text).group(1))
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "work_peak_mib": round(work / 1024, 1),  # KiB on Linux
            "seconds": round(time.perf_counter() - start, 1)}


def medgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "medgen", *map(str, args)]


def build(work: Path, dims: int, env: dict) -> tuple[Path, Path]:
    """The cohort and the tiny run of one dimensionality (built with this checkout)."""
    s = SETUP[dims]
    cohort, run = work / f"cohort{dims}d", work / f"run{dims}d"
    if not (run / "model" / "config.json").is_file():
        subprocess.run(medgen("data", "synth-brain", "--out", cohort, "--n", s["subjects"], "--dims", dims, "--size", s["size"],
                              "--seed", 0), check=True, env=env, cwd=work, capture_output=True)
        subprocess.run(medgen("train", "diffusion", "--config", REPO / "configs" / s["config"], "--out", run,
                              f"data.path={cohort}", *TINY, *s["overrides"]), check=True, env=env, cwd=work, capture_output=True)
    return cohort, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n2d", default="1000,20000", help="sample counts for 2D")
    ap.add_argument("--n3d", default="100,1000", help="sample counts for 3D")
    ap.add_argument("--medgen-src", type=Path, default=REPO, help="the medgen source tree to measure (default: this checkout)")
    ap.add_argument("--label", default=None, help="name of what is measured in the table (default: the source folder)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the cohorts, runs and outputs (default: a temp folder, removed)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the measured processes")
    args = ap.parse_args()

    label = args.label or str(args.medgen_src)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MPLBACKEND": "Agg", "WANDB_MODE": "offline",
            "MEDGEN_CACHE_DIR": str(work / "cache")}
    here = {**base, "PYTHONPATH": str(REPO)}  # builds the inputs
    measured = {**base, "PYTHONPATH": str(args.medgen_src.resolve())}  # the medgen under test
    rows = []
    try:
        for dims, counts in ((2, args.n2d), (3, args.n3d)):
            cohort, run = build(work, dims, here)
            for n in (int(c) for c in counts.split(",")):
                samples, report = work / f"{label.replace('/', '_')}_s{dims}d_{n}", work / f"{label.replace('/', '_')}_e{dims}d_{n}"
                for path in (samples, report):
                    shutil.rmtree(path, ignore_errors=True)
                sample = ["sample", "--run", run, "--n", n, "--out", samples, "--steps", 1, "--sampler", "ddim",
                          "--batch-size", SETUP[dims]["batch"], "--device", "cpu"]
                evaluate = ["eval", "--real", cohort, "--fake", samples, "--out", report, "--features", "pca", "--no-cache", "--device", "cpu"]
                for command, cmd in (("sample", sample), ("eval", evaluate)):
                    row = {"command": command, "dims": dims, "n": n, "set_mib": round(n * SETUP[dims]["size"] ** dims * 4 / 2**20, 1),
                           **measure([str(a) for a in cmd], measured, work / f"{command}{dims}d_{n}.log")}
                    rows.append(row)
                    print(f"  {row}", file=sys.stderr, flush=True)
                shutil.rmtree(samples, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nPeak memory of `medgen sample` / `medgen eval` vs N ({label}); {cpu_name()}, OMP_NUM_THREADS={args.threads}\n")
    print("| command | dims | N | the set (MiB) | peak RSS (MiB) | work peak (MiB) | growth per sample (KiB) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        prev = next((p for p in rows if p["command"] == r["command"] and p["dims"] == r["dims"] and p["n"] < r["n"]), None)
        growth = f"{(r['work_peak_mib'] - prev['work_peak_mib']) * 1024 / (r['n'] - prev['n']):.1f}" if prev else "-"
        print(f"| {r['command']} | {r['dims']}D | {r['n']} | {r['set_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['work_peak_mib']:.0f} "
              f"| {growth} | {r['seconds']:.0f} |")
    print(json.dumps({"bench": "memory", "label": label, "machine": cpu_name(), "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
