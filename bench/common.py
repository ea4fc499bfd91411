"""Shared pieces of the benchmarks: model sizes and families, a Trainer driven in-process exactly
as `Trainer.run` drives it, a plain-PyTorch GPT that loads the same initial weights, and
interleaved timing (median of windows) so that a shared, noisy machine affects both sides alike.

Every number the benchmarks print is a ratio against a baseline measured in the same process,
window after window, in alternating order (ABBA), so slow periods of the machine hit both.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# (layers, hidden, heads, seq_length, micro batch): nanoGPT's CPU recipe, and its Shakespeare size.
SIZES = {
    "small": (4, 128, 4, 64, 12),
    "medium": (6, 384, 6, 256, 8),
    # GPU sizes (bench/gpu.sh): GPT-3 125M / 350M / 1.3B shapes at 2048 tokens.
    "125m": (12, 768, 12, 2048, 8),
    "350m": (24, 1024, 16, 2048, 8),
    "1.3b": (24, 2048, 16, 2048, 4),
}
GPU_SIZES = ("125m", "350m", "1.3b")
# GPU sizes pad the vocabulary to GPT-2's padded 50,304 so the output layer costs what it does
# with the GPT-2 tokenizer (the embedded corpus's ids stay below 2,048 and train as usual).
GPU_VOCAB = 50304
FAMILIES = {
    # GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings, sequential residual.
    "gpt2": ["model.position_embedding=learned", "model.norm=layernorm", "model.activation=gelu",
             "model.bias=true", "model.tie_embeddings=true", "model.parallel_residual=false"],
    # Llama: rotary, RMSNorm, SwiGLU, no biases, untied output, grouped-query attention.
    "llama": ["model.position_embedding=rotary", "model.norm=rmsnorm", "model.activation=swiglu",
              "model.bias=false", "model.tie_embeddings=false", "model.parallel_residual=false"],
}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """The variables torchrun would set, for a 1-rank process group in this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def overrides(size: str, family: str, *, world: int = 1, tensor: int = 1, pipeline: int = 1,
              micro_batch: int | None = None, global_batch: int | None = None, steps: int = 100,
              run_dir: str | None = None, cache_dir: str | None = None, zero: int = 1,
              extra: list[str] = ()) -> list[str]:
    """`--set` overrides of a benchmark run (the embedded Shakespeare corpus, our data path)."""
    layers, hidden, heads, seq, micro = SIZES[size]
    micro = micro_batch or micro
    from megatron_gpt.config.dims import ParallelDims

    data_parallel = ParallelDims(world, tensor, pipeline).data
    family_sets = list(FAMILIES[family])
    if family == "llama":
        family_sets.append(f"model.num_kv_heads={max(1, heads // 2)}")
    run_dir = run_dir or tempfile.mkdtemp(prefix="megatron-gpt-bench-")
    sets = [
        "name=bench", f"model.num_layers={layers}", f"model.hidden_size={hidden}",
        f"model.num_attention_heads={heads}", f"model.seq_length={seq}", *family_sets,
        "tokenizer.type=embedded", "data.embedded=shakespeare", "data.split=95,5,0",
        f"training.micro_batch_size={micro}", f"training.global_batch_size={global_batch or micro * data_parallel}",
        f"training.train_steps={steps}", "training.eval_iters=1", f"training.eval_interval={10**9}",
        "training.generate_samples=0", "training.device=cpu",
        "schedule.warmup_steps=10", "optimizer.lr=1e-3", "optimizer.min_lr=1e-4",
        "checkpoint.save_dir=null", "checkpoint.resume=false",
        f"logging.run_dir={run_dir}", "logging.log_interval=10", "logging.plot=false",
        f"parallelism.tensor={tensor}", f"parallelism.pipeline={pipeline}", f"parallelism.zero_stage={zero}",
        f"launcher.nproc_per_node={world}",
    ]
    if size in GPU_SIZES:
        sets.append(f"model.make_vocab_size_divisible_by={GPU_VOCAB // tensor}")
    if cache_dir:
        sets.append(f"data.cache_dir={cache_dir}")
    return sets + list(extra)


def load(sets: list[str], world: int = 1):
    from megatron_gpt.config import load_config

    return load_config([], sets, world_size=world)


class FullStack:
    """megatron-gpt's own path: a Trainer (DeepSpeed engine, ZeRO, our datasets and sample order),
    stepped with the body of `Trainer.run`'s loop (LR read, train_step, metrics record, interval
    flush, the preemption check); only evaluation, checkpoints and samples are left out."""

    def __init__(self, cfg, printer: Callable[[str], None] | None = None):
        from megatron_gpt.training.trainer import Trainer

        with contextlib.redirect_stdout(io.StringIO()):
            self.trainer = Trainer(cfg)
        self.trainer.metrics.print = printer or (lambda line: None)
        self.step_index = 0
        cfg = self.trainer.cfg
        self.log_interval = cfg.logging.log_interval
        self.tokens_per_step = self.trainer.layout.global_batch_size * cfg.model.seq_length

    def steps(self, count: int) -> None:
        trainer, metrics = self.trainer, self.trainer.metrics
        for _ in range(count):
            step = self.step_index
            lr = trainer.engine.get_lr()[0]
            loss, timings = trainer.train_step(step)
            metrics.record(step, loss, lr, trainer.grad_norm(), timings)
            done = step + 1
            if done % self.log_interval == 0:
                metrics.flush()
            trainer.stop_requested()
            self.step_index = done

    def losses(self) -> list[float]:
        """Per-step losses so far, as the Trainer wrote them to metrics.jsonl."""
        import json

        self.trainer.metrics.flush()
        path = self.trainer.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if "loss" in r]


# ----------------------------------------------------------------------------- plain PyTorch


def plain_model(cfg, vocab_size: int):
    """A minimal GPT in plain PyTorch (nn.Linear, nn.LayerNorm/RMSNorm, SDPA) with the same
    parameter names and layout as megatron_gpt.model.GPT, so it loads the same initial weights."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    m = cfg.model
    heads = m.num_attention_heads
    kv_heads = m.num_kv_heads or heads
    head_dim = m.hidden_size // heads
    q_per_kv = heads // kv_heads
    ffn = m.ffn_hidden_size or (64 * math.ceil(8 * m.hidden_size / 3 / 64) if m.activation == "swiglu"
                                else 4 * m.hidden_size)

    def norm():
        if m.norm == "rmsnorm":
            return nn.RMSNorm(m.hidden_size, eps=m.norm_eps)
        return nn.LayerNorm(m.hidden_size, eps=m.norm_eps, bias=m.bias)

    rotary = int(head_dim * m.rotary_pct) if m.position_embedding == "rotary" else 0
    if rotary:
        inv_freq = 1.0 / (m.rotary_base ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
        angles = torch.outer(torch.arange(m.seq_length, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rotate(x):
        x_rot, x_pass = x[..., :rotary], x[..., rotary:]
        half = rotary // 2
        seq = x.shape[1]
        turned = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
        return torch.cat([x_rot * cos[:seq] + turned * sin[:seq], x_pass], dim=-1)

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(vocab_size, m.hidden_size)
            self.position = nn.Embedding(m.seq_length, m.hidden_size) if m.position_embedding == "learned" else None

        def forward(self, tokens):
            hidden = self.word(tokens)
            if self.position is not None:
                hidden = hidden + self.position(torch.arange(tokens.shape[1]))
            return hidden

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(m.hidden_size, (heads + 2 * kv_heads) * head_dim, bias=m.bias)
            self.dense = nn.Linear(heads * head_dim, m.hidden_size, bias=m.bias)

        def forward(self, x):
            b, s, _ = x.shape
            qkv = self.qkv(x).view(b, s, kv_heads, q_per_kv + 2, head_dim)
            q = qkv[:, :, :, :q_per_kv].reshape(b, s, heads, head_dim)
            k, v = qkv[:, :, :, q_per_kv], qkv[:, :, :, q_per_kv + 1]
            if rotary:
                q, k = rotate(q), rotate(k)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=q_per_kv > 1)
            return self.dense(out.transpose(1, 2).reshape(b, s, heads * head_dim))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(m.hidden_size, ffn, bias=m.bias) if m.activation == "swiglu" else None
            self.up = nn.Linear(m.hidden_size, ffn, bias=m.bias)
            self.down = nn.Linear(ffn, m.hidden_size, bias=m.bias)

        def forward(self, x):
            inner = F.silu(self.gate(x)) * self.up(x) if self.gate is not None else F.gelu(self.up(x))
            return self.down(inner)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.attention, self.mlp_norm, self.mlp = norm(), Attention(), norm(), MLP()

        def forward(self, x):
            x = x + self.attention(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))

    class FinalNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = norm()

        def forward(self, x):
            return self.norm(x)

    class Output(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(m.hidden_size, vocab_size, bias=False)

        def forward(self, x):
            return self.linear(x)

    class PlainGPT(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [Embed(), *[Block() for _ in range(m.num_layers)], FinalNorm()]
            if not m.tie_embeddings:
                layers.append(Output())
            self.layers = nn.ModuleList(layers)

        def forward(self, tokens):
            x = tokens
            for layer in self.layers:
                x = layer(x)
            if m.tie_embeddings:
                x = F.linear(x, self.layers[0].word.weight)
            return x

    return PlainGPT()


class PlainLoop:
    """The baseline: nanoGPT's loop in plain PyTorch. Same initial weights (copied from the
    Trainer's model before its first step), the same batches (the same samples of the same
    GPTDataset, read into memory before timing, so the baseline pays nothing for data), torch's
    fused AdamW with the same hyper-parameters, decay groups and LR schedule, gradient clipping."""

    def __init__(self, full: FullStack, steps: int):
        import torch

        from megatron_gpt.training.schedule import lr_multiplier

        trainer = full.trainer
        cfg = trainer.cfg
        self.model = plain_model(cfg, trainer.model.layers[0].word.weight.shape[0] * trainer.topo.tensor)
        state = {k: v for k, v in trainer.model.state_dict().items() if not k.endswith("_extra_state")}
        self.model.load_state_dict(state)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)  # the kernel the framework uses
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(cfg))
        self.clip = cfg.training.gradient_clipping
        order = trainer.order
        self.batches = []
        for step in range(steps):
            indices = [i for micro in range(order.gradient_accumulation_steps)
                       for i in order.micro_batch_indices(step, micro)]
            samples = [trainer.train_set[i] for i in indices]
            self.batches.append((torch.stack([s["tokens"] for s in samples]),
                                 torch.stack([s["labels"] for s in samples])))
        self.step_index = 0
        self.losses: list[torch.Tensor] = []
        self.tokens_per_step = full.tokens_per_step

    def steps(self, count: int) -> None:
        import torch
        import torch.nn.functional as F

        model, optimizer = self.model, self.optimizer
        for _ in range(count):
            x, y = self.batches[self.step_index]
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.losses.append(loss.detach())
            self.step_index += 1


# ----------------------------------------------------------------------------- timing
#
# These machines are shared: other people's jobs take cores at random times, and a window in
# which they did is not a measurement of us. Each window records the CPU time the rest of the
# machine used meanwhile (all cores' busy and steal time from /proc/stat, minus our processes'
# own CPU time from /proc/PID/stat); a pair of windows (A next to B) counts only if that was
# below QUIET_CORES on average. Windows continue until `windows` quiet pairs are in or
# `max_windows` have run; then the quiet pairs are used, or all of them flagged as busy.

QUIET_CORES = 0.15
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle  # user nice system (idle iowait) irq softirq steal


def _process_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
        except (OSError, ValueError, IndexError):
            pass
    return total


class Meter:
    """Wall time of a window, and the cores that processes other than `pids` kept busy in it."""

    def __init__(self, pids: list[int] | None = None):
        self.pids = pids or [os.getpid()]

    def __enter__(self):
        self.busy, self.ours = _machine_busy_ticks(), _process_ticks(self.pids)
        self.begin = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.begin
        busy = _machine_busy_ticks()
        if busy is None or self.busy is None:
            self.foreign = 0.0
        else:
            others = (busy - self.busy) - (_process_ticks(self.pids) - self.ours)
            self.foreign = max(0.0, others / _TICK / max(self.seconds, 1e-9))
        return False


@dataclass
class Timed:
    name: str
    tokens_per_step: int
    steps_per_window: int
    seconds: list[float] = field(default_factory=list)   # one per window
    foreign: list[float] = field(default_factory=list)   # other processes' cores in that window

    def rates(self, keep: list[int] | None = None) -> list[float]:
        rates = [self.tokens_per_step * self.steps_per_window / s for s in self.seconds]
        return rates if keep is None else [rates[i] for i in keep]

    def tokens_per_sec(self, keep: list[int] | None = None) -> float:
        return statistics.median(self.rates(keep))


@dataclass
class Pairs:
    """Interleaved windows of two or more runners and which rounds were quiet."""

    timed: dict[str, Timed]
    quiet: list[int]
    busy: bool  # too few quiet rounds: all rounds used, numbers flagged

    @property
    def keep(self) -> list[int]:
        return list(range(len(next(iter(self.timed.values())).seconds))) if self.busy else self.quiet

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of a's rate / b's rate in the same round (drift cancels)."""
        ra, rb = self.timed[a].rates(self.keep), self.timed[b].rates(self.keep)
        return statistics.median(x / y for x, y in zip(ra, rb))

    def tokens_per_sec(self, name: str) -> float:
        return self.timed[name].tokens_per_sec(self.keep)

    def describe(self) -> str:
        rounds = len(next(iter(self.timed.values())).seconds)
        foreign = max(max(t.foreign) for t in self.timed.values()) if rounds else 0.0
        if self.busy:
            return f"BUSY machine: {len(self.quiet)}/{rounds} quiet rounds, all used (others took up to {foreign:.1f} cores)"
        return f"{len(self.quiet)} quiet rounds of {rounds}"


def interleave(runners: dict[str, object], steps_per_window: int, windows: int, warmup: int,
               max_windows: int | None = None, pids: list[int] | None = None) -> Pairs:
    """Run `warmup` steps of each runner, then rounds of one timed window per runner, reversing
    the order every round (A B, B A, ...), until `windows` quiet rounds or `max_windows` rounds.
    Each runner has `.steps(n)` and `.tokens_per_step`."""
    names = list(runners)
    for name in names:
        runners[name].steps(warmup)
    timed = {name: Timed(name, runners[name].tokens_per_step, steps_per_window) for name in names}
    quiet: list[int] = []
    limit = max_windows or 3 * windows
    round_index = 0
    while len(quiet) < windows and round_index < limit:
        foreign = 0.0
        for name in (names if round_index % 2 == 0 else names[::-1]):
            with Meter(pids) as meter:
                runners[name].steps(steps_per_window)
            timed[name].seconds.append(meter.seconds)
            timed[name].foreign.append(meter.foreign)
            foreign = max(foreign, meter.foreign)
        if foreign < QUIET_CORES:
            quiet.append(round_index)
        round_index += 1
    return Pairs(timed, quiet, busy=len(quiet) < max(1, windows // 2))


def single_thread_jitter(repeats: int = 30, size: int = 384, matmuls: int = 40) -> float:
    """Standard deviation over median of the time of one fixed single-thread matmul workload
    (~50 ms), repeated: how much identical steps of one rank vary on this machine by itself.
    A synchronous step costs the slower rank's time, so this noise is paid at every all-reduce."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        times = []
        for _ in range(repeats + 3):
            begin = time.perf_counter()
            for _ in range(matmuls):
                torch.mm(a, b)
            times.append(time.perf_counter() - begin)
    finally:
        torch.set_num_threads(threads)
    times = times[3:]
    return statistics.pstdev(times) / statistics.median(times)


def machine_state() -> str:
    """Load average and cores: other work on the machine shows up here."""
    try:
        load1, load5, _ = os.getloadavg()
    except OSError:
        return f"{os.cpu_count()} cores"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores, load {load1:.1f}/{load5:.1f} (1/5 min)"
