"""The GPT model: layer specs built from megatron-core tensor-parallel layers. No I/O here."""

from megatron_gpt.model.gpt import GPT, LayerSpec, layer_specs, masked_mean, parallel_config, token_losses

__all__ = ["GPT", "LayerSpec", "layer_specs", "masked_mean", "parallel_config", "token_losses"]
