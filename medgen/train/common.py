"""Training machinery shared by every medgen training loop (autoencoder, diffusion).

Nothing here knows what is being trained. A loop built on it looks like::

    cfg = load_run_config(args.config, args.out, args.resume, args.overrides, DEFAULTS)  # DEFAULTS: the schema
    run_dir = prepare_run_dir(args.out, cfg, resume=args.resume)  # in a trainer decorated @removes_failed_run
    accelerator = build_accelerator(cfg.train, run_dir)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    ckpt = CheckpointManager(run_dir, keep_last=cfg.train.keep_last)
    start = ckpt.resume(accelerator, args.resume)["step"] if args.resume else 0
    metrics = MetricsLogger(run_dir, accelerator, truncate_after=start)
    for step, batch in enumerate(infinite_batches(loader, sampler, start, accum), start + 1):
        loss = ...
        check_finite(loss, step, "reconstruction loss", accelerator)  # before backward
        ...
        if step % every == 0:
            ckpt.save(accelerator, step, {"anything": "json"})
    save_inference_model(accelerator.unwrap_model(model), run_dir / "model", model_config)

The run directory layout is the one in docs/ARCHITECTURE.md: `config.yaml`, `model/`,
`checkpoints/step_N/`, `metrics.jsonl`, `samples/`, `split.json`.

Checkpoints (`checkpoints/step_N/`) hold `accelerator.save_state` output (model weights as
safetensors; optimizer/scaler/RNG states as accelerate writes them) plus `extra.json`. They are
for resuming *your own* run; the distributable artifact is `model/` (safetensors + JSON only).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from medgen.config import check_input_paths, input_paths, load_config, save_config, to_dict
from medgen.errors import ConfigError, RunError, TrainingError
from medgen.io import (
    OUTPUT_MARKER,
    apply_umask_modes,
    atomic_write_json,
    claim_output,
    holds_lock,
    lock_output,
    mark_output,
    release_output,
    write_errors,
)
from medgen.models.serialization import (  # noqa: F401  (re-exported: part of the training API)
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    load_inference_model,
    load_model_config,
    save_inference_model,
)
from medgen.progress import ProgressLog, progress  # noqa: F401  (ProgressLog: re-exported for older imports)
from medgen.tracking import check_tracker, hyperparameters, init_kwargs, log_image, log_model_artifact, wandb_mode

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
EXTRA_STATE = "extra.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------- accelerator


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg.key` for a DictConfig, dict or None, with a default for missing/null values."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def use_cpu(train_cfg: Any) -> bool:
    """`train.cpu`, or no CUDA device: then several processes form a gloo (MULTI_CPU) group."""
    return bool(cfg_get(train_cfg, "cpu", False)) or not torch.cuda.is_available()


def process_state(train_cfg: Any = None):
    """accelerate's `PartialState` (rank, world size), created with the right device choice.

    The first `PartialState` of a process fixes the distributed type; created without `cpu=True`
    on a CPU-only machine it would ignore a torchrun launch, so every entry point goes through here.
    """
    from accelerate.state import PartialState

    return PartialState(cpu=use_cpu(train_cfg))


def build_accelerator(train_cfg: Any, run_dir: str | os.PathLike | None = None):
    """An `accelerate.Accelerator` configured from the `train:` config section.

    Keys: `mixed_precision` (no|fp16|bf16), `gradient_accumulation_steps`, `tracker`
    (none|wandb|tensorboard), `seed`, `cpu` (force CPU). A tracker logs through accelerate's
    trackers (medgen.tracking): TensorBoard event files in `run_dir/tensorboard/`, wandb into
    `run_dir/wandb` in offline mode unless a login is present (WANDB_API_KEY or ~/.netrc); a
    tracker whose package is missing is a ConfigError here, before training.
    Seeds python/numpy/torch via `accelerate.utils.set_seed(seed)`.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed

    mp = str(cfg_get(train_cfg, "mixed_precision", "no"))
    if mp not in ("no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision={mp!r}: use no, fp16 or bf16")
    tracker = check_tracker(str(cfg_get(train_cfg, "tracker", "none")), "train.tracker")
    accum = int(cfg_get(train_cfg, "gradient_accumulation_steps", 1))
    if accum < 1:
        raise ConfigError(f"train.gradient_accumulation_steps={accum} must be >= 1")
    if logging.getLogger().level > logging.DEBUG:  # accelerate logs every file it saves at INFO
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    # A second Accelerator in the same process (a notebook, a test, a resumed call) may ask for
    # another precision; reset the per-run state but keep the distributed process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    project_cfg = (ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tensorboard"))
                   if run_dir else None)
    accelerator = Accelerator(
        mixed_precision=mp,
        # loops take exactly `accum` micro-batches per optimizer step (one `accumulate` block each);
        # no forced sync at epoch ends, so step counts stay exact across epochs and resumes
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accum, sync_with_dataloader=False),
        log_with=None if tracker == "none" else tracker,
        project_config=project_cfg,
        cpu=use_cpu(train_cfg),
        step_scheduler_with_optimizer=False,
    )
    set_seed(int(cfg_get(train_cfg, "seed", 0)))
    return accelerator


def init_tracker(accelerator, cfg: Any, run_dir: str | os.PathLike, project: str = "medgen") -> None:
    """Start the configured tracker (no-op without one) with the run's config as hyperparameters."""
    tracker = str(cfg_get(cfg.train, "tracker", "none"))
    if tracker == "none":
        return
    accelerator.init_trackers(project, config=hyperparameters(tracker, to_dict(cfg)),
                              init_kwargs={tracker: init_kwargs(tracker, run_dir, Path(run_dir).name)})
    if accelerator.is_main_process:
        log.info("%s tracking in %s%s", tracker, Path(run_dir) / tracker,
                 f" ({wandb_mode()} mode)" if tracker == "wandb" else "")


def log_preview(accelerator, tag: str, png: str | os.PathLike, step: int) -> None:
    """A preview PNG of the run (`samples/...`) into the tracker at `step`; main process only."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            log_image(tracker.name, tracker.tracker, tag, png, step)


def end_training(accelerator, run_dir: str | os.PathLike) -> None:
    """After the final model is saved: with wandb, log it as a model artifact; then close the
    trackers (accelerate's `end_training`)."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                log_model_artifact(tracker.tracker, run_dir)
    accelerator.end_training()


# ----------------------------------------------------------------------------- run dir / config


def load_run_config(config: str | None, out: str | os.PathLike, resume: str | None,
                    overrides: Sequence[str] = (), schema: type | None = None):
    """Resolve the config of a new or resumed run, checked against the stage's `schema` (and its
    input paths exist).

    New run: `schema defaults <- config <- overrides`. Resume without `--config`: the run's own
    `config.yaml` plus overrides (e.g. `train.max_steps=20000` to extend a run).
    """
    saved = Path(out) / "config.yaml"
    if config is None and not (resume and saved.is_file()):
        raise ConfigError("--config is required (or --resume an existing run that has config.yaml)")
    cfg = load_config(saved if config is None else config, overrides, schema)
    check_input_paths(cfg)  # data.path, autoencoder.run, ... exist
    return cfg


def prepare_run_dir(out: str | os.PathLike, cfg: Any, resume: str | None = None) -> Path:
    """Check what can be checked without reading data, then create the run directory and save
    the resolved `config.yaml`.

    Checked before `out` is created: the config's input paths exist (`data.path`,
    `autoencoder.run`, ... : the keys declared with `exists=True`) and `out` is not inside one
    of them (nor holds one), its disk can be written, no other process writes it (a lock, held
    until the trainer returns), the `--resume` checkpoint exists, and a new run does not reuse a
    non-empty `out` (so a typo never mixes two runs; pass `resume` to continue one). Under
    `accelerate launch` only the main process creates and writes; the others wait for it.
    """
    check_input_paths(cfg)
    state = process_state(cfg_get(cfg, "train"))
    out = Path(out)
    if state.is_main_process:
        claim_output(out, "run directory", inputs=input_paths(cfg))  # never inside its data; a disk that takes it
        lock_output(out, "run directory")  # released when the trainer returns (`removes_failed_run`)
        if resume is None and out.exists() and any(out.iterdir()):
            raise RunError(f"run directory {out} already holds files; use --resume latest to continue it "
                           f"or choose a new --out")
        if resume not in (None, "latest") and not Path(resume).exists():
            raise RunError(f"--resume {resume}: no such checkpoint folder")
        if resume is not None and (out / "model").is_dir() and not (out / "model" / OUTPUT_MARKER).exists():
            mark_output(out / "model", "medgen train")  # a run from before output markers: its model/ is replaced at the end
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    state.wait_for_everyone()
    return out


def removes_failed_run(train: Callable[..., Path]) -> Callable[..., Path]:
    """Decorate a trainer `train(cfg, out, resume=None)`: when a run whose folder was new (absent
    or empty) fails before its first checkpoint, what it created is removed, so the corrected
    command reuses `--out` without `--resume`. A folder that existed (e.g. the current
    directory) is emptied, never removed. A full or read-only disk is one error naming the
    file (`write_errors`); the run directory's lock is released when the trainer returns.
    """

    @functools.wraps(train)
    def wrapper(cfg: Any, out: str | os.PathLike, resume: str | None = None, *args: Any, **kwargs: Any) -> Path:
        out = Path(out)
        existed = out.exists()
        fresh = not existed or (out.is_dir() and not any(out.iterdir()))
        try:
            with write_errors(out, "run directory"):
                return train(cfg, out, resume, *args, **kwargs)
        except BaseException:
            # only a folder this process claimed (its lock): a run refused because another
            # process writes `out` must not remove that process's files
            if fresh and out.is_dir() and holds_lock(out) and not CheckpointManager(out).list():
                for child in list(out.iterdir()) if existed else []:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                if not existed:
                    shutil.rmtree(out, ignore_errors=True)
                log.debug("removed the failed run's folder %s (no checkpoint was written)", out)
            raise
        finally:
            release_output(out)

    return wrapper


# ----------------------------------------------------------------------------- checkpoints


class CheckpointManager:
    """Atomic `checkpoints/step_N/` folders written by `accelerator.save_state`, keep-last-N.

    A checkpoint is first written to `checkpoints/.step_N.tmp/` by every process, then the
    main process adds `extra.json` and renames the folder. A crash mid-save leaves only a temp
    folder (ignored and cleaned on the next save), never a half-written `step_N`.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3):
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.keep_last = max(1, int(keep_last))

    def list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / EXTRA_STATE).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        items = self.list()
        return items[-1][1] if items else None

    def save(self, accelerator, step: int, extra: dict | None = None) -> Path:
        """Write the full training state at `step`; call on every process."""
        final = self.dir / f"step_{step}"
        tmp = self.dir / f".step_{step}.tmp"
        if accelerator.is_main_process:
            for stale in self.dir.glob(".step_*.tmp") if self.dir.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {"step": int(step), "time": time.time(), **(extra or {})}
                atomic_write_json(tmp / EXTRA_STATE, state)
                apply_umask_modes(tmp)
                if final.exists():  # re-saving the same step (e.g. final save == periodic save)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._prune()
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for _, path in self.list()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def resolve(self, which: str | os.PathLike) -> Path | None:
        if str(which) == "latest":
            return self.latest()
        path = Path(which)
        if not (path / EXTRA_STATE).is_file():
            raise RunError(f"{path} is not a complete medgen checkpoint (no {EXTRA_STATE})")
        return path

    def resume(self, accelerator, which: str | os.PathLike = "latest") -> dict:
        """Load the state saved by `save` (models/optimizers prepared in the same order).

        Returns the extra dict (`step`, ...). `latest` with no checkpoint yet returns
        `{"step": 0}` so a preemptible job can always pass `--resume latest`.
        """
        path = self.resolve(which)
        if path is None:
            log.info("no checkpoint in %s yet; starting from step 0", self.dir)
            return {"step": 0}
        try:
            accelerator.load_state(str(path))
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainingError(f"could not resume from {path}: {e}. Was it written by a run with "
                                f"the same model config and number of optimizers?") from None
        extra = json.loads((path / EXTRA_STATE).read_text())
        log.info("resumed from %s (step %d)", path, extra["step"])
        return extra


# ----------------------------------------------------------------------------- logging


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().item() if v.numel() == 1 else v.detach().float().tolist()
    if hasattr(v, "item") and callable(v.item):  # numpy scalar
        return v.item()
    return v


class MetricsLogger:
    """Appends `{"step": N, ...}` lines to `run_dir/metrics.jsonl` and forwards to the tracker.

    Main process only. On resume pass `truncate_after=start_step` so lines logged after the
    checkpoint (by the interrupted run) are dropped and the file reads as one clean run.
    """

    def __init__(self, run_dir: str | os.PathLike, accelerator=None, truncate_after: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        if self.is_main and truncate_after is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= truncate_after]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, values: dict) -> None:
        if not self.is_main:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None and self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=step)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def progress_bar(accelerator, total: int, initial: int = 0, desc: str = "train"):
    """Training progress on the main process (`medgen.progress`: a tqdm bar on a terminal, a line
    every 1% of the run in a log file)."""
    return progress(total=total, initial=initial, desc=desc, enabled=accelerator.is_main_process)


# ----------------------------------------------------------------------------- NaN guard


def check_finite(loss: torch.Tensor, step: int, what: str = "loss", accelerator=None) -> None:
    """Raise `TrainingError` if `loss` is NaN/Inf (on any process when `accelerator` is given).

    Call before `backward()` so no update is applied and no checkpoint is written after the
    bad step: the last good checkpoint stays the newest one on disk.
    """
    bad = ~torch.isfinite(loss.detach()).all()
    if accelerator is not None and accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.float().reshape(1), reduction="sum") > 0
    if bool(bad):
        value = loss.detach().float().flatten()[:4].tolist()
        raise TrainingError(
            f"{what} is not finite ({value}) at step {step}; training stopped. The last good "
            f"checkpoint is kept; lower train.lr, use train.mixed_precision=bf16 instead of fp16, "
            f"or check the data, then --resume latest.")


# ----------------------------------------------------------------------------- data order


class EpochSampler(Sampler[int]):
    """Index order for epoch `e` is a permutation seeded by `seed + e` (or identity).

    Resume needs the same order as the uninterrupted run, which a stateless per-epoch seed
    gives for free; accelerate shards the batches of this sampler across processes.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):
        self.n, self.shuffle, self.seed, self.epoch = int(n), shuffle, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(dataset, batch_size: int, sampler: Sampler, num_workers: int = 0, drop_last: bool = True, seed: int = 0):
    """A DataLoader with a private generator, so creating iterators never touches the global RNG."""
    from torch.utils.data import DataLoader

    if drop_last and len(dataset) < batch_size:
        raise ConfigError(f"train.batch_size={batch_size} is larger than the training set ({len(dataset)} items); "
                          f"lower train.batch_size or add data")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=int(num_workers),
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def _global_rng_state() -> tuple:
    import random

    import numpy as np

    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_global_rng_state(state: tuple) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (validation, previews) without changing the global CPU random states."""
    state = _global_rng_state()
    try:
        yield
    finally:
        _set_global_rng_state(state)


class DataRNG:
    """A private python/numpy/torch-CPU random stream for data loading in the main process.

    Loading an image may draw random numbers (torchio, caching on first read), and how many
    depends on what was loaded before; swapping this stream in while a batch is fetched keeps
    the training stream (dead-code restarts, slice draws, posterior samples) identical between
    an uninterrupted and a resumed run.
    """

    def __init__(self, seed: int):
        with preserved_rng():
            import random

            import numpy as np

            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            self.state = _global_rng_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = _global_rng_state()
        _set_global_rng_state(self.state)
        try:
            yield
        finally:
            self.state = _global_rng_state()
            _set_global_rng_state(outer)


def infinite_batches(accelerator, loader, sampler: EpochSampler, start_batch: int = 0, seed: int = 0) -> Iterator[Any]:
    """Batches forever from a prepared `loader`, starting at global batch index `start_batch`.

    `start_batch` counts micro-batches (optimizer steps x gradient accumulation). The first
    epoch after a resume skips the batches already seen, without loading them. Batches are
    fetched under a private `DataRNG` stream so data loading never shifts the training RNG.
    """
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ConfigError("the training loader is empty: fewer items than batch_size x processes")
    epoch, skip = divmod(int(start_batch), per_epoch)
    data_rng = DataRNG(seed + epoch)
    while True:
        current = accelerator.skip_first_batches(loader, skip) if skip else loader
        # accelerate's loaders call `sampler.set_epoch(loader.iteration)` when iterated, so the
        # epoch goes through the loader (a fresh skip-loader would otherwise restart at 0).
        if hasattr(current, "set_epoch"):
            current.set_epoch(epoch)
        sampler.set_epoch(epoch)
        it = iter(current)
        while True:
            with data_rng.active():
                batch = next(it, None)
            if batch is None:
                break
            yield batch
        epoch, skip = epoch + 1, 0


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cpu_autocast(precision: str):
    """The CPU autocast context that stands for `train.mixed_precision` in memory estimates
    (fp16 and bf16 have the same size; CPU autocast runs bf16)."""
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.bfloat16}.get(str(precision))
    if dtype is None:
        raise ConfigError(f"train.mixed_precision must be no, fp16 or bf16, got {precision!r}")
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


def print_memory_estimate(est: dict[str, Any], stage: str) -> None:
    size = "x".join(str(s) for s in est["shape"])
    precision = "fp32" if est["precision"] == "no" else est["precision"]
    print(f"{stage}: peak tensor memory of a training step at batch {est['batch']} x {est['channels']} x {size}, "
          f"{precision}: {est['peak_gib']:.2f} GiB")
    print(f"  parameters {est['parameters_gib']:.2f} GiB; what stays between steps (weights, optimizer and EMA state) "
          f"{est['persistent_gib']:.2f} GiB; the rest is activations and gradients")
    print("  measured on the CPU; a GPU adds its CUDA context (~0.5 GiB), cuDNN workspaces and allocator rounding "
          "(see eval/RESULTS.md for the gap measured on an H200)")
