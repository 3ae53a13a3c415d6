"""`medgen demo`: the whole flow on the built-in cohort, one stage after another.

Each stage is a function `stage(ctx)` that reads what earlier stages left in `ctx.state`
(run directories, sample folders) and adds its own outputs. Stages live with the code they
demonstrate; this module only orders them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medgen.errors import ConfigError, RunError
from medgen.io import (
    OUTPUT_MARKER,
    atomic_write_json,
    claim_output,
    ensure_new_output,
    foreign_entries,
    holds_cwd,
    mark_output,
    written_by,
)

LEGACY_MARKER = ".medgen-demo"  # the marker of demo folders before OUTPUT_MARKER
WRITER = "medgen demo"  # `written_by` of a demo folder: the next demo replaces it without --overwrite
SUMMARY = "demo.json"  # timings, each stage's outputs, and the state later stages read

# (name, "module:function") in flow order; a stage's module is imported only when it runs.
STAGES: list[tuple[str, str]] = [
    ("cohort", "medgen.demo:cohort_stage"),
    ("autoencoder", "medgen.train.autoencoder:demo_stage"),
    ("diffusion", "medgen.train.diffusion:demo_stage"),
    ("sample", "medgen.sample.commands:demo_stage"),
    ("eval", "medgen.metrics.commands:demo_stage"),
    ("audit", "medgen.privacy.commands:demo_stage"),
    ("release", "medgen.release.commands:demo_stage"),
    ("probe", "medgen.recon.commands:demo_stage"),
]


@dataclass
class DemoContext:
    out: Path
    quick: bool
    dims: int
    cohort: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def cohort_settings(self) -> dict[str, Any]:
        """Cohort size and subject split. The audit (and so the release) needs at least 20 unseen
        subjects (held-out + validation): quick cohorts hold out more of their subjects."""
        if self.dims == 2:
            return {"n": 64, "size": 48, "val": 0.15, "holdout": 0.2} if self.quick else {"n": 200, "size": 64, "val": 0.1, "holdout": 0.1}
        return {"n": 56, "size": 16, "val": 0.15, "holdout": 0.25} if self.quick else {"n": 80, "size": 32, "val": 0.1, "holdout": 0.15}


def cohort_stage(ctx: DemoContext) -> None:
    """Build the built-in cohort, validate it and draw a preview of subjects."""
    from medgen.data.cohort import preview_figure, synth_brain
    from medgen.data.dataset import check_samples, scan_dataset
    from medgen.data.preprocess import DataConfig

    settings = ctx.cohort_settings()
    ctx.cohort = synth_brain(ctx.out / "cohort", n=settings["n"], dims=ctx.dims, size=settings["size"], seed=0)
    _, _, summary = check_samples(scan_dataset(ctx.cohort), DataConfig(spatial_dims=ctx.dims))
    preview_figure(ctx.cohort, ctx.out / "cohort_preview.png")
    ctx.state["cohort_summary"] = summary
    print(f"  cohort: {summary['count']} subjects, shape {summary['shapes'][0]}, labels {summary['labels']}")
    print(f"  preview: {ctx.out / 'cohort_preview.png'}")


def demo_config(name: str) -> Path:
    """A demo config shipped in the checkout's `configs/` folder."""
    path = Path(__file__).resolve().parents[1] / "configs" / name
    if not path.is_file():
        raise RunError(f"demo config {path} not found; run the demo from a medgen source checkout")
    return path


def _resolve(target: str) -> Callable[[DemoContext], None]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _restore(ctx: DemoContext, previous: dict) -> None:
    """Put an earlier demo's state (run folders, sample folders, numbers) back into `ctx`."""
    ctx.cohort = Path(previous["cohort"]) if previous.get("cohort") else None
    paths = set(previous.get("state_paths", []))
    ctx.state.update({k: Path(v) if k in paths else v for k, v in previous.get("state", {}).items()})


def _summary(ctx: DemoContext, timings: dict, outputs: dict, state_keys: dict) -> dict:
    state = {k: str(v) if isinstance(v, Path) else v for k, v in ctx.state.items()}
    timings, outputs, state_keys = ({name: d[name] for name, _ in STAGES if name in d} for d in (timings, outputs, state_keys))
    return {"quick": ctx.quick, "dims": ctx.dims, "stage_seconds": timings, "outputs": outputs, "state_keys": state_keys,
            "cohort": str(ctx.cohort) if ctx.cohort else None, "state": state,
            "state_paths": sorted(k for k, v in ctx.state.items() if isinstance(v, Path))}


def _previous_demo(out: Path) -> dict | None:
    try:
        return json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def run_demo(out: Path, quick: bool = False, dims: int = 2, stages: list[str] | None = None,
             overwrite: bool = False) -> DemoContext:
    """Run the demo's stages into `out`, the whole flow or only `stages` (in flow order).

    The whole flow replaces an earlier demo in `out` (never files medgen did not write); any
    other non-empty folder, another command's output included, only with `overwrite`. With
    `stages`, the earlier demo's other outputs stay: each named stage's own outputs are replaced
    and the later stages find the earlier ones' results (from demo.json) as if run together.
    """
    names = [name for name, _ in STAGES]
    unknown = [s for s in stages or () if s not in names]
    if unknown:
        raise ConfigError(f"--stages {','.join(unknown)}: unknown stage; the stages are {','.join(names)}")
    if not stages or names[0] in stages:
        from medgen.data.cohort import require_template

        require_template()  # a missing extra is named before an earlier demo in `out` is replaced
    out = Path(out)
    ctx = DemoContext(out=out, quick=quick, dims=dims)
    if (out / LEGACY_MARKER).is_file() and not (out / OUTPUT_MARKER).is_file():
        mark_output(out, WRITER)  # a demo folder of an earlier medgen: all of it is the demo's
    own = written_by(out) == WRITER
    previous = _previous_demo(out) if stages and own else None
    timings: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}  # stage -> the entries of `out` it wrote
    state_keys: dict[str, list[str]] = {}  # stage -> the ctx.state keys it set
    if stages and names[0] not in stages and not (previous and previous.get("cohort") and Path(previous["cohort"]).exists()):
        raise RunError(f"--stages {','.join(stages)} continues an earlier demo, but {out} holds none; "
                       f"run `medgen demo` first or add {names[0]} to --stages")
    if stages and own:
        claim_output(out, "demo folder")  # locked: no other process runs a demo here meanwhile
        if previous is not None:
            if (previous.get("quick"), previous.get("dims")) != (quick, dims):
                raise ConfigError(f"{out} holds a demo run with --dims {previous.get('dims')}"
                                  f"{' --quick' if previous.get('quick') else ''}; pass the same options with --stages, "
                                  f"or run the whole demo")
            _restore(ctx, previous)
            timings, outputs = dict(previous.get("stage_seconds", {})), dict(previous.get("outputs", {}))
            state_keys = dict(previous.get("state_keys", {}))
    else:  # a new demo; an earlier demo's folder is replaced, another command's only with --overwrite
        ensure_new_output(out, overwrite=overwrite or own, what="demo folder")
        if out.exists():
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    foreign = set(foreign_entries(out))
    started = time.perf_counter()
    for name, target in STAGES:
        if stages and name not in stages:
            continue
        for entry in outputs.pop(name, []):  # this stage's outputs of the earlier run
            in_the_way = sorted(f for f in foreign if f == entry or f.startswith(entry.rstrip("/") + "/"))
            if in_the_way:
                raise RunError(f"{out / entry} holds files medgen did not write ({', '.join(in_the_way[:5])}); "
                               f"move them away to re-run the {name} stage")
            path = out / entry.rstrip("/")
            if holds_cwd(path):
                raise RunError(f"{path} is the current directory or holds it; run the demo from elsewhere")
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for key in state_keys.pop(name, []):  # the stage sees what the stages before it left, as in a whole run
            ctx.state.pop(key, None)
        before, keys_before = {p.name for p in out.iterdir()}, set(ctx.state)
        print(f"[demo] {name}")
        start = time.perf_counter()
        _resolve(target)(ctx)
        timings[name] = round(time.perf_counter() - start, 1)
        outputs[name] = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                               if p.name not in before and p.name not in (SUMMARY, OUTPUT_MARKER))
        state_keys[name] = sorted(set(ctx.state) - keys_before)
        atomic_write_json(out / SUMMARY, _summary(ctx, timings, outputs, state_keys))
        mark_output(out, WRITER, exclude=foreign)  # what the demo wrote (the next run may replace it)
        print(f"[demo] {name} done in {timings[name]} s")
    print(f"[demo] finished in {time.perf_counter() - started:.0f} s: {out}")
    print(summary_table(ctx))
    return ctx


def _change(drop: float) -> str:
    """A PSNR drop as a signed change, without a "-0.00" for a drop that rounds to nothing."""
    return f"{round(-drop, 2) + 0.0:+.2f}"


def summary_table(ctx: DemoContext) -> str:
    """What the demo found: the metrics, the audit verdict, the release or why it was refused, and
    whether the probe's worst-case perturbation transfers to the diffusion reconstructions."""
    rows: list[tuple[str, str]] = [tuple(r) for r in ctx.state.get("eval_summary", [])]  # the eval stage's rows
    try:
        audit = json.loads(Path(ctx.state["audit_report"]).read_text())
        b = audit.get("bound") or {}
        bound = (f"at {100 * b['confidence']:.4g}% confidence <= {b['upper_pct']:.2f}% copies, policy "
                 f"{100 * audit['policy']['max_copy_rate']:.4g}%; " if b else "")
        rows.append(("audit verdict", f"{audit['verdict']}  ({bound}{audit['n_copies']}/{audit['n_synthetic']} above tau, "
                                      f"null {audit['test']['null_rate_pct']:.1f}%)"))
    except (KeyError, OSError, ValueError):
        pass
    if ctx.state.get("release") is not None:
        rows.append(("release", f"{ctx.state['release']}  (DATA_CARD.md)"))
    elif ctx.state.get("release_refused"):
        rows.append(("release", "refused: " + " ".join(str(ctx.state["release_refused"]).split())))
    try:
        probe = json.loads(Path(ctx.state["probe_report"]).read_text())
        eps = max(t["eps"] for t in probe["transfer"])
        for t in probe["transfer"]:
            if t["eps"] == eps and t["method"] in ("projection", "dps"):
                ci = t.get("ci95")
                rows.append((f"probe {t['method']} R={t['acceleration']}",
                             f"PSNR {_change(t['psnr_drop_worst_case'])} dB at eps {eps:g} (random on the sampled lines: "
                             f"{_change(t['psnr_drop_random'])} dB; worst - random {t['difference']:+.2f} dB"
                             + (f", 95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") + f", n={t['n_images']}): {t['verdict']}"))
    except (KeyError, OSError, ValueError):
        pass
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(["[demo] summary", *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _stages(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    stage_list = ", ".join(name for name, _ in STAGES)
    p = sub.add_parser(
        "demo", help="run the whole flow on the built-in brain MRI cohort",
        description="Run the whole flow on the built-in brain MRI cohort (no downloads): build the cohort, train "
                    "the autoencoder and the diffusion model, sample, evaluate and audit the samples, release them with a "
                    "data card when the audit passes, and probe MRI reconstruction with a pixel prior (2D). The full 2D "
                    "demo takes about 3 minutes on 2 quiet CPU cores; --quick runs every stage at small sizes in about a minute.",
        epilog=f"stages, in flow order: {stage_list}. Each writes its own folder(s) in OUT (OUT/cohort, "
               "OUT/autoencoder, ...); OUT/demo.json records them. A whole run replaces an earlier demo in OUT; "
               "--stages re-runs only the named stages and keeps the others' outputs.")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke run of every stage")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2,
                   help="2: axial PNG slices and a 2D model (default); 3: NIfTI volumes and a 3D model (slower)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="demo folder (default runs/demo); replaced by the next demo run, which never deletes files "
                        "medgen did not write there, nor another command's output without --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder another medgen command wrote (an earlier demo needs no --overwrite)")
    p.add_argument("--stages", type=_stages, default=None, metavar="NAME[,NAME...]",
                   help=f"run only these stages of an earlier demo in --out, keeping the others' outputs ({stage_list})")
    p.set_defaults(func=lambda a: run_demo(a.out, a.quick, a.dims, a.stages, a.overwrite) and 0)
