"""Validation loss and bits per byte over a fixed set of held-out samples."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from megatron_gpt.data.datasets import SampleOrder, collate, model_inputs
from megatron_gpt.model import token_losses


def eval_batches(dataset, order: SampleOrder, eval_iters: int, device: torch.device) -> list[dict]:
    """This rank's validation micro-batches: eval_iters global batches read in the training
    order, so the evaluated samples are the same at every evaluation and for every layout."""
    return [collate(dataset, order.micro_batch_indices(step, micro), device)
            for step in range(eval_iters) for micro in range(order.gradient_accumulation_steps)]


def module_summed_nats(model, tensor_parallel_size: int) -> Callable[[list[dict]], torch.Tensor]:
    """Summed nats over batches for a module that maps tokens to (vocab-parallel) logits."""

    @torch.no_grad()
    def summed(batches: list[dict]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            losses = token_losses(model(model_inputs(batch)), batch["labels"], tensor_parallel_size)
            total += (losses * batch["loss_mask"]).sum().double().cpu()
        model.train(was_training)
        return total

    return summed


def evaluate(summed_nats: Callable[[list[dict]], torch.Tensor], batches: list[dict], byte_lengths: torch.Tensor,
             group=None) -> dict[str, float]:
    """Mean validation loss (nats/token) and bits per byte: summed nats / ln 2 / the UTF-8 bytes
    of the target tokens, each summed over the data-parallel group."""
    totals = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
    totals[0] = summed_nats(batches)
    for batch in batches:
        mask = batch["loss_mask"].cpu()
        totals[1] += mask.sum().double()
        totals[2] += (byte_lengths[batch["labels"].cpu()] * mask).sum().double()
    if dist.is_initialized():
        dist.all_reduce(totals, group=group)
    nats, tokens, nbytes = totals.tolist()
    return {"val_loss": nats / max(tokens, 1.0), "val_bpb": nats / math.log(2) / max(nbytes, 1.0),
            "val_tokens": tokens}
