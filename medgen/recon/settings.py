"""The probe's settings, and the torch-free checks of its options (fastMRI's centre fractions, which R
an image width can reach, eps). Import-light: the CLI reads their defaults without loading torch or
deepinv; kspace.py and attack.py import the checks from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from medgen.errors import ConfigError
from medgen.versions import require_extra

METHODS = ("projection", "dps", "tv", "zero-filled", "surrogate")
WHITE_BOX = ("tv", "surrogate")  # methods attacked with their own gradients
SCALINGS = ("prior", "minmax")
MASK_KINDS = ("equispaced", "random", "equispaced-fixed")
FASTMRI_CENTER_FRACTIONS = {4: 0.08, 8: 0.04}


def center_fraction_for(acceleration: int) -> float:
    """fastMRI's centre fraction for R (0.08 at R=4, 0.04 at R=8, else 0.32 / R)."""
    return FASTMRI_CENTER_FRACTIONS.get(int(acceleration), 0.32 / float(acceleration))


def mask_lines(width: int, acceleration: int, center_fraction: float) -> tuple[int, int]:
    """(central columns, outer columns) deepinv's generators sample for this width and R."""
    n_center = int(center_fraction * width)
    return n_center, int(width // acceleration - n_center)


def check_acceleration(width: int, acceleration: int, center_fraction: float | None = None) -> None:
    """Raise ConfigError when R cannot be reached on images `width` columns wide."""
    if int(acceleration) != acceleration or acceleration < 2:
        raise ConfigError(f"acceleration must be an integer >= 2, got {acceleration}")
    cf = center_fraction_for(acceleration) if center_fraction is None else center_fraction
    n_center, n_outer = mask_lines(width, int(acceleration), cf)
    if n_center < 1 or n_outer < 1:
        raise ConfigError(
            f"acceleration R={acceleration} cannot be reached on images {width} px wide: {width}/{acceleration} gives "
            f"{width // acceleration} sampled columns, {n_center} of them central (centre fraction {cf:g}) and {n_outer} outer; "
            f"a Cartesian mask needs at least one of each. Use a smaller --acceleration or wider images")


def check_coils(coils: int) -> None:
    """Raise ConfigError when `coils` > 1 simulated coils cannot be had: their birdcage maps come from
    sigpy, the optional extra `medgen[mri]` (checked without importing it, before any work)."""
    if int(coils) > 1:
        require_extra("sigpy", f"--coils {coils} (simulated birdcage coil maps)")


def check_eps(eps: Sequence[float]) -> list[float]:
    values = [float(e) for e in eps]
    bad = [e for e in values if not 0.0 <= e < 1.0]
    if bad or not values:
        raise ConfigError(f"--eps values are relative k-space norms ||delta|| / ||k|| and must lie in [0, 1); got {bad or values}")
    return values


@dataclass
class ProbeSettings:
    """Every knob of the probe; the CLI's options map one to one."""

    accelerations: Sequence[int] = (4, 8)
    mask: str = "equispaced-fixed"  # no random offset: every seed sees the same mask
    center_fraction: float | None = None  # None: fastMRI's for each R (central lines = int(fraction * W), at least 1)
    scaling: str = "prior"  # prior: the intensities the prior was trained on, in [0, 1]; minmax: each image to [0, 1]
    full_kspace_control: bool = False  # also the older control, Gaussian on the full k-space (row "random-full")
    tv_white_box: bool = False  # also attack TV with its own gradients (backprop through every FISTA iteration: slow)
    projection_real: bool = False  # keep only the real part after each projection step (Han et al.'s code)
    noise_sigma: float = 0.0  # measurement noise, std per real/imaginary component of the measured k-space
    coils: int = 1  # 1: deepinv MRI; N > 1: MultiCoilMRI with N birdcage coils
    eps: Sequence[float] = (0.0, 0.01, 0.02, 0.04, 0.08)
    methods: Sequence[str] = METHODS
    posterior_samples: int = 4
    steps: int = 100  # posterior sampling steps (DDPM ancestral on the prior's schedule)
    dps_weight: float | str = "auto"  # deepinv DPSDataFidelity weight ("norm" guidance); "auto": chosen on clean data
    projection_lambda: float = 1.0  # Song et al. 2022's lambda (1: replace the measured lines)
    attack_steps: int = 200  # Han et al.: 2000
    attack_lr: float = 0.1
    tv_iterations: int = 200
    tv_prox_iterations: int = 20
    n_images: int = 24  # the unit of the statistics: paired differences over images
    batch_size: int = 64  # reconstructions per forward batch (memory; results agree to float rounding)
    seed: int = 0
    mask_seed: int = 0

    def validate(self, width: int | None = None) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"--scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if not float(self.noise_sigma) >= 0:
            raise ConfigError(f"--noise-sigma must be >= 0, got {self.noise_sigma}")
        if self.mask not in MASK_KINDS:
            raise ConfigError(f"--mask must be one of {', '.join(MASK_KINDS)}, got {self.mask!r}")
        self.eps = check_eps(self.eps)
        for name in ("posterior_samples", "steps", "n_images", "batch_size", "coils", "tv_iterations"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        check_coils(self.coils)
        if self.dps_weight != "auto":
            try:
                self.dps_weight = float(self.dps_weight)
            except (TypeError, ValueError):
                raise ConfigError(f"--dps-weight must be 'auto' or a number, got {self.dps_weight!r}") from None
            if self.dps_weight < 0:
                raise ConfigError(f"--dps-weight must be >= 0, got {self.dps_weight}")
        if self.attack_steps < 0:
            raise ConfigError(f"--attack-steps must be >= 0, got {self.attack_steps}")
        if not self.accelerations:
            raise ConfigError("--acceleration needs at least one value")
        if width is not None:
            for R in self.accelerations:
                check_acceleration(width, R, self.center_fraction)

