"""Checkpoints at scale, on 4 real ranks (gloo): each rank writes only its own shard.

- Memory: a >= 20M-parameter model saved at tp 2 x dp 2 (ZeRO-1) and dp 4 (ZeRO-3): the host
  memory each rank builds for its save (bytes of the tensors it creates, and its RSS high-water
  mark over the save, reset through /proc/self/clear_refs) is at most 1.25x its own shard's bytes.
- No rank writes the full model: at tp 2 x dp 2 the largest file of the tag is below 60% of the
  fp32 weights + AdamW moments of the whole model.
- Async save: the files equal a synchronous save's, training steps go on while the background
  write runs (step timestamps before the write's end), and kill -9 during a background write
  leaves `latest` on the previous complete tag, which resumes with the same losses.

    torchrun --nproc_per_node 4 tests/test_checkpoint_scale.py JOBS.json OUT
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yml"
BIG = ["model.hidden_size=512", "model.num_layers=7", "model.num_attention_heads=8", "model.seq_length=32",
       "training.micro_batch_size=1", "training.global_batch_size=4", "training.train_steps=1", "training.eval_iters=1"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _hwm_kib() -> int:
    return _status_kib("VmHWM")


def harness(jobs_file: str, out: str) -> None:
    """Each job with the real Trainer; per rank: every save's stats, its RSS rise, step end times."""
    import gc
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_gpt.config import load_config
    from megatron_gpt.parallel.groups import init_distributed
    from megatron_gpt.training.trainer import Trainer

    init_distributed(1, 1, "cpu")
    for job in json.loads(Path(jobs_file).read_text()):
        cfg = load_config([str(TINY)], job["overrides"], world_size=dist.get_world_size())
        trainer = Trainer(cfg)
        saves, steps = [], {}
        save, train_step = trainer.saver.save, trainer.train_step

        def measured_save(*args, **kwargs):
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
            before = _hwm_kib()
            assert before <= _status_kib("VmRSS") + 1024, "the RSS high-water mark did not reset"
            folder = save(*args, **kwargs)
            stats = trainer.saver.last
            saves.append({"folder": folder, "rss_rise": (_hwm_kib() - before) * 1024, "shard_bytes": stats.shard_bytes,
                          "built_bytes": stats.built_bytes, "blocked_s": stats.blocked_s, "returned_at": time.time()})
            return folder

        def timed_step(step):
            result = train_step(step)
            steps[step + 1] = time.time()
            return result

        trainer.saver.save, trainer.train_step = measured_save, timed_step
        trainer.run()
        record = {"saves": saves, "steps": steps, "write_finished": trainer.saver.finished,
                  "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())}
        Path(out, f"{job['name']}-rank{dist.get_rank()}.json").write_text(json.dumps(record))
        del trainer
        gc.collect()
        dist.barrier()
        parallel_state.destroy_model_parallel()


SLOW_WRITE = textwrap.dedent('''
    """Test hook: background checkpoint writes sleep MEGATRON_GPT_TEST_SLOW_WRITE seconds before
    renaming a shard into place; "hang:TAG" sleeps for good (until killed) when writing TAG."""
    import os
    import threading
    import time

    _slow = os.environ.get("MEGATRON_GPT_TEST_SLOW_WRITE")
    if _slow:
        _real_replace = os.replace

        def _slow_replace(src, dst, *args, **kwargs):
            if str(dst).endswith(".safetensors") and threading.current_thread() is not threading.main_thread():
                if not _slow.startswith("hang:"):
                    time.sleep(float(_slow))
                elif _slow[5:] in str(dst):
                    time.sleep(1e6)
            return _real_replace(src, dst, *args, **kwargs)

        os.replace = _slow_replace
''')


def common(tmp: Path, data_cache: Path, name: str, *extra: str) -> list[str]:
    return [f"data.cache_dir={data_cache}", f"logging.run_dir={tmp / name}", "logging.plot=false",
            "logging.log_interval=1", "training.eval_iters=1", f"checkpoint.save_dir={tmp / ('ckpt-' + name)}", *extra]


def start(command: list[str], tmp: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    hooks = tmp / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SLOW_WRITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **extra_env}
    return subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            found += [int(c) for c in children]
            queue += [int(c) for c in children]
    return found


def run_harness(jobs: list[dict], tmp: Path, slow: str) -> dict[str, list[dict]]:
    (tmp / "out").mkdir()
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    process = start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                     str(29500 + os.getpid() % 200), str(Path(__file__).resolve()), str(tmp / "jobs.json"),
                     str(tmp / "out")], tmp, {"MEGATRON_GPT_TEST_SLOW_WRITE": slow})
    output, _ = process.communicate(timeout=1500)
    assert process.returncode == 0, output[-6000:]
    return {job["name"]: [json.loads((tmp / "out" / f"{job['name']}-rank{r}.json").read_text()) for r in range(4)]
            for job in jobs}


def test_each_rank_saves_only_its_shard_and_async_matches_sync(tmp_path, data_cache):
    jobs = [
        {"name": "tp2-dp2-zero1", "overrides": common(tmp_path, data_cache, "tp2-dp2-zero1", "parallelism.tensor=2", *BIG)},
        {"name": "dp4-zero3", "overrides": common(tmp_path, data_cache, "dp4-zero3", "parallelism.zero_stage=3", *BIG)},
        {"name": "sync", "overrides": common(tmp_path, data_cache, "sync", "parallelism.tensor=2",
                                             "training.train_steps=5", "checkpoint.save_interval=2")},
        {"name": "async", "overrides": common(tmp_path, data_cache, "async", "parallelism.tensor=2",
                                              "training.train_steps=5", "checkpoint.save_interval=2",
                                              "checkpoint.async_save=true")},
    ]
    result = run_harness(jobs, tmp_path, slow="2")
    report = []
    for name in ("tp2-dp2-zero1", "dp4-zero3"):
        ranks = result[name]
        for rank, record in enumerate(ranks):
            save = record["saves"][-1]
            shard = save["shard_bytes"]
            report.append(f"{name} rank {rank}: shard {shard / 2**20:.1f} MiB, tensors built {save['built_bytes'] / 2**20:.1f} "
                          f"MiB, RSS rise over the save {save['rss_rise'] / 2**20:.1f} MiB")
            assert shard > 0
            assert save["built_bytes"] <= 1.25 * shard, report[-1]
            assert save["rss_rise"] <= 1.25 * shard, report[-1]
    # The whole model's fp32 weights + two moments (the largest file must hold well under it).
    total = result["dp4-zero3"][0]["parameters"] * 12
    tag = tmp_path / "ckpt-tp2-dp2-zero1" / "global_step1"
    largest = max(p.stat().st_size for p in tag.rglob("*") if p.is_file())
    report.append(f"tp2 x dp2 largest file {largest / 2**20:.1f} MiB = {largest / total:.1%} of the model's "
                  f"weights + moments ({total / 2**20:.1f} MiB); parameters {total // 12:,}")
    print("\n".join(report))
    assert total // 12 >= 20_000_000
    assert largest < 0.6 * total, report[-1]
    assert not [p for p in tmp_path.glob("ckpt-*/**/*") if p.suffix in (".pt", ".bin")]

    # Async: the same bytes as a synchronous save; steps 3 and 4 ended while step 2's files were
    # still being written (each write sleeps 2 s before its rename), and only the wait blocked.
    for rank in range(4):
        name = f"global_step2/shards/rank{rank:05d}.safetensors"
        assert (tmp_path / "ckpt-async" / name).read_bytes() == (tmp_path / "ckpt-sync" / name).read_bytes()
    for rank, record in enumerate(result["async"]):
        finished = record["write_finished"]["global_step2"]
        assert record["steps"]["4"] < finished, (rank, record)
        assert record["saves"][0]["blocked_s"] < 1.0
        copied = record["saves"][0]  # the host copy an async save makes: once its shard, no more
        assert copied["shard_bytes"] <= copied["built_bytes"] <= 1.25 * copied["shard_bytes"], copied
    assert (tmp_path / "ckpt-async" / "latest").read_text() == "global_step5"
    assert json.loads((tmp_path / "ckpt-async" / "global_step2" / "metadata.json").read_text())["step"] == 2


def test_kill_during_background_write_keeps_latest_on_the_previous_tag(tmp_path, data_cache):
    from megatron_gpt import checkpoint

    base = [sys.executable, "-m", "megatron_gpt", "train", str(TINY)]
    ckpt = tmp_path / "ckpt-killed"
    sets = common(tmp_path, data_cache, "killed", "parallelism.tensor=2", "launcher.nproc_per_node=2",
                  "training.train_steps=6", "checkpoint.save_interval=2", "checkpoint.async_save=true")
    # Step 2's background write completes; step 4's hangs before its rename, training goes on to
    # step 6, where the final save waits for it: kill -9 the whole job there.
    process = start(base + [a for s in sets for a in ("--set", s)], tmp_path,
                    {"MEGATRON_GPT_TEST_SLOW_WRITE": "hang:global_step4"})
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and '"step": 6' in metrics.read_text():
            break
        time.sleep(0.5)
    time.sleep(1)
    for pid in [process.pid, *descendants(process.pid)]:  # the launcher starts ranks in their own sessions
        os.kill(pid, signal.SIGKILL)
    output, _ = process.communicate()
    assert '"step": 6' in metrics.read_text(), output[-4000:]
    assert (ckpt / "latest").read_text().strip() == "global_step2"
    assert not (ckpt / "global_step4" / "metadata.json").exists()
    assert checkpoint.complete_checkpoints(ckpt) == [ckpt / "global_step2"]

    # Resume: from step 2, with the losses of the killed run.
    sets[1] = f"logging.run_dir={tmp_path / 'resumed'}"
    process = start(base + [a for s in sets for a in ("--set", s)], tmp_path, {})
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    assert "steps 2->6" in output
    killed = {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}
    assert sorted(resumed) == [3, 4, 5, 6]
    assert max(abs(resumed[s] - killed[s]) for s in resumed) <= 1e-6
    assert (ckpt / "latest").read_text().strip() == "global_step6"


if __name__ == "__main__":
    harness(sys.argv[1], sys.argv[2])
