"""A `model.backbone=monai` denoiser as a MONAI bundle (`DIR/monai_bundle/`).

The layout of MONAI's bundle specification: `configs/inference.json` (the network as
`monai.networks.nets.DiffusionModelUNet`, its weights file, the noise schedule as MONAI's
`DDPMScheduler` when MONAI's formula gives the run's alpha_bar), `configs/metadata.json`,
`models/model.pt` (the network's state dict, as `monai.bundle.load` reads it: `torch.load` with
`weights_only=True`) and `docs/README.md`. medgen never reads `model.pt` (the weights medgen
loads are `model/model.safetensors`); the bundle is for MONAI's tools.

A medgen-backbone denoiser has no bundle: MONAI has no class that computes medgen's FiLM blocks,
so there is no `network_def` to write (train with `model.backbone=monai` for one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from medgen.diffusion.schedule import NoiseSchedule
from medgen.io import atomic_write_json, atomic_write_text

BUNDLE = "monai_bundle"
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# medgen schedule -> MONAI's NoiseSchedules name; the alpha_bar of each is compared before it is written
MONAI_SCHEDULES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "cosine": "cosine"}
MONAI_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def network_def(params: dict[str, Any]) -> dict[str, Any]:
    """The `DiffusionModelUNet` that `medgen.models.unet.MonaiUNet(**params)` wraps, as a bundle config item."""
    num_classes = int(params.get("num_classes") or 0)
    return {
        "_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": int(params["spatial_dims"]),
        "in_channels": int(params["in_channels"]), "out_channels": int(params.get("out_channels") or params["in_channels"]),
        "channels": [int(c) for c in params["channels"]], "num_res_blocks": int(params["num_res_blocks"]),
        "attention_levels": [bool(a) for a in params["attention_levels"]], "num_head_channels": int(params["head_channels"]),
        "norm_num_groups": int(params["norm_groups"]), "num_class_embeds": num_classes + 1 if num_classes else None,
        "use_flash_attention": bool(params.get("use_flash_attention", True)),  # SDPA; the weights are the same either way
    }


def monai_scheduler(schedule: NoiseSchedule, clip_x0: bool) -> tuple[dict[str, Any] | None, str]:
    """(MONAI `DDPMScheduler` config item, why) — None when MONAI's schedule formula does not give
    the run's alpha_bar to 1e-6 (zero terminal SNR, or a formula that differs)."""
    from monai.networks.schedulers import DDPMScheduler

    if schedule.zero_terminal_snr:
        return None, "MONAI's schedulers have no zero-terminal-SNR rescaling (Lin et al. 2024)"
    item = {"_target_": "monai.networks.schedulers.DDPMScheduler", "num_train_timesteps": schedule.num_train_timesteps,
            "schedule": MONAI_SCHEDULES[schedule.schedule], "prediction_type": MONAI_PREDICTIONS[schedule.prediction],
            "clip_sample": bool(clip_x0)}
    if schedule.schedule != "cosine":
        item |= {"beta_start": schedule.beta_start, "beta_end": schedule.beta_end}
    kwargs = {k: v for k, v in item.items() if k != "_target_"}
    gap = (DDPMScheduler(**kwargs).alphas_cumprod.double() - schedule.alphas_cumprod().double()).abs().max().item()
    if gap > 1e-6:
        return None, f"MONAI's {item['schedule']} schedule differs from the run's alpha_bar by up to {gap:.2g}"
    return item, "the run's noise schedule (alpha_bar identical to 1e-6); MONAI's own timestep spacing when sampling"


def inference_config(config: dict[str, Any], schedule: NoiseSchedule, clip_x0: bool) -> tuple[dict[str, Any], str]:
    """configs/inference.json and a sentence on its scheduler."""
    params = config["params"]
    scheduler, why = monai_scheduler(schedule, clip_x0)
    why = why if scheduler is not None else f"none in this bundle ({why})"
    out: dict[str, Any] = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(params),
        "network": "$@network_def.to(@device)",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "load_state": "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True))",
        "sample_shape": [1, *config["sample_shape"]],
    }
    if scheduler is not None:
        out["scheduler"] = scheduler
        if not int(params.get("num_classes") or 0):  # MONAI's inferer calls the network without class labels
            out |= {"inferer": {"_target_": "monai.inferers.DiffusionInferer", "scheduler": "@scheduler"},
                    "noise": "$torch.randn(@sample_shape, device=@device)",
                    "sample": "$lambda x: @inferer.sample(input_noise=x, diffusion_model=@network, scheduler=@scheduler)"}
    return out, why


def metadata(config: dict[str, Any], modality: str | None) -> dict[str, Any]:
    """configs/metadata.json (MONAI's bundle metadata schema)."""
    import monai
    import numpy

    shape = list(config["sample_shape"])
    tensor = {"type": "image", "format": "magnitude", "modality": modality or "unknown", "num_channels": shape[0],
              "spatial_shape": shape[1:], "dtype": "float32", "value_range": [-1, 1] if not config.get("latent") else [],
              "is_patch_data": False, "channel_def": {str(i): "image" if not config.get("latent") else f"latent {i}" for i in range(shape[0])}}
    return {
        "schema": META_SCHEMA, "version": "1.0.0", "changelog": {"1.0.0": "exported by medgen"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0], "numpy_version": numpy.__version__,
        "required_packages_version": {}, "task": f"synthetic {config['spatial_dims']}D image generation (diffusion denoiser)",
        "description": "The denoiser of a medgen diffusion run; see docs/README.md and the model card one folder up.",
        "authors": "exported by medgen", "copyright": "see the model card (README.md one folder up)",
        "intended_use": "research on synthetic medical images; not for clinical use",
        "data_source": "withheld (see the model card)",
        "network_data_format": {"inputs": {"image": tensor}, "outputs": {"pred": tensor}},
    }


def readme(config: dict[str, Any], scheduler_why: str) -> str:
    latent = config.get("latent")
    conditional = int(config.get("num_classes") or 0)
    lines = [
        "# MONAI bundle of a medgen diffusion denoiser", "",
        f"`network_def` is MONAI's `DiffusionModelUNet`; `models/model.pt` holds its weights (the EMA weights medgen samples with). "
        f"It predicts `{config['diffusion']['prediction']}` from a noisy input of shape {list(config['sample_shape'])} "
        f"and the timestep" + (f", with `class_labels` in 0..{conditional - 1} (label {conditional}: the learned null class)" if conditional else "") + ".",
        "",
        "```python",
        "from monai.bundle import load",
        "net = load(\"monai_bundle\", bundle_dir=\"path/to/the/export\", workflow_type=\"inference\")   # DiffusionModelUNet, weights loaded",
        "```", "",
        f"Scheduler: {scheduler_why}.",
    ]
    if latent:
        lines += ["", "This is a latent model: its outputs are latents scaled as the export's `model/config.json` says "
                      "(`latent`); medgen's autoencoder (`../autoencoder/`) decodes them (`medgen.load_pipeline`)."]
    lines += ["", "medgen samples with its own sampler settings (`medgen.load_pipeline` on the export folder); "
                  "this bundle is the network for MONAI's tools."]
    return "\n".join(lines) + "\n"


def write_bundle(folder: str | os.PathLike, net: torch.nn.Module, config: dict[str, Any], schedule: NoiseSchedule,
                 clip_x0: bool, modality: str | None = None) -> dict[str, Any]:
    """Write the bundle of `net` (a `MonaiUNet`) into `folder`; returns what it holds."""
    folder = Path(folder)
    (folder / "models").mkdir(parents=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.net.state_dict().items()}, folder / "models" / "model.pt")
    inference, why = inference_config(config, schedule, clip_x0)
    atomic_write_json(folder / "configs" / "inference.json", inference)
    atomic_write_json(folder / "configs" / "metadata.json", metadata(config, modality))
    atomic_write_text(folder / "docs" / "README.md", readme(config, why))
    return {"folder": BUNDLE, "network": "monai.networks.nets.DiffusionModelUNet", "scheduler": why,
            "sampling": "inferer" in inference}
