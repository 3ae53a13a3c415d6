"""Inference weights folder: `model.safetensors` + `config.json`, rebuildable without training code.

`config.json` holds `{"target": "medgen.models.<module>.<Class>", "params": {...constructor kwargs...}}`
plus any descriptive keys; `load_inference_model` imports only classes inside `medgen.`.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from medgen.errors import RunError, WeightsError
from medgen.io import atomic_dir, atomic_write_json

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"


def save_inference_model(model: torch.nn.Module, out_dir: str | os.PathLike, config: dict, overwrite: bool = True) -> Path:
    """Write `model.safetensors` + `config.json` into `out_dir` atomically.

    `config` must hold what rebuilds the network without training code; by convention
    `{"target": "medgen.models.x.Class", "params": {...constructor kwargs...}, ...}` so that
    `load_inference_model` can rebuild it. Shared tensors are de-duplicated by safetensors.
    """
    from safetensors.torch import save_model

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_model(model, str(tmp / MODEL_WEIGHTS))
        atomic_write_json(tmp / MODEL_CONFIG, config)
    return Path(out_dir)


def load_model_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / MODEL_CONFIG
    if not path.is_file():
        raise RunError(f"{path} not found: {model_dir} is not a medgen model folder (expected "
                       f"{MODEL_CONFIG} + {MODEL_WEIGHTS}, written at the end of training)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON: {e}") from None


def load_inference_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild `config["target"](**config["params"])`, load the safetensors weights, eval mode.

    Only classes inside the `medgen.` package are importable this way.
    """
    from safetensors.torch import load_model

    cfg = load_model_config(model_dir)
    target = cfg.get("target", "")
    if not target.startswith("medgen.") or "." not in target:
        raise RunError(f"{Path(model_dir) / MODEL_CONFIG}: target {target!r} is not a medgen class")
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    model = cls(**cfg.get("params", {}))
    weights = Path(model_dir) / MODEL_WEIGHTS
    if not weights.is_file():
        raise WeightsError(f"{weights} not found; the model folder is incomplete")
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except (RuntimeError, OSError) as e:
        raise WeightsError(f"{weights} does not match {target} from {MODEL_CONFIG}: {e}") from None
    return model.to(device).eval()
