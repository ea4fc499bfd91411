"""The layout-independent ("universal") checkpoint: full tensors under canonical names.

    FOLDER/universal.json     format, version, step, consumed samples, the run's config, the
                              optimizer's step count and learning rates, the LR-schedule state
    FOLDER/stage00.pt ...     {"params": {canonical name: full fp32 tensor},
                               "exp_avg": {...}, "exp_avg_sq": {...}}   (AdamW moments, optional)

Tensors are whole: tensor-parallel shards concatenated along each parameter's partition
dimension, ZeRO partitions gathered, data-parallel replicas written once. Each pipeline stage
writes its own file (a tied embedding appears in the first and last stage's files, with equal
values). A folder holds one or more stage files; readers merge them.

Why our own format rather than DeepSpeed's universal checkpoint (ds_to_universal +
`load_universal_checkpoint`): DeepSpeed's maps parameters by their module names, and ours differ
between pipeline=1 (one GPT module, `layers.N.*`) and pipeline>1 (a PipelineModule, `N.*` and
`tied_modules.*`), so tp2 x pp1 -> tp1 x pp2 would need renaming inside its files; it also needs
per-model regex patterns for TP-replicated, row-parallel and vocabulary parameters, and an offline
conversion step before every layout change. Here the canonical names already are layout-free, the
megatron-core partition attributes on each parameter say how to slice, and DeepSpeed's public
`safe_get/set_full_*` functions move fp32 weights and optimizer states in and out of any ZeRO stage.
The same format carries `import-hf` weights into `checkpoint.init_from`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "megatron-gpt-universal"
VERSION = 1
META = "universal.json"
STATE_KEYS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter moments (the step count is one number for the whole optimizer)."""


def shard_name(stage: int) -> str:
    return f"stage{stage:02d}.pt"


def write_shard(folder: str | os.PathLike, stage: int, params: dict[str, torch.Tensor],
                states: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """One stage's full tensors (and optimizer moments); written under a temporary name first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / shard_name(stage)
    payload: dict[str, Any] = {"params": {k: v.detach().cpu().contiguous() for k, v in params.items()}}
    for key, values in (states or {}).items():
        payload[key] = {k: v.detach().cpu().contiguous() for k, v in values.items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def write_meta(folder: str | os.PathLike, meta: dict[str, Any]) -> Path:
    folder = Path(folder)
    shards = sorted(p.name for p in folder.glob("stage*.pt"))
    path = folder / META
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta, "files": shards}, indent=1))
    os.replace(tmp, path)
    return path


def is_universal(folder: str | os.PathLike) -> bool:
    return (Path(folder) / META).is_file()


@dataclass
class Universal:
    """A universal checkpoint folder, read lazily (stage files are memory-mapped)."""

    folder: Path
    meta: dict[str, Any]
    _shards: list[dict[str, Any]] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Universal":
        folder = Path(folder)
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder / META}: not a {FORMAT} checkpoint (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > VERSION:
            raise ValueError(f"{folder / META}: format version {meta['version']} is newer than this megatron-gpt "
                             f"reads ({VERSION}); fix: upgrade megatron-gpt")
        missing = [name for name in meta.get("files", []) if not (folder / name).is_file()]
        if missing or not meta.get("files"):
            raise ValueError(f"{folder}: stage files {missing or '(none)'} are missing; fix: copy the folder completely")
        return cls(folder, meta)

    def _load(self) -> list[dict[str, Any]]:
        if self._shards is None:
            self._shards = [torch.load(self.folder / name, map_location="cpu", weights_only=True, mmap=True)
                            for name in self.meta["files"]]
        return self._shards

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    @property
    def has_optimizer(self) -> bool:
        return self.meta.get("optimizer") is not None and all(key in self._load()[0] for key in STATE_KEYS)

    def params(self) -> dict[str, torch.Tensor]:
        """Canonical name -> full tensor, over all stage files (the first file holding a name wins)."""
        merged: dict[str, torch.Tensor] = {}
        for shard in self._load():
            for name, tensor in shard["params"].items():
                merged.setdefault(name, tensor)
        return merged

    def states(self, key: str) -> dict[str, torch.Tensor]:
        """Canonical name -> full optimizer moment `key` (exp_avg or exp_avg_sq)."""
        merged: dict[str, torch.Tensor] = {}
        for shard in self._load():
            for name, tensor in shard.get(key, {}).items():
                merged.setdefault(name, tensor)
        return merged
