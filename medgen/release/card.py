"""The data card of a release (`data_card.json`, `DATA_CARD.md`) and the check that nothing of the
real data is named in a release folder.

DATA_CARD.md opens with Hugging Face dataset-card metadata (YAML front matter: license,
task_categories, size_categories, tags, pretty_name) and follows the sections of Datasheets for
Datasets (Gebru et al. 2021): motivation, composition (with the quality metrics and the privacy
audit), generation process, preprocessing, uses, distribution, maintenance. Every value is written
for a person; data_card.json holds the same fields for a program.

The card is built from numbers and settings: counts, thresholds, rates, metrics, seeds, checksums,
versions, the run's preprocessing, and the data steward's own words (modality, source dataset,
licences, contact...: `medgen.release.steward`; "not provided" where left out). It never holds a
real file name, subject id, path of the real data, image or latent; paths in the run's resolved
config are withheld. `find_leaks` checks the finished folder (file names, manifest, card) against
every real identifier before the release is renamed into place, so a slip fails the release
instead of leaking.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from medgen.release.steward import NOT_PROVIDED, STEWARD_FIELDS, check_card_fields, missing_fields
from medgen.versions import software_versions

WITHHELD = "[withheld]"
FORMAT_NAMES = {"png": "PNG", "nifti": "NIfTI (.nii.gz)", "dicom": "DICOM"}
# Hugging Face's size_categories (the dataset card metadata spec): the first whose bound exceeds n.
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
SOFTWARE = ("diffusers", "accelerate", "monai", "torchio", "scipy", "safetensors", "Pillow", "nibabel")
TEXT_SUFFIXES = (".csv", ".json", ".md", ".txt", ".yaml")

INTENDED_USE = [
    "Method development, benchmarking and teaching where the real images cannot be shared: training and "
    "testing image-analysis pipelines, data augmentation research, software testing.",
    "Sharing under the data steward's agreement, together with this card; the card is part of the dataset.",
]
OUT_OF_SCOPE = [
    "Clinical use: diagnosis, treatment decisions or any statement about a real patient.",
    "Estimating prevalence, effect sizes or other population statistics of the source cohort: the model "
    "reproduces what it learned, with its errors and biases, not the population.",
    "Re-identification attempts of any kind.",
]


# What each column of a release's manifest.csv holds, in the file's column order (MANIFEST_FIELDS).
MANIFEST_COLUMNS = {
    "file": "the file's name", "sha256": "its checksum, a DICOM series folder's over its files' names and contents",
    "seed": "the seed it was sampled with", "label": "the class it was sampled as (empty: unconditional)",
    "sampler": "the sampler", "steps": "sampling steps", "guidance": "classifier-free guidance scale",
    "checkpoint_sha256": "the model's checkpoint", "units": "the units of its values", "release_id": "this release's id",
}
MANIFEST_FIELDS = tuple(MANIFEST_COLUMNS)  # the columns `make_release` writes


# Keys whose string values name files or folders, whatever they look like: `data.path=StMary_2019`
# has no separator, and a detector's recipe records the folder it was trained on.
PATH_KEYS = {"path", "paths", "run", "train", "holdout", "data", "source", "out", "dir", "folder", "file", "files", "inputs", "weights"}


def withhold_paths(obj: Any, key: str | None = None) -> Any:
    """The config with every path replaced by WITHHELD (the real data's location, the run
    folders): path-like strings anywhere, and any string under a PATH_KEYS key."""
    if isinstance(obj, dict):
        return {k: withhold_paths(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [withhold_paths(v, key) for v in obj]
    if isinstance(obj, str) and (_path_like(obj) or (key in PATH_KEYS and obj.strip())):
        return WITHHELD
    return obj


def _path_like(text: str) -> bool:
    """A path as configs and recipes hold them: absolute, home-relative, or relative with a
    separator and no spaces (prose such as 'half-samples / bootstrap' is not a path)."""
    return (text.startswith(("/", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", text))
            or (("/" in text or os.sep in text) and " " not in text))


def _resolved_config(run: Path) -> dict[str, Any]:
    import yaml

    path = run / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return withhold_paths(cfg or {})


def _metrics_part(report: dict[str, Any]) -> dict[str, Any]:
    """The eval report's metrics against the training images, beside real vs real (held-out
    images in the samples' place: `real_vs_real`) and the utility (TSTR against TRTR), paths withheld."""
    recipe = {k: v for k, v in report["recipe"].items() if k != "inputs"}  # inputs name folders
    return {"reference": "the training images (preprocessed as in training)", "of": "the released samples",
            "values": report["metrics"], "recipe": withhold_paths(recipe), "notes": report.get("notes", []),
            "real_vs_real": withhold_paths(report.get("reference")), "utility": withhold_paths(report.get("utility"))}


def _manifest_description() -> str:
    return "manifest.csv, one row per file: " + "; ".join(f"{f} ({MANIFEST_COLUMNS[f]})" for f in MANIFEST_FIELDS)


def _audit_part(first, combined, policy: dict, attempt: int, earlier: list[dict]) -> dict[str, Any]:
    rep = combined.report
    detectors = {name: {"threshold": d["threshold"], "attained_null_level": d["attained_null_level"], "null_pct": d["null_pct"],
                        "effective_rank": d["effective_rank"], "embedding_dim": d["embedding_dim"], "recipe": withhold_paths(d["recipe"]),
                        "n_copies_pct": d["n_copies_pct"], "n_mem_pct": d["n_mem_pct"]}
                 for name, d in rep["detectors"].items()}
    control = rep.get("control") or {}
    return {
        "method": "copy detection after Dar et al. 2024 (a union of detectors; tau of each a conformal quantile of held-out -> "
                  "train similarity), a positive control, an anatomy gate, and an upper confidence bound on the share of the "
                  "model's outputs that are copies (flagged share over the control's recall, Clopper-Pearson, Bonferroni); "
                  "fail on a significant excess over the held-out null (one-sided Fisher exact test)",
        "bound": rep.get("bound"),
        "statement": (rep.get("bound") or {}).get("sentence"),
        "attempt": attempt, "alpha_used": rep["policy"]["alpha_used"],
        "earlier_attempts": earlier,
        "detector": rep["detector"], "detectors": detectors, "tau": rep["thresholds"], "null_level": rep["null_level"],
        "decoded_calibration": rep.get("decoded_calibration", False), "similarity": rep["similarity"],
        "dar_tau": rep["dar"],
        "control": {k: control[k] for k in ("n", "caught", "recall", "pooled_families", "by_family", "min_detector_recall") if k in control}
                   | {"by_detector": {d: {"own_families": v["own_families"], "recall": v["recall"]} for d, v in control.get("by_detector", {}).items()}},
        "anatomy_gate": rep["anatomy_gate"],
        "first_round": {"verdict": first.verdict, "n_synthetic": first.report["n_synthetic"], "n_copies_pct": first.report["n_copies_pct"],
                        "bound": first.report.get("bound"), "test": first.report["test"]},
        "all_samples": {"verdict": combined.verdict, "n_synthetic": rep["n_synthetic"], "n_copies": rep["n_copies"],
                        "n_copies_pct": rep["n_copies_pct"], "n_mem_pct": rep["n_mem_pct"], "n_copy_sources_pct": rep["n_copy_sources_pct"],
                        "not_anatomy": rep["not_anatomy"], "bound": rep.get("bound"), "test": rep["test"]},
        "verdict": combined.verdict,
        "copy_rate_pct": rep["test"]["synthetic_rate_pct"], "null_rate_pct": rep["test"]["null_rate_pct"],
        "memorization_rate_pct": rep["n_mem_pct"], "control_recall": control.get("recall"),
        "released_samples_above_tau": 0,
        "policy": policy,
    }


def _limitations(card: dict[str, Any]) -> list[str]:
    audit, metrics = card["audit"], card["metrics"]
    pooled = ", ".join(audit["control"].get("pooled_families", [])) or "the control families"
    out = [
        f"The bound counts copies as the audit's detectors ({audit['detector']}) see them: its recall is measured on copies of "
        f"these kinds ({pooled}). Copies of other kinds (heavy crops, rotations, images the detectors were not built for) can "
        "be missed; it does not test membership inference, attribute inference or copies of image parts below the "
        "detectors' resolution.",
        "The bound assumes nothing about the model's non-copies: every sample above tau counts as a possible copy, so a model "
        "whose honest samples often resemble training patients gets a looser bound, never a wrong one.",
        f"The model learned from {card['training_data']['n_train_subjects']} subjects; the synthetic set inherits "
        "their demographics, scanners and protocols, and the model's own artefacts.",
    ]
    extractor = (metrics["recipe"].get("features") or {}).get("extractor", "")
    if str(extractor).startswith("pca"):
        out.append("The metrics use in-domain PCA features of the training images (fd_pca, kid_pca): they compare models on "
                   "these data only, not across datasets or with published FID values.")
    dropped = card["dropped"]["copies"] + card["dropped"]["not_anatomy"]
    if dropped:
        out.append(f"The metrics describe the released samples: {dropped} of the {card['dropped']['sampled']} samples the model "
                   "generated were dropped by the audit, so the model's unfiltered output is worse than these numbers.")
    if card["training_data"]["n_holdout_images"] < 100:
        out.append(f"{card['training_data']['n_holdout_images']} held-out images calibrate tau: a new patient exceeds it with "
                   f"probability up to 1/{card['training_data']['n_holdout_images'] + 1}, the most a set this small can tell.")
    return out


def _default_output(ext: str, bit_depth: int, channels: int) -> dict[str, Any]:
    """How the files hold the images when the release names nothing else: as `medgen sample`
    writes them (PNG: the model's [-1, 1] mapped linearly to the bit depth; NIfTI: float32 as
    generated, the voxel size in the affine)."""
    if ext == ".png":
        bits = bit_depth if channels == 1 else 8
        top = 2 ** bits - 1
        return {"format": "png", "units": "none (relative intensity)", "value_range": [0, top], "release_id": None,
                "intensity": f"the model's intensity scale -1 to 1 mapped linearly to 0 to {top} ({bits}-bit "
                             f"{'grayscale' if channels == 1 else 'RGB'}); the source's units are not restored",
                "markers": ["the file name (synthetic_NNNNN)"]}
    return {"format": "nifti", "units": "none (relative intensity)", "value_range": [-1, 1], "release_id": None,
            "intensity": "float32 on the model's intensity scale -1 to 1 (see Preprocessing), the voxel size in the affine; "
                         "the source's units are not restored",
            "markers": ["the file name (synthetic_NNNNN)"]}


def _preprocessing(data: dict[str, Any], spatial_dims: int, image_shape: Sequence[int], spacing) -> dict[str, Any]:
    """What the run did to the real images before the model learned them (its `data:` config),
    in sentences, and the config itself with its paths withheld."""
    intensity = data.get("intensity") or {}
    steps = []
    if spatial_dims == 3 and data.get("canonical", True):
        steps.append("reoriented to RAS+ (torchio ToCanonical)")
    steps.append(f"resampled to {_mm(data['spacing'])} voxels (torchio Resample)" if data.get("spacing")
                 else "voxel size kept as in the files")
    if data.get("shape"):
        steps.append(f"resized to {shape_text(data['shape'])} (the whole field of view, antialiased)" if data.get("resize")
                     else f"centre-cropped or zero-padded to {shape_text(data['shape'])}")
    if data.get("channels"):
        steps.append({1: "converted to one channel (RGB averaged to gray)", 3: "converted to three channels (gray repeated)"}
                     .get(data["channels"], f"{data['channels']} channels"))
    steps.append(_intensity_sentence(intensity))
    image = f"{shape_text(image_shape[1:])}, {image_shape[0]} channel{'s' if image_shape[0] != 1 else ''}" + (f", {_mm(spacing)}" if spacing else "")
    return {"steps": steps, "model_space": f"the model learned and generates images of {image}",
            "config": withhold_paths({k: v for k, v in data.items() if k not in ("cache", "num_workers")})}


def _intensity_sentence(spec: dict[str, Any]) -> str:
    """`data.intensity` for a person: which source values became -1 and 1."""
    mode, lower, upper = spec.get("mode", "auto"), spec.get("lower", 0.5), spec.get("upper", 99.5)
    percentile = f"each image's percentiles {lower:g} to {upper:g} mapped linearly to -1 to 1 (clipped)"
    return {
        "auto": f"intensity: 8- and 16-bit files mapped from their full range (0 to 255, 0 to 65535) to -1 to 1; other files: {percentile}",
        "percentile": f"intensity: {percentile}",
        "minmax": "intensity: each image's minimum to maximum mapped linearly to -1 to 1",
        "fixed": f"intensity: source values {_span(spec.get('in_range'))} mapped linearly to -1 to 1 (clipped)",
        "ct": f"intensity: the CT window {_span(spec.get('window'))} HU mapped linearly to -1 to 1 (clipped)",
        "zscore": "intensity: each image z-scored (mean 0, standard deviation 1)",
        "none": "intensity: values kept as read",
    }.get(mode, f"intensity: mode {mode}")


def _metadata(card: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face dataset-card metadata (the YAML front matter of DATA_CARD.md)."""
    s = card["steward"]
    named = [x for x in (s.get("anatomy"), s.get("modality")) if x]
    tasks = s.get("task_categories") or ("image-classification" if card["dataset"]["label"] is not None else "unconditional-image-generation")
    return {
        "license": _hf_license(s.get("license")),
        "pretty_name": s.get("pretty_name") or " ".join(["Synthetic", *named, "images" if named else "medical images"]),
        "size_categories": [next((name for bound, name in SIZE_CATEGORIES if card["dataset"]["n"] < bound), "n>1B")],
        "task_categories": [t.strip() for t in tasks.split(",") if t.strip()],
        "tags": list(dict.fromkeys(["synthetic", "medical", *(_slug(x) for x in (s.get("modality"), s.get("anatomy")) if x), "medgen"])),
    }


def _hf_license(licence: str | None) -> str:
    """A licence id as the Hub lists them (lower-case SPDX: cc-by-4.0); 'other' for prose, 'unknown' when not given."""
    if not licence:
        return "unknown"
    return licence.lower() if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", licence) else "other"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def shape_text(shape: Sequence[int]) -> str:
    """A shape for a person, "48 x 48" (the data and model cards)."""
    return " x ".join(str(int(s)) for s in shape)


def _mm(spacing: Sequence[float]) -> str:
    return " x ".join(f"{float(s):.3g}" for s in spacing) + " mm"


def _span(pair: Sequence[float] | None) -> str:
    return "?" if not pair else f"{pair[0]:g} to {pair[1]:g}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.0f}%"


def build_card(*, n: int, ext: str, pipe, run: Path, settings: dict, label, seed: int, bit_depth: int, policy: dict,
               first, combined, rounds: list[dict], chosen: Sequence[int], metrics: dict, split_info: dict, n_train: int,
               quality: dict | None = None,
               n_holdout: int, n_train_subjects: int, n_holdout_subjects: int, attempt: int = 1, earlier: list[dict] = (),
               output: dict | None = None, card_fields: dict | None = None, labels: Sequence[int] | None = None) -> dict[str, Any]:
    """The data card as a JSON-ready dict (see the module docstring for what it never holds).

    `label`: None, one class, or "all" with `labels` each released file's class (the card counts them).
    `output`: how the files hold the images (format, units, intensity, value_range, release_id,
    markers; default: the PNG/NIfTI writing of `medgen sample`); `card_fields`: the steward's
    fields (`medgen.release.steward`), each "not provided" when left out."""
    config = pipe.config
    latent = config.get("latent") or {}
    image_shape = list(config.get("image_shape") or pipe.sample_shape)  # (C, *S) of the released images
    output = {**_default_output(ext, bit_depth, image_shape[0]), **(output or {})}
    fields = check_card_fields(card_fields)
    card: dict[str, Any] = {
        "card_version": 2,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steward": {k: fields.get(k) for k in STEWARD_FIELDS} | {k: v for k, v in fields.items() if k not in STEWARD_FIELDS},
        "not_provided": missing_fields(fields),
        "dataset": {
            "n": n, "format": FORMAT_NAMES.get(output["format"], output["format"]), "files": f"synthetic_00000{ext} ... synthetic_{n - 1:05d}{ext}",
            "naming": "position in the release; no link to any patient", "shape": image_shape[1:], "channels": image_shape[0],
            "spatial_dims": pipe.spatial_dims, "spacing_mm": pipe.spacing, "bit_depth": bit_depth if output["format"] == "png" else None,
            "manifest": _manifest_description(),
            "label": label, "classes": _class_counts(labels), "synthetic": True,
        },
        "output": output,
        "preprocessing": _preprocessing(config.get("data") or {}, pipe.spatial_dims, image_shape, pipe.spacing),
        "model": {
            "checkpoint_sha256": pipe.checkpoint_sha256, "mode": "latent" if latent else "pixel",
            "autoencoder_sha256": latent.get("autoencoder_sha256"), "latent_shape": list(pipe.sample_shape) if latent else None,
            "num_classes": pipe.num_classes, "resolved_config": _resolved_config(run), "config_paths": f"paths {WITHHELD}",
        },
        "sampling": {**{k: settings[k] for k in ("sampler", "steps", "guidance", "eta")}, "label": label, "seed": seed,
                     "seed_rule": "sample index i uses seed + i (its own generator; identical whatever the batch size or process count)",
                     "indices_released": _ranges(chosen), "seeds_released": "manifest.csv, per file"},
        "training_data": {"n_train_images": n_train, "n_train_subjects": n_train_subjects, "n_holdout_images": n_holdout,
                          "n_holdout_subjects": n_holdout_subjects, **split_info, "identifiers": WITHHELD},
        "metrics": _metrics_part(metrics),
        "quality_floor": {**(quality or {}), "min_coverage": policy.get("min_coverage")},
        "audit": _audit_part(first, combined, policy, attempt, list(earlier)),
        "rounds": rounds,
        "dropped": {"copies": sum(r["copies"] for r in rounds), "not_anatomy": sum(r["not_anatomy"] for r in rounds),
                    "sampled": sum(r["sampled"] for r in rounds), "kept_unused": sum(r["kept"] for r in rounds) - n},
        "software": software_versions(*SOFTWARE),
        "intended_use": INTENDED_USE,
        "out_of_scope": OUT_OF_SCOPE,
    }
    card["limitations"] = _limitations(card)
    card["metadata"] = _metadata(card)
    return card


def _class_counts(labels: Sequence[int] | None) -> dict[str, int] | None:
    """{class: number of released files} (None: every file has the same label or none)."""
    if labels is None:
        return None
    return {str(c): sum(x == c for x in labels) for c in sorted(set(labels))}


def _quality_lines(q: dict) -> list[str]:
    if "coverage" not in q:
        return []
    return [f"Quality floor: the released samples cover {100 * q['coverage']:.1f}% of the training images, held-out patients "
            f"{100 * q['holdout_coverage']:.1f}% ({q['m']} images each, coverage k={q['k']}, {q['features']} features): ratio "
            f"{q['ratio']}, policy at least {q['min_coverage']}.", ""]


def _earlier_lines(earlier: list[dict]) -> list[str]:
    """The model's earlier audits and releases, refused ones first in the reader's eye."""
    if not earlier:
        return ["- earlier attempts on this model: none"]
    lines = [f"- earlier attempts on this model: {len(earlier)}"]
    for e in earlier:
        what = f"release attempt {e['attempt']}" if e.get("kind") == "release" else "audit"
        bound = f", bound {e['bound_upper_pct']:.2f}%" if e.get("bound_upper_pct") is not None else ""
        outcome = {True: ", released", False: f", refused ({e.get('why', 'no verdict')})"}.get(e.get("released"), "")
        lines.append(f"  - {e.get('time')}: {what}, verdict {e.get('verdict', 'none (did not finish)')}{bound}{outcome}")
    return lines


def _ranges(indices: Sequence[int]) -> list[list[int]]:
    """[[first, last], ...] runs of consecutive indices."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


# ----------------------------------------------------------------------------- markdown


def _metric_rows(values: dict) -> list[str]:
    from medgen.metrics.report import metric_cells

    return [f"| {name} | {value} | {ci or '-'} |" for name, value, ci in metric_cells(values)]


def _text(value: Any) -> str:
    """A value of the card for a person: numbers short, None as "none", lists and mappings as
    comma-separated words (never a Python repr)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _steward(card: dict[str, Any], key: str) -> str:
    return card["steward"].get(key) or NOT_PROVIDED


def _citation_lines(citation: str) -> list[str]:
    """A one-line citation inline; BibTeX or several lines as a block."""
    return [f"- citation: {citation}"] if "\n" not in citation else ["- citation:", "", "```", citation, "```"]


def _index_ranges(ranges: list[list[int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a} to {b}" for a, b in ranges)


def _front_matter(card: dict[str, Any]) -> list[str]:
    import yaml

    return ["---", yaml.safe_dump(card["metadata"], sort_keys=False, allow_unicode=True, width=1000).rstrip(), "---", ""]


def _motivation(card: dict[str, Any]) -> list[str]:
    return [
        "## Motivation", "",
        "- purpose: a synthetic stand-in for the source data, for work where the real images cannot be shared (see Uses)",
        f"- created by: the data steward (contact: {_steward(card, 'contact')}) with medgen {card['software'].get('medgen', '?')}, "
        "from a diffusion model trained on the source data and released only after a memorization audit passed",
        f"- source data: {_steward(card, 'source_dataset')}", "",
    ]


def _composition(card: dict[str, Any]) -> list[str]:
    d, o, s = card["dataset"], card["output"], card["sampling"]
    image = f"{shape_text(d['shape'])} {'pixels' if d['spatial_dims'] == 2 else 'voxels'}, {d['channels']} channel" \
            f"{'s' if d['channels'] != 1 else ''}" + (f", {_mm(d['spacing_mm'])}" if d.get("spacing_mm") else ", voxel size unknown")
    value_range = f"{o['value_range'][0]:g} to {o['value_range'][1]:g}" if o.get("value_range") else "not fixed"
    return [
        "## Composition", "",
        f"- instances: {d['n']} synthetic {d['spatial_dims']}D images, "
        + _classes_text(d, s),
        f"- modality: {_steward(card, 'modality')}",
        f"- anatomy: {_steward(card, 'anatomy')}",
        f"- each image: {image}",
        f"- files: `{d['files']}` ({d['format']}; {d['naming']})",
        f"- values: {o['intensity'].rstrip('.')}; units {o['units']}; range {value_range}",
        "- marked as synthetic by: " + "; ".join(m.rstrip(".") for m in o.get("markers") or ["the file name"])
        + (f"; release id `{o['release_id']}`" if o.get("release_id") else ""),
        f"- {d['manifest']}", "- also: `grid.png` (a preview), `data_card.json` (this card, machine-readable)",
        "- patients: none; every image is generated, no file corresponds to a patient (see the privacy audit)", "",
        *_quality_section(card), *_audit_section(card),
    ]


def _classes_text(d: dict, s: dict) -> str:
    if s["label"] is None:
        return "unconditional (no class)"
    if d.get("classes"):
        return (f"balanced over {len(d['classes'])} classes: " + ", ".join(f"class {c}: {k}" for c, k in d["classes"].items())
                + " (each file's class in manifest.csv)")
    return f"all of class {s['label']}"


def _quality_section(card: dict[str, Any]) -> list[str]:
    m = card["metrics"]
    recipe = m["recipe"]
    return [
        "### Quality (against the training images)", "",
        *_metric_table(m["values"], m.get("real_vs_real")), "",
        f"Features: {(recipe.get('features') or {}).get('extractor', '-')}; {recipe.get('n_real')} real vs {recipe.get('n_fake')} "
        f"synthetic images; intervals: " + ("; ".join(f"{k}: {v}" for k, v in recipe["intervals"].items()) if recipe.get("intervals") else "none")
        + ".", "",
        *_real_vs_real_lines(m.get("real_vs_real")),
        *_quality_lines(card.get("quality_floor") or {}),
        *_utility_lines(m.get("utility")),
    ]


def _metric_table(values: dict, reference: dict | None) -> list[str]:
    """The metrics, beside real vs real when there is a reference (`reference_cells`)."""
    from medgen.metrics.report import reference_cells

    if not reference or "metrics" not in reference:
        return ["| metric | value | 95% interval |", "|---|---|---|", *_metric_rows(values)]
    cells = reference_cells(values, reference)
    matched = "matched" in cells[0] if cells else False
    head = ["metric", "model", "95% interval", *([f"model, {reference['n']['held_out']} images"] if matched else []),
            "real vs real", "95% interval", "ratio", "better"]
    rows = [[c["metric"], c["value"], c["ci"] or "-", *([c["matched"]] if matched else []), c["reference"], c["reference_ci"] or "-",
             c["ratio"], c["better"]] for c in cells]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _real_vs_real_lines(reference: dict | None) -> list[str]:
    if not reference:
        return []
    if "skipped" in reference:
        return [f"Real vs real: skipped: {reference['skipped']}.", ""]
    n = reference["n"]
    return [f"Real vs real: the same metrics with {n['held_out']} held-out real images (patients the model never saw) in the "
            f"{n['synthetic']} synthetic images' place, against the same {n['real']} real training images: what a model that samples "
            "new patients from the same population scores at these set sizes. The model is as close to the real images as new "
            "patients are where its interval meets the real-vs-real one; ratio = model / real vs real (Fréchet distances and KID), "
            "about 1 for a perfect model"
            + (f", with the model on {n['held_out']} of its images so that both sides have the same sizes" if "model_matched" in reference else "")
            + ".", ""]


def _utility_lines(utility: dict | None) -> list[str]:
    """Train on synthetic, test on real (TSTR) against train on real (TRTR), or why it was not measured."""
    from medgen.metrics.utility import utility_rows

    if not utility:
        return []
    if "skipped" in utility:
        return ["### Utility (train on synthetic, test on real)", "", f"Not measured: {utility['skipped']}.", ""]
    t, r = utility["test"], utility["recipe"]
    return ["### Utility (train on synthetic, test on real)", "", *utility_rows(utility), "",
            f"A classifier ({r['network']}, {r['steps']} steps, mean of {len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''}) "
            "trained on the released images and "
            f"their labels (TSTR), and one trained on as many real training images (TRTR), both tested on {t['n']} held-out real "
            f"images (classes " + ", ".join(f"{k}: {v}" for k, v in t["classes"].items()) + "). The released set is as useful as "
            "the real images for this task where its row matches the real one (the difference's interval holds 0); intervals: "
            f"class-stratified bootstrap over the test images ({r['bootstrap']} resamples).", ""]


def _audit_section(card: dict[str, Any]) -> list[str]:
    a, t = card["audit"], card["training_data"]
    test = a["all_samples"]["test"]
    return [
        "### Privacy audit", "",
        f"**{a['statement'][0].upper() + a['statement'][1:]}.**" if a.get("statement") else "", "",
        f"- verdict: **{a['verdict']}** (first round: {a['first_round']['verdict']}); attempt {a['attempt']} of this model, "
        f"judged at alpha {a['alpha_used']:.4g} ({a['policy']['alpha']:g} spent over the model's release attempts as alpha / 2^k)",
        *_earlier_lines(a["earlier_attempts"]),
        f"- detectors: {a['detector']}; tau " + ", ".join(f"{k} {v:.4f}" for k, v in a["tau"].items())
        + f" (a new patient exceeds each with probability at most {_pct(max(a['null_level'], 1 / (t['n_holdout_images'] + 1)))}"
        + (", held-out images decoded through the model's autoencoder" if a.get("decoded_calibration") else "") + ")",
        f"- positive control: {a['control'].get('caught', 0)} of {a['control'].get('n', 0)} copies of training images caught "
        f"({_pct(a['control_recall'])}; {', '.join(a['control'].get('pooled_families', []))}); per detector on its own families: "
        + ", ".join(f"{d} {_pct(v['recall'])}" for d, v in a["control"].get("by_detector", {}).items()),
        f"- all {a['all_samples']['n_synthetic']} generated samples: {a['copy_rate_pct']:.2f}% above tau vs null (held-out) "
        f"{a['null_rate_pct']:.2f}%, p = {test['p_value']:.3g}; memorized training images "
        f"{a['memorization_rate_pct']:.2f}%; not anatomy: " + (_text(a["all_samples"]["not_anatomy"]) or "none"),
        f"- released samples above tau: {a['released_samples_above_tau']} (flagged samples are dropped)",
        f"- policy: {_text(a['policy'])}", "",
    ]


def _generation(card: dict[str, Any]) -> list[str]:
    """Datasheets' collection process: for a synthetic set, how the images were generated."""
    m, s, t = card["model"], card["sampling"], card["training_data"]
    return [
        "## Generation process", "",
        f"- source data: {_steward(card, 'source_dataset')}",
        f"- ethics approval: {_steward(card, 'ethics_approval')}",
        f"- training data: {t['n_train_subjects']} subjects ({t['n_train_images']} images); {t['n_holdout_subjects']} held-out subjects "
        f"({t['n_holdout_images']} images, {', '.join(t['holdout_splits'])}) calibrate the audit; checked against the run by {t['source']}",
        f"- split.json sha256 `{t['split_json_sha256']}` (kept with the run, not released); subject ids and file names withheld",
        f"- model: checkpoint sha256 `{m['checkpoint_sha256']}` ({m['mode']} diffusion"
        + (f", autoencoder sha256 `{m['autoencoder_sha256']}`, latents {shape_text(m['latent_shape'])}" if m.get("autoencoder_sha256") else "")
        + "); resolved config in `data_card.json` under model.resolved_config (paths withheld)",
        f"- sampling: {s['sampler']}, {s['steps']} steps, guidance {_text(s['guidance'])}, eta {_text(s['eta'])}, "
        + ("unconditional" if s["label"] is None else "labels cycled over the model's classes (sample index i gets class "
                                                      "i mod K)" if s["label"] == "all" else f"class {s['label']}"),
        f"- seeds: sample index i uses seed {s['seed']} + i, with its own generator; released indices "
        f"{_index_ranges(s['indices_released'])}; each file's seed in manifest.csv", "",
        "### Rounds", "",
        "| round | indices | sampled | above tau (copies), dropped | not anatomy, dropped | kept |", "|---|---|---|---|---|---|",
        *[f"| {r['round']} | {r['indices'][0]} to {r['indices'][1] - 1} | {r['sampled']} | {r['copies']} | {r['not_anatomy']} | {r['kept']} |"
          for r in card["rounds"]], "",
        f"Dropped: {card['dropped']['copies']} copies, {card['dropped']['not_anatomy']} not anatomy; "
        f"{card['dropped']['kept_unused']} clean samples beyond N were not needed.", "",
        "### Software", "", ", ".join(f"{k} {v}" for k, v in card["software"].items()), "",
    ]


def _preprocessing_section(card: dict[str, Any]) -> list[str]:
    p = card["preprocessing"]
    return ["## Preprocessing", "", "The source images were preprocessed before the model learned them (the run's `data:` config):", "",
            *[f"{i}. {step}" for i, step in enumerate(p["steps"], 1)], "",
            f"So {p['model_space']}. How the released files hold them: {card['output']['intensity'].rstrip('.')}. "
            "The real images, raw or preprocessed, are not part of the release.", ""]


def _uses(card: dict[str, Any]) -> list[str]:
    return ["## Uses", "", *[f"- {x}" for x in card["intended_use"]], "",
            "Out of scope:", "", *[f"- {x}" for x in card["out_of_scope"]], "",
            "### Limitations", "", *[f"- {x}" for x in card["limitations"]], ""]


def _distribution(card: dict[str, Any]) -> list[str]:
    return ["## Distribution", "",
            f"- licence of this release: {_steward(card, 'license')}",
            f"- licence of the source data: {_steward(card, 'source_license')}",
            *_citation_lines(_steward(card, "citation")),
            "- integrity: manifest.csv holds each file's sha256", ""]


def _maintenance(card: dict[str, Any]) -> list[str]:
    a = card["audit"]
    missing = card["not_provided"]
    return ["## Maintenance", "",
            f"- contact: {_steward(card, 'contact')}",
            f"- this release is attempt {a['attempt']} of the model; every audit and release of the model is logged with the run "
            "(privacy_attempts.jsonl), and a new release is a new attempt, judged at a smaller alpha",
            f"- card version {card['card_version']}, created {card['created_utc']}",
            *([f"- fields the data steward did not provide: {', '.join(missing)}"] if missing else []), ""]


def card_markdown(card: dict[str, Any]) -> str:
    """DATA_CARD.md: Hugging Face metadata as YAML front matter, then the sections of
    Datasheets for Datasets (Gebru et al. 2021), every value written for a person."""
    d, a, s = card["dataset"], card["audit"], card["steward"]
    what = " ".join(x for x in (s.get("anatomy"), s.get("modality")) if x)
    lines = [
        *_front_matter(card),
        f"# Data card: {card['metadata']['pretty_name']}", "",
        f"{d['n']} synthetic {d['spatial_dims']}D {what + ' ' if what else ''}images ({d['format']}, {shape_text(d['shape'])}), "
        "generated by a medgen diffusion model "
        f"and released after a memorization audit ({a['verdict']}). Created {card['created_utc']}. Every image is synthetic; "
        "no file corresponds to a patient. The sections follow Datasheets for Datasets (Gebru et al. 2021).", "",
        *_motivation(card), *_composition(card), *_generation(card), *_preprocessing_section(card), *_uses(card),
        *_distribution(card), *_maintenance(card),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- leak check


def folder_names(*paths) -> set[str]:
    """The distinctive names of input folders, for the leak check: each folder's own name (and a
    manifest's folder's), when it could not be a word of the card (a digit, '_', '-' or a capital
    inside, or 12 characters or more: `StMary_2019_patients`, not `data` or `cohort`)."""
    out = set()
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        for name in {p.parent.name} if p.suffix == ".csv" else {p.name}:
            if name and (len(name) >= 12 or any(c.isdigit() or c in "_-" or c.isupper() for c in name)):
                out.add(name)
    return out


def input_folders(train, holdout, detector) -> list:
    """The folders a release read besides the run: --train, --holdout, detector folders in
    --detector, and the folders those detectors were trained on (their config records it)."""
    folders = [train, holdout]
    for part in str(detector or "").split(",") if not isinstance(detector, (list, tuple)) else ():
        d = Path(part.strip())
        config = d / "config.json" if (d / "config.json").is_file() else d / "detector" / "config.json"
        if part.strip() and config.is_file():
            folders += [d, (json.loads(config.read_text()).get("training") or {}).get("train")]
    return folders


def real_identifiers(run: Path, samples: Iterable, data: str | os.PathLike | None = None, folders: Iterable = ()) -> set[str]:
    """Every name of the real data a release must not contain: subject ids of every split, file
    names (with and without extension), relative paths, the data folder's path, and the
    distinctive names of the input folders (`folder_names` of the data and of `folders`)."""
    ids: set[str] = set()
    split_file = run / "split.json"
    if split_file.is_file():
        meta = json.loads(split_file.read_text())
        for group in (meta.get("subjects") or {}).values():
            ids.update(group)
        for group in (meta.get("files") or {}).values():
            ids.update(_file_names(Path(f)) for f in group)
            ids.update(Path(f).name for f in group)
        if meta.get("data"):
            ids.add(str(Path(meta["data"]).resolve()))
            ids |= folder_names(meta["data"])
    for s in samples:  # folders as absolute paths: a relative 'cohort' would be a word of the card
        ids.update((s.subject_id, Path(s.path).name, _file_names(Path(s.path)), str(Path(s.path).resolve().parent)))
    if data is not None:
        ids.add(str(Path(data).resolve()))
    ids |= folder_names(data, *folders)
    return {i for i in ids if _checkable(i)}


def _file_names(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", p.suffix):
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _checkable(i: str) -> bool:
    """Identifiers long enough to tell from numbers and words of the card (pure digits: 5 or more)."""
    return len(i) >= (5 if i.isdigit() else 3)


def find_leaks(folder: Path, identifiers: set[str]) -> list[str]:
    """'WHERE: VALUE' for every real identifier in `folder`'s file names or text files."""
    if not identifiers:
        return []
    pattern = re.compile("(?<![A-Za-z0-9.])(?:" + "|".join(re.escape(i) for i in sorted(identifiers, key=len, reverse=True)) + ")(?![A-Za-z0-9])")
    leaks = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        for m in pattern.finditer(rel):
            leaks.append(f"file name {rel}: {m.group(0)}")
        if path.is_file() and path.name.endswith(TEXT_SUFFIXES):
            for m in pattern.finditer(path.read_text(errors="replace")):
                leaks.append(f"{rel}: {m.group(0)}")
    return leaks
