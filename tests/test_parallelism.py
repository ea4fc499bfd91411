"""Every (tensor, pipeline, data, ZeRO) layout trains like one process: per-step losses within
1e-4 over 8 steps and step-0 gradients (gathered to full tensors) within 1e-5 relative.

All layouts of one model family run inside one 4-rank torchrun job (tests/parallel_harness.py),
so the matrix pays the process start-up twice, not eighteen times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_harness import layout_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "parallel_harness.py"
# (tensor, pipeline, zero); data parallel is 4 / (tensor x pipeline).
LAYOUTS = [(1, 1, 1), (1, 1, 2), (1, 1, 3), (2, 1, 1), (2, 1, 2), (2, 1, 3), (1, 2, 1), (2, 2, 1), (4, 1, 0)]
# Plain data parallelism over 2 ranks, one thread each: on a host with 2 cores the gradients go
# through DeepSpeed's shared-memory all-reduce (megatron_gpt/parallel/cpu/shared_memory.py), not the engine.
SHARED_MEMORY_LAYOUT = (1, 1, 0)
FAMILIES = ["llama", "neox", "neox-sft-docmask"]
# Features that must not change the numbers (parallel_harness.VARIANTS), each run beside the plain
# layout it is compared with, inside the same 4-rank job. Sequence parallelism needs tensor > 1.
RECOMPUTE_LAYOUTS = [(t, p, 1, variant) for t, p in [(2, 1), (1, 2), (2, 2)]
                     for variant in ("recompute-full", "recompute-selective")]
SEQUENCE_PARALLEL = [(2, 1, 1, "sequence-parallel"), (2, 2, 1, "sequence-parallel")]
VARIANT_LAYOUTS = {"neox": RECOMPUTE_LAYOUTS + SEQUENCE_PARALLEL, "llama": RECOMPUTE_LAYOUTS + SEQUENCE_PARALLEL}


def run_harness(out: Path, family: str, nproc: int, layouts: list[tuple[int, int, int]]) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HARNESS), str(out), family, *[",".join(map(str, layout)) for layout in layouts]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"harness failed:\n{(done.stdout + done.stderr)[-8000:]}"
    return done.stdout


def load_run(out: Path, family: str, layout: tuple) -> tuple[dict, dict, str]:
    """Losses and step-0 gradients of a (tensor, pipeline, zero[, variant]) layout."""
    run_dir = out / layout_name(family, *layout)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    grads: dict[str, torch.Tensor] = {}
    for path in sorted(run_dir.glob("grads-stage*.pt")):
        for name, grad in torch.load(path, weights_only=True).items():
            if name in grads:  # a tied weight seen by two stages: both hold the summed gradient
                assert torch.allclose(grads[name], grad, rtol=1e-6, atol=1e-9), name
            grads[name] = grad
    return losses, grads, run_dir.name


@pytest.fixture(scope="module", params=FAMILIES)
def family_runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"layouts-{request.param}")
    run_harness(out, request.param, 1, [(1, 1, 1)])
    run_harness(out, request.param, 4, LAYOUTS + VARIANT_LAYOUTS.get(request.param, []))
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    run_harness(out, request.param, 2, [SHARED_MEMORY_LAYOUT])
    left = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before
    assert not left, f"shared-memory segments left behind: {sorted(left)}"
    return out, request.param


def differences(base: tuple[dict, dict, str], other: tuple[dict, dict, str]) -> tuple[float, float, str]:
    """(max per-step loss difference, max relative step-0 gradient difference, report line)."""
    (base_losses, base_grads, _), (losses, grads, name) = base, other
    loss_error = max(abs(losses[step] - base_losses[step]) for step in base_losses)
    assert set(grads) == set(base_grads), (name, set(grads) ^ set(base_grads))
    grad_error = max(((grads[k] - g).norm() / g.norm().clamp(min=1e-12)).item() for k, g in base_grads.items())
    return loss_error, grad_error, f"{name}: max loss diff {loss_error:.2e}, max relative grad diff {grad_error:.2e}"


def test_every_layout_matches_one_process(family_runs):
    out, family = family_runs
    base = load_run(out, family, (1, 1, 1))
    assert sorted(base[0]) == list(range(1, 9))
    report = []
    for layout in LAYOUTS + [SHARED_MEMORY_LAYOUT]:
        loss_error, grad_error, line = differences(base, load_run(out, family, layout))
        report.append(line)
        assert loss_error <= 1e-4, report[-1]
        assert grad_error <= 1e-5, report[-1]
    print("\n".join(report))


def test_two_local_ranks_all_reduce_through_shared_memory(family_runs):
    out, family = family_runs
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("2 ranks x 1 thread need 2 cores for the shared-memory all-reduce")
    tensor, pipeline, zero = SHARED_MEMORY_LAYOUT
    used = (out / f"{family}-tp{tensor}-pp{pipeline}-z{zero}" / "gradient-sync.txt").read_text()
    assert used == "shared memory"
    assert (out / f"{family}-tp1-pp1-z1" / "gradient-sync.txt").read_text() == "engine"  # ZeRO-1: DeepSpeed's


def test_variants_match_their_plain_layout(family_runs):
    """recompute (full: 2 blocks per chunk; selective: the attention core) and sequence parallelism:
    the same per-step losses (1e-5) and step-0 gradients (1e-5 relative) as the layout without them,
    and proof each really ran: every rank checkpointed and reran what it should, once per micro-batch
    (training.recompute.COUNTS); under sequence parallelism the blocks ran on [seq/tp, batch, hidden]."""
    out, family = family_runs
    if family not in VARIANT_LAYOUTS:
        pytest.skip(f"no variant layouts for {family}")
    report = []
    for tensor, pipeline, zero, variant in VARIANT_LAYOUTS[family]:
        base = load_run(out, family, (tensor, pipeline, zero))
        run = load_run(out, family, (tensor, pipeline, zero, variant))
        assert sorted(run[0]) == sorted(base[0]) == list(range(1, 9)), run[2]
        loss_error, grad_error, line = differences(base, run)
        report.append(line)
        assert loss_error <= 1e-5, report[-1]
        assert grad_error <= 1e-5, report[-1]
        if variant.startswith("recompute"):
            check_recompute_counts(out, family, tensor, pipeline, zero, variant)
        plain_shape = json.loads((out / base[2] / "block-input-shape.json").read_text())
        assert plain_shape == [2, 64, 64], base[2]  # micro batch 2, tiny.yml: seq 64, hidden 64
        if variant == "sequence-parallel":  # (full recompute calls the blocks past the shape recorder)
            shape = json.loads((out / run[2] / "block-input-shape.json").read_text())
            assert shape == [64 // tensor, 2, 64], (run[2], shape)  # this rank's slice of the sequence
    print("\n".join(report))


def check_recompute_counts(out: Path, family: str, tensor: int, pipeline: int, zero: int, variant: str) -> None:
    """Training micro-batches x (chunks or attention cores on the rank's stage) were checkpointed
    and recomputed on every rank; the plain layout recomputed nothing."""
    blocks_per_stage = 2 // pipeline  # tests/configs/tiny.yml has 2 blocks; stages split them evenly
    micro_batches = 8 * 8 // (2 * (4 // (tensor * pipeline)))  # steps x global batch / (micro x data ranks)
    kind, per_micro_batch = (("block chunk", -(-blocks_per_stage // 2)) if variant == "recompute-full"
                             else ("attention core", blocks_per_stage))  # recompute_num_layers=2
    ranks = json.loads((out / layout_name(family, tensor, pipeline, zero, variant) / "recompute.json").read_text())
    for rank, counts in enumerate(ranks):
        expected = micro_batches * per_micro_batch
        assert counts.get(f"{kind} checkpointed") == expected, (variant, rank, counts, expected)
        assert counts.get(f"{kind} recomputed") == expected, (variant, rank, counts, expected)
    plain = json.loads((out / layout_name(family, tensor, pipeline, zero) / "recompute.json").read_text())
    assert all(set(counts) == {"stage"} for counts in plain), plain
