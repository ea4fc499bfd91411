"""torch.profiler over a window of training steps (logging.profile_steps: [first, last])."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class StepProfiler:
    """Records steps first..last (1-based, inclusive) and writes one Chrome trace per rank to
    `out` (open in chrome://tracing or Perfetto). A no-op when not configured."""

    def __init__(self, window: list[int] | None, out: Path, topo):
        self.first, self.last = (window[0], window[-1]) if window else (0, -1)
        self.profiler = None
        self.out = out
        self.rank = topo.rank
        self.cuda = topo.device.type == "cuda"

    @contextlib.contextmanager
    def step(self, step: int):
        number = step + 1
        if number == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()
        try:
            with torch.profiler.record_function(f"step {number}") if self.profiler else contextlib.nullcontext():
                yield
        finally:
            if self.profiler is not None and number == self.last:
                self.profiler.__exit__(None, None, None)
                self.out.mkdir(parents=True, exist_ok=True)
                self.profiler.export_chrome_trace(str(self.out / f"trace-rank{self.rank}.json"))
                self.profiler = None
