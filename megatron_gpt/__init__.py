"""megatron-gpt: distributed GPT training (tensor/pipeline/data parallel, ZeRO) from YAML configs."""

__version__ = "0.1.0"
