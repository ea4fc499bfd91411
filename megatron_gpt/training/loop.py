"""One training run on one rank: topology, data, model, DeepSpeed engine, then the step loop."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from megatron_gpt.config import batch_layout, config_to_dict, deepspeed_config, padded_vocab_size
from megatron_gpt.config.schema import Config
from megatron_gpt.data.datasets import SampleOrder, build_datasets, byte_lengths_table, collate
from megatron_gpt.data.embedded import default_cache_dir, prepare_embedded
from megatron_gpt.data.tokenizer import build_tokenizer
from megatron_gpt.distributed import Topology, barrier, init_distributed, seed_everything
from megatron_gpt.generation import sample
from megatron_gpt.model import GPT, masked_mean, parallel_config, token_losses
from megatron_gpt.training import checkpoint
from megatron_gpt.training.evaluate import evaluate
from megatron_gpt.training.metrics import MetricsLog
from megatron_gpt.training.schedule import lr_multiplier


def dataset_prefixes(cfg: Config, topo: Topology, cache_dir: str) -> list[str]:
    """The preprocessed prefixes to train on; an embedded corpus is prepared by rank 0 first."""
    if cfg.data.embedded is None:
        return list(cfg.data.paths)
    prefix = prepare_embedded(cfg.data.embedded, cache_dir) if topo.is_first else None
    barrier()
    return [prefix or prepare_embedded(cfg.data.embedded, cache_dir)]


def build_engine(model: torch.nn.Module, cfg: Config, topo: Topology):
    import deepspeed

    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.optimizer.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=deepspeed_config(cfg, topo.world_size),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg)),
        dist_init_required=False,
    )
    return engine


def prepare_run_dir(cfg: Config, topo: Topology) -> Path | None:
    if not topo.is_first:
        return None
    run_dir = Path(cfg.logging.run_dir.format(name=cfg.name))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return run_dir


def train(cfg: Config) -> dict:
    """Train on this rank; returns the last validation metrics (the same on every rank)."""
    started = time.perf_counter()
    topo = init_distributed(cfg.parallelism.tensor, cfg.parallelism.pipeline, cfg.training.device)
    seed_everything(cfg.training.seed)
    layout = batch_layout(cfg, topo.world_size)
    cache_dir = cfg.data.cache_dir or default_cache_dir()
    tokenizer = build_tokenizer(cfg.tokenizer)
    prefixes = dataset_prefixes(cfg, topo, cache_dir)
    vocab_size = padded_vocab_size(tokenizer.vocab_size, cfg)
    model = GPT(cfg.model, vocab_size, parallel_config(topo.tensor, topo.pipeline), seed=cfg.training.seed)
    engine = build_engine(model.to(topo.device), cfg, topo)
    group = topo.data_parallel_group

    order = SampleOrder(layout.micro_batch_size, layout.gradient_accumulation_steps, topo.data, topo.data_rank)
    eval_order = SampleOrder(layout.micro_batch_size, 1, topo.data, topo.data_rank)
    steps = cfg.training.train_steps
    data = cfg.data.model_copy(update={"embedded": None, "paths": prefixes}) if cfg.data.embedded else cfg.data
    train_set, valid_set = build_datasets(
        data, cfg.model.seq_length, cfg.training.seed, tokenizer,
        train_samples=steps * layout.global_batch_size,
        valid_samples=cfg.training.eval_iters * eval_order.global_batch_size,
        cache_dir=cache_dir)
    byte_lengths = byte_lengths_table(tokenizer, vocab_size)
    start_step = checkpoint.resume(engine, cfg)

    run_dir = prepare_run_dir(cfg, topo)
    metrics = MetricsLog(run_dir, layout.global_batch_size * cfg.model.seq_length, steps, group)
    say = metrics.print
    say(f"world {topo.world_size} (tp {topo.tensor} x pp {topo.pipeline} x dp {topo.data}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, global batch {layout.global_batch_size} "
        f"x {cfg.model.seq_length} tokens, steps {start_step}->{steps}, set-up {time.perf_counter() - started:.1f}s")

    def run_eval(step: int) -> dict:
        result = evaluate(engine, valid_set, eval_order, cfg.training.eval_iters, byte_lengths,
                          topo.tensor, topo.device, group)
        metrics.write([{"step": step, **result}])
        say(f"step {step:>6}/{steps} | validation loss {result['val_loss']:.4f} | "
            f"validation bits per byte {result['val_bpb']:.4f}")
        return result

    tensor_parallel = topo.tensor
    train_started = time.perf_counter()
    result: dict = {}
    for step in range(start_step, steps):
        lr = engine.get_lr()[0]
        step_loss = torch.zeros((), device=topo.device)
        for micro in range(layout.gradient_accumulation_steps):
            batch = collate(train_set, order.micro_batch_indices(step, micro), topo.device)
            loss = masked_mean(token_losses(engine(batch["tokens"]), batch["labels"], tensor_parallel),
                               batch["loss_mask"])
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach()
        metrics.record(step, step_loss / layout.gradient_accumulation_steps, lr, engine.get_global_grad_norm())
        done = step + 1
        if done % cfg.logging.log_interval == 0 or done == steps:
            metrics.flush()
        if done % cfg.training.eval_interval == 0 and done != steps:
            result = run_eval(done)
            metrics.window_start = time.perf_counter()  # keep eval time out of tokens/s
        if cfg.checkpoint.save_dir and cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0 \
                and done != steps:
            checkpoint.save(engine, cfg, done, done * layout.global_batch_size)
    trained = steps - start_step
    if trained:
        seconds = time.perf_counter() - train_started
        say(f"trained {trained} steps in {seconds:.1f}s "
            f"({trained * layout.global_batch_size * cfg.model.seq_length / seconds:,.0f} tokens/s)")
    result = run_eval(steps)
    say(f"validation bits per byte: {result['val_bpb']:.4f}")
    if cfg.checkpoint.save_dir and trained:
        say(f"saved checkpoint {checkpoint.save(engine, cfg, steps, steps * layout.global_batch_size)}")
    generate_samples(engine, cfg, tokenizer, topo, say)
    return result


def generate_samples(model, cfg: Config, tokenizer, topo: Topology, say) -> None:
    """Print a few samples from the trained model (every rank samples; rank 0 prints)."""
    prompt = tokenizer.encode(cfg.training.generate_prompt)
    for index in range(cfg.training.generate_samples):
        new_ids = sample(model, prompt, cfg.training.generate_tokens, cfg.model.seq_length,
                         tokenizer.vocab_size, seed=cfg.training.seed + index, device=topo.device)
        say(f"--- sample {index + 1} ---\n{cfg.training.generate_prompt}{tokenizer.decode(new_ids)}")
