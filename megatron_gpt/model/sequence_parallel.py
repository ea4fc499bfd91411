"""Megatron's sequence parallelism (parallelism.sequence_parallel) over the tensor-parallel group.

Outside the tensor-parallel regions (attention and MLP between their column- and row-parallel
layers) every tensor rank would hold the same activations; sequence parallelism splits them along
the sequence instead, so norms, dropout and the residual stream work on s/tp positions per rank:
an all-gather before each column-parallel layer (its input kept as the local slice for the
backward, gathered again there) and a reduce-scatter after each row-parallel layer, in place of
the all-reduce, at the same communication volume.

Layout: megatron-core splits the first dimension, Megatron's activations being [seq, batch,
hidden]. Our model is batch-first, so under sequence parallelism the hidden states between layers
are [s/tp, b, h], sequence-first: transposed once where they enter the sequence-parallel region
(after the embedding) and once where they leave it (after the final norm). Inside attention the
gathered [s, b, ...] projections are read through a transposed view, so the attention math stays
batch-first and nothing else in the model changes. (Splitting dim 1 of a batch-first tensor would
need strided collectives, or a copy on every all-gather and reduce-scatter.)

megatron-core's region functions and its sequence-parallel linear allocate their buffers on
torch.cuda.current_device(), so on CUDA they are used as they are; on CPU (where the tests prove
the numbers over gloo) the same autograd Functions run here, with buffers on the input's device.

Parameters that act on sequence-split activations (norm weights and biases, row-parallel biases)
get only their slice's gradient on each rank: `tp_summed` routes them through megatron-core's
copy_to_tensor_model_parallel_region (identity forward, all-reduce over the tensor group in the
backward), so the gradient is whole before it reaches .grad, whichever engine, ZeRO stage or
pipeline schedule then reduces and clips it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch import nn


def _group():
    return parallel_state.get_tensor_model_parallel_group()


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every tensor rank's x along dim 0."""
    group = _group()
    out = torch.empty((x.shape[0] * group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the tensor ranks and keep this rank's slice of dim 0."""
    group = _group()
    out = torch.empty((x.shape[0] // group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of dim 0."""
    chunk = x.shape[0] // _group().size()
    start = parallel_state.get_tensor_model_parallel_rank() * chunk
    return x[start:start + chunk].contiguous()


class _ToSlices(torch.autograd.Function):
    """Forward: this rank's slice of x (split), or of x summed over the ranks (reduce-scatter);
    backward: all-gather."""

    @staticmethod
    def forward(ctx, x, summed: bool):
        return _reduce_scatter(x) if summed else _split(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, reduce_grad: bool):
        ctx.reduce_grad = reduce_grad
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        return (_reduce_scatter(grad) if ctx.reduce_grad else _split(grad)), None


class _GatheredLinear(torch.autograd.Function):
    """megatron-core's LinearWithGradAccumulationAndAsyncCommunication with sequence_parallel:
    all-gather the input, multiply; save only the local slice and gather it again in the backward,
    whose input gradient is reduce-scattered back to the slices."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        output = torch.matmul(_all_gather(x), weight.t())
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        total = _all_gather(x)
        grad_input = _reduce_scatter(grad.matmul(weight))
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_2d.t().matmul(total.reshape(-1, total.shape[-1]))
        return grad_input, grad_weight, grad_2d.sum(dim=0) if ctx.has_bias else None


def scatter_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's slice of dim 0 (backward: all-gather)."""
    return tensor_parallel.scatter_to_sequence_parallel_region(x) if x.is_cuda else _ToSlices.apply(x, False)


def gather_from_sequence(x: torch.Tensor, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather dim 0; the backward reduce-scatters when the consumer is tensor-parallel (each
    rank holds a partial gradient), else keeps this rank's slice of the (replicated) gradient."""
    if x.is_cuda:
        return tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad)
    return _Gather.apply(x, tensor_parallel_output_grad)


def reduce_scatter_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """Sum the row-parallel partial outputs and keep this rank's slice of dim 0 (backward: all-gather)."""
    return tensor_parallel.reduce_scatter_to_sequence_parallel_region(x) if x.is_cuda else _ToSlices.apply(x, True)


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A column-parallel layer's product on the all-gathered sequence (CPU; see _GatheredLinear)."""
    return _GatheredLinear.apply(x, weight, bias)


def tp_summed(param: torch.Tensor) -> torch.Tensor:
    """`param` as used on this rank's slice of the sequence: its gradient all-reduced over the
    tensor group in the backward (see the module docstring)."""
    return tensor_parallel.copy_to_tensor_model_parallel_region(param)


def to_sequence_parallel(hidden: torch.Tensor) -> torch.Tensor:
    """[b, s, h], the same on every tensor rank -> this rank's [s/tp, b, h]."""
    return scatter_to_sequence(hidden.transpose(0, 1))


def from_sequence_parallel(hidden: torch.Tensor) -> torch.Tensor:
    """This rank's [s/tp, b, h] -> [b, s, h] on every tensor rank. The consumers (output layer,
    tied logits) all-reduce their input gradient over the tensor group already, so the backward
    keeps this rank's slice of it."""
    return gather_from_sequence(hidden, tensor_parallel_output_grad=False).transpose(0, 1)


def mark_sequence_parallel(module: nn.Module) -> nn.Module:
    """Set megatron-core's `sequence_parallel` attribute on the module's parameters."""
    for param in module.parameters():
        param.sequence_parallel = True
    return module


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm on a slice of the sequence, weight and bias gradients summed over tensor ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = tp_summed(self.bias) if self.bias is not None else None
        return nn.functional.layer_norm(x, self.normalized_shape, tp_summed(self.weight), bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm on a slice of the sequence, weight gradient summed over tensor ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, self.normalized_shape, tp_summed(self.weight), self.eps)


class Dropout(nn.Dropout):
    """Dropout on this rank's slice of the sequence, from a stream of its own per tensor rank (as
    Megatron's model-parallel RNG; a shared stream would drop the same pattern in every slice).
    The stream's seed is drawn from the global RNG, identical on every tensor rank, and offset by
    the tensor rank: a recompute that restores the global RNG state draws the same masks."""

    def __init__(self, p: float):
        super().__init__(p)
        self.rank = parallel_state.get_tensor_model_parallel_rank()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        seed = int(torch.randint(0, 2**62, ())) + self.rank
        generator = torch.Generator(device=x.device).manual_seed(seed)
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= self.p  # a bool mask is saved
        return x * keep * (1.0 / (1.0 - self.p))
