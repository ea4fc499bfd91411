"""Parallelism applied from the outside: the same layer specs become one module (pipeline=1)
or DeepSpeed pipeline stages (pipeline>1), then a DeepSpeed engine with ZeRO wraps them."""

from __future__ import annotations

import torch
from torch import nn

from megatron_gpt.config import deepspeed_config
from megatron_gpt.config.schema import Config
from megatron_gpt.parallel.groups import Topology
from megatron_gpt.parallel.mpu import DeepSpeedMPU
from megatron_gpt.model import GPT, layer_specs, masked_mean, parallel_config, token_losses
from megatron_gpt.training.compiling import compile_blocks
from megatron_gpt.training.recompute import apply_recompute, pipeline_module_class
from megatron_gpt.training.schedule import lr_multiplier

PARTITION_METHODS = {"parameters": "parameters", "uniform": "uniform", "layers": "type:Block"}


class PipelineLoss:
    """loss_fn of the pipeline's last stage: labels arrive as (labels, loss_mask). The mean over
    the micro-batch's tokens for training; `summed` gives summed nats (validation needs totals)."""

    def __init__(self, tensor_parallel_size: int, summed: bool = False):
        self.tensor_parallel_size = tensor_parallel_size
        self.summed = summed

    def __call__(self, logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, loss_mask = target
        losses = token_losses(logits, labels, self.tensor_parallel_size)
        return (losses * loss_mask).sum() if self.summed else masked_mean(losses, loss_mask)


def _seeded_spec_classes():
    """DeepSpeed LayerSpec/TiedLayerSpec that build under the spec's own seed, as GPT does."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    from megatron_gpt.model.gpt import seeded

    class SeededLayerSpec(LayerSpec):
        def __init__(self, seed_value: int, typename, *args, **kwargs):
            super().__init__(typename, *args, **kwargs)
            self.seed_value = seed_value

        def build(self, log=False):
            with seeded(self.seed_value):
                return super().build(log)

    class SeededTiedLayerSpec(TiedLayerSpec):
        def __init__(self, seed_value: int, key, typename, *args, **kwargs):
            super().__init__(key, typename, *args, **kwargs)
            self.seed_value = seed_value

        def build(self, log=False):
            with seeded(self.seed_value):
                return super().build(log)

    return SeededLayerSpec, SeededTiedLayerSpec


def _call_method(method: str):
    return None if method == "forward" else (lambda module, inputs: getattr(module, method)(inputs))


def pipeline_module(cfg: Config, vocab_size: int, topo: Topology, vocab_limit: int | None = None) -> nn.Module:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron_gpt.model.gpt import spec_seed

    SeededLayerSpec, SeededTiedLayerSpec = _seeded_spec_classes()
    parallel = parallel_config(topo.tensor, topo.pipeline, sequence_parallel=cfg.parallelism.sequence_parallel)
    specs = layer_specs(cfg.model, vocab_size, parallel, vocab_limit)
    first_position: dict[str, int] = {}
    stages = []
    for position, spec in enumerate(specs):
        if spec.tie_key is None:
            stages.append(SeededLayerSpec(spec_seed(cfg.training.seed, position), spec.cls, *spec.args))
            continue
        # A tied module is built once per stage that uses it, always with its first position's
        # seed, so both ends of the pipeline start from the same weights.
        seed_position = first_position.setdefault(spec.tie_key, position)
        stages.append(SeededTiedLayerSpec(
            spec_seed(cfg.training.seed, seed_position), spec.tie_key, spec.cls, *spec.args,
            forward_fn=_call_method(spec.method), tied_weight_attr=["word.weight"]))
    topology = PipeModelDataParallelTopology(num_pp=topo.pipeline, num_mp=topo.tensor, num_dp=topo.data)
    module = pipeline_module_class(cfg.model)(
        layers=stages, loss_fn=PipelineLoss(topo.tensor), topology=topology,
        partition_method=PARTITION_METHODS[cfg.parallelism.partition_method],
        activation_checkpoint_interval=0)  # recompute is applied by training.recompute
    return apply_recompute(module, cfg.model)


def build_model(cfg: Config, vocab_size: int, topo: Topology, vocab_limit: int | None = None) -> nn.Module:
    """`vocab_size` rows (padded); logits of ids from `vocab_limit` (the tokenizer's size) on are
    hidden. training.compile compiles each transformer block (training/compiling.py)."""
    if topo.pipeline == 1:
        parallel = parallel_config(topo.tensor, 1, sequence_parallel=cfg.parallelism.sequence_parallel)
        model = apply_recompute(GPT(cfg.model, vocab_size, parallel, seed=cfg.training.seed, vocab_limit=vocab_limit),
                                cfg.model)
    else:
        model = pipeline_module(cfg, vocab_size, topo, vocab_limit)
    if cfg.training.compile:
        compile_blocks(model)
    return model


def build_engine(model: nn.Module, cfg: Config, topo: Topology):
    """DeepSpeed engine (a PipelineEngine for a PipelineModule) with AdamW and our LR schedule."""
    import deepspeed

    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.optimizer.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=deepspeed_config(cfg, topo.world_size),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg)),
        mpu=None if topo.pipeline > 1 else DeepSpeedMPU(),  # a PipelineModule brings its own grid
        dist_init_required=False,
    )
    return engine


def offloaded(engine) -> bool:
    """Whether the engine's ZeRO optimizer keeps its states and steps on the CPU (ZeRO-Offload)."""
    optimizer = engine.optimizer
    return bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False))
