"""Run configuration: typed schema, YAML loading with overrides, validation, derived settings.

Imports neither torch nor DeepSpeed, so the CLI starts fast.
"""

from .deepspeed import deepspeed_config
from .derive import BatchLayout, batch_layout, engine_zero_stage, padded_vocab_size, trainer_clips_gradients
from .loader import ConfigError, config_to_dict, load_config
from .schema import Config

__all__ = ["Config", "load_config", "ConfigError", "BatchLayout", "batch_layout", "deepspeed_config",
           "padded_vocab_size", "config_to_dict", "engine_zero_stage", "trainer_clips_gradients"]
