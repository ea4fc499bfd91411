"""Load a checkpoint, saved under any layout, as one plain model for inference and export.

    loaded = load_checkpoint("checkpoints/run")            # the `latest` tag, or tag="global_step100"
    logits = loaded.model(torch.tensor([loaded.tokenizer.encode("To be")]))

Every layout's checkpoint is the same sharded format (`megatron_gpt.checkpoint.sharded`): each
parameter's full tensor is rebuilt from the pieces the saving ranks wrote, through safetensors
slices; nothing is unpickled, and a folder holding pickle files is refused (`safety`). The model
is the single-process GPT (tensor = pipeline = 1, eval mode, CPU, float32) built from the saved
config; the padded vocabulary is the saving layout's: nothing is trimmed. The tokenizer comes
from the copy inside the tag (its original file may be gone); `tokenizer=` overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from typing import Any

import torch

from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.opening import Checkpoint, open_checkpoint
from megatron_gpt.config.schema import Config
from megatron_gpt.data.tokenizer import Tokenizer, build_tokenizer
from megatron_gpt.model import GPT, parallel_config
from megatron_gpt.model.names import Prefixes

__all__ = ["CheckpointError", "Loaded", "Source", "load_checkpoint", "read_checkpoint", "ensure_single_process_groups"]


@dataclass
class Loaded:
    """A checkpoint loaded for inference."""

    model: GPT
    """Single-process GPT (tensor = pipeline = 1), eval mode, on CPU, float32."""
    tokenizer: Tokenizer
    """Built from the saved config's tokenizer section."""
    cfg: Config
    """The config the checkpoint was trained with (its parallelism section is the saved layout)."""
    step: int
    """Optimizer steps taken when the checkpoint was saved."""
    path: Path
    """The checkpoint's tag folder (e.g. `.../global_step100`)."""

    @property
    def vocab_size(self) -> int:
        """Rows of the (padded) embedding table: the width of the model's logits."""
        return self.model.vocab_size

    @property
    def context_length(self) -> int:
        return self.cfg.model.seq_length


def ensure_single_process_groups() -> None:
    """megatron-core layers need parallel_state: start a 1-rank gloo group (tp = pp = 1) if none."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != 1
                or parallel_state.get_pipeline_model_parallel_world_size() != 1):
            raise RuntimeError("load_checkpoint builds a single-process model, but megatron-core's parallel_state "
                               "is initialized with tensor or pipeline size > 1 in this process")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


@dataclass
class Source:
    """A checkpoint read for export: full fp32 tensors under canonical names (padded vocab)."""

    cfg: Config
    state: dict[str, torch.Tensor]
    tokenizer: Any
    path: Path
    step: int


def _tokenizer(checkpoint: Checkpoint, override) -> Tokenizer:
    section = checkpoint.tokenizer_config(override)
    try:
        return build_tokenizer(section)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{checkpoint.folder}: cannot build its tokenizer ({error}); fix: pass --tokenizer PATH "
                              "(the tokenizer file the run was trained with)") from None


def read_checkpoint(path: str | os.PathLike, tag: str | None = None, tokenizer: str | os.PathLike | None = None) -> Source:
    """Full fp32 tensors under canonical names (padded vocabulary) of any checkpoint: a training
    save_dir or tag folder of any layout, or an `import-hf` output."""
    checkpoint = open_checkpoint(path, tag)
    cfg = checkpoint.config
    shards = checkpoint.shards
    try:
        state = {name: shards.full("param", name) for name in shards.names("param")}
    finally:
        shards.close()
    return Source(cfg, state, _tokenizer(checkpoint, tokenizer), checkpoint.folder, checkpoint.step)


def load_checkpoint(path: str | Path, tag: str | None = None, tokenizer: str | os.PathLike | None = None) -> Loaded:
    """Load `path` (checkpoint.save_dir, or one of its tag folders) as a single-process model.

    tag: e.g. "global_step100"; default: the tag named in `path/latest`. tokenizer: a tokenizer
    file to use instead of the copy saved in the checkpoint."""
    source = read_checkpoint(path, tag, tokenizer)
    cfg = source.cfg
    ensure_single_process_groups()
    embedding = f"{Prefixes.of(cfg.model).embedding}.word.weight"
    model = GPT(cfg.model, source.state[embedding].shape[0], parallel_config(1, 1), seed=cfg.training.seed,
                vocab_limit=source.tokenizer.vocab_size)  # padding ids never win, as in training
    names = model.canonical_names()
    missing = sorted(c for c in names.values() if c not in source.state)
    if missing:
        raise CheckpointError(f"{source.path}: no tensors for {', '.join(missing[:5])}; fix: copy the checkpoint "
                              "folder completely")
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = source.state[names[name]]
            if value.shape != param.shape:
                raise CheckpointError(f"{source.path}: parameter {names[name]} has shape {tuple(value.shape)}, the model "
                                      f"built from the saved config expects {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
    model.eval()
    return Loaded(model=model, tokenizer=source.tokenizer, cfg=cfg, step=source.step, path=source.path)
