"""Per-step metrics: one console line per interval and every step in a JSONL file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


class MetricsLog:
    """Collects per-step values without host syncs and flushes them at each log interval.

    The loss is averaged over data-parallel ranks with one all-reduce per interval.
    """

    def __init__(self, run_dir: Path | None, tokens_per_step: int, total_steps: int, group=None):
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self.tokens_per_step = tokens_per_step
        self.total_steps = total_steps
        self.group = group
        self.pending: list[tuple[int, torch.Tensor, float, object]] = []
        self.start = self.window_start = time.perf_counter()

    def record(self, step: int, loss: torch.Tensor, lr: float, grad_norm) -> None:
        self.pending.append((step, loss.detach(), lr, grad_norm))

    def flush(self) -> dict | None:
        """Average pending losses over ranks, write them, print one line; returns the last record."""
        if not self.pending:
            return None
        losses = torch.stack([loss.float().cpu() for _, loss, _, _ in self.pending])
        if dist.is_initialized():
            dist.all_reduce(losses, group=self.group)
            losses /= dist.get_world_size(self.group)
        now = time.perf_counter()
        tokens_per_sec = self.tokens_per_step * len(self.pending) / max(now - self.window_start, 1e-9)
        records = [{"step": step + 1, "loss": loss, "lr": lr, "grad_norm": _as_float(norm),
                    "tokens_per_sec": tokens_per_sec}
                   for (step, _, lr, norm), loss in zip(self.pending, losses.tolist())]
        self.write(records)
        last = records[-1]
        self.print(f"step {last['step']:>6}/{self.total_steps} | loss {last['loss']:.4f} | lr {last['lr']:.3e} | "
                   f"grad_norm {last['grad_norm']:.3f} | {tokens_per_sec:,.0f} tokens/s | "
                   f"elapsed {now - self.start:.1f}s")
        self.pending.clear()
        self.window_start = time.perf_counter()
        return last

    def write(self, records: list[dict]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")

    def print(self, line: str) -> None:
        if self.path is not None:
            print(line, flush=True, file=sys.stdout)


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if isinstance(value, torch.Tensor) else value)
