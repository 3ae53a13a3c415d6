"""Experiment trackers (TensorBoard, wandb) for training runs and report commands.

Training logs through accelerate's trackers (`Accelerator(log_with=...)` in `medgen.train.common`):
the metrics, the preview grids (`log_image` on the tracker that `get_tracker(name, unwrap=True)`
returns) and, with wandb, the final model as an artifact (`log_model_artifact`). `medgen eval`,
`medgen audit` and `medgen probe mri` take `--tracker` and log their finished report folder
(`log_report`): figures as images, report.json's numbers as scalars. Where files go:

- TensorBoard: event files under `DIR/tensorboard/NAME` (a training run: `RUN/tensorboard/medgen`).
- wandb: `DIR/wandb/`, offline unless a login is present (`wandb sync` uploads an offline run later).

Import-light: `tensorboard` and `wandb` are imported only when a tracker is used.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from medgen.errors import ConfigError

TRACKERS = ("none", "wandb", "tensorboard")
# report.json sections that say how a report was made, not what it found: not logged as numbers
SETUP_SECTIONS = frozenset({"recipe", "setup", "settings", "versions", "inputs", "policy"})


def check_tracker(tracker: str, setting: str) -> str:
    """`tracker` when it is known and its package is installed; else a ConfigError naming `setting`."""
    if tracker not in TRACKERS:
        raise ConfigError(f"{setting}={tracker!r}: expected one of {', '.join(TRACKERS)}")
    if tracker != "none" and importlib.util.find_spec(tracker) is None:
        raise ConfigError(f"{setting}={tracker} needs the {tracker} package: pip install {tracker}")
    return tracker


def wandb_mode() -> str:
    """`online` only when the user is logged in (env key or ~/.netrc entry); else `offline`."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


def init_kwargs(tracker: str, directory: str | os.PathLike, name: str, **wandb_options: Any) -> dict:
    """Keyword arguments of `wandb.init` (through accelerate's tracker in training): wandb writes
    into `directory/wandb` under the run name `name`; none for TensorBoard, whose folder is its
    logging directory."""
    if tracker != "wandb":
        return {}
    return {"dir": str(directory), "mode": wandb_mode(), "name": name, **wandb_options}


def hyperparameters(tracker: str, config: dict) -> dict:
    """The config as the tracker stores it: nested for wandb; flat `a/b` keys of numbers, booleans
    and strings for TensorBoard's hparams (lists and nulls as their text)."""
    if tracker == "wandb":
        return config
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value) for key, value in _leaves(config)}


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(`a/b/c`, value) for every leaf of nested dicts (lists are leaves)."""
    if not isinstance(tree, dict):
        return [(prefix, tree)]
    return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{prefix}/{key}" if prefix else str(key))]


# ----------------------------------------------------------------------------- pictures


def log_image(tracker: str, handle, tag: str, png: str | os.PathLike, step: int) -> None:
    """A PNG file (a preview grid, a report figure) at `step` into `handle`: TensorBoard's
    `SummaryWriter` or the wandb run (what accelerate's `get_tracker(name, unwrap=True)` returns)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image if image.mode in ("L", "RGB", "RGBA") else image.convert("RGBA"))
    if tracker == "tensorboard":
        handle.add_image(tag, pixels, global_step=step, dataformats="HW" if pixels.ndim == 2 else "HWC")
        handle.flush()
    elif tracker == "wandb":
        import wandb

        handle.log({tag: wandb.Image(pixels)}, step=step)


def log_model_artifact(run, run_dir: str | os.PathLike) -> None:
    """The final model of a training run as a wandb Artifact of type `model` in the wandb `run`:
    `model/` (and a latent run's `autoencoder/`) as safetensors + JSON, and `config.yaml`; no
    optimizer state."""
    import wandb

    run_dir = Path(run_dir)
    artifact = wandb.Artifact(re.sub(r"[^\w.-]", "_", run_dir.name) + "-model", type="model")
    for folder in ("model", "autoencoder"):
        for path in sorted((run_dir / folder).glob("*")):
            if path.is_file() and path.suffix in (".safetensors", ".json") and not path.name.startswith("."):
                artifact.add_file(str(path), name=f"{folder}/{path.name}")
    artifact.add_file(str(run_dir / "config.yaml"), name="config.yaml")
    run.log_artifact(artifact)


# ----------------------------------------------------------------------------- reports


def add_tracker_options(parser: argparse.ArgumentParser, run_option: str | None = None) -> None:
    """`--tracker` and `--tracker-dir` of a report command; `run_option` names its training-run option."""
    default = f"none, or the train.tracker of {run_option}'s run" if run_option else "none"
    parser.add_argument("--tracker", choices=TRACKERS, default=None,
                        help=f"also log the report's figures and numbers to tensorboard or wandb (offline without a "
                             f"login); default: {default}")
    parser.add_argument("--tracker-dir", type=Path, default=None,
                        help="folder the tracker writes (TensorBoard: DIR/tensorboard/<report name>, wandb: DIR/wandb); "
                             "default: the report folder")


def report_tracker(tracker: str | None, run: str | os.PathLike | None = None) -> str:
    """The tracker of a report command: `--tracker`, else the `train.tracker` of `run`'s
    config.yaml, else none. Checked (its package installed) before the report is computed."""
    if tracker is not None:
        return check_tracker(tracker, "--tracker")
    config = Path(run) / "config.yaml" if run is not None else None
    if config is None or not config.is_file():
        return "none"
    from medgen.config import load_config, select

    return check_tracker(str(select(load_config(config), "train.tracker", "none")), f"train.tracker of {config}")


def report_numbers(report: dict) -> dict[str, float]:
    """The numbers of a report.json reached through its dicts (`metrics/fd_pca/value`, `bound/upper_pct`),
    its setup sections left out; lists of rows are logged as tables instead."""
    return {key: value for key, value in _results(report) if isinstance(value, (int, float)) and not isinstance(value, bool)}


def report_tables(report: dict) -> dict[str, list[dict]]:
    """The lists of rows (dicts) of a report.json by their key path, e.g. a probe's `results`."""
    return {key: value for key, value in _results(report)
            if isinstance(value, list) and value and all(isinstance(row, dict) for row in value)}


def _results(report: dict) -> list[tuple[str, Any]]:
    return _leaves({key: value for key, value in report.items() if key not in SETUP_SECTIONS})


def log_report(report_dir: str | os.PathLike, tracker: str, directory: str | os.PathLike | None = None,
               job: str = "report") -> None:
    """Log a finished report folder as one tracker run named after the folder: every PNG figure as an
    image (`JOB/<figure>`), the numbers of report.json as scalars at step 0 (wandb: the run summary),
    its lists of rows as tables (wandb) and report.md as text (TensorBoard renders its tables)."""
    if tracker == "none":
        return
    report_dir = Path(report_dir)
    directory = Path(directory) if directory is not None else report_dir
    report = json.loads((report_dir / "report.json").read_text())
    numbers = {f"{job}/{key}": value for key, value in report_numbers(report).items()}
    handle = _open_report_run(tracker, directory, report_dir.name, job)
    try:
        if tracker == "wandb":
            handle.log({f"{job}/{key}": _table(rows) for key, rows in report_tables(report).items()}, step=0)
            handle.summary.update(numbers)
        else:
            for key, value in numbers.items():
                handle.add_scalar(key, value, global_step=0)
            if (report_dir / "report.md").is_file():
                handle.add_text(f"{job}/report", (report_dir / "report.md").read_text(), global_step=0)
        for png in sorted(report_dir.glob("*.png")):
            log_image(tracker, handle, f"{job}/{png.stem}", png, step=0)
    finally:
        handle.finish() if tracker == "wandb" else handle.close()
    print(f"{tracker}: logged {report_dir.name} to {directory / tracker}")


def _open_report_run(tracker: str, directory: Path, name: str, job: str):
    """The wandb run or TensorBoard writer of one report (a command is one process: the libraries
    are used directly, without accelerate's state)."""
    if tracker == "wandb":
        import wandb

        return wandb.init(project="medgen", **init_kwargs(tracker, directory, name, job_type=job))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(directory / "tensorboard" / name))


def _table(rows: list[dict]):
    """A wandb Table of report rows: one column per key, nested values as JSON text."""
    import wandb

    columns = list(dict.fromkeys(key for row in rows for key in row))
    return wandb.Table(columns=columns, data=[[_cell(row.get(c)) for c in columns] for row in rows])


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)
