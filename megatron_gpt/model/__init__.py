"""The GPT model: layer specs built from megatron-core tensor-parallel layers, canonical parameter
names (names) and sampling. No I/O, no launcher, no optimizer code."""

from megatron_gpt.model.gpt import GPT, LayerSpec, layer_specs, masked_mean, parallel_config, token_losses
from megatron_gpt.model.layers import KVCache

__all__ = ["GPT", "KVCache", "LayerSpec", "layer_specs", "masked_mean", "parallel_config", "token_losses"]
