"""Sampling from a (possibly tensor-parallel) model. Every tensor rank runs the same loop with
the same seed, so all ranks pick the same tokens; only the caller decides who prints."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_new_tokens: int, context_length: int, vocab_size: int,
           temperature: float = 0.8, top_k: int | None = 50, seed: int = 0,
           device: torch.device = torch.device("cpu")) -> list[int]:
    """Autoregressive sampling (no KV cache): returns only the new token ids.

    vocab_size is the tokenizer's real vocabulary; padded embedding rows are never sampled.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context_length:])[:, -1, :]
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[:, :vocab_size].float().cpu()
        if temperature <= 0:
            next_id = int(logits.argmax(dim=-1))
        else:
            logits = logits / temperature
            if top_k is not None:
                threshold = torch.topk(logits, min(top_k, vocab_size)).values[:, -1:]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        new_tokens.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    model.train(was_training)
    return new_tokens
