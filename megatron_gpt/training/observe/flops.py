"""Model FLOPs counted from the model's shape (attention included) and MFU.

Convention (Megatron's): a training step costs 3x the forward FLOPs (backward = 2x forward),
matmuls count 2 FLOPs per multiply-add, attention scores and the value product count the full
sequence (no causal halving), and the output layer uses the padded vocabulary."""

from __future__ import annotations

import torch

from megatron_gpt.config.schema import ModelConfig
from megatron_gpt.model.layers import ffn_size

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name substring; fp32 has no default.
PEAK_TFLOPS_16BIT = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                     "L4": 121.0, "V100": 125.0, "A6000": 155.0}


def forward_flops_per_token(model: ModelConfig, vocab_size: int) -> float:
    h, heads = model.hidden_size, model.num_attention_heads
    head_dim = h // heads
    kv_heads = model.num_kv_heads or heads
    seq = model.seq_length
    qkv = 2 * h * (heads + 2 * kv_heads) * head_dim
    attention = 2 * 2 * seq * heads * head_dim  # scores and weighted values
    output = 2 * heads * head_dim * h
    mlp = 2 * h * ffn_size(model) * (3 if model.activation == "swiglu" else 2)
    return model.num_layers * (qkv + attention + output + mlp) + 2 * h * vocab_size


def training_flops_per_token(model: ModelConfig, vocab_size: int) -> float:
    return 3 * forward_flops_per_token(model, vocab_size)


def peak_flops(configured_tflops: float | None, device: torch.device, precision: str) -> float | None:
    """Per-device peak FLOP/s for MFU: the configured value, else a known GPU's 16-bit peak."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS_16BIT.items() if key in name), None)
