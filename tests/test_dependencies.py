"""Dependencies sized to their use (issue 23 part 6): every package medgen imports is declared,
the optional ones (nilearn for the built-in cohort, sigpy for multi-coil MRI) sit in extras, and a
missing extra is one medgen error naming `pip install 'medgen[...]'`, raised before any output or
work. Absence is simulated (sys.modules[name] = None hides an installed package from imports and
from importlib.util.find_spec); nothing is uninstalled."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from medgen.errors import ConfigError
from medgen.versions import EXTRAS

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("huggingface_hub>=0.23" -> "huggingface-hub")."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(top-level module, line) of every absolute import under `tree`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], node.lineno))
    return out


@functools.cache
def sources(*folders: str) -> dict[Path, tuple[ast.Module, list[tuple[str, int]]]]:
    """Each Python file under `folders`: its syntax tree and its imports (`_imports`)."""
    trees = {path: ast.parse(path.read_text()) for folder in folders for path in sorted((REPO / folder).rglob("*.py"))}
    return {path: (tree, _imports(tree)) for path, tree in trees.items()}


def _third_party(files: dict) -> set[str]:
    local = {path.stem for path in files}  # eval/ scripts import each other
    return {m for _, imports in files.values() for m, _ in imports if m not in sys.stdlib_module_names and m != "medgen"} - local


@functools.cache
def _distributions() -> dict[str, set[str]]:
    """Top-level module -> the normalised names of the installed distributions that provide it."""
    return {m: {_name(d) for d in ds} for m, ds in importlib.metadata.packages_distributions().items()}


def test_every_imported_package_is_declared_core_or_in_its_extra():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in PYPROJECT["optional-dependencies"].items()}
    distributions = _distributions()
    third_party = _third_party(sources("medgen"))
    assert {"huggingface_hub", "torch", "sigpy"} <= third_party  # the scan sees function-level imports
    for module in sorted(third_party):
        dists = distributions.get(module, set())
        if module in EXTRAS:
            assert dists & extras[EXTRAS[module]] and not dists & core, module
        else:
            assert dists & core, f"medgen imports {module} ({dists or 'not installed'}) but pyproject.toml does not declare it"
    # nilearn and scikit-image are out of the core install; `all` is every feature extra, `dev` includes it
    assert not {"nilearn", "sigpy", "scikit-image", "scikit-learn"} & core
    assert PYPROJECT["optional-dependencies"]["all"] == [f"medgen[{','.join(sorted(set(EXTRAS.values())))}]"]
    assert "medgen[all]" in PYPROJECT["optional-dependencies"]["dev"]
    assert "'.[all,dev]'" in (REPO / "Makefile").read_text()  # what `make test` and `make demo` install


def test_tests_and_benchmarks_import_only_declared_packages():
    """tests/, eval/ and scripts/ run in the `make install` venv: what they import beyond medgen's
    own dependencies (scikit-image's and scikit-learn's reference metrics, pytest) is in `dev`."""
    declared = {_name(r) for reqs in [PYPROJECT["dependencies"], *PYPROJECT["optional-dependencies"].values()] for r in reqs}
    distributions = _distributions()
    third_party = _third_party(sources("tests", "eval", "scripts"))
    assert {"skimage", "sklearn", "pytest"} <= third_party
    undeclared = {m: distributions.get(m, "not installed") for m in third_party if not distributions.get(m, set()) & declared}
    assert not undeclared, f"imported by tests/, eval/ or scripts/ but not in pyproject.toml: {undeclared}"


def test_optional_packages_are_imported_only_after_their_check():
    """An import of an extra's package sits in a function that first calls require_extra for it."""
    found = 0
    for path, (tree, imports) in sources("medgen").items():
        optional = [(module, line) for module, line in imports if module in EXTRAS]
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] if optional else []
        for module, line in optional:
            found += 1
            body = min((f for f in functions if f.lineno <= line <= f.end_lineno), key=lambda f: f.end_lineno - f.lineno, default=None)
            checks = [c.lineno for c in ast.walk(body) if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "require_extra"
                      and isinstance(c.args[0], ast.Constant) and c.args[0].value.split(".")[0] == module] if body else []
            assert checks and min(checks) < line, f"{path}:{line} imports {module} without require_extra before it"
    assert found >= 1


def test_template_is_read_without_importing_nilearn(monkeypatch):
    """The MNI152 files come from nilearn's folder: neither nilearn nor its scikit-learn is imported,
    and finding sigpy does not import it (numba, llvmlite). Loaded modules are hidden for the call."""
    from medgen.data.cohort import _mni152
    from medgen.versions import require_extra

    heavy = ("nilearn", "sklearn", "sigpy", "numba")
    for name in [m for m in sys.modules if m.split(".")[0] in heavy]:
        monkeypatch.delitem(sys.modules, name)
    t1, affine = _mni152("t1")
    require_extra("sigpy", "coil maps")
    assert t1.shape == (197, 233, 189) and t1.max() == 1.0 and affine[0, 0] == 1.0
    assert not [m for m in sys.modules if m.split(".")[0] in heavy]


def test_missing_cohort_extra_is_one_line_before_any_output(monkeypatch, tmp_path, capsys):
    from medgen.cli import main
    from medgen.demo import WRITER, run_demo
    from medgen.io import mark_output

    monkeypatch.setitem(sys.modules, "nilearn", None)
    assert main(["data", "synth-brain", "--out", str(tmp_path / "cohort"), "--n", "2", "--dims", "2"]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'medgen[cohort]'" in err[0] and not (tmp_path / "cohort").exists()
    demo = tmp_path / "demo"  # an earlier demo: replaced by a whole run, but only once the run can start
    (demo / "cohort").mkdir(parents=True)
    mark_output(demo, WRITER)
    with pytest.raises(ConfigError, match=re.escape("pip install 'medgen[cohort]'")):
        run_demo(demo, quick=True)
    assert (demo / "cohort").is_dir()


def test_missing_mri_extra_is_named_before_work(monkeypatch, tmp_path):
    import torch

    from medgen.recon.fastmri import estimate_coil_maps
    from medgen.recon.kspace import birdcage_maps
    from medgen.recon.settings import ProbeSettings
    from medgen.recon.surrogate import train_surrogate

    monkeypatch.setitem(sys.modules, "sigpy", None)
    ProbeSettings(coils=1).validate()  # single-coil needs no sigpy
    mri = re.escape("pip install 'medgen[mri]'")
    with pytest.raises(ConfigError, match=f"--coils 4 .*{mri}"):
        ProbeSettings(coils=4).validate()
    with pytest.raises(ConfigError, match=mri):
        birdcage_maps(4, (8, 8))
    with pytest.raises(ConfigError, match=f"ESPIRiT.*--coil-maps.*{mri}"):
        estimate_coil_maps(torch.zeros(1, 2, 4, 16, 16))
    # train-surrogate: the check comes before the data are read (a missing folder would be a DataError)
    with pytest.raises(ConfigError, match=mri):
        train_surrogate({"coils": 4, "data": {"path": str(tmp_path / "absent")}}, "cpu")
