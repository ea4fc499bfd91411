"""Shared fixtures: running real training jobs (subprocesses, gloo) and reading their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yml"


@dataclass
class Run:
    returncode: int
    output: str
    run_dir: Path

    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def losses(self) -> dict[int, float]:
        """Per-step training loss (averaged over data-parallel ranks), keyed by step."""
        return {r["step"]: r["loss"] for r in self.records() if "loss" in r}

    def evals(self) -> list[dict]:
        return [r for r in self.records() if "val_bpb" in r]


@pytest.fixture(scope="session")
def single_process_group():
    """megatron-core layers need parallel_state even at tp=1: one 1-rank gloo group per session."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    yield


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One preprocessing of the embedded corpus (and its index maps) for the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def train(tmp_path, data_cache):
    """train(*overrides, nproc=1, config=TINY, name=...) -> Run, through the real CLI and launcher."""

    def run(*overrides: str, nproc: int = 1, config: Path = TINY, name: str = "run", timeout: int = 600) -> Run:
        run_dir = tmp_path / name
        command = [sys.executable, "-m", "megatron_gpt", "train", str(config),
                   "--set", f"launcher.nproc_per_node={nproc}",
                   "--set", f"data.cache_dir={data_cache}",
                   "--set", f"logging.run_dir={run_dir}", *[a for o in overrides for a in ("--set", o)]]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        result = Run(done.returncode, done.stdout + done.stderr, run_dir)
        assert done.returncode == 0, f"training failed ({done.returncode}):\n{result.output[-6000:]}"
        return result

    return run
