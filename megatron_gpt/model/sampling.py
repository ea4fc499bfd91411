"""Sampling from a (possibly tensor-parallel) model. Every tensor rank runs the same loop with
the same seed, so all ranks pick the same tokens; only the caller decides who prints."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel

from megatron_gpt.model import KVCache


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 64
    """Tokens to generate at most."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = 50
    """Keep only the k most likely tokens (None: all)."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability reaches p (nucleus sampling)."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of already-seen tokens by this (CTRL-style)."""
    stop: tuple[str, ...] = ()
    """Stop once the generated text contains one of these strings (it is cut there)."""
    stop_ids: tuple[int, ...] = ()
    """Stop at one of these token ids (e.g. end of document); it is not returned."""
    seed: int = 0
    """Seed of the sampler (the same on every rank)."""


def _next_token(logits: torch.Tensor, seen: list[int], options: SamplingOptions, generator: torch.Generator) -> int:
    if options.repetition_penalty != 1.0 and seen:
        ids = torch.tensor(sorted(set(seen)))
        picked = logits[ids]
        logits[ids] = torch.where(picked > 0, picked / options.repetition_penalty, picked * options.repetition_penalty)
    if options.temperature <= 0:
        return int(logits.argmax())
    logits = logits / options.temperature
    if options.top_k is not None and options.top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, options.top_k).values[-1], float("-inf"))
    if options.top_p is not None and options.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= options.top_p  # keep the first to reach p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt_ids: list[int], options: SamplingOptions, vocab_size: int, context_length: int,
             use_cache: bool = True, decode=None, device: torch.device = torch.device("cpu")) -> list[int]:
    """New token ids after the prompt. With `use_cache` each step feeds one token and reuses
    cached keys/values; without it each step re-reads the last `context_length` tokens.

    vocab_size is the tokenizer's real vocabulary: padded embedding rows are never chosen.
    `decode(ids) -> str` is needed only for stop strings."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    ids = list(prompt_ids)
    cache = KVCache() if use_cache else None
    new: list[int] = []
    step_input = torch.tensor([ids[-context_length:]], dtype=torch.long, device=device)
    for _ in range(options.max_new_tokens):
        if cache is not None and cache.length + step_input.shape[1] > context_length:
            break  # positions past the trained length: stop rather than extrapolate silently
        logits = model(step_input, cache) if cache is not None else model(step_input)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits[:, -1, :])
        token = _next_token(logits[0, :vocab_size].float().cpu(), ids, options, generator)
        if token in options.stop_ids:
            break
        ids.append(token)
        new.append(token)
        if options.stop and decode is not None:
            text = decode(new)
            hits = [text.index(stop) for stop in options.stop if stop in text]
            if hits:
                while new and len(decode(new)) > min(hits):  # cut the stop string and what follows
                    new.pop()
                break
        next_ids = [token] if cache is not None else ids[-context_length:]
        step_input = torch.tensor([next_ids], dtype=torch.long, device=device)
    model.train(was_training)
    return new


def sample(model, prompt_ids: list[int], max_new_tokens: int, context_length: int, vocab_size: int,
           temperature: float = 0.8, top_k: int | None = 50, seed: int = 0,
           device: torch.device = torch.device("cpu")) -> list[int]:
    """Shorthand for generate() with the common knobs."""
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return generate(model, prompt_ids, options, vocab_size, context_length, device=device)
