"""Run under torchrun with N ranks (tensor-parallel size N): build the GPT at tp N from a
layout-independent checkpoint (an import-hf output), run TOKENS through it and save the
full-vocabulary logits (gathered over tensor ranks) to OUT on rank 0.

    torchrun --nproc_per_node 2 tests/tp_logits_check.py CHECKPOINT TOKENS.pt OUT.pt
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(checkpoint: str, tokens_file: str, out: str) -> None:
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from document_masking_check import gathered
    from megatron_gpt.config import padded_vocab_size
    from megatron_gpt.convert.hf import read_checkpoint
    from megatron_gpt.model import GPT, parallel_config

    dist.init_process_group("gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(tp, 1)
    source = read_checkpoint(checkpoint)
    vocab = source.tokenizer.vocab_size
    model = GPT(source.cfg.model, padded_vocab_size(vocab, source.cfg), parallel_config(tp), vocab_limit=vocab).eval()
    names = model.canonical_names()
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = source.state[names[name]]
            if getattr(param, "tensor_model_parallel", False):
                full = full.chunk(tp, dim=param.partition_dim)[rank]
            param.copy_(full)
        logits = gathered(model(torch.load(tokens_file, weights_only=True)))
    if rank == 0:
        torch.save(logits[..., :vocab].contiguous(), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
