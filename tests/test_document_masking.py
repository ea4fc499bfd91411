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


def test_flash_varlen_call_matches_the_sdpa_mask():
    """The GPU path's cu_seqlens (flash-attn is not on this machine): a stand-in with flash-attn's
    varlen signature that attends causally within each [cu_seqlens[i], cu_seqlens[i+1]) of the
    flattened batch gives what SDPA gives with the block-diagonal mask."""
    import torch.nn.functional as F

    from megatron_gpt.data.datasets import document_positions
    from megatron_gpt.model.layers import _flash_varlen, document_mask

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and causal and dropout_p == 0.0
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            out[a:b] = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                      v[a:b].transpose(0, 1), is_causal=True).transpose(0, 1)
        return out

    torch.manual_seed(0)
    tokens = torch.tensor([[3, 4, 0, 5, 6, 7, 0, 8], [9, 9, 9, 0, 1, 0, 2, 3]])
    positions = document_positions(tokens, 0)
    q, k, v = (torch.randn(2, 8, 4, 16) for _ in range(3))  # [batch, seq, heads, head_dim]
    flash = _flash_varlen(varlen, q, k, v, positions, 0.0)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=document_mask(positions)).transpose(1, 2)
    assert flash.shape == q.shape and (flash - sdpa).abs().max() < 1e-6
