"""What a user watches: MFU arithmetic, the metrics backends, the loss curve."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from megatron_gpt.config.schema import ModelConfig
from megatron_gpt.training.observe.flops import forward_flops_per_token, training_flops_per_token


def test_flops_match_a_hand_count():
    """2 layers, h=64, 4 heads, seq 32, GELU MLP 256, vocab 128, counted by hand per token:
    qkv 2*64*192 + scores and values 4*32*64 + output 2*64*64 + mlp 2*2*64*256, x2 layers,
    + logits 2*64*128; training is 3x forward."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, ffn_hidden_size=256)
    hand = 2 * (24576 + 8192 + 8192 + 65536) + 16384
    assert forward_flops_per_token(cfg, 128) == pytest.approx(hand, rel=0.01)
    assert training_flops_per_token(cfg, 128) == pytest.approx(3 * hand, rel=0.01)
    # Llama style: 8 query heads of 8, 2 kv heads, SwiGLU 192: qkv 2*64*(8+4)*8, mlp 3 matmuls.
    llama = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=8, num_kv_heads=2, seq_length=16,
                        activation="swiglu", ffn_hidden_size=192)
    hand = (2 * 64 * 96) + (4 * 16 * 64) + (2 * 64 * 64) + (3 * 2 * 64 * 192) + 2 * 64 * 256
    assert forward_flops_per_token(llama, 256) == pytest.approx(hand, rel=0.01)


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline wandb run: the file is a LevelDB-style log (7-byte header,
    32 KiB blocks, records of crc32 + length + type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, chunks, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        payload, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind == 0 and length == 0:
            continue
        chunks += payload
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.HasField("history"):
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.slow
def test_backends_and_loss_curve(train):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    run = train("logging.tensorboard=true", "logging.wandb_mode=offline", "logging.log_interval=3",
                "training.eval_interval=5")
    losses = run.losses()
    assert sorted(losses) == list(range(1, 11))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.run_dir / "tensorboard"))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("loss")}
    assert sorted(logged) == sorted(losses)
    assert all(abs(logged[s] - losses[s]) < 1e-6 for s in losses)
    assert [e.step for e in events.Scalars("val_bpb")] == [5, 10]

    (run_file,) = (run.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = {row["_step"]: row for row in wandb_history(run_file) if "loss" in row}
    assert sorted(history) == sorted(losses)
    assert all(abs(history[s]["loss"] - losses[s]) < 1e-6 for s in losses)

    import matplotlib.image

    png = run.run_dir / "loss.png"
    pixels = matplotlib.image.imread(str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pixels.shape[0] > 100
    assert pixels[..., :3].std() > 0.05  # a drawn figure, not a blank canvas
    assert any("mfu" in r or "tflops_per_rank" in r for r in run.records())
