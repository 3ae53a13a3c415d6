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

from medgen.errors import RunError

MARKER = ".medgen-demo"

# (name, "module:function") in flow order; a stage's module is imported only when it runs.
STAGES: list[tuple[str, str]] = [
    ("cohort", "medgen.demo:cohort_stage"),
    ("autoencoder", "medgen.train.autoencoder:demo_stage"),
    ("diffusion", "medgen.train.diffusion:demo_stage"),
    ("eval", "medgen.metrics.commands:demo_stage"),
    ("audit", "medgen.privacy.commands:demo_stage"),
    ("probe", "medgen.recon.commands:demo_stage"),
]


@dataclass
class DemoContext:
    out: Path
    quick: bool
    dims: int
    cohort: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def cohort_settings(self) -> dict[str, int]:
        if self.dims == 2:
            return {"n": 24, "size": 32} if self.quick else {"n": 200, "size": 64}
        return {"n": 16, "size": 16} if self.quick else {"n": 80, "size": 32}


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


def run_demo(out: Path, quick: bool = False, dims: int = 2, stages: list[str] | None = None) -> DemoContext:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise RunError(f"{out} exists and is not a medgen demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("created by medgen demo; the next demo run replaces this folder\n")
    ctx = DemoContext(out=out, quick=quick, dims=dims)
    timings = {}
    for name, target in STAGES:
        if stages and name not in stages:
            continue
        print(f"[demo] {name}")
        start = time.perf_counter()
        _resolve(target)(ctx)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[demo] {name} done in {timings[name]} s")
    summary = {"quick": quick, "dims": dims, "stage_seconds": timings, "state": {k: str(v) if isinstance(v, Path) else v for k, v in ctx.state.items()}}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"[demo] finished: {out}")
    return ctx


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole flow on the built-in brain MRI cohort")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in about a minute a stage")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run (in flow order)")
    p.set_defaults(func=lambda a: run_demo(a.out, a.quick, a.dims, a.stages.split(",") if a.stages else None) and 0)
