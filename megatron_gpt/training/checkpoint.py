"""Checkpoint save/resume through DeepSpeed's engine (model, optimizer, LR schedule), plus the
run's own state (step, consumed samples, config) in DeepSpeed's client state."""

from __future__ import annotations

from pathlib import Path

import megatron_gpt
from megatron_gpt.config import config_to_dict
from megatron_gpt.config.schema import Config


def tag_for(step: int) -> str:
    return f"global_step{step}"


def save(engine, cfg: Config, step: int, consumed_samples: int) -> str:
    """Collective: every rank writes its shards; DeepSpeed updates `latest` after a barrier."""
    save_dir = cfg.checkpoint.save_dir
    client_state = {
        "step": step, "consumed_samples": consumed_samples,
        "config": config_to_dict(cfg), "megatron_gpt_version": megatron_gpt.__version__,
    }
    engine.save_checkpoint(save_dir, tag=tag_for(step), client_state=client_state)
    return str(Path(save_dir) / tag_for(step))


def latest_tag(save_dir: str | None) -> str | None:
    if not save_dir:
        return None
    latest = Path(save_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def resume(engine, cfg: Config) -> int:
    """Load the `latest` checkpoint when resuming is on; returns the step to continue from."""
    if not cfg.checkpoint.resume or latest_tag(cfg.checkpoint.save_dir) is None:
        return 0
    path, client_state = engine.load_checkpoint(cfg.checkpoint.save_dir)
    if path is None:
        raise RuntimeError(f"checkpoint.save_dir {cfg.checkpoint.save_dir}: `latest` names a checkpoint "
                           "DeepSpeed could not load; fix: point `latest` at a complete global_step* folder")
    return int(client_state["step"])
