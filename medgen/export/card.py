"""The model card of an export folder (`README.md`, Hugging Face's model-card format): YAML front
matter the Hub reads (library, licence, tags, pipeline tag), then what the model generates, how
to load it, the training data as counts and settings, and the privacy audits of the run.

Built from numbers and settings only, as the release's data card (`medgen.release.card`): no
subject id, file name or folder path of the real data; the export runs the release's leak check
over the finished folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from medgen.errors import ConfigError
from medgen.release.card import OUT_OF_SCOPE, WITHHELD, shape_text, withhold_paths

DEFAULT_LICENSE = "other"
TAGS = ["medical-imaging", "diffusion", "synthetic-data", "medgen"]
SPLITS = ("train", "val", "holdout")


def check_license(license: str) -> str:
    """A licence id as the Hub lists them (lower-case, e.g. cc-by-nc-4.0, apache-2.0, other)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license or ""):
        raise ConfigError(f"--license {license!r}: expected a Hugging Face licence id such as cc-by-nc-4.0, apache-2.0 or other")
    return license


def training_data(run: Path, config: dict[str, Any], modality: str | None) -> dict[str, Any]:
    """The training data as counts and settings (split.json's sizes, the data config with its paths
    withheld); subject ids and file names stay in the run."""
    split = json.loads((run / "split.json").read_text()) if (run / "split.json").is_file() else {}
    subjects, files = split.get("subjects") or {}, split.get("files") or {}
    data = {k: v for k, v in (config.get("data") or {}).items() if k not in ("cache", "num_workers", "on_bad_file")}
    return {
        "modality": modality,
        "splits": {name: {"subjects": len(subjects.get(name, [])), "images": len(files.get(name, []))} for name in SPLITS},
        "learned_from": "the denoiser learned from the train subjects only; val and holdout subjects never reached it "
                        "(holdout subjects calibrate the privacy audit)",
        "skipped_files": len(split.get("skipped") or []),
        "image_shape": config.get("image_shape"), "spacing_mm": config.get("spacing"),
        "num_classes": int(config.get("num_classes") or 0),
        "preprocessing": withhold_paths(data),
        "identifiers": WITHHELD,
    }


def privacy_record(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's audits and releases (`medgen.privacy.attempts.release_history` rows) reduced to
    verdicts and bounds; `latest` is the last one with a verdict, None when never audited."""
    keep = ("kind", "attempt", "time", "verdict", "bound_upper_pct", "confidence", "n_samples", "released")
    rows = [{k: r.get(k) for k in keep} for r in attempts]
    judged = [r for r in rows if r.get("verdict")]
    return {"audited": bool(judged), "latest": judged[-1] if judged else None, "attempts": rows}


def _front_matter(manifest: dict[str, Any], license: str) -> str:
    import yaml

    formats = manifest["formats"]
    tags = [*TAGS, f"{manifest['spatial_dims']}d", "latent-diffusion" if manifest["mode"] == "latent" else "pixel-diffusion"]
    tags += ["diffusers"] * bool(formats["diffusers"]["unet"]) + ["monai"] * bool(formats["monai_bundle"]["folder"])
    meta = {"library_name": "medgen", "license": license, "tags": tags, "pipeline_tag": "unconditional-image-generation"}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _audit_sentence(r: dict[str, Any]) -> str:
    what = f"release attempt {r['attempt']}" if r.get("kind") == "release" else "audit"
    if not r.get("verdict"):
        return f"{what} ({r.get('time')}): no verdict (it did not finish; it still counts)"
    if r.get("bound_upper_pct") is None:
        return f"{what} ({r.get('time')}): verdict **{r['verdict']}**, no bound"
    return (f"{what} ({r.get('time')}): verdict **{r['verdict']}**; at {100 * float(r['confidence']):.4g}% confidence at most "
            f"{r['bound_upper_pct']:.2f}% of the model's outputs are copies of training patients as the audit's detectors "
            f"see them ({r.get('n_samples')} samples judged)")


def _privacy_lines(p: dict[str, Any]) -> list[str]:
    if not p["attempts"]:
        return ["Not audited: no `medgen audit` or `medgen release` of this run is recorded. Audit the model for copies of "
                "training patients (`medgen audit`) before you share it; export again afterwards to record the verdict here."]
    lines = [f"Latest verdict: {_audit_sentence(p['latest'])}." if p["audited"] else "No audit of this run reached a verdict.",
             "", "Every recorded attempt (a model retried until it passed shows as such):", ""]
    lines += [f"- {_audit_sentence(r)}" + {True: ", released", False: ", refused"}.get(r.get("released"), "")
              for r in p["attempts"]]
    return lines + ["", "The bound covers outputs sampled as the audit sampled them; whoever holds the model can sample "
                        "without limit, so a copy rarer than the bound can still appear. Membership and attribute inference "
                        "were not tested."]


def _use_lines(manifest: dict[str, Any]) -> list[str]:
    f = manifest["formats"]
    lines = ["```python", "import medgen", 'pipe = medgen.load_pipeline("path/to/this/folder")   # checks the files against medgen_export.json',
             "x = pipe.sample(4, seed=0)                           # (4, C, *S) in [-1, 1]", "```", "",
             "or `medgen sample --run path/to/this/folder --n 16 --out samples/`.", ""]
    if f["diffusers"]["unet"]:
        lines += ["diffusers: `UNet2DModel.from_pretrained(folder, subfolder=\"unet\")` is the same network (outputs equal to "
                  "float32 rounding); `scheduler/` is the run's default sampler in diffusers' format"
                  + ("; `DDPMPipeline.from_pretrained(folder)` samples it." if f["diffusers"]["pipeline"] else ".")]
    else:
        lines += [f"diffusers: `scheduler/` holds the run's default sampler; no UNet: {f['diffusers']['why']}."]
    if f["monai_bundle"]["folder"]:
        lines += ["", "MONAI: `monai_bundle/` is a MONAI bundle (`monai.bundle.load(\"monai_bundle\", bundle_dir=folder, "
                      "workflow_type=\"inference\")` builds `DiffusionModelUNet` with these weights)."]
    else:
        lines += ["", f"MONAI: no bundle; {f['monai_bundle']['why']}."]
    return lines


def model_card(manifest: dict[str, Any], config: dict[str, Any], license: str) -> str:
    """README.md of the export folder."""
    t, m = manifest["training_data"], manifest["model"]
    dims, latent = manifest["spatial_dims"], manifest["mode"] == "latent"
    image = f"{shape_text(t['image_shape'][1:])} ({t['image_shape'][0]} channel{'s' * (t['image_shape'][0] != 1)})"
    spacing = (f", {'pixel' if dims == 2 else 'voxel'} size {' x '.join(f'{v:g}' for v in t['spacing_mm'])} mm"
               if t["spacing_mm"] else "")
    classes = (f"class-conditional on {t['num_classes']} labels (0..{t['num_classes'] - 1}; label {t['num_classes']} is the "
               f"learned null class used for unconditional samples and guidance)") if t["num_classes"] else "unconditional"
    s = m["sampling"]
    pre = t["preprocessing"]
    intensity = pre.get("intensity") or {}
    lines = [
        _front_matter(manifest, license),
        f"# Synthetic {dims}D medical images: a medgen {'latent' if latent else 'pixel-space'} diffusion model", "",
        f"Generates synthetic {dims}D images of {image}{spacing}, intensities in [-1, 1], {classes}. Every output is "
        "synthetic; no output corresponds to a patient.", "",
        "## Use", "", *_use_lines(manifest), "",
        "## Model", "",
        f"- denoiser: {m['backbone']} backbone (`{config['target']}`), channels {m['channels']}, {m['parameters']:,} parameters, "
        f"EMA weights at training step {m['step']}; checkpoint sha256 `{manifest['checkpoint_sha256']}`",
        f"- noise schedule: {m['schedule']['schedule']}, {m['schedule']['num_train_timesteps']} steps, target "
        f"`{m['schedule']['prediction']}`" + (", zero terminal SNR" if m["schedule"]["zero_terminal_snr"] else ""),
        f"- default sampling: {s['sampler']}, {s['steps']} steps, guidance {s['guidance']}, eta {s['eta']}",
    ]
    if latent:
        ls = m["latent_scaling"]
        lines.append(f"- latent space {shape_text(manifest['sample_shape'])}: the denoiser generates latents that the autoencoder "
                     f"(`autoencoder/`, sha256 `{m['autoencoder_sha256']}`) decodes; {ls.get('source', 'quantized')} latents, "
                     f"scaling {ls['scaling']} (scale factor {ls['scale_factor']:.4g}, shift {ls.get('shift', 0.0):.4g})")
    lines += [
        "", "## Training data", "",
        f"- modality: {t['modality'] or 'not recorded by the run (`medgen export --modality`)'}",
        "- " + "; ".join(f"{name}: {c['subjects']} subjects, {c['images']} images" for name, c in t["splits"].items())
        + f"; {t['learned_from']}",
        f"- preprocessing: shape {pre.get('shape')} ({'resized' if pre.get('resize') else 'cropped or padded'}), "
        f"spacing {pre.get('spacing') or 'as in the files'}, intensity mode {intensity.get('mode', 'auto')} "
        f"(`medgen_export.json` → `training_data.preprocessing`)",
        "- subject ids, file names and folder paths are withheld", "",
        "## Privacy audit", "", *_privacy_lines(manifest["privacy"]), "",
        "## Intended use and limitations", "",
        "- Research on synthetic medical images: method development, benchmarking, teaching, data augmentation studies.",
        *[f"- Out of scope: {x}" for x in OUT_OF_SCOPE],
        f"- The model learned from {t['splits']['train']['subjects']} subjects; it inherits their demographics, scanners "
        "and protocols, and has its own artefacts.",
        *([] if license != DEFAULT_LICENSE else [
            "- Licence: not chosen at export (`medgen export --license`); the data-use agreement of the training data "
            "governs the use of this model."]),
        "", "## Files", "",
        *[f"- `{name}`" for name in manifest["contents"]],
        "", "## Software", "", ", ".join(f"{k} {v}" for k, v in manifest["software"].items()), "",
    ]
    return "\n".join(lines)
