"""Sampling across processes: every index once, in whole batches, and the same files as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medgen.cli import main
from medgen.sample.shard import shard_range

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.channels=[16,32]", "model.num_res_blocks=1", "model.attention_levels=[false,true]",
              "model.head_channels=16", "model.norm_groups=8"]


@pytest.mark.parametrize("n", [1, 5, 16, 17, 63])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
@pytest.mark.parametrize("processes", [1, 2, 3, 8])
def test_shards_cover_every_index_once_in_whole_batches(n, batch_size, processes):
    shards = [shard_range(n, batch_size, processes, k) for k in range(processes)]
    assert [i for s in shards for i in s] == list(range(n))  # each index once, in process order
    single = {(i, min(n, i + batch_size)) for i in range(0, n, batch_size)}  # one process's batches
    for s in shards:
        batches = {(i, min(s.stop, i + batch_size)) for i in range(s.start, s.stop, batch_size)}
        assert batches <= single
    counts = [len(range(s.start, s.stop, batch_size)) for s in shards]
    assert max(counts) - min(counts) <= 1  # batches as evenly spread as they can be


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cohort_2d):
    from medgen.config import load_config
    from medgen.train.diffusion import DEFAULTS, train_diffusion

    out = tmp_path_factory.mktemp("shard") / "run"
    cfg = load_config(REPO / "configs" / "demo_diffusion_2d_pixel.yaml",
                      ["train.tracker=none", f"data.path={cohort_2d}", "train.max_steps=1", "train.batch_size=4",
                       "sample.n_preview=1", "sample.steps=3", "train.checkpoint_every=1", "train.preview_every=1",
                       *TINY_MODEL], DEFAULTS)
    return train_diffusion(cfg, out)


@pytest.mark.slow
def test_two_processes_write_the_files_of_one(tiny_run, tmp_path, capsys):
    """`accelerate launch` with 2 CPU processes (torchrun + gloo; accelerate's `--cpu --num_processes 2`
    alone starts one process unless MPI is installed): 5 samples in batches of 2 are split 4 + 1,
    and every file, the manifest and the grid are byte for byte those of a single process."""
    args = ["--run", str(tiny_run), "--n", "5", "--batch-size", "2", "--seed", "7", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1)
    try:
        assert main(["sample", *args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "medgen", "sample", *args, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 samples in" in proc.stdout and "sampled by 2 processes" in proc.stdout  # one process printed it
    one, two = tmp_path / "one", tmp_path / "two"
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert [f"sample_{i:05d}.png" for i in range(5)] == [n for n in names if n.startswith("sample_")]
    for name in names:
        if name != ".medgen-output.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    seeds = [line.split(",")[2] for line in (two / "manifest.csv").read_text().splitlines()[1:]]
    assert seeds == ["7", "8", "9", "10", "11"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp folder left
