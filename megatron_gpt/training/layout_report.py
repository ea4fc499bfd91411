"""`megatron-gpt layout`: where every rank sits, which layers it holds, and what it costs in
memory (parameters, gradients, optimizer states and activations, training.memory_plan) —
computed from the config alone, no process started — and whether the largest rank fits a GPU.

Parameter counts are exact per tensor-parallel shard (the same numbers DeepSpeed's pipeline
partitioner sees), stages come from DeepSpeed's own partition functions, and rank order is
megatron-core's (tensor fastest, then data, then pipeline)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_gpt.config.derive import batch_layout, engine_zero_stage
from megatron_gpt.config.dims import ParallelDims
from megatron_gpt.config.schema import Config, ModelConfig
from megatron_gpt.model.names import BLOCK, EMBEDDING, FINAL_NORM, OUTPUT, spec_order
from megatron_gpt.training.memory_plan import StageActivations, stage_activations, verdict

MIB = 2**20


@dataclass(frozen=True)
class LayerCount:
    """One position of the layer list on one tensor rank."""

    name: str
    sharded: int  # split over tensor ranks (this rank's slice)
    replicated: int  # the same on every tensor rank
    tie_key: str | None = None

    @property
    def held(self) -> int:
        return self.sharded + self.replicated


def layer_counts(model: ModelConfig, vocab_size: int, tensor: int) -> list[LayerCount]:
    """Parameters of each position of the spec list (model.names.spec_order) on one tensor rank."""
    from megatron_gpt.model.layers import ffn_size

    h = model.hidden_size
    head_dim = h // model.num_attention_heads
    kv_heads = model.num_kv_heads or model.num_attention_heads
    norm = h * (2 if model.norm == "layernorm" and model.bias else 1)
    bias = 1 if model.bias else 0
    qkv_out = (model.num_attention_heads + 2 * kv_heads) * head_dim
    ffn = ffn_size(model)
    mlp_in = (2 if model.activation == "swiglu" else 1) * (h * ffn + bias * ffn)
    positions = model.seq_length * h if model.position_embedding == "learned" else 0
    counts = {
        EMBEDDING: lambda tie: LayerCount("Embedding", vocab_size * h // tensor, positions, tie),
        BLOCK: lambda tie: LayerCount("Block", sharded=(h * qkv_out + bias * qkv_out + model.num_attention_heads
                                                        * head_dim * h + mlp_in + ffn * h) // tensor,
                                      replicated=2 * norm + 2 * bias * h),
        FINAL_NORM: lambda tie: LayerCount("FinalNorm", 0, norm),
        OUTPUT: lambda tie: LayerCount("OutputLayer", vocab_size * h // tensor, 0),
    }
    return [counts[slot.kind](slot.tie_key) for slot in spec_order(model)]


def stage_bounds(cfg: Config, counts: list[LayerCount]) -> list[int]:
    """Stage boundaries exactly as DeepSpeed's PipelineModule computes them."""
    from deepspeed.runtime import utils as ds_utils

    stages, method = cfg.parallelism.pipeline, cfg.parallelism.partition_method
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(counts), num_parts=stages)
    weights = [c.held for c in counts] if method == "parameters" else [int(c.name == "Block") for c in counts]
    return ds_utils.partition_balanced(weights=weights, num_parts=stages)


def memory_mib(params: int, cfg: Config, data_parallel: int) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer states) in MiB on one rank under the ZeRO stage:
    stage 1 shards optimizer states over data ranks, stage 2 also gradients, stage 3 also
    parameters. Adam keeps two fp32 moments, plus an fp32 master copy in bf16/fp16. ZeRO-Offload
    (deepspeed.zero_optimization.offload_optimizer / offload_param) keeps the optimizer states /
    the parameter partitions in host memory: none of it on the GPU."""
    from megatron_gpt.config.passthrough import offload_device

    zero, mixed = cfg.parallelism.zero_stage, cfg.training.precision != "fp32"
    width = 2 if mixed else 4
    shard = lambda stage: data_parallel if zero >= stage else 1  # noqa: E731
    on_gpu = lambda kind: offload_device(cfg.deepspeed, kind) == "none"  # noqa: E731
    weights = params * width / shard(3) if on_gpu("offload_param") else 0.0
    grads = params * width / shard(2)
    optimizer = params * (8 + (4 if mixed else 0)) / shard(1) if on_gpu("offload_optimizer") else 0.0
    return weights / MIB, grads / MIB, optimizer / MIB


def describe(counts: list[LayerCount], start: int, stop: int) -> str:
    names = [c.name for c in counts[start:stop]]
    blocks = names.count("Block")
    parts = [n for n in dict.fromkeys(names) if n != "Block"]
    if blocks:
        parts.insert(1 if names[0] != "Block" else 0, f"Block x{blocks}")
    return f"{start}-{stop - 1} ({', '.join(parts)})"


def activation_terms(acts: StageActivations) -> dict[str, float]:
    """A rank's activation bytes by term (held micro-batches included), for the verdict."""
    held = acts.in_flight
    return {f"block activations ({held} micro-batch{'es' if held > 1 else ''} in flight)": acts.blocks * held,
            "logits and loss": acts.head * held, "token ids": acts.embedding * held,
            "pipeline output buffers": acts.pipeline_output * held, "recompute working set": acts.working_set}


def activation_line(cfg: Config, rank: int, acts: StageActivations) -> str:
    m, t = cfg.model, cfg.training
    return (f"activations of rank {rank} (micro batch {t.micro_batch_size} x {m.seq_length} tokens, recompute "
            f"{m.recompute}, sequence parallel {str(cfg.parallelism.sequence_parallel).lower()}): blocks "
            f"{acts.blocks / MIB:,.1f} + logits/loss {acts.head / MIB:,.1f} + ids {acts.embedding / MIB:,.1f} "
            f"+ pipeline output {acts.pipeline_output / MIB:,.1f} MiB per micro-batch x {acts.in_flight} in flight"
            f" + recompute working set {acts.working_set / MIB:,.1f} MiB = {acts.total / MIB:,.1f} MiB")


def layout_report(cfg: Config, world_size: int, vocab_size: int, gpu_memory: int = 80 * 10**9) -> tuple[str, int]:
    """The printed table and the total of unique parameters over all ranks of one replica. The last
    line is the verdict for the rank that needs the most memory against `gpu_memory` bytes."""
    tp, pp = cfg.parallelism.tensor, cfg.parallelism.pipeline
    dims = ParallelDims(world_size, tp, pp)
    dp = dims.data
    counts = layer_counts(cfg.model, vocab_size, tp)
    bounds = stage_bounds(cfg, counts)
    first_stage_of = {}
    for stage in range(pp):
        for c in counts[bounds[stage]:bounds[stage + 1]]:
            if c.tie_key:
                first_stage_of.setdefault(c.tie_key, stage)
    zero = f"ZeRO-{cfg.parallelism.zero_stage}"
    if engine_zero_stage(cfg, dp) != cfg.parallelism.zero_stage:
        zero += " (runs as ZeRO-0: one data-parallel rank, nothing to shard)"
    lines = [f"world {world_size} = tensor {tp} x pipeline {pp} x data {dp}, {zero}, "
             f"{cfg.training.precision}, vocab {vocab_size} (padded), partition by {cfg.parallelism.partition_method}",
             f"{'rank':>5} {'tp':>3} {'pp':>3} {'dp':>3}  {'layers':<34} {'params':>12} {'unique':>12} "
             f"{'param MiB':>10} {'grad MiB':>9} {'optim MiB':>10} {'activ MiB':>10} {'total MiB':>10}"]
    unique_total = 0
    micro_batches = batch_layout(cfg, world_size).gradient_accumulation_steps
    device = "cpu" if cfg.training.device == "cpu" else "cuda"
    worst: tuple[float, int, dict[str, float], StageActivations] | None = None
    for rank in range(world_size):
        tp_rank, dp_rank, pp_rank = dims.coordinates(rank)
        start, stop = bounds[pp_rank], bounds[pp_rank + 1]
        layers, seen = [], set()
        for c in counts[start:stop]:
            if c.tie_key and c.tie_key in seen:
                continue  # one module, used twice on this stage
            seen.add(c.tie_key)
            layers.append(c)
        held = sum(c.held for c in layers)
        # Unique: replicated tensors belong to tensor rank 0, a tied copy to its first stage.
        unique = sum(c.sharded + (c.replicated if tp_rank == 0 else 0) for c in layers
                     if not c.tie_key or first_stage_of[c.tie_key] == pp_rank)
        if dp_rank == 0:
            unique_total += unique
        weights, grads, optimizer = memory_mib(held, cfg, dp)
        acts = stage_activations(cfg, vocab_size, sum(c.name == "Block" for c in counts[start:stop]), pp_rank == 0,
                                 pp_rank == pp - 1, pp_rank, micro_batches, device)
        total = weights + grads + optimizer + acts.total / MIB
        lines.append(f"{rank:>5} {tp_rank:>3} {pp_rank:>3} {dp_rank:>3}  {describe(counts, start, stop):<34} "
                     f"{held:>12,} {unique:>12,} {weights:>10.1f} {grads:>9.1f} {optimizer:>10.1f} "
                     f"{acts.total / MIB:>10.1f} {total:>10.1f}")
        if worst is None or total > worst[0]:
            terms = {"parameters": weights * MIB, "gradients": grads * MIB, "optimizer states": optimizer * MIB,
                     **activation_terms(acts)}
            worst = (total, rank, terms, acts)
    lines.append(f"unique parameters in one replica: {unique_total:,}")
    _, rank, terms, acts = worst
    lines.append(activation_line(cfg, rank, acts))
    lines.append(verdict(terms, gpu_memory, rank))
    return "\n".join(lines), unique_total
