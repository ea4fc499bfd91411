"""One training run on one rank: topology, data, model, DeepSpeed engine, then the step loop."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import yaml

from megatron_gpt.checkpoint import Saver, restore as checkpoint_restore, store as checkpoint_store
from megatron_gpt.config import batch_layout, config_to_dict, padded_vocab_size
from megatron_gpt.config.schema import Config
from megatron_gpt.data.datasets import SampleOrder, build_datasets, byte_lengths_table, collate
from megatron_gpt.data.embedded import default_cache_dir, prepare_embedded
from megatron_gpt.data.tokenizer import build_tokenizer
from megatron_gpt.launch.protocol import EXIT_CODE
from megatron_gpt.model.sampling import sample
from megatron_gpt.parallel.groups import Topology, barrier, init_distributed, seed_everything
from megatron_gpt.training import preemption
from megatron_gpt.training.compiling import compiled_blocks
from megatron_gpt.training.engine import build_engine, build_model, offloaded
from megatron_gpt.training.gradients import GradientPath
from megatron_gpt.training.guard import Diverged, StepGuard
from megatron_gpt.training.observe.backends import Backends
from megatron_gpt.training.observe.flops import peak_flops, training_flops_per_token
from megatron_gpt.training.observe.metrics import MetricsLog, Throughput
from megatron_gpt.training.observe.plot import plot_metrics
from megatron_gpt.training.observe.profile import StepProfiler
from megatron_gpt.training.runners import PipelineRunner, PlainRunner
from megatron_gpt.training.validation import eval_batches, evaluate


def dataset_prefixes(cfg: Config, topo: Topology, cache_dir: str) -> list[str]:
    """The preprocessed prefixes to train on; an embedded corpus is prepared by rank 0 first."""
    if cfg.data.embedded is None:
        return list(cfg.data.paths)
    prefix = prepare_embedded(cfg.data.embedded, cache_dir, tokenizer=cfg.tokenizer) if topo.is_first else None
    barrier()
    return [prefix or prepare_embedded(cfg.data.embedded, cache_dir, tokenizer=cfg.tokenizer)]


def run_dir_path(cfg: Config) -> Path:
    return Path(cfg.logging.run_dir.format(name=cfg.name))


def prepare_run_dir(cfg: Config, topo: Topology) -> Path | None:
    if not topo.is_first:
        return None
    run_dir = run_dir_path(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return run_dir


class Trainer:
    """Everything one rank needs, built once; `run` trains, evaluates and saves."""

    def __init__(self, cfg: Config, started: float | None = None):
        started = time.perf_counter() if started is None else started
        self.cfg = cfg
        self.topo = topo = init_distributed(cfg.parallelism.tensor, cfg.parallelism.pipeline, cfg.training.device,
                                            shared_memory_allreduce=cfg.parallelism.shared_memory_allreduce)
        seed_everything(cfg.training.seed)
        self.layout = layout = batch_layout(cfg, topo.world_size)
        cache_dir = cfg.data.cache_dir or default_cache_dir()
        self.tokenizer = tokenizer = build_tokenizer(cfg.tokenizer)
        prefixes = dataset_prefixes(cfg, topo, cache_dir)
        vocab_size = padded_vocab_size(tokenizer.vocab_size, cfg)
        self.model = build_model(cfg, vocab_size, topo, vocab_limit=tokenizer.vocab_size)
        # What the run starts from (a checkpoint in this or another layout, checkpoint.init_from, or
        # nothing); layout-independent weights go into each rank's slice before DeepSpeed wraps the model.
        self.restore = checkpoint_restore.plan_restore(cfg, topo)
        self.restore.load_weights(self.model, cfg, topo)
        self.engine = build_engine(self.model.to(topo.device), cfg, topo)
        self.stop = preemption.watch()
        params = list(self.model.parameters())  # walking the module tree each step costs ~0.5 ms
        self.gradients = GradientPath(cfg, topo, self.engine, params, self.stop)
        self.guard = StepGuard(self.engine, topo, params, cfg.training.max_skipped_steps, cfg.training.spike_factor,
                               grad_norm=lambda: self.gradients.last_norm if self.gradients.clips else None)
        self.runner = (PipelineRunner(self.engine, topo) if topo.pipeline > 1
                       else PlainRunner(self.engine, topo, self.gradients, self.guard))
        self.group = topo.data_parallel_group

        self.order = SampleOrder(layout.micro_batch_size, layout.gradient_accumulation_steps, topo.data, topo.data_rank)
        steps = cfg.training.train_steps
        data = cfg.data.model_copy(update={"embedded": None, "paths": prefixes}) if cfg.data.embedded else cfg.data
        train_set, valid_set = build_datasets(
            data, cfg.model.seq_length, cfg.training.seed, tokenizer,
            train_samples=steps * layout.global_batch_size,
            valid_samples=cfg.training.eval_iters * layout.global_batch_size,
            cache_dir=cache_dir)
        self.train_set = train_set
        self.valid_batches = eval_batches(valid_set, self.order, cfg.training.eval_iters, topo.device)
        self.byte_lengths = byte_lengths_table(tokenizer, vocab_size)
        self.start_step = self.restore.finish(self.engine, self.model, cfg, topo)
        self.saver = Saver()

        self.run_dir = run_dir = prepare_run_dir(cfg, topo)
        tokens_per_step = layout.global_batch_size * cfg.model.seq_length
        throughput = Throughput(
            tokens_per_step=tokens_per_step, samples_per_step=layout.global_batch_size,
            flops_per_step=training_flops_per_token(cfg.model, vocab_size) * tokens_per_step,
            world_size=topo.world_size,
            peak_flops=peak_flops(cfg.logging.peak_tflops, topo.device, cfg.training.precision))
        self.backends = Backends(cfg, run_dir, config_to_dict(cfg)) if run_dir is not None else None
        self.metrics = MetricsLog(run_dir, throughput, steps, self.group, topo.device, self.backends)
        self.say = self.metrics.print
        parameters = sum(p.numel() for p in self.model.parameters())
        self.say(f"world {topo.world_size} (tp {topo.tensor} x pp {topo.pipeline} x dp {topo.data}), "
                 f"{parameters:,} parameters on rank 0, global batch {layout.global_batch_size} x "
                 f"{cfg.model.seq_length} tokens, steps {self.start_step}->{steps}, "
                 f"{'gradients all-reduced through shared memory, ' if self.gradients.sync else ''}"
                 f"{'optimizer offloaded to cpu (ZeRO-Offload), ' if offloaded(self.engine) else ''}"
                 f"{f'{compiled_blocks(self.model)} blocks compiled, ' if cfg.training.compile else ''}"
                 f"set-up {time.perf_counter() - started:.1f}s")

    def micro_batches(self, step: int) -> list[dict]:
        """The step's micro-batches for this rank, read in this thread: batched collation costs
        ~0.4 ms a small-model step. Measured on 2 cores: reading the next step in a background
        thread instead was slower (its Python holds the GIL the forward's op dispatch needs)."""
        return [collate(self.train_set, self.order.micro_batch_indices(step, micro), self.topo.device)
                for micro in range(self.layout.gradient_accumulation_steps)]

    def train_step(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimizer step: the step's loss (mean over its micro-batches) and the wall time of
        its phases in seconds (host time: on a GPU, kernels still queued are not in it)."""
        started = time.perf_counter()
        batches = self.micro_batches(step)
        loaded = time.perf_counter()
        loss, timings = self.runner.train_step(batches)
        return loss, {"data": loaded - started, **timings}

    def stop_requested(self) -> bool:
        """Whether any rank got a preemption signal (the same answer on every rank)."""
        return self.gradients.stop_requested()

    def grad_norm(self):
        """The last step's global gradient norm (before clipping), or None where nothing keeps it."""
        return self.gradients.grad_norm()

    def evaluate(self, step: int) -> dict:
        self.metrics.flush()  # backends such as wandb need steps in order: training rows first
        result = evaluate(self.runner.summed_nats, self.valid_batches, self.byte_lengths, self.group)
        self.metrics.write([{"step": step, **result}])
        self.say(f"step {step:>6}/{self.cfg.training.train_steps} | validation loss {result['val_loss']:.4f} | "
                 f"validation bits per byte {result['val_bpb']:.4f}")
        return result

    def save(self, step: int, asynchronous: bool = False) -> str:
        """Collective: this rank writes its shard of checkpoint `step` (in the background if asked)."""
        return self.saver.save(self.engine, self.cfg, step, step * self.layout.global_batch_size, self.model, self.topo,
                               self.tokenizer, asynchronous=asynchronous)

    def run(self) -> dict:
        """Train from the resumed step to train_steps; returns the final validation metrics."""
        cfg, steps = self.cfg, self.cfg.training.train_steps
        save_every = cfg.checkpoint.save_interval if cfg.checkpoint.save_dir else None
        profiler = StepProfiler(cfg.logging.profile_steps, run_dir_path(cfg) / "profile", self.topo)
        train_started = time.perf_counter()
        self.guard.step_index = self.start_step
        for step in range(self.start_step, steps):
            lr = self.engine.get_lr()[0]
            with profiler.step(step):
                loss, timings = self.train_step(step)
            skipped = self.guard.skipped_now
            self.metrics.record(step, loss, lr, None if skipped else self.grad_norm(), timings,
                                skipped=self.guard.skipped_total + skipped)
            if skipped:
                self.say(f"step {step + 1}: skipped ({self.guard.why}); parameters and optimizer unchanged")
                self.metrics.flush()
            try:
                self.guard.after_step(step)  # raises Diverged after training.max_skipped_steps in a row
            except Diverged:
                self.saver.wait()  # a background save of an earlier (finite) step completes first
                raise
            done = step + 1
            if done % cfg.logging.log_interval == 0 or done == steps:
                self.metrics.flush()
            if done % cfg.training.eval_interval == 0 and done != steps:
                self.evaluate(done)
                self.metrics.window_start = time.perf_counter()  # keep eval time out of tokens/s
            if save_every and done % save_every == 0 and done != steps:
                self.save(done, asynchronous=cfg.checkpoint.async_save)
            if done != steps and self.stop_requested():  # a signal on any rank: all stop here
                self.stop_for_preemption(done)
        trained = steps - self.start_step
        if trained:
            seconds = time.perf_counter() - train_started
            tokens = trained * self.layout.global_batch_size * cfg.model.seq_length
            self.say(f"trained {trained} steps in {seconds:.1f}s ({tokens / seconds:,.0f} tokens/s)")
        result = self.evaluate(steps)
        self.say(f"validation bits per byte: {result['val_bpb']:.4f}")
        if cfg.checkpoint.save_dir and trained:
            self.say(f"saved checkpoint {self.save(steps)}")
        self.saver.wait()  # a background save still writing (no final save: nothing trained)
        self.generate_samples()
        self.finish()
        return result

    def stop_for_preemption(self, step: int):
        """Flush metrics, save a checkpoint at `step` (unless one was just saved there), raise Preempted."""
        save_dir = self.cfg.checkpoint.save_dir
        self.metrics.flush()
        path = None
        if save_dir:
            just_saved = checkpoint_store.latest_tag(save_dir) == checkpoint_store.tag_for(step) and self.saver.pending is None
            path = os.path.join(save_dir, checkpoint_store.tag_for(step)) if just_saved else self.save(step)
            self.say(f"preempted: saved checkpoint {path} at step {step}; exiting with code {EXIT_CODE}, "
                     "relaunch to resume from it")
        else:
            self.say(f"preempted at step {step}: checkpoint.save_dir is not set, nothing saved; "
                     f"exiting with code {EXIT_CODE}")
        self.stop.ignore()
        raise preemption.Preempted(step, path)

    def finish(self) -> None:
        """deepspeed.comms_logger's table (a collective: every rank), then rank 0: the loss-curve
        PNG and closing the logging backends."""
        import deepspeed.comm  # configured by the engine from deepspeed.comms_logger

        if deepspeed.comm.comms_logger.enabled:
            deepspeed.comm.log_summary()
        if self.run_dir is None:
            return
        if self.cfg.logging.plot and (self.run_dir / "metrics.jsonl").exists():
            self.say(f"loss curve: {plot_metrics(self.run_dir / 'metrics.jsonl', self.run_dir / 'loss.png')}")
        self.backends.close()

    def generate_samples(self) -> None:
        """Print a few samples from the trained model (every rank samples; rank 0 prints)."""
        cfg = self.cfg.training
        if not cfg.generate_samples:
            return
        if not self.runner.can_sample:
            self.say("(samples skipped: sampling runs on pipeline=1 models)")
            return
        prompt = self.tokenizer.encode(cfg.generate_prompt)
        for index in range(cfg.generate_samples):
            new_ids = sample(self.engine, prompt, cfg.generate_tokens, self.cfg.model.seq_length,
                             self.tokenizer.vocab_size, seed=cfg.seed + index, device=self.topo.device)
            self.say(f"--- sample {index + 1} ---\n{cfg.generate_prompt}{self.tokenizer.decode(new_ids)}")


def train(cfg: Config, started: float | None = None) -> dict:
    """Train on this rank; returns the last validation metrics (the same on every rank)."""
    return Trainer(cfg, started).run()
