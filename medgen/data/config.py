"""The `data:` config section: which files, and how they are preprocessed (medgen/data/preprocess.py).

One schema serves configs (YAML, overrides, `medgen config show`) and code (`DataConfig(...)`,
`DataConfig.from_any(dict_or_config)`); see medgen/config.py for how keys are declared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medgen.config import section, setting
from medgen.errors import ConfigError

INTENSITY_MODES = ("auto", "percentile", "minmax", "fixed", "ct", "zscore", "none")


@dataclass
class IntensityConfig:
    """`data.intensity`: how voxel values are mapped to [-1, 1] (or z-scored)."""

    # auto: 8/16-bit files by their dtype range, float files as percentile; ct: HU window; fixed: in_range
    mode: str = setting("auto", choices=INTENSITY_MODES)
    lower: float = setting(0.5, ge=0, le=100)  # percentile mode: this percentile maps to -1
    upper: float = setting(99.5, ge=0, le=100)  # percentile mode: this percentile maps to 1
    window: list[float] | None = setting(None, length=2)  # ct mode: [low, high] in HU, e.g. [-1000, 1000]
    in_range: list[float] | None = setting(None, length=2)  # fixed mode: [low, high] source values, e.g. [0, 255]


@dataclass
class SplitConfig:
    """`data.split`: subject-level train / val / holdout fractions (saved as split.json)."""

    val: float = setting(0.1, ge=0, lt=1)  # fraction of subjects for validation
    holdout: float = setting(0.1, ge=0, lt=1)  # fraction of subjects never trained on (privacy audit, eval)
    seed: int = setting(0, ge=0)  # the split depends only on the subject ids and this seed


@dataclass
class DataConfig:
    """`data:`: the dataset and its preprocessing. Order: canonical orientation (3D) -> spacing ->
    crop/pad or resize to `shape` -> channels -> intensity."""

    path: str | None = setting(None, exists=True)  # dataset folder or manifest.csv
    spatial_dims: int | None = setting(None, choices=(2, 3))  # null: from the first file
    channels: int | None = setting(None, choices=(1, 3))  # RGB <-> gray converted; null: keep
    shape: list[int] | None = setting(None, ge=1)  # target size per spatial axis; null: keep (all files must agree)
    resize: bool = False  # true: resize to shape (whole field of view; not with spacing); false: centre crop/pad
    spacing: list[float] | None = setting(None, gt=0)  # resample to this voxel size in mm first; null: keep
    canonical: bool = True  # reorient 3D volumes to RAS+
    intensity: IntensityConfig = section(IntensityConfig)
    split: SplitConfig = section(SplitConfig)
    on_bad_file: str = setting("error", choices=("error", "skip"))  # skip: log unreadable files and go on
    cache: bool = False  # keep preprocessed images in memory after the first read (small datasets)
    num_workers: int = setting(0, ge=0)  # DataLoader worker processes

    def __post_init__(self) -> None:
        # code may pass the nested sections as dicts: DataConfig(intensity={"mode": "zscore"})
        if isinstance(self.intensity, dict):
            self.intensity = IntensityConfig(**self.intensity)
        if isinstance(self.split, dict):
            self.split = SplitConfig(**self.split)

    @classmethod
    def from_any(cls, cfg: Any) -> DataConfig:
        """A checked DataConfig from a dict, a `data:` DictConfig or a DataConfig.

        Unknown keys and bad values raise `ConfigError` naming `data.<key>`, as for a YAML file.
        """
        if isinstance(cfg, DataConfig):
            return cfg
        from omegaconf import OmegaConf

        from medgen.config import merge_config, to_dict

        raw = to_dict(cfg) if cfg is not None else {}
        if not isinstance(raw, dict):
            raise ConfigError(f"data: expected a section of keys, got {raw!r}")
        return OmegaConf.to_object(merge_config(_DataOnly, [({"data": raw}, "")]).data)

    def validate(self) -> None:
        """Rules between keys (types and ranges are checked by the schema)."""
        mode = self.intensity.mode
        if mode == "ct" and not self.intensity.window:
            raise ConfigError("data.intensity.mode=ct needs data.intensity.window: [low, high] in HU, e.g. [-1000, 1000]")
        if mode == "fixed" and not self.intensity.in_range:
            raise ConfigError("data.intensity.mode=fixed needs data.intensity.in_range: [low, high], e.g. [0, 255]")
        for name in ("shape", "spacing"):
            value = getattr(self, name)
            if value is not None and self.spatial_dims is not None and len(value) != self.spatial_dims:
                raise ConfigError(f"data.{name}={list(value)} has {len(value)} entries but data.spatial_dims={self.spatial_dims}")
            if value is not None and len(value) not in (2, 3):
                raise ConfigError(f"data.{name}={list(value)}: expected 2 (images) or 3 (volumes) entries")
        if self.resize and self.shape is None:
            raise ConfigError("data.resize=true needs data.shape, the size to resize to")
        if self.resize and self.spacing is not None:
            raise ConfigError(f"data.resize=true resizes to data.shape whatever the voxel size, so data.spacing="
                              f"{list(self.spacing)} would be lost; set data.spacing=null or data.resize=false")
        if self.split.val + self.split.holdout >= 1:
            raise ConfigError(f"data.split: val={self.split.val} + holdout={self.split.holdout} must stay below 1")


@dataclass
class _DataOnly:
    """A schema with only the data section, to check a data dict alone."""

    data: DataConfig = section(DataConfig)
