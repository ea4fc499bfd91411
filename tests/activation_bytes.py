"""Activation memory as autograd really stores it, for tests: every tensor a forward pass saves for
its backward passes through torch.autograd.graph.saved_tensors_hooks; the bytes are those of the
unique storages behind them (a view shares its base's storage), parameters excluded.

    saved_bytes(lambda: loss_of(model), exclude=model.parameters())    # any forward, any process
    model_activation_bytes(model_cfg, vocab_size, micro_batch=2)        # one GPT forward + loss

model_activation_bytes builds the model at the tensor-parallel size parallel_state was initialized
with (a 1-rank gloo group in one process, or inside a torchrun'd process at tp 2), with
model.recompute applied as training applies it, and returns this rank's bytes."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def saved_bytes(run: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """(bytes of the unique storages autograd saved while `run()` ran, what run returned).
    Keep the result alive until the count is taken: it holds the graph (and so the storages)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return sum(storages.values()), result


def model_activation_bytes(model_cfg, vocab_size: int, micro_batch: int, precision: str = "fp32",
                           seed: int = 0) -> int:
    """Bytes autograd keeps for one training forward (model + loss) of a micro-batch of
    model_cfg.seq_length tokens on this rank, with model_cfg.recompute applied."""
    from megatron.core import parallel_state

    from megatron_gpt.model import GPT, parallel_config, token_losses
    from megatron_gpt.training.recompute import apply_recompute

    tensor = parallel_state.get_tensor_model_parallel_world_size()
    model = GPT(model_cfg, vocab_size, parallel_config(tensor, 1, DTYPES[precision]), seed=seed)
    model = apply_recompute(model.to(DTYPES[precision]), model_cfg).train()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (micro_batch, model_cfg.seq_length + 1), generator=generator)

    def loss():
        return token_losses(model(tokens[:, :-1]), tokens[:, 1:], tensor).mean()

    count, result = saved_bytes(loss, exclude=model.parameters())
    del result
    return count


def main() -> None:
    """torchrun --nproc_per_node T tests/activation_bytes.py OUT.json FAMILY...: every recompute mode
    of each family of tests/test_recompute.py at tensor size T; rank 0 writes {"FAMILY MODE": bytes}."""
    import json
    import sys
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import parallel_state

    sys.path.insert(0, str(Path(__file__).parent))
    from test_recompute import MODES, VOCAB, config

    dist.init_process_group("gloo")
    tensor = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor, 1)
    found = {}
    for family in sys.argv[2:]:
        for mode in MODES:
            cfg = config(family, mode, f"parallelism.tensor={tensor}", f"launcher.nproc_per_node={tensor}")
            found[f"{family} {mode}"] = model_activation_bytes(cfg.model, VOCAB, cfg.training.micro_batch_size)
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
