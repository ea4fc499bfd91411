"""data.document_masking: packed documents attend only within themselves, with positions that
restart per document (rotary and learned), at tensor-parallel sizes 1 and 2; the layout harness
(tests/test_parallelism.py, family neox-sft-docmask) trains every layout with it on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_positions_restart_after_every_end_of_document():
    from megatron_gpt.data.datasets import document_positions, model_inputs

    tokens = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9], [0, 1, 2, 3, 4, 0, 5, 6]])
    assert document_positions(tokens, 0).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 0, 1]]
    assert model_inputs({"tokens": tokens}) is tokens
    assert model_inputs({"tokens": tokens, "position_ids": tokens})[1] is tokens


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_packed_documents_equal_each_document_alone(tp):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
               str(REPO / "tests" / "document_masking_check.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(result)
    assert result["positions_restart"] == list(range(13)) + list(range(21)) + list(range(11))
    for kind in ("rotary", "learned"):
        assert result[kind]["max_error"] <= 1e-5, (kind, result)
        assert result[kind]["unmasked_error"] > 1e-2  # without masking the later documents see the earlier ones
        assert result[kind]["nats_error"] <= 1e-3  # validation's sum over 45 tokens, float32
