"""What a run starts from: a checkpoint of this run (in this or any other layout), the weights of
`checkpoint.init_from`, or nothing. Decided identically on every rank before the model is wrapped;
everything comes from the sharded format (`sharded`), never from DeepSpeed's own files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_gpt.checkpoint.engine_state import load_optimizer, load_weights, set_rng_state
from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.opening import Checkpoint, open_checkpoint
from megatron_gpt.checkpoint.store import METADATA, complete_checkpoints, is_complete, latest_tag, saved_layout
from megatron_gpt.config.schema import Config


def find_resume(cfg: Config) -> Path | None:
    """The tag folder this run continues from, or None to start fresh (or from init_from)."""
    if not cfg.checkpoint.resume or not cfg.checkpoint.save_dir:
        return None
    save_dir = Path(cfg.checkpoint.save_dir)
    complete = complete_checkpoints(save_dir)
    latest = latest_tag(str(save_dir))
    if not complete:
        # A `latest` without any complete checkpoint (e.g. DeepSpeed's own files): opening it says why not.
        legacy = save_dir / latest if latest else None
        return legacy if legacy is not None and legacy.is_dir() else None
    if cfg.training.auto_resume or latest is None:
        return complete[-1]
    folder = save_dir / latest
    if not is_complete(folder):
        raise CheckpointError(
            f"{save_dir}/latest names {latest}, which is not a complete checkpoint (no {METADATA}: an interrupted "
            f"save); fix: set training.auto_resume=true to take the newest complete one ({complete[-1].name}), "
            "or write a complete tag into `latest`")
    return folder


def _describe(layout: dict) -> str:
    return f"tp {layout['tensor']} x pp {layout['pipeline']} x dp {layout['data']}, ZeRO {layout['zero_stage']}"


@dataclass
class Restore:
    """What a run starts from: `fresh`, `resume` (weights, optimizer, schedule, RNG and data
    position of a checkpoint, in any layout) or `init` (checkpoint.init_from: weights only, step 0)."""

    kind: str = "fresh"
    checkpoint: Checkpoint | None = None
    same_layout: bool = False
    note: str = ""

    @property
    def folder(self) -> Path | None:
        return self.checkpoint.folder if self.checkpoint is not None else None

    def load_weights(self, model, cfg: Config, topo) -> None:
        """Before DeepSpeed wraps the model: each rank copies in its own slice of the weights."""
        if self.checkpoint is not None:
            load_weights(model, cfg, topo, self.checkpoint.shards)

    def finish(self, engine, model, cfg: Config, topo) -> int:
        """After DeepSpeed wrapped the model: the rest of the state; returns the step to continue from."""
        if self.note and topo.is_first:
            print(self.note, flush=True)
        if self.kind != "resume":
            if self.checkpoint is not None:
                self.checkpoint.shards.close()
            return 0
        meta = self.checkpoint.meta
        if meta.get("optimizer") is not None:
            load_optimizer(engine, model, cfg, topo, self.checkpoint.shards, meta)
        if self.same_layout:  # each rank continues its own random streams
            set_rng_state(*self.checkpoint.shards.rng(topo.rank))
        self.checkpoint.shards.close()
        step = int(meta["step"])
        engine.global_steps = step
        engine.global_samples = int(meta.get("consumed_samples", 0))
        return step


def plan_restore(cfg: Config, topo) -> Restore:
    """Decide, identically on every rank, which checkpoint (if any) this run starts from."""
    folder = find_resume(cfg)
    if folder is not None:
        checkpoint = open_checkpoint(folder)
        saved, current = checkpoint.meta.get("layout"), saved_layout(cfg, topo)
        if saved == current:
            return Restore("resume", checkpoint, True, note=f"resuming from {folder}")
        return Restore("resume", checkpoint, False,
                       note=f"resuming from {folder}: saved under {_describe(saved)}, resharded to {_describe(current)}")
    if cfg.checkpoint.init_from:
        checkpoint = open_checkpoint(cfg.checkpoint.init_from)
        return Restore("init", checkpoint, note=f"initializing weights from {checkpoint.folder}")
    return Restore()


