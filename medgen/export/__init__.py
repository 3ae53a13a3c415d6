"""Export: a trained diffusion run as one folder medgen, diffusers and MONAI load, with a model card.
Import-light: submodules (and torch) load on first attribute access.

    import medgen
    from medgen.export import export_model
    manifest = export_model("runs/ldm2d", "export/ldm2d", license="cc-by-nc-4.0")
    pipe = medgen.load_pipeline("export/ldm2d")      # samples what the run samples
"""

from __future__ import annotations

from medgen.lazy import lazy_getattr

_EXPORTS = {
    "export_model": "medgen.export.pipeline",
    "convert_unet": "medgen.export.diffusers_unet",
    "write_bundle": "medgen.export.monai_bundle",
    "model_card": "medgen.export.card",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
