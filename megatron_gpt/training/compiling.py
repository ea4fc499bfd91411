"""training.compile: torch.compile applied per transformer block from outside the model code, as
torchtitan does. Each Block's forward is replaced on the instance by a compiled one (GPT calls
`block.forward` itself, so nn.Module.compile, which wraps __call__, would never run): parameter
names, the state dict, the checkpoint code and DeepSpeed's module hooks stay as they are. The
embedding, final norm and output layer (vocabulary-parallel, megatron-core's collectives) stay
eager, and so does a block called with a KV cache (sampling: one shape per generated token).
Layouts a compiled block cannot serve are refused by the config checks (config/checks.py)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from megatron_gpt.model.layers import Block


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer Block of `model` (a GPT or a pipeline stage) with inductor; the
    first training and the first evaluation call compile (the warm-up), later ones run the compiled
    code. The blocks share one graph (dynamo lifts their parameters to inputs). Returns the count."""
    # rotary's tables are an lru_cache'd pure function of shapes: tracing through the cache is right
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.forward = _compiled_forward(block.forward)
    return len(blocks)


def _compiled_forward(eager):
    compiled = torch.compile(eager, backend="inductor", dynamic=False)

    def forward(inputs, cache=None):
        return compiled(inputs) if cache is None else eager(inputs, cache)

    forward.compiled = compiled
    return forward


def compiled_blocks(model: nn.Module) -> int:
    """How many transformer blocks of `model` run compiled."""
    return sum(hasattr(m.forward, "compiled") for m in model.modules() if isinstance(m, Block))
