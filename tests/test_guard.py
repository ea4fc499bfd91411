"""Divergence guard with real processes: a non-finite loss on one rank skips the step on every
rank (parameters, optimizer state and LR unchanged), skips are counted in metrics.jsonl, and
training.max_skipped_steps in a row stop the run with exit code 65 and a message naming the step;
no checkpoint holds a non-finite tensor. Plain (dp 2) and pipeline (pp 2) engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.slow


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)


def checkpoint_tensors(folder: Path) -> dict[str, list[torch.Tensor]]:
    """Every tensor of every file of one global_stepN folder (our own test output, so DeepSpeed's
    pickled optimizer files may be unpickled here)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            out[str(path.relative_to(folder))] = list(load_file(path).values())
        elif path.suffix == ".pt":
            out[str(path.relative_to(folder))] = list(tensors(torch.load(path, weights_only=False)))
    return out


def diverging_run(tmp_path: Path, data_cache: Path, *overrides: str, nproc: int = 2):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    command = [sys.executable, "-m", "megatron_gpt", "train", str(TINY),
               "--set", f"launcher.nproc_per_node={nproc}", "--set", f"data.cache_dir={data_cache}",
               "--set", f"logging.run_dir={run_dir}", "--set", f"checkpoint.save_dir={ckpt}",
               "--set", "checkpoint.save_interval=1", "--set", "logging.log_interval=1",
               "--set", "training.max_skipped_steps=3", "--set", "training.train_steps=8",
               *[a for o in overrides for a in ("--set", o)]]
    # 0-based steps: step 3 is skipped alone, then steps 5, 6, 7 in a row stop the run at step 7
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEGATRON_GPT_FAULT_NAN_STEPS": "2,4,5,6"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return done, records, ckpt


def check_divergence(done, records, ckpt: Path):
    output = done.stdout + done.stderr
    assert done.returncode == 65, output[-4000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert "training diverged: 3 steps in a row were skipped" in last_line and "at step 7" in last_line, last_line
    skipped = {r["step"]: r["skipped_steps"] for r in records if "skipped_steps" in r}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3, 7: 4}, skipped
    assert "| skipped 1 |" in output and "step 3: skipped" in output
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[4] == lrs[3]  # the skipped step did not advance the LR schedule
    # the skipped step 3 changed nothing: every tensor of checkpoint 3 equals checkpoint 2's
    before, after = checkpoint_tensors(ckpt / "global_step2"), checkpoint_tensors(ckpt / "global_step3")
    assert before.keys() == after.keys() and before
    compared = 0
    for name in before:
        for a, b in zip(before[name], after[name]):
            if a.is_floating_point():
                assert torch.equal(a, b), name
                compared += a.numel()
    assert compared > 1000
    # step 4 was applied: parameters moved
    moved = checkpoint_tensors(ckpt / "global_step4")
    assert any(not torch.equal(a, b) for name in before for a, b in zip(before[name], moved[name])
               if a.is_floating_point())
    latest = ckpt / (ckpt / "latest").read_text().strip()
    assert latest.name == "global_step6"  # step 7, which ended the run, saved nothing
    last = checkpoint_tensors(latest)  # skipped steps 5 and 6: still step 4's tensors
    assert all(torch.equal(a, b) for name in moved for a, b in zip(moved[name], last[name]) if a.is_floating_point())
    for name, values in last.items():
        for value in values:
            if value.is_floating_point():
                assert torch.isfinite(value).all(), name


def test_non_finite_loss_skips_on_every_rank_and_stops_the_run(tmp_path, data_cache):
    check_divergence(*diverging_run(tmp_path, data_cache))


def test_non_finite_loss_under_pipeline_parallelism(tmp_path, data_cache):
    done, records, ckpt = diverging_run(tmp_path, data_cache, "parallelism.pipeline=2")
    assert "pp 2" in done.stdout, done.stdout[-3000:]
    check_divergence(done, records, ckpt)


class FakeOptimizer:
    """A torch optimizer as DeepSpeed's engine calls it: step() then zero_grad()."""

    def __init__(self, param):
        self.param, self.steps = param, 0

    def step(self):
        self.param.data -= 0.1 * self.param.grad
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        self.param.grad = None


def test_spike_guard_skips_a_loss_far_above_the_recent_median():
    from megatron_gpt.parallel.groups import Topology
    from megatron_gpt.training.guard import Diverged, StepGuard

    param = torch.nn.Parameter(torch.ones(3))
    engine = type("Engine", (), {})()
    engine.optimizer = FakeOptimizer(param)
    topo = Topology.__new__(Topology)
    object.__setattr__(topo, "shared_memory", False)
    guard = StepGuard(engine, topo, [param], max_skipped=2, spike_factor=3.0)
    losses = [5.0, 4.9, 4.8, 4.7, 4.6, 4.5, 30.0, 4.4, float("inf"), 40.0]
    skipped = []
    for step, loss in enumerate(losses):
        param.grad = torch.ones(3)
        guard.loss = torch.tensor(loss)
        before = param.detach().clone()
        engine.optimizer.step()
        assert torch.equal(param, before) == (step in (6, 8, 9)), step  # a skipped step changes nothing
        try:
            guard.after_step(step)
        except Diverged as error:
            assert step == 9 and "2 steps in a row" in str(error) and "at step 10" in str(error)
            break
        skipped.append(guard.skipped_total)
    # step 7 (30.0 > 3 x median 4.7) and step 9 (inf) skipped; steps 9 and 10 in a row stop the run
    assert skipped == [0, 0, 0, 0, 0, 0, 1, 1, 2] and engine.optimizer.steps == 7


def test_non_finite_loss_under_zero_1(tmp_path, data_cache):
    """ZeRO-1 keeps the reduced gradients in its own buffers: a skip must drop them too."""
    check_divergence(*diverging_run(tmp_path, data_cache, "parallelism.zero_stage=1"))
