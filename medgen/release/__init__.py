"""Release: a synthetic dataset that leaves only when its audit passes, with its data card.
Import-light: submodules (and torch) load on first attribute access.

    from medgen.release import make_release, ReleasePolicy
    card = make_release("runs/ldm2d", "release/", n=1000)     # raises ReleaseRefused when refused
"""

from __future__ import annotations

from medgen.lazy import lazy_getattr

_EXPORTS = {
    "make_release": "medgen.release.pipeline",
    "ReleasePolicy": "medgen.release.pipeline",
    "training_sets": "medgen.release.pipeline",
    "build_card": "medgen.release.card",
    "card_markdown": "medgen.release.card",
    "find_leaks": "medgen.release.card",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
