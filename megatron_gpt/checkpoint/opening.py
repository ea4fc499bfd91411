"""Finding and opening one checkpoint for any reader (resume, init_from, generate, eval, export-hf):
which tag folder a path means, refusing pickle files, reporting interrupted saves, and the
tokenizer that travels inside the tag."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.safety import read_json, refuse_pickles
from megatron_gpt.checkpoint.sharded import FORMAT, SHARDS_DIR, VERSION, Sharded
from megatron_gpt.checkpoint.store import METADATA, TOKENIZER_DIR, complete_checkpoints, latest_tag, tag_folders
from megatron_gpt.config.schema import Config, TokenizerConfig


@dataclass
class Checkpoint:
    """One complete checkpoint: its tag folder, metadata.json and shard files."""

    folder: Path
    meta: dict[str, Any]
    shards: Sharded

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def config(self) -> Config:
        return Config.model_validate(self.meta["config"])

    def tokenizer_config(self, override: str | os.PathLike | None = None) -> TokenizerConfig:
        """The saved tokenizer section, reading its files from the copy inside the tag (the original
        paths may be gone); `override`: a tokenizer file (or a gpt2bpe folder) to use instead."""
        section = self.config.tokenizer
        if override is not None:
            override = Path(override)
            if section.type == "gpt2bpe":
                return section.model_copy(update={"vocab_file": str(override / "encoder.json"),
                                                  "merge_file": str(override / "vocab.bpe")})
            return section.model_copy(update={"path": str(override)})
        update = {}
        for attr in ("path", "vocab_file", "merge_file"):
            original = getattr(section, attr)
            copy = self.folder / TOKENIZER_DIR / os.path.basename(original) if original else None
            if copy is not None and copy.is_file():
                update[attr] = str(copy)
        return section.model_copy(update=update)


def _interrupted(folder: Path) -> CheckpointError:
    complete = complete_checkpoints(folder.parent)
    last = f"the last complete one is {complete[-1].name}" if complete else "there is no complete one beside it"
    return CheckpointError(f"{folder}: an interrupted save (no {METADATA}: not every rank finished writing); {last}; "
                           "fix: pass that tag (--tag, or its folder)")


def resolve(path: str | os.PathLike, tag: str | None = None) -> Path:
    """The tag folder `path` means: `path/tag`, the tag `path/latest` names (else the newest complete
    one), or `path` itself when it is a tag folder."""
    path = Path(path)
    if tag is not None:
        return path / tag
    if (path / METADATA).exists() or (path / SHARDS_DIR).is_dir():
        return path
    latest = latest_tag(str(path)) if path.is_dir() else None
    if latest:
        return path / latest
    complete = complete_checkpoints(path)
    if complete:
        return complete[-1]
    folders = tag_folders(path)
    if folders:
        return folders[-1][1]
    return path


def open_checkpoint(path: str | os.PathLike, tag: str | None = None) -> Checkpoint:
    """Open a complete checkpoint (see `resolve`); one clear error for a missing, interrupted,
    pickled or foreign folder. Nothing is unpickled: metadata is JSON, tensors safetensors."""
    folder = resolve(path, tag)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no checkpoint here; fix: pass checkpoint.save_dir (it holds `latest`), "
                              "a global_step* folder in it, or its tag (--tag)")
    refuse_pickles(folder)
    if not (folder / METADATA).exists():
        if (folder / SHARDS_DIR).is_dir() or folder.name.startswith("global_step"):
            raise _interrupted(folder)
        raise CheckpointError(f"{folder}: no checkpoint here (no {METADATA}); fix: pass checkpoint.save_dir (it holds "
                              "`latest`), a global_step* folder in it, or its tag (--tag)")
    meta = read_json(folder / METADATA)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / METADATA}: not a {FORMAT} checkpoint (format {meta.get('format')!r}); fix: "
                              "use a checkpoint written by this megatron-gpt")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{folder / METADATA}: format version {meta['version']} is newer than this megatron-gpt "
                              f"reads ({VERSION}); fix: upgrade megatron-gpt")
    return Checkpoint(folder, meta, Sharded(folder, list(meta.get("files", []))))
