"""Parallelism applied from the outside: the same layer specs become one module (pipeline=1)
or DeepSpeed pipeline stages (pipeline>1), then a DeepSpeed engine with ZeRO wraps them."""

from __future__ import annotations

import torch
from torch import nn

from megatron_gpt.config import deepspeed_config, engine_zero_stage
from megatron_gpt.config.schema import Config
from megatron_gpt.distributed import DeepSpeedMPU, Topology
from megatron_gpt.model import GPT, layer_specs, masked_mean, parallel_config, token_losses
from megatron_gpt.training.schedule import lr_multiplier

PARTITION_METHODS = {"parameters": "parameters", "uniform": "uniform", "layers": "type:Block"}


class PipelineLoss:
    """loss_fn of the pipeline's last stage: labels arrive as (labels, loss_mask).

    `summed` switches to summed nats (evaluation needs totals, not per-micro-batch means)."""

    def __init__(self, tensor_parallel_size: int):
        self.tensor_parallel_size = tensor_parallel_size
        self.summed = False

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


def pipeline_module(cfg: Config, vocab_size: int, topo: Topology) -> nn.Module:
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron_gpt.model.gpt import spec_seed

    SeededLayerSpec, SeededTiedLayerSpec = _seeded_spec_classes()
    specs = layer_specs(cfg.model, vocab_size, parallel_config(topo.tensor, topo.pipeline))
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
    return PipelineModule(layers=stages, loss_fn=PipelineLoss(topo.tensor), topology=topology,
                          partition_method=PARTITION_METHODS[cfg.parallelism.partition_method],
                          activation_checkpoint_interval=0)


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Parameter name -> layout-independent name (see GPT.canonical_names); DeepSpeed names a
    pipeline stage's layers by their spec position and tied ones `tied_modules.{key}`."""
    if isinstance(model, GPT):
        return model.canonical_names()
    return {name: "tied." + name[len("tied_modules."):] if name.startswith("tied_modules.") else name
            for name, _ in model.named_parameters()}


def build_model(cfg: Config, vocab_size: int, topo: Topology) -> nn.Module:
    if topo.pipeline == 1:
        return GPT(cfg.model, vocab_size, parallel_config(topo.tensor, 1), seed=cfg.training.seed)
    return pipeline_module(cfg, vocab_size, topo)


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
    if (topo.data == 1 and engine_zero_stage(cfg, 1) == 0) or syncs_gradients_itself(cfg, topo):
        # one data-parallel rank: DeepSpeed would still flatten, all-reduce over itself and copy
        # back every gradient after each backward (a PipelineEngine has it off already);
        # several on one CPU host: GradientSync does it over shared memory
        engine.enable_backward_allreduce = False
    return engine


def syncs_gradients_itself(cfg: Config, topo: Topology) -> bool:
    """Whether the trainer all-reduces data-parallel gradients (GradientSync) instead of the
    engine: plain data parallelism (ZeRO-0, fp32, tensor=pipeline=1) of CPU ranks that
    share DeepSpeed's shared-memory kernel, whose group is the whole world."""
    from megatron_gpt import shared_memory

    return (shared_memory.active() and 1 < topo.data == topo.world_size  # active() implies CPU
            and engine_zero_stage(cfg, topo.data) == 0 and cfg.training.precision == "fp32")


class GradientSync:
    """Averages gradients over the data-parallel ranks as DeepSpeed's stage-0 path does (sum,
    then times 1/ranks: the same numbers), through the shared-memory kernel in one flat buffer
    kept between steps. Call it once per optimizer step, after the last backward: afterwards
    every parameter's .grad is a view of `grads` (no copy back; clip_gradients then works on
    `grads` in one pass), until the engine sets the gradients to None after stepping.

    The same all-reduce carries one more number, each rank's preemption vote (1 if it got a
    signal): `stop_votes` is their sum, so the step-boundary check needs no collective of its own
    (every collective is a point where the faster rank waits for the slower)."""

    def __init__(self, parameters: list[nn.Parameter], ranks: int):
        self.params = parameters
        self.sizes = [p.numel() for p in parameters]
        self.flat = torch.empty(sum(self.sizes) + 1, dtype=torch.float32)
        self.grads = self.flat[:-1]
        self.views = [view.view_as(p) for view, p in zip(self.grads.split(self.sizes), parameters)]
        self.scale = 1.0 / ranks
        self.stop_votes = 0.0

    def __call__(self, stop_vote: bool = False) -> None:
        from megatron_gpt import shared_memory

        # an unused parameter's gradient counts as zeros, as in DeepSpeed's reduction
        torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params],
                  out=self.grads)
        self.flat[-1] = float(stop_vote)
        shared_memory.all_reduce(self.flat)
        self.stop_votes = self.flat[-1].item()
        self.grads.mul_(self.scale)
        for param, view in zip(self.params, self.views):
            param.grad = view


def clip_gradients(parameters: list[nn.Parameter], max_norm: float, topo: Topology,
                   flat: torch.Tensor | None = None) -> torch.Tensor:
    """Clip the gradients of `parameters` (the whole model's) to `max_norm` by their global L2 norm
    and return that norm (before clipping), as DeepSpeed's fp32 path does without keeping the norm.
    `flat`: one buffer every gradient is a view of (GradientSync.grads), scaled as a whole, as torch
    does (coefficient max_norm / (norm + 1e-6), at most 1). Otherwise, at tensor-parallel size 1
    torch's foreach kernels; else DeepSpeed's, which counts tensor-parallel duplicates (norms,
    biases of row-parallel layers) once and sums over the model-parallel group."""
    if flat is not None:
        norm = torch.linalg.vector_norm(flat)
        flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm
    params = [p for p in parameters if p.grad is not None]
    if topo.tensor == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    from deepspeed.runtime.utils import clip_grad_norm_

    return clip_grad_norm_(params, max_norm, mpu=DeepSpeedMPU())
