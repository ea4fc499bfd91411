"""Moving training state between a DeepSpeed engine and the sharded format, rank by rank.

Saving, each rank takes only what it holds, as views of the engine's own tensors: its
tensor-parallel slice (megatron-core's partition attributes) and, under ZeRO, its data-parallel
partition of the fp32 weights and AdamW moments: under ZeRO-3 DeepSpeed's
`safe_get_local_fp32_param` / `safe_get_local_optimizer_state` (rank r of the partition group holds
elements [r * n, (r + 1) * n) of the flattened slice, n its padded partition size); under ZeRO 1/2
each parameter's `_hp_mapping` (`lp_fragment_address`: where the fragment sits in the flattened
slice; `get_hp_fragment(key)`: the fp32 weight or moment), what DeepSpeed's own universal
checkpoint reads. Without ZeRO, data rank 0 writes the slice. No collective gathers anything.

Restoring, each rank reads just its own region through `Sharded.read`, whatever layout saved it.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from megatron_gpt.checkpoint.sharded import KINDS, Piece, Sharded
from megatron_gpt.config.schema import Config
from megatron_gpt.model.names import Prefixes, canonical_names

STATE_KEYS = KINDS[1:]


def _base_optimizer(engine):
    """The torch optimizer under DeepSpeed's ZeRO / mixed-precision wrappers."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _full_shape(param) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def tp_chunk(param, topo) -> tuple[int, int, int]:
    """[dim, count, index] of this rank's tensor-parallel slice of `param` (count 1: replicated)."""
    if topo.tensor > 1 and getattr(param, "tensor_model_parallel", False):
        return (int(param.partition_dim), topo.tensor, topo.tensor_rank)
    return (0, 1, 0)


def global_shape(param, topo) -> tuple[int, ...]:
    shape = list(_full_shape(param))
    dim, count, _ = tp_chunk(param, topo)
    shape[dim] *= count
    return tuple(shape)


def _link_zero_fragments(engine) -> None:
    """ZeRO 1/2: point every parameter's fragment at the optimizer's current state tensors.
    DeepSpeed links them once, right after stepping the first parameter group, when the other
    groups' states do not exist yet; linking again (it is idempotent) fixes that."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state") and hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def optimizer_step(engine) -> int | None:
    steps = [float(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s]
    return int(max(steps)) if steps else None


def _held(engine, param, topo, kind: str) -> tuple[int, torch.Tensor] | None:
    """(start, this rank's flat run of `kind`) for `param`, a view where the engine allows, or None."""
    key = None if kind == "param" else kind
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = safe_get_local_fp32_param(param) if key is None else safe_get_local_optimizer_state(param, key)
        numel = int(param.ds_numel)
        start = topo.data_rank * local.numel()
        end = min(start + local.numel(), numel)
        return (start, local.reshape(-1)[: end - start]) if start < end else None
    if hasattr(param, "_hp_mapping"):  # ZeRO 1/2
        mapping = param._hp_mapping
        if mapping is None:  # every element of this parameter lives in other ranks' partitions
            return None
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment(key).reshape(-1)
    if topo.data_rank != 0:  # replicated over data ranks: one copy is enough
        return None
    if key is None:
        return 0, param.detach().reshape(-1)
    state = _base_optimizer(engine).state.get(param, {})
    return (0, state[key].detach().reshape(-1)) if key in state else None


def collect(engine, model, topo, with_states: bool, copy: bool) -> tuple[dict[str, torch.Tensor], list[Piece], int]:
    """This rank's pieces: {safetensors key: fp32 CPU tensor}, their index, and the bytes of host
    memory built for them (views of the engine's CPU tensors cost none; `copy` (async saves) and
    device-to-host moves do)."""
    if with_states:
        _link_zero_fragments(engine)
    names = canonical_names(model)
    tensors: dict[str, torch.Tensor] = {}
    pieces: list[Piece] = []
    built = 0
    for name, param in model.named_parameters():
        for kind in KINDS if with_states else KINDS[:1]:
            held = _held(engine, param, topo, kind)
            if held is None:
                continue
            start, value = held
            host = value.detach().to("cpu", torch.float32)
            if copy and host.data_ptr() == value.data_ptr():
                host = host.clone()
            if host.data_ptr() != value.data_ptr():
                built += host.numel() * host.element_size()
            piece = Piece(kind, names[name], global_shape(param, topo), tp_chunk(param, topo), start, start + host.numel())
            tensors[piece.key] = host
            pieces.append(piece)
    return tensors, pieces, built


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's RNG states: torch's as tensors, Python's and NumPy's as JSON."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return tensors, {"python": [version, list(state), gauss],
                     "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}


def set_rng_state(torch_state: torch.Tensor | None, other: dict[str, Any]) -> None:
    if torch_state is not None:
        torch.set_rng_state(torch_state.to(torch.uint8))
    if "python" in other:
        version, state, gauss = other["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in other:
        name, keys, pos, has_gauss, cached = other["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_record(engine) -> dict[str, Any]:
    """What metadata.json records about the optimizer and LR schedule (the same on every rank)."""
    step = optimizer_step(engine)
    optimizer = None if step is None else {"step": step,
                                           "lrs": [float(g["lr"]) for g in _base_optimizer(engine).param_groups]}
    scheduler = engine.lr_scheduler.state_dict() if getattr(engine, "lr_scheduler", None) is not None else None
    return {"optimizer": optimizer, "lr_scheduler": _jsonable(scheduler)}


def _jsonable(value: Any) -> Any:
    """The LR-schedule state for metadata.json: its JSON-able entries (LambdaLR's are all numbers)."""
    def plain(item: Any) -> bool:
        try:
            json.dumps(item)
            return True
        except TypeError:
            return False

    if isinstance(value, dict):
        return {k: v for k, v in value.items() if plain(v)}
    return value if plain(value) else None


def load_weights(model, cfg: Config, topo, source: Sharded) -> None:
    """Copy each parameter's slice into `model` (before DeepSpeed wraps it)."""
    names = canonical_names(model)
    vocab = Prefixes.of(cfg.model).vocab_names()
    with torch.no_grad():
        for name, param in model.named_parameters():
            canonical = names[name]
            value = source.read("param", canonical, global_shape(param, topo), tp_chunk(param, topo),
                                fit=canonical in vocab)
            param.copy_(value.view(param.shape).to(param.dtype))


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


def _set_held(engine, param, topo, kind: str, read) -> None:
    """Set this rank's run of `kind` for `param`; `read(start, end)` gives those flat elements."""
    key = None if kind == "param" else kind
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's padded partition
        from deepspeed.utils import (safe_get_local_fp32_param, safe_set_local_fp32_param,
                                     safe_set_local_optimizer_state)

        size = safe_get_local_fp32_param(param).numel()
        start = topo.data_rank * size
        end = min(start + size, int(param.ds_numel))
        value = torch.zeros(size, dtype=torch.float32)
        if start < end:
            value[: end - start] = read(start, end)
        value = value.to(param.device)
        safe_set_local_fp32_param(param, value) if key is None else safe_set_local_optimizer_state(param, value, key)
    elif hasattr(param, "_hp_mapping"):  # ZeRO 1/2: this parameter's fragment of the partition
        mapping = param._hp_mapping
        if mapping is not None:
            address = mapping.lp_fragment_address
            fragment = mapping.get_hp_fragment(key)
            fragment.data.copy_(read(address.start, address.start + address.numel).view_as(fragment))
    elif key is not None:
        state = _base_optimizer(engine).state[param][key]
        state.copy_(read(0, state.numel()).view_as(state))


def load_optimizer(engine, model, cfg: Config, topo, source: Sharded, meta: dict[str, Any]) -> None:
    """AdamW moments, fp32 master weights, step count, learning rates and LR-schedule state into a
    fresh engine, each rank reading only its own partition of its own slice."""
    names = canonical_names(model)
    vocab = Prefixes.of(cfg.model).vocab_names()
    base = _base_optimizer(engine)
    _ensure_adam_state(engine)
    _link_zero_fragments(engine)
    kinds = STATE_KEYS if cfg.training.precision == "fp32" else KINDS  # fp32 masters beyond a bf16/fp16 model
    for name, param in model.named_parameters():
        canonical = names[name]
        shape, chunk = global_shape(param, topo), tp_chunk(param, topo)
        for kind in kinds:
            _set_held(engine, param, topo, kind, lambda start, end, kind=kind: source.read(
                kind, canonical, shape, chunk, start, end, fit=canonical in vocab).reshape(-1))
    optimizer = meta["optimizer"]
    for state in base.state.values():
        state["step"].fill_(float(optimizer["step"]))
    for group, lr in zip(base.param_groups, optimizer["lrs"]):
        group["lr"] = lr
    scheduler = meta.get("lr_scheduler")
    if scheduler and getattr(engine, "lr_scheduler", None) is not None:
        current = engine.lr_scheduler.state_dict()
        engine.lr_scheduler.load_state_dict({**current, **scheduler})
