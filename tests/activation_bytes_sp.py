"""Run under torchrun with 2 ranks (tensor-parallel size 2, gloo): build the same 8-layer GPT
without and with sequence parallelism and write, from rank 0, what autograd saves for the
backward of one training micro-batch (forward + loss) in each, plus the loss and the gathered
gradients' largest relative difference between the two, and a check of the sequence-parallel
dropout's per-rank streams, to OUT (JSON).

    torchrun --nproc_per_node 2 tests/activation_bytes_sp.py OUT.json [--set key=value ...]

The bytes are tests/activation_bytes.py's saved_bytes (each storage once, parameters excluded).
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from activation_bytes import saved_bytes  # noqa: E402

SHAPE = ["model.num_layers=8", "model.hidden_size=128", "model.num_attention_heads=4", "model.seq_length=256",
         "model.dropout=0.0"]
MICRO_BATCH = 2
VOCAB = 512


@contextmanager
def block_input_shapes():
    """Record the shape of the hidden states each transformer block receives (GPT calls a
    layer's forward directly, so a module hook would not fire: the class method is wrapped)."""
    from megatron_gpt.model.layers import Block, split_positions

    shapes, forward = [], Block.forward

    def recording(self, inputs, *args, **kwargs):
        shapes.append(list(split_positions(inputs)[0].shape))
        return forward(self, inputs, *args, **kwargs)

    Block.forward = recording
    try:
        yield shapes
    finally:
        Block.forward = forward


def full_gradients(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient gathered over the tensor ranks, by canonical name."""
    from megatron.core import parallel_state

    names, grads = model.canonical_names(), {}
    group = parallel_state.get_tensor_model_parallel_group()
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        if getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(grad) for _ in range(group.size())]
            dist.all_gather(pieces, grad.contiguous(), group=group)
            grad = torch.cat(pieces, dim=param.partition_dim)
        grads[names[name]] = grad
    return grads


def measure(overrides: list[str], sequence_parallel: bool) -> dict:
    from megatron_gpt.config import load_config
    from megatron_gpt.model import GPT, masked_mean, parallel_config, token_losses

    cfg = load_config([str(Path(__file__).parent / "configs" / "tiny.yml")],
                      SHAPE + overrides + ["parallelism.tensor=2", "launcher.nproc_per_node=2",
                                           f"parallelism.sequence_parallel={str(sequence_parallel).lower()}"])
    model = GPT(cfg.model, VOCAB, parallel_config(2, 1, sequence_parallel=sequence_parallel), seed=3)
    generator = torch.Generator().manual_seed(11)  # the same batch on both ranks
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, cfg.model.seq_length + 1), generator=generator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        return masked_mean(token_losses(model(inputs), labels, 2), torch.ones_like(labels, dtype=torch.float32))

    with block_input_shapes() as shapes:
        nbytes, loss = saved_bytes(step, exclude=model.parameters())
    loss.backward()
    return {"bytes": nbytes, "loss": loss.item(), "block_input_shape": shapes[0], "grads": full_gradients(model)}


def dropout_streams() -> dict[str, bool]:
    """The sequence-parallel dropout: a different mask on each tensor rank's slice, the same mask
    again after the global RNG state is restored (what a recompute does)."""
    from megatron_gpt.model.sequence_parallel import Dropout

    dropout, x = Dropout(0.5).train(), torch.ones(64, 2, 16)
    state = torch.get_rng_state()
    first = dropout(x)
    torch.set_rng_state(state)
    masks = [torch.empty_like(first) for _ in range(dist.get_world_size())]
    dist.all_gather(masks, first)
    return {"replayed": torch.equal(first, dropout(x)), "ranks_differ": not torch.equal(masks[0], masks[1]),
            "kept": round((first > 0).float().mean().item(), 2)}


def main(out: str, overrides: list[str]) -> None:
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(2, 1)
    plain, split = measure(overrides, False), measure(overrides, True)
    dropout = dropout_streams()
    grad_diff = max(((split["grads"][k] - g).norm() / g.norm().clamp(min=1e-12)).item()
                    for k, g in plain["grads"].items())
    if dist.get_rank() == 0:
        result = {"tp2_bytes": plain["bytes"], "tp2_sp_bytes": split["bytes"], "ratio": split["bytes"] / plain["bytes"],
                  "loss_diff": abs(split["loss"] - plain["loss"]), "max_relative_grad_diff": grad_diff,
                  "block_input_shape": {"tp2": plain["block_input_shape"], "tp2_sp": split["block_input_shape"]},
                  "dropout": dropout}
        Path(out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[2:]
    main(sys.argv[1], [a for a in args if a != "--set"])
