"""What a run starts from: a checkpoint of this run (same layout: DeepSpeed's own files; another
layout: the layout-independent copy), `checkpoint.init_from` weights, or nothing. Decided
identically on every rank before the model is wrapped."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megatron_gpt.checkpoint.engine_state import load_universal_optimizer, load_universal_weights
from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.store import (METADATA, UNIVERSAL_DIR, complete_checkpoints, is_complete, latest_tag,
                                           read_metadata, saved_layout, tag_folders)
from megatron_gpt.checkpoint.universal import Universal, is_universal
from megatron_gpt.config.schema import Config


def find_resume(cfg: Config) -> Path | None:
    """The tag folder this run continues from, or None to start fresh (or from init_from)."""
    if not cfg.checkpoint.resume or not cfg.checkpoint.save_dir:
        return None
    save_dir = Path(cfg.checkpoint.save_dir)
    complete = complete_checkpoints(save_dir)
    latest = latest_tag(str(save_dir))
    if not complete:
        # Checkpoints written before metadata.json existed: trust `latest`, as DeepSpeed does.
        legacy = save_dir / latest if latest else None
        if legacy is not None and legacy.is_dir() and not any(is_complete(f) for _, f in tag_folders(save_dir)):
            return legacy
        return None
    if cfg.training.auto_resume or latest is None:
        return complete[-1]
    folder = save_dir / latest
    if not is_complete(folder):
        raise CheckpointError(
            f"{save_dir}/latest names {latest}, which is not a complete checkpoint (no {METADATA}: an interrupted "
            f"save); fix: set training.auto_resume=true to take the newest complete one ({complete[-1].name}), "
            "or write a complete tag into `latest`")
    return folder


def resolve_universal(path: str | os.PathLike) -> Path:
    """The universal folder for `path`: itself, its `universal/`, or that of the newest complete
    checkpoint (else `latest`) when `path` is a checkpoint.save_dir."""
    path = Path(path)
    for candidate in (path, path / UNIVERSAL_DIR):
        if is_universal(candidate):
            return candidate
    complete = complete_checkpoints(path)
    folder = complete[-1] if complete else (path / latest_tag(str(path)) if latest_tag(str(path)) else None)
    if folder is not None and is_universal(folder / UNIVERSAL_DIR):
        return folder / UNIVERSAL_DIR
    raise CheckpointError(
        f"{path}: no layout-independent checkpoint (universal.json) here, in {path / UNIVERSAL_DIR}, or in the "
        "newest checkpoint of this save_dir; fix: point at the output of `megatron-gpt import-hf`, a save_dir, or a "
        "global_step* folder saved with checkpoint.layout_independent: true")


@dataclass
class Restore:
    """What a run starts from: `fresh`, `native` (DeepSpeed's files, same layout), `universal`
    (another layout: weights, optimizer and schedule from the layout-independent copy) or `init`
    (checkpoint.init_from: weights only, step 0)."""

    kind: str = "fresh"
    folder: Path | None = None
    universal: Universal | None = None
    note: str = ""

    def load_weights(self, model, cfg: Config, topo) -> None:
        """Before DeepSpeed wraps the model: each rank copies its slice of the full weights."""
        if self.universal is not None:
            load_universal_weights(model, cfg, topo, self.universal)

    def finish(self, engine, model, cfg: Config, topo) -> int:
        """After DeepSpeed wrapped the model: the rest of the state; returns the step to continue from."""
        if self.note and topo.is_first:
            print(self.note, flush=True)
        if self.kind == "native":
            path, client_state = engine.load_checkpoint(str(self.folder.parent), tag=self.folder.name)
            if path is None:
                raise CheckpointError(f"{self.folder}: DeepSpeed could not load this checkpoint; fix: remove the folder "
                                      "(an older complete checkpoint is used then) or set checkpoint.resume=false")
            return int(client_state["step"])
        if self.kind == "universal":
            if self.universal.meta.get("optimizer") is not None:
                load_universal_optimizer(engine, model, cfg, topo, self.universal)
            step = self.universal.step
            engine.global_steps = step
            engine.global_samples = int(self.universal.meta.get("consumed_samples", 0))
            return step
        return 0


def plan_restore(cfg: Config, topo) -> Restore:
    """Decide, identically on every rank, which checkpoint (if any) this run starts from."""
    folder = find_resume(cfg)
    if folder is not None:
        metadata = read_metadata(folder) or {}
        saved, current = metadata.get("layout"), saved_layout(cfg, topo)
        if saved is None or saved == current:
            return Restore("native", folder, note=f"resuming from {folder}")
        universal_dir = folder / UNIVERSAL_DIR
        describe = lambda l: (f"tp {l['tensor']} x pp {l['pipeline']} x dp {l['data']}, ZeRO {l['zero_stage']}")  # noqa: E731
        if not is_universal(universal_dir):
            raise CheckpointError(
                f"{folder} was saved under {describe(saved)} and this run is {describe(current)}, but it has no "
                f"layout-independent copy ({UNIVERSAL_DIR}/, written when checkpoint.layout_independent is true); "
                "fix: resume with the saved layout, or set checkpoint.resume=false to start over")
        return Restore("universal", folder, Universal.open(universal_dir),
                       note=f"resuming from {folder}: saved under {describe(saved)}, resharded to {describe(current)} "
                            "from its layout-independent copy")
    if cfg.checkpoint.init_from:
        source = resolve_universal(cfg.checkpoint.init_from)
        return Restore("init", source, Universal.open(source), note=f"initializing weights from {source}")
    return Restore()

