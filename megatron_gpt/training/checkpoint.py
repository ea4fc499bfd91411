"""Checkpoints: save, pick the one to resume, and resume it in the same or another layout.

A checkpoint is a tag folder `SAVE_DIR/global_stepN` holding

- DeepSpeed's own files (model, optimizer and LR-schedule state of every rank, plus the run's
  step, consumed samples and config in its client state): resuming in the same layout loads these;
- `universal/`: the layout-independent copy (`megatron_gpt.convert.universal`: full fp32 weights
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

import megatron_gpt
from megatron_gpt.config import config_to_dict
from megatron_gpt.config.schema import Config
from megatron_gpt.convert.names import Layout, fit_rows
from megatron_gpt.convert.universal import STATE_KEYS, Universal, is_universal, write_meta, write_shard

METADATA = "metadata.json"
"""Written last into a tag folder: its presence marks the checkpoint complete."""
UNIVERSAL_DIR = "universal"
TOKENIZER_DIR = "tokenizer"
_TAG = re.compile(r"global_step(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the path and the fix."""


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


# --------------------------------------------------------------------------- engine <-> full tensors


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _base_optimizer(engine):
    """The torch optimizer under DeepSpeed's ZeRO / mixed-precision wrappers."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _zero_managed(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _canonical_names(model) -> dict[str, str]:
    from megatron_gpt.training.engine import canonical_names

    return canonical_names(model)


def _full_shape(param) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def _gather_tensor_parallel(value: torch.Tensor, param, tensor: int) -> torch.Tensor:
    """This rank's slice -> the full tensor, concatenated along the partition dimension."""
    if tensor == 1 or not getattr(param, "tensor_model_parallel", False):
        return value
    import torch.distributed as dist
    from megatron.core import parallel_state

    pieces = [torch.empty_like(value) for _ in range(tensor)]
    dist.all_gather(pieces, value.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=param.partition_dim)


def _local_value(engine, param, key: str | None) -> torch.Tensor:
    """This tensor rank's full-over-data-parallel fp32 weight (key None) or optimizer moment.
    Collective over the data-parallel group under ZeRO: every rank calls it in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero_managed(param):
        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        if value is not None:
            return value.detach().float().reshape(_full_shape(param))
    if key is None:
        return param.detach().float()
    state = _base_optimizer(engine).state.get(param, {})
    return state[key].detach().float() if key in state else torch.zeros_like(param, dtype=torch.float32)


def _link_zero_fragments(engine) -> None:
    """ZeRO 1/2: point every parameter's fragment at the optimizer's current state tensors.
    DeepSpeed links them once, right after stepping the first parameter group, when the other
    groups' states do not exist yet; linking again (it is idempotent) fixes that."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state") and hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _optimizer_step(engine) -> int | None:
    steps = [float(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s]
    return int(max(steps)) if steps else None


def save_universal(engine, model, cfg: Config, topo, folder: Path) -> dict[str, Any]:
    """Collective: every rank gathers its stage's full tensors; one rank per pipeline stage writes
    them. Returns what universal.json records about the optimizer (the same on every rank)."""
    import torch.distributed as dist

    names = _canonical_names(model)
    with_states = _optimizer_step(engine) is not None
    if dist.is_initialized():  # every rank must make the same collective calls below
        flag = torch.tensor([int(with_states)], device=next(model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        with_states = bool(flag.item())
    if with_states:
        _link_zero_fragments(engine)
    params: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {key: {} for key in STATE_KEYS} if with_states else {}
    for name, param in model.named_parameters():
        canonical = names[name]
        params[canonical] = _gather_tensor_parallel(_local_value(engine, param, None), param, topo.tensor).cpu()
        for key in states:
            states[key][canonical] = _gather_tensor_parallel(_local_value(engine, param, key), param, topo.tensor).cpu()
    if topo.tensor_rank == 0 and topo.data_rank == 0:
        write_shard(folder, topo.pipeline_rank, params, states)
    optimizer = None
    if with_states:
        optimizer = {"step": _optimizer_step(engine),
                     "lrs": [float(group["lr"]) for group in _base_optimizer(engine).param_groups]}
    scheduler = engine.lr_scheduler.state_dict() if getattr(engine, "lr_scheduler", None) is not None else None
    return {"optimizer": optimizer, "lr_scheduler": _jsonable(scheduler)}


def _jsonable(value: Any) -> Any:
    """The LR-schedule state for universal.json: its JSON-able entries (LambdaLR's are all numbers)."""
    def plain(item: Any) -> bool:
        try:
            json.dumps(item)
            return True
        except TypeError:
            return False

    if isinstance(value, dict):
        return {k: v for k, v in value.items() if plain(v)}
    return value if plain(value) else None


def _slice_for_rank(full: torch.Tensor, param, topo, canonical: str, vocab: set[str]) -> torch.Tensor:
    """The part of the full tensor `full` this rank's `param` holds (a vocabulary padded for
    another tensor size is cut or zero-padded to this layout's padded size first)."""
    shape = list(_full_shape(param))
    split = topo.tensor > 1 and getattr(param, "tensor_model_parallel", False)
    if split:
        shape[param.partition_dim] *= topo.tensor
    if canonical in vocab and full.shape[0] != shape[0]:
        full = fit_rows(full, shape[0])
    if list(full.shape) != shape:
        raise CheckpointError(f"parameter {canonical}: the checkpoint holds shape {tuple(full.shape)}, this run's model "
                              f"needs {tuple(shape)}; fix: use the model section the checkpoint was saved with")
    if split:
        full = full.chunk(topo.tensor, dim=param.partition_dim)[topo.tensor_rank]
    return full


def load_universal_weights(model, cfg: Config, topo, universal: Universal) -> None:
    """Copy each parameter's slice of the universal checkpoint into `model` (before DeepSpeed wraps it)."""
    names = _canonical_names(model)
    full = universal.params()
    vocab = Layout.of(cfg.model).vocab_names()
    missing = sorted(names[n] for n, _ in model.named_parameters() if names[n] not in full)
    if missing:
        raise CheckpointError(f"{universal.folder}: no tensors for {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}; fix: use the model section the checkpoint was "
                              "saved with (e.g. model.tie_embeddings, model.num_layers)")
    with torch.no_grad():
        for name, param in model.named_parameters():
            canonical = names[name]
            param.copy_(_slice_for_rank(full[canonical], param, topo, canonical, vocab).to(param.dtype))


def _ensure_adam_state(engine) -> None:
    """Create AdamW's lazily-initialized state (as torch's first step would) where it is missing.
    ZeRO-3 hands its flat fp32 partitions to the optimizer only while stepping them."""
    optimizer = _base_optimizer(engine)
    pairs = [(group, param) for group in optimizer.param_groups for param in group["params"]]
    pairs += [(optimizer.param_groups[0], param) for param in getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])]
    for group, param in pairs:
        state = optimizer.state[param]
        if state:
            continue
        on_device = group.get("capturable", False) or group.get("fused", False)
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group.get("amsgrad", False):
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def load_universal_optimizer(engine, model, cfg: Config, topo, universal: Universal) -> None:
    """Optimizer moments, step count, learning rates and LR-schedule state into a fresh engine,
    every rank setting its own slice (DeepSpeed's safe_set_* reach into any ZeRO partitioning)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = _canonical_names(model)
    vocab = Layout.of(cfg.model).vocab_names()
    base = _base_optimizer(engine)
    _ensure_adam_state(engine)
    _link_zero_fragments(engine)
    device = next(model.parameters()).device
    if cfg.training.precision != "fp32":  # fp32 master weights beyond the bf16/fp16 module copy
        params = universal.params()
        for name, param in model.named_parameters():
            value = _slice_for_rank(params[names[name]], param, topo, names[name], vocab).to(device, torch.float32)
            safe_set_full_fp32_param(param, value)
    for key in STATE_KEYS:
        full = universal.states(key)
        for name, param in model.named_parameters():
            canonical = names[name]
            value = _slice_for_rank(full[canonical], param, topo, canonical, vocab).to(device, torch.float32)
            if _zero_managed(param):
                safe_set_full_optimizer_state(param, value, key)
            else:
                base.state[param][key].copy_(value.view_as(base.state[param][key]))
    meta = universal.meta["optimizer"]
    for state in base.state.values():
        state["step"].fill_(float(meta["step"]))
    for group, lr in zip(base.param_groups, meta["lrs"]):
        group["lr"] = lr
    scheduler = universal.meta.get("lr_scheduler")
    if scheduler and getattr(engine, "lr_scheduler", None) is not None:
        current = engine.lr_scheduler.state_dict()
        engine.lr_scheduler.load_state_dict({**current, **scheduler})


# --------------------------------------------------------------------------- save


def _layout(cfg: Config, topo) -> dict[str, int]:
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
        layout = _layout(cfg, topo) if topo is not None else None
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


# --------------------------------------------------------------------------- resume / initialize


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
        saved, current = metadata.get("layout"), _layout(cfg, topo)
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

