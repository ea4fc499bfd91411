"""Checkpoint save and load, the previous format against the sharded one, in one run.

Previous format (before issue 16): DeepSpeed's own files (engine.save_checkpoint, pickled) plus a
layout-independent copy that every rank gathered in full (safe_get_full_*) and rank 0 wrote with
torch.save; resume loaded DeepSpeed's files (engine.load_checkpoint). New: each rank writes its own
shard (megatron_gpt.checkpoint.saving), resume reads each rank's slices (engine_state). Both on the
same trained engine, on 2 ranks (dp 2, ZeRO-1), after one optimizer step so AdamW moments exist.

    python bench/checkpoint.py                    # 12 layers x 896 hidden: 116M parameters
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def folder_bytes(folder: Path) -> tuple[int, int]:
    sizes = [p.stat().st_size for p in folder.rglob("*") if p.is_file()]
    return sum(sizes), max(sizes)


def old_save(engine, model, folder: Path, tag: str) -> None:
    """The previous save: DeepSpeed's files, then the full gathered copy written by rank 0."""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megatron_gpt.checkpoint.engine_state import _link_zero_fragments

    _link_zero_fragments(engine)  # as the previous save did: every moment fragment linked
    engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
    full = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, param in model.named_parameters():
        full["params"][name] = safe_get_full_fp32_param(param).cpu()
        for key in ("exp_avg", "exp_avg_sq"):
            full[key][name] = safe_get_full_optimizer_state(param, key).cpu()
    if dist.get_rank() == 0:
        (folder / tag / "universal").mkdir(parents=True, exist_ok=True)
        torch.save(full, folder / tag / "universal" / "stage00.pt")
    dist.barrier()


def rank_main(args) -> None:
    common.quiet()
    import torch.distributed as dist

    from megatron_gpt.checkpoint import Saver, open_checkpoint
    from megatron_gpt.checkpoint.engine_state import load_optimizer, load_weights
    from megatron_gpt.config import load_config
    from megatron_gpt.training.trainer import Trainer

    out = Path(args.out)
    overrides = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.num_attention_heads={args.hidden // 64}",
                 "model.seq_length=64", "training.micro_batch_size=1", "training.global_batch_size=2", "training.train_steps=1",
                 "training.eval_iters=1", f"data.cache_dir={args.cache_dir}", f"logging.run_dir={out / 'run'}",
                 f"checkpoint.save_dir={out / 'new'}", "parallelism.zero_stage=1", "launcher.nproc_per_node=2"]
    cfg = load_config([str(common.REPO / "tests" / "configs" / "tiny.yml")], overrides, world_size=2)
    trainer = Trainer(cfg)
    trainer.train_step(0)
    engine, model, topo = trainer.engine, trainer.model, trainer.topo
    parameters = sum(p.numel() for p in model.parameters())
    times = {}

    def timed(name, job):
        dist.barrier()
        started = time.perf_counter()
        job()
        dist.barrier()
        times[name] = time.perf_counter() - started

    timed("old_save", lambda: old_save(engine, model, out / "old", "global_step1"))
    timed("new_save", lambda: Saver().save(engine, cfg, 1, 2, model, topo, trainer.tokenizer))
    timed("old_load", lambda: engine.load_checkpoint(str(out / "old"), tag="global_step1"))

    def new_load():
        checkpoint = open_checkpoint(out / "new" / "global_step1")
        load_weights(model, cfg, topo, checkpoint.shards)
        load_optimizer(engine, model, cfg, topo, checkpoint.shards, checkpoint.meta)
        checkpoint.shards.close()

    timed("new_load", new_load)
    if dist.get_rank() == 0:
        (out / "times.json").write_text(json.dumps({**times, "parameters": parameters}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    try:
        cache = args.cache_dir or str(work / "cache")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(common.free_port()), os.path.abspath(__file__), "--rank-main", "--out", str(work),
                   "--layers", str(args.layers), "--hidden", str(args.hidden), "--cache-dir", cache]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.REPO)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            return 1
        t = json.loads((work / "times.json").read_text())
        old_bytes, old_largest = folder_bytes(work / "old" / "global_step1")
        new_bytes, new_largest = folder_bytes(work / "new" / "global_step1")
        mib = 2 ** 20
        print(f"checkpoint ({t['parameters'] / 1e6:.0f}M parameters, dp 2, ZeRO-1, CPU): "
              f"save old {t['old_save']:.1f}s / new {t['new_save']:.1f}s; load old {t['old_load']:.1f}s / new "
              f"{t['new_load']:.1f}s; on disk old {old_bytes / mib:.0f} MiB (largest file {old_largest / mib:.0f}) / new "
              f"{new_bytes / mib:.0f} MiB (largest file {new_largest / mib:.0f})", flush=True)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
