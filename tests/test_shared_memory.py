"""The shared-memory all-reduce decision (megatron_gpt/parallel/cpu/shared_memory.py): every rank must agree, and
it is only taken where DeepSpeed's kernel can run (one host, a core per thread, room in /dev/shm).
The 2-rank training runs that use it are in tests/test_parallelism.py."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_gpt.parallel.cpu import shared_memory


class FakeGroup:
    """torch.distributed as `prepare` sees it: this rank plus peers that report `others`."""

    def __init__(self, others: list):
        self.others = others

    def get_world_size(self) -> int:
        return 1 + len(self.others)

    def all_gather_object(self, out: list, mine) -> None:
        out[:] = [mine, *self.others]


@pytest.fixture
def local(monkeypatch):
    """A 2-rank world on this host with 2 cores, 1 thread per rank and 1 GiB free in /dev/shm."""
    monkeypatch.setattr(shared_memory, "_cores", lambda: 2)
    monkeypatch.setattr(shared_memory, "_free_bytes", lambda: 2**30)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)

    def world(*others):
        monkeypatch.setattr(shared_memory, "dist", FakeGroup(list(others)))

    return world


def peer(**changes):
    host, free, cores = shared_memory._host(), 2**30, 2
    return (changes.get("host", host), changes.get("free", free), changes.get("cores", cores))


def test_one_host_with_room_uses_shared_memory(local):
    local(peer())
    assert shared_memory.prepare(True)
    assert os.environ["LOCAL_SIZE"] == "2"  # what DeepSpeed's backend reads to map the segments


@pytest.mark.parametrize("why, other", [
    ("another host", peer(host=("elsewhere", "boot", 1))),
    ("too little /dev/shm on a peer (Docker's 64 MiB default)", peer(free=64 * 2**20)),
    ("a peer with no /dev/shm", None),
])
def test_any_rank_that_cannot_turns_it_off_everywhere(local, monkeypatch, why, other):
    local(other)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # as DeepSpeed's launcher sets it
    assert not shared_memory.prepare(True), why
    assert "LOCAL_SIZE" not in os.environ  # else DeepSpeed would map segments that do not fit


def test_more_threads_than_cores_keeps_gloo(local, monkeypatch):
    """The kernel busy-waits for the slowest rank: with 4 ranks on 2 cores a waiting rank would
    take the core of the rank it waits for."""
    local(peer(), peer(), peer())
    assert not shared_memory.prepare(True)
    local(peer())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not shared_memory.prepare(True)


def test_config_switch_and_single_rank(local):
    local(peer())
    assert not shared_memory.prepare(False)
    local()
    assert not shared_memory.prepare(True)


def test_segment_name_is_deepspeeds(monkeypatch):
    """The name DeepSpeed's shm_initialize gives rank 1's workspace (csrc/cpu/comm/shm.cpp), which
    `release` unlinks; the training test checks that nothing is left in /dev/shm."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert shared_memory.segment_name(1) == f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29500_1"


SYNC = """
import os, signal, sys, torch
from megatron_gpt.parallel.cpu import shared_memory
from megatron_gpt.parallel.groups import init_distributed
from megatron_gpt.training import preemption
from megatron_gpt.training.gradients import GradientSync
rank = init_distributed(1, 1, "cpu").rank
params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2))]
sync, watcher = GradientSync(params, 2), preemption.watch()
votes = []
for step in range(2):
    params[0].grad = torch.full((3, 2), rank + 1.0)
    params[1].grad = torch.arange(5.0) * (rank + 1)
    params[2].grad = None  # unused this step: counts as zeros
    if step == 1 and rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    sync(stop_vote=watcher.received is not None)
    votes.append(sync.stop_votes)
print("RESULT", shared_memory.running(), votes, params[0].grad.tolist(), params[1].grad.tolist(),
      params[2].grad.tolist(), params[0].grad.data_ptr() == sync.grads.data_ptr(), flush=True)
"""


def test_gradient_sync_averages_into_one_buffer_and_carries_the_stop_votes():
    """Two real ranks through DeepSpeed's shared-memory kernel: gradients averaged (an unused one
    as zeros) and left as views of one buffer; a signal on rank 1 only is in both ranks' votes."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("2 ranks x 1 thread need 2 cores for the shared-memory all-reduce")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    repo = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen(
        [sys.executable, "-c", SYNC], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}) for rank in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    results = [next((line for line in out.splitlines() if line.startswith("RESULT")), err[-3000:]) for out, err in outs]
    expected = (f"RESULT True [0.0, 1.0] {[[1.5, 1.5]] * 3} {[1.5 * i for i in range(5)]} [0.0, 0.0] True")
    assert results == [expected, expected], results


def test_clipping_the_flat_buffer_equals_torchs_clipping():
    from megatron_gpt.parallel.groups import Topology
    from megatron_gpt.training.gradients import clip_gradients

    torch.manual_seed(0)
    topo = Topology(world_size=1, rank=0, local_rank=0, tensor=1, pipeline=1, data=1, tensor_rank=0,
                    pipeline_rank=0, data_rank=0, device=torch.device("cpu"))
    for max_norm in (0.5, 1e9):  # clipped, and left as it is
        flat = torch.randn(1000)
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (600, 300, 100)]
        for param, grad in zip(params, flat.clone().split([600, 300, 100])):
            param.grad = grad
        norm = clip_gradients(params, max_norm, topo, flat=flat)
        expected = clip_gradients(params, max_norm, topo)
        torch.testing.assert_close(norm, expected)
        torch.testing.assert_close(flat, torch.cat([p.grad for p in params]))
        assert (flat.norm() <= max_norm * (1 + 1e-5)) or max_norm == 1e9
