"""medgen: generative medical imaging (train, sample, evaluate, audit).

Kept import-light: heavy modules load on first attribute access.
"""

__version__ = "0.1.0"

from medgen.lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__, {"load_pipeline": "medgen.sample.pipeline"})
