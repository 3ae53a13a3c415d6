"""The software a result came from, for reports and data cards (one place, so every report says it
the same way)."""

from __future__ import annotations

import importlib.metadata
import platform

CORE = ("medgen", "torch", "numpy")


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
