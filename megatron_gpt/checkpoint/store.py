"""Storing checkpoints: tags, `latest`, metadata, pruning (the writing itself: `saving`).

A checkpoint is a tag folder `SAVE_DIR/global_stepN` holding

- `shards/rankNNNNN.safetensors`: what each rank holds (`megatron_gpt.checkpoint.sharded`): its
  tensor/pipeline slice and ZeRO partition of the fp32 weights and AdamW moments, its RNG state;
- `tokenizer/`: a copy of the tokenizer's files (readers use it; the original may be gone);
- `metadata.json`, written last, by rank 0, once every rank's shard file is written: the config,
  the tokenizer (config, vocabulary size, identifiers, copied files), step, consumed samples, the
  optimizer's step and learning rates, the LR-schedule state, the saving layout, the shard files
  and the code version (package version and git commit). A folder without it is an interrupted save.

Only then is `SAVE_DIR/latest` replaced (atomically) by the new tag, and `checkpoint.keep_last_n`
prunes older checkpoints. So `latest` never names a torn checkpoint, and resuming with
`training.auto_resume` takes the newest folder that has its metadata.json, skipping any
interrupted save even if `latest` was edited to name it. Nothing in the folder is a pickle.
`checkpoint.deepspeed_files` also writes DeepSpeed's own (pickled) files, into
`SAVE_DIR/deepspeed/global_stepN`, for DeepSpeed's tools; megatron-gpt never reads them.
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
from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.safety import read_json
from megatron_gpt.checkpoint.sharded import FORMAT, VERSION
from megatron_gpt.config.schema import Config

__all__ = ["CheckpointError", "METADATA", "TOKENIZER_DIR", "DEEPSPEED_DIR", "tag_for", "latest_tag", "read_metadata",
           "is_complete", "tag_folders", "complete_checkpoints", "code_version", "prune", "finalize"]

METADATA = "metadata.json"
"""Written last into a tag folder: its presence marks the checkpoint complete."""
DEEPSPEED_DIR = "deepspeed"
"""SAVE_DIR/deepspeed/global_stepN: DeepSpeed's own files, when checkpoint.deepspeed_files is on."""
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
    return read_json(path) if path.is_file() else None


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


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
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


def tokenizer_record(tokenizer, folder: Path) -> dict[str, Any] | None:
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
        shutil.rmtree(save_dir / DEEPSPEED_DIR / folder.name, ignore_errors=True)
    return doomed


def write_metadata(folder: Path, tag: str, record: dict[str, Any], files: list[str]) -> None:
    """metadata.json (atomically): the record plus format, shard files and code version."""
    metadata = {"format": FORMAT, "version": VERSION, "tag": tag, **record, "files": files, "code": code_version(),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_atomic(folder / METADATA, json.dumps(metadata, indent=1))


def finalize(save_dir: Path, tag: str, record: dict[str, Any], files: list[str], keep_last_n: int | None) -> None:
    """Rank 0, once every rank's shard file is written: metadata.json, then `latest`, then pruning."""
    write_metadata(save_dir / tag, tag, record, files)
    _write_atomic(save_dir / "latest", tag)
    prune(save_dir, keep_last_n)
