"""Typed configuration: schema, loading from YAML + overrides, validation."""

from fedslm.config.load import load_config, to_yaml, validate
from fedslm.config.schema import (
    Config,
    DataConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    PrivacyConfig,
    TrainConfig,
)

__all__ = [
    "Config", "DataConfig", "FederationConfig", "LoraConfig", "ModelConfig", "OutputConfig",
    "PrivacyConfig", "TrainConfig", "load_config", "to_yaml", "validate",
]
