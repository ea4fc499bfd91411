"""The shared-memory all-reduce decision (megatron_gpt/shared_memory.py): every rank must agree, and
it is only taken where DeepSpeed's kernel can run (one host, a core per thread, room in /dev/shm).
The 2-rank training runs that use it are in tests/test_parallelism.py."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_gpt import shared_memory


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
