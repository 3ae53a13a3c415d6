"""Streaming (issue 22): `medgen sample` and `medgen eval` hold a batch, not the set.

Each check compares the streamed result with what the whole-set code wrote or computed before
(byte for byte, number for number) and shows that peak tensor memory does not grow with N.
Peak RSS against N is a benchmark (eval/bench_memory.py, eval/RESULTS.md), not a test.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import torch

from medgen.profiling import TensorMemory

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.channels=[16,32]", "model.num_res_blocks=1", "model.attention_levels=[false,true]",
              "model.head_channels=16", "model.norm_groups=8"]


def _train(config: str, data: Path, out: Path, *overrides: str) -> Path:
    from medgen.config import load_config
    from medgen.train.diffusion import DEFAULTS, train_diffusion

    cfg = load_config(REPO / "configs" / config,
                      ["train.tracker=none", f"data.path={data}", "train.max_steps=1", "train.batch_size=2", "sample.n_preview=1",
                       "sample.steps=2", "train.checkpoint_every=1", "train.preview_every=1", *TINY_MODEL, *overrides], DEFAULTS)
    return train_diffusion(cfg, out)


@pytest.fixture(scope="module")
def run_2d(cohort_2d, tmp_path_factory):
    return _train("demo_diffusion_2d_pixel.yaml", cohort_2d, tmp_path_factory.mktemp("stream") / "run2d")


@pytest.fixture(scope="module")
def run_3d(cohort_3d, tmp_path_factory):
    return _train("demo_diffusion_3d.yaml", cohort_3d, tmp_path_factory.mktemp("stream") / "run3d", "data.shape=[8,8,8]")


def whole_set_write(pipeline, out: Path, n: int, label=None, seed: int = 0, batch_size: int = 16, bit_depth: int = 8,
                    release_id: str = "", **settings) -> None:
    """What `write_samples` wrote before streaming (medgen at b7ca3a3, one process): every sample
    generated into one tensor, then the files (as medgen.sample.formats writes them), the
    manifest and the grid from it."""
    from medgen.sample.formats import sample_format
    from medgen.sample.pipeline import MANIFEST_FIELDS
    from medgen.train.preview import grid_png, sample_captions

    s = pipeline.sampling_settings(**settings)
    x = pipeline.sample(n, **s, label=label, seed=seed, batch_size=batch_size)
    output = sample_format(pipeline, release_id=release_id, bit_depth=bit_depth)
    names = [f"sample_{i:05d}{output.suffix}" for i in range(n)]
    out.mkdir()
    for i, img in enumerate(x):
        output.write(out / names[i], img, seed + i)
    rows = [{"file": names[i], "label": "" if label is None else int(label), "seed": seed + i, "sampler": s["sampler"],
             "steps": s["steps"], "guidance": s["guidance"], "checkpoint_sha256": pipeline.checkpoint_sha256 or "",
             "units": output.units, "release_id": release_id} for i in range(n)]
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        w.writerows(rows)
    shown = x[:64] if pipeline.spatial_dims == 2 else x[:8]
    (out / "grid.png").write_bytes(grid_png(shown, captions=sample_captions([seed + i for i in range(len(shown))], label)))


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != ".medgen-output.json"}


@pytest.mark.parametrize("dims,batch_size", [(2, 1), (2, 4), (3, 2)])
def test_streamed_write_is_byte_identical_to_the_whole_set_write(dims, batch_size, run_2d, run_3d, tmp_path):
    from medgen.sample.pipeline import load_pipeline, write_samples

    pipe = load_pipeline(str(run_2d if dims == 2 else run_3d), device="cpu")
    n = 7 if dims == 2 else 3  # a last batch that is not full
    write_samples(pipe, tmp_path / "streamed", n, seed=3, label=1, batch_size=batch_size, steps=2, release_id="smp-test")
    whole_set_write(pipe, tmp_path / "whole", n, seed=3, label=1, batch_size=batch_size, steps=2, release_id="smp-test")
    streamed, whole = _hashes(tmp_path / "streamed"), _hashes(tmp_path / "whole")
    assert len(streamed) == n + 2 and streamed == whole


def test_sampling_reports_progress_per_batch(run_2d, tmp_path, capsys):
    from medgen.sample.pipeline import load_pipeline, write_samples

    write_samples(load_pipeline(run_2d, device="cpu"), tmp_path / "s", 5, batch_size=2, steps=1, progress=True)
    assert "sample: batch 3/3 (100%)" in capsys.readouterr().err  # stderr is not a terminal here


def _peak_bytes_of_write(pipe, out: Path, n: int) -> int:
    from medgen.sample.pipeline import write_samples

    with TensorMemory() as mem:
        write_samples(pipe, out, n, batch_size=4, steps=1, sampler="ddim")
    return mem.peak_bytes


def test_sampling_memory_does_not_grow_with_n(run_3d, tmp_path):
    """Peak tensor memory of writing 12 and 48 volumes (batches of 4): equal within 1 volume.
    Before streaming the 36 extra 8^3 volumes (2 KiB each) stayed in memory until the end.
    3D, where grid.png keeps only the first 8 samples."""
    from medgen.sample.pipeline import load_pipeline

    pipe = load_pipeline(run_3d, device="cpu")
    small = _peak_bytes_of_write(pipe, tmp_path / "small", 12)
    large = _peak_bytes_of_write(pipe, tmp_path / "large", 48)
    volume = 8**3 * 4
    assert large - small < volume, (small, large)
    assert len(list((tmp_path / "large").glob("sample_*.nii.gz"))) == 48


def test_write_samples_keeps_a_folder_that_appeared_while_it_sampled(run_2d, tmp_path, monkeypatch):
    """Two `medgen sample --out S` at once (issue 22 row 4): the one that finishes second is
    refused and the first one's samples stay, instead of being swapped out."""
    import medgen.sample.pipeline as pipeline_module
    from medgen.errors import MedgenError
    from medgen.io import atomic_dir

    out = tmp_path / "S"
    pipe = pipeline_module.load_pipeline(run_2d, device="cpu")
    sample_loop = pipeline_module.sample_loop

    def other_writer_finishes_first(*args, **kwargs):  # while this one samples its first batch
        if not out.exists():
            with atomic_dir(out) as tmp:
                (tmp / "sample_00000.png").write_bytes(b"the other run's sample")
        return sample_loop(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample_loop", other_writer_finishes_first)
    with pytest.raises(MedgenError, match="S"):
        pipeline_module.write_samples(pipe, out, 2, steps=1)
    assert (out / "sample_00000.png").read_bytes() == b"the other run's sample"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the refused run left no temp folder


# --------------------------------------------------------------------------- reading and eval


def _png_folder(folder: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """n noise PNGs (8-bit gray) with a bright square whose place varies: cheap images with structure."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 60, (size, size), dtype=np.uint8)
        r, c = rng.integers(0, size // 2, 2)
        img[r : r + size // 2, c : c + size // 2] += 150
        Image.fromarray(img).save(folder / f"img_{i:04d}.png")
    return folder


def test_iter_images_reads_the_set_in_batches(cohort_2d):
    from medgen.data import iter_images, load_images

    whole, samples = load_images(str(cohort_2d))
    batches = list(iter_images(str(cohort_2d), batch_size=5))
    assert [len(x) for x, _ in batches] == [5, 5, 2] and [len(s) for _, s in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), whole)
    assert [s for _, batch in batches for s in batch] == samples


def test_eval_of_folders_equals_the_whole_set_computation_2d(cohort_2d, tmp_path, capsys):
    """The streamed evaluation gives the numbers the whole-set code gave: features of the whole
    tensors (PCA fitted on all real images at once), the same metrics and MS-SSIM pairs."""
    from medgen.data import load_images
    from medgen.metrics.features import PCAExtractor
    from medgen.metrics.msssim import msssim_diversity
    from medgen.metrics.report import evaluate, feature_metrics, metric_keys

    fake = _png_folder(tmp_path / "fake", 70, size=32)
    report = evaluate(str(cohort_2d), str(fake), bootstrap=20, msssim_pairs=30, features="pca", use_cache=False)
    assert "features synthetic (pca): image 70/70 (100%)" in capsys.readouterr().err  # progress in a log
    x_r, _ = load_images(cohort_2d)
    x_f, _ = load_images(fake)
    ex = PCAExtractor().fit(x_r)
    expected = feature_metrics(ex(x_r), ex(x_f), ["fid", "kid", "prdc"], 20, 0, torch.device("cpu"), metric_keys("pca"))
    for name, m in expected.items():
        assert report["metrics"][name] == m, name
    for name, x in (("fake", x_f), ("real", x_r)):
        assert report["metrics"][f"msssim_{name}"]["value"] == msssim_diversity(x, n_pairs=30)["msssim"]


def test_eval_of_folders_equals_the_whole_set_computation_3d(cohort_3d, tmp_path):
    """3D: the 2.5D per-plane distances (one PCA basis fitted on the real slices of all planes)
    and the volume-level distance equal those of the whole tensors."""
    from medgen.data import load_images
    from medgen.data.cohort import synth_brain
    from medgen.metrics.features import PLANES, PCAExtractor, volume_slices
    from medgen.metrics.fid import frechet_distance
    from medgen.metrics.report import evaluate

    fake = synth_brain(tmp_path / "fake3d", n=5, dims=3, size=16, seed=1)
    report = evaluate(cohort_3d, fake, metrics=["fid"], bootstrap=0, features="pca", features_3d="pca", use_cache=False)
    x_r, _ = load_images(cohort_3d)
    x_f, _ = load_images(fake)
    ex2 = PCAExtractor().fit([volume_slices(x_r, axis) for axis in PLANES.values()])
    for plane, axis in PLANES.items():
        fd = frechet_distance(ex2(volume_slices(x_r, axis)).double(), ex2(volume_slices(x_f, axis)).double())
        assert report["metrics"]["fd_pca_2.5d"][plane]["value"] == fd, plane
    ex3 = PCAExtractor().fit(x_r)
    assert report["metrics"]["fd_pca"]["value"] == frechet_distance(ex3(x_r).double(), ex3(x_f).double())
    assert report["recipe"]["features"]["basis_sha256"] == ex3.recipe["basis_sha256"]


def test_eval_memory_does_not_hold_the_synthetic_set(tmp_path, monkeypatch):
    """Peak tensor memory of `evaluate` on 64 and 192 synthetic 64^2 images: 128 more images
    (16 KiB each as float32) add less than a quarter of their size; what grows is per-sample
    features and metric terms. Before streaming both sets were loaded whole; MS-SSIM's 100 pairs
    read their images a batch of pairs at a time. (The PCA extractor's batch is cut to 16 images
    so that both sets span several batches.)"""
    from medgen.metrics.features import PCAExtractor
    from medgen.metrics.report import READ_BATCH, evaluate

    monkeypatch.setattr(PCAExtractor, "batch_size", 16)
    assert READ_BATCH[2] <= 64
    real = _png_folder(tmp_path / "real", 20, seed=1)
    peaks = {}
    for n in (64, 192):
        fake = _png_folder(tmp_path / f"fake{n}", n, seed=2)
        with TensorMemory() as mem:
            evaluate(real, fake, tmp_path / f"report{n}", bootstrap=0, msssim_pairs=100, features="pca", use_cache=False)
        peaks[n] = mem.peak_bytes
    image = 64 * 64 * 4
    assert peaks[192] - peaks[64] < 128 * image / 4, peaks
