"""Per-step metrics: one console line per interval and every step in a JSONL file (plus the
enabled backends). Values are collected without host syncs and reduced once per interval."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Throughput:
    """What one optimizer step processes and costs, to turn step times into rates."""

    tokens_per_step: int
    samples_per_step: int
    flops_per_step: float  # model FLOPs of one step summed over all ranks
    world_size: int
    peak_flops: float | None  # per device; None: no MFU


def memory_mib(device: torch.device) -> float:
    """CUDA: max allocated since start; CPU: this process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class MetricsLog:
    """Collects per-step values and flushes them at each log interval. The loss is averaged over
    data-parallel ranks with one all-reduce per interval; rank 0 (run_dir set) writes and prints."""

    def __init__(self, run_dir: Path | None, throughput: Throughput, total_steps: int, group=None,
                 device: torch.device = torch.device("cpu"), backends=None):
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self.rate = throughput
        self.total_steps = total_steps
        self.group = group
        self.device = device
        self.backends = backends
        self.pending: list[tuple[int, torch.Tensor, float, object, dict[str, float]]] = []
        self.skipped: dict[int, int] = {}  # step -> skipped steps so far (divergence guard)
        self.start = self.window_start = time.perf_counter()

    def record(self, step: int, loss: torch.Tensor, lr: float, grad_norm, timings: dict[str, float],
               skipped: int = 0) -> None:
        """`skipped`: steps the divergence guard skipped so far, this one included."""
        self.pending.append((step, loss.detach(), lr, grad_norm, timings))
        self.skipped[step] = skipped

    def flush(self) -> dict | None:
        """Average pending losses over ranks, write them, print one line; returns the last record."""
        if not self.pending:
            return None
        losses = torch.stack([loss.float().cpu() for _, loss, _, _, _ in self.pending])
        if dist.is_initialized():
            dist.all_reduce(losses, group=self.group)
            losses /= dist.get_world_size(self.group)
        now = time.perf_counter()
        steps = len(self.pending)
        step_seconds = max(now - self.window_start, 1e-9) / steps
        rate = self.rate
        interval = {
            "tokens_per_sec": rate.tokens_per_step / step_seconds,
            "samples_per_sec": rate.samples_per_step / step_seconds,
            "tflops_per_rank": rate.flops_per_step / step_seconds / rate.world_size / 1e12,
            "memory_mib": memory_mib(self.device),
        }
        if rate.peak_flops:
            interval["mfu"] = interval["tflops_per_rank"] * 1e12 / rate.peak_flops
        for phase in self.pending[0][4]:
            interval[f"{phase}_ms"] = 1000 * sum(t[phase] for *_, t in self.pending) / steps
        records = [{"step": step + 1, "loss": loss, "lr": lr, "grad_norm": _as_float(norm),
                    "skipped_steps": self.skipped.pop(step, 0), **interval}
                   for (step, _, lr, norm, _), loss in zip(self.pending, losses.tolist())]
        self.write(records)
        last = records[-1]
        eta = (self.total_steps - last["step"]) * step_seconds
        mfu = f" | MFU {last['mfu']:.1%}" if "mfu" in last else ""
        mfu += f" | skipped {last['skipped_steps']}" if last["skipped_steps"] else ""
        norm = "-" if last["grad_norm"] is None else f"{last['grad_norm']:.3f}"
        split = " / ".join(f"{k[:-3]} {last[k]:.0f}" for k in last if k.endswith("_ms"))
        self.print(f"step {last['step']:>6}/{self.total_steps} {progress_bar(last['step'], self.total_steps)} | "
                   f"loss {last['loss']:.4f} | lr {last['lr']:.3e} | "
                   f"grad_norm {norm} | {last['tokens_per_sec']:,.0f} tokens/s | "
                   f"{last['samples_per_sec']:.1f} samples/s | {last['tflops_per_rank']:.3f} TFLOP/s/rank{mfu} | "
                   f"ms/step {split} | mem {last['memory_mib']:,.0f} MiB | "
                   f"elapsed {now - self.start:.1f}s | ETA {eta:.0f}s")
        self.pending.clear()
        self.window_start = time.perf_counter()
        return last

    def write(self, records: list[dict]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        if self.backends is not None:
            for record in records:
                self.backends.log(record["step"], {k: v for k, v in record.items() if k != "step"})

    def print(self, line: str) -> None:
        if self.path is not None:
            print(line, flush=True, file=sys.stdout)


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """A plain-text bar: one line per interval, no carriage returns, so SLURM logs stay readable."""
    filled = round(width * done / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done / max(total, 1):3.0f}%"


def _as_float(value) -> float | None:
    if value is None:  # e.g. pipeline stages in fp32 without ZeRO: DeepSpeed keeps no norm
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)
