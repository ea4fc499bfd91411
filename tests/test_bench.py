"""Smoke tests of bench/: each benchmark runs a couple of steps from the checkout and prints its one
summary line on stdout (the numbers themselves are measured by running the scripts in full)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-6000:]}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"{script} should print one summary line on stdout, got:\n{done.stdout}"
    return lines[0]


def test_train_throughput(data_cache):
    line = bench("train_throughput.py", "--sizes", "small", "--families", "gpt2,llama", "--windows", "2",
                 "--max-windows", "2", "--steps", "2", "--warmup", "1", "--cache-dir", str(data_cache))
    assert line.startswith("train_throughput: full stack / plain PyTorch:"), line
    ratios = [float(x) for x in re.findall(r"small-(?:gpt2|llama) ([0-9.]+) \(", line)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios), line
    compiled = re.findall(r"small-(?:gpt2|llama) x([0-9.]+) \([0-9,]+ vs [0-9,]+ tokens/s, compile \d+s\)", line)
    assert "| compiled / eager: " in line and len(compiled) == 2 and all(float(r) > 0 for r in compiled), line


def test_scaling(data_cache):
    line = bench("scaling.py", "--sizes", "small", "--layouts", "dp1,dp2,dp2-nosync,pp2", "--rounds", "1", "--max-rounds", "1",
                 "--steps", "1", "--warmup", "1", "--cache-dir", str(data_cache))
    assert line.startswith("scaling:"), line
    for layout in ("dp2", "dp2-nosync", "pp2"):
        assert re.search(rf"{layout} x[0-9.]+", line), (layout, line)
    assert re.search(r"single-thread jitter [0-9.]+%", line), line


def test_mfu(data_cache):
    line = bench("mfu.py", "--sizes", "small", "--windows", "1", "--max-windows", "1", "--steps", "1", "--warmup", "1",
                 "--matmul-size", "256", "--cache-dir", str(data_cache))
    assert re.match(r"mfu \(CPU, fp32\): small [0-9.]+%( \(BUSY\))? \([0-9.,]+ of [0-9.,]+ GFLOP/s matmul", line), line


def test_checkpoint(data_cache):
    line = bench("checkpoint.py", "--layers", "1", "--hidden", "128", "--cache-dir", str(data_cache))
    assert re.match(r"checkpoint \(\d+M parameters, dp 2, ZeRO-1, CPU\): save old [0-9.]+s / new [0-9.]+s; load old "
                    r"[0-9.]+s / new [0-9.]+s; on disk old \d+ MiB \(largest file \d+\) / new \d+ MiB", line), line


def test_gpu_script_is_valid_and_says_when_there_is_no_gpu():
    script = REPO / "bench" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run bench/gpu.sh itself")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and "no CUDA-enabled torch or sees no GPU" in done.stderr, done.stderr


def test_memory_bench_says_when_there_is_no_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run bench/memory.py itself")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--sizes", "125m"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr, done.stderr
