"""MRI reconstruction probe (Han et al. 2024): k-space operators and masks (deepinv), a medgen
pixel-space prior as a deepinv denoiser, diffusion posterior sampling (projection, DPS), baselines
(zero-filled, TV-CS, a supervised surrogate), worst-case k-space perturbations, report.
Import-light: submodules (and torch, deepinv) load on first attribute access.

    from medgen.recon import run_probe
    report = run_probe("runs/dm2d", "data/brain2d", "probe/", surrogate="runs/surrogate")
"""

from __future__ import annotations

from medgen.lazy import lazy_getattr

_EXPORTS = {
    "run_probe": "medgen.recon.probe",
    "PixelPrior": "medgen.recon.prior",
    "MedgenDenoiser": "medgen.recon.prior",
    "DiscreteScheduleSDE": "medgen.recon.prior",
    "kspace_mask": "medgen.recon.kspace",
    "mri_physics": "medgen.recon.kspace",
    "projection_reconstruct": "medgen.recon.sampling",
    "dps_reconstruct": "medgen.recon.sampling",
    "tv_reconstruct": "medgen.recon.baselines",
    "train_surrogate": "medgen.recon.surrogate",
    "load_surrogate": "medgen.recon.surrogate",
    "worst_case_perturbation": "medgen.recon.attack",
    "random_perturbation": "medgen.recon.attack",
    "random_measured_perturbation": "medgen.recon.attack",
    "read_kspace": "medgen.recon.fastmri",
    "write_fastmri_h5": "medgen.recon.fastmri",
    "estimate_coil_maps": "medgen.recon.fastmri",
    "recon_metrics": "medgen.recon.metrics",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
