"""Moving training state between a DeepSpeed engine and full tensors under canonical names, in
any tensor/pipeline/data layout and ZeRO stage: gathering it for the layout-independent copy, and
setting each rank's slice of it on restore. DeepSpeed's public safe_get/set_full_* functions reach
into ZeRO's partitions; tensor-parallel slices follow megatron-core's partition attributes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.universal import STATE_KEYS, Universal, write_shard
from megatron_gpt.config.schema import Config
from megatron_gpt.model.names import Layout, canonical_names, fit_rows



def _base_optimizer(engine):
    """The torch optimizer under DeepSpeed's ZeRO / mixed-precision wrappers."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _zero_managed(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _full_shape(param) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def _gather_tensor_parallel(value: torch.Tensor, param, tensor: int) -> torch.Tensor:
    """This rank's slice -> the full tensor, concatenated along the partition dimension."""
    if tensor == 1 or not getattr(param, "tensor_model_parallel", False):
        return value
    import torch.distributed as dist
    from megatron.core import parallel_state

    pieces = [torch.empty_like(value) for _ in range(tensor)]
    dist.all_gather(pieces, value.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=param.partition_dim)


def _local_value(engine, param, key: str | None) -> torch.Tensor:
    """This tensor rank's full-over-data-parallel fp32 weight (key None) or optimizer moment.
    Collective over the data-parallel group under ZeRO: every rank calls it in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero_managed(param):
        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        if value is not None:
            return value.detach().float().reshape(_full_shape(param))
    if key is None:
        return param.detach().float()
    state = _base_optimizer(engine).state.get(param, {})
    return state[key].detach().float() if key in state else torch.zeros_like(param, dtype=torch.float32)


def _link_zero_fragments(engine) -> None:
    """ZeRO 1/2: point every parameter's fragment at the optimizer's current state tensors.
    DeepSpeed links them once, right after stepping the first parameter group, when the other
    groups' states do not exist yet; linking again (it is idempotent) fixes that."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state") and hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _optimizer_step(engine) -> int | None:
    steps = [float(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s]
    return int(max(steps)) if steps else None


def save_universal(engine, model, cfg: Config, topo, folder: Path) -> dict[str, Any]:
    """Collective: every rank gathers its stage's full tensors; one rank per pipeline stage writes
    them. Returns what universal.json records about the optimizer (the same on every rank)."""
    import torch.distributed as dist

    names = canonical_names(model)
    with_states = _optimizer_step(engine) is not None
    if dist.is_initialized():  # every rank must make the same collective calls below
        flag = torch.tensor([int(with_states)], device=next(model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        with_states = bool(flag.item())
    if with_states:
        _link_zero_fragments(engine)
    params: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {key: {} for key in STATE_KEYS} if with_states else {}
    for name, param in model.named_parameters():
        canonical = names[name]
        params[canonical] = _gather_tensor_parallel(_local_value(engine, param, None), param, topo.tensor).cpu()
        for key in states:
            states[key][canonical] = _gather_tensor_parallel(_local_value(engine, param, key), param, topo.tensor).cpu()
    if topo.tensor_rank == 0 and topo.data_rank == 0:
        write_shard(folder, topo.pipeline_rank, params, states)
    optimizer = None
    if with_states:
        optimizer = {"step": _optimizer_step(engine),
                     "lrs": [float(group["lr"]) for group in _base_optimizer(engine).param_groups]}
    scheduler = engine.lr_scheduler.state_dict() if getattr(engine, "lr_scheduler", None) is not None else None
    return {"optimizer": optimizer, "lr_scheduler": _jsonable(scheduler)}


def _jsonable(value: Any) -> Any:
    """The LR-schedule state for universal.json: its JSON-able entries (LambdaLR's are all numbers)."""
    def plain(item: Any) -> bool:
        try:
            json.dumps(item)
            return True
        except TypeError:
            return False

    if isinstance(value, dict):
        return {k: v for k, v in value.items() if plain(v)}
    return value if plain(value) else None


def _slice_for_rank(full: torch.Tensor, param, topo, canonical: str, vocab: set[str]) -> torch.Tensor:
    """The part of the full tensor `full` this rank's `param` holds (a vocabulary padded for
    another tensor size is cut or zero-padded to this layout's padded size first)."""
    shape = list(_full_shape(param))
    split = topo.tensor > 1 and getattr(param, "tensor_model_parallel", False)
    if split:
        shape[param.partition_dim] *= topo.tensor
    if canonical in vocab and full.shape[0] != shape[0]:
        full = fit_rows(full, shape[0])
    if list(full.shape) != shape:
        raise CheckpointError(f"parameter {canonical}: the checkpoint holds shape {tuple(full.shape)}, this run's model "
                              f"needs {tuple(shape)}; fix: use the model section the checkpoint was saved with")
    if split:
        full = full.chunk(topo.tensor, dim=param.partition_dim)[topo.tensor_rank]
    return full


def load_universal_weights(model, cfg: Config, topo, universal: Universal) -> None:
    """Copy each parameter's slice of the universal checkpoint into `model` (before DeepSpeed wraps it)."""
    names = canonical_names(model)
    full = universal.params()
    vocab = Layout.of(cfg.model).vocab_names()
    missing = sorted(names[n] for n, _ in model.named_parameters() if names[n] not in full)
    if missing:
        raise CheckpointError(f"{universal.folder}: no tensors for {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}; fix: use the model section the checkpoint was "
                              "saved with (e.g. model.tie_embeddings, model.num_layers)")
    with torch.no_grad():
        for name, param in model.named_parameters():
            canonical = names[name]
            param.copy_(_slice_for_rank(full[canonical], param, topo, canonical, vocab).to(param.dtype))


def _ensure_adam_state(engine) -> None:
    """Create AdamW's lazily-initialized state (as torch's first step would) where it is missing.
    ZeRO-3 hands its flat fp32 partitions to the optimizer only while stepping them."""
    optimizer = _base_optimizer(engine)
    pairs = [(group, param) for group in optimizer.param_groups for param in group["params"]]
    pairs += [(optimizer.param_groups[0], param) for param in getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])]
    for group, param in pairs:
        state = optimizer.state[param]
        if state:
            continue
        on_device = group.get("capturable", False) or group.get("fused", False)
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group.get("amsgrad", False):
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def load_universal_optimizer(engine, model, cfg: Config, topo, universal: Universal) -> None:
    """Optimizer moments, step count, learning rates and LR-schedule state into a fresh engine,
    every rank setting its own slice (DeepSpeed's safe_set_* reach into any ZeRO partitioning)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = canonical_names(model)
    vocab = Layout.of(cfg.model).vocab_names()
    base = _base_optimizer(engine)
    _ensure_adam_state(engine)
    _link_zero_fragments(engine)
    device = next(model.parameters()).device
    if cfg.training.precision != "fp32":  # fp32 master weights beyond the bf16/fp16 module copy
        params = universal.params()
        for name, param in model.named_parameters():
            value = _slice_for_rank(params[names[name]], param, topo, names[name], vocab).to(device, torch.float32)
            safe_set_full_fp32_param(param, value)
    for key in STATE_KEYS:
        full = universal.states(key)
        for name, param in model.named_parameters():
            canonical = names[name]
            value = _slice_for_rank(full[canonical], param, topo, canonical, vocab).to(device, torch.float32)
            if _zero_managed(param):
                safe_set_full_optimizer_state(param, value, key)
            else:
                base.state[param][key].copy_(value.view_as(base.state[param][key]))
    meta = universal.meta["optimizer"]
    for state in base.state.values():
        state["step"].fill_(float(meta["step"]))
    for group, lr in zip(base.param_groups, meta["lrs"]):
        group["lr"] = lr
    scheduler = universal.meta.get("lr_scheduler")
    if scheduler and getattr(engine, "lr_scheduler", None) is not None:
        current = engine.lr_scheduler.state_dict()
        engine.lr_scheduler.load_state_dict({**current, **scheduler})


