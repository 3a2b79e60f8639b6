"""Typed run configuration: schema (dataclasses) and loader (YAML recipe + dotted overrides)."""

from medfoundry.config.loader import ConfigError, from_dict, load_config, save_config, to_dict, to_yaml
from medfoundry.config.schema import (
    CropsConfig,
    DinoConfig,
    DistConfig,
    HeadConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "CropsConfig",
    "DinoConfig",
    "DistConfig",
    "HeadConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
    "to_yaml",
]
