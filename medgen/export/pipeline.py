"""`medgen export`: a trained diffusion run as one self-contained folder that medgen, diffusers and
MONAI load, with a model card.

    DIR/README.md            the model card (Hugging Face front matter; medgen.export.card)
    DIR/medgen_export.json   every file's sha256, the formats, the training data as counts, the audits
    DIR/model/               medgen: the run's EMA weights byte for byte + config.json (paths withheld)
    DIR/autoencoder/         latent runs: the run's autoencoder (config paths withheld)
    DIR/scheduler/           diffusers: scheduler_config.json of the run's default sampler
    DIR/unet/                2D runs: the same network as diffusers' UNet2DModel (medgen.export.diffusers_unet)
    DIR/model_index.json     2D unconditional pixel runs: diffusers' DDPMPipeline
    DIR/monai_bundle/        model.backbone=monai runs: a MONAI bundle (medgen.export.monai_bundle)

`medgen.load_pipeline(DIR)` reads the folder as it reads the run (`model/`, `autoencoder/` under the
run's names) after checking those files against the manifest (medgen.sample.exported). The
folder appears complete or not at all, and only after the release's leak check finds no subject
id, file name or folder of the real data in it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from medgen.errors import RunError
from medgen.io import atomic_dir, atomic_write_json, atomic_write_text, ensure_new_output, sha256_file
from medgen.sample.exported import EXPORT_FORMAT, EXPORT_FORMAT_VERSION, EXPORT_MANIFEST, is_export

LOCAL_KEYS = ("autoencoder_source", "cache")  # latent entries naming folders of the training machine
DIFFUSERS_CHECK_RTOL = 1e-4  # the converted UNet2DModel reproduces the denoiser's output on a probe input to this share
NO_3D_UNET = ("diffusers has no 3D-convolution UNet: UNet3DConditionModel is a video network (2D convolutions per "
              "frame, conv_in weights (C, C_in, 3, 3) against this model's (C, C_in, 3, 3, 3), temporal layers with no "
              "counterpart here, text-encoder states required)")
SOFTWARE = ("diffusers", "monai", "safetensors")


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model config.json without the training machine's paths: the data section's withheld, the
    latent cache and autoencoder source dropped (sampling reads neither)."""
    from medgen.release.card import withhold_paths

    out = {**config, "data": withhold_paths(config.get("data") or {})}
    if config.get("latent"):
        out["latent"] = {k: v for k, v in config["latent"].items() if k not in LOCAL_KEYS}
    return out


def _copy_model(src: Path, dst: Path, config: dict[str, Any]) -> None:
    dst.mkdir(parents=True)
    shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    atomic_write_json(dst / "config.json", portable_config(config))


def _write_medgen(tmp: Path, run: Path, model_dir: Path, config: dict[str, Any]) -> list[str]:
    from medgen.models.serialization import load_model_config

    _copy_model(model_dir, tmp / "model", config)
    if not config.get("latent"):
        return ["model/"]
    _copy_model(run / "autoencoder", tmp / "autoencoder", load_model_config(run / "autoencoder"))
    return ["model/", "autoencoder/"]


def _write_diffusers(tmp: Path, pipe, config: dict[str, Any], sampler: str) -> dict[str, Any]:
    """scheduler/ always; unet/ (and model_index.json for a DDPMPipeline) when diffusers can hold the
    network, checked on a probe input; otherwise why not."""
    from medgen.diffusion.sampling import make_scheduler
    from medgen.export.diffusers_unet import convert_unet

    scheduler = make_scheduler(sampler, pipe.schedule, pipe.clip_x0)
    out: dict[str, Any] = {"scheduler": "scheduler/", "scheduler_class": type(scheduler).__name__, "unet": None,
                           "pipeline": None, "why": None}
    size = list(pipe.sample_shape[1:])
    try:
        unet = convert_unet(pipe.denoiser, config, size[0] if len(set(size)) == 1 else size) if pipe.spatial_dims == 2 else None
    except RunError as e:
        unet, out["why"] = None, str(e)
    if unet is None:
        scheduler.save_config(str(tmp / "scheduler"))
        return out | {"why": out["why"] or NO_3D_UNET}
    out["max_abs_diff"], scale = _probe_difference(pipe, unet)
    if out["max_abs_diff"] > DIFFUSERS_CHECK_RTOL * max(1.0, scale):
        raise RunError(f"the diffusers UNet2DModel converted from {config['target']} differs from it by "
                       f"{out['max_abs_diff']:.3g} on a probe input (a bug of medgen's conversion: please report it)")
    if pipe.latent_scaling is None and pipe.num_classes == 0:  # what DDPMPipeline can sample on its own
        from diffusers import DDPMPipeline

        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp), safe_serialization=True)
        return out | {"unet": "unet/", "pipeline": "DDPMPipeline"}
    unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    scheduler.save_config(str(tmp / "scheduler"))
    return out | {"unet": "unet/"}


@torch.no_grad()
def _probe_difference(pipe, unet) -> tuple[float, float]:
    """(max |medgen denoiser - UNet2DModel|, max |medgen denoiser|) on one seeded input, the first
    and last timesteps, a label and the null label."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *pipe.sample_shape, generator=g)
    t = torch.tensor([1, pipe.schedule.num_train_timesteps - 1])
    labels = torch.tensor([0, pipe.num_classes]) if pipe.num_classes else None
    ref = pipe.denoiser(x, t, labels)
    return float((unet(x, t, class_labels=labels).sample - ref).abs().max()), float(ref.abs().max())


def _write_monai(tmp: Path, pipe, config: dict[str, Any], modality: str | None) -> dict[str, Any]:
    from medgen.export.monai_bundle import BUNDLE, write_bundle

    if config.get("backbone", "medgen") != "monai":
        return {"folder": None, "why": "a MONAI bundle needs a run trained with model.backbone=monai (MONAI's "
                                       "DiffusionModelUNet); medgen's own backbone has no MONAI class"}
    return write_bundle(tmp / BUNDLE, pipe.denoiser, config, pipe.schedule, pipe.clip_x0, modality) | {"why": None}


def _model_part(pipe, config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    latent = config.get("latent") or {}
    return {
        "backbone": config.get("backbone", "medgen"), "target": config["target"], "channels": config["params"]["channels"],
        "parameters": sum(p.numel() for p in pipe.denoiser.parameters()), "step": config.get("step"),
        "schedule": config["diffusion"], "sampling": {k: settings[k] for k in ("sampler", "steps", "guidance", "eta")},
        "latent_scaling": {k: latent[k] for k in ("scaling", "scale_factor", "shift", "source") if k in latent} or None,
        "autoencoder_sha256": latent.get("autoencoder_sha256"),
    }


def _identifiers(run: Path, config: dict[str, Any]) -> set[str]:
    """What of the training machine the folder must not name: the release's real identifiers
    (split.json: subject ids, file names, the data folder) plus the run's and the latent cache's
    and autoencoder's folders."""
    from medgen.release.card import real_identifiers

    local = [run.resolve(), *(Path(v) for k, v in (config.get("latent") or {}).items() if k in LOCAL_KEYS and v)]
    return real_identifiers(run, [], folders=local) | {str(p) for p in local}


def _contents(folder: Path) -> list[str]:
    """Relative paths of the files under `folder`, hidden ones (the staging folder's owner file) aside."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def export_model(run: str | os.PathLike, out: str | os.PathLike, *, license: str = "other", modality: str | None = None,
                 overwrite: bool = False, echo: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Write the export folder of diffusion run `run` to `out` (see the module docstring); returns
    its manifest (`medgen_export.json`). RunError, with nothing written, when the run is not a
    finished diffusion run or the folder would name the real data."""
    from medgen import __version__
    from medgen.export.card import check_license, model_card, privacy_record, training_data
    from medgen.privacy.attempts import read_attempts, release_history
    from medgen.release.card import find_leaks
    from medgen.sample.pipeline import DiffusionPipeline, diffusion_model
    from medgen.versions import software_versions

    run, out = Path(run), Path(out)
    license = check_license(license)
    ensure_new_output(out, overwrite, "export folder", inputs={"--run": run})
    if is_export(run):
        raise RunError(f"{run} is an export folder ({EXPORT_MANIFEST}); export the training run it came from")
    model_dir, config = diffusion_model(run)
    pipe = DiffusionPipeline.from_run(run, device="cpu")
    settings = pipe.sampling_settings()
    with atomic_dir(out, overwrite=overwrite, what="export folder") as tmp:
        formats = {"medgen": {"folders": _write_medgen(tmp, run, model_dir, config)},
                   "diffusers": _write_diffusers(tmp, pipe, config, str(settings["sampler"])),
                   "monai_bundle": _write_monai(tmp, pipe, config, modality)}
        manifest: dict[str, Any] = {
            "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "medgen_version": __version__,
            "checkpoint_sha256": pipe.checkpoint_sha256, "spatial_dims": pipe.spatial_dims,
            "mode": "latent" if pipe.latent_scaling is not None else "pixel",
            "sample_shape": list(pipe.sample_shape), "license": license,
            "model": _model_part(pipe, config, settings), "formats": formats,
            "training_data": training_data(run, config, modality),
            "privacy": privacy_record(release_history(read_attempts(run))),
            "software": software_versions(*SOFTWARE),
        }
        manifest["contents"] = sorted([*_contents(tmp), "README.md", EXPORT_MANIFEST])
        atomic_write_text(tmp / "README.md", model_card(manifest, config, license))
        manifest["files"] = {name: sha256_file(tmp / name) for name in _contents(tmp)}
        atomic_write_json(tmp / EXPORT_MANIFEST, manifest)
        leaks = find_leaks(tmp, _identifiers(run, config))
        if leaks:
            raise RunError("export refused (nothing written): the folder would name the real data or the training "
                           "machine's folders: " + "; ".join(leaks[:5]))
    echo(summary_line(out, manifest))
    return manifest


def summary_line(out: Path, manifest: dict[str, Any]) -> str:
    f, p = manifest["formats"], manifest["privacy"]
    held = ["medgen (" + ", ".join(f["medgen"]["folders"]) + ")",
            "diffusers (" + ", ".join(x for x in (f["diffusers"]["unet"], "scheduler/") if x)
            + (f", {f['diffusers']['pipeline']}" if f["diffusers"]["pipeline"] else "") + ")"]
    held += ["MONAI bundle (monai_bundle/)"] * bool(f["monai_bundle"]["folder"])
    audit = f"audit {p['latest']['verdict']}" if p["audited"] else "not audited"
    return f"exported to {out}: {', '.join(held)}; model card README.md ({audit})"
