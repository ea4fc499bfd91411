"""parallelism.sequence_parallel: its config checks, the DeepSpeed settings it needs, and, in a
real 2-process tensor-parallel run (gloo), the same numbers as tp 2 without it with fewer saved
activation bytes. The layout matrix (tests/test_parallelism.py) runs it through the Trainer at
tp 2 and tp 2 x pp 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gpt.config import ConfigError, deepspeed_config, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.yml")


def test_sequence_parallel_needs_tensor_parallelism():
    with pytest.raises(ConfigError) as info:
        load_config([TINY], ["parallelism.sequence_parallel=true"])
    message = str(info.value)
    assert "parallelism.sequence_parallel: needs tensor parallelism" in message
    assert "parallelism.tensor=1 (default)" in message
    assert "fix: set parallelism.tensor to 2 or more, or parallelism.sequence_parallel to false" in message


def test_sequence_parallel_needs_a_sequence_the_tensor_ranks_split_evenly():
    with pytest.raises(ConfigError, match=r"model.seq_length: 66 is not divisible by parallelism.tensor=4 .*"
                                          r"fix: set model.seq_length to a multiple of 4, e.g. 68"):
        load_config([TINY], ["parallelism.sequence_parallel=true", "parallelism.tensor=4", "model.seq_length=66",
                             "launcher.nproc_per_node=4"])


def test_pipeline_stages_send_each_tensor_ranks_own_slice():
    """DeepSpeed's pipeline splits a stage's output over the tensor ranks as if all held the same
    tensor; under sequence parallelism each holds its own slice of the sequence."""
    base = ["parallelism.tensor=2", "parallelism.pipeline=2", "launcher.nproc_per_node=4"]
    assert "pipeline" not in deepspeed_config(load_config([TINY], base))
    split = deepspeed_config(load_config([TINY], base + ["parallelism.sequence_parallel=true"]))
    assert split["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}


@pytest.mark.slow
def test_sequence_parallel_saves_activations_and_keeps_the_numbers(tmp_path):
    """8 layers at tp 2: what autograd saves (tests/activation_bytes_sp.py) with sequence
    parallelism is at most 85% of without it (Megatron's accounting predicts ~77%), the loss and
    gradients are the same, and the blocks really ran on [seq/2, batch, hidden]."""
    out = tmp_path / "bytes.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "activation_bytes_sp.py"), str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    result = json.loads(out.read_text())
    print(f"saved activation bytes at tp 2: {result['tp2_bytes']} without, {result['tp2_sp_bytes']} with sequence "
          f"parallelism ({result['ratio']:.1%}); loss diff {result['loss_diff']:.1e}, "
          f"max relative grad diff {result['max_relative_grad_diff']:.1e}")
    assert result["block_input_shape"] == {"tp2": [2, 256, 128], "tp2_sp": [128, 2, 128]}
    assert result["ratio"] <= 0.85
    assert result["loss_diff"] <= 1e-5
    assert result["max_relative_grad_diff"] <= 1e-5
    assert result["dropout"]["replayed"] and result["dropout"]["ranks_differ"], result["dropout"]
    assert 0.4 <= result["dropout"]["kept"] <= 0.6, result["dropout"]
    # The memory plan (`megatron-gpt layout`) predicts both within 10%.
    from activation_bytes_sp import MICRO_BATCH, SHAPE, VOCAB

    from megatron_gpt.training.memory_plan import model_activation_bytes

    for key, sequence_parallel in (("tp2_bytes", "false"), ("tp2_sp_bytes", "true")):
        cfg = load_config([TINY], SHAPE + ["parallelism.tensor=2", "launcher.nproc_per_node=2", "training.device=cpu",
                                           f"training.micro_batch_size={MICRO_BATCH}",
                                           f"parallelism.sequence_parallel={sequence_parallel}"])
        planned = model_activation_bytes(cfg, VOCAB, device="cpu")
        print(f"{key}: plan {planned:,.0f} / measured {result[key]:,} = {planned / result[key]:.3f}")
        assert abs(planned / result[key] - 1) <= 0.10, (key, planned, result[key])
