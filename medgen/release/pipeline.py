"""`make_release`: sample, audit, drop flagged samples and resample, evaluate, write the dataset
with its data card; or refuse, leaving nothing that looks like a release.

The steps (issue 14):

1. Match the training data: `--train`/`--holdout` must be the subjects of the run's `split.json`
   (training subjects exactly; held-out subjects never trained on), or are taken from it.
2. Fit the audit once (`medgen.privacy.CopyAudit`: detectors, tau, null rate, positive control;
   for a latent model with its own autoencoder).
3. Round 1 samples max(N, `policy.audit_samples`) and is judged; any verdict but `pass` refuses the
   release. A pass is a bound: at confidence 1 - alpha, at most `max_copy_rate` of the model's
   outputs are copies (`medgen.privacy.bound`). The attempt is recorded in the run's attempt log
   as soon as it has a verdict, and alpha is spent over the run's release attempts (attempt k at
   alpha / 2^k), so reruns cannot buy a pass. Flagged samples (copies, and samples that are no
   anatomy) are dropped and later rounds sample what is missing, each scored against the same
   fitted audit, at most `policy.max_rounds` rounds. All samples of all rounds (what the model
   generated) are judged together once more: it must pass too.
4. Evaluate the released set against the training images (`medgen eval` metrics), write the
   files under neutral names, `manifest.csv`, `grid.png`, `DATA_CARD.md`, `data_card.json`,
   check that nothing of the real data is in them, and rename the folder into place. With
   `label="all"` (a class-conditional model) sample index g gets class g mod K in every round
   (`medgen sample --label all`, continued across rounds), the release takes each class's share
   of N (`choose_released`), and its utility is measured: a classifier trained on the released
   images and labels against one trained on the real training images, both tested on the held-out
   images (`release_utility`, `medgen.metrics.utility`).

The audit scores the files as written (PNG, NIfTI or DICOM read back through the run's data config
with the intensity mapping of the files' units, `SampleFormat.reading_config`), so what is audited
is what leaves. Under `accelerate launch` every process samples its share of
each round (`medgen.sample.shard`); the main process audits, decides and writes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from medgen.errors import ConfigError, MedgenError, ReleaseRefused, RunError
from medgen.io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_new_output, sha256_file
from medgen.release.card import MANIFEST_FIELDS

ROUNDS = ".rounds"  # staging folder of the sampling rounds inside the temp release folder
SCORE_BATCH = 64  # samples read and scored at a time: the audit holds scores, not the sampled set
FILE_STEM = "synthetic"  # released files: synthetic_00000.png, ... (neutral: position in the release)


@dataclass(frozen=True)
class ReleasePolicy:
    """What a release demands (`--policy key=value,...`)."""

    alpha: float = 0.05  # 1 - confidence of the privacy bound, spent over the run's release attempts (attempt k: alpha / 2^k)
    max_copy_rate: float = 0.05  # pass only when at most this share of the model's outputs can be copies
    audit_samples: int = 400  # round 1 judges at least this many samples (eval/RESULTS.md: operating table)
    max_rounds: int = 5  # sampling rounds, the first included, to replace dropped samples
    min_control_recall: float = 0.8  # share of its own positive-control copies each detector must catch
    bound: str = "conservative"  # or null-adjusted (valid only if the model's non-copies exceed tau as often as new patients)
    min_coverage: float = 0.5  # quality floor: the released set's coverage of the training images, relative to held-out patients' (0: off)

    @classmethod
    def parse(cls, text: str | None) -> "ReleasePolicy":
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for item in (text or "").split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in types:
                raise ConfigError(f"--policy {item.strip()!r}: expected key=value with key one of {', '.join(sorted(types))}")
            kind = {"int": int, "str": str}.get(str(types[key]), float)
            try:
                values[key] = kind(value)
                if kind is float and not math.isfinite(values[key]):
                    raise ValueError
            except ValueError:
                what = {int: "a whole number", str: "a name"}.get(kind, "a number")
                raise ConfigError(f"--policy {key}={value or '(empty)'}: expected {what}") from None
        policy = cls(**values)
        policy.validate()
        return policy

    def validate(self) -> None:
        from medgen.privacy.bound import BOUND_METHODS

        if not 0 < self.alpha < 1:
            raise ConfigError(f"--policy alpha={self.alpha}: must be in (0, 1)")
        if not 0 < self.max_copy_rate <= 1:
            raise ConfigError(f"--policy max_copy_rate={self.max_copy_rate}: the largest share of copies a release allows, in (0, 1] "
                              f"(0.05 = 5%); a bound is never 0, so 0 would refuse every release")
        if self.audit_samples < 1 or self.max_rounds < 1:
            raise ConfigError(f"--policy audit_samples={self.audit_samples}, max_rounds={self.max_rounds}: both must be >= 1")
        if not 0 <= self.min_control_recall <= 1:
            raise ConfigError(f"--policy min_control_recall={self.min_control_recall}: a fraction in [0, 1]")
        if not 0 <= self.min_coverage <= 1:
            raise ConfigError(f"--policy min_coverage={self.min_coverage}: a fraction in [0, 1] of the held-out patients' coverage")
        if self.bound not in BOUND_METHODS:
            raise ConfigError(f"--policy bound={self.bound}: one of {', '.join(BOUND_METHODS)}")


# ----------------------------------------------------------------------------- training data


def _examples(ids: Sequence[str], k: int = 3) -> str:
    return ", ".join(ids[:k]) + (", ..." if len(ids) > k else "")


def training_sets(run: str | os.PathLike, train=None, holdout=None, *, holdout_splits: Sequence[str] = ("holdout",),
                  data: str | os.PathLike | None = None) -> tuple[list, list, dict | None, dict]:
    """The training and held-out samples of `run`, checked against its `split.json`, the run's
    data config, and what was checked (for the card).

    Without `train`/`holdout` they come from the split (`holdout_splits`, in the dataset `data`
    when it moved). Given, `train` must hold exactly the run's training subjects and files, and
    `holdout` no training subject; otherwise `RunError` says what differs.
    """
    from medgen.data import load_split, scan_dataset
    from medgen.privacy.audit import run_split

    run = Path(run)
    split_file = run / "split.json"
    if not split_file.is_file():
        raise RunError(f"{run} has no split.json: a release needs the run's record of which subjects it trained on "
                       f"(written by `medgen train diffusion`)")
    split = load_split(split_file)
    info = {"split_json_sha256": sha256_file(split_file), "holdout_splits": list(holdout_splits)}
    if train is None and holdout is None:
        t, h, cfg = run_split(run, holdout_splits, data)
        return t, h, cfg, {**info, "source": "the run's split.json"}
    if train is None or holdout is None:
        raise RunError("pass both --train and --holdout, or neither (then the run's split.json gives them)")
    model_cfg = run / "model" / "config.json"
    cfg = json.loads(model_cfg.read_text()).get("data") if model_cfg.is_file() else None
    t, h = scan_dataset(train), scan_dataset(holdout)
    run_train = set(split.get("train", []))
    given = {s.subject_id for s in t}
    missing, extra = sorted(run_train - given), sorted(given - run_train)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the run's {len(run_train)} training subjects are not in --train ({_examples(missing)})")
        if extra:
            parts.append(f"{len(extra)} subject(s) of --train were not trained on ({_examples(extra)})")
        raise RunError(f"--train {train} does not match the training data of {run} (its split.json): {'; '.join(parts)}. "
                       f"Pass exactly the run's training subjects, or leave out --train/--holdout to take them from the run")
    trained_files = len(json.loads(split_file.read_text()).get("files", {}).get("train", [])) or len(t)
    if trained_files != len(t):
        raise RunError(f"--train {train} holds {len(t)} files of the run's training subjects but the run trained on {trained_files} "
                       f"(its split.json); pass the same files the run was trained on")
    shared = sorted({s.subject_id for s in h} & run_train)
    if shared:
        raise RunError(f"--holdout {holdout}: {len(shared)} subject(s) were trained on ({_examples(shared)}); "
                       f"held-out patients must be unseen by the model")
    from medgen.data import content_sha256, split_content_mismatch

    mismatch = split_content_mismatch(split_file, "train", t)
    if mismatch is not None and any(mismatch):
        missing, unknown = mismatch
        raise RunError(f"--train {train}: the files have the run's subject ids and names but not its content (sha256 in split.json): "
                       f"{len(unknown)} of {len(t)} file(s) differ from what the run trained on (e.g. {_examples([Path(f).name for f in unknown])}); "
                       f"pass the files the run was trained on")
    if mismatch is not None:
        recorded = json.loads(split_file.read_text())
        trained = {recorded["sha256"].get(f) for f in recorded["files"].get("train", [])}
        copies = [s.path.name for s in h if content_sha256(s.path) in trained]
        if copies:
            raise RunError(f"--holdout {holdout}: {len(copies)} file(s) are byte-identical to training files ({_examples(copies)}); "
                           f"held-out patients must be unseen by the model")
    how = "content (sha256)" if mismatch is not None else "subjects and file counts (split.json has no content hashes)"
    return t, h, cfg, {**info, "source": f"--train/--holdout, matched to the run's split.json by {how}"}


# ----------------------------------------------------------------------------- quality floor


def relative_coverage(train: torch.Tensor, holdout: torch.Tensor, released: torch.Tensor, *, features: str = "auto", seed: int = 0,
                      device=None) -> dict[str, Any]:
    """Coverage (Naeem et al. 2020, k=5) of the training images by the released set, beside the
    coverage held-out patients reach (a real set the model never saw: what a perfect model would
    score), both with the same number of images m = min(released, held-out), so the set sizes do
    not decide (coverage grows with them). Features as `medgen eval` (PCA of the training images
    offline). Returns the numbers and `ratio` = released / held-out."""
    from medgen.metrics.prdc import density_coverage
    from medgen.metrics.report import K_DC, choose_extractor

    m = min(len(released), len(holdout))
    g = torch.Generator().manual_seed(seed)
    pick = lambda x: x[torch.randperm(len(x), generator=g)[:m]]  # noqa: E731
    ex = choose_extractor(features, train.ndim - 2, device=device)
    if hasattr(ex, "fit"):
        ex.fit(train)
    f_t, f_h, f_r = (ex(x).double() for x in (train, pick(holdout), pick(released)))
    ours = density_coverage(f_t, f_r, k=K_DC, device=device)["coverage"]
    reference = density_coverage(f_t, f_h, k=K_DC, device=device)["coverage"]
    return {"coverage": round(ours, 4), "holdout_coverage": round(reference, 4), "ratio": round(ours / reference, 4) if reference > 0 else None,
            "m": m, "k": K_DC, "features": ex.recipe.get("extractor")}


# ----------------------------------------------------------------------------- labels


def index_labels(label: int | str | None, num_classes: int, start: int, size: int) -> int | list[int] | None:
    """The labels of sample indices start .. start + size - 1 as `write_samples` takes them:
    `label` for all, or with "all" index g's class g mod K (`cycled_labels`, continued across rounds)."""
    return [(start + i) % num_classes for i in range(size)] if label == "all" else label


def class_quota(n: int, num_classes: int) -> list[int]:
    """Each class's share of n balanced samples, as `cycled_labels` of n samples makes them."""
    return [n // num_classes + (c < n % num_classes) for c in range(num_classes)]


def choose_released(kept: Sequence[int], n: int, num_classes: int = 0) -> list[int]:
    """The released global indices, in sampling order: the first n kept ones, or with classes
    (index g has class g mod K) the first of each class up to its `class_quota` share, so that
    dropped samples do not unbalance the release."""
    if not num_classes:
        return list(kept[:n])
    left, chosen = class_quota(n, num_classes), []
    for g in kept:
        if left[g % num_classes]:
            left[g % num_classes] -= 1
            chosen.append(g)
    return chosen


def release_utility(released: Path, label, train_samples: Sequence, holdout_samples: Sequence, *, data_cfg, read_cfg,
                    device=None) -> dict[str, Any]:
    """TSTR against TRTR (`medgen.metrics.utility.synthetic_utility`): train on the released
    files and their labels (`released`: the release's manifest.csv), and on the real training
    images; test both on the held-out images. {"skipped": why} when the release or the real
    images are unlabelled or of one class."""
    from medgen.data import scan_dataset
    from medgen.metrics.utility import synthetic_utility

    if label is None:
        return {"skipped": "utility needs labels: release with --label all"}
    if label != "all":
        return {"skipped": f"utility needs two classes or more, but every released image has label {label}: release with --label all"}
    for what, samples in (("training", train_samples), ("held-out", holdout_samples)):
        if any(s.label is None for s in samples) or len({s.label for s in samples}) < 2:
            return {"skipped": f"utility needs labelled real images of two classes or more, and the {what} images are not "
                               f"(a label column in the dataset's manifest.csv)"}
    return synthetic_utility(scan_dataset(released), list(train_samples), list(holdout_samples), data_cfg=data_cfg,
                             synthetic_cfg=read_cfg, device=device, progress=False)


# ----------------------------------------------------------------------------- processes


def _on_main(processes, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the main process only; every process returns its (small) result or raises
    its error, so no process waits for a main process that gave up."""
    outcome: tuple = ("ok", None)
    if processes.is_main:
        try:
            outcome = ("ok", fn())
        except MedgenError as e:
            outcome = ("error", e)
        except BaseException:
            processes.broadcast(("crash", None)) if processes.num_processes > 1 else None
            raise
    outcome = processes.broadcast(outcome)
    if outcome[0] == "ok":
        return outcome[1]
    if outcome[0] == "error":
        raise outcome[1]
    raise RunError("the main process stopped the release (see its error)")


# ----------------------------------------------------------------------------- the release


def move_released_files(tmp: Path, rounds: Sequence[dict], chosen: Sequence[int], output, seed: int, row: dict[str, Any],
                        labels: Sequence[int] | None = None) -> str:
    """Move the chosen samples (global indices, in release order) from the round folders in `tmp`
    to `FILE_STEM_NNNNN` + the format's suffix (a 3D DICOM series stays a folder); returns
    manifest.csv's text: each file's sha256 (a folder's over its files' names and contents), its
    seed (`seed` + index), its label (`labels`, one per chosen sample, over `row`'s) and `row`'s columns."""
    from medgen.data import content_sha256
    from medgen.sample.pipeline import sample_name

    bounds = [r["indices"] for r in rounds]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    w.writeheader()
    for j, g in enumerate(chosen):
        r = next(k for k, (a, b) in enumerate(bounds) if a <= g < b)
        name = f"{FILE_STEM}_{j:05d}{output.suffix}"
        os.replace(tmp / ROUNDS / f"round_{r + 1}" / sample_name(g - bounds[r][0], output), tmp / name)
        w.writerow({**row, "file": name, "sha256": content_sha256(tmp / name), "seed": seed + g,
                    **({"label": labels[j]} if labels is not None else {})})
    return buf.getvalue()


def _refuse(what: str, result) -> ReleaseRefused:
    from medgen.privacy.commands import verdict_line

    lines = [f"{what}: {verdict_line(result.report)}"]
    lines += [f"  {r}" for r in result.reasons]
    why = "; ".join(result.reasons) or (f"{result.report['n_copies']} of {result.report['n_synthetic']} samples above tau, "
                                        f"p = {result.p_value:.3g} against the null")
    return ReleaseRefused("release refused (nothing written). " + "\n".join(lines), result.verdict, f"{what} {result.verdict}: {why}")


def make_release(
    run: str | os.PathLike,
    out: str | os.PathLike,
    n: int,
    *,
    train=None,
    holdout=None,
    holdout_splits: Sequence[str] = ("holdout",),
    data: str | os.PathLike | None = None,
    policy: ReleasePolicy | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    eta: float | None = None,
    label: int | str | None = None,
    seed: int = 0,
    batch_size: int = 16,
    bit_depth: int = 8,
    fmt: str | None = None,
    units: str = "source",
    detector: Any = None,
    detector_options: dict | None = None,
    bootstrap: int = 200,
    features: str = "auto",
    device=None,
    overwrite: bool = False,
    processes=None,
    card_fields: dict | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Release `n` synthetic samples of diffusion run `run` into `out`, or refuse.

    `label`: None (unconditional), one class for all, or "all": a balanced labelled release (sample
    index g gets class g mod K; each file's label in the manifest) whose card shows its utility.

    Returns the data card (dict; None on processes other than the main one). Raises
    `ReleaseRefused` (exit 1 fail, 3 inconclusive) when the audit does not pass or the release
    cannot be made clean, `RunError`/`DataError` for bad input; then `out` is not written (an
    existing one is left as it was).

    `fmt` (png for 2D, nifti for 3D, or dicom) and `units` (source: the units the model was trained
    on; raw: [-1, 1]) say how the files are written (`medgen.sample.formats`); each carries the
    attempt's release id, recorded in the manifest, the card and the attempt log.

    `card_fields`: what the data steward says on the card (modality, anatomy, source dataset and
    licence, ethics approval, licence, contact, citation: `medgen.release.steward`); the card
    says "not provided" for each one left out.
    """
    from medgen.data import load_images
    from medgen.privacy.attempts import attempt_entry, check_writable, read_attempts, record_attempt, release_history, start_release
    from medgen.privacy.calibration import CopyAudit
    from medgen.privacy.families import RoundTrip
    from medgen.release.steward import check_card_fields, missing_fields
    from medgen.sample.formats import new_release_id, sample_format
    from medgen.sample.pipeline import cycled_labels, load_pipeline, write_samples
    from medgen.sample.shard import ProcessGroup

    from medgen.config import check_counts
    from medgen.sample.commands import MAX_SEED, sample_file_bytes

    policy = policy or ReleasePolicy()
    policy.validate()
    card_fields = check_card_fields(card_fields)
    check_counts({"--n": n, "--batch-size": batch_size, "--steps": steps})
    if bit_depth not in (8, 16):
        raise ConfigError(f"--bit-depth must be 8 or 16, got {bit_depth}")
    most = policy.max_rounds * 2 * max(n, policy.audit_samples)  # the largest sample index the rounds can reach
    if not 0 <= seed <= MAX_SEED - most:
        raise ConfigError(f"--seed {seed}: expected an integer from 0 to {MAX_SEED - most} (sample index i uses seed + i, "
                          f"and seeds are unsigned 64-bit integers)")
    out = Path(out)
    inputs = {"--run": run, "--train": train, "--holdout": holdout, "--data": data}
    ensure_new_output(out, overwrite, "release folder", inputs=inputs)
    processes = processes or ProcessGroup.current(device)
    say = echo if processes.is_main else (lambda _: None)
    if missing_fields(card_fields):
        say(f"release: the data card will say \"not provided\" for {', '.join(missing_fields(card_fields))} "
            f"(pass --card card.yaml or --card-field key=value)")
    train_s, hold_s, data_cfg, split_info = training_sets(run, train, holdout, holdout_splits=holdout_splits, data=data)
    pipe = load_pipeline(run, processes.device or device)
    if label == "all":
        cycled_labels(pipe, 1)  # an unconditional model: refused now, not after the audit is fitted
    else:
        pipe.check_label(label)  # a label the model does not know: likewise
    classes = pipe.num_classes if label == "all" else 0  # balanced over these classes (0: one label or none)
    settings = pipe.sampling_settings(sampler, steps, guidance, eta)  # as the rounds resolve them (for the card)
    output = sample_format(pipe, fmt, units, processes.broadcast(new_release_id()), bit_depth=bit_depth)  # one id per attempt
    read_cfg = output.reading_config(data_cfg)  # the files as written, back to the model's [-1, 1]
    # round 1 and its replacements are staged beside the release: room for about twice the audited set
    ensure_new_output(out, overwrite, "release folder", inputs=inputs,
                      need_bytes=2 * max(n, policy.audit_samples) * sample_file_bytes(pipe, bit_depth, output.format))
    main: dict[str, Any] = {}  # the main process's state: images, the fitted audit, the rounds
    if processes.is_main:
        check_writable(run)  # an attempt that leaves no record is not allowed
        earlier = release_history(read_attempts(run))
        attempt = start_release(run, seed=seed, n=n, policy=asdict(policy), out=str(out))
    else:
        earlier, attempt = [], 1  # only the main process judges
    judging = {"alpha": policy.alpha, "max_copy_rate": policy.max_copy_rate, "bound_method": policy.bound, "attempt": attempt}

    def fit() -> None:
        x_t, s_t = load_images(train_s, data_cfg)
        x_h, s_h = load_images(hold_s, data_cfg)
        autoencoder = RoundTrip(pipe.autoencoder) if pipe.autoencoder is not None else None
        say(f"release: attempt {attempt} of this run; auditing against {len(x_t)} training and {len(x_h)} held-out images"
            + (" (held-out images decoded through the model's autoencoder)" if autoencoder is not None else ""))
        audit = CopyAudit.fit(
            x_t, x_h, detector or "auto", detector_options=detector_options, min_control_recall=policy.min_control_recall,
            autoencoder=autoencoder, subjects={"train": [s.subject_id for s in s_t], "holdout": [s.subject_id for s in s_h]},
            names={"train": [s.path.name for s in s_t], "holdout": [s.path.name for s in s_h]}, device=device, seed=seed)
        main.update(x_t=x_t, x_h=x_h, s_t=s_t, s_h=s_h, audit=audit, rounds=[], scored=[], keep=[], files=[])

    def judge_round(r: int, folder: Path, start: int) -> int:
        """Score round r's files batch by batch (as written: what would leave); refuse on a first
        round that does not pass; the next round's size. Keeps scores and file names, not images."""
        from medgen.data import ImageSet
        from medgen.privacy.verdict import judge, score_set

        images = ImageSet(folder / "manifest.csv", read_cfg)
        files = images.samples
        scored = score_set(main["audit"], (x for x, _ in images.batches(SCORE_BATCH)), device=device)
        if r == 1:
            result = judge(main["audit"], scored, device=device, **judging)
            main["first"] = result
            record_attempt(run, attempt_entry("release", result, seed=seed, n=len(files), policy=asdict(policy), out=out, attempt=attempt))
            if result.verdict != "pass":
                raise _refuse("round 1 audit", result)
        copies, anatomical = scored.scores.is_copy, scored.scores.anatomical
        keep = ~copies & anatomical
        main["scored"].append(scored)
        main["keep"].append(keep)
        main["files"] += files
        main["rounds"].append({
            "round": r, "indices": [start, start + len(files)], "seeds": [seed + start, seed + start + len(files) - 1],
            "sampled": len(files), "copies": int(copies.sum()), "not_anatomy": int((~anatomical).sum()), "kept": int(keep.sum())})
        kept, made = sum(int(k.sum()) for k in main["keep"]), sum(len(k) for k in main["keep"])
        say(f"release: round {r}: {len(files)} sampled, {int(copies.sum())} copies and {int((~anatomical).sum())} not anatomy dropped, "
            f"{kept} kept ({n} to release)")
        chosen = choose_released(torch.cat(main["keep"]).nonzero().flatten().tolist(), n, classes)
        missing = n - len(chosen)
        if missing <= 0 or r == policy.max_rounds:
            return 0
        if classes:  # the next round cycles over all classes: enough of it for the class that lacks most
            have = [sum(g % classes == c for g in chosen) for c in range(classes)]
            missing = classes * max(q - h for q, h in zip(class_quota(n, classes), have))
        keep_rate = max(kept / made, 0.1)
        return min(2 * n, math.ceil(1.25 * missing / keep_rate))  # over-sample by the observed drop rate

    def finish(tmp: Path) -> dict[str, Any]:
        from medgen.metrics.report import evaluate
        from medgen.privacy.calibration import image_hashes
        from medgen.privacy.verdict import ScoredSet, judge
        from medgen.release.card import build_card, card_markdown, find_leaks, input_folders, real_identifiers
        from medgen.train.preview import grid_png, sample_captions

        rounds = main["rounds"]
        keep, sampled = torch.cat(main["keep"]), len(main["files"])
        chosen = choose_released(keep.nonzero().flatten().tolist(), n, classes)  # global indices, in sampling order
        if len(chosen) < n:
            raise ReleaseRefused(f"release refused (nothing written): after {len(rounds)} round(s) (policy max_rounds={policy.max_rounds}) "
                                 f"only {len(chosen)} of {n} samples" + (f" ({n} balanced over {classes} classes)" if classes else "")
                                 + " are neither copies nor non-anatomical "
                                 f"({sum(r['copies'] for r in rounds)} copies, {sum(r['not_anatomy'] for r in rounds)} not anatomy "
                                 f"among {sampled} sampled); raise max_rounds or train the model further", "fail")
        combined = judge(main["audit"], ScoredSet.cat(main["scored"]), device=device, **judging)
        if combined.verdict != "pass":
            raise _refuse(f"audit of all {sampled} samples of {len(rounds)} round(s)", combined)
        x_rel, _ = load_images([main["files"][g] for g in chosen], read_cfg)  # the N released files, nothing more
        quality = relative_coverage(main["x_t"], main["x_h"], x_rel, features=features, seed=seed, device=device)
        if policy.min_coverage and (quality["ratio"] is None or quality["ratio"] < policy.min_coverage):
            raise ReleaseRefused(
                f"release refused (nothing written): below the quality floor: the released samples cover {100 * quality['coverage']:.1f}% of the "
                f"training images, held-out patients {100 * quality['holdout_coverage']:.1f}% (coverage, k={quality['k']}, {quality['m']} images each; "
                f"ratio {quality['ratio']}, policy min_coverage={policy.min_coverage}): the set is too unlike the patients to be useful; "
                f"train the model further", "fail", f"quality floor: coverage ratio {quality['ratio']} < {policy.min_coverage}")
        real_hashes = set(image_hashes(main["x_t"])) | set(image_hashes(main["x_h"]))
        if real_hashes & set(image_hashes(x_rel)):
            raise ReleaseRefused("release refused (nothing written): a released image is identical to a real one", "fail")

        ext = output.suffix  # "" for 3D DICOM: a series folder per sample
        row = {"label": "" if label is None or classes else int(label), "sampler": settings["sampler"], "steps": settings["steps"],
               "guidance": settings["guidance"], "checkpoint_sha256": pipe.checkpoint_sha256 or "", "units": output.units,
               "release_id": output.release_id}
        labels = [g % classes for g in chosen] if classes else None  # each file's label: its index's, as it was sampled
        atomic_write_text(tmp / "manifest.csv", move_released_files(tmp, rounds, chosen, output, seed, row, labels))
        shown = 64 if pipe.spatial_dims == 2 else 8
        atomic_write_bytes(tmp / "grid.png", grid_png(x_rel[:shown], captions=sample_captions(
            [seed + g for g in chosen[:shown]], labels[:shown] if labels else label)))
        shutil.rmtree(tmp / ROUNDS)

        if label == "all":
            say("release: utility: a classifier trained on the released images and labels, and one on the training images, "
                "both tested on the held-out images")
        utility = release_utility(tmp / "manifest.csv", label, main["s_t"], main["s_h"], data_cfg=data_cfg, read_cfg=read_cfg,
                                  device=device)

        say("release: evaluating the released set against the training images, beside the held-out images (real vs real)")
        metrics = evaluate(main["x_t"], x_rel, holdout=main["x_h"], features=features, bootstrap=bootstrap, seed=seed, device=device,
                           slice_step=2 if pipe.spatial_dims == 3 else 1, utility=utility)
        card = build_card(
            n=n, ext=ext, pipe=pipe, run=Path(run), settings=settings, label=label, labels=labels, seed=seed, bit_depth=bit_depth,
            policy=asdict(policy), first=main["first"], combined=combined, rounds=rounds, chosen=chosen, attempt=attempt, earlier=earlier,
            metrics=metrics, quality=quality, split_info=split_info, n_train=len(main["x_t"]), n_holdout=len(main["x_h"]),
            n_train_subjects=len({s.subject_id for s in main["s_t"]}), n_holdout_subjects=len({s.subject_id for s in main["s_h"]}),
            output=output.description(), card_fields=card_fields)
        atomic_write_json(tmp / "data_card.json", card)
        atomic_write_text(tmp / "DATA_CARD.md", card_markdown(card))
        leaks = find_leaks(tmp, real_identifiers(Path(run), main["s_t"] + main["s_h"], data, input_folders(train, holdout, detector)))
        if leaks:
            raise ReleaseRefused("release refused (nothing written): the release would name real data: " + "; ".join(leaks[:5]), "fail")
        return card

    _on_main(processes, fit)  # before any folder exists: the long part that can refuse early
    try:
        with processes.atomic_dir(out, overwrite=overwrite, what="release folder") as tmp:
            size, start = max(n, policy.audit_samples), 0
            if size > n:
                say(f"release: round 1 samples {size} to audit (policy audit_samples={policy.audit_samples}: fewer samples cannot bound "
                    f"the copy share under {100 * policy.max_copy_rate:.4g}%) and releases {n} of them")
            for r in range(1, policy.max_rounds + 1):
                folder = write_samples(pipe, tmp / ROUNDS / f"round_{r}", size, sampler=sampler, steps=steps, guidance=guidance, eta=eta,
                                       seed=seed + start, label=index_labels(label, classes, start, size), batch_size=batch_size,
                                       bit_depth=bit_depth, processes=processes, fmt=output.format, units=units,
                                       release_id=output.release_id)
                start, size = start + size, _on_main(processes, lambda r=r, folder=folder, start=start: judge_round(r, folder, start))
                if not size:
                    break
            card = _on_main(processes, lambda: finish(tmp))
    except MedgenError as e:
        if processes.is_main:
            record_attempt(run, {"kind": "release", "event": "outcome", "attempt": attempt, "released": False,
                                 "why": getattr(e, "summary", str(e))})
        raise
    if processes.is_main:
        record_attempt(run, {"kind": "release", "event": "outcome", "attempt": attempt, "released": True, "n": n,
                             "release_id": output.release_id,
                             "bound_upper_pct": card["audit"]["bound"]["upper_pct"]})
        say(f"release: {n} samples in {out} (DATA_CARD.md, data_card.json, manifest.csv)")
    return card if processes.is_main else None

