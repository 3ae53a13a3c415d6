"""The data card of a release (`data_card.json`, `DATA_CARD.md`) and the check that nothing of the
real data is named in a release folder.

The card is built from numbers and settings only: counts, thresholds, rates, metrics, seeds,
checksums, versions. It never holds a real file name, subject id, path of the real data, image or
latent; paths in the run's resolved config are withheld. `find_leaks` checks the finished folder
(file names, manifest, card) against every real identifier before the release is renamed into
place, so a slip fails the release instead of leaking.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from medgen.versions import software_versions

WITHHELD = "[withheld]"
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
    recipe = {k: v for k, v in report["recipe"].items() if k != "inputs"}  # inputs name folders
    return {"reference": "the training images (preprocessed as in training)", "of": "the released samples",
            "values": report["metrics"], "recipe": withhold_paths(recipe), "notes": report.get("notes", [])}


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


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.0f}%"


def build_card(*, n: int, ext: str, pipe, run: Path, settings: dict, label, seed: int, bit_depth: int, policy: dict,
               first, combined, rounds: list[dict], chosen: Sequence[int], metrics: dict, split_info: dict, n_train: int,
               quality: dict | None = None,
               n_holdout: int, n_train_subjects: int, n_holdout_subjects: int, attempt: int = 1, earlier: list[dict] = ()) -> dict[str, Any]:
    """The data card as a JSON-ready dict (see the module docstring for what it never holds)."""
    config = pipe.config
    latent = config.get("latent") or {}
    card: dict[str, Any] = {
        "card_version": 1,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": {
            "n": n, "format": "PNG" if ext == ".png" else "NIfTI (.nii.gz)", "files": f"synthetic_00000{ext} ... synthetic_{n - 1:05d}{ext}",
            "naming": "position in the release; no link to any patient", "sample_shape": list(pipe.sample_shape) if not latent else None,
            "spatial_dims": pipe.spatial_dims, "spacing_mm": pipe.spacing, "bit_depth": bit_depth if ext == ".png" else None,
            "manifest": "manifest.csv: file, sha256, seed, label, sampler, steps, guidance, checkpoint_sha256",
            "label": label, "synthetic": True,
        },
        "model": {
            "checkpoint_sha256": pipe.checkpoint_sha256, "mode": "latent" if latent else "pixel",
            "autoencoder_sha256": latent.get("autoencoder_sha256"), "num_classes": pipe.num_classes,
            "resolved_config": _resolved_config(run), "config_paths": f"paths {WITHHELD}",
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
    return card


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


def card_markdown(card: dict[str, Any]) -> str:
    d, m, s, a, t = card["dataset"], card["model"], card["sampling"], card["audit"], card["training_data"]
    test = a["all_samples"]["test"]
    lines = [
        "# Data card: synthetic dataset", "",
        f"{d['n']} synthetic {d['spatial_dims']}D images ({d['format']}), generated by a medgen diffusion model and released "
        f"after a memorization audit. Created {card['created_utc']}. Every image is synthetic; no file corresponds to a patient.", "",
        "## Intended use", "", *[f"- {x}" for x in card["intended_use"]], "",
        "Out of scope:", "", *[f"- {x}" for x in card["out_of_scope"]], "",
        "## Files", "",
        f"- `{d['files']}` ({d['naming']})",
        f"- {d['manifest']}",
        "- `grid.png` (a preview), `data_card.json` (this card, machine-readable)", "",
        "## Model", "",
        f"- checkpoint sha256: `{m['checkpoint_sha256']}` ({m['mode']} diffusion"
        + (f", autoencoder sha256 `{m['autoencoder_sha256']}`" if m["autoencoder_sha256"] else "") + ")",
        "- resolved config: `data_card.json` → `model.resolved_config` (paths withheld)", "",
        "## Sampling", "",
        f"- sampler {s['sampler']}, {s['steps']} steps, guidance {s['guidance']}, eta {s['eta']}, "
        + ("unconditional" if s["label"] is None else f"label {s['label']}"),
        f"- seed {s['seed']}: {s['seed_rule']}; released indices {s['indices_released']}", "",
        "## Quality (against the training images)", "",
        "| metric | value | 95% interval |", "|---|---|---|", *_metric_rows(card["metrics"]["values"]), "",
        f"Features: {(card['metrics']['recipe'].get('features') or {}).get('extractor', '-')}; "
        f"{card['metrics']['recipe'].get('n_real')} real vs {card['metrics']['recipe'].get('n_fake')} synthetic images; "
        f"intervals: {card['metrics']['recipe'].get('intervals', 'none')}.", "",
        *_quality_lines(card.get("quality_floor") or {}),
        "## Privacy audit", "",
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
        f"{a['memorization_rate_pct']:.2f}%; not anatomy: "
        + ", ".join(f"{v} {k}" for k, v in a["all_samples"]["not_anatomy"].items()),
        f"- released samples above tau: {a['released_samples_above_tau']} (flagged samples are dropped)",
        "- policy: " + ", ".join(f"{k} {v}" for k, v in a["policy"].items()), "",
        "## Rounds", "",
        "| round | indices | sampled | above tau (copies), dropped | not anatomy, dropped | kept |", "|---|---|---|---|---|---|",
        *[f"| {r['round']} | {r['indices'][0]}..{r['indices'][1] - 1} | {r['sampled']} | {r['copies']} | {r['not_anatomy']} | {r['kept']} |"
          for r in card["rounds"]], "",
        f"Dropped: {card['dropped']['copies']} copies, {card['dropped']['not_anatomy']} not anatomy; "
        f"{card['dropped']['kept_unused']} clean samples beyond N were not needed.", "",
        "## Training data", "",
        f"- {t['n_train_subjects']} training subjects ({t['n_train_images']} images), {t['n_holdout_subjects']} held-out subjects "
        f"({t['n_holdout_images']} images) for calibration ({', '.join(t['holdout_splits'])}); source: {t['source']}",
        f"- split.json sha256 `{t['split_json_sha256']}` (kept with the run, not released); subject ids and file names withheld", "",
        "## Limitations", "", *[f"- {x}" for x in card["limitations"]], "",
        "## Software", "", ", ".join(f"{k} {v}" for k, v in card["software"].items()), "",
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
