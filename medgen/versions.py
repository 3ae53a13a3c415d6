"""The software a result came from, for reports and data cards (one place, so every report says it
the same way), and the check that names the medgen extra to install when an optional package is missing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from importlib.machinery import ModuleSpec

from medgen.errors import ConfigError

CORE = ("medgen", "torch", "numpy")
# Optional packages -> the extra of pyproject.toml that installs them (`pip install 'medgen[all]'`: every extra).
EXTRAS = {"nilearn": "cohort", "sigpy": "mri"}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows: the machine line of a benchmark."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def software_versions(*packages: str) -> dict[str, str]:
    """{"python", "platform", then each of CORE + `packages`: its installed version or "not installed"}."""
    out = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for name in dict.fromkeys((*CORE, *packages)):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def require_extra(module: str, use: str) -> ModuleSpec:
    """The import spec of the optional `module` (a top-level name is found without importing it), or a
    ConfigError naming the extra that installs it: one line for the user, never an ImportError traceback."""
    package = module.split(".")[0]
    try:  # the package first: a dotted name already imported is found even when its package is hidden
        spec = importlib.util.find_spec(package) and importlib.util.find_spec(module)
    except ImportError:  # a dotted name's parent package fails to import
        spec = None
    if spec is None:
        raise ConfigError(f"{use} needs {package}, which medgen's core install leaves out: pip install 'medgen[{EXTRAS[package]}]' "
                          f"(or: pip install {package})")
    return spec
