"""Checkpoint folders may come from someone else: nothing in them is ever unpickled.

Tensors are read only through safetensors and metadata only as JSON. A folder that holds files a
pickle-based loader would open (DeepSpeed's `*_model_states.pt` / `*_optim_states.pt`, `*.bin`,
`*.pt`, ...) is refused as a whole, before anything in it is read: megatron-gpt no longer reads
such files, and they are where crafted payloads live.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_gpt.checkpoint.errors import CheckpointError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def refuse_pickles(folder: Path) -> None:
    """One clear error if `folder` (or anything under it) holds a file a pickle loader would open."""
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if found:
        raise CheckpointError(
            f"{folder}: holds pickle-format files ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}); "
            "megatron-gpt never unpickles checkpoint files (they can run code when loaded); fix: use a checkpoint "
            "written by megatron-gpt (metadata.json + shards/*.safetensors), or remove these files if you wrote "
            "them yourself")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or one clear error (a pickle or a torn file is not JSON)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a JSON file ({type(error).__name__}); fix: use a checkpoint written by "
                              "megatron-gpt, whose metadata is plain JSON") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object; fix: use a checkpoint written by megatron-gpt")
    return value
