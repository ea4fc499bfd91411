"""Checkpoints: resharding on resume, and hygiene (no torn `latest`, auto-resume, keep_last_n, metadata).

- Reshard: 10 steps at (tp=2, pp=1, dp=2) saving at step 6 are the uninterrupted run; its step-6
  checkpoint resumed at (tp=1, pp=2, dp=2) and at (tp=1, pp=1, dp=4) must give the same losses
  for steps 7-10 (within 1e-4), weights and AdamW states both coming from the layout-independent copy.
- Killed save: a rank dies halfway through writing its files of the step-6 checkpoint; `latest`
  still names step 3, the step-6 folder has no metadata.json, and auto-resume continues from step 3
  with the losses of the original run.

This file is also the multi-layout harness these tests (and tests/test_convert.py) run under one
torchrun job, so the ranks start once for several Trainer runs:

    torchrun --nproc_per_node N tests/test_checkpoints.py JOBS.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yml"


# --------------------------------------------------------------------------- harness (runs under torchrun)


def harness(jobs_file: str) -> None:
    """Run each job of JOBS.json with the real Trainer, one after another, in one process group.

    A job: {"name", "configs": [...], "overrides": [...], "copy": [[src, dst]...] (rank 0, before),
    "dump_batches": path (rank 0 saves the first step's micro-batches)}."""
    import gc
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_gpt.config import load_config
    from megatron_gpt.parallel.groups import init_distributed
    from megatron_gpt.training.trainer import Trainer

    init_distributed(1, 1, "cpu")
    world = dist.get_world_size()
    for job in json.loads(Path(jobs_file).read_text()):
        if dist.get_rank() == 0:
            for src, dst in job.get("copy", []):
                shutil.copytree(src, dst, dirs_exist_ok=True)
        dist.barrier()
        cfg = load_config(job["configs"], job["overrides"], world_size=world)
        trainer = Trainer(cfg)
        if job.get("dump_batches") and dist.get_rank() == 0:
            torch.save(trainer.micro_batches(trainer.start_step), job["dump_batches"])
        trainer.run()
        del trainer
        gc.collect()
        dist.barrier()
        parallel_state.destroy_model_parallel()
        if dist.get_rank() == 0:
            print(f"harness: job {job['name']} done", flush=True)


def run_jobs(jobs: list[dict], tmp: Path, nproc: int = 4, timeout: int = 900) -> str:
    """Start the harness under torchrun; returns its output (fails the test if it fails)."""
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29700 + os.getpid() % 200), str(Path(__file__).resolve()), str(jobs_file)]
    done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"harness failed ({done.returncode}):\n{output[-6000:]}"
    return output


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def common_overrides(tmp: Path, data_cache: Path, name: str, *extra: str) -> list[str]:
    return [f"data.cache_dir={data_cache}", f"logging.run_dir={tmp / name}", "logging.plot=false",
            "logging.log_interval=1", "training.eval_iters=1", "training.micro_batch_size=2",
            "training.global_batch_size=8", *extra]


# --------------------------------------------------------------------------- reshard


def test_resume_in_another_layout_matches_an_uninterrupted_run(tmp_path, data_cache):
    saved = tmp_path / "ckpt-tp2-dp2"
    # name: (overrides, checkpoint it starts from, first step it trains, what the note says)
    layouts = {
        "tp1-pp2-dp2": (["parallelism.pipeline=2"], saved / "global_step6", 7, "tp 1 x pp 2 x dp 2, ZeRO 1"),
        # dp=4 under ZeRO-3, saving at step 8 (into its own start folder); then back to the first
        # layout from that ZeRO-3 checkpoint (the copy happens when the job starts).
        "tp1-pp1-dp4": (["parallelism.zero_stage=3", "checkpoint.save_interval=2"], saved / "global_step6", 7,
                        "tp 1 x pp 1 x dp 4, ZeRO 3"),
        "back-to-tp2-dp2": (["parallelism.tensor=2"], tmp_path / "start-tp1-pp1-dp4" / "global_step8", 9,
                            "tp 2 x pp 1 x dp 2, ZeRO 1"),
    }
    jobs = [{"name": "straight", "configs": [str(TINY)], "overrides": common_overrides(
        tmp_path, data_cache, "straight", "parallelism.tensor=2", "training.train_steps=10",
        "checkpoint.save_interval=6", f"checkpoint.save_dir={saved}")}]
    for name, (overrides, source, _, _) in layouts.items():
        jobs.append({"name": name, "configs": [str(TINY)],
                     "copy": [[str(source), str(tmp_path / f"start-{name}" / source.name)]],
                     "overrides": common_overrides(tmp_path, data_cache, name, "training.train_steps=10",
                                                   f"checkpoint.save_dir={tmp_path / f'start-{name}'}", *overrides)})
    output = run_jobs(jobs, tmp_path)

    straight = losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 11))
    report = []
    for name, (_, source, first, note) in layouts.items():
        assert f"resuming from {tmp_path / f'start-{name}' / source.name}" in output
        assert f"resharded to {note}" in output
        resumed = losses(tmp_path / name)
        assert sorted(resumed) == list(range(first, 11)), resumed  # it continued, not from scratch
        error = max(abs(resumed[s] - straight[s]) for s in resumed)
        report.append(f"{name} from {source.name}: max |loss - uninterrupted| over steps {first}-10 = {error:.2e}")
        assert error <= 1e-4, report[-1]
    print("\n".join(report))


# --------------------------------------------------------------------------- hygiene

DIE_DURING_SAVE = textwrap.dedent('''
    """Test fault: the rank named by MEGATRON_GPT_TEST_DIE ("RANK:TAG") dies while saving TAG,
    after writing half of its shard file there (before renaming it into place)."""
    import os

    _spec = os.environ.get("MEGATRON_GPT_TEST_DIE", "")
    if _spec and os.environ.get("RANK") == _spec.split(":")[0]:
        _tag, _real_replace = _spec.split(":")[1], os.replace

        def _dying_replace(src, dst, *args, **kwargs):
            if _tag in str(dst) and str(dst).endswith(".safetensors"):
                os.truncate(src, os.path.getsize(src) // 2)
                os._exit(1)
            return _real_replace(src, dst, *args, **kwargs)

        os.replace = _dying_replace
''')


def test_a_save_killed_midway_leaves_latest_on_the_previous_checkpoint(tmp_path, data_cache):
    from megatron_gpt.config import load_config
    from megatron_gpt import checkpoint

    ckpt = tmp_path / "ckpt"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(DIE_DURING_SAVE)
    base = [sys.executable, "-m", "megatron_gpt", "train", str(TINY)]
    sets = common_overrides(tmp_path, data_cache, "first", "parallelism.tensor=2", "launcher.nproc_per_node=2",
                            "training.train_steps=6", "checkpoint.save_interval=3", f"checkpoint.save_dir={ckpt}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MEGATRON_GPT_TEST_DIE": "1:global_step6"}
    first = subprocess.run(base + [a for s in sets for a in ("--set", s)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode != 0, "the rank was meant to die while saving step 6"

    # Rank 1 wrote half of its shard file, then died: the step-6 folder exists, without
    # metadata.json and without rank 1's shard, and `latest` still names step 3.
    torn = ckpt / "global_step6"
    assert (torn / "shards" / "rank00000.safetensors").is_file()
    assert not (torn / "shards" / "rank00001.safetensors").exists()
    assert not (torn / checkpoint.METADATA).exists()
    assert (ckpt / "latest").read_text().strip() == "global_step3"
    assert checkpoint.complete_checkpoints(ckpt) == [ckpt / "global_step3"]

    # Even a `latest` pointing at the torn folder does not fool auto-resume; without it, an error says why.
    (ckpt / "latest").write_text("global_step6")
    cfg = load_config([str(TINY)], [f"checkpoint.save_dir={ckpt}", f"data.cache_dir={data_cache}"])
    assert checkpoint.find_resume(cfg) == ckpt / "global_step3"
    strict = load_config([str(TINY)], [f"checkpoint.save_dir={ckpt}", f"data.cache_dir={data_cache}",
                                       "training.auto_resume=false"])
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.find_resume(strict)

    # Resume: from step 3, same losses as the run that died; saves every step keeping the last two.
    sets = common_overrides(tmp_path, data_cache, "second", "parallelism.tensor=2", "launcher.nproc_per_node=2",
                            "training.train_steps=6", "checkpoint.save_interval=1", "checkpoint.keep_last_n=2",
                            f"checkpoint.save_dir={ckpt}")
    env.pop("MEGATRON_GPT_TEST_DIE")
    second = subprocess.run(base + [a for s in sets for a in ("--set", s)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "steps 3->6" in second.stdout
    died, resumed = losses(tmp_path / "first"), losses(tmp_path / "second")
    assert sorted(resumed) == [4, 5, 6]
    assert max(abs(resumed[s] - died[s]) for s in resumed) <= 1e-6

    assert (ckpt / "latest").read_text().strip() == "global_step6"
    assert sorted(p.name for p in ckpt.glob("global_step*")) == ["global_step5", "global_step6"]  # keep_last_n=2
    metadata = json.loads((ckpt / "global_step6" / checkpoint.METADATA).read_text())
    assert metadata["step"] == 6 and metadata["consumed_samples"] == 6 * 8
    assert metadata["config"]["parallelism"]["tensor"] == 2
    assert metadata["layout"] == {"tensor": 2, "pipeline": 1, "data": 1, "zero_stage": 1, "world_size": 2}
    assert metadata["tokenizer"]["vocab_size"] == 2048 and metadata["tokenizer"]["config"]["type"] == "embedded"
    assert (ckpt / "global_step6" / metadata["tokenizer"]["files"][0]).is_file()
    assert metadata["code"]["megatron_gpt"] and "torch" in metadata["code"]
    assert metadata["optimizer"]["step"] == 6 and metadata["files"] == ["shards/rank00000.safetensors",
                                                                        "shards/rank00001.safetensors"]


if __name__ == "__main__":
    harness(sys.argv[1])
