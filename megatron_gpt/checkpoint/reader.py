"""Load a training checkpoint, saved under any layout, as one plain model for inference.

    loaded = load_checkpoint("checkpoints/run")            # the `latest` tag, or tag="global_step100"
    logits = loaded.model(torch.tensor([loaded.tokenizer.encode("To be")]))

DeepSpeed writes a checkpoint differently per layout; every form is read back into the same
single-process GPT (tensor = pipeline = 1, eval mode, CPU, float32):

- pipeline = 1, ZeRO 0-2: `mp_rank_{tp}_model_states.pt`, the module's state under "module".
- pipeline > 1: `layer_{position}-model_{tp}-model_states.pt`, one file per layer of the spec
  list (a tied layer is saved at the first position that owns it).
- ZeRO-3: the module states hold empty placeholders; the full parameters are rebuilt from each
  data-parallel rank's flat fp32 partition (DeepSpeed's zero_to_fp32), per tensor rank.

Tensor-parallel shards are concatenated along each parameter's partition dimension, read from
the megatron-core attributes of a single-process GPT built from the saved config: column-parallel
and vocab-parallel weights (and column biases) along dim 0, row-parallel weights along dim 1,
everything else replicated. The fused QKV is laid out per key/value group, so concatenating its
shards along dim 0 gives the single-process layout. Names go through the layout-independent
canonical names (`GPT.canonical_names`). The padded vocabulary is the model's: nothing is trimmed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_gpt.checkpoint.errors import CheckpointError
from megatron_gpt.checkpoint.restore import resolve_universal
from megatron_gpt.checkpoint.universal import Universal
from megatron_gpt.config import padded_vocab_size
from megatron_gpt.config.schema import Config
from megatron_gpt.data.tokenizer import Tokenizer, build_tokenizer
from megatron_gpt.model import GPT, parallel_config
from megatron_gpt.model.names import canonical_prefix

_LAYER_FILE = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_ZERO3_MODEL_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


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


def resolve_checkpoint_dir(path: str | Path, tag: str | None = None) -> Path:
    """The tag folder holding the model files: `path/tag`, `path/<latest>`, or `path` itself."""
    path = Path(path)
    if tag is not None:
        folder = path / tag
    elif (path / "latest").is_file():
        folder = path / (path / "latest").read_text().strip()
    else:
        folder = path
    if not folder.is_dir() or not any(folder.glob("*model_states.pt")):
        raise CheckpointError(
            f"{folder}: no DeepSpeed checkpoint here (no *model_states.pt); fix: pass checkpoint.save_dir "
            "(it holds `latest`), a global_step* folder in it, or its tag (--tag, tag=)")
    return folder


def _load_tensors(file: Path) -> dict:
    # Model-state and layer files hold tensors, plain containers and numbers only.
    return torch.load(file, map_location="cpu", weights_only=True)


def _client_state(folder: Path) -> dict:
    """The model-state file DeepSpeed stored the client state (step, config) in."""
    candidates = sorted(folder.glob("mp_rank_*_model_states.pt")) + sorted(folder.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    for file in candidates:
        state = _load_tensors(file)
        if "config" in state:
            return state
    raise CheckpointError(f"{folder}: no model-state file holds the run's config; fix: load a checkpoint "
                          "written by `megatron-gpt train` (megatron_gpt.checkpoint.store.save)")


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


def _pipeline_shards(folder: Path, model: GPT) -> dict[int, dict[str, torch.Tensor]]:
    """Per tensor rank: canonical name -> tensor, from per-layer files of a pipeline checkpoint."""
    shards: dict[int, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.glob("layer_*-model_states.pt")):
        match = _LAYER_FILE.search(file.name)
        if match is None:
            continue
        position, tp_rank = int(match.group(1)), int(match.group(2) or 0)
        prefix = canonical_prefix(position, model.specs[position].tie_key)
        for name, tensor in _load_tensors(file).items():
            if isinstance(tensor, torch.Tensor):  # megatron-core layers add `_extra_state: None`
                shards.setdefault(tp_rank, {}).setdefault(f"{prefix}.{name}", tensor)
    return shards


def _module_shards(folder: Path, names: dict[str, str]) -> dict[int, dict[str, torch.Tensor]]:
    """Per tensor rank: canonical name -> tensor, from `mp_rank_XX_model_states.pt` (ZeRO 0-2)."""
    shards = {}
    for file in sorted(folder.glob("mp_rank_*_model_states.pt")):
        module = _load_tensors(file).get("module")
        if module is None:
            continue
        shards[int(_MP_FILE.search(file.name).group(1))] = {
            names[name]: tensor for name, tensor in module.items() if name in names}
    return shards


def _zero3_shards(folder: Path, names: dict[str, str]) -> dict[int, dict[str, torch.Tensor]]:
    """Per tensor rank: canonical name -> tensor, gathered from ZeRO-3's fp32 partitions.

    DeepSpeed's zero_to_fp32 merges the data-parallel partitions of one model-parallel rank, but
    it expects one rank's files in a folder: each tensor rank gets a folder of links to its own."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    by_rank: dict[int, list[Path]] = {}
    for file in folder.glob("*zero_pp_rank_*_mp_rank_*_states.pt"):
        by_rank.setdefault(int(re.search(r"_mp_rank_(\d+)_", file.name).group(1)), []).append(file)
    shards = {}
    for tp_rank, files in sorted(by_rank.items()):
        with tempfile.TemporaryDirectory(prefix="megatron-gpt-zero3-") as view:
            (Path(view) / folder.name).mkdir()
            for file in files:
                (Path(view) / folder.name / file.name).symlink_to(file.resolve())
            # DeepSpeed loads the optimizer-state files with weights_only=False: they pickle its own
            # objects (ZeroStageEnum, LossScaler) beside the fp32 partitions. Its progress output is muted.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(view, tag=folder.name)
        shards[tp_rank] = {names[name]: tensor for name, tensor in state.items() if name in names}
    return shards


def _zero_stage(client: dict) -> int:
    return int(client.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))


def merge_tensor_parallel(model: GPT, shards: dict[int, dict[str, torch.Tensor]], tensor: int,
                          where: Path) -> dict[str, torch.Tensor]:
    """Full tensors, keyed by the model's own parameter names, from per-tensor-rank shards."""
    if sorted(shards) != list(range(tensor)):
        raise CheckpointError(f"{where}: found tensor ranks {sorted(shards)} but the saved config has "
                              f"parallelism.tensor={tensor}; fix: copy the checkpoint folder completely")
    merged = {}
    for name, canonical in model.canonical_names().items():
        param = model.get_parameter(name)
        missing = [rank for rank in range(tensor) if canonical not in shards[rank]]
        if missing:
            raise CheckpointError(f"{where}: parameter {canonical} is missing for tensor ranks {missing}")
        pieces = [shards[rank][canonical] for rank in range(tensor)]
        if tensor > 1 and getattr(param, "tensor_model_parallel", False):
            full = torch.cat(pieces, dim=param.partition_dim)
        else:
            full = pieces[0]  # replicated: every tensor rank holds the same values
        if full.shape != param.shape:
            raise CheckpointError(f"{where}: parameter {canonical} has shape {tuple(full.shape)} after merging "
                                  f"{tensor} tensor ranks, the model built from the saved config expects "
                                  f"{tuple(param.shape)}; fix: load with the tokenizer files the run was trained with")
        merged[name] = full
    return merged


def load_checkpoint(path: str | Path, tag: str | None = None) -> Loaded:
    """Load `path` (checkpoint.save_dir, or one of its tag folders) as a single-process model.

    tag: e.g. "global_step100"; default: the tag named in `path/latest`."""
    folder = resolve_checkpoint_dir(path, tag)
    client = _client_state(folder)
    cfg = Config.model_validate(client["config"])
    tokenizer = build_tokenizer(cfg.tokenizer)
    vocab_size = padded_vocab_size(tokenizer.vocab_size, cfg)  # the saved layout's padding

    ensure_single_process_groups()
    model = GPT(cfg.model, vocab_size, parallel_config(1, 1), seed=cfg.training.seed)
    names = model.canonical_names()
    if any(folder.glob("layer_*-model_states.pt")):
        shards = _pipeline_shards(folder, model)
    elif _zero_stage(client) == 3 or not any(folder.glob("mp_rank_*_model_states.pt")):
        shards = _zero3_shards(folder, names)
    else:
        shards = _module_shards(folder, names)
    merged = merge_tensor_parallel(model, shards, cfg.parallelism.tensor, folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(merged[name].to(param.dtype))
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, cfg=cfg, step=int(client["step"]), path=folder)


@dataclass
class Source:
    """A checkpoint read for export: full fp32 tensors under canonical names (padded vocab)."""

    cfg: Config
    state: dict[str, torch.Tensor]
    tokenizer: Any
    path: Path
    step: int


def read_checkpoint(path: str | os.PathLike, tag: str | None = None) -> Source:
    """Any checkpoint: DeepSpeed files of any layout (via load_checkpoint), or a layout-independent folder."""
    path = Path(path)
    has_deepspeed = any(path.glob("*model_states.pt")) or (path / "latest").is_file() or (tag and (path / tag).is_dir())
    if not has_deepspeed:
        try:
            folder = resolve_universal(path)
        except ValueError:
            folder = None
        if folder is not None:
            universal = Universal.open(folder)
            cfg = Config.model_validate(universal.config)
            state = {k: v.float() for k, v in universal.params().items()}
            return Source(cfg, state, build_tokenizer(cfg.tokenizer), folder, universal.step)
    loaded = load_checkpoint(path, tag)
    names = loaded.model.canonical_names()
    state = {names[name]: param.detach() for name, param in loaded.model.named_parameters()}
    return Source(loaded.cfg, state, loaded.tokenizer, loaded.path, loaded.step)
