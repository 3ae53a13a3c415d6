"""The utility table of eval/RESULTS.md: train on synthetic, test on real, on the demo's model.

    python -m medgen demo --quick --out runs/demo               # or a whole demo, or --dims 3
    python eval/utility_table.py --demo runs/demo --out runs/utility_table

Reads the demo's folder (demo.json: the cohort, the diffusion run and its samples, sampled with
`--label all`), takes the run's split (training subjects; held-out and validation subjects as the
test set, as the demo's eval stage does) and runs `medgen.metrics.utility.synthetic_utility` with
its fixed recipe (three classifier seeds) on
- the model's samples: TSTR, TRTR and mixed;
- a real twin (control): as many new real subjects (the cohort generator with another seed) in the
  samples' place, which should score like TRTR;
- shuffled labels (control): the model's samples with labels independent of the images (in each
  class, half relabelled 0 and half 1), which should score at chance.
Every call trains the same TRTR classifiers on the same images (deterministic on a CPU). Prints
the markdown table and writes OUT/utility.json (every result in full).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_sets(demo: Path) -> tuple[Path, list, list, Path, dict]:
    """(samples folder, training subjects, unseen subjects, cohort folder, demo.json) of a demo folder."""
    from medgen.data import load_split, scan_dataset

    summary = json.loads((demo / "demo.json").read_text())
    state = summary["state"]
    split = load_split(Path(state["diffusion_run"]) / "split.json")
    trained, unseen = set(split["train"]), set(split["holdout"] + split["val"])
    samples = scan_dataset(summary["cohort"])
    return (Path(state["samples"]), [s for s in samples if s.subject_id in trained], [s for s in samples if s.subject_id in unseen],
            Path(summary["cohort"]), summary)


def real_twin(cohort: Path, n: int, out: Path) -> list:
    """`n` new subjects of the cohort generator (seed 1, the demo's size and dims): real images no
    model or classifier saw, with their labels."""
    from medgen.data import load, scan_dataset
    from medgen.data.cohort import synth_brain

    first = scan_dataset(cohort)[0]
    shape = load(first.path).shape
    dims = 2 if first.path.suffix == ".png" else 3
    folder = out / "twin"
    if not (folder / "manifest.csv").is_file():
        synth_brain(folder, n=n, dims=dims, size=shape[-1], seed=1)
    return scan_dataset(folder)


def shuffled(samples: list, seed: int = 0) -> list:
    """The samples with labels independent of the images: in each true class, a random half
    relabelled 0 and the rest 1."""
    from medgen.data import Sample

    truth = np.array([s.label for s in samples])
    labels = np.zeros_like(truth)
    rng = np.random.default_rng(seed)
    for c in np.unique(truth):
        members = rng.permutation(np.flatnonzero(truth == c))
        labels[members[: len(members) // 2]] = 1
    return [Sample(s.path, int(y), str(int(y)), s.subject_id) for s, y in zip(samples, labels)]


def _cell(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: list[tuple[str, dict, str]]) -> list[str]:
    """Markdown rows: (what the classifier trained on, its result, setting key)."""
    lines = ["| trained on | n train | AUROC [95% CI] | balanced accuracy [95% CI] | AUROC seed sd | AUROC - TRTR [95% CI] |",
             "|---|---|---|---|---|---|"]
    for label, result, key in rows:
        r = result["settings"][key]
        d = result["difference_to_trtr"].get(key)
        lines.append(f"| {label} | {r['n_train']} | {_cell(r['auroc'])} | {_cell(r['balanced_accuracy'])} | "
                     f"{r['auroc']['seed_sd']:.3f} | {_cell(d['auroc']) if d else '-'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a `medgen demo` folder (its samples labelled)")
    ap.add_argument("--out", type=Path, default=Path("runs/utility_table"))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    import torch

    from medgen.data import scan_dataset
    from medgen.metrics.utility import synthetic_utility

    args.out.mkdir(parents=True, exist_ok=True)
    samples, train, test, cohort, summary = demo_sets(args.demo)
    start = time.perf_counter()
    results = {
        "model": synthetic_utility(samples, train, test, mixed=True, device=args.device),
        "twin": synthetic_utility(real_twin(cohort, len(train), args.out), train, test, device=args.device),
        "shuffled": synthetic_utility(shuffled(scan_dataset(samples)), train, test, device=args.device),
    }
    seconds = round(time.perf_counter() - start, 1)
    trtr = {name: r["settings"]["trtr"]["auroc"]["seeds"] for name, r in results.items()}
    model = results["model"]
    rows = [("real training subjects (TRTR)", model, "trtr"), ("the model's samples (TSTR)", model, "tstr"),
            ("real + samples (mixed)", model, "mixed"), ("control: new real subjects (real twin)", results["twin"], "tstr"),
            ("control: samples, shuffled labels", results["shuffled"], "tstr")]
    dims = "3D" if summary["dims"] == 3 else "2D"
    t, recipe = model["test"], model["recipe"]
    print(f"{dims} demo{' --quick' if summary['quick'] else ''}: images {recipe['image_shape']}, test {t['n']} unseen subjects "
          f"({', '.join(f'{k}: {v}' for k, v in t['classes'].items())}), {len(recipe['seeds'])} classifier seeds x "
          f"{recipe['steps']} steps; torch {torch.__version__}, {torch.get_num_threads()} thread(s), {seconds} s")
    print("\n".join(table(rows)))
    print(f"TRTR AUROC per seed in each call (identical when deterministic): {trtr}")
    (args.out / "utility.json").write_text(json.dumps({"demo": str(args.demo), "seconds": seconds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
