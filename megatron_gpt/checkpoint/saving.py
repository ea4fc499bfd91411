"""Writing a checkpoint: every rank writes one shard file of what it holds, then rank 0 finalizes.

Synchronous: each rank writes its file, all meet at a barrier, rank 0 writes metadata.json and
moves `latest` (store.finalize). Asynchronous (`checkpoint.async_save`): each rank copies its
pieces to host memory and returns to training while a background thread writes them; rank 0's
thread finalizes once every rank's shard file exists in the folder (so the save_dir must be a file
system every rank writes to, as it is for `latest`). The next save, the end of training and a
preemption save first wait for the pending one (then a barrier: every rank's write finished). No
collective runs in a background thread; a process killed mid-write leaves no metadata.json and
`latest` on the previous complete tag.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import megatron_gpt
from megatron_gpt.checkpoint import engine_state, store
from megatron_gpt.checkpoint.sharded import shard_name, write_file
from megatron_gpt.config import config_to_dict
from megatron_gpt.config.schema import Config


@dataclass
class SaveStats:
    """What one rank's save cost: tensor bytes in its shard, host bytes built for them, seconds."""

    shard_bytes: int = 0
    built_bytes: int = 0
    blocked_s: float = 0.0
    file_bytes: int = 0


@dataclass
class Saver:
    """One per training run: saves, keeps at most one background write in flight."""

    pending: threading.Thread | None = None
    pending_tag: str | None = None
    error: BaseException | None = None
    last: SaveStats = field(default_factory=SaveStats)
    finished: dict[str, float] = field(default_factory=dict)
    """Tag -> wall-clock time this rank's shard file of it was in place."""

    def wait(self) -> None:
        """Collective: the pending background write (if any) finished on every rank and is final."""
        if self.pending is not None:
            self.pending.join()
            self.pending, self.pending_tag = None, None
            if self.error is not None:
                error, self.error = self.error, None
                raise RuntimeError(f"the background checkpoint write failed: {error}") from error
        store.barrier()

    def save(self, engine, cfg: Config, step: int, consumed_samples: int, model, topo, tokenizer=None,
             asynchronous: bool = False) -> str:
        """Collective: every rank writes its shard of checkpoint `step`; returns the tag folder."""
        save_dir = Path(cfg.checkpoint.save_dir)
        tag = store.tag_for(step)
        folder = save_dir / tag
        if self.pending_tag == tag:  # preempted right after an async save of this very step
            self.wait()
            return str(folder)
        self.wait()
        started = time.perf_counter()
        if store.rank() == 0 and folder.exists():  # an earlier, interrupted save of this step: start clean
            shutil.rmtree(folder)
        store.barrier()
        if cfg.checkpoint.deepspeed_files:
            engine.save_checkpoint(str(save_dir / store.DEEPSPEED_DIR), tag=tag, save_latest=False)
        with_states = _all_have_states(engine, model)
        tensors, pieces, built = engine_state.collect(engine, model, topo, with_states, copy=asynchronous)
        shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        rng_tensors, rng_other = engine_state.rng_state()
        tensors.update(rng_tensors)
        header = {"pieces": json.dumps([p.to_json() for p in pieces]),
                  "rank": json.dumps({"rank": topo.rank, "layout": store.saved_layout(cfg, topo), "rng": rng_other})}
        path = folder / shard_name(topo.rank)
        record = _record(engine, cfg, step, consumed_samples, topo, tokenizer, folder) if topo.rank == 0 else None
        files = [shard_name(r) for r in range(topo.world_size)]
        self.last = SaveStats(shard_bytes=shard_bytes, built_bytes=built)

        def write() -> None:
            try:
                self.last.file_bytes = write_file(path, tensors, header)
                self.finished[tag] = time.time()
                if record is not None:
                    if asynchronous:
                        _wait_for(folder, files, self)
                    store.finalize(save_dir, tag, record, files, cfg.checkpoint.keep_last_n)
            except BaseException as error:  # re-raised by wait() in the training thread
                self.error = error

        if asynchronous:
            self.pending = threading.Thread(target=write, name=f"checkpoint-{tag}", daemon=True)
            self.pending_tag = tag
            self.pending.start()
            self.last.blocked_s = time.perf_counter() - started
            return str(folder)
        # Synchronous: rank 0 finalizes only after every rank has written (the barrier).
        self.last.file_bytes = write_file(path, tensors, header)
        self.finished[tag] = time.time()
        store.barrier()
        if record is not None:
            store.finalize(save_dir, tag, record, files, cfg.checkpoint.keep_last_n)
        store.barrier()
        self.last.blocked_s = time.perf_counter() - started
        return str(folder)


def _all_have_states(engine, model) -> bool:
    """Whether every rank's optimizer has AdamW moments yet (not before the first step); the same
    answer on every rank, so they all write the same kinds."""
    import torch.distributed as dist

    have = engine_state.optimizer_step(engine) is not None
    if dist.is_initialized():
        flag = torch.tensor([int(have)], device=next(model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        have = bool(flag.item())
    return have


def _record(engine, cfg: Config, step: int, consumed_samples: int, topo, tokenizer, folder: Path) -> dict[str, Any]:
    """metadata.json's content, built by rank 0 at save time (tokenizer files copied now)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"step": step, "consumed_samples": consumed_samples, "layout": store.saved_layout(cfg, topo),
            "precision": cfg.training.precision, **engine_state.optimizer_record(engine),
            "tokenizer": store.tokenizer_record(tokenizer, folder), "config": config_to_dict(cfg),
            "megatron_gpt_version": megatron_gpt.__version__}


def _wait_for(folder: Path, files: list[str], saver: Saver, poll_s: float = 0.05) -> None:
    """Rank 0's writer thread: until every rank's shard file has been renamed into place."""
    while not all((folder / name).is_file() for name in files):
        if not folder.exists():  # removed under us (a later save of the same step started over)
            raise RuntimeError(f"{folder} disappeared while waiting for the other ranks' shard files")
        time.sleep(poll_s)


def write_full(folder: str | os.PathLike, params: dict[str, torch.Tensor], cfg: Config, tokenizer=None) -> Path:
    """A complete one-rank checkpoint of full tensors under canonical names (weights only, step 0):
    what `import-hf` writes for `checkpoint.init_from`. Returns the folder."""
    from megatron_gpt.checkpoint.sharded import Piece

    folder = Path(folder)
    tensors, pieces = {}, []
    for name, tensor in params.items():
        piece = Piece("param", name, tuple(tensor.shape), (0, 1, 0), 0, tensor.numel())
        tensors[piece.key] = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1)
        pieces.append(piece)
    layout = {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 0, "world_size": 1}
    write_file(folder / shard_name(0), tensors, {"pieces": json.dumps([p.to_json() for p in pieces]),
                                                  "rank": json.dumps({"rank": 0, "layout": layout})})
    record = {"step": 0, "consumed_samples": 0, "layout": layout, "precision": cfg.training.precision,
              "optimizer": None, "lr_scheduler": None, "tokenizer": store.tokenizer_record(tokenizer, folder),
              "config": config_to_dict(cfg), "megatron_gpt_version": megatron_gpt.__version__}
    store.write_metadata(folder, folder.name, record, [shard_name(0)])
    return folder
