"""The GPT: an ordered list of layer specs, built into one module (pipeline=1) or into
DeepSpeed pipeline stages (pipeline>1) from the same list.

    tokens [b, s] -> Embedding -> Block x num_layers -> FinalNorm -> output logits [b, s, vocab/tp]

Each spec is built under its own seed (derived from the run seed and the spec's position), so a
layer's initial weights do not depend on which other layers this rank builds (pipeline stages)
nor on the tensor-parallel size (megatron-core initializes the full tensor, then slices it).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from megatron_gpt.config.schema import ModelConfig
from megatron_gpt.model.layers import (Block, ColumnLinear, KVCache, make_dropout, make_norm, normal_init,
                                       split_positions)
from megatron_gpt.model.sequence_parallel import from_sequence_parallel, to_sequence_parallel
from megatron_gpt.model.names import BLOCK, EMBEDDING, FINAL_NORM, OUTPUT, canonical_prefix, spec_order


def parallel_config(tensor: int = 1, pipeline: int = 1, dtype: torch.dtype = torch.float32,
                    sequence_parallel: bool = False) -> ModelParallelConfig:
    """megatron-core layer settings: CPU initialization makes weights independent of tp."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
        use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype, sequence_parallel=sequence_parallel,
    )


def padding_mask(vocab_limit: int | None, start: int, local: int) -> torch.Tensor | None:
    """Which of this rank's `local` output columns, from global id `start`, are vocabulary padding
    (ids >= vocab_limit, the tokenizer's size); None when there is none to hide."""
    if vocab_limit is None or start + local <= vocab_limit:
        return None
    return torch.arange(start, start + local) >= vocab_limit


def hide_padding(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits of padding ids at -inf: their embedding rows (zero in an import) must not take
    probability from real tokens (a GPT-2's logits are far below 0), in the loss as in sampling."""
    if mask is None:
        return logits
    return logits.masked_fill(mask, float("-inf"))


class Embedding(nn.Module):
    """Vocab-parallel token embedding plus optional learned positions; `logits` reuses the
    token table as the output layer when embeddings are tied (padding ids hidden, see hide_padding)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, parallel: ModelParallelConfig,
                 vocab_limit: int | None = None):
        super().__init__()
        self.word = tensor_parallel.VocabParallelEmbedding(
            vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std), config=parallel)
        self.register_buffer("padding", padding_mask(vocab_limit, self.word.vocab_start_index,
                                                     self.word.num_embeddings_per_partition), persistent=False)
        self.position = nn.Embedding(cfg.seq_length, cfg.hidden_size) if cfg.position_embedding == "learned" else None
        if self.position is not None:
            normal_init(cfg.init_std)(self.position.weight)
        self.sequence_parallel = parallel.sequence_parallel
        self.dropout = make_dropout(cfg.dropout, self.sequence_parallel)

    def forward(self, inputs, cache: KVCache | None = None):
        """tokens [b, s] -> hidden [b, s, h]; (tokens, positions) -> (hidden, positions), positions
        restarting per packed document (see layers.split_positions). Under sequence parallelism
        hidden is this rank's [s/tp, b, h]: split after the positions are added, so the position
        table stays outside the split region and its gradient arrives whole."""
        tokens, positions = split_positions(inputs)
        hidden = self.word(tokens)  # [b, s, h]
        if self.position is not None:
            if positions is None:
                offset = cache.length if cache is not None else 0
                hidden = hidden + self.position(torch.arange(offset, offset + tokens.shape[1], device=tokens.device))
            else:
                hidden = hidden + self.position(positions)
        if self.sequence_parallel:
            hidden = to_sequence_parallel(hidden)
        hidden = self.dropout(hidden)
        return hidden if positions is None else (hidden, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.word.tp_group.size() > 1:  # an identity at tp=1: skip its autograd Function
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        return hide_padding(F.linear(hidden, self.word.weight), self.padding)  # [b, s, vocab/tp]


class FinalNorm(nn.Module):
    """The last norm; under sequence parallelism it normalizes this rank's slice of the sequence,
    then gathers the whole batch-first [b, s, h] for the output layer."""

    def __init__(self, cfg: ModelConfig, parallel: ModelParallelConfig):
        super().__init__()
        self.sequence_parallel = parallel.sequence_parallel
        self.norm = make_norm(cfg, self.sequence_parallel)

    def forward(self, inputs) -> torch.Tensor:
        hidden = self.norm(split_positions(inputs)[0])  # positions end here: the output layer needs none
        return from_sequence_parallel(hidden) if self.sequence_parallel else hidden


class OutputLayer(nn.Module):
    """Untied, column-parallel output layer: each tensor rank produces its slice of the vocab."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, parallel: ModelParallelConfig,
                 vocab_limit: int | None = None):
        super().__init__()
        whole = replace(parallel, sequence_parallel=False)  # FinalNorm gathered the sequence already
        self.linear = ColumnLinear(
            cfg.hidden_size, vocab_size, config=whole, init_method=normal_init(cfg.init_std),
            bias=False, gather_output=False)
        local = self.linear.output_size_per_partition
        self.register_buffer("padding", padding_mask(vocab_limit, local * parallel_state.get_tensor_model_parallel_rank(),
                                                     local), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.linear(hidden)
        return hide_padding(logits, self.padding)


@dataclass(frozen=True)
class LayerSpec:
    """How to build one position of the layer list: a class, its arguments, and, for tied
    layers, the key shared by every position that uses the same module and the method to call."""

    cls: type[nn.Module]
    args: tuple[Any, ...] = ()
    tie_key: str | None = None
    method: str = "forward"
    kwargs: dict[str, Any] = field(default_factory=dict)


def layer_specs(cfg: ModelConfig, vocab_size: int, parallel: ModelParallelConfig,
                vocab_limit: int | None = None) -> list[LayerSpec]:
    """The spec order (model.names.spec_order) with each slot's class and arguments; `vocab_limit`
    (the tokenizer's vocabulary) hides the logits of the padding ids above it."""
    built = {EMBEDDING: (Embedding, (cfg, vocab_size, parallel, vocab_limit)), BLOCK: (Block, (cfg, parallel)),
             FINAL_NORM: (FinalNorm, (cfg, parallel)),
             OUTPUT: (OutputLayer, (cfg, vocab_size, parallel, vocab_limit))}
    return [LayerSpec(*built[slot.kind], tie_key=slot.tie_key, method=slot.method) for slot in spec_order(cfg)]


def spec_seed(seed: int, position: int) -> int:
    """The seed a layer at `position` of the spec list is initialized with."""
    return seed * 1000 + position


@contextmanager
def seeded(seed: int):
    """Run a block under a fixed seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_layer(spec: LayerSpec, seed: int, position: int) -> nn.Module:
    with seeded(spec_seed(seed, position)):
        return spec.cls(*spec.args, **spec.kwargs)


class GPT(nn.Module):
    """The whole model on one pipeline stage: layers applied in spec order."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, parallel: ModelParallelConfig, seed: int = 0,
                 vocab_limit: int | None = None):
        super().__init__()
        self.specs = layer_specs(cfg, vocab_size, parallel, vocab_limit)
        built: dict[str, nn.Module] = {}
        layers = []
        for position, spec in enumerate(self.specs):
            if spec.tie_key is not None and spec.tie_key in built:
                layers.append(built[spec.tie_key])  # same module object: a shared weight
                continue
            layers.append(build_layer(spec, seed, position))
            if spec.tie_key is not None:
                built[spec.tie_key] = layers[-1]
        # Register each distinct module once so the state dict has no duplicate names.
        self.layers = nn.ModuleList(dict.fromkeys(layers))
        self._calls = [(layers[i], spec.method) for i, spec in enumerate(self.specs)]
        self.vocab_size = vocab_size
        # Set from outside (training.recompute): callables that replace the layer calls of a
        # forward without a cache, e.g. blocks grouped into recomputed chunks.
        self.runs: list | None = None

    def canonical_names(self) -> dict[str, str]:
        """Parameter name -> layout-independent name (model.names.canonical_prefix of the first
        position that uses each module)."""
        names = {}
        for index, module in enumerate(self.layers):
            position = next(p for p, (m, _) in enumerate(self._calls) if m is module)
            prefix = canonical_prefix(position, self.specs[position].tie_key)
            names.update({f"layers.{index}.{name}": f"{prefix}.{name}" for name, _ in module.named_parameters()})
        return names

    def forward(self, tokens, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [b, s, vocab/tp]; with a cache, `tokens` continue the cached positions.
        `tokens` may be (tokens, positions) for packed documents that attend only within
        themselves (data.document_masking)."""
        hidden = tokens
        if cache is None and self.runs is not None:
            for run in self.runs:
                hidden = run(hidden)
            return hidden
        for module, method in self._calls:
            if cache is not None and method == "forward" and isinstance(module, (Embedding, Block)):
                hidden = module(hidden, cache)
            else:
                hidden = getattr(module, method)(hidden)
        if cache is not None:
            cache.length += split_positions(tokens)[0].shape[1]
        return hidden


def token_losses(logits: torch.Tensor, labels: torch.Tensor, tensor_parallel_size: int) -> torch.Tensor:
    """Per-token cross entropy [b, s] from vocab-parallel logits [b, s, vocab/tp]."""
    if tensor_parallel_size == 1:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


def masked_mean(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1)
