"""The sharded format itself, in one process: pieces written under one layout (tensor-parallel
chunks along either dimension, each split into data-parallel flat partitions) read back under
another, by slices; files that safetensors reads; and folders carrying pickles refused unread."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from megatron_gpt.checkpoint.sharded import Piece, Sharded, local_shape, shard_name, write_file


def save_layout(folder, tensors: dict[str, torch.Tensor], tp: int, dim: int, dp: int) -> list[str]:
    """Write each tensor as `tp` chunks along `dim`, each cut into `dp` flat partitions (a file per rank)."""
    files = []
    for t in range(tp):
        for d in range(dp):
            rank = t + tp * d
            payload, index = {}, []
            for name, full in tensors.items():
                split = (dim, tp, t) if dim < full.ndim else (0, 1, 0)  # a 1-D tensor is replicated
                chunk = full.chunk(split[1], dim=split[0])[split[2]].contiguous().reshape(-1)
                size = -(-chunk.numel() // dp)
                start, end = d * size, min((d + 1) * size, chunk.numel())
                piece = Piece("param", name, tuple(full.shape), split, start, end)
                payload[piece.key] = chunk[start:end]
                index.append(piece.to_json())
            write_file(folder / shard_name(rank), payload, {"pieces": json.dumps(index), "rank": "{}"})
            files.append(shard_name(rank))
    return files


@pytest.mark.parametrize("saved", [(2, 0, 3), (2, 1, 2), (1, 0, 4)], ids=["tp2-dim0-dp3", "tp2-dim1-dp2", "tp1-dp4"])
def test_any_layout_reads_back_by_slices(tmp_path, saved):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    full = {"w": torch.randn(12, 6), "b": torch.randn(12), "vocab": torch.randn(8, 4)}
    files = save_layout(tmp_path, full, *saved)
    assert all(v.dtype == torch.float32 for v in load_file(tmp_path / files[0]).values())  # plain safetensors
    shards = Sharded(tmp_path, files)
    assert torch.equal(shards.full("param", "w"), full["w"]) and torch.equal(shards.full("param", "b"), full["b"])
    for tp, dim in [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1)]:
        for k in range(tp):
            want = full["w"].chunk(tp, dim=dim)[k]
            assert torch.equal(shards.read("param", "w", (12, 6), (dim, tp, k)), want)
            flat = want.reshape(-1)  # a ZeRO partition of this chunk: a flat range of it
            assert torch.equal(shards.read("param", "w", (12, 6), (dim, tp, k), 5, 17), flat[5:17])
    # A vocabulary padded differently: rows cut, or zero-padded (only where asked to fit).
    padded = shards.read("param", "vocab", (10, 4), (0, 2, 1), fit=True)
    assert torch.equal(padded[:3], full["vocab"][5:8]) and not padded[3:].any()
    assert torch.equal(shards.read("param", "vocab", (6, 4), fit=True), full["vocab"][:6])
    with pytest.raises(ValueError, match="shape"):
        shards.read("param", "w", (10, 6))
    assert local_shape((12, 6), (1, 2, 0)) == (12, 3)
    shards.close()


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARK']}",))


@pytest.mark.parametrize("where", ["global_step1/mp_rank_00_model_states.pt", "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                   "global_step1/pytorch_model.bin", "global_step1/metadata.json",
                                   "global_step1/shards/rank00000.safetensors"])
def test_pickled_files_are_refused_unread(tmp_path, monkeypatch, where):
    from megatron_gpt.checkpoint import CheckpointError, open_checkpoint

    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    folder = tmp_path / "ckpt" / "global_step1"
    (folder / "shards").mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("global_step1")
    if not where.endswith("metadata.json"):
        (folder / "metadata.json").write_text(json.dumps({"format": "megatron-gpt-sharded", "version": 2,
                                                          "files": ["shards/rank00000.safetensors"], "config": {}}))
    (tmp_path / "ckpt" / where).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(tmp_path / "ckpt")
    assert str(folder) in str(error.value) and "fix:" in str(error.value)
    assert not mark.exists()
