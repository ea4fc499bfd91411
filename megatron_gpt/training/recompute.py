"""Activation recompute, applied to a built model from the outside (as torchtitan does): the
model code knows nothing of it.

- full: consecutive transformer blocks are grouped into chunks of `model.recompute_num_layers`
  (Megatron's uniform method, counted from the first block of each pipeline stage); autograd keeps
  only each chunk's input, and the chunk's forward reruns during its backward.
- selective: only the attention core (scores, softmax, dropout: Attention._attend) is rerun;
  everything else is stored as without recompute.

Both use torch.utils.checkpoint (non-reentrant, preserve_rng_state=True): the rerun draws the
same dropout masks as the first forward, so gradients equal the stored run's. Under no_grad
(validation, generation) nothing is checkpointed.

COUNTS tallies, per process, how many chunks/cores were checkpointed and how many reran: the
layout harness records it to prove that a recompute setting really took effect.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_gpt.config.schema import ModelConfig
from megatron_gpt.model.layers import Attention, Block

BLOCKS, CORE = "block chunk", "attention core"
COUNTS: Counter = Counter()  # "<kind> checkpointed" / "<kind> recomputed" -> calls in this process


def checkpointed(fn: Callable, kind: str) -> Callable:
    """`fn` run under torch.utils.checkpoint when autograd records; counted in COUNTS."""

    def run(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        first = [True]

        def body(*inner):
            if first[0]:
                first[0] = False
            else:  # the call from the backward pass
                COUNTS[f"{kind} recomputed"] += 1
            return fn(*inner)

        COUNTS[f"{kind} checkpointed"] += 1
        return checkpoint(body, *args, use_reentrant=False, preserve_rng_state=True)

    return run


def _sequence(funcs: Sequence[Callable]) -> Callable:
    def run(inputs):
        for func in funcs:
            inputs = func(inputs)
        return inputs

    return run


def block_chunks(funcs: Sequence[Callable], is_block: Sequence[bool], per_chunk: int) -> list[Callable]:
    """`funcs` (one stage's layer calls in order) with each run of up to `per_chunk` consecutive
    blocks replaced by one checkpointed call; other layers (embedding, norms, output) stay stored."""
    runs: list[Callable] = []
    index = 0
    while index < len(funcs):
        if not is_block[index]:
            runs.append(funcs[index])
            index += 1
            continue
        end = index
        while end < len(funcs) and is_block[end] and end - index < per_chunk:
            end += 1
        runs.append(checkpointed(_sequence(funcs[index:end]), BLOCKS))
        index = end
    return runs


def recompute_attention_cores(model: nn.Module) -> None:
    """selective: every attention core of `model` reruns in the backward pass."""
    for module in model.modules():
        if isinstance(module, Attention):
            # The instance attribute shadows the method: Attention.forward calls self._attend.
            module._attend = checkpointed(module._attend, CORE)


def apply_recompute(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Apply model.recompute to a GPT (pipeline=1; a PipelineModule is built as
    pipeline_module_class(cfg) instead, which chunks its own stage)."""
    if cfg.recompute == "selective":
        recompute_attention_cores(model)
    elif cfg.recompute == "full" and hasattr(model, "_calls"):
        funcs = [getattr(module, method) for module, method in model._calls]
        model.runs = block_chunks(funcs, [isinstance(module, Block) for module, _ in model._calls],
                                  cfg.recompute_num_layers)
    return model


def pipeline_module_class(cfg: ModelConfig):
    """DeepSpeed's PipelineModule, or for recompute=full a subclass whose forward runs its stage's
    blocks in checkpointed chunks. DeepSpeed's own activation_checkpoint_interval counts every
    layer of the stage (embedding, final norm and output included), so its chunks would not hold
    recompute_num_layers blocks each."""
    from deepspeed.pipe import PipelineModule

    if cfg.recompute != "full":
        return PipelineModule
    per_chunk = cfg.recompute_num_layers

    class ChunkedPipelineModule(PipelineModule):
        _runs: list[Callable] | None = None

        def forward(self, forward_input):
            if self._runs is None:
                self._runs = block_chunks(self.forward_funcs, [isinstance(f, Block) for f in self.forward_funcs],
                                          per_chunk)
            for run in self._runs:
                forward_input = run(forward_input)
            return forward_input

    return ChunkedPipelineModule
