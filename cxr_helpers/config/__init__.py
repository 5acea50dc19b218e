"""Settings: how a setting is declared, the stage dataclasses built from them, presets, and the CLI flags generated
from them. Imports no numpy or torch: the install cell's `check-gpu` reads it before torch is fixed."""

from .presets import PRESET_CHOICES, get_preset
from .stages import (STAGE_CONFIGS, EvalConfig, PrepareConfig, SampleConfig, SynthConfig, SynthesizeConfig,
                     TinyModelConfig, TrainConfig, config_to_dict, load_config, output_identity, save_config,
                     stage_config)

__all__ = ["PRESET_CHOICES", "get_preset", "STAGE_CONFIGS", "EvalConfig", "PrepareConfig", "SampleConfig",
           "SynthConfig", "SynthesizeConfig", "TinyModelConfig", "TrainConfig", "config_to_dict", "load_config",
           "output_identity", "save_config", "stage_config"]
