"""The `deepspeed:` section: DeepSpeed settings the schema does not model, merged last into the
derived JSON. Keys the other sections derive are refused there (two places setting one value
would silently disagree); each refusal names the schema key that sets it."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .errors import Problem, yaml_value

DERIVED: dict[str, str] = {
    "train_batch_size": "training.global_batch_size",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps (or training.global_batch_size)",
    "gradient_clipping": "training.gradient_clipping",
    "zero_optimization.stage": "parallelism.zero_stage",
    "bf16.enabled": "training.precision",
    "bfloat16": "training.precision",  # DeepSpeed's alias of bf16
    "fp16.enabled": "training.precision",
    "amp": "training.precision",
    "optimizer": "the optimizer section (AdamW lr, betas, eps, weight_decay)",
    "scheduler": "the schedule section (the trainer's own warmup and decay)",
    "activation_checkpointing": "model.recompute",
}
"""Dotted key under `deepspeed:` -> the schema key(s) that set it."""

SEQUENCE_PARALLEL_DERIVED: dict[str, str] = {
    "pipeline.pipe_partitioned": "parallelism.sequence_parallel (each tensor rank sends its own slice)",
    "pipeline.grad_partitioned": "parallelism.sequence_parallel (each tensor rank sends its own slice)",
}
"""Derived only under sequence parallelism (config/deepspeed.py); true there corrupts pipeline sends."""

MAPPINGS = ("zero_optimization", "bf16", "fp16")
"""Derived sub-sections whose other keys (bucket sizes, offload, loss scaling) may be set."""


def offload_device(section: Mapping[str, Any], kind: str) -> str:
    """zero_optimization.offload_optimizer/offload_param's device ("none" when not offloaded)."""
    zero = section.get("zero_optimization")
    offload = zero.get(kind) if isinstance(zero, Mapping) else None
    device = offload.get("device", "none") if isinstance(offload, Mapping) else "none"
    return str(device if device is not None else "none")


def merge(derived: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`derived` with `extra` merged in (nested mappings merged key by key, anything else replaced);
    neither argument is changed."""
    out = dict(derived)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def passthrough_problems(section: Mapping[str, Any], origin: Callable[[str], str | None],
                         zero_stage: int, sequence_parallel: bool = False) -> list[Problem]:
    """Problems of the `deepspeed:` section: derived keys set there, a derived sub-section replaced
    by a non-mapping, and offloading that the ZeRO stage cannot do; `origin(dotted key)` says
    where a key was set."""
    problems: list[Problem] = []
    derived = {**DERIVED, **(SEQUENCE_PARALLEL_DERIVED if sequence_parallel else {})}

    def fail(key: str, what: str, fix: str) -> None:
        problems.append(Problem(origin(key), f"{key}: {what}; fix: {fix}"))

    for key, value in section.items():
        keys = [key] + ([f"{key}.{k}" for k in value] if isinstance(value, Mapping) else [])
        for dotted in keys:
            if dotted in derived:
                fail(f"deepspeed.{dotted}", f"set by {derived[dotted]} (the framework derives it)",
                     f"remove deepspeed.{dotted} and set {derived[dotted]} instead")
        if key in MAPPINGS and not isinstance(value, Mapping):
            fail(f"deepspeed.{key}", f"{yaml_value(value)} would replace the derived mapping {key} "
                 "(keys under it are merged one by one)",
                 f"write a mapping of the keys to change, e.g. deepspeed: {{{key}: {{KEY: VALUE}}}}")
    needs = {"offload_optimizer": (1, "1, 2 or 3"), "offload_param": (3, "3")}
    for kind, (least, stages) in needs.items():
        device = offload_device(section, kind)
        if device != "none" and zero_stage < least:
            fail(f"deepspeed.zero_optimization.{kind}", f"device {device} needs ZeRO stage {stages}, but "
                 f"parallelism.zero_stage is {zero_stage}",
                 f"set parallelism.zero_stage to {stages}, or remove deepspeed.zero_optimization.{kind}")
    return problems
