"""Validation loss and bits per byte over a fixed set of held-out samples."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_gpt.data.datasets import SampleOrder, collate
from megatron_gpt.model import token_losses


@torch.no_grad()
def evaluate(model, dataset, order: SampleOrder, eval_iters: int, byte_lengths: torch.Tensor,
             tensor_parallel_size: int, device: torch.device, group=None) -> dict[str, float]:
    """Mean validation loss (nats/token) and bits per byte: summed nats / ln 2 / the UTF-8 bytes
    of the target tokens. Every evaluation reads the same samples, so curves are comparable."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
    for step in range(eval_iters):
        batch = collate(dataset, order.micro_batch_indices(step, 0), device)
        losses = token_losses(model(batch["tokens"]), batch["labels"], tensor_parallel_size)
        mask = batch["loss_mask"]
        totals[0] += (losses * mask).sum().double().cpu()
        totals[1] += mask.sum().double().cpu()
        totals[2] += (byte_lengths[batch["labels"].cpu()] * mask.cpu()).sum().double()
    if dist.is_initialized():
        dist.all_reduce(totals, group=group)
    model.train(was_training)
    nats, tokens, nbytes = totals.tolist()
    return {"val_loss": nats / max(tokens, 1.0), "val_bpb": nats / math.log(2) / max(nbytes, 1.0),
            "val_tokens": tokens}
