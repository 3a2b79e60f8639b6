"""Typed run configuration: schema (dataclasses) and loader (YAML recipe + dotted overrides).

A method's own sections are in its package (``medfoundry.methods.<name>.config``); importing
:mod:`medfoundry.methods` registers them, which ``load_config`` needs to build a run of that method.
"""

from medfoundry.config.loader import ConfigError, from_dict, load_config, save_config, to_dict, to_yaml
from medfoundry.config.schema import (
    CropsConfig,
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
