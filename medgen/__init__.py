"""medgen: generative medical imaging (train, sample, evaluate, audit, release).

Kept import-light: heavy modules load on first attribute access.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": ("medgen.sample.pipeline", "load_pipeline"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'medgen' has no attribute {name!r}")
