"""YAML configs with dotted command-line overrides (`train.lr=1e-4`).

The resolved config is saved into every run directory as `config.yaml`, so a run can be
rebuilt from its folder alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medgen.errors import ConfigError
from medgen.io import atomic_write_text


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), defaults: dict | None = None) -> DictConfig:
    """Merge `defaults` <- YAML file <- `key.sub=value` overrides; return a resolved DictConfig."""
    cfg = OmegaConf.create(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except (OmegaConfBaseException, ValueError) as e:  # yaml errors are ValueError subclasses here
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        except Exception as e:  # yaml.YAMLError
            raise ConfigError(f"config file {path} could not be parsed: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"could not apply overrides {list(overrides)}: {e}") from None
    return cfg


def save_config(cfg: DictConfig | dict, path: str | os.PathLike) -> None:
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def to_dict(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def select(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """`cfg.a.b` with a default when any part is missing."""
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value
