"""How one step runs, chosen when the run is built: the plain runner (pipeline = 1: forward and
backward per micro-batch through the engine, the gradient path at the step's boundary) or the
pipeline runner (DeepSpeed's PipelineEngine schedules the micro-batches over the stages)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from megatron_gpt.data.datasets import model_inputs
from megatron_gpt.model import masked_mean, token_losses
from megatron_gpt.parallel.groups import Topology
from megatron_gpt.training.engine import PipelineLoss
from megatron_gpt.training.gradients import GradientPath
from megatron_gpt.training.validation import module_summed_nats


class PlainRunner:
    """pipeline = 1: the whole model on every rank; samples can be drawn from it."""

    can_sample = True

    def __init__(self, engine, topo: Topology, gradients: GradientPath, guard=None):
        self.engine, self.topo, self.gradients, self.guard = engine, topo, gradients, guard
        self._summed_nats = module_summed_nats(engine, topo.tensor)

    def train_step(self, batches: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimizer step over the micro-batches: the mean loss and the seconds of its phases."""
        clock = time.perf_counter
        step_loss = torch.zeros((), device=self.topo.device)
        forward_backward = optimizer = 0.0
        for batch in batches:
            begin = clock()
            logits = self.engine(model_inputs(batch))
            loss = masked_mean(token_losses(logits, batch["labels"], self.topo.tensor), batch["loss_mask"])
            self.engine.backward(loss)
            middle = clock()
            step_loss += loss.detach()
            if self.engine.is_gradient_accumulation_boundary():
                self.gradients.at_boundary()
                if self.guard is not None:  # the optimizer step checks the step's loss first
                    self.guard.loss = step_loss / len(batches)
            self.engine.step()
            forward_backward += middle - begin
            optimizer += clock() - middle
        return step_loss / len(batches), {"forward_backward": forward_backward, "optimizer": optimizer}

    def summed_nats(self, batches: list[dict]) -> torch.Tensor:
        return self._summed_nats(batches)


class PipelineRunner:
    """pipeline > 1: DeepSpeed's PipelineEngine runs the schedule; the last stage computes the loss."""

    can_sample = False

    def __init__(self, engine, topo: Topology):
        self.engine = engine
        self.summed_loss = PipelineLoss(topo.tensor, summed=True)

    @staticmethod
    def _pairs(batches: list[dict]):
        return iter([(model_inputs(b), (b["labels"], b["loss_mask"])) for b in batches])

    def train_step(self, batches: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        started = time.perf_counter()
        loss = self.engine.train_batch(self._pairs(batches))
        return loss, {"pipeline": time.perf_counter() - started}

    @contextmanager
    def _loss(self, loss_fn):
        """The last stage's loss function for the duration of one call (eval_batch takes none)."""
        module = self.engine.module
        training_loss, module.loss_fn = module.loss_fn, loss_fn
        try:
            yield
        finally:
            module.loss_fn = training_loss

    def summed_nats(self, batches: list[dict]) -> torch.Tensor:
        with self._loss(self.summed_loss):  # eval_batch averages the sums over micro-batches and data ranks
            mean = self.engine.eval_batch(self._pairs(batches), num_micro_batches=len(batches))
        return mean.double().cpu() * len(batches)
