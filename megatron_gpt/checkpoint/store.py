"""Checkpoints: save, pick the one to resume, and resume it in the same or another layout.

A checkpoint is a tag folder `SAVE_DIR/global_stepN` holding

- DeepSpeed's own files (model, optimizer and LR-schedule state of every rank, plus the run's
  step, consumed samples and config in its client state): resuming in the same layout loads these;
- `universal/`: the layout-independent copy (`megatron_gpt.checkpoint.universal`: full fp32 weights
  and AdamW moments under canonical names, optimizer step, learning rates, LR-schedule state),
  written collectively when `checkpoint.layout_independent` is on: resuming in another
  tensor/pipeline/data layout or ZeRO stage loads this, every rank taking its own slice;
- `tokenizer/`: a copy of the tokenizer's files;
- `metadata.json`, written last, by rank 0, after a barrier that every rank reaches only once its
  files are written: the config, the tokenizer (config, vocabulary size, identifiers), step,
  consumed samples, the saving layout and the code version (package version and git commit). A
  folder without it is an interrupted save.

Only then is `SAVE_DIR/latest` replaced (atomically) by the new tag, and `checkpoint.keep_last_n`
prunes older checkpoints. So `latest` never names a torn checkpoint, and resuming with
`training.auto_resume` takes the newest folder that has its metadata.json, skipping any
interrupted save even if `latest` was edited to name it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

import megatron_gpt
from megatron_gpt.checkpoint.engine_state import save_universal
from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.universal import write_meta
from megatron_gpt.config import config_to_dict
from megatron_gpt.config.schema import Config

__all__ = ["CheckpointError", "METADATA", "UNIVERSAL_DIR", "TOKENIZER_DIR", "tag_for", "latest_tag",
           "read_metadata", "is_complete", "tag_folders", "complete_checkpoints", "code_version", "prune", "save"]

METADATA = "metadata.json"
"""Written last into a tag folder: its presence marks the checkpoint complete."""
UNIVERSAL_DIR = "universal"
TOKENIZER_DIR = "tokenizer"
_TAG = re.compile(r"global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def latest_tag(save_dir: str | None) -> str | None:
    if not save_dir:
        return None
    latest = Path(save_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def read_metadata(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / METADATA
    return json.loads(path.read_text()) if path.is_file() else None


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / METADATA).is_file()


def tag_folders(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every global_step* folder, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in save_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found)


def complete_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """Tag folders whose save finished on every rank, oldest first."""
    return [folder for _, folder in tag_folders(save_dir) if is_complete(folder)]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- code version


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Package version, and the git commit (with a dirty flag) when running from a checkout."""
    version: dict[str, Any] = {"megatron_gpt": megatron_gpt.__version__, "torch": torch.__version__}
    try:
        import deepspeed

        version["deepspeed"] = deepspeed.__version__
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass
    repo = Path(megatron_gpt.__file__).resolve().parents[1]
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if commit:
                version["git_commit"] = commit
                version["git_dirty"] = bool(dirty)
        except (OSError, subprocess.SubprocessError):
            pass
    return version


# --------------------------------------------------------------------------- save


def saved_layout(cfg: Config, topo) -> dict[str, int]:
    return {"tensor": topo.tensor, "pipeline": topo.pipeline, "data": topo.data,
            "zero_stage": cfg.parallelism.zero_stage, "world_size": topo.world_size}


def _tokenizer_record(tokenizer, folder: Path) -> dict[str, Any] | None:
    """What metadata.json says about the tokenizer; its files are copied into folder/tokenizer."""
    if tokenizer is None:
        return None
    files = []
    for attr in ("path", "vocab_file", "merge_file"):
        source = getattr(tokenizer, attr, None)
        if source and os.path.isfile(source):
            (folder / TOKENIZER_DIR).mkdir(exist_ok=True)
            shutil.copyfile(source, folder / TOKENIZER_DIR / os.path.basename(source))
            files.append(f"{TOKENIZER_DIR}/{os.path.basename(source)}")
    return {"config": tokenizer.config.model_dump(mode="json"), "vocab_size": int(tokenizer.vocab_size),
            "eod": int(tokenizer.eod), "pad": int(tokenizer.pad),
            "identifiers": json.loads(json.dumps(tokenizer.unique_identifiers)), "files": files}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune(save_dir: Path, keep_last_n: int | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last_n`, and interrupted saves older
    than the newest complete one. Returns the deleted folders."""
    if not keep_last_n:
        return []
    complete = complete_checkpoints(save_dir)
    if not complete:
        return []
    newest = int(_TAG.match(complete[-1].name).group(1))
    doomed = complete[:-keep_last_n] + [f for step, f in tag_folders(save_dir) if step < newest and not is_complete(f)]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def save(engine, cfg: Config, step: int, consumed_samples: int, model=None, topo=None, tokenizer=None) -> str:
    """Collective: every rank writes its files; `latest` moves only after all of them finished.

    With `model` and `topo`, the layout-independent copy is written too (checkpoint.layout_independent)."""
    save_dir = Path(cfg.checkpoint.save_dir)
    tag = tag_for(step)
    folder = save_dir / tag
    if _rank() == 0 and folder.exists():  # an earlier, interrupted save of this step: start clean
        shutil.rmtree(folder)
    _barrier()
    client_state = {
        "step": step, "consumed_samples": consumed_samples,
        "config": config_to_dict(cfg), "megatron_gpt_version": megatron_gpt.__version__,
    }
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    universal = None
    if cfg.checkpoint.layout_independent and model is not None and topo is not None:
        universal = save_universal(engine, model, cfg, topo, folder / UNIVERSAL_DIR)
    _barrier()  # every rank has written every file of this checkpoint
    if _rank() == 0:
        config = config_to_dict(cfg)
        layout = saved_layout(cfg, topo) if topo is not None else None
        if universal is not None:
            write_meta(folder / UNIVERSAL_DIR, {"step": step, "consumed_samples": consumed_samples,
                                                "config": config, "saved_layout": layout, **universal})
        metadata = {
            "format": "megatron-gpt-checkpoint", "version": 1, "tag": tag, "step": step,
            "consumed_samples": consumed_samples, "layout": layout, "precision": cfg.training.precision,
            "layout_independent": UNIVERSAL_DIR if universal is not None else None,
            "tokenizer": _tokenizer_record(tokenizer, folder), "code": code_version(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config,
        }
        _write_atomic(folder / METADATA, json.dumps(metadata, indent=1))
        _write_atomic(save_dir / "latest", tag)
        prune(save_dir, cfg.checkpoint.keep_last_n)
    _barrier()
    return str(folder)


