"""`medgen.load_pipeline(run_dir).sample(n, ...)` and the sample directory writer.

A sample directory (docs/ARCHITECTURE.md): PNG (2D, 8- or 16-bit), NIfTI (3D, with the training
spacing) or DICOM files (a series folder per volume), in the units the model was trained on and
marked synthetic (`medgen.sample.formats`), `manifest.csv`
(`file,label,seed,sampler,steps,guidance,checkpoint_sha256,units,release_id`) and `grid.png`.
Sample i uses seed `seed + i` for its own generator, so the same seed gives the same samples
whatever the batch size. Sampler, steps, guidance and eta default to the run's own (its
config's `sample:` section, saved in `model/config.json`); latents are clipped while sampling
when the run's latent scaling says they are bounded (medgen.diffusion.latents).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from medgen.diffusion import NoiseSchedule, generators, sample_loop
from medgen.diffusion.latents import LatentScaling, decode_latents
from medgen.diffusion.sampling import default_sampler, noise_risk
from medgen.errors import ConfigError, RunError
from medgen.io import atomic_write_bytes, ensure_new_output, sha256_file

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ("file", "label", "seed", "sampler", "steps", "guidance", "checkpoint_sha256", "units", "release_id")
# what a run written before model/config.json carried its `sampling` entry samples with (sampler,
# steps None: the measured default for the run's space, medgen.diffusion.default_sampler)
SAMPLING_DEFAULTS = {"sampler": None, "steps": None, "guidance": 1.0, "eta": 0.0}
GRID_SAMPLES = {2: 64, 3: 8}  # grid.png shows the first 64 images, or mid slices of the first 8 volumes


def diffusion_model(run_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(model folder, its config.json) of a diffusion run folder or of its model/ folder;
    RunError when it holds no trained diffusion model."""
    from medgen.models.serialization import load_model_config

    run_dir = Path(run_dir)
    model_dir = run_dir / "model" if (run_dir / "model" / "config.json").is_file() else run_dir
    if not (model_dir / "config.json").is_file():
        raise RunError(f"{run_dir} holds no diffusion model: expected {run_dir}/model/config.json "
                       f"(written when `medgen train diffusion` finishes)")
    config = load_model_config(model_dir)
    if config.get("kind") != "diffusion":
        raise RunError(f"{model_dir / 'config.json'} is not a diffusion model (kind={config.get('kind')!r})")
    return model_dir, config


class DiffusionPipeline:
    """A trained denoiser + its noise schedule (+ the frozen autoencoder in latent mode)."""

    def __init__(self, denoiser: torch.nn.Module, schedule: NoiseSchedule, config: dict, autoencoder=None,
                 device: torch.device | str = "cpu", checkpoint_sha256: str | None = None):
        self.device = torch.device(device)
        self.denoiser = denoiser.to(self.device).eval()
        self.schedule = schedule
        self.config = config
        self.autoencoder = autoencoder.to(self.device).eval() if autoencoder is not None else None
        self.checkpoint_sha256 = checkpoint_sha256
        self.num_classes = int(config.get("num_classes", 0))
        self.sample_shape = tuple(config["sample_shape"])  # (C, *S) of what the denoiser generates
        self.spatial_dims = len(self.sample_shape) - 1
        self.spacing = config.get("spacing")
        # pixel data live in [-1, 1]; latents only when their scaling bounds them (codebook_minmax)
        self.latent_scaling = LatentScaling.from_dict(config["latent"]) if config.get("latent") else None
        self.clip_x0 = self.latent_scaling is None or self.latent_scaling.clip_x0
        self.sampling = {**SAMPLING_DEFAULTS, **(config.get("sampling") or {})}
        self._warned: set[str] = set()

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str | torch.device | None = None) -> "DiffusionPipeline":
        from medgen.models.serialization import load_inference_model
        from medgen.sample.exported import check_export

        run_dir = Path(run_dir)  # a user's string as much as a Path
        check_export(run_dir)  # a `medgen export` folder: its files are those it lists (same layout as a run)
        model_dir, config = diffusion_model(run_dir)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        denoiser = load_inference_model(model_dir, device)
        autoencoder = None
        if config.get("latent"):
            from medgen.models.autoencoder import load_autoencoder

            ae_dir = run_dir / "autoencoder"
            if not (ae_dir / "config.json").is_file():
                raise RunError(f"{run_dir} is a latent diffusion run but {ae_dir}/config.json is missing")
            if sha256_file(ae_dir / "model.safetensors") != config["latent"]["autoencoder_sha256"]:
                raise RunError(f"{ae_dir}/model.safetensors is not the autoencoder this model was trained with")
            autoencoder = load_autoencoder(ae_dir, device).requires_grad_(False)
        return cls(denoiser, NoiseSchedule(**config["diffusion"]), config, autoencoder, device,
                   sha256_file(model_dir / "model.safetensors"))

    def check_label(self, label: int | None) -> None:
        """Refuse a label this model cannot generate (ConfigError), before any work."""
        self._labels(label, 1)

    def _labels(self, label: int | Sequence[int] | None, n: int) -> torch.Tensor | None:
        if label is None:
            return None
        if self.num_classes == 0:
            raise ConfigError("this model is unconditional; drop --label")
        labels = torch.as_tensor([label] * n if isinstance(label, int) else list(label), dtype=torch.long)
        if labels.shape != (n,) or (labels < 0).any() or (labels >= self.num_classes).any():
            raise ConfigError(f"label must be one int or {n} ints in [0, {self.num_classes - 1}], got {label}")
        return labels

    def sampling_settings(self, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                          eta: float | None = None) -> dict:
        """The given settings, the run's own for those left None; where the run's own sampler or
        steps are null too, the measured default for its space (`default_sampler`). Logs a warning
        (once per pipeline) when the combination is expected to leave noise in the samples."""
        given = {"sampler": sampler, "steps": steps, "guidance": guidance, "eta": eta}
        s = {k: self.sampling[k] if v is None else v for k, v in given.items()}
        pixel = self.latent_scaling is None
        default = default_sampler(latent=not pixel, spatial_dims=self.spatial_dims)
        s["sampler"] = s["sampler"] or default[0]
        s["steps"] = s["steps"] or default[1]
        risk = noise_risk(s["sampler"], self.schedule, pixel=pixel, eta=float(s["eta"]))
        if risk and risk not in self._warned:  # once per pipeline, not once per batch
            self._warned.add(risk)
            log.warning("sampling: %s", risk)
        return s

    def sample(self, n: int, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
               label: int | Sequence[int] | None = None, seed: int = 0, batch_size: int = 16, eta: float | None = None,
               progress: bool = False) -> torch.Tensor:
        """`n` samples (n, C, *S) float32 on the CPU in [-1, 1] (decoded in latent mode).

        sampler, steps, guidance, eta: None takes the run's own (`self.sampling`; a null sampler or
        step count there: the measured default for the run's space). label: None (unconditional; a
        conditional model uses its null class), one class for all, or one per sample. guidance:
        classifier-free guidance scale (1 = plain conditional). All `n` are held in memory; to
        write many, use `sample_batches` (or `write_samples`).
        """
        return torch.cat(list(self.sample_batches(n, sampler, steps, guidance, label, seed, batch_size, eta, progress)))

    def sample_batches(self, n: int, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                       label: int | Sequence[int] | None = None, seed: int = 0, batch_size: int = 16, eta: float | None = None,
                       progress: bool = False) -> Iterator[torch.Tensor]:
        """`sample`'s samples one batch at a time, (B, C, *S) float32 on the CPU in [-1, 1], each
        made when asked for: batch k holds samples k*batch_size..., sample i with seed `seed + i`.
        Arguments are checked now, not at the first batch. `progress`: a `medgen.progress` bar."""
        s = self.sampling_settings(sampler, steps, guidance, eta)
        if n < 1 or batch_size < 1:
            raise ConfigError(f"n and batch_size must be >= 1 (got {n}, {batch_size})")
        return self._batches(n, s, self._labels(label, n), seed, batch_size, progress)

    @torch.no_grad()
    def _batches(self, n: int, s: dict, labels: torch.Tensor | None, seed: int, batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
        from medgen.progress import progress as progress_bar

        amp = torch.bfloat16 if self.device.type == "cuda" else None
        for i in progress_bar(range(0, n, batch_size), desc="sample", unit="batch", enabled=progress):
            j = min(n, i + batch_size)
            z = sample_loop(self.denoiser, self.schedule, self.sample_shape, generators(range(seed + i, seed + j)),
                            sampler=str(s["sampler"]), steps=int(s["steps"]), labels=None if labels is None else labels[i:j],
                            guidance=float(s["guidance"]), null_label=self.denoiser.null_label if self.num_classes else None,
                            eta=float(s["eta"]), clip_x0=self.clip_x0, device=self.device, autocast_dtype=amp)
            if self.autoencoder is not None:
                z = decode_latents(self.autoencoder, z, self.latent_scaling)
            yield z.clamp(-1, 1).cpu()


def load_pipeline(run_dir: str | os.PathLike, device: str | torch.device | None = None) -> DiffusionPipeline:
    """The sampling pipeline of a finished `medgen train diffusion` run, or of a folder `medgen export` wrote."""
    return DiffusionPipeline.from_run(run_dir, device)


def write_samples(pipeline: DiffusionPipeline, out: str | os.PathLike, n: int, sampler: str | None = None,
                  steps: int | None = None, guidance: float | None = None, label: int | Sequence[int] | None = None,
                  seed: int = 0, batch_size: int = 16, bit_depth: int = 8, overwrite: bool = False, eta: float | None = None,
                  progress: bool = False, processes=None, fmt: str | None = None, units: str = "source",
                  release_id: str | None = None) -> Path:
    """Generate `n` samples into a new sample directory (complete or not at all); sampler, steps,
    guidance and eta default to the run's own. `label`: None (unconditional), one class for all, or
    one per sample (`cycled_labels`); the manifest records each sample's. `overwrite`: replace a
    sample folder medgen wrote (`medgen.io.ensure_new_output`), checked again when the folder is
    renamed into place.

    Files (`medgen.sample.formats`): `fmt` png (2D, the default; `bit_depth` 8 or 16), nifti (3D,
    the default) or dicom (2D: a file, 3D: a series folder); `units` "source" writes the units the
    model was trained on (HU for a CT window, [0, 1] after a per-image normalization), "raw" the
    model's [-1, 1]. Every file is marked synthetic with `release_id` (default: an id of this
    sample set, `formats.sample_set_id`, the same for the same command).

    Streaming: each batch is written as it is made; memory holds one batch, the first few samples
    (for grid.png) and nothing per sample, so it does not grow with `n`.

    `processes` (`medgen.sample.shard.ProcessGroup`, default: the processes `accelerate launch`
    started, else this one): each samples its own block of indices (sample i keeps seed + i) and
    writes its files; the main process writes the manifest and grid.
    """
    from medgen.sample.formats import sample_format, sample_set_id
    from medgen.sample.shard import ProcessGroup
    from medgen.train.preview import grid_png, sample_captions

    if n < 1 or batch_size < 1:
        raise ConfigError(f"n and batch_size must be >= 1 (got {n}, {batch_size})")
    labels = pipeline._labels(label, n)  # (n,) or None; checked before any work
    output = sample_format(pipeline, fmt, units, bit_depth=bit_depth)  # refuses a format the samples cannot take, before any work
    out = ensure_new_output(out, overwrite, "sample folder")
    s = pipeline.sampling_settings(sampler, steps, guidance, eta)
    if release_id is None:
        release_id = sample_set_id(pipeline.checkpoint_sha256, n, seed, label, sorted(s.items()), output.format, units, bit_depth)
    output = dataclasses.replace(output, release_id=release_id)
    processes = processes or ProcessGroup.current(pipeline.device)
    shard = processes.shard(n, batch_size)  # this process's indices; sample i keeps seed + i
    n_grid = GRID_SAMPLES[pipeline.spatial_dims]
    with processes.atomic_dir(out, overwrite=overwrite, what="sample folder") as tmp:
        grid: list[torch.Tensor] = []  # this process's share of the first n_grid samples
        if len(shard):
            index = shard.start
            mine = None if labels is None else labels[shard.start : shard.stop].tolist()
            for x in pipeline.sample_batches(len(shard), **s, label=mine, seed=seed + shard.start, batch_size=batch_size,
                                             progress=progress):
                for img in x:
                    output.write(tmp / sample_name(index, output), img, seed + index)
                    if index < n_grid:
                        grid.append(img.clone())  # a copy: a view would keep the whole batch alive
                    index += 1
        grid = processes.gather(grid)  # after every process wrote its files
        if processes.is_main:
            _check_all_written(tmp, n, output)
            _write_manifest(tmp / "manifest.csv", n, output, labels, seed, s, pipeline.checkpoint_sha256)
            atomic_write_bytes(tmp / "grid.png", grid_png(torch.stack(grid), captions=sample_captions([seed + i for i in range(len(grid))], label)))
    return Path(out)


def cycled_labels(pipeline: DiffusionPipeline, n: int) -> list[int]:
    """Sample i gets class i mod K, K the model's classes: a balanced labelled set
    (`medgen sample --label all`, what `medgen eval --utility` trains on)."""
    if pipeline.num_classes == 0:
        raise ConfigError("this model is unconditional; --label all needs a class-conditional model")
    return [i % pipeline.num_classes for i in range(n)]


def sample_name(index: int, output) -> str:
    """The file (or 3D DICOM series folder) name of sample `index` in a sample directory written
    as `output` (`medgen.sample.formats.SampleFormat`)."""
    return f"sample_{index:05d}{output.suffix}"


def _check_all_written(folder: Path, n: int, output) -> None:
    """Every sample file is in `folder` (other processes, maybe on other machines, wrote some)."""
    missing = [name for name in (sample_name(i, output) for i in range(n)) if not (folder / name).exists()]
    if missing:
        raise RunError(f"{len(missing)} sample file(s) written by other processes are not in {folder} (e.g. {missing[0]}); "
                       f"with several machines --out must be on a filesystem every machine sees")


def _write_manifest(path: Path, n: int, output, labels: torch.Tensor | None, seed: int, settings: dict,
                    checkpoint_sha256: str | None) -> None:
    """manifest.csv, one row per sample, written row by row (no list of n rows)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        for i in range(n):
            w.writerow({"file": sample_name(i, output), "label": "" if labels is None else int(labels[i]), "seed": seed + i,
                        "sampler": settings["sampler"], "steps": settings["steps"], "guidance": settings["guidance"],
                        "checkpoint_sha256": checkpoint_sha256 or "", "units": output.units, "release_id": output.release_id})
