"""Typed run configuration: YAML file + ``--set key=value`` overrides, validated before any replica starts.

Every mistake becomes one ``UserError`` line naming the key and what is valid
(unknown keys get a did-you-mean), so a week-long job never dies at step 0 on a typo.

schema.py  the sections as dataclasses, their defaults and CHOICES
load.py    YAML + overrides -> Config (named configs ship in moco_xla/configs/)
checks.py  validation, alone and against the replica count
"""
from __future__ import annotations

from .checks import distill_checks, labelprop_checks, probe_checks, select_checks, v3_checks, validate, validate_world
from .load import CONFIG_DIR, DEFAULT_CONFIG, apply_override, config_path, from_dict, load_config, save_config
from .schema import (CHOICES, CheckpointConfig, Config, DataConfig, DistillConfig, EvalConfig, LabelPropConfig,
                     MocoConfig, ModelConfig, ProbeConfig, SelectConfig, SemisupConfig, TrainConfig)

__all__ = ["CHOICES", "CONFIG_DIR", "DEFAULT_CONFIG", "CheckpointConfig", "Config", "DataConfig", "DistillConfig",
           "EvalConfig", "LabelPropConfig", "MocoConfig", "ModelConfig", "ProbeConfig", "SelectConfig", "SemisupConfig",
           "TrainConfig", "apply_override", "config_path", "distill_checks", "from_dict", "labelprop_checks",
           "load_config", "probe_checks", "save_config", "select_checks", "v3_checks", "validate", "validate_world"]
