"""Run under torchrun (1 or 2 ranks = tensor-parallel size): a packed sequence of 3 documents
through the GPT with document masking gives each document's logits when run alone, for rotary
and learned positions; validation's summed nats over the packed batch equal the documents' own.
Rank 0 prints one JSON line with the errors.

    torchrun --nproc_per_node 2 tests/document_masking_check.py
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gathered(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from this rank's vocab-parallel slice."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    pieces = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(pieces, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)


def main() -> None:
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from megatron_gpt.config.schema import ModelConfig
    from megatron_gpt.data.datasets import document_positions
    from megatron_gpt.model import GPT, parallel_config
    from megatron_gpt.training.validation import module_summed_nats

    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tp, 1)
    eod, vocab = 0, 512
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, vocab, (n,), generator=generator) for n in (13, 21, 11)]
    for doc in docs:
        doc[-1] = eod
    tokens = torch.cat(docs)[None]
    positions = document_positions(tokens, eod)
    labels = torch.randint(0, vocab, tokens.shape, generator=generator)
    result = {"tp": tp, "positions_restart": positions[0].tolist()}
    for kind in ("rotary", "learned"):
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, position_embedding=kind,
                          rotary_pct=0.5, parallel_residual=kind == "rotary")
        model = GPT(cfg, vocab, parallel_config(tp), seed=7).eval()
        with torch.no_grad():
            packed = gathered(model((tokens, positions)))
            alone = torch.cat([gathered(model(doc[None])) for doc in docs], dim=1)
            unmasked = gathered(model(tokens))
        batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(tokens.shape), "position_ids": positions}
        packed_nats = module_summed_nats(model, tp)([batch]).item()
        own_nats = torch.nn.functional.cross_entropy(alone[0].float(), labels[0], reduction="sum").item()
        result[kind] = {"max_error": (packed - alone).abs().max().item(),
                        "unmasked_error": (unmasked - alone).abs().max().item(),
                        "nats_error": abs(packed_nats - own_nats)}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
